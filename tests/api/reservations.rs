//! Reservations (http-api.md, "Reservations"): holding capacity, reading and listing one's own
//! reservations, cancelling (with a refund when paid), the transition rules and the event log. Paying is
//! in payments.rs; idempotency, concurrency, crashes and expiry have files of their own.

use std::collections::HashSet;

use chrono::{DateTime, FixedOffset, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{random_suffix, Resp, TestApp};

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

fn time(v: &Value) -> DateTime<FixedOffset> {
    let text = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert!(text.ends_with('Z'), "not UTC: {text}");
    DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("not RFC 3339: {text}: {e}"))
}

async fn reserve(app: &TestApp, token: &str, body: Value) -> Resp {
    app.post("/v1/reservations", token, &random_suffix(), body)
        .await
}

async fn available(app: &TestApp, token: &str, resource: i64) -> i64 {
    let r = app.get(&format!("/v1/resources/{resource}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["available"].as_i64().unwrap()
}

/// An admin, a customer and a resource of capacity 10 at 25.00 EUR with a 10-minute hold.
async fn setup(app: &TestApp) -> (String, String, i64) {
    let admin = app.admin().await;
    let resource = app.resource(&admin, 10, 600).await;
    let user = app.user("ada@example.com").await;
    (admin, user, resource)
}

backend_tests! {
    async fn reserving_holds_capacity_and_returns_201_reserved(backend) {
        let app = TestApp::spawn(backend).await;
        let (admin, user, resource) = setup(&app).await;
        let before = Utc::now();
        let r = reserve(&app, &user, json!({"resource_id": resource, "quantity": 3})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert!(r.id() > 0);
        assert_eq!(r.body["resource_id"], resource);
        assert_eq!(r.body["quantity"], 3);
        assert_eq!(r.body["state"], "RESERVED");
        assert_eq!(r.body["amount_cents"], 7500, "price_cents × quantity");
        assert_eq!(r.body["currency"], "EUR");
        assert!(r.body["payment"].is_null(), "{}", r.body);
        for member in ["user_id", "expires_at", "created_at", "updated_at", "payment"] {
            assert!(r.body.get(member).is_some(), "no {member}: {}", r.body);
        }
        let created_at = time(&r.body["created_at"]);
        let expires_at = time(&r.body["expires_at"]);
        time(&r.body["updated_at"]);
        assert_eq!((expires_at - created_at).num_seconds(), 600, "the hold lasts hold_seconds");
        let drift = (created_at.with_timezone(&Utc) - before).num_seconds().abs();
        assert!(drift < 300, "created_at {created_at} is far from now ({before})");

        assert_eq!(available(&app, &user, resource).await, 7);
        assert_eq!(available(&app, &admin, resource).await, 7);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM reservations WHERE state = 'RESERVED'").await, 1);
        app.assert_audit_ok();
    }

    async fn the_reservation_belongs_to_the_caller(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let me = app.request(Method::POST, "/v1/sessions", None, None, Some(json!({"email": "ada@example.com", "password": "correct horse"}))).await;
        let r = reserve(&app, &user, json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["user_id"], me.body["user"]["id"]);
    }

    async fn a_quantity_that_is_zero_negative_missing_or_not_an_integer_is_refused_naming_quantity(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let bodies = [
            json!({"resource_id": resource, "quantity": 0}),
            json!({"resource_id": resource, "quantity": -2}),
            json!({"resource_id": resource}),
            json!({"resource_id": resource, "quantity": "two"}),
            json!({"resource_id": resource, "quantity": 1.5}),
            json!({"resource_id": resource, "quantity": null}),
        ];
        for body in bodies {
            let r = reserve(&app, &user, body.clone()).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "quantity", "{body}: {}", r.body);
        }
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM reservations").await, 0);
        assert_eq!(available(&app, &user, resource).await, 10);
    }

    async fn a_missing_resource_id_or_an_unknown_field_is_refused_naming_it(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let r = reserve(&app, &user, json!({"quantity": 1})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "resource_id", "{}", r.body);
        let r = reserve(&app, &user, json!({"resource_id": resource, "quantity": 1, "price_cents": 1})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "price_cents", "{}", r.body);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM reservations").await, 0);
    }

    async fn reserving_an_unknown_resource_is_404_not_found(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let r = reserve(&app, &user, json!({"resource_id": resource + 100, "quantity": 1})).await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM reservations").await, 0);
    }

    async fn effectful_requests_without_an_idempotency_key_are_400_idempotency_key_missing(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 1).await;
        let requests = [
            ("/v1/reservations".to_string(), json!({"resource_id": resource, "quantity": 1})),
            (format!("/v1/reservations/{id}/pay"), json!({"payment_method": "sandbox_ok"})),
            (format!("/v1/reservations/{id}/cancel"), json!({})),
        ];
        for (path, body) in requests {
            let r = app.request(Method::POST, &path, Some(&user), None, Some(body)).await;
            assert_problem(&r, StatusCode::BAD_REQUEST, "idempotency_key_missing");
        }
        // Nothing happened: still one reservation, still RESERVED, nothing charged.
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM reservations").await, 1);
        assert_eq!(app.get(&format!("/v1/reservations/{id}"), &user).await.body["state"], "RESERVED");
        assert_eq!(app.gateway_charges().await, 0);
        assert_eq!(available(&app, &user, resource).await, 9);
    }

    async fn asking_for_more_than_is_available_is_409_sold_out_and_holds_nothing(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        app.reserve(&user, resource, 7).await;
        let r = reserve(&app, &user, json!({"resource_id": resource, "quantity": 4})).await;
        assert_problem(&r, StatusCode::CONFLICT, "sold_out");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM reservations").await, 1);
        assert_eq!(available(&app, &user, resource).await, 3);
        // Exactly what is left can still be taken, and then nothing is.
        app.reserve(&user, resource, 3).await;
        assert_eq!(available(&app, &user, resource).await, 0);
        let r = reserve(&app, &user, json!({"resource_id": resource, "quantity": 1})).await;
        assert_problem(&r, StatusCode::CONFLICT, "sold_out");
        app.assert_audit_ok();
    }

    async fn the_owner_reads_a_reservation_by_id(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let created = reserve(&app, &user, json!({"resource_id": resource, "quantity": 2})).await;
        let id = created.id();
        let r = app.get(&format!("/v1/reservations/{id}"), &user).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body, created.body);
    }

    async fn another_users_reservation_is_404_for_every_route_and_stays_untouched(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, owner, resource) = setup(&app).await;
        let id = app.reserve(&owner, resource, 2).await;
        let stranger = app.user("mallory@example.com").await;

        let r = app.get(&format!("/v1/reservations/{id}"), &stranger).await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        let r = app.get(&format!("/v1/reservations/{id}/events"), &stranger).await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        let r = app.pay(&stranger, id, "sandbox_ok", "stranger-pay").await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        let r = app.cancel(&stranger, id, "stranger-cancel").await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        // Same answer as for an id that does not exist at all: nothing reveals that it exists.
        let missing = app.get(&format!("/v1/reservations/{}", id + 100), &stranger).await;
        assert_problem(&missing, StatusCode::NOT_FOUND, "not_found");
        assert_eq!(r.body["detail"], missing.body["detail"]);

        let mine = app.get(&format!("/v1/reservations/{id}"), &owner).await;
        assert_eq!(mine.body["state"], "RESERVED");
        assert!(mine.body["payment"].is_null());
        assert_eq!(app.gateway_charges().await, 0);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM charges").await, 0);
        assert_eq!(available(&app, &owner, resource).await, 8);
        let listed = app.get("/v1/reservations", &stranger).await;
        assert_eq!(listed.body["items"], json!([]));
    }

    async fn an_unknown_or_non_numeric_reservation_id_is_404(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, _) = setup(&app).await;
        for id in ["1", "0", "-3", "abc"] {
            let r = app.get(&format!("/v1/reservations/{id}"), &user).await;
            assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
            let r = app.get(&format!("/v1/reservations/{id}/events"), &user).await;
            assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
            let r = app.post(&format!("/v1/reservations/{id}/cancel"), &user, &random_suffix(), json!({})).await;
            assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
            let r = app.post(&format!("/v1/reservations/{id}/pay"), &user, &random_suffix(), json!({"payment_method": "sandbox_ok"})).await;
            assert_problem(&r, StatusCode::NOT_FOUND, "not_found");
        }
        assert_eq!(app.gateway_charges().await, 0);
    }

    async fn the_list_holds_only_the_callers_own_reservations(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, ada, resource) = setup(&app).await;
        let bob = app.user("bob@example.com").await;
        let a1 = app.reserve(&ada, resource, 1).await;
        let b1 = app.reserve(&bob, resource, 1).await;
        let a2 = app.reserve(&ada, resource, 2).await;

        let r = app.get("/v1/reservations", &ada).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let ids: Vec<i64> = r.body["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, [a1, a2]);
        assert!(r.body["next_cursor"].is_null());
        let r = app.get("/v1/reservations", &bob).await;
        let ids: Vec<i64> = r.body["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, [b1]);
    }

    async fn the_list_filters_by_state(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let paid = app.reserve(&user, resource, 1).await;
        let held = app.reserve(&user, resource, 1).await;
        let cancelled = app.reserve(&user, resource, 1).await;
        assert_eq!(app.pay(&user, paid, "sandbox_ok", "pay-1").await.status, StatusCode::OK);
        assert_eq!(app.cancel(&user, cancelled, "cancel-1").await.status, StatusCode::OK);

        for (state, expected) in [("PAID", paid), ("RESERVED", held), ("CANCELLED", cancelled)] {
            let r = app.get(&format!("/v1/reservations?state={state}"), &user).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let items = r.body["items"].as_array().unwrap();
            assert_eq!(items.len(), 1, "{state}: {}", r.body);
            assert_eq!(items[0]["id"], expected);
            assert_eq!(items[0]["state"], state);
        }
        let r = app.get("/v1/reservations?state=EXPIRED", &user).await;
        assert_eq!(r.body["items"], json!([]));
        let r = app.get("/v1/reservations", &user).await;
        assert_eq!(r.body["items"].as_array().unwrap().len(), 3);
    }

    async fn a_bad_state_filter_or_paging_parameter_is_refused_naming_it(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, _) = setup(&app).await;
        for query in ["state=SHIPPED", "state=1"] {
            let r = app.get(&format!("/v1/reservations?{query}"), &user).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "state", "{query}: {}", r.body);
        }
        for query in ["limit=0", "limit=101", "limit=x"] {
            let r = app.get(&format!("/v1/reservations?{query}"), &user).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "limit", "{query}: {}", r.body);
        }
        let r = app.get("/v1/reservations?cursor=garbage", &user).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "cursor", "{}", r.body);
    }

    async fn the_list_pages_with_limit_and_cursor(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let mut created = Vec::new();
        for _ in 0..5 {
            created.push(app.reserve(&user, resource, 1).await);
        }
        let mut seen = Vec::new();
        let mut path = "/v1/reservations?limit=2".to_string();
        let mut pages = 0;
        loop {
            let r = app.get(&path, &user).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let items = r.body["items"].as_array().unwrap();
            assert!(items.len() <= 2);
            seen.extend(items.iter().map(|i| i["id"].as_i64().unwrap()));
            pages += 1;
            assert!(pages <= 10, "pagination does not end");
            match r.body["next_cursor"].as_str() {
                Some(c) => path = format!("/v1/reservations?limit=2&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 5, "{seen:?}");
        assert_eq!(seen, created);
    }

    async fn cancelling_a_hold_makes_it_cancelled_and_gives_the_capacity_back(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 4).await;
        assert_eq!(available(&app, &user, resource).await, 6);
        let r = app.cancel(&user, id, "cancel-1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["id"], id);
        assert_eq!(r.body["state"], "CANCELLED");
        assert!(r.body["payment"].is_null());
        assert_eq!(available(&app, &user, resource).await, 10);
        assert_eq!(app.get(&format!("/v1/reservations/{id}"), &user).await.body["state"], "CANCELLED");
        assert_eq!(app.db.scalar(&format!("SELECT COUNT(*) FROM reservations WHERE id = {id} AND state = 'CANCELLED'")).await, 1);
        assert_eq!(app.gateway_charges().await, 0);
        app.assert_audit_ok();
    }

    async fn cancelling_a_paid_reservation_refunds_it_and_gives_the_capacity_back(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 2).await;
        let paid = app.pay(&user, id, "sandbox_ok", "pay-1").await;
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
        assert_eq!(available(&app, &user, resource).await, 8);

        let r = app.cancel(&user, id, "cancel-1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["state"], "CANCELLED");
        assert_eq!(r.body["payment"]["id"], paid.body["payment"]["id"]);
        assert_eq!(r.body["payment"]["amount_cents"], 5000);
        time(&r.body["payment"]["refunded_at"]);
        assert_eq!(available(&app, &user, resource).await, 10);

        // cozy's books and the gateway's ledger both show the refund; nothing was charged twice.
        assert_eq!(app.db.scalar(&format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {id} AND refunded_at IS NOT NULL")).await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM sandbox_ledger WHERE refunded_at IS NOT NULL").await, 1);
        let audit = app.assert_audit_ok();
        assert_eq!(audit["reservations"]["CANCELLED"], 1, "{audit}");
        assert_eq!(audit["orphan_charges"], 0, "{audit}");
    }

    async fn cancelling_twice_is_409_invalid_transition_naming_from_and_to(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 1).await;
        assert_eq!(app.cancel(&user, id, "cancel-1").await.status, StatusCode::OK);
        let again = app.cancel(&user, id, "cancel-2").await;
        assert_problem(&again, StatusCode::CONFLICT, "invalid_transition");
        assert_eq!(again.body["from"], "CANCELLED", "{}", again.body);
        assert_eq!(again.body["to"], "CANCELLED", "{}", again.body);
        // The capacity came back once, not twice.
        assert_eq!(available(&app, &user, resource).await, 10);
        app.assert_audit_ok();
    }

    async fn paying_a_cancelled_reservation_is_an_invalid_transition_and_charges_nothing(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 1).await;
        assert_eq!(app.cancel(&user, id, "cancel-1").await.status, StatusCode::OK);
        let r = app.pay(&user, id, "sandbox_ok", "pay-1").await;
        assert_problem(&r, StatusCode::CONFLICT, "invalid_transition");
        assert_eq!(r.body["from"], "CANCELLED", "{}", r.body);
        assert_eq!(r.body["to"], "PAID", "{}", r.body);
        assert_eq!(app.gateway_charges().await, 0);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM charges").await, 0);
        assert_eq!(app.get(&format!("/v1/reservations/{id}"), &user).await.body["state"], "CANCELLED");
        app.assert_audit_ok();
    }

    async fn the_event_log_lists_every_transition_with_its_cause_and_time(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 1).await;
        let fresh = app.get(&format!("/v1/reservations/{id}/events"), &user).await;
        assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.body);
        assert_eq!(fresh.body["items"].as_array().unwrap().len(), 1, "{}", fresh.body);

        assert_eq!(app.pay(&user, id, "sandbox_ok", "pay-1").await.status, StatusCode::OK);
        assert_eq!(app.cancel(&user, id, "cancel-1").await.status, StatusCode::OK);
        let r = app.get(&format!("/v1/reservations/{id}/events"), &user).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let items = r.body["items"].as_array().unwrap();
        let steps: Vec<(Value, Value)> = items.iter().map(|e| (e["from"].clone(), e["to"].clone())).collect();
        assert_eq!(
            steps,
            [
                (Value::Null, json!("RESERVED")),
                (json!("RESERVED"), json!("PAID")),
                (json!("PAID"), json!("CANCELLED")),
            ],
            "{}",
            r.body
        );
        assert!(items[0].as_object().unwrap().contains_key("from"), "from is present, as null: {}", items[0]);
        let causes: Vec<&str> = items.iter().map(|e| e["cause"].as_str().expect("cause is a string")).collect();
        assert_eq!(causes[0], "reserved");
        assert_eq!(causes[1], "paid");
        assert!(causes[2].starts_with("cancelled"), "{causes:?}");
        let times: Vec<DateTime<FixedOffset>> = items.iter().map(|e| time(&e["at"])).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "events are in order: {times:?}");
    }

    async fn cancel_takes_an_empty_body_an_empty_object_or_a_reason(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let a = app.reserve(&user, resource, 1).await;
        let b = app.reserve(&user, resource, 1).await;
        let c = app.reserve(&user, resource, 1).await;

        let r = app.request(Method::POST, &format!("/v1/reservations/{a}/cancel"), Some(&user), Some("cancel-a"), None).await;
        assert_eq!(r.status, StatusCode::OK, "empty body: {}", r.body);
        assert_eq!(r.body["state"], "CANCELLED");
        let r = app.post(&format!("/v1/reservations/{b}/cancel"), &user, "cancel-b", json!({})).await;
        assert_eq!(r.status, StatusCode::OK, "{{}}: {}", r.body);
        assert_eq!(r.body["state"], "CANCELLED");
        let r = app.post(&format!("/v1/reservations/{c}/cancel"), &user, "cancel-c", json!({"reason": "plans changed"})).await;
        assert_eq!(r.status, StatusCode::OK, "reason: {}", r.body);
        assert_eq!(r.body["state"], "CANCELLED");

        let events = app.get(&format!("/v1/reservations/{c}/events"), &user).await;
        let last = events.body["items"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["to"], "CANCELLED");
        assert!(last["cause"].as_str().unwrap().contains("plans changed"), "the reason is kept: {last}");
        assert_eq!(available(&app, &user, resource).await, 10);
    }

    async fn a_cancel_reason_over_200_characters_or_an_unknown_field_is_refused(backend) {
        let app = TestApp::spawn(backend).await;
        let (_, user, resource) = setup(&app).await;
        let id = app.reserve(&user, resource, 1).await;
        let path = format!("/v1/reservations/{id}/cancel");

        let r = app.post(&path, &user, &random_suffix(), json!({"reason": "x".repeat(201)})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "reason", "{}", r.body);
        let r = app.post(&path, &user, &random_suffix(), json!({"reason": "late", "refund": false})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "refund", "{}", r.body);
        assert_eq!(app.get(&format!("/v1/reservations/{id}"), &user).await.body["state"], "RESERVED");

        // 200 characters (counted as characters, not bytes) are fine.
        let r = app.post(&path, &user, &random_suffix(), json!({"reason": "é".repeat(200)})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["state"], "CANCELLED");
    }
}
