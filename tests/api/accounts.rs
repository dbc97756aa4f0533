//! Users and sessions (http-api.md, "Users and sessions" and the "Auth" convention): registering, logging
//! in and out, field validation, how bad or missing credentials are refused, and that passwords are stored
//! as argon2id hashes.

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

async fn register(app: &TestApp, body: Value) -> Resp {
    app.request(Method::POST, "/v1/users", None, None, Some(body))
        .await
}

async fn login(app: &TestApp, email: &str, password: &str) -> Resp {
    app.request(
        Method::POST,
        "/v1/sessions",
        None,
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

/// A request to a protected path with a raw `Authorization` header value (or none).
async fn with_authorization(app: &TestApp, value: Option<&str>) -> Resp {
    let mut req = app.client.get(format!("{}/v1/reservations", app.base));
    if let Some(v) = value {
        req = req.header("Authorization", v);
    }
    let res = req.send().await.expect("GET /v1/reservations");
    let status = res.status();
    let headers = res.headers().clone();
    let body =
        serde_json::from_slice(&res.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
    }
}

backend_tests! {
    async fn a_user_registers_logs_in_and_logs_out(backend) {
        let app = TestApp::spawn(backend).await;
        let r = app.request(Method::POST, "/v1/users", None, None, Some(json!({"email": "Ada@Example.com", "password": "long enough"}))).await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.body["email"], "ada@example.com");
        assert_eq!(r.body["role"], "user");
        let token = app.login("ada@example.com", "long enough").await;
        let me = app.get("/v1/reservations", &token).await;
        assert_eq!(me.status, StatusCode::OK);
        let out = app.request(Method::DELETE, "/v1/sessions/current", Some(&token), None, None).await;
        assert_eq!(out.status, StatusCode::NO_CONTENT);
        let after = app.get("/v1/reservations", &token).await;
        assert_eq!(after.status, StatusCode::UNAUTHORIZED);
        assert_eq!(after.code(), "unauthenticated");
    }

    async fn registering_returns_201_with_id_email_and_role_user_and_nothing_secret(backend) {
        let app = TestApp::spawn(backend).await;
        let r = register(&app, json!({"email": "grace@example.com", "password": "12345678"})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert!(r.id() > 0);
        assert_eq!(r.body["email"], "grace@example.com");
        assert_eq!(r.body["role"], "user");
        let mut keys: Vec<&str> = r.body.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["email", "id", "role"], "{}", r.body);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users WHERE email = 'grace@example.com'").await, 1);
    }

    async fn registering_an_email_twice_is_email_taken(backend) {
        let app = TestApp::spawn(backend).await;
        let first = register(&app, json!({"email": "ada@example.com", "password": "first password"})).await;
        assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
        let again = register(&app, json!({"email": "ada@example.com", "password": "other password"})).await;
        assert_problem(&again, StatusCode::CONFLICT, "email_taken");
        // Emails are compared case-insensitively.
        let shouting = register(&app, json!({"email": "ADA@EXAMPLE.COM", "password": "other password"})).await;
        assert_problem(&shouting, StatusCode::CONFLICT, "email_taken");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 1);
        // The first password still works; the refused registrations changed nothing.
        app.login("ada@example.com", "first password").await;
    }

    async fn a_password_shorter_than_8_characters_is_refused_naming_the_password_field(backend) {
        let app = TestApp::spawn(backend).await;
        let r = register(&app, json!({"email": "ada@example.com", "password": "1234567"})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "password", "{}", r.body);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 0);
        let eight = register(&app, json!({"email": "ada@example.com", "password": "12345678"})).await;
        assert_eq!(eight.status, StatusCode::CREATED, "8 characters are enough: {}", eight.body);
    }

    async fn a_malformed_email_is_refused_naming_the_email_field(backend) {
        let app = TestApp::spawn(backend).await;
        for bad in ["", "ada", "ada@", "@example.com", "ada@example", "a da@example.com"] {
            let r = register(&app, json!({"email": bad, "password": "long enough"})).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "email", "{bad:?}: {}", r.body);
        }
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 0);
    }

    async fn missing_fields_are_refused_naming_the_field(backend) {
        let app = TestApp::spawn(backend).await;
        let r = register(&app, json!({"email": "ada@example.com"})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "password", "{}", r.body);
        let r = register(&app, json!({"password": "long enough"})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "email", "{}", r.body);
    }

    async fn an_unknown_field_is_refused_naming_it(backend) {
        let app = TestApp::spawn(backend).await;
        let r = register(&app, json!({"email": "ada@example.com", "password": "long enough", "role": "admin"})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "role", "{}", r.body);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 0);

        app.user("ada@example.com").await;
        let r = app
            .request(Method::POST, "/v1/sessions", None, None, Some(json!({"email": "ada@example.com", "password": "correct horse", "remember_me": true})))
            .await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "remember_me", "{}", r.body);
    }

    async fn a_malformed_json_body_is_422_invalid_request(backend) {
        let app = TestApp::spawn(backend).await;
        let res = app
            .client
            .post(format!("{}/v1/users", app.base))
            .header("Content-Type", "application/json")
            .body("{\"email\": ")
            .send()
            .await
            .unwrap();
        let status = res.status();
        let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body: Value = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(content_type.starts_with("application/problem+json"), "{content_type}");
        assert_eq!(body["code"], "invalid_request", "{body}");
    }

    async fn logging_in_returns_201_with_token_expiry_and_user(backend) {
        let app = TestApp::spawn(backend).await;
        let created = register(&app, json!({"email": "ada@example.com", "password": "correct horse"})).await;
        let r = login(&app, "ada@example.com", "correct horse").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let token = r.body["token"].as_str().expect("token");
        assert!(!token.is_empty());
        let expires_at = r.body["expires_at"].as_str().expect("expires_at");
        let expires_at = chrono::DateTime::parse_from_rfc3339(expires_at).expect("expires_at is RFC 3339");
        assert!(expires_at > chrono::Utc::now(), "a new session expires in the future: {expires_at}");
        assert_eq!(r.body["user"], json!({"id": created.id(), "email": "ada@example.com", "role": "user"}));
        // The token works.
        assert_eq!(app.get("/v1/reservations", token).await.status, StatusCode::OK);
    }

    async fn logging_in_with_a_differently_cased_email_works(backend) {
        let app = TestApp::spawn(backend).await;
        app.user("ada@example.com").await;
        let r = login(&app, "Ada@Example.COM", "correct horse").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["user"]["email"], "ada@example.com");
    }

    async fn a_wrong_password_or_an_unknown_email_is_invalid_credentials_and_indistinguishable(backend) {
        let app = TestApp::spawn(backend).await;
        app.user("ada@example.com").await;
        let wrong = login(&app, "ada@example.com", "not the password").await;
        assert_problem(&wrong, StatusCode::UNAUTHORIZED, "invalid_credentials");
        assert!(wrong.body.get("token").is_none(), "{}", wrong.body);
        let unknown = login(&app, "nobody@example.com", "correct horse").await;
        assert_problem(&unknown, StatusCode::UNAUTHORIZED, "invalid_credentials");
        // Same answer for both: the API never reveals which emails are registered.
        assert_eq!(wrong.body, unknown.body);
    }

    async fn logging_out_answers_204_and_the_token_stops_working_at_once(backend) {
        let app = TestApp::spawn(backend).await;
        app.user("ada@example.com").await;
        let token = app.login("ada@example.com", "correct horse").await;
        let other = app.login("ada@example.com", "correct horse").await;
        let out = app.request(Method::DELETE, "/v1/sessions/current", Some(&token), None, None).await;
        assert_eq!(out.status, StatusCode::NO_CONTENT);
        let after = app.get("/v1/resources", &token).await;
        assert_problem(&after, StatusCode::UNAUTHORIZED, "unauthenticated");
        let again = app.request(Method::DELETE, "/v1/sessions/current", Some(&token), None, None).await;
        assert_problem(&again, StatusCode::UNAUTHORIZED, "unauthenticated");
        // Only that session ended: another login of the same user still works.
        assert_eq!(app.get("/v1/resources", &other).await.status, StatusCode::OK);
    }

    async fn logging_out_without_a_token_is_unauthenticated(backend) {
        let app = TestApp::spawn(backend).await;
        let r = app.request(Method::DELETE, "/v1/sessions/current", None, None, None).await;
        assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    }

    async fn missing_garbage_or_non_bearer_authorization_is_401_unauthenticated_problem_json(backend) {
        let app = TestApp::spawn(backend).await;
        app.user("ada@example.com").await;
        let cases = [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer not-a-real-token"),
            Some("garbage"),
            Some("Basic YWRhQGV4YW1wbGUuY29tOmNvcnJlY3QgaG9yc2U="), // ada@example.com:correct horse
        ];
        for value in cases {
            let r = with_authorization(&app, value).await;
            assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
        }
    }

    async fn every_v1_path_except_registering_and_logging_in_requires_a_token(backend) {
        let app = TestApp::spawn(backend).await;
        let paths = [
            (Method::GET, "/v1/resources"),
            (Method::POST, "/v1/resources"),
            (Method::GET, "/v1/resources/1"),
            (Method::GET, "/v1/reservations"),
            (Method::POST, "/v1/reservations"),
            (Method::GET, "/v1/reservations/1"),
            (Method::POST, "/v1/reservations/1/pay"),
            (Method::POST, "/v1/reservations/1/cancel"),
            (Method::GET, "/v1/reservations/1/events"),
            (Method::DELETE, "/v1/sessions/current"),
        ];
        for (method, path) in paths {
            let r = app.request(method.clone(), path, None, Some("k1"), Some(json!({}))).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {path}: {}", r.body);
            assert_eq!(r.code(), "unauthenticated", "{method} {path}");
        }
    }

    async fn passwords_are_stored_as_argon2id_hashes(backend) {
        let app = TestApp::spawn(backend).await;
        app.user("ada@example.com").await;
        app.admin().await;
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 2);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users WHERE password_hash LIKE '$argon2id$%'").await, 2);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users WHERE password_hash LIKE '%correct horse%'").await, 0);
    }
}

/// Two installations sharing one Redis (each with its own database): a token of one is worthless at
/// the other, even where the same user id exists in both.
#[tokio::test]
async fn a_token_of_another_installation_on_the_same_redis_is_refused() {
    let a = TestApp::spawn(crate::helpers::Backend::MySql).await;
    let b = TestApp::spawn(crate::helpers::Backend::MySql).await;
    let token_a = a.user("ada@example.com").await;
    let token_b = b.user("bob@example.com").await;
    assert_eq!(
        a.get("/v1/reservations", &token_a).await.status,
        StatusCode::OK
    );
    assert_eq!(
        b.get("/v1/reservations", &token_b).await.status,
        StatusCode::OK
    );
    let r = b.get("/v1/reservations", &token_a).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let r = a.get("/v1/reservations", &token_b).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
}
