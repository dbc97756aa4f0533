//! The access log: one event per request, target `cozy::http::access`, message `request`, with
//! `request_id`, `method`, `path` (never the query, which may carry cursors or secrets), `route` (the
//! matched template, `unmatched` for the 404 fallback), `status`, `duration_ms`, `client` (the address
//! behind trusted proxies, [`super::forwarded`]) and `peer` (the TCP peer, with its port).
//!
//! Probes (`/healthz`, `/readyz`, `/metrics`) come every few seconds from load balancers and Prometheus
//! and would drown the rest, so they are logged at DEBUG; everything else at INFO. A WebSocket is logged
//! once, when its 101 goes out: what happens on the socket afterwards is the realtime hub's to log.
//!
//! The handler runs inside a `request` span carrying the id, so its own events (an internal error, say)
//! can be traced back to the request too. In JSON (src/telemetry.rs) the event's fields are top-level
//! keys, which is what lets `jq 'select(.request_id == "…")'` find a request.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::forwarded::ClientAddr;
use super::request_id::RequestId;

/// The tracing target of access log events (`COZY_LOG=cozy::http::access=warn` silences them).
pub const TARGET: &str = "cozy::http::access";

/// Routes logged at DEBUG only.
const PROBES: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// Middleware: runs the request in its span and logs it when the response is ready. Sits inside
/// [`super::request_id::assign`] and [`super::forwarded::resolve`], whose extensions it reads, and
/// outside the panic and timeout layers, so it logs the status the client really gets.
pub async fn record(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(RequestId::generate);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let addr = req.extensions().get::<ClientAddr>().copied();
    let (client, peer) = match addr {
        Some(a) => (a.ip.to_string(), a.peer.to_string()),
        None => (String::new(), String::new()),
    };
    let span = tracing::info_span!("request", request_id = %id);
    let response = next.run(req).instrument(span).await;
    let duration_ms = started.elapsed().as_micros() as f64 / 1000.0;
    let status = response.status().as_u16();
    macro_rules! access {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                request_id = %id,
                method = %method,
                path = %path,
                route = %route,
                status,
                duration_ms,
                client = %client,
                peer = %peer,
                "request"
            )
        };
    }
    if PROBES.contains(&route.as_str()) {
        access!(tracing::Level::DEBUG);
    } else {
        access!(tracing::Level::INFO);
    }
    response
}
