//! Resources (http-api.md, "Resources"): admins create them, everyone signed in reads and lists them;
//! validation names the field or query parameter at fault; bodies over 64 KiB are refused; lists page
//! with `limit` and an opaque `cursor`.

use std::collections::HashSet;

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
}

fn valid() -> Value {
    json!({"name": "Jazz night", "capacity": 100, "price_cents": 2500, "currency": "EUR", "hold_seconds": 600})
}

/// `valid()` with one member replaced (or removed when `value` is None).
fn with(member: &str, value: Option<Value>) -> Value {
    let mut body = valid();
    let map = body.as_object_mut().unwrap();
    match value {
        Some(v) => {
            map.insert(member.to_string(), v);
        }
        None => {
            map.remove(member);
        }
    }
    body
}

async fn create(app: &TestApp, token: &str, body: Value) -> Resp {
    app.request(Method::POST, "/v1/resources", Some(token), None, Some(body))
        .await
}

/// Walks `/v1/resources?limit=N` page by page; returns every page's ids and the final body.
async fn walk(app: &TestApp, token: &str, limit: usize) -> Vec<Vec<i64>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => format!("/v1/resources?limit={limit}"),
            Some(c) => format!("/v1/resources?limit={limit}&cursor={c}"),
        };
        let r = app.get(&path, token).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert!(
            r.body.as_object().unwrap().contains_key("next_cursor"),
            "{}",
            r.body
        );
        let ids: Vec<i64> = r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_i64().unwrap())
            .collect();
        assert!(ids.len() <= limit, "{path} returned {} items", ids.len());
        pages.push(ids);
        match &r.body["next_cursor"] {
            Value::Null => return pages,
            Value::String(c) => cursor = Some(c.clone()),
            other => panic!("next_cursor is neither null nor a string: {other}"),
        }
        assert!(pages.len() <= 100, "pagination does not end");
    }
}

backend_tests! {
    async fn an_admin_creates_a_resource_with_everything_available(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let r = create(&app, &admin, valid()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        let id = r.id();
        assert_eq!(
            r.body,
            json!({"id": id, "name": "Jazz night", "capacity": 100, "available": 100, "price_cents": 2500, "currency": "EUR", "hold_seconds": 600})
        );
        let shown = app.get(&format!("/v1/resources/{id}"), &admin).await;
        assert_eq!(shown.status, StatusCode::OK);
        assert_eq!(shown.body, r.body);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM resources").await, 1);
    }

    async fn a_resource_of_capacity_zero_can_be_created_and_has_nothing_available(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let r = create(&app, &admin, with("capacity", Some(json!(0)))).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["available"], 0);
    }

    async fn a_non_admin_cannot_create_resources(backend) {
        let app = TestApp::spawn(backend).await;
        let user = app.user("ada@example.com").await;
        let r = create(&app, &user, valid()).await;
        assert_problem(&r, StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM resources").await, 0);
    }

    async fn creating_without_a_token_is_unauthenticated(backend) {
        let app = TestApp::spawn(backend).await;
        let r = app.request(Method::POST, "/v1/resources", None, None, Some(valid())).await;
        assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
        let r = app.request(Method::POST, "/v1/resources", Some("bogus"), None, Some(valid())).await;
        assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM resources").await, 0);
    }

    async fn each_invalid_field_is_refused_naming_it(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let cases: Vec<(&str, Value)> = vec![
            ("name", json!("")),
            ("name", json!("   ")),
            ("name", json!("x".repeat(201))),
            ("name", json!(42)),
            ("capacity", json!(-1)),
            ("capacity", json!("ten")),
            ("capacity", json!(1.5)),
            ("price_cents", json!(-1)),
            ("price_cents", json!("25.00")),
            ("currency", json!("eur")),
            ("currency", json!("EURO")),
            ("currency", json!("")),
            ("hold_seconds", json!(0)),
            ("hold_seconds", json!(-60)),
            ("hold_seconds", json!(30 * 24 * 3600 + 1)),
        ];
        for (field, value) in cases {
            let r = create(&app, &admin, with(field, Some(value.clone()))).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], field, "{field} = {value}: {}", r.body);
        }
        for field in ["name", "capacity", "price_cents", "currency", "hold_seconds"] {
            let r = create(&app, &admin, with(field, None)).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], field, "missing {field}: {}", r.body);
        }
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM resources").await, 0);
    }

    async fn an_unknown_field_is_refused_naming_it(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let r = create(&app, &admin, with("available", Some(json!(1000)))).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "available", "{}", r.body);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM resources").await, 0);
    }

    async fn a_body_over_64_kib_is_413_payload_too_large(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let r = create(&app, &admin, with("name", Some(json!("x".repeat(70 * 1024))))).await;
        assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM resources").await, 0);
        // The server is still fine afterwards.
        assert_eq!(create(&app, &admin, valid()).await.status, StatusCode::CREATED);
    }

    async fn any_signed_in_user_reads_a_resource_by_id(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let id = app.resource(&admin, 10, 600).await;
        let user = app.user("ada@example.com").await;
        let r = app.get(&format!("/v1/resources/{id}"), &user).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["id"], id);
        assert_eq!(r.body["name"], "Concert");
        assert_eq!(r.body["capacity"], 10);
        assert_eq!(r.body["available"], 10);
        assert_eq!(r.body["price_cents"], 2500);
        assert_eq!(r.body["currency"], "EUR");
        assert_eq!(r.body["hold_seconds"], 600);
    }

    async fn an_unknown_or_non_numeric_resource_id_is_404_not_found(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let id = app.resource(&admin, 10, 600).await;
        let user = app.user("ada@example.com").await;
        for path in [
            format!("/v1/resources/{}", id + 1),
            "/v1/resources/0".to_string(),
            "/v1/resources/-1".to_string(),
            "/v1/resources/abc".to_string(),
            "/v1/resources/99999999999999999999999".to_string(),
        ] {
            let r = app.get(&path, &user).await;
            assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        }
    }

    async fn reading_resources_requires_a_token(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let id = app.resource(&admin, 10, 600).await;
        for path in ["/v1/resources".to_string(), format!("/v1/resources/{id}")] {
            let r = app.request(Method::GET, &path, None, None, None).await;
            assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
        }
    }

    async fn listing_with_limit_and_cursor_walks_every_resource_exactly_once(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let mut created = Vec::new();
        for _ in 0..5 {
            created.push(app.resource(&admin, 10, 600).await);
        }
        let user = app.user("ada@example.com").await;

        let pages = walk(&app, &user, 2).await;
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1], "{pages:?}");
        let seen: Vec<i64> = pages.concat();
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len(), "an item came twice: {seen:?}");
        let mut sorted = seen.clone();
        sorted.sort();
        let mut expected = created.clone();
        expected.sort();
        assert_eq!(sorted, expected);

        // A page that holds exactly what is left ends the walk: no empty page after it.
        let pages = walk(&app, &user, 5).await;
        assert_eq!(pages.len(), 1, "{pages:?}");
        assert_eq!(pages[0].len(), 5);

        // Without a limit every item fits in the default page.
        let r = app.get("/v1/resources", &user).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body["items"].as_array().unwrap().len(), 5);
        assert!(r.body["next_cursor"].is_null(), "{}", r.body);
        assert_eq!(r.body["items"][0]["available"], 10);
    }

    async fn an_empty_list_has_no_items_and_a_null_cursor(backend) {
        let app = TestApp::spawn(backend).await;
        let user = app.user("ada@example.com").await;
        let r = app.get("/v1/resources", &user).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["items"], json!([]));
        assert!(r.body.as_object().unwrap().contains_key("next_cursor"));
        assert!(r.body["next_cursor"].is_null());
    }

    async fn a_bad_limit_or_cursor_is_refused_naming_the_parameter(backend) {
        let app = TestApp::spawn(backend).await;
        let user = app.user("ada@example.com").await;
        for limit in ["0", "101", "x", "-1", "2.5"] {
            let r = app.get(&format!("/v1/resources?limit={limit}"), &user).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "limit", "limit={limit}: {}", r.body);
        }
        for ok in ["1", "100"] {
            assert_eq!(app.get(&format!("/v1/resources?limit={ok}"), &user).await.status, StatusCode::OK, "limit={ok}");
        }
        for cursor in ["garbage", "!!!", "YWZ0ZXI6LTE"] {
            let r = app.get(&format!("/v1/resources?cursor={cursor}"), &user).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "cursor", "cursor={cursor}: {}", r.body);
        }
    }
}
