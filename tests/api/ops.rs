//! Operations endpoints (http-api.md, "Operations" and "Conventions"): `/healthz`, `/readyz`, `/metrics`
//! in Prometheus text format, the OpenAPI 3 document at `/openapi.json`, and problem+json answers for
//! unknown paths and wrong methods.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{Resp, TestApp};

/// Asserts an RFC 9457 problem response with the given status and `code`.
fn assert_problem(r: &Resp, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.code(), code, "{}", r.body);
    let content_type = r.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("application/problem+json"),
        "content-type {content_type:?}"
    );
    assert_eq!(r.body["status"], status.as_u16(), "{}", r.body);
    for member in ["type", "title", "detail"] {
        assert!(
            r.body[member].is_string(),
            "problem without {member}: {}",
            r.body
        );
    }
}

/// `GET /metrics`: the content type and the text.
async fn metrics(app: &TestApp) -> (String, String) {
    let res = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(res.status(), StatusCode::OK);
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (content_type, res.text().await.expect("metrics text"))
}

/// The samples (non-comment lines) of metric `name`: `name{labels} value` or `name value`.
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

/// The value of the one sample of `name` whose line contains every label in `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

backend_tests! {
    async fn healthz_answers_200_while_the_process_serves(backend) {
        let app = TestApp::spawn(backend).await;
        let r = app.request(Method::GET, "/healthz", None, None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    async fn readyz_answers_200_ready_when_the_database_and_session_store_answer(backend) {
        let app = TestApp::spawn(backend).await;
        let r = app.request(Method::GET, "/readyz", None, None, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["status"], "ready", "{}", r.body);
    }

    async fn metrics_is_prometheus_text_with_request_counts_by_route(backend) {
        let app = TestApp::spawn(backend).await;
        let user = app.user("ada@example.com").await;
        for _ in 0..3 {
            assert_eq!(app.get("/v1/resources", &user).await.status, StatusCode::OK);
        }
        assert_eq!(app.get("/v1/resources/12345", &user).await.status, StatusCode::NOT_FOUND);
        let (content_type, text) = metrics(&app).await;
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert!(text.contains("# TYPE cozy_http_requests_total counter"), "{text}");
        assert_eq!(value(&text, "cozy_http_requests_total", &[r#"route="/v1/resources""#, r#"method="GET""#, r#"status="200""#]), Some(3.0), "{text}");
        // Labelled by the route template, not the raw path (ids would explode the label set).
        assert_eq!(value(&text, "cozy_http_requests_total", &[r#"route="/v1/resources/{id}""#, r#"status="404""#]), Some(1.0), "{text}");
        assert!(!text.contains("/v1/resources/12345"), "{text}");
        assert!(
            samples(&text, "cozy_http_request_duration_seconds_bucket").iter().any(|l| l.contains(r#"route="/v1/resources""#)),
            "latency histogram by route: {text}"
        );
    }

    async fn metrics_count_reservation_transitions(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let user = app.user("ada@example.com").await;
        let id = app.reserve(&user, resource, 1).await;
        app.reserve(&user, resource, 1).await;
        assert_eq!(app.pay(&user, id, "sandbox_ok", "pay-1").await.status, StatusCode::OK);
        let (_, text) = metrics(&app).await;
        assert_eq!(value(&text, "cozy_reservation_transitions_total", &[r#"to="RESERVED""#]), Some(2.0), "{text}");
        assert_eq!(value(&text, "cozy_reservation_transitions_total", &[r#"from="RESERVED""#, r#"to="PAID""#]), Some(1.0), "{text}");
    }

    async fn metrics_count_idempotent_replays(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let user = app.user("ada@example.com").await;
        let (_, before) = metrics(&app).await;
        assert_eq!(value(&before, "cozy_idempotent_replays_total", &[]), Some(0.0), "{before}");
        let body = json!({"resource_id": resource, "quantity": 1});
        let first = app.post("/v1/reservations", &user, "order-1", body.clone()).await;
        let again = app.post("/v1/reservations", &user, "order-1", body).await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        let (_, after) = metrics(&app).await;
        assert_eq!(value(&after, "cozy_idempotent_replays_total", &[]), Some(1.0), "{after}");
    }

    async fn metrics_expose_websocket_connections_and_no_cluster_series_without_a_master(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, text) = metrics(&app).await;
        assert_eq!(value(&text, "cozy_websocket_connections", &[]), Some(0.0), "{text}");
        assert!(text.contains("# TYPE cozy_websocket_connections gauge"), "{text}");
        // Restarts are the master's series (tests/api/cluster.rs); a lone process has no supervisor.
        assert!(!text.contains("cozy_worker_restarts_total"), "{text}");
        assert!(!text.contains("worker=\""), "{text}");
    }

    async fn openapi_json_is_an_openapi_3_document_of_the_whole_api(backend) {
        let app = TestApp::spawn(backend).await;
        let res = app.client.get(format!("{}/openapi.json", app.base)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let doc: Value = serde_json::from_slice(&res.bytes().await.unwrap()).expect("openapi.json parses as JSON");
        assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."), "openapi: {}", doc["openapi"]);
        assert!(doc["info"]["title"].is_string());
        let paths = doc["paths"].as_object().expect("paths");
        let expected = [
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
        for (method, path) in expected {
            assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} is not documented");
        }
    }

    async fn an_unknown_path_is_404_problem_json(backend) {
        let app = TestApp::spawn(backend).await;
        let user = app.user("ada@example.com").await;
        for path in ["/nope", "/v1/nope", "/v2/reservations"] {
            let r = app.request(Method::GET, path, Some(&user), None, None).await;
            assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        }
        let r = app.request(Method::GET, "/v1/unknown", None, None, None).await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
    }

    async fn a_wrong_method_is_405_method_not_allowed_problem_json(backend) {
        let app = TestApp::spawn(backend).await;
        let user = app.user("ada@example.com").await;
        let cases = [
            (Method::DELETE, "/healthz"),
            (Method::POST, "/metrics"),
            (Method::PUT, "/v1/resources"),
            (Method::DELETE, "/v1/reservations/1"),
            (Method::GET, "/v1/reservations/1/pay"),
            (Method::GET, "/v1/sessions/current"),
        ];
        for (method, path) in cases {
            let r = app.request(method.clone(), path, Some(&user), None, None).await;
            assert_problem(&r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        }
    }
}
