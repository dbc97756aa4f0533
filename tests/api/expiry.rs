//! Holds that run out (http-api.md, "Reservations"): an overdue hold is EXPIRED as soon as anyone looks,
//! is written so by that very request, never blocks capacity, cannot be paid, and `cozy sweep` expires the
//! ones nobody looked at — exactly once, even with several sweepers at the same time.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{busy_pool, Resp, TestApp};

/// Longer than a 1-second hold, measured from after the reservation answered.
const PAST_HOLD: Duration = Duration::from_millis(1200);

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.db.scalar(sql).await
}

async fn stored_state(app: &TestApp, id: i64) -> String {
    let pool = app.db.pool().await;
    let s: String = sqlx::query_scalar(&format!("SELECT state FROM reservations WHERE id = {id}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    s
}

async fn available(app: &TestApp, token: &str, resource: i64) -> i64 {
    let r = app.get(&format!("/v1/resources/{resource}"), token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["available"].as_i64().unwrap()
}

/// Capacity held over all resources (the `held` counters).
async fn total_held(app: &TestApp) -> i64 {
    let int = match app.db.backend {
        crate::helpers::Backend::MySql => "SIGNED",
        crate::helpers::Backend::Sqlite => "INTEGER",
    };
    count(
        app,
        &format!("SELECT CAST(COALESCE(SUM(held), 0) AS {int}) FROM resources"),
    )
    .await
}

/// The `(from, to)` pairs of a reservation's events, through the API.
async fn transitions(app: &TestApp, token: &str, id: i64) -> Vec<(Value, Value)> {
    let r = app
        .get(&format!("/v1/reservations/{id}/events"), token)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["from"].clone(), e["to"].clone()))
        .collect()
}

fn reserved_then_expired() -> Vec<(Value, Value)> {
    vec![
        (Value::Null, json!("RESERVED")),
        (json!("RESERVED"), json!("EXPIRED")),
    ]
}

fn report(out: &std::process::Output) -> Value {
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

/// `n` one-second holds of one user, each on its own capacity-1 resource (so that reserving one never
/// expires another on the way), all overdue when this returns and none written EXPIRED yet.
async fn overdue_holds(app: &Arc<TestApp>, n: usize) -> (String, Vec<i64>) {
    let admin = app.admin().await;
    let token = app.user("ann@example.com").await;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (app, admin, token) = (app.clone(), admin.clone(), token.clone());
            tokio::spawn(async move {
                let resource = app.resource(&admin, 1, 1).await;
                app.reserve(&token, resource, 1).await
            })
        })
        .collect();
    let ids: Vec<i64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    tokio::time::sleep(PAST_HOLD).await;
    assert_eq!(
        count(
            app,
            "SELECT COUNT(*) FROM reservations WHERE state = 'RESERVED'"
        )
        .await,
        n as i64
    );
    (token, ids)
}

/// Every reservation in `ids` has exactly one event, RESERVED→EXPIRED, and there are no others.
async fn expired_exactly_once(app: &TestApp, ids: &[i64]) {
    for id in ids {
        assert_eq!(
            count(app, &format!("SELECT COUNT(*) FROM reservation_events WHERE reservation_id = {id} AND to_state = 'EXPIRED' AND from_state = 'RESERVED'")).await,
            1,
            "reservation {id}"
        );
    }
    assert_eq!(
        count(
            app,
            "SELECT COUNT(*) FROM reservation_events WHERE to_state = 'EXPIRED'"
        )
        .await,
        ids.len() as i64
    );
}

backend_tests! {
    async fn reading_an_overdue_hold_expires_it_and_stores_that(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 3, 1).await;
        let token = app.user("ann@example.com").await;
        let id = app.reserve(&token, resource, 2).await;
        assert_eq!(available(&app, &token, resource).await, 1);

        tokio::time::sleep(PAST_HOLD).await;
        assert_eq!(stored_state(&app, id).await, "RESERVED", "nothing has written the hold yet");
        // Availability counts the overdue hold back even before anything wrote it EXPIRED.
        assert_eq!(available(&app, &token, resource).await, 3);

        let read = app.get(&format!("/v1/reservations/{id}"), &token).await;
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.body["state"], "EXPIRED", "{}", read.body);
        assert_eq!(stored_state(&app, id).await, "EXPIRED", "the read must store what it reported");
        assert_eq!(transitions(&app, &token, id).await, reserved_then_expired());
        assert_eq!(available(&app, &token, resource).await, 3);
        assert_eq!(count(&app, &format!("SELECT held FROM resources WHERE id = {resource}")).await, 0);

        // Paying it is refused as expired and charges nothing.
        let pay = app.pay(&token, id, "sandbox_ok", "late-pay").await;
        assert_eq!(pay.status, StatusCode::CONFLICT, "{}", pay.body);
        assert_eq!(pay.code(), "expired", "{}", pay.body);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 0);
        assert_eq!(app.gateway_charges().await, 0);
        let cancel = app.cancel(&token, id, "late-cancel").await;
        assert_eq!(cancel.status, StatusCode::CONFLICT, "{}", cancel.body);
        assert_eq!(cancel.code(), "invalid_transition");
        assert_eq!(cancel.body["from"], "EXPIRED");
        assert_eq!(stored_state(&app, id).await, "EXPIRED");
        assert_eq!(transitions(&app, &token, id).await, reserved_then_expired());
        app.assert_audit_ok();
    }

    async fn paying_an_overdue_hold_is_expired_whether_or_not_it_was_read(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 3, 1).await;
        let token = app.user("ann@example.com").await;
        let id = app.reserve(&token, resource, 1).await;
        tokio::time::sleep(PAST_HOLD).await;
        assert_eq!(stored_state(&app, id).await, "RESERVED");

        // The pay itself finds the hold overdue (nothing wrote it EXPIRED before).
        let first = app.pay(&token, id, "sandbox_ok", "pay-1").await;
        assert_eq!(first.status, StatusCode::CONFLICT, "{}", first.body);
        assert_eq!(first.code(), "expired");
        assert_eq!(stored_state(&app, id).await, "EXPIRED");
        // Now it is stored EXPIRED: paying again, under a new key, is the same refusal.
        let second = app.pay(&token, id, "sandbox_ok", "pay-2").await;
        assert_eq!(second.status, StatusCode::CONFLICT, "{}", second.body);
        assert_eq!(second.code(), "expired", "paying an expired hold is 409 expired: {}", second.body);
        let replay = app.pay(&token, id, "sandbox_ok", "pay-1").await;
        assert_eq!(replay.header("idempotent-replayed"), Some("true"));
        assert_eq!(replay.body, first.body);

        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 0);
        assert_eq!(app.gateway_charges().await, 0);
        assert_eq!(transitions(&app, &token, id).await, reserved_then_expired());
        app.assert_audit_ok();
    }

    async fn an_overdue_hold_never_blocks_a_new_reservation(backend) {
        let app = TestApp::spawn_with(backend, &[busy_pool(backend)]).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 1, 1).await;
        let ann = app.user("ann@example.com").await;
        let bob = app.user("bob@example.com").await;
        let held = app.reserve(&ann, resource, 1).await;
        let early = app.post("/v1/reservations", &bob, "bob-early", json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(early.status, StatusCode::CONFLICT, "{}", early.body);
        assert_eq!(early.code(), "sold_out");

        tokio::time::sleep(PAST_HOLD).await;
        assert_eq!(stored_state(&app, held).await, "RESERVED", "no sweep ran");
        let late = app.post("/v1/reservations", &bob, "bob-late", json!({"resource_id": resource, "quantity": 1})).await;
        assert_eq!(late.status, StatusCode::CREATED, "an overdue hold blocked capacity: {}", late.body);
        assert_eq!(stored_state(&app, held).await, "EXPIRED", "the reservation wrote the overdue hold EXPIRED");
        assert_eq!(transitions(&app, &ann, held).await, reserved_then_expired());
        assert_eq!(available(&app, &bob, resource).await, 0);
        assert_eq!(count(&app, &format!("SELECT held FROM resources WHERE id = {resource}")).await, 1);
        let report = app.assert_audit_ok();
        assert_eq!(report["oversold_resources"], 0);
    }

    async fn many_requests_on_one_overdue_hold_expire_it_exactly_once(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let admin = app.admin().await;
        let resource = app.resource(&admin, 2, 1).await;
        let token = app.user("ann@example.com").await;
        let bob = app.user("bob@example.com").await;
        let id = app.reserve(&token, resource, 2).await;
        tokio::time::sleep(PAST_HOLD).await;

        // Reads, payments, cancellations, listings and another user's reservation, all at once.
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let (app, token, bob) = (app.clone(), token.clone(), bob.clone());
                tokio::spawn(async move {
                    let r: Resp = match i % 6 {
                        0 | 1 => app.get(&format!("/v1/reservations/{id}"), &token).await,
                        2 => app.pay(&token, id, "sandbox_ok", &format!("pay-{i}")).await,
                        3 => app.cancel(&token, id, &format!("cancel-{i}")).await,
                        4 => app.get("/v1/reservations", &token).await,
                        _ => app.post("/v1/reservations", &bob, &format!("bob-{i}"), json!({"resource_id": resource, "quantity": 1})).await,
                    };
                    (i, r)
                })
            })
            .collect();
        let mut bob_got = 0;
        for (i, r) in futures::future::join_all(tasks).await.into_iter().map(Result::unwrap) {
            match i % 6 {
                0 | 1 => assert_eq!(r.body["state"], "EXPIRED", "{}", r.body),
                2 => assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "expired"), "{}", r.body),
                3 => {
                    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "invalid_transition"), "{}", r.body);
                    assert_eq!(r.body["from"], "EXPIRED");
                }
                4 => assert_eq!(r.body["items"][0]["state"], "EXPIRED", "{}", r.body),
                _ => {
                    if r.status == StatusCode::CREATED {
                        bob_got += 1;
                    } else {
                        assert_eq!(r.code(), "sold_out", "{}", r.body);
                    }
                }
            }
        }
        // The expired hold's two seats went to bob (more only if bob's own 1-second holds ran out meanwhile;
        // the audit below proves nothing was oversold either way).
        assert!(bob_got >= 2, "the expired hold's capacity was not given back: bob got {bob_got}");
        expired_exactly_once(&app, &[id]).await;
        assert_eq!(count(&app, "SELECT COUNT(*) FROM charges").await, 0);
        assert_eq!(app.gateway_charges().await, 0);
        app.assert_audit_ok();
    }

    async fn sweep_expires_overdue_holds_in_batches(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let (token, ids) = overdue_holds(&app, 10).await;
        // One live hold that the sweep must leave alone.
        let admin = app.login("admin@example.com", "admin password").await;
        let long = app.resource(&admin, 1, 600).await;
        let live = app.reserve(&token, long, 1).await;

        let swept = report(&app.cli_env(&["sweep", "--json", "--batch", "3"], &[]));
        assert_eq!(swept["expired"], 10, "{swept}");
        assert_eq!(swept["dry_run"], false);
        expired_exactly_once(&app, &ids).await;
        for id in &ids {
            assert_eq!(stored_state(&app, *id).await, "EXPIRED");
        }
        assert_eq!(stored_state(&app, live).await, "RESERVED");
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM reservation_events WHERE to_state = 'EXPIRED' AND cause LIKE '%sweep%'").await,
            10
        );
        assert_eq!(transitions(&app, &token, ids[0]).await, reserved_then_expired());

        let again = report(&app.cli_env(&["sweep", "--json", "--batch", "3"], &[]));
        assert_eq!(again["expired"], 0, "{again}");
        expired_exactly_once(&app, &ids).await;
        let report = app.assert_audit_ok();
        assert_eq!(report["reservations"]["EXPIRED"], 10);
        assert_eq!(report["reservations"]["RESERVED"], 1);
    }

    async fn sweep_dry_run_counts_and_changes_nothing(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let (_token, ids) = overdue_holds(&app, 10).await;
        let events_before = count(&app, "SELECT COUNT(*) FROM reservation_events").await;
        let held_before = total_held(&app).await;

        let dry = report(&app.cli_env(&["sweep", "--dry-run", "--json"], &[]));
        assert_eq!(dry["dry_run"], true, "{dry}");
        assert_eq!(dry["expired"], 10, "{dry}");
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations WHERE state = 'RESERVED'").await, 10);
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservation_events").await, events_before);
        assert_eq!(total_held(&app).await, held_before);

        let real = report(&app.cli_env(&["sweep", "--json"], &[]));
        assert_eq!(real["expired"], 10, "{real}");
        expired_exactly_once(&app, &ids).await;
        app.assert_audit_ok();
    }

    async fn two_sweeps_at_once_expire_each_hold_exactly_once(backend) {
        let app = Arc::new(TestApp::spawn_with(backend, &[busy_pool(backend)]).await);
        let (_token, ids) = overdue_holds(&app, 30).await;

        let children: Vec<_> = (0..2)
            .map(|_| app.cli_command(&["sweep", "--json", "--batch", "2"], &[]).spawn().expect("spawn cozy sweep"))
            .collect();
        let reports: Vec<Value> = children.into_iter().map(|c| report(&c.wait_with_output().unwrap())).collect();
        let total: i64 = reports.iter().map(|r| r["expired"].as_i64().unwrap()).sum();
        assert_eq!(total, 30, "sweeps reported {reports:?}");

        expired_exactly_once(&app, &ids).await;
        assert_eq!(count(&app, "SELECT COUNT(*) FROM reservations WHERE state = 'EXPIRED'").await, 30);
        assert_eq!(total_held(&app).await, 0);
        let report = app.assert_audit_ok();
        assert_eq!(report["reservations"]["EXPIRED"], 30);
    }
}
