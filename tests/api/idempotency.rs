//! The `Idempotency-Key` contract (http-api.md, "Idempotency"): replays, key reuse, per-user scoping,
//! what is saved and what is not, keys still running, many copies of one request at once, and purging.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{busy_pool, Resp, TestApp};

const REPLAYED: &str = "idempotent-replayed";

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db.scalar(sql).await
}

async fn available(app: &TestApp, token: &str, resource: i64) -> i64 {
    let r = app.get(&format!("/v1/resources/{resource}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["available"].as_i64().unwrap()
}

/// Waits (bounded) until the server has claimed `key` and is still running the request.
async fn wait_until_running(app: &TestApp, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let sql = format!(
        "SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = '{key}' AND status = 'running'"
    );
    while count(app, &sql).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the request with key {key} never started running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_in_use(r: &Resp) -> bool {
    r.status == StatusCode::CONFLICT && r.code() == "idempotency_key_in_use"
}

fn sweep_report(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "cozy sweep failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sweep --json output ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

backend_tests! {
    async fn a_finished_request_replays_its_response_and_runs_nothing_again(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let token = app.user("ann@example.com").await;

        let first = app.post("/v1/reservations", &token, "create-1", json!({"resource_id": resource, "quantity": 2})).await;
        assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
        assert_eq!(first.header(REPLAYED), None, "a first run is not a replay");
        let id = first.id();
        let user_id = first.body["user_id"].as_i64().unwrap();

        // The same request, with the JSON keys in another order and other whitespace, is the same request.
        let raw = app
            .client
            .post(format!("{}/v1/reservations", app.base))
            .bearer_auth(&token)
            .header("Idempotency-Key", "create-1")
            .header("Content-Type", "application/json")
            .body(format!("{{ \"quantity\" : 2,\n \"resource_id\": {resource} }}"))
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status(), StatusCode::CREATED);
        assert_eq!(raw.headers().get(REPLAYED).and_then(|v| v.to_str().ok()), Some("true"));
        let raw_body: Value = raw.json().await.unwrap();
        assert_eq!(raw_body, first.body);

        let again = app.post("/v1/reservations", &token, "create-1", json!({"resource_id": resource, "quantity": 2})).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.header(REPLAYED), Some("true"));
        assert_eq!(again.body, first.body, "a replay answers the very same body");
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservations WHERE user_id = {user_id}")).await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservation_events").await, 1);
        assert_eq!(available(&app, &token, resource).await, 8);

        let paid = app.pay(&token, id, "sandbox_ok", "pay-1").await;
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
        assert_eq!(paid.header(REPLAYED), None);
        assert_eq!(paid.body["state"], "PAID");
        for _ in 0..3 {
            let replay = app.pay(&token, id, "sandbox_ok", "pay-1").await;
            assert_eq!(replay.status, StatusCode::OK);
            assert_eq!(replay.header(REPLAYED), Some("true"));
            assert_eq!(replay.body, paid.body);
        }
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);

        let cancelled = app.cancel(&token, id, "cancel-1").await;
        assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
        assert_eq!(cancelled.body["state"], "CANCELLED");
        let replay = app.cancel(&token, id, "cancel-1").await;
        assert_eq!(replay.status, StatusCode::OK);
        assert_eq!(replay.header(REPLAYED), Some("true"));
        assert_eq!(replay.body, cancelled.body);

        // Old keys still answer their own first response, not the reservation's state of today.
        let old = app.post("/v1/reservations", &token, "create-1", json!({"resource_id": resource, "quantity": 2})).await;
        assert_eq!(old.status, StatusCode::CREATED);
        assert_eq!(old.header(REPLAYED), Some("true"));
        assert_eq!(old.body, first.body);
        assert_eq!(old.body["state"], "RESERVED");
        let old_pay = app.pay(&token, id, "sandbox_ok", "pay-1").await;
        assert_eq!(old_pay.status, StatusCode::OK);
        assert_eq!(old_pay.body, paid.body);

        // Nothing ran twice: one reservation, three transitions, one charge, capacity all back.
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations").await, 1);
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservation_events WHERE reservation_id = {id}")).await, 3);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        assert_eq!(available(&app, &token, resource).await, 10);
        app.assert_audit_ok();
    }

    async fn the_same_key_for_a_different_request_is_refused(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let token = app.user("ann@example.com").await;
        let first = app.post("/v1/reservations", &token, "k-1", json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
        let id = first.id();

        // Another body on the same path.
        let other_body = app.post("/v1/reservations", &token, "k-1", json!({"resource_id": resource, "quantity": 2})).await;
        assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", other_body.body);
        assert_eq!(other_body.code(), "idempotency_key_reused");
        assert_eq!(other_body.header(REPLAYED), None);

        // Another path (and method target) with the same key.
        let cancel = app.cancel(&token, id, "k-1").await;
        assert_eq!(cancel.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", cancel.body);
        assert_eq!(cancel.code(), "idempotency_key_reused");
        let pay = app.pay(&token, id, "sandbox_ok", "k-1").await;
        assert_eq!(pay.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", pay.body);
        assert_eq!(pay.code(), "idempotency_key_reused");

        // None of them ran.
        let now = app.get(&format!("/v1/reservations/{id}"), &token).await;
        assert_eq!(now.body["state"], "RESERVED");
        assert_eq!(now.body["quantity"], 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations").await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservation_events").await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 0);
        assert_eq!(app.gateway_charges().await, 0);

        // The key still belongs to its first request.
        let replay = app.post("/v1/reservations", &token, "k-1", json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(replay.status, StatusCode::CREATED);
        assert_eq!(replay.header(REPLAYED), Some("true"));
        assert_eq!(replay.body, first.body);
        app.assert_audit_ok();
    }

    async fn keys_are_scoped_to_the_user(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let ann = app.user("ann@example.com").await;
        let bob = app.user("bob@example.com").await;
        let body = json!({"resource_id": resource, "quantity": 1});

        let a = app.post("/v1/reservations", &ann, "shared-key", body.clone()).await;
        let b = app.post("/v1/reservations", &bob, "shared-key", body.clone()).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        assert_eq!(b.status, StatusCode::CREATED, "{}", b.body);
        assert_eq!(a.header(REPLAYED), None);
        assert_eq!(b.header(REPLAYED), None, "bob's request is not a replay of ann's");
        assert_ne!(a.id(), b.id());
        assert_ne!(a.body["user_id"], b.body["user_id"]);

        // Each replays their own.
        let a2 = app.post("/v1/reservations", &ann, "shared-key", body.clone()).await;
        let b2 = app.post("/v1/reservations", &bob, "shared-key", body.clone()).await;
        assert_eq!(a2.header(REPLAYED), Some("true"));
        assert_eq!(b2.header(REPLAYED), Some("true"));
        assert_eq!(a2.body, a.body);
        assert_eq!(b2.body, b.body);

        // Another user's reservation stays invisible whatever the key; the owner's own key works.
        let cross = app.cancel(&bob, a.id(), "cancel-key").await;
        assert_eq!(cross.status, StatusCode::NOT_FOUND, "{}", cross.body);
        let own = app.cancel(&ann, a.id(), "cancel-key").await;
        assert_eq!(own.status, StatusCode::OK, "{}", own.body);

        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations").await, 2);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations WHERE request_key = 'shared-key'").await, 2);
        assert_eq!(available(&app, &ann, resource).await, 9);
        app.assert_audit_ok();
    }

    async fn malformed_and_unauthenticated_requests_do_not_use_up_the_key(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let token = app.user("ann@example.com").await;
        let key = "fix-and-retry";

        let unknown_field = app.post("/v1/reservations", &token, key, json!({"resource_id": resource, "quantity": 1, "colour": "red"})).await;
        assert_eq!(unknown_field.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", unknown_field.body);
        assert_eq!(unknown_field.code(), "invalid_request");
        let bad_quantity = app.post("/v1/reservations", &token, key, json!({"resource_id": resource, "quantity": 0})).await;
        assert_eq!(bad_quantity.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad_quantity.body);
        let no_token = app.request(Method::POST, "/v1/reservations", None, Some(key), Some(json!({"resource_id": resource, "quantity": 1}))).await;
        assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
        assert_eq!(no_token.code(), "unauthenticated");
        let bad_token = app.request(Method::POST, "/v1/reservations", Some("not-a-token"), Some(key), Some(json!({"resource_id": resource, "quantity": 1}))).await;
        assert_eq!(bad_token.status, StatusCode::UNAUTHORIZED);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM idempotency_keys").await, 0, "refused requests must not save their key");

        // The same key with a valid request now runs normally (and may even have another body).
        let ok = app.post("/v1/reservations", &token, key, json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
        assert_eq!(ok.header(REPLAYED), None);
        let id = ok.id();
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations").await, 1);

        // Same on pay: a refused payment method does not save the key.
        let bad_method = app.pay(&token, id, "bitcoin", "pay-key").await;
        assert_eq!(bad_method.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad_method.body);
        assert_eq!(bad_method.code(), "invalid_request");
        let paid = app.pay(&token, id, "sandbox_ok", "pay-key").await;
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
        assert_eq!(paid.header(REPLAYED), None);
        assert_eq!(paid.body["state"], "PAID");

        // A 5xx is not saved either: the same key and body run again, and end PAID with one charge.
        let other = app.reserve(&token, resource, 1).await;
        let timeout = app.pay(&token, other, "sandbox_timeout_after_charge", "pay-other").await;
        assert_eq!(timeout.status, StatusCode::BAD_GATEWAY, "{}", timeout.body);
        assert_eq!(timeout.code(), "payment_unavailable");
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {other}")).await, 0);
        let retry = app.pay(&token, other, "sandbox_timeout_after_charge", "pay-other").await;
        assert_eq!(retry.status, StatusCode::OK, "{}", retry.body);
        assert_eq!(retry.header(REPLAYED), None, "a 502 must not be replayed");
        assert_eq!(retry.body["state"], "PAID");
        let replay = app.pay(&token, other, "sandbox_timeout_after_charge", "pay-other").await;
        assert_eq!(replay.status, StatusCode::OK);
        assert_eq!(replay.header(REPLAYED), Some("true"));
        assert_eq!(replay.body, retry.body);
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {other}")).await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 2);
        assert_eq!(app.gateway_charges().await, 2);
        app.assert_audit_ok();
    }

    async fn business_refusals_are_saved_and_replayed_even_after_the_world_changed(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 1, 600).await;
        let ann = app.user("ann@example.com").await;
        let bob = app.user("bob@example.com").await;
        let holder = app.reserve(&ann, resource, 1).await;

        let body = json!({"resource_id": resource, "quantity": 1});
        let sold_out = app.post("/v1/reservations", &bob, "bob-1", body.clone()).await;
        assert_eq!(sold_out.status, StatusCode::CONFLICT, "{}", sold_out.body);
        assert_eq!(sold_out.code(), "sold_out");
        assert_eq!(sold_out.header(REPLAYED), None);

        // Capacity frees up; the key still answers what it answered.
        let c = app.cancel(&ann, holder, "ann-cancel").await;
        assert_eq!(c.status, StatusCode::OK, "{}", c.body);
        assert_eq!(available(&app, &bob, resource).await, 1);
        let replay = app.post("/v1/reservations", &bob, "bob-1", body.clone()).await;
        assert_eq!(replay.status, StatusCode::CONFLICT);
        assert_eq!(replay.code(), "sold_out");
        assert_eq!(replay.header(REPLAYED), Some("true"));
        assert_eq!(replay.body, sold_out.body);
        assert!(replay.header("content-type").unwrap_or("").starts_with("application/problem+json"));
        let bob_id = bob_user_id(&app).await;
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservations WHERE user_id = {bob_id}")).await, 0);

        // A new key is a new request.
        let fresh = app.post("/v1/reservations", &bob, "bob-2", body.clone()).await;
        assert_eq!(fresh.status, StatusCode::CREATED, "{}", fresh.body);
        let id = fresh.id();

        // A declined card is a definite outcome too: the same key answers 402 again without charging,
        // a new key pays.
        let declined = app.pay(&bob, id, "sandbox_decline", "bob-pay-1").await;
        assert_eq!(declined.status, StatusCode::PAYMENT_REQUIRED, "{}", declined.body);
        assert_eq!(declined.code(), "payment_declined");
        let declined_again = app.pay(&bob, id, "sandbox_decline", "bob-pay-1").await;
        assert_eq!(declined_again.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(declined_again.header(REPLAYED), Some("true"));
        assert_eq!(declined_again.body, declined.body);
        let paid = app.pay(&bob, id, "sandbox_ok", "bob-pay-2").await;
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);

        // An invalid transition is saved as well: paying again under a new key is refused, and that
        // refusal replays even after the reservation is cancelled.
        let twice = app.pay(&bob, id, "sandbox_ok", "bob-pay-3").await;
        assert_eq!(twice.status, StatusCode::CONFLICT, "{}", twice.body);
        assert_eq!(twice.code(), "invalid_transition");
        let c = app.cancel(&bob, id, "bob-cancel").await;
        assert_eq!(c.status, StatusCode::OK, "{}", c.body);
        let twice_again = app.pay(&bob, id, "sandbox_ok", "bob-pay-3").await;
        assert_eq!(twice_again.header(REPLAYED), Some("true"));
        assert_eq!(twice_again.body, twice.body);

        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        app.assert_audit_ok();
    }

    async fn a_key_still_running_answers_409_with_retry_after(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend), ("COZY_GATEWAY_DELAY_MS", "1500")]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let token = app.user("ann@example.com").await;
        let id = app.reserve(&token, resource, 1).await;

        let first = {
            let (app, token) = (app.clone(), token.clone());
            tokio::spawn(async move { app.pay(&token, id, "sandbox_ok", "slow-pay").await })
        };
        wait_until_running(&app, "slow-pay").await;

        let second = app.pay(&token, id, "sandbox_ok", "slow-pay").await;
        assert_eq!(second.status, StatusCode::CONFLICT, "{}", second.body);
        assert_eq!(second.code(), "idempotency_key_in_use");
        let retry_after: u64 = second
            .header("retry-after")
            .unwrap_or_else(|| panic!("409 idempotency_key_in_use without Retry-After: {:?}", second.headers))
            .parse()
            .expect("Retry-After in seconds");
        assert!(retry_after >= 1);
        // A different request under the running key is still a reused key.
        let other = app.pay(&token, id, "sandbox_decline", "slow-pay").await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", other.body);
        assert_eq!(other.code(), "idempotency_key_reused");

        let first = first.await.unwrap();
        assert_eq!(first.status, StatusCode::OK, "{}", first.body);
        assert_eq!(first.header(REPLAYED), None);
        let third = app.pay(&token, id, "sandbox_ok", "slow-pay").await;
        assert_eq!(third.status, StatusCode::OK);
        assert_eq!(third.header(REPLAYED), Some("true"));
        assert_eq!(third.body, first.body);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        app.assert_audit_ok();
    }

    async fn fifty_copies_of_one_reservation_request_make_one_reservation(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 100, 600).await;
        let token = app.user("ann@example.com").await;
        let body = json!({"resource_id": resource, "quantity": 1});

        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (app, token, body) = (app.clone(), token.clone(), body.clone());
                tokio::spawn(async move { app.post("/v1/reservations", &token, "one-key", body).await })
            })
            .collect();
        let responses: Vec<Resp> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();

        let created: Vec<&Resp> = responses.iter().filter(|r| r.status == StatusCode::CREATED).collect();
        let in_use = responses.iter().filter(|r| is_in_use(r)).count();
        for r in &responses {
            assert!(r.status == StatusCode::CREATED || is_in_use(r), "unexpected answer {} {}", r.status, r.body);
            if is_in_use(r) {
                assert!(r.header("retry-after").is_some(), "409 in use without Retry-After");
            }
        }
        assert_eq!(created.len() + in_use, 50);
        assert_eq!(
            created.iter().filter(|r| r.header(REPLAYED).is_none()).count(),
            1,
            "exactly one request runs, the others replay or wait"
        );
        let id = created[0].id();
        for r in &created {
            assert_eq!(r.body, created[0].body, "every 201 is the same reservation");
        }

        let user_id = created[0].body["user_id"].as_i64().unwrap();
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservations WHERE user_id = {user_id}")).await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations WHERE request_key = 'one-key'").await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservation_events").await, 1);
        assert_eq!(available(&app, &token, resource).await, 99);

        let later = app.post("/v1/reservations", &token, "one-key", body).await;
        assert_eq!(later.status, StatusCode::CREATED);
        assert_eq!(later.header(REPLAYED), Some("true"));
        assert_eq!(later.id(), id);
        app.assert_audit_ok();
    }

    async fn fifty_copies_of_one_payment_charge_once(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend), ("COZY_GATEWAY_DELAY_MS", "200")]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let token = app.user("ann@example.com").await;
        let id = app.reserve(&token, resource, 2).await;

        let fire = |n: usize| {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (app, token) = (app.clone(), token.clone());
                    tokio::spawn(async move { app.pay(&token, id, "sandbox_ok", "one-pay-key").await })
                })
                .collect();
            async move { futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect::<Vec<Resp>>() }
        };
        let responses = fire(50).await;
        let ok: Vec<&Resp> = responses.iter().filter(|r| r.status == StatusCode::OK).collect();
        for r in &responses {
            assert!(r.status == StatusCode::OK || is_in_use(r), "unexpected answer {} {}", r.status, r.body);
        }
        assert_eq!(ok.iter().filter(|r| r.header(REPLAYED).is_none()).count(), 1, "exactly one payment runs");
        for r in &ok {
            assert_eq!(r.body, ok[0].body);
            assert_eq!(r.body["state"], "PAID");
        }
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservation_events WHERE reservation_id = {id} AND to_state = 'PAID'")).await, 1);

        // Once it finished, every copy replays the same answer.
        let second_wave = fire(50).await;
        for r in &second_wave {
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            assert_eq!(r.header(REPLAYED), Some("true"));
            assert_eq!(r.body, ok[0].body);
        }
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        app.assert_audit_ok();
    }

    async fn sweep_purges_finished_keys_and_keeps_running_ones(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend), ("COZY_GATEWAY_DELAY_MS", "3000")]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 4, 600).await;
        let token = app.user("ann@example.com").await;
        let mut ids = Vec::new();
        for i in 0..4 {
            let r = app.post("/v1/reservations", &token, &format!("purge-{i}"), json!({"resource_id": resource, "quantity": 1})).await;
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
            ids.push(r.id());
        }
        let sold_out = app.post("/v1/reservations", &token, "purge-sold-out", json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(sold_out.code(), "sold_out");
        let finished = count(&app, "SELECT COUNT(*) FROM idempotency_keys WHERE status = 'done'").await;
        assert_eq!(finished, 5);

        // Default retention (24 h): nothing is old enough.
        let kept = sweep_report(&app.cli_env(&["sweep", "--json"], &[]));
        assert_eq!(kept["idempotency_keys_purged"], 0, "{kept}");
        assert_eq!(count(&app, "SELECT COUNT(*) FROM idempotency_keys").await, 5);

        // A payment in flight holds a running key while the purge runs.
        let in_flight = {
            let (app, token) = (app.clone(), token.clone());
            let id = ids[0];
            tokio::spawn(async move { app.pay(&token, id, "sandbox_ok", "purge-pay").await })
        };
        wait_until_running(&app, "purge-pay").await;
        let purged = sweep_report(&app.cli_env(&["sweep", "--json"], &[("COZY_IDEMPOTENCY_RETENTION_SECS", "0")]));
        assert!(purged["idempotency_keys_purged"].as_i64().unwrap() >= finished, "{purged}");
        assert_eq!(count(&app, "SELECT COUNT(*) FROM idempotency_keys WHERE idem_key LIKE 'purge-%' AND idem_key <> 'purge-pay'").await, 0);
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = 'purge-pay'").await,
            1,
            "a running key must survive the purge"
        );

        let paid = in_flight.await.unwrap();
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
        let replay = app.pay(&token, ids[0], "sandbox_ok", "purge-pay").await;
        assert_eq!(replay.header(REPLAYED), Some("true"));
        assert_eq!(replay.body, paid.body);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations").await, 4);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        app.assert_audit_ok();
    }
}

async fn bob_user_id(app: &TestApp) -> i64 {
    app.db
        .scalar("SELECT id FROM users WHERE email = 'bob@example.com'")
        .await
}
