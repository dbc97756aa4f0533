//! Runs an effectful handler under an `Idempotency-Key` (http-api.md, "Idempotency").
//!
//! Order of checks: authentication, key presence and body validity happen before this wrapper (their
//! errors are never saved); then the key is claimed ([`IdempotencyStore::begin`]): a finished key replays
//! its saved response with `Idempotent-Replayed: true`, a key used for another request is 422, a key still
//! running is 409 with `Retry-After`. The handler's definite outcome is saved; anything else (5xx) forgets
//! the key so that a retry runs again, which is safe because every effect is guarded in the database.

use std::future::Future;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::problem::{Problem, CONTENT_TYPE};
use super::AppState;
use crate::accounts::User;
use crate::idempotency::{fingerprint, Begin, IdempotencyKey, Saved, Ticket};

/// What an idempotent handler returns: a status and a JSON body, or a problem.
pub type Outcome = Result<(StatusCode, serde_json::Value), Problem>;

pub async fn run<F, Fut>(
    app: &AppState,
    user: &User,
    key: &IdempotencyKey,
    method: &str,
    path: &str,
    body: &[u8],
    handler: F,
) -> Response
where
    F: FnOnce(Ticket) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let request_hash = fingerprint(method, path, body);
    let ticket = match app.idempotency.begin(user.id, key, &request_hash).await {
        Ok(Begin::Proceed(ticket)) => ticket,
        Ok(Begin::Replay(saved)) => {
            metrics::counter!("cozy_idempotent_replays_total").increment(1);
            return replay(saved);
        }
        Err(e) => return Problem::from(e).into_response(),
    };
    let outcome = handler(ticket.clone()).await;
    let saved = match &outcome {
        Ok((status, body)) => Some(Saved {
            status: status.as_u16(),
            body: body.to_string(),
        }),
        Err(problem) if problem.is_definite() => Some(Saved {
            status: problem.status.as_u16(),
            body: problem.body().to_string(),
        }),
        Err(_) => None,
    };
    // A success whose outcome the business transaction already saved (and committed) needs no second
    // write; everything else is recorded (or the key released) here.
    let already_saved = outcome.is_ok() && ticket.was_saved_in_tx();
    if !already_saved {
        if let Err(e) = app.idempotency.finish(&ticket, saved.as_ref()).await {
            // The effect (if any) is committed; the key stays `running` until its lease ends, then a
            // retry re-runs against database guards. Worth a log line, not a failed response.
            tracing::warn!(error = %e, "could not record the idempotent outcome");
        }
    }
    match outcome {
        Ok((status, body)) => (status, axum::Json(body)).into_response(),
        Err(problem) => problem.into_response(),
    }
}

fn replay(saved: Saved) -> Response {
    let status = StatusCode::from_u16(saved.status).unwrap_or(StatusCode::OK);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        CONTENT_TYPE
    };
    let mut response = (status, saved.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
