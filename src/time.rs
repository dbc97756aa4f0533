//! Time as the database stores it: integer milliseconds since the Unix epoch.
//!
//! Both backends store instants as `BIGINT` milliseconds, which keeps the SQL identical on MySQL and SQLite
//! and makes "is this hold overdue?" a plain integer comparison inside a conditional `UPDATE`. The API shows
//! instants as RFC 3339 UTC strings; the conversion lives here and nowhere else.

use chrono::{DateTime, SecondsFormat, Utc};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// The current instant in milliseconds.
pub fn now_ms() -> Millis {
    Utc::now().timestamp_millis()
}

/// RFC 3339 UTC with millisecond precision, e.g. `2026-11-25T10:00:00.000Z`.
pub fn rfc3339(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Serde helpers so domain structs hold `Millis` and serialise as RFC 3339.
pub mod serde_rfc3339 {
    use super::{rfc3339, Millis};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(ms: &Millis, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&rfc3339(*ms))
    }

    pub mod option {
        use super::super::{rfc3339, Millis};
        use serde::Serializer;

        pub fn serialize<S: Serializer>(ms: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => s.serialize_str(&rfc3339(*ms)),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_as_utc_with_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
    }
}
