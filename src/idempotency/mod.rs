//! `Idempotency-Key` (IETF draft, Stripe's behaviour), scoped per user, stored in `idempotency_keys`.
//!
//! Lifecycle of one key: [`IdempotencyStore::begin`] inserts a `running` row (the PRIMARY KEY
//! `(user_id, idem_key)` makes exactly one request the owner); the owner runs the handler; the outcome is
//! saved (`done`, with status and body) or, for outcomes that must not be saved, the row is deleted so a
//! retry runs again. Whenever the handler commits a business effect, the response is saved *inside that same
//! transaction* ([`complete_in`]), so a crash can never leave an effect whose key would run it a second time.
//! A `running` row carries a lease: if its owner died, the next retry after `locked_until` takes it over.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::db::{is_unique_violation, Db};
use crate::time::{now_ms, Millis};

/// A validated Idempotency-Key: 1–255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 255 {
            return Err("must be 1 to 255 characters".into());
        }
        if !raw.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err("must be printable ASCII".into());
        }
        Ok(IdempotencyKey(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What identifies "the same request": method, path and body (JSON bodies compared after parsing, so
/// whitespace and key order do not matter).
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let canonical = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => serde_json::to_vec(&sorted(v)).unwrap_or_else(|_| body.to_vec()),
        Err(_) => body.to_vec(),
    };
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(&canonical);
    hex::encode(h.finalize())
}

/// The same JSON value with every object's keys in sorted order.
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

/// A saved outcome, replayed with `Idempotent-Replayed: true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub status: u16,
    pub body: String,
}

/// The right to run the request under a key.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub user_id: i64,
    pub key: String,
    /// Set by [`complete_in`] when the outcome was written inside the effect's own transaction; a
    /// handler that then succeeds (its transaction committed) needs no separate [`IdempotencyStore::finish`].
    pub saved_in_tx: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Ticket {
    fn new(user_id: i64, key: String) -> Ticket {
        Ticket {
            user_id,
            key,
            saved_in_tx: Default::default(),
        }
    }

    pub fn was_saved_in_tx(&self) -> bool {
        self.saved_in_tx.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Debug)]
pub enum Begin {
    Proceed(Ticket),
    Replay(Saved),
}

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("this Idempotency-Key was used with a different request")]
    Reused,
    #[error("a request with this Idempotency-Key is still running")]
    InUse { retry_after_secs: u64 },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

#[derive(Clone, Debug)]
pub struct IdempotencyStore {
    db: Db,
    lease: Duration,
}

impl IdempotencyStore {
    pub fn new(db: Db, lease: Duration) -> Self {
        IdempotencyStore { db, lease }
    }

    #[tracing::instrument(skip(self, request_hash), fields(user_id, key = key.as_str()))]
    pub async fn begin(
        &self,
        user_id: i64,
        key: &IdempotencyKey,
        request_hash: &str,
    ) -> Result<Begin, IdempotencyError> {
        let lease_ms = self.lease.as_millis() as i64;
        for _ in 0..5 {
            let now = now_ms();
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, status, created_at, locked_until) \
                 VALUES (?, ?, ?, 'running', ?, ?)",
            )
            .bind(user_id)
            .bind(key.as_str())
            .bind(request_hash)
            .bind(now)
            .bind(now + lease_ms)
            .execute(self.db.pool())
            .await;
            match inserted {
                Ok(_) => {
                    return Ok(Begin::Proceed(Ticket::new(
                        user_id,
                        key.as_str().to_string(),
                    )))
                }
                Err(e) if is_unique_violation(&e) => {}
                Err(e) if crate::db::is_retryable(&e) => continue,
                Err(e) => return Err(e.into()),
            }
            let row = sqlx::query(
                "SELECT request_hash, status, response_status, response_body, locked_until \
                 FROM idempotency_keys WHERE user_id = ? AND idem_key = ?",
            )
            .bind(user_id)
            .bind(key.as_str())
            .fetch_optional(self.db.pool())
            .await?;
            let Some(row) = row else { continue }; // deleted meanwhile (its owner failed): try again
            let hash: String = row.get(0);
            let status: String = row.get(1);
            if hash != request_hash {
                return Err(IdempotencyError::Reused);
            }
            if status == "done" {
                let code: i64 = row.get(2);
                return Ok(Begin::Replay(Saved {
                    status: code as u16,
                    // response_body is MEDIUMTEXT on MySQL: read it through text_column.
                    body: crate::db::text_column(&row, 3)?.unwrap_or_default(),
                }));
            }
            let locked_until: Millis = row.get(4);
            if locked_until > now {
                let secs = ((locked_until - now) as u64).div_ceil(1000).max(1);
                return Err(IdempotencyError::InUse {
                    retry_after_secs: secs,
                });
            }
            // The owner's lease ran out (it crashed or hung): take the key over, if nobody else just did.
            let taken = sqlx::query(
                "UPDATE idempotency_keys SET locked_until = ? \
                 WHERE user_id = ? AND idem_key = ? AND status = 'running' AND locked_until = ?",
            )
            .bind(now + lease_ms)
            .bind(user_id)
            .bind(key.as_str())
            .bind(locked_until)
            .execute(self.db.pool())
            .await?;
            if taken.rows_affected() == 1 {
                tracing::info!("took over an abandoned idempotency key");
                return Ok(Begin::Proceed(Ticket::new(
                    user_id,
                    key.as_str().to_string(),
                )));
            }
        }
        Err(IdempotencyError::InUse {
            retry_after_secs: 1,
        })
    }

    /// Ends a request outside any business transaction: saves a definite outcome, or forgets the key so
    /// that a retry runs again. A row already completed inside a business transaction is left alone.
    pub async fn finish(
        &self,
        ticket: &Ticket,
        outcome: Option<&Saved>,
    ) -> Result<(), sqlx::Error> {
        match outcome {
            Some(saved) => {
                complete_in(self.db.pool(), ticket, saved).await?;
            }
            None => {
                sqlx::query("DELETE FROM idempotency_keys WHERE user_id = ? AND idem_key = ? AND status = 'running'")
                    .bind(ticket.user_id)
                    .bind(&ticket.key)
                    .execute(self.db.pool())
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes keys created before `before`, in batches; returns how many went. Finished keys go, and so do
    /// keys abandoned while `running` (their owner crashed and nobody retried): their lease has run out.
    /// A key still running under a live lease is kept.
    pub async fn purge(&self, before: Millis, dry_run: bool) -> Result<u64, sqlx::Error> {
        let now = now_ms();
        if dry_run {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM idempotency_keys WHERE created_at < ? \
                 AND (status = 'done' OR locked_until < ?)",
            )
            .bind(before)
            .bind(now)
            .fetch_one(self.db.pool())
            .await?;
            return Ok(n as u64);
        }
        let mut total = 0;
        loop {
            // A subquery keeps each DELETE short, so sweeping never blocks the API for long.
            let keys = sqlx::query(
                "SELECT user_id, idem_key FROM idempotency_keys WHERE created_at < ? \
                 AND (status = 'done' OR locked_until < ?) LIMIT 500",
            )
            .bind(before)
            .bind(now)
            .fetch_all(self.db.pool())
            .await?;
            if keys.is_empty() {
                return Ok(total);
            }
            for k in keys {
                let r = sqlx::query(
                    "DELETE FROM idempotency_keys WHERE user_id = ? AND idem_key = ? AND created_at < ? \
                     AND (status = 'done' OR locked_until < ?)",
                )
                .bind(k.get::<i64, _>(0))
                .bind(k.get::<String, _>(1))
                .bind(before)
                .bind(now)
                    .execute(self.db.pool())
                    .await?;
                total += r.rows_affected();
            }
        }
    }
}

/// Saves the outcome of `ticket` through `exec`: pass a business transaction to make the saved response
/// commit (or not) together with the effect it describes.
pub async fn complete_in<'c, E>(exec: E, ticket: &Ticket, saved: &Saved) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(
        "UPDATE idempotency_keys SET status = 'done', response_status = ?, response_body = ? \
         WHERE user_id = ? AND idem_key = ? AND status = 'running'",
    )
    .bind(i64::from(saved.status))
    .bind(&saved.body)
    .bind(ticket.user_id)
    .bind(&ticket.key)
    .execute(exec)
    .await?;
    ticket
        .saved_in_tx
        .store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_up_to_255() {
        assert!(IdempotencyKey::parse("abc-123 XYZ").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"a".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("tab\there").is_err());
        assert!(IdempotencyKey::parse("é").is_err());
    }

    #[test]
    fn fingerprints_ignore_json_formatting_but_not_content() {
        let a = fingerprint(
            "POST",
            "/v1/reservations",
            br#"{"resource_id":1,"quantity":2}"#,
        );
        let b = fingerprint(
            "POST",
            "/v1/reservations",
            b"{ \"quantity\": 2, \"resource_id\": 1 }",
        );
        let c = fingerprint(
            "POST",
            "/v1/reservations",
            br#"{"resource_id":1,"quantity":3}"#,
        );
        let d = fingerprint(
            "POST",
            "/v1/reservations/1/pay",
            br#"{"resource_id":1,"quantity":2}"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
