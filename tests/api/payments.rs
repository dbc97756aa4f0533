//! Paying (http-api.md, "Reservations" → `…/pay`, and "Payment gateway"): the sandbox gateway's test
//! methods, what is charged when, and that one reservation is never charged twice — checked in cozy's
//! `charges` table, in the gateway's own `sandbox_ledger`, and with `cozy audit`.

use reqwest::StatusCode;
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

fn assert_rfc3339(v: &Value) {
    let text = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("not RFC 3339: {text}: {e}"));
}

/// An admin's resource (capacity 10, 25.00 EUR, 10-minute hold), a customer, and a hold of 2 → 50.00 EUR.
async fn held(app: &TestApp) -> (String, i64, i64) {
    let admin = app.admin().await;
    let resource = app.resource(&admin, 10, 600).await;
    let user = app.user("ada@example.com").await;
    let id = app.reserve(&user, resource, 2).await;
    (user, resource, id)
}

async fn state(app: &TestApp, token: &str, id: i64) -> Value {
    app.get(&format!("/v1/reservations/{id}"), token).await.body["state"].clone()
}

/// Rows for reservation `id` in cozy's books and in the gateway's ledger.
async fn charges_of(app: &TestApp, id: i64) -> (i64, i64) {
    let ours = app
        .db
        .scalar(&format!(
            "SELECT COUNT(*) FROM charges WHERE reservation_id = {id}"
        ))
        .await;
    let gateway = app.gateway_charges().await;
    (ours, gateway)
}

backend_tests! {
    async fn paying_with_sandbox_ok_makes_the_reservation_paid_with_a_payment(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, resource, id) = held(&app).await;
        let r = app.pay(&user, id, "sandbox_ok", "pay-1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["id"], id);
        assert_eq!(r.body["state"], "PAID");
        assert_eq!(r.body["amount_cents"], 5000);
        let payment = &r.body["payment"];
        assert!(payment["id"].as_i64().is_some(), "{payment}");
        assert_eq!(payment["amount_cents"], 5000);
        assert_eq!(payment["currency"], "EUR");
        assert!(!payment["provider_ref"].as_str().unwrap_or("").is_empty(), "{payment}");
        assert_rfc3339(&payment["captured_at"]);
        assert!(payment.get("refunded_at").is_none_or(Value::is_null), "{payment}");

        let shown = app.get(&format!("/v1/reservations/{id}"), &user).await;
        assert_eq!(shown.body["state"], "PAID");
        assert_eq!(shown.body["payment"], r.body["payment"]);
        // A paid reservation keeps its capacity.
        let res = app.get(&format!("/v1/resources/{resource}"), &user).await;
        assert_eq!(res.body["available"], 8);
        assert_eq!(charges_of(&app, id).await, (1, 1));
        let audit = app.assert_audit_ok();
        assert_eq!(audit["charges"], 1, "{audit}");
        assert_eq!(audit["reservations"]["PAID"], 1, "{audit}");
    }

    async fn a_declined_card_is_402_leaves_the_hold_reserved_and_charges_nothing(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, resource, id) = held(&app).await;
        let r = app.pay(&user, id, "sandbox_decline", "pay-declined").await;
        assert_problem(&r, StatusCode::PAYMENT_REQUIRED, "payment_declined");
        assert_eq!(state(&app, &user, id).await, "RESERVED");
        assert_eq!(charges_of(&app, id).await, (0, 0));
        let res = app.get(&format!("/v1/resources/{resource}"), &user).await;
        assert_eq!(res.body["available"], 8, "the hold is kept");
        app.assert_audit_ok();

        // The customer tries another card, with a new key: it goes through.
        let r = app.pay(&user, id, "sandbox_ok", "pay-second-card").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["state"], "PAID");
        assert_eq!(charges_of(&app, id).await, (1, 1));
        app.assert_audit_ok();
    }

    async fn a_gateway_timeout_after_charging_is_502_and_a_retry_with_the_same_key_ends_paid_with_one_charge(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, _, id) = held(&app).await;
        let r = app.pay(&user, id, "sandbox_timeout_after_charge", "pay-1").await;
        assert_problem(&r, StatusCode::BAD_GATEWAY, "payment_unavailable");
        // The gateway took the money, but cozy could not know.
        assert_eq!(app.gateway_charges().await, 1);
        assert_eq!(state(&app, &user, id).await, "RESERVED");

        let retry = app.pay(&user, id, "sandbox_timeout_after_charge", "pay-1").await;
        assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
        assert_eq!(retry.body["state"], "PAID");
        assert_eq!(retry.body["payment"]["amount_cents"], 5000);
        assert_eq!(state(&app, &user, id).await, "PAID");
        assert_eq!(charges_of(&app, id).await, (1, 1));
        app.assert_audit_ok();
    }

    async fn a_gateway_timeout_after_charging_then_a_retry_with_a_new_key_ends_paid_with_one_charge(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, _, id) = held(&app).await;
        let r = app.pay(&user, id, "sandbox_timeout_after_charge", "pay-1").await;
        assert_problem(&r, StatusCode::BAD_GATEWAY, "payment_unavailable");
        assert_eq!(app.gateway_charges().await, 1);

        let retry = app.pay(&user, id, "sandbox_ok", "pay-2").await;
        assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
        assert_eq!(retry.body["state"], "PAID");
        assert_eq!(state(&app, &user, id).await, "PAID");
        assert_eq!(charges_of(&app, id).await, (1, 1));
        app.assert_audit_ok();

        // And the first key, retried now, does not charge again either.
        let late = app.pay(&user, id, "sandbox_timeout_after_charge", "pay-1").await;
        assert_problem(&late, StatusCode::CONFLICT, "invalid_transition");
        assert_eq!(charges_of(&app, id).await, (1, 1));
        app.assert_audit_ok();
    }

    async fn an_unknown_payment_method_is_refused_naming_payment_method(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, _, id) = held(&app).await;
        for body in [json!({"payment_method": "visa"}), json!({"payment_method": ""}), json!({}), json!({"payment_method": 4})] {
            let r = app.post(&format!("/v1/reservations/{id}/pay"), &user, &crate::helpers::random_suffix(), body.clone()).await;
            assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
            assert_eq!(r.body["field"], "payment_method", "{body}: {}", r.body);
        }
        let r = app.post(&format!("/v1/reservations/{id}/pay"), &user, "pay-extra", json!({"payment_method": "sandbox_ok", "amount_cents": 1})).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert_eq!(r.body["field"], "amount_cents", "{}", r.body);
        assert_eq!(state(&app, &user, id).await, "RESERVED");
        assert_eq!(charges_of(&app, id).await, (0, 0));
    }

    async fn paying_twice_is_409_invalid_transition_and_still_one_charge(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, _, id) = held(&app).await;
        let first = app.pay(&user, id, "sandbox_ok", "pay-1").await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.body);
        let second = app.pay(&user, id, "sandbox_ok", "pay-2").await;
        assert_problem(&second, StatusCode::CONFLICT, "invalid_transition");
        assert_eq!(second.body["from"], "PAID", "{}", second.body);
        assert_eq!(second.body["to"], "PAID", "{}", second.body);
        assert_eq!(charges_of(&app, id).await, (1, 1));
        let shown = app.get(&format!("/v1/reservations/{id}"), &user).await;
        assert_eq!(shown.body["payment"], first.body["payment"]);
        app.assert_audit_ok();
    }

    async fn paying_two_reservations_charges_each_once(backend) {
        let app = TestApp::spawn(backend).await;
        let (user, resource, first) = held(&app).await;
        let second = app.reserve(&user, resource, 3).await;
        let a = app.pay(&user, first, "sandbox_ok", "pay-a").await;
        let b = app.pay(&user, second, "sandbox_ok", "pay-b").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(b.status, StatusCode::OK, "{}", b.body);
        assert_eq!(a.body["payment"]["amount_cents"], 5000);
        assert_eq!(b.body["payment"]["amount_cents"], 7500);
        assert_ne!(a.body["payment"]["provider_ref"], b.body["payment"]["provider_ref"]);
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM charges").await, 2);
        assert_eq!(app.gateway_charges().await, 2);
        let audit = app.assert_audit_ok();
        assert_eq!(audit["charges"], 2, "{audit}");
    }
}
