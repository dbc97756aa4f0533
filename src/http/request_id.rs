//! Request ids: one name for a request in the proxy's log, our log and the client's bug report.
//!
//! nginx sends `X-Request-Id: $request_id` (32 hex characters); we keep an incoming id when it is 1–128
//! characters of `[A-Za-z0-9._:-]`, so ids of other proxies and tracing systems pass too, and generate
//! our own otherwise. An invalid id is replaced, never echoed: it would go into response headers and
//! log lines, so only a harmless alphabet is let through. [`assign`] is the outermost middleware, so
//! every response carries the header, the 404 fallback, 413, the timeout's 503 and a panic's 500
//! included.

use std::fmt;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The longest incoming id kept.
pub const MAX_LEN: usize = 128;

/// A request id; a value of this type is 1–128 characters of `[A-Za-z0-9._:-]`. In the request
/// extensions of every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// `text`, if it is a valid id.
    pub fn parse(text: &str) -> Option<RequestId> {
        let valid = (1..=MAX_LEN).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        valid.then(|| RequestId(text.to_string()))
    }

    /// A new random id: 32 lowercase hex characters (128 bits), the shape of nginx's `$request_id`.
    pub fn generate() -> RequestId {
        RequestId(format!("{:032x}", rand::thread_rng().gen::<u128>()))
    }

    /// The id of a request with these `X-Request-Id` values: the one value when it is valid, else new.
    /// Several values are ambiguous and are replaced too.
    pub fn from_headers(headers: &axum::http::HeaderMap) -> RequestId {
        let mut values = headers.get_all(&HEADER).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok().and_then(RequestId::parse),
            _ => None,
        }
        .unwrap_or_else(RequestId::generate)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Middleware: puts the [`RequestId`] in the request extensions and the `X-Request-Id` response header.
pub async fn assign(mut req: Request, next: Next) -> Response {
    let id = RequestId::from_headers(req.headers());
    // The alphabet is a subset of what a header value may hold, so this cannot fail.
    let value = HeaderValue::from_str(id.as_str()).expect("a request id is a valid header value");
    req.extensions_mut().insert(id);
    let mut response = next.run(req).await;
    response.headers_mut().insert(HEADER, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_the_safe_alphabet_up_to_128_characters_are_kept() {
        for id in [
            "a",
            "0f3c9b2e7a1d4c5b8e6f0a9b3c2d1e4f",
            "trace-1.2_3:4",
            &"x".repeat(128),
        ] {
            assert_eq!(RequestId::parse(id).map(|r| r.0), Some(id.to_string()));
        }
    }

    #[test]
    fn empty_long_or_odd_ids_are_refused() {
        let long = "x".repeat(129);
        for id in [
            "",
            "has space",
            "semi;colon",
            "new\nline",
            "ünï",
            "a/b",
            &long,
        ] {
            assert_eq!(RequestId::parse(id), None, "{id:?}");
        }
    }

    #[test]
    fn generated_ids_are_32_lowercase_hex_characters_and_differ() {
        let (a, b) = (RequestId::generate(), RequestId::generate());
        for id in [&a, &b] {
            assert_eq!(id.as_str().len(), 32, "{id}");
            assert!(id
                .as_str()
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        }
        assert_ne!(a, b);
    }

    #[test]
    fn one_valid_header_is_kept_and_anything_else_replaced() {
        let mut headers = axum::http::HeaderMap::new();
        assert_eq!(RequestId::from_headers(&headers).as_str().len(), 32);
        headers.insert(&HEADER, HeaderValue::from_static("abc-123"));
        assert_eq!(RequestId::from_headers(&headers).as_str(), "abc-123");
        headers.append(&HEADER, HeaderValue::from_static("def-456"));
        let id = RequestId::from_headers(&headers);
        assert!(id.as_str() != "abc-123" && id.as_str() != "def-456", "{id}");
        headers.insert(&HEADER, HeaderValue::from_static("bad id"));
        assert_ne!(RequestId::from_headers(&headers).as_str(), "bad id");
    }
}
