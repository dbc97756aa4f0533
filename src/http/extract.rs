//! Request parsing: authentication, JSON bodies with field-naming errors, ids, the Idempotency-Key header.
//!
//! axum's own rejections answer in plain text; these wrappers answer in problem+json with the exact field,
//! query parameter or header at fault.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::problem::Problem;
use super::AppState;
use crate::accounts::{Role, User};
use crate::idempotency::IdempotencyKey;

/// The authenticated caller and their token.
pub struct Auth {
    pub user: User,
    pub token: String,
}

impl Auth {
    pub fn require_admin(&self) -> Result<(), Problem> {
        if self.user.role == Role::Admin {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this path is for administrators",
            ))
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let token = match value.split_once(' ') {
            Some((scheme, token))
                if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
            {
                token.trim()
            }
            _ => return Err(Problem::unauthenticated()),
        };
        match app.sessions.lookup(token).await? {
            Some(user) => Ok(Auth {
                user,
                token: token.to_string(),
            }),
            None => Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the token is unknown, expired or revoked",
            )),
        }
    }
}

/// The raw body, limited to 64 KiB (413 beyond).
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request bodies are limited to {} bytes", super::BODY_LIMIT),
                ))
            }
            Err(rejection) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                rejection.body_text(),
            )),
        }
    }
}

/// Parses a JSON body into `T` (which denies unknown fields); errors name the field at fault.
pub fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = inner.to_string();
        // serde names unknown and missing fields only in its message: pull the name out of the backticks.
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|prefix| message.find(prefix).map(|i| &message[i + prefix.len()..]))
            .and_then(|rest| rest.split('`').next());
        let field = match (named, path.as_str()) {
            (Some(name), "." | "") => name.to_string(),
            (Some(name), p) if p == name || p.ends_with(&format!(".{name}")) => p.to_string(),
            (Some(name), p) => format!("{p}.{name}"),
            (None, "." | "") => String::new(),
            (None, p) => p.to_string(),
        };
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        if inner.is_syntax() || inner.is_eof() || field.is_empty() {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("malformed JSON body: {message}"),
            )
        } else {
            Problem::invalid(&field, format!("{field}: {message}"))
        }
    })
}

/// A path id: anything that is not a positive integer cannot exist, so it is a 404.
pub fn id(raw: &str) -> Result<i64, Problem> {
    raw.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(Problem::not_found)
}

/// The Idempotency-Key header, required on the routes that create effects.
pub struct RequiredIdempotencyKey(pub IdempotencyKey);

impl<S: Send + Sync> FromRequestParts<S> for RequiredIdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "idempotency_key_missing",
                "this request needs an Idempotency-Key header (1-255 printable ASCII characters)",
            ));
        };
        let text = value.to_str().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Idempotency-Key must be printable ASCII",
            )
            .with("field", "Idempotency-Key")
        })?;
        IdempotencyKey::parse(text)
            .map(RequiredIdempotencyKey)
            .map_err(|m| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("Idempotency-Key {m}"),
                )
                .with("field", "Idempotency-Key")
            })
    }
}

/// Paging parameters shared by list routes.
pub struct Paging {
    pub limit: i64,
    pub after: i64,
}

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

impl Paging {
    pub fn from_query(q: &Query<HashMap<String, String>>) -> Result<Paging, Problem> {
        let limit = match q.get("limit") {
            None => DEFAULT_LIMIT,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| {
                    Problem::invalid(
                        "limit",
                        format!("limit must be an integer from 1 to {MAX_LIMIT}"),
                    )
                })?,
        };
        let after = match q.get("cursor").filter(|c| !c.is_empty()) {
            None => 0,
            Some(c) => decode_cursor(c)
                .ok_or_else(|| Problem::invalid("cursor", "cursor is not one this API issued"))?,
        };
        Ok(Paging { limit, after })
    }
}

/// Cursors are opaque to clients; today they wrap the last id seen.
pub fn encode_cursor(after: i64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("after:{after}"))
}

fn decode_cursor(cursor: &str) -> Option<i64> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix("after:")?
        .parse()
        .ok()
        .filter(|v: &i64| *v >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct In {
        quantity: i64,
    }

    #[test]
    fn unknown_missing_and_mistyped_fields_are_named() {
        let p = json::<In>(br#"{"quantity":1,"colour":"red"}"#).unwrap_err();
        assert_eq!(p.member("field").unwrap(), "colour");
        let p = json::<In>(br#"{}"#).unwrap_err();
        assert_eq!(p.member("field").unwrap(), "quantity");
        let p = json::<In>(br#"{"quantity":"two"}"#).unwrap_err();
        assert_eq!(p.member("field").unwrap(), "quantity");
        let p = json::<In>(b"{not json").unwrap_err();
        assert_eq!(p.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(p.member("field").is_none());
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("nope"), None);
    }
}
