//! nginx's own rate limits: a burst of sign-ins from one address is cut off with a 429 problem+json
//! like cozy's errors (code, Retry-After, the security headers) before it reaches cozy, while the same
//! client's normal API traffic is untouched.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::estate::{assert_security_headers, Estate, Headers};
use crate::helpers::{send_request, Resp};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_logins_gets_429_problem_json_from_nginx_while_api_traffic_passes() {
    let mut est = Estate::builder()
        .nginx("rate_limits: {login: 6r/m, login_burst: 2}")
        .start()
        .await;
    // Set up on app1 directly: through nginx, these sign-ins would count against the limit under test.
    est.app.base = est.daemons[0].base();
    let admin = est.app.admin().await;
    let resource = est.app.resource(&admin, 5, 600).await;
    let ada = est.app.user("ada@example.com").await;
    est.app.base = est.base();

    let login = |n: usize| {
        let (client, base) = (est.app.client.clone(), est.app.base.clone());
        tokio::spawn(async move {
            let r = send_request(
                &client,
                &base,
                Method::POST,
                "/v1/sessions",
                None,
                None,
                Some(json!({"email": "ada@example.com", "password": "correct horse"})),
            )
            .await;
            (n, r.unwrap_or_else(|e| panic!("login {n}: {e}")))
        })
    };
    let api = {
        let (client, base, token) = (est.app.client.clone(), est.app.base.clone(), ada.clone());
        let path = format!("/v1/resources/{resource}");
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..30 {
                let r = send_request(&client, &base, Method::GET, &path, Some(&token), None, None)
                    .await
                    .unwrap_or_else(|e| panic!("GET {path}: {e}"));
                answers.push(r);
            }
            answers
        })
    };
    let logins: Vec<_> = (0..10).map(login).collect();
    let mut answers: Vec<(usize, Resp)> = Vec::new();
    for l in logins {
        answers.push(l.await.unwrap());
    }
    let gets = api.await.unwrap();

    let (limited, passed): (Vec<_>, Vec<_>) = answers
        .iter()
        .partition(|(_, r)| r.status == StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        passed.len(),
        3,
        "one sign-in and a burst of 2 pass: {passed:#?}"
    );
    for (n, r) in &passed {
        assert_eq!(r.status, StatusCode::CREATED, "login {n}: {}", r.body);
    }
    assert_eq!(limited.len(), 7);
    for (n, r) in &limited {
        let what = format!("the 429 of login {n}");
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{what}"
        );
        assert_eq!(r.body["status"], 429, "{what}: {}", r.body);
        assert_eq!(r.code(), "rate_limited", "{what}: {}", r.body);
        assert!(
            r.body["title"].is_string() && r.body["detail"].is_string(),
            "{what}: {}",
            r.body
        );
        // 6 a minute: the next sign-in is allowed 10 s later.
        assert_eq!(r.header("retry-after"), Some("10"), "{what}");
        let h = Headers::from_reqwest(&r.headers);
        assert_security_headers(&h, false, &what);
        assert_eq!(
            r.body["request_id"].as_str(),
            r.header("x-request-id"),
            "{what}: the body names the request's id"
        );
    }
    for (i, r) in gets.iter().enumerate() {
        assert_eq!(
            r.status,
            StatusCode::OK,
            "GET #{i} during the burst: {}",
            r.body
        );
    }

    // The sign-ins let through reached one host each; the refused ones never reached cozy.
    for (n, r) in &passed {
        let id = r.header("x-request-id").unwrap();
        let lines = est.cozy_lines(id);
        assert_eq!(lines.len(), 1, "login {n} reached cozy once: {lines:?}");
        assert_eq!(lines[0].1["status"], 201, "{lines:?}");
    }
    let seen: Vec<String> = est
        .daemons
        .iter()
        .flat_map(|d| d.requests())
        .filter_map(|l| l["request_id"].as_str().map(str::to_string))
        .collect();
    for (n, r) in &limited {
        let id = r.header("x-request-id").unwrap();
        assert!(!seen.iter().any(|s| s == id), "login {n} reached cozy");
    }
}
