//! What the daemon promises the reverse proxy in front of it: `X-Request-Id` on every response and in
//! the JSON access log, the client address taken from `X-Forwarded-For` only when the peer is a trusted
//! proxy, and cozy's own per-process limit on `POST /v1/sessions` and `POST /v1/users`.
//!
//! These behaviours do not depend on the database, so they run on the embedded SQLite only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{random_suffix, Backend, Resp, TestApp};

/// A login limit small enough to hit: one a second on average, three at once.
const TIGHT: [(&str, &str); 2] = [
    ("COZY_AUTH_RATE_PER_MINUTE", "60"),
    ("COZY_AUTH_BURST", "3"),
];

/// A request with extra headers (the helpers' `request` sends none of its own choosing).
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Resp {
    let mut req = app.client.request(method, format!("{}{path}", app.base));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap_or_default();
    Resp {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// `POST /v1/sessions` for `email` with these extra headers.
async fn login(app: &TestApp, email: &str, headers: &[(&str, &str)]) -> Resp {
    let body = json!({"email": email, "password": "correct horse"});
    send(app, Method::POST, "/v1/sessions", headers, Some(body)).await
}

/// Signs `email` up, asserting success.
async fn sign_up(app: &TestApp, email: &str) {
    let body = json!({"email": email, "password": "correct horse"});
    let r = send(app, Method::POST, "/v1/users", &[], Some(body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

fn request_id(r: &Resp) -> &str {
    r.header("x-request-id")
        .unwrap_or_else(|| panic!("no X-Request-Id on a {} response", r.status))
}

fn is_generated_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The server's log lines that are JSON objects.
fn log_lines(app: &TestApp) -> Vec<Value> {
    app.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

/// The access log line of request `id`; waits a little, as the log is a file written by another process.
async fn access_line(app: &TestApp, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = log_lines(app)
            .into_iter()
            .filter(|l| l["request_id"] == id && l["message"] == "request")
            .collect();
        match found.len() {
            0 if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            1 => return found.into_iter().next().unwrap(),
            n => panic!("{n} access log lines for request {id}:\n{}", app.logs()),
        }
    }
}

fn assert_rate_limited(r: &Resp) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.code(), "rate_limited", "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/problem+json"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.body["status"], 429);
    let detail = r.body["detail"].as_str().unwrap_or("");
    assert!(detail.contains("retry in"), "{detail}");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in seconds: {:?}", r.headers));
    // One attempt a second: never more than a second to wait.
    assert_eq!(retry_after, 1, "{:?}", r.headers);
    assert!(detail.contains("1 second"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_valid_incoming_request_id_is_returned_unchanged_and_names_the_requests_access_log_line()
{
    let app = TestApp::spawn(Backend::Sqlite).await;
    let r = send(&app, Method::GET, "/healthz", &[], None).await;
    assert!(is_generated_id(request_id(&r)), "{:?}", r.headers);

    let id = format!("nginx-{}.test:1_A", random_suffix());
    let body = json!({"email": "ada@example.com", "password": "correct horse"});
    let r = send(
        &app,
        Method::POST,
        "/v1/users",
        &[("X-Request-Id", &id)],
        Some(body),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(request_id(&r), id);
    let line = access_line(&app, &id).await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["target"], "cozy::http::access", "{line}");
    assert_eq!(line["method"], "POST", "{line}");
    assert_eq!(line["path"], "/v1/users", "{line}");
    assert_eq!(line["route"], "/v1/users", "{line}");
    assert_eq!(line["status"], 201, "{line}");
    assert!(
        line["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    let peer: SocketAddr = line["peer"]
        .as_str()
        .unwrap_or("")
        .parse()
        .expect("peer is ip:port");
    assert_eq!(peer.ip().to_string(), "127.0.0.1", "{line}");

    // The path is logged without its query, and the route is the template.
    let token = app.login("ada@example.com", "correct horse").await;
    let id = format!("q-{}", random_suffix());
    let auth = format!("Bearer {token}");
    let r = send(
        &app,
        Method::GET,
        "/v1/resources/77?secret=hunter2",
        &[("X-Request-Id", &id), ("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let line = access_line(&app, &id).await;
    assert_eq!(line["path"], "/v1/resources/77", "{line}");
    assert_eq!(line["route"], "/v1/resources/{id}", "{line}");
    assert_eq!(line["status"], 404, "{line}");
    assert!(!app.logs().contains("hunter2"), "the query reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_incoming_request_id_is_replaced_by_a_generated_one_and_never_echoed() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let long = "a".repeat(200);
    for bad in ["has space", "semi;colon", "slash/ed", long.as_str()] {
        let r = send(
            &app,
            Method::GET,
            "/healthz",
            &[("X-Request-Id", bad)],
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let id = request_id(&r);
        assert!(is_generated_id(id), "{bad:?} answered with {id:?}");
    }
    let logs = app.logs();
    assert!(
        !logs.contains("has space") && !logs.contains(&long),
        "an invalid id reached the log"
    );
    // 128 characters is the longest kept.
    let longest = "b".repeat(128);
    let r = send(
        &app,
        Method::GET,
        "/healthz",
        &[("X-Request-Id", &longest)],
        None,
    )
    .await;
    assert_eq!(request_id(&r), longest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_responses_carry_the_request_id_and_are_logged_with_their_status() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let too_big = json!({"email": "x".repeat(70 * 1024), "password": "correct horse"});
    let cases = [
        (Method::GET, "/nope", None, StatusCode::NOT_FOUND),
        (
            Method::POST,
            "/v1/users",
            Some(json!({"email": "a@example.com", "password": "correct horse", "colour": 1})),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            Method::POST,
            "/v1/users",
            Some(too_big),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::PUT,
            "/v1/resources",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/v1/resources", None, StatusCode::UNAUTHORIZED),
    ];
    for (method, path, body, status) in cases {
        let id = format!("err-{}", random_suffix());
        let r = send(&app, method.clone(), path, &[("X-Request-Id", &id)], body).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(
            r.header("x-request-id"),
            Some(id.as_str()),
            "{method} {path}"
        );
        let line = access_line(&app, &id).await;
        assert_eq!(line["status"], status.as_u16(), "{line}");
        assert_eq!(line["method"], method.as_str(), "{line}");
        assert_eq!(line["path"], path, "{line}");
    }
    let id = format!("err-{}", random_suffix());
    send(&app, Method::GET, "/nope", &[("X-Request-Id", &id)], None).await;
    assert_eq!(access_line(&app, &id).await["route"], "unmatched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_cut_off_by_the_timeout_answers_503_with_its_request_id_and_is_logged() {
    // The sandbox gateway takes 3 s per charge; requests may take 1 s.
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("COZY_REQUEST_TIMEOUT_SECS", "1"),
            ("COZY_GATEWAY_DELAY_MS", "3000"),
        ],
    )
    .await;
    let admin = app.admin().await;
    let resource = app.resource(&admin, 5, 600).await;
    let user = app.user("ada@example.com").await;
    let reservation = app.reserve(&user, resource, 1).await;
    let id = format!("slow-{}", random_suffix());
    let auth = format!("Bearer {user}");
    let r = send(
        &app,
        Method::POST,
        &format!("/v1/reservations/{reservation}/pay"),
        &[
            ("X-Request-Id", &id),
            ("Authorization", &auth),
            ("Idempotency-Key", "pay-1"),
        ],
        Some(json!({"payment_method": "sandbox_ok"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    let line = access_line(&app, &id).await;
    assert_eq!(line["status"], 503, "{line}");
    assert_eq!(line["route"], "/v1/reservations/{id}/pay", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_are_logged_at_debug_only() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[("COZY_LOG", "debug,sqlx=warn,hyper=warn")],
    )
    .await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let id = format!("probe-{}", random_suffix());
        let r = send(&app, Method::GET, path, &[("X-Request-Id", &id)], None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(access_line(&app, &id).await["level"], "DEBUG", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_is_logged_once_at_its_101_with_the_request_id() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn(Backend::Sqlite).await;
    let id = format!("ws-{}", random_suffix());
    let url = format!("{}/v1/realtime", app.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("X-Request-Id", id.parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket handshake");
    assert_eq!(response.status().as_u16(), 101);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(id.as_str())
    );
    let line = access_line(&app, &id).await;
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["route"], "/v1/realtime", "{line}");
    // Closing the socket logs no second line for the request.
    let _ = ws.close(None).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(300)).await;
    access_line(&app, &id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fourth_quick_login_from_one_client_is_429_rate_limited_with_retry_after() {
    let app = TestApp::spawn_with(Backend::Sqlite, &TIGHT).await;
    sign_up(&app, "ada@example.com").await;
    let mut token = String::new();
    for attempt in 1..=3 {
        let r = login(&app, "ada@example.com", &[]).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "attempt {attempt}: {}",
            r.body
        );
        token = r.body["token"].as_str().unwrap().to_string();
    }
    let id = format!("limited-{}", random_suffix());
    let limited = login(&app, "ada@example.com", &[("X-Request-Id", &id)]).await;
    assert_rate_limited(&limited);
    assert_eq!(access_line(&app, &id).await["status"], 429);
    // A wrong password is limited the same way: the limit is on attempts, not on successes.
    let body = json!({"email": "ada@example.com", "password": "wrong password"});
    let r = send(&app, Method::POST, "/v1/sessions", &[], Some(body)).await;
    assert_rate_limited(&r);

    // Other routes are not limited, and sign-ups have a bucket of their own.
    let auth = format!("Bearer {token}");
    for _ in 0..10 {
        let r = send(&app, Method::GET, "/healthz", &[], None).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = send(
            &app,
            Method::GET,
            "/v1/resources",
            &[("Authorization", &auth)],
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    sign_up(&app, "bob@example.com").await;

    // Retry-After is honest: after waiting it, the next attempt goes through.
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let r = login(&app, "ada@example.com", &[]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sign_ups_beyond_the_burst_are_429_rate_limited() {
    let app = TestApp::spawn_with(Backend::Sqlite, &TIGHT).await;
    for i in 0..3 {
        sign_up(&app, &format!("user{i}@example.com")).await;
    }
    let body = json!({"email": "user3@example.com", "password": "correct horse"});
    let r = send(&app, Method::POST, "/v1/users", &[], Some(body)).await;
    assert_rate_limited(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spoofed_x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = TestApp::spawn_with(Backend::Sqlite, &TIGHT).await;
    sign_up(&app, "ada@example.com").await;
    let mut ids = Vec::new();
    for attempt in 1..=4 {
        // A different made-up client address on every attempt: it must not buy a fresh bucket.
        let forged = format!("198.51.100.{attempt}, 203.0.113.{attempt}");
        let id = format!("spoof-{}", random_suffix());
        let r = login(
            &app,
            "ada@example.com",
            &[("X-Forwarded-For", &forged), ("X-Request-Id", &id)],
        )
        .await;
        if attempt <= 3 {
            assert_eq!(
                r.status,
                StatusCode::CREATED,
                "attempt {attempt}: {}",
                r.body
            );
        } else {
            assert_rate_limited(&r);
        }
        ids.push(id);
    }
    for id in ids {
        let line = access_line(&app, &id).await;
        assert_eq!(line["client"], "127.0.0.1", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn behind_a_trusted_proxy_each_forwarded_client_gets_its_own_burst() {
    let mut env = TIGHT.to_vec();
    // The test client plays the proxy.
    env.push(("COZY_TRUSTED_PROXIES", "127.0.0.1"));
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    sign_up(&app, "ada@example.com").await;
    let (a, b) = ("198.51.100.7", "203.0.113.9");
    for attempt in 1..=3 {
        let r = login(&app, "ada@example.com", &[("X-Forwarded-For", a)]).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "A, attempt {attempt}: {}",
            r.body
        );
    }
    let r = login(&app, "ada@example.com", &[("X-Forwarded-For", a)]).await;
    assert_rate_limited(&r);
    // What the client wrote itself (left of what the proxy appended) does not make it someone else.
    let forged = format!("10.9.8.7, {a}");
    let r = login(&app, "ada@example.com", &[("X-Forwarded-For", &forged)]).await;
    assert_rate_limited(&r);

    let id = format!("b-{}", random_suffix());
    let r = login(
        &app,
        "ada@example.com",
        &[("X-Forwarded-For", b), ("X-Request-Id", &id)],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "B's first attempt: {}",
        r.body
    );
    let line = access_line(&app, &id).await;
    assert_eq!(line["client"], b, "{line}");
    let peer: SocketAddr = line["peer"]
        .as_str()
        .unwrap_or("")
        .parse()
        .expect("peer is ip:port");
    assert_eq!(peer.ip().to_string(), "127.0.0.1", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_trusted_proxies_value_stops_cozy_serve_naming_the_variable_and_the_entry() {
    let app = TestApp::prepare(
        Backend::Sqlite,
        &[("COZY_TRUSTED_PROXIES", "127.0.0.1,10.0.0.0/33")],
    )
    .await;
    let mut child = app
        .cli_command(&["serve", "--listen", "127.0.0.1:0"], &[])
        .spawn()
        .expect("spawn cozy serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cozy serve kept running with a bad COZY_TRUSTED_PROXIES");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("COZY_TRUSTED_PROXIES"), "{stderr}");
    assert!(stderr.contains("10.0.0.0/33"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "it said it listens"
    );
}
