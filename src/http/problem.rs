//! RFC 9457 problem details: every error the API returns, with a stable machine-readable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::accounts::AccountError;
use crate::idempotency::IdempotencyError;
use crate::reservations::model::FieldError;
use crate::reservations::ReservationError;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// An error response.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Extension members (RFC 9457 §3.2): `field`, `from`/`to`, `available`, …
    pub extra: Vec<(&'static str, Value)>,
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status,
            code,
            detail: detail.into(),
            extra: Vec::new(),
            retry_after: None,
        }
    }

    pub fn with(mut self, key: &'static str, value: impl Into<Value>) -> Self {
        self.extra.retain(|(k, _)| *k != key);
        self.extra.push((key, value.into()));
        self
    }

    /// An extension member, if set.
    pub fn member(&self, key: &str) -> Option<&Value> {
        self.extra.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn invalid(field: &str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail)
            .with("field", field)
    }

    pub fn field(e: FieldError) -> Self {
        Problem::invalid(e.field, e.to_string())
    }

    pub fn not_found() -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    pub fn unauthenticated() -> Self {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a valid bearer token is required",
        )
    }

    pub fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// A database error: overload (pool exhausted, server out of connections) is a retryable 503, anything
    /// else is a 500 logged with its cause.
    pub fn from_sql(e: sqlx::Error) -> Self {
        let overloaded = match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
            sqlx::Error::Database(d) => d
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|m| matches!(m.number(), 1040 | 1203)),
            _ => false,
        };
        if overloaded {
            tracing::warn!(error = %e, "database overloaded");
            let mut p = Problem::unavailable("the database is overloaded; retry shortly");
            p.retry_after = Some(1);
            p
        } else {
            Problem::internal(e)
        }
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    /// Outcomes an idempotent request saves and replays (http-api.md): business refusals only.
    pub fn is_definite(&self) -> bool {
        matches!(
            self.code,
            "sold_out" | "expired" | "invalid_transition" | "payment_declined"
        )
    }

    fn title(&self) -> &'static str {
        match self.code {
            "invalid_request" => "Invalid request",
            "unauthenticated" => "Authentication required",
            "forbidden" => "Forbidden",
            "not_found" => "Not found",
            "email_taken" => "Email already registered",
            "invalid_credentials" => "Invalid credentials",
            "sold_out" => "Sold out",
            "expired" => "Hold expired",
            "invalid_transition" => "Invalid state transition",
            "payment_declined" => "Payment declined",
            "payment_unavailable" => "Payment gateway unavailable",
            "idempotency_key_missing" => "Idempotency-Key required",
            "idempotency_key_reused" => "Idempotency-Key reused",
            "idempotency_key_in_use" => "Idempotency-Key in use",
            "payload_too_large" => "Payload too large",
            "method_not_allowed" => "Method not allowed",
            "unavailable" => "Service unavailable",
            "rate_limited" => "Too many requests",
            _ => "Internal error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "type": format!("urn:cozy:problem:{}", self.code),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        if let Value::Object(map) = &mut body {
            for (k, v) in &self.extra {
                map.insert((*k).to_string(), v.clone());
            }
        }
        body
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.body().to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ReservationError> for Problem {
    fn from(e: ReservationError) -> Self {
        match e {
            ReservationError::NotFound => Problem::not_found(),
            ReservationError::SoldOut { available } => Problem::new(
                StatusCode::CONFLICT,
                "sold_out",
                format!("not enough left: {available} available"),
            )
            .with("available", available),
            ReservationError::Expired => Problem::new(
                StatusCode::CONFLICT,
                "expired",
                "the hold expired before it was paid; nothing was charged",
            ),
            ReservationError::InvalidTransition { from, to } => Problem::new(
                StatusCode::CONFLICT,
                "invalid_transition",
                format!("a {from} reservation cannot become {to}"),
            )
            .with("from", from.as_str())
            .with("to", to.as_str()),
            ReservationError::Declined(m) => {
                Problem::new(StatusCode::PAYMENT_REQUIRED, "payment_declined", m)
            }
            ReservationError::PaymentUnavailable(m) => Problem::new(
                StatusCode::BAD_GATEWAY,
                "payment_unavailable",
                format!("{m}; retrying is safe and never charges twice"),
            ),
            ReservationError::Sql(e) => Problem::from_sql(e),
        }
    }
}

impl From<AccountError> for Problem {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::Invalid(f) => Problem::field(f),
            AccountError::EmailTaken => Problem::new(
                StatusCode::CONFLICT,
                "email_taken",
                "a user with this email exists",
            )
            .with("field", "email"),
            AccountError::InvalidCredentials => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "wrong email or password",
            ),
            AccountError::Sql(e) => Problem::from_sql(e),
            other => Problem::internal(other),
        }
    }
}

impl From<IdempotencyError> for Problem {
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::Reused => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request",
            ),
            IdempotencyError::InUse { retry_after_secs } => {
                let mut p = Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still running; retry later",
                );
                p.retry_after = Some(retry_after_secs);
                p
            }
            IdempotencyError::Sql(e) => Problem::from_sql(e),
        }
    }
}

impl From<crate::sessions::SessionError> for Problem {
    fn from(e: crate::sessions::SessionError) -> Self {
        tracing::error!(error = %e, "session store failed");
        Problem::unavailable(format!("session store unavailable: {e}"))
    }
}
