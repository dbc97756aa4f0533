//! The HTTP API (http-api.md) on axum: router, server loop, middleware.
//!
//! - [`request_id`]: `X-Request-Id`, kept from the proxy or generated, on every response.
//! - [`forwarded`]: the client address behind trusted proxies (`X-Forwarded-For`, read from the right).
//! - [`access_log`]: one JSON event per request, found by its request id.
//! - [`rate_limit`]: cozy's own per-process limit on `POST /v1/sessions` and `POST /v1/users`.
//! - [`problem`]: every error as RFC 9457 problem+json with a stable `code`.
//! - [`extract`]: auth, bodies, ids and headers, rejecting bad input with the field at fault.
//! - [`idempotent`]: the `Idempotency-Key` wrapper around effectful handlers.
//! - [`routes`]: one file per area of the API.
//! - [`server`]: the accept loop and its graceful drain (keep-alive clients are handed over, not dropped).
//! - [`telemetry`]: per-route request counts and latency histograms for `/metrics`.

pub mod access_log;
pub mod extract;
pub mod forwarded;
pub mod idempotent;
pub mod problem;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use crate::app::App;
use problem::Problem;

pub type AppState = Arc<App>;

/// Request bodies above this many bytes are refused with 413.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Every route of the API, as (method, path). The OpenAPI document is tested against this list.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/users"),
    ("post", "/v1/sessions"),
    ("delete", "/v1/sessions/current"),
    ("post", "/v1/resources"),
    ("get", "/v1/resources"),
    ("get", "/v1/resources/{id}"),
    ("post", "/v1/reservations"),
    ("get", "/v1/reservations"),
    ("get", "/v1/reservations/{id}"),
    ("post", "/v1/reservations/{id}/pay"),
    ("post", "/v1/reservations/{id}/cancel"),
    ("get", "/v1/reservations/{id}/events"),
    ("get", "/v1/realtime"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// Builds the router with its middleware. From the outside in: the request id, the client address,
/// the access log, then panic and timeout answers (so the log and the id see those too), metrics, the
/// body limit; the credential routes have the login rate limit on top of their handlers.
pub fn router(app: AppState) -> Router {
    use routes::{accounts, ops, reservations, resources};
    let timeout = app.settings.request_timeout;
    // Sign-ups and logins each have their own table of buckets, per router, i.e. per process (see
    // rate_limit on why that is enough): signing up and then logging in costs one attempt of each.
    let limited = || {
        let limiter = Arc::new(rate_limit::AuthLimiter::new(
            app.settings.auth_rate_per_minute,
            app.settings.auth_burst,
        ));
        axum::middleware::from_fn_with_state(limiter, rate_limit::limit)
    };
    Router::new()
        .route(
            "/v1/users",
            post(accounts::create_user).route_layer(limited()),
        )
        .route(
            "/v1/sessions",
            post(accounts::create_session).route_layer(limited()),
        )
        .route("/v1/sessions/current", delete(accounts::delete_session))
        .route(
            "/v1/resources",
            post(resources::create).get(resources::list),
        )
        .route("/v1/resources/{id}", get(resources::show))
        .route(
            "/v1/reservations",
            post(reservations::create).get(reservations::list),
        )
        .route("/v1/reservations/{id}", get(reservations::show))
        .route("/v1/reservations/{id}/pay", post(reservations::pay))
        .route("/v1/reservations/{id}/cancel", post(reservations::cancel))
        .route("/v1/reservations/{id}/events", get(reservations::events))
        .route("/v1/realtime", get(crate::realtime::ws::handler))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .fallback(|| async { Problem::not_found() })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            kick_outbox,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(telemetry::track))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                axum::response::IntoResponse::into_response(Problem::internal("handler panicked"))
            },
        ))
        .layer(axum::middleware::from_fn(access_log::record))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            forwarded::resolve,
        ))
        .layer(axum::middleware::from_fn(request_id::assign))
        .with_state(app)
}

/// After a reservation call (which may have committed transitions, expiries included), tell the realtime
/// hub to publish the outbox now instead of at its next poll.
async fn kick_outbox(
    axum::extract::State(app): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let touches = req.uri().path().starts_with("/v1/reservations");
    let response = next.run(req).await;
    if touches {
        if let Some(rt) = &app.realtime {
            rt.kick_outbox();
        }
    }
    response
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains with the default
/// [`server::DrainPolicy`]: in-flight requests finish, keep-alive clients are told to close.
pub async fn serve(
    listener: TcpListener,
    app: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(
        listener,
        router(app),
        shutdown,
        server::DrainPolicy::default(),
        server::ServerStats::new(),
    )
    .await
}
