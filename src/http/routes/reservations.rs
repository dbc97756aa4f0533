//! Reservations: create, read, list, pay, cancel, transition log.
//!
//! The three effectful routes run under [`idempotent::run`]; each passes its ticket down so the saved
//! response commits in the same transaction as the effect.

use std::collections::HashMap;

use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::http::extract::{encode_cursor, id, json, Auth, Body, Paging, RequiredIdempotencyKey};
use crate::http::idempotent;
use crate::http::problem::Problem;
use crate::http::AppState;
use crate::reservations::model::parse_quantity;
use crate::reservations::State as ReservationState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateReservation {
    resource_id: i64,
    quantity: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayReservation {
    payment_method: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelReservation {
    #[serde(default)]
    reason: Option<String>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, Problem> {
    serde_json::to_value(value).map_err(Problem::internal)
}

#[tracing::instrument(skip_all, fields(user = auth.user.id))]
pub async fn create(
    State(app): State<AppState>,
    auth: Auth,
    RequiredIdempotencyKey(key): RequiredIdempotencyKey,
    OriginalUri(uri): OriginalUri,
    Body(body): Body,
) -> Result<Response, Problem> {
    let input: CreateReservation = json(&body)?;
    let quantity = parse_quantity(input.quantity).map_err(Problem::field)?;
    if input.resource_id <= 0 {
        return Err(Problem::invalid(
            "resource_id",
            "resource_id must be a positive integer",
        ));
    }
    let (user_id, service, key_text) = (auth.user.id, &app.reservations, key.as_str());
    let response = idempotent::run(
        &app,
        &auth.user,
        &key,
        "POST",
        uri.path(),
        &body,
        |ticket| async move {
            let r = service
                .reserve(
                    user_id,
                    input.resource_id,
                    quantity,
                    Some(key_text),
                    Some(&ticket),
                )
                .await?;
            Ok((StatusCode::CREATED, to_json(&r)?))
        },
    )
    .await;
    Ok(response)
}

#[tracing::instrument(skip_all, fields(user = auth.user.id))]
pub async fn show(
    State(app): State<AppState>,
    auth: Auth,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let r = app.reservations.get(auth.user.id, id(&raw)?).await?;
    Ok(Json(r).into_response())
}

#[tracing::instrument(skip_all, fields(user = auth.user.id))]
pub async fn list(
    State(app): State<AppState>,
    auth: Auth,
    query: Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    let paging = Paging::from_query(&query)?;
    let state = match query.get("state").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            ReservationState::parse(&s.to_ascii_uppercase()).ok_or_else(|| {
                Problem::invalid(
                    "state",
                    "state must be one of RESERVED, PAID, CANCELLED, EXPIRED",
                )
            })?,
        ),
    };
    let (items, next) = app
        .reservations
        .list(auth.user.id, state, paging.limit, paging.after)
        .await?;
    Ok(Json(json!({ "items": items, "next_cursor": next.map(encode_cursor) })).into_response())
}

#[tracing::instrument(skip_all, fields(user = auth.user.id))]
pub async fn pay(
    State(app): State<AppState>,
    auth: Auth,
    RequiredIdempotencyKey(key): RequiredIdempotencyKey,
    OriginalUri(uri): OriginalUri,
    Path(raw): Path<String>,
    Body(body): Body,
) -> Result<Response, Problem> {
    let reservation_id = id(&raw)?;
    let input: PayReservation = json(&body)?;
    if !app.reservations.gateway().accepts(&input.payment_method) {
        return Err(Problem::invalid(
            "payment_method",
            format!(
                "payment_method {:?} is not accepted by the {} gateway (try sandbox_ok)",
                input.payment_method,
                app.reservations.gateway().name()
            ),
        ));
    }
    let (user_id, service, method) = (
        auth.user.id,
        &app.reservations,
        input.payment_method.as_str(),
    );
    let response = idempotent::run(
        &app,
        &auth.user,
        &key,
        "POST",
        uri.path(),
        &body,
        |ticket| async move {
            let r = service
                .pay(user_id, reservation_id, method, Some(&ticket))
                .await?;
            Ok((StatusCode::OK, to_json(&r)?))
        },
    )
    .await;
    Ok(response)
}

#[tracing::instrument(skip_all, fields(user = auth.user.id))]
pub async fn cancel(
    State(app): State<AppState>,
    auth: Auth,
    RequiredIdempotencyKey(key): RequiredIdempotencyKey,
    OriginalUri(uri): OriginalUri,
    Path(raw): Path<String>,
    Body(body): Body,
) -> Result<Response, Problem> {
    let reservation_id = id(&raw)?;
    let input: CancelReservation = json(&body)?;
    if input
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 200)
    {
        return Err(Problem::invalid(
            "reason",
            "reason must be at most 200 characters",
        ));
    }
    let (user_id, service, reason) = (auth.user.id, &app.reservations, input.reason.as_deref());
    let response = idempotent::run(
        &app,
        &auth.user,
        &key,
        "POST",
        uri.path(),
        &body,
        |ticket| async move {
            let r = service
                .cancel(user_id, reservation_id, reason, Some(&ticket))
                .await?;
            Ok((StatusCode::OK, to_json(&r)?))
        },
    )
    .await;
    Ok(response)
}

#[tracing::instrument(skip_all, fields(user = auth.user.id))]
pub async fn events(
    State(app): State<AppState>,
    auth: Auth,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let items = app.reservations.events(auth.user.id, id(&raw)?).await?;
    Ok(Json(json!({ "items": items })).into_response())
}
