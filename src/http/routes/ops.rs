//! Operations endpoints: `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::http::problem::Problem;
use crate::http::AppState;

/// The OpenAPI 3 document of this API (kept in step with the router by a test).
pub const OPENAPI: &str = include_str!("../openapi.json");

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls are no-ops).
pub fn install_metrics() {
    if PROMETHEUS.get().is_some() {
        return;
    }
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("cozy_http_request_duration_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .expect("static bucket list is not empty");
    if let Ok(handle) = builder.install_recorder() {
        let _ = PROMETHEUS.set(handle);
    }
    metrics::describe_counter!(
        "cozy_http_requests_total",
        "HTTP requests by route, method and status"
    );
    metrics::describe_histogram!(
        "cozy_http_request_duration_seconds",
        "HTTP request latency by route"
    );
    metrics::describe_counter!(
        "cozy_reservation_transitions_total",
        "Reservation state transitions"
    );
    metrics::describe_counter!(
        "cozy_idempotent_replays_total",
        "Responses replayed for a repeated Idempotency-Key"
    );
    metrics::describe_gauge!(
        "cozy_websocket_connections",
        "Open realtime WebSocket connections"
    );
    metrics::describe_counter!(
        "cozy_websocket_frames_sent_total",
        "Realtime frames written to WebSocket connections"
    );
    metrics::describe_counter!(
        "cozy_websocket_writes_total",
        "Socket writes (flushes) of realtime frames; frames ÷ writes is how well they coalesce"
    );
    metrics::counter!("cozy_idempotent_replays_total").absolute(0);
    metrics::gauge!("cozy_websocket_connections").set(0.0);
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    let database = app.db.ping().await.map_err(|e| e.to_string());
    let sessions = app.sessions.ping().await.map_err(|e| e.to_string());
    match (&database, &sessions) {
        (Ok(()), Ok(())) => {
            Json(json!({ "status": "ready", "database": "ok", "sessions": "ok" })).into_response()
        }
        _ => {
            let mut failed = Vec::new();
            if let Err(e) = &database {
                failed.push(format!("database: {e}"));
            }
            if let Err(e) = &sessions {
                failed.push(format!("{}: {e}", app.sessions.kind()));
            }
            Problem::unavailable(format!("not ready: {}", failed.join("; ")))
                .with("database", if database.is_ok() { "ok" } else { "failed" })
                .with("sessions", if sessions.is_ok() { "ok" } else { "failed" })
                .into_response()
        }
    }
}

/// This process's own exposition.
pub fn render_local() -> String {
    PROMETHEUS
        .get()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// In a cluster the master assembles every worker's series (labelled `worker`) into one scrape; a master
/// that does not answer within 2 s leaves this worker's own series.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let cluster = match &app.cluster {
        Some(link) => link.cluster_metrics(Duration::from_secs(2)).await,
        None => None,
    };
    let body = cluster.unwrap_or_else(render_local);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

pub async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes_of_the_router() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                    documented.push((method.clone(), path.clone()));
                }
            }
        }
        let mut routed: Vec<_> = crate::http::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
    }

    #[test]
    fn the_openapi_document_has_the_login_limit_and_the_request_id() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let limited = &doc["components"]["responses"]["RateLimited"];
        assert!(limited["headers"]["Retry-After"].is_object(), "{limited}");
        assert_eq!(
            limited["content"]["application/problem+json"]["example"]["code"],
            "rate_limited"
        );
        for path in ["/v1/users", "/v1/sessions"] {
            assert_eq!(
                doc["paths"][path]["post"]["responses"]["429"]["$ref"],
                "#/components/responses/RateLimited",
                "{path}"
            );
        }
        let codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .unwrap();
        assert!(codes.iter().any(|c| c == "rate_limited"));
        assert_eq!(
            doc["components"]["parameters"]["RequestId"]["name"],
            "X-Request-Id"
        );
        for (path, item) in doc["paths"].as_object().unwrap() {
            assert_eq!(
                item["parameters"][0]["$ref"], "#/components/parameters/RequestId",
                "{path}"
            );
        }
    }
}
