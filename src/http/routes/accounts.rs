//! `POST /v1/users`, `POST /v1/sessions`, `DELETE /v1/sessions/current`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::accounts::Role;
use crate::http::extract::{json, Auth, Body};
use crate::http::problem::Problem;
use crate::http::AppState;
use crate::time::rfc3339;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    email: String,
    password: String,
}

#[tracing::instrument(skip_all)]
pub async fn create_user(
    State(app): State<AppState>,
    Body(body): Body,
) -> Result<Response, Problem> {
    let input: Credentials = json(&body)?;
    let user = app
        .accounts
        .create(&input.email, &input.password, Role::User)
        .await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

#[tracing::instrument(skip_all)]
pub async fn create_session(
    State(app): State<AppState>,
    Body(body): Body,
) -> Result<Response, Problem> {
    let input: Credentials = json(&body)?;
    let user = app.accounts.verify(&input.email, &input.password).await?;
    let session = app.sessions.create(&user).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": session.token, "expires_at": rfc3339(session.expires_at), "user": user })),
    )
        .into_response())
}

#[tracing::instrument(skip_all)]
pub async fn delete_session(
    State(app): State<AppState>,
    auth: Auth,
) -> Result<StatusCode, Problem> {
    app.sessions.revoke(&auth.token).await?;
    Ok(StatusCode::NO_CONTENT)
}
