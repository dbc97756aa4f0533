//! `POST /v1/resources` (admin), `GET /v1/resources`, `GET /v1/resources/{id}`.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::http::extract::{encode_cursor, id, json, Auth, Body, Paging};
use crate::http::problem::Problem;
use crate::http::AppState;
use crate::reservations::NewResource;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateResource {
    name: String,
    capacity: i64,
    price_cents: i64,
    currency: String,
    hold_seconds: i64,
}

#[tracing::instrument(skip_all)]
pub async fn create(
    State(app): State<AppState>,
    auth: Auth,
    Body(body): Body,
) -> Result<Response, Problem> {
    auth.require_admin()?;
    let input: CreateResource = json(&body)?;
    let new = NewResource::parse(
        &input.name,
        input.capacity,
        input.price_cents,
        &input.currency,
        input.hold_seconds,
    )
    .map_err(Problem::field)?;
    let resource = app.reservations.create_resource(&new).await?;
    Ok((StatusCode::CREATED, Json(resource)).into_response())
}

#[tracing::instrument(skip_all)]
pub async fn show(
    State(app): State<AppState>,
    _auth: Auth,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let resource = app
        .reservations
        .resource(id(&raw)?)
        .await?
        .ok_or_else(Problem::not_found)?;
    Ok(Json(resource).into_response())
}

#[tracing::instrument(skip_all)]
pub async fn list(
    State(app): State<AppState>,
    _auth: Auth,
    query: Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    let paging = Paging::from_query(&query)?;
    let (items, next) = app
        .reservations
        .list_resources(paging.limit, paging.after)
        .await?;
    Ok(Json(json!({ "items": items, "next_cursor": next.map(encode_cursor) })).into_response())
}
