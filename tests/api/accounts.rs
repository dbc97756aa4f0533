//! Users and sessions (http-api.md, "Users and sessions").

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::backend_tests;
use crate::helpers::TestApp;

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
}
