//! Real concurrency against the invariants: hundreds of reservers on a small resource never oversell, and
//! racing payments and cancellations on one reservation settle to exactly one consistent outcome.

use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;

use crate::backend_tests;
use crate::helpers::{busy_pool, Resp, TestApp};

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db.scalar(sql).await
}

async fn available(app: &TestApp, token: &str, resource: i64) -> i64 {
    let r = app.get(&format!("/v1/resources/{resource}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["available"].as_i64().unwrap()
}

/// `n` users registered and logged in concurrently; returns their tokens.
async fn users(app: &Arc<TestApp>, n: usize) -> Vec<String> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move { app.user(&format!("user{i}@example.com")).await })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Sends every `(token, key, quantity)` reservation request at once; answers in the same order.
async fn reserve_all(
    app: &Arc<TestApp>,
    resource: i64,
    requests: &[(String, String, i64)],
) -> Vec<Resp> {
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|(token, key, quantity)| {
            let app = app.clone();
            tokio::spawn(async move {
                app.post(
                    "/v1/reservations",
                    &token,
                    &key,
                    json!({"resource_id": resource, "quantity": quantity}),
                )
                .await
            })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Sends `n` pays (or cancels) of one reservation at once, each under its own key.
async fn race(app: &Arc<TestApp>, token: &str, id: i64, n: usize, pay: bool) -> Vec<Resp> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (app, token) = (app.clone(), token.to_string());
            tokio::spawn(async move {
                if pay {
                    app.pay(&token, id, "sandbox_ok", &format!("pay-{id}-{i}"))
                        .await
                } else {
                    app.cancel(&token, id, &format!("cancel-{id}-{i}")).await
                }
            })
        })
        .collect();
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

backend_tests! {
    async fn three_hundred_reservers_on_twenty_five_seats_never_oversell(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 25, 600).await;
        let tokens = users(&app, 30).await;
        let requests: Vec<(String, String, i64)> = (0..10)
            .flat_map(|i| tokens.iter().enumerate().map(move |(u, t)| (t.clone(), format!("u{u}-r{i}"), 1)))
            .collect();
        assert_eq!(requests.len(), 300);

        let responses = reserve_all(&app, resource, &requests).await;
        let created = responses.iter().filter(|r| r.status == StatusCode::CREATED).count();
        let sold_out: Vec<&Resp> = responses.iter().filter(|r| r.status == StatusCode::CONFLICT && r.code() == "sold_out").collect();
        for r in &responses {
            assert!(
                r.status == StatusCode::CREATED || (r.status == StatusCode::CONFLICT && r.code() == "sold_out"),
                "unexpected answer {} {}",
                r.status,
                r.body
            );
        }
        assert_eq!(created, 25, "exactly the capacity is sold");
        assert_eq!(sold_out.len(), 275);
        for r in &sold_out {
            assert_eq!(r.body["available"], 0, "{}", r.body);
        }

        assert_eq!(available(&app, &admin, resource).await, 0);
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservations WHERE resource_id = {resource}")).await, 25);
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservations WHERE resource_id = {resource} AND state = 'RESERVED'")).await, 25);
        assert_eq!(count(&app, &format!("SELECT held FROM resources WHERE id = {resource}")).await, 25);
        let report = app.assert_audit_ok();
        assert_eq!(report["oversold_resources"], 0);
        assert_eq!(report["reservations"]["RESERVED"], 25);
    }

    async fn mixed_quantities_fill_capacity_without_overselling(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let admin = app.admin().await;
        let capacity = 40;
        let resource = app.resource(&admin, capacity, 600).await;
        let tokens = users(&app, 20).await;
        let requests: Vec<(String, String, i64)> = (0..6)
            .flat_map(|i| {
                tokens.iter().enumerate().map(move |(u, t)| (t.clone(), format!("u{u}-r{i}"), 1 + ((i * 7 + u) % 3) as i64))
            })
            .collect();
        let demand: i64 = requests.iter().map(|r| r.2).sum();
        assert!(demand > capacity);

        let responses = reserve_all(&app, resource, &requests).await;
        let mut reserved = 0;
        let mut refused = Vec::new();
        for (r, (_, _, quantity)) in responses.iter().zip(&requests) {
            match (r.status, r.code()) {
                (StatusCode::CREATED, _) => {
                    assert_eq!(r.body["quantity"], *quantity);
                    reserved += quantity;
                }
                (StatusCode::CONFLICT, "sold_out") => {
                    let left = r.body["available"].as_i64().unwrap_or_else(|| panic!("sold_out without available: {}", r.body));
                    assert!((0..*quantity).contains(&left), "sold_out for {quantity} while {left} were left: {}", r.body);
                    refused.push(*quantity);
                }
                _ => panic!("unexpected answer {} {}", r.status, r.body),
            }
        }
        assert!(reserved <= capacity, "oversold: {reserved} of {capacity}");
        assert!(!refused.is_empty(), "demand {demand} exceeded capacity {capacity}, someone must be refused");
        // Availability only shrank during the run, so everyone refused wanted more than what is left now:
        // capacity is left unused only when the remaining requests did not fit.
        let left = capacity - reserved;
        for q in &refused {
            assert!(*q > left, "a request for {q} was refused while {left} remain");
        }
        assert_eq!(available(&app, &admin, resource).await, left);

        let mut stored = 0;
        for q in 1..=3 {
            stored += q * count(&app, &format!("SELECT COUNT(*) FROM reservations WHERE resource_id = {resource} AND quantity = {q}")).await;
        }
        assert_eq!(stored, reserved, "the database holds exactly what was answered 201");
        assert_eq!(count(&app, &format!("SELECT held FROM resources WHERE id = {resource}")).await, reserved);
        let report = app.assert_audit_ok();
        assert_eq!(report["oversold_resources"], 0);
    }

    async fn twenty_concurrent_payments_of_one_reservation_charge_once(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend), ("COZY_GATEWAY_DELAY_MS", "100")]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 5, 600).await;
        let token = app.user("ann@example.com").await;
        let id = app.reserve(&token, resource, 2).await;

        let responses = race(&app, &token, id, 20, true).await;
        let ok: Vec<&Resp> = responses.iter().filter(|r| r.status == StatusCode::OK).collect();
        assert_eq!(ok.len(), 1, "exactly one payment wins: {:?}", responses.iter().map(|r| (r.status, r.code().to_string())).collect::<Vec<_>>());
        assert_eq!(ok[0].body["state"], "PAID");
        for r in responses.iter().filter(|r| r.status != StatusCode::OK) {
            assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
            assert_eq!(r.code(), "invalid_transition", "{}", r.body);
            assert_eq!(r.body["from"], "PAID", "{}", r.body);
            assert_eq!(r.body["to"], "PAID", "{}", r.body);
        }

        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {id}")).await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM sandbox_ledger WHERE refunded_at IS NULL").await, 1, "the winning charge must not be refunded by a loser");
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM reservation_events WHERE reservation_id = {id} AND to_state = 'PAID'")).await, 1);
        let now = app.get(&format!("/v1/reservations/{id}"), &token).await;
        assert_eq!(now.body["state"], "PAID");
        assert_eq!(now.body["payment"]["id"], ok[0].body["payment"]["id"]);
        assert_eq!(available(&app, &token, resource).await, 3);
        let report = app.assert_audit_ok();
        assert_eq!(report["double_charges"], 0);
        assert_eq!(report["charges"], 1);
    }

    async fn twenty_concurrent_cancellations_cancel_once(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 5, 600).await;
        let token = app.user("ann@example.com").await;

        // A hold, and a paid reservation (whose cancellation refunds).
        let held = app.reserve(&token, resource, 2).await;
        let paid = app.reserve(&token, resource, 3).await;
        let p = app.pay(&token, paid, "sandbox_ok", "pay-it").await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.body);
        assert_eq!(available(&app, &token, resource).await, 0);

        for (id, from) in [(held, "RESERVED"), (paid, "PAID")] {
            let responses = race(&app, &token, id, 20, false).await;
            let ok: Vec<&Resp> = responses.iter().filter(|r| r.status == StatusCode::OK).collect();
            assert_eq!(ok.len(), 1, "exactly one cancellation of the {from} reservation wins");
            assert_eq!(ok[0].body["state"], "CANCELLED");
            for r in responses.iter().filter(|r| r.status != StatusCode::OK) {
                assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
                assert_eq!(r.code(), "invalid_transition", "{}", r.body);
                assert_eq!(r.body["from"], "CANCELLED", "{}", r.body);
                assert_eq!(r.body["to"], "CANCELLED", "{}", r.body);
            }
            assert_eq!(
                count(&app, &format!("SELECT COUNT(*) FROM reservation_events WHERE reservation_id = {id} AND to_state = 'CANCELLED' AND from_state = '{from}'")).await,
                1
            );
        }

        // Capacity came back exactly once per reservation.
        assert_eq!(available(&app, &token, resource).await, 5);
        assert_eq!(count(&app, &format!("SELECT held FROM resources WHERE id = {resource}")).await, 0);
        assert_eq!(count(&app, &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {paid} AND refunded_at IS NOT NULL")).await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 1);
        assert_eq!(app.gateway_charges().await, 1);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM sandbox_ledger WHERE refunded_at IS NOT NULL").await, 1);
        app.assert_audit_ok();
    }

    async fn paying_and_cancelling_at_once_always_ends_consistent(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend), ("COZY_GATEWAY_DELAY_MS", "50")]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 30, 600).await;
        let token = app.user("ann@example.com").await;
        let mut ids = Vec::new();
        for _ in 0..15 {
            ids.push(app.reserve(&token, resource, 2).await);
        }

        // For each reservation a pay and a cancel fly together; the cancel is sent a little later for some,
        // so the races land before, during and after the gateway call.
        let tasks: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let (app, token) = (app.clone(), token.clone());
                tokio::spawn(async move {
                    let pay_key = format!("pay-{id}");
                    let pay = app.pay(&token, id, "sandbox_ok", &pay_key);
                    let cancel = async {
                        tokio::time::sleep(std::time::Duration::from_millis((i as u64 % 5) * 25)).await;
                        app.cancel(&token, id, &format!("cancel-{id}")).await
                    };
                    let (pay, cancel) = futures::join!(pay, cancel);
                    (id, pay, cancel)
                })
            })
            .collect();
        let results: Vec<(i64, Resp, Resp)> = futures::future::join_all(tasks).await.into_iter().map(Result::unwrap).collect();

        let mut paid_then_cancelled = 0;
        for (id, pay, cancel) in &results {
            let id = *id;
            // Cancelling is allowed from RESERVED and from PAID, so it always wins in the end.
            assert_eq!(cancel.status, StatusCode::OK, "cancel of {id}: {}", cancel.body);
            let now = app.get(&format!("/v1/reservations/{id}"), &token).await;
            assert_eq!(now.body["state"], "CANCELLED", "{}", now.body);
            let charges = count(&app, &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {id}")).await;
            let refunded = count(&app, &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {id} AND refunded_at IS NOT NULL")).await;
            let ledger = count(&app, &format!("SELECT COUNT(*) FROM sandbox_ledger WHERE idem_key = 'cozy-reservation-{id}'")).await;
            let ledger_live = count(&app, &format!("SELECT COUNT(*) FROM sandbox_ledger WHERE idem_key = 'cozy-reservation-{id}' AND refunded_at IS NULL")).await;
            assert!(ledger <= 1, "reservation {id} charged {ledger} times at the gateway");
            assert_eq!(ledger_live, 0, "reservation {id} is cancelled but the gateway kept its money");
            match pay.status {
                StatusCode::OK => {
                    // Paid first, then cancelled: one charge, refunded.
                    assert_eq!(pay.body["state"], "PAID");
                    assert_eq!((charges, refunded, ledger), (1, 1, 1), "reservation {id}");
                    assert_eq!(cancel.body["payment"]["id"], pay.body["payment"]["id"]);
                    paid_then_cancelled += 1;
                }
                StatusCode::CONFLICT => {
                    // Cancelled first (before or during the gateway call): no charge recorded.
                    assert_eq!(pay.code(), "invalid_transition", "{}", pay.body);
                    assert_eq!(pay.body["from"], "CANCELLED", "{}", pay.body);
                    assert_eq!(charges, 0, "reservation {id} lost the race but has a charge");
                    assert!(cancel.body["payment"].is_null(), "{}", cancel.body);
                }
                other => panic!("pay of {id}: unexpected {other} {}", pay.body),
            }
            let events = app.get(&format!("/v1/reservations/{id}/events"), &token).await;
            let states: Vec<String> = events.body["items"].as_array().unwrap().iter().map(|e| e["to"].as_str().unwrap().to_string()).collect();
            if pay.status == StatusCode::OK {
                assert_eq!(states, ["RESERVED", "PAID", "CANCELLED"]);
            } else {
                assert_eq!(states, ["RESERVED", "CANCELLED"]);
            }
        }
        eprintln!("{paid_then_cancelled} of {} reservations were paid before the cancel landed", results.len());

        assert_eq!(available(&app, &token, resource).await, 30);
        assert_eq!(count(&app, &format!("SELECT held FROM resources WHERE id = {resource}")).await, 0);
        let report = app.assert_audit_ok();
        assert_eq!(report["reservations"]["CANCELLED"], 15);
        assert_eq!(report["orphan_charges"], 0);
        assert_eq!(report["double_charges"], 0);
    }
}
