//! kill -9 in the middle of payments and reservations, restart on the same database, and let every client
//! retry until it gets a definite answer: nothing is lost, nothing happens twice, the audit stays clean.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{busy_pool, send_request, Resp, TestApp};

/// Where the server listens right now, like a stable address in front of it: a restart binds a new port
/// and the test points the clients there.
#[derive(Clone)]
struct Endpoint {
    client: reqwest::Client,
    base: Arc<RwLock<String>>,
}

impl Endpoint {
    fn new(app: &TestApp) -> Self {
        Endpoint {
            client: app.client.clone(),
            base: Arc::new(RwLock::new(app.base.clone())),
        }
    }

    fn moved_to(&self, base: &str) {
        *self.base.write().unwrap() = base.to_string();
    }

    async fn post(
        &self,
        path: &str,
        token: &str,
        key: &str,
        body: Value,
    ) -> Result<Resp, reqwest::Error> {
        let base = self.base.read().unwrap().clone();
        send_request(
            &self.client,
            &base,
            Method::POST,
            path,
            Some(token),
            Some(key),
            Some(body),
        )
        .await
    }
}

/// What a retrying client went through.
struct Attempts {
    answer: Resp,
    connection_errors: usize,
}

/// How a client picks the Idempotency-Key of each attempt.
#[derive(Clone)]
enum Keys {
    Same(String),
    New(String),
}

/// Sends the request until a definite answer: retries connection errors (the server is dead or
/// restarting), 409 `idempotency_key_in_use` (after its Retry-After) and 502 `payment_unavailable`.
async fn until_definite(
    ep: Endpoint,
    path: String,
    token: String,
    keys: Keys,
    body: Value,
) -> Attempts {
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut connection_errors = 0;
    for attempt in 0.. {
        assert!(
            Instant::now() < deadline,
            "{path}: no definite answer after {attempt} attempts"
        );
        let key = match &keys {
            Keys::Same(k) => k.clone(),
            Keys::New(prefix) => format!("{prefix}-{attempt}"),
        };
        match ep.post(&path, &token, &key, body.clone()).await {
            Err(_) => {
                connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(r) if r.status == StatusCode::CONFLICT && r.code() == "idempotency_key_in_use" => {
                let secs: u64 = r
                    .header("retry-after")
                    .unwrap_or_else(|| {
                        panic!("409 idempotency_key_in_use without Retry-After: {}", r.body)
                    })
                    .parse()
                    .expect("Retry-After in seconds");
                assert!(secs <= 60, "Retry-After {secs}");
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            Ok(r) if r.status == StatusCode::BAD_GATEWAY => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(answer) => {
                return Attempts {
                    answer,
                    connection_errors,
                }
            }
        }
    }
    unreachable!()
}

async fn count(pool: &sqlx::AnyPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// 40 reservations over 4 users, their pays fired at once, the server killed while they are in flight
/// (150 ms later, or as soon as the gateway charged the first one), restarted, and every client retrying
/// (with its first key, or a new key per attempt) until it has a definite answer.
async fn crash_during_payments(
    backend: crate::helpers::Backend,
    new_keys: bool,
    kill_after_first_charge: bool,
) {
    let mut app = TestApp::spawn_with(
        backend,
        &[
            busy_pool(backend),
            ("COZY_GATEWAY_DELAY_MS", "300"),
            ("COZY_IDEMPOTENCY_LEASE_SECS", "1"),
        ],
    )
    .await;
    let admin = app.admin().await;
    let resource = app.resource(&admin, 100, 600).await;
    let mut tokens = Vec::new();
    for u in 0..4 {
        tokens.push(app.user(&format!("payer{u}@example.com")).await);
    }
    let reservations: Vec<(String, i64)> = futures::future::join_all((0..40).map(|i| {
        let token = tokens[i % 4].clone();
        let app = &app;
        async move { (token.clone(), app.reserve(&token, resource, 1).await) }
    }))
    .await;

    let ep = Endpoint::new(&app);
    let clients: Vec<_> = reservations
        .iter()
        .enumerate()
        .map(|(i, (token, id))| {
            let keys = if new_keys {
                Keys::New(format!("pay-{id}"))
            } else {
                Keys::Same(format!("pay-{id}"))
            };
            // When killing at the first charge, spread the first attempts over 200 ms so the crash finds
            // payments at every stage: not sent yet, waiting for the gateway, charged but not recorded.
            let start = if kill_after_first_charge {
                Duration::from_millis(5 * i as u64)
            } else {
                Duration::ZERO
            };
            let client = until_definite(
                ep.clone(),
                format!("/v1/reservations/{id}/pay"),
                token.clone(),
                keys,
                json!({"payment_method": "sandbox_ok"}),
            );
            tokio::spawn(async move {
                tokio::time::sleep(start).await;
                client.await
            })
        })
        .collect();

    let pool = app.db.pool().await;
    if kill_after_first_charge {
        // Kill as soon as the gateway has charged someone: the others are mid-flight at every stage.
        let deadline = Instant::now() + Duration::from_secs(15);
        while count(&pool, "SELECT COUNT(*) FROM sandbox_ledger").await == 0 {
            assert!(Instant::now() < deadline, "no payment reached the gateway");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    app.kill9();
    let paid_at_crash = count(
        &pool,
        "SELECT COUNT(*) FROM reservations WHERE state = 'PAID'",
    )
    .await;
    let charged_at_crash = count(&pool, "SELECT COUNT(*) FROM sandbox_ledger").await;
    eprintln!("at the crash: {paid_at_crash} PAID, {charged_at_crash} charged by the gateway");
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.start().await;
    ep.moved_to(&app.base);

    let outcomes: Vec<Attempts> = futures::future::join_all(clients)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let connection_errors: usize = outcomes.iter().map(|o| o.connection_errors).sum();
    assert!(
        connection_errors > 0,
        "the crash did not interrupt any request; the test proves nothing"
    );
    assert!(
        paid_at_crash < 40,
        "every payment finished before the crash; the test proves nothing"
    );

    for ((token, id), outcome) in reservations.iter().zip(&outcomes) {
        let r = &outcome.answer;
        if new_keys && r.status == StatusCode::CONFLICT {
            // A retry under a new key after an attempt that did pay: refused as already PAID.
            assert_eq!(
                r.code(),
                "invalid_transition",
                "reservation {id}: {}",
                r.body
            );
            assert_eq!(r.body["from"], "PAID", "reservation {id}: {}", r.body);
        } else {
            assert_eq!(r.status, StatusCode::OK, "reservation {id}: {}", r.body);
            assert_eq!(r.body["state"], "PAID");
        }
        let now = app.get(&format!("/v1/reservations/{id}"), token).await;
        assert_eq!(now.body["state"], "PAID", "reservation {id}: {}", now.body);
        assert!(now.body["payment"].is_object(), "{}", now.body);
        assert_eq!(
            count(
                &pool,
                &format!("SELECT COUNT(*) FROM charges WHERE reservation_id = {id}")
            )
            .await,
            1,
            "reservation {id}"
        );
        assert_eq!(
            count(&pool, &format!("SELECT COUNT(*) FROM sandbox_ledger WHERE idem_key = 'cozy-reservation-{id}' AND refunded_at IS NULL")).await,
            1,
            "reservation {id}"
        );
        assert_eq!(
            count(&pool, &format!("SELECT COUNT(*) FROM reservation_events WHERE reservation_id = {id} AND to_state = 'PAID'")).await,
            1,
            "reservation {id}"
        );
    }
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM reservations WHERE state = 'PAID'"
        )
        .await,
        40
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM charges").await, 40);
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM sandbox_ledger").await,
        40
    );
    pool.close().await;
    let report = app.assert_audit_ok();
    assert_eq!(report["charges"], 40);
    assert_eq!(report["double_charges"], 0);
    assert_eq!(report["orphan_charges"], 0);
}

backend_tests! {
    async fn killed_mid_payment_and_retried_with_the_same_keys_every_reservation_is_paid_once(backend) {
        crash_during_payments(backend, false, false).await;
    }

    async fn killed_mid_payment_and_retried_with_new_keys_every_reservation_is_paid_once(backend) {
        crash_during_payments(backend, true, true).await;
    }

    async fn killed_after_the_first_charge_and_retried_with_the_same_keys_nothing_is_charged_twice(backend) {
        crash_during_payments(backend, false, true).await;
    }

    async fn killed_mid_reservation_and_retried_with_the_same_keys_each_key_reserves_once(backend) {
        let mut app = TestApp::spawn_with(backend, &[busy_pool(backend), ("COZY_IDEMPOTENCY_LEASE_SECS", "1")]).await;
        let admin = app.admin().await;
        // Capacity is exactly the number of keys: a duplicate would push someone into sold_out.
        let (users, per_user) = (5, 30);
        let resource = app.resource(&admin, users * per_user, 600).await;
        let mut tokens = Vec::new();
        for u in 0..users {
            tokens.push(app.user(&format!("reserver{u}@example.com")).await);
        }

        let ep = Endpoint::new(&app);
        let mut requests = Vec::new();
        for i in 0..per_user {
            for (u, token) in tokens.iter().enumerate() {
                requests.push((u, token.clone(), format!("reserve-{u}-{i}")));
            }
        }
        let clients: Vec<_> = requests
            .iter()
            .map(|(_, token, key)| {
                tokio::spawn(until_definite(
                    ep.clone(),
                    "/v1/reservations".to_string(),
                    token.clone(),
                    Keys::Same(key.clone()),
                    json!({"resource_id": resource, "quantity": 1}),
                ))
            })
            .collect();

        // Kill once some reservations are committed and most are not.
        let pool = app.db.pool().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while count(&pool, "SELECT COUNT(*) FROM reservations").await < 10 {
            assert!(Instant::now() < deadline, "reservations never started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        app.kill9();
        let at_crash = count(&pool, "SELECT COUNT(*) FROM reservations").await;
        eprintln!("at the crash: {at_crash} of {} reservations committed", requests.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.start().await;
        ep.moved_to(&app.base);

        let outcomes: Vec<Attempts> = futures::future::join_all(clients).await.into_iter().map(Result::unwrap).collect();
        let connection_errors: usize = outcomes.iter().map(|o| o.connection_errors).sum();
        assert!(connection_errors > 0, "the crash did not interrupt any request; the test proves nothing");

        let user_ids: Vec<i64> = {
            let mut v = Vec::new();
            for u in 0..users {
                v.push(count(&pool, &format!("SELECT id FROM users WHERE email = 'reserver{u}@example.com'")).await);
            }
            v
        };
        for ((u, _, key), outcome) in requests.iter().zip(&outcomes) {
            let r = &outcome.answer;
            assert_eq!(r.status, StatusCode::CREATED, "key {key}: {}", r.body);
            let user_id = user_ids[*u];
            assert_eq!(r.body["user_id"], user_id);
            let rows = count(&pool, &format!("SELECT COUNT(*) FROM reservations WHERE user_id = {user_id} AND request_key = '{key}'")).await;
            assert_eq!(rows, 1, "key {key} made {rows} reservations");
            let stored = count(&pool, &format!("SELECT id FROM reservations WHERE user_id = {user_id} AND request_key = '{key}'")).await;
            assert_eq!(r.id(), stored, "key {key} answered another reservation than the one it made");
        }
        let total = users * per_user;
        assert_eq!(count(&pool, "SELECT COUNT(*) FROM reservations").await, total);
        assert_eq!(count(&pool, "SELECT COUNT(*) FROM reservation_events").await, total);
        assert_eq!(count(&pool, &format!("SELECT held FROM resources WHERE id = {resource}")).await, total);
        pool.close().await;
        let left = app.get(&format!("/v1/resources/{resource}"), &admin).await;
        assert_eq!(left.body["available"], 0);
        let report = app.assert_audit_ok();
        assert_eq!(report["reservations"]["RESERVED"], total);
        assert_eq!(report["oversold_resources"], 0);
    }
}
