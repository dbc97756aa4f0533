//! One app host dies (kill -9, no goodbye) behind the rendered nginx: safe requests go on to the other
//! (`proxy_next_upstream error timeout`), a POST already sent is never sent again elsewhere (nginx's rule
//! for non-idempotent methods; the template adds no `non_idempotent`), Idempotency-Keys make a client's
//! retry create exactly one reservation, and WebSocket clients reconnect through nginx and resume.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::estate::Estate;
use crate::helpers::{send_request, Resp, TestApp};
use crate::ws::{seq, Ws};

/// An answer nginx gives when an upstream died under a request: its own problem+json 502 (or a 503/504),
/// with Retry-After.
fn assert_clean_failure(r: &Resp, what: &str) {
    assert!(
        [502, 503, 504].contains(&r.status.as_u16()),
        "{what}: {} {}",
        r.status,
        r.body
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{what}"
    );
    assert_eq!(r.code(), "unavailable", "{what}: {}", r.body);
    assert!(r.header("retry-after").is_some(), "{what}: Retry-After");
}

/// POSTs `path` with `key` until it is settled: past a 502/503 (the proxy, a dead host) and past a 409
/// `idempotency_key_in_use` (the key's lease, held by a request that died with its host, has to run out).
async fn retry(app: &TestApp, token: &str, path: &str, key: &str, body: Value) -> Resp {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = send_request(
            &app.client,
            &app.base,
            Method::POST,
            path,
            Some(token),
            Some(key),
            Some(body.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{path} {key}: nginx did not answer: {e}"));
        let again = r.status == StatusCode::CONFLICT && r.code() == "idempotency_key_in_use"
            || r.status.is_server_error();
        if !again || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gets_keep_succeeding_through_nginx_when_an_upstream_is_killed() {
    let mut est = Estate::builder().start().await;
    let admin = est.app.admin().await;
    let resource = est.app.resource(&admin, 5, 600).await;
    let path = format!("/v1/resources/{resource}");
    // Both hosts have served (and nginx keeps idle connections to both).
    for _ in 0..6 {
        let r = est.app.get(&path, &admin).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }

    est.daemons[0].kill9();
    let mut failed = Vec::new();
    for i in 0..50 {
        match send_request(
            &est.app.client,
            &est.app.base,
            Method::GET,
            &path,
            Some(&admin),
            None,
            None,
        )
        .await
        {
            Ok(r) if r.status == StatusCode::OK && r.body["id"] == resource => {}
            Ok(r) => failed.push(format!("#{i}: {} {}", r.status, r.body)),
            Err(e) => failed.push(format!("#{i}: {e}")),
        }
    }
    assert!(
        failed.is_empty(),
        "GETs failed after app1 died: {failed:#?}"
    );

    // nginx met the dead host and went on to the other within the same request.
    let dead = est.upstream(0);
    let alive = est.upstream(1);
    let log = est.nginx.access_log();
    let retried: Vec<&Value> = log
        .iter()
        .filter(|l| {
            let ups = l["upstream_addr"].as_str().unwrap_or("");
            ups.starts_with(&format!("{dead}, ")) && ups.ends_with(&alive)
        })
        .collect();
    assert!(
        !retried.is_empty(),
        "no request was passed from {dead} to {alive}: {log:#?}"
    );
    for line in &retried {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["method"], "GET", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_in_flight_on_a_killed_upstream_fails_cleanly_and_is_never_resent_to_the_other() {
    // app1's gateway takes 10 s: a payment sent there is still in flight when app1 dies.
    let mut est = Estate::builder()
        .env("COZY_IDEMPOTENCY_LEASE_SECS", "2")
        .daemon_env(0, "COZY_GATEWAY_DELAY_MS", "10000")
        .start()
        .await;
    let admin = est.app.admin().await;
    let resource = est.app.resource(&admin, 10, 600).await;
    let ada = est.app.user("ada@example.com").await;
    let mut reservations = Vec::new();
    for _ in 0..4 {
        reservations.push(est.app.reserve(&ada, resource, 1).await);
    }

    // Four payments at once: least_conn sends some to each host.
    let started = Instant::now();
    let pays: Vec<_> = reservations
        .iter()
        .map(|&id| {
            let (client, base, token) = (est.app.client.clone(), est.app.base.clone(), ada.clone());
            tokio::spawn(async move {
                let key = format!("pay-{id}");
                let r = send_request(
                    &client,
                    &base,
                    Method::POST,
                    &format!("/v1/reservations/{id}/pay"),
                    Some(&token),
                    Some(&key),
                    Some(json!({"payment_method": "sandbox_ok"})),
                )
                .await;
                (id, key, r)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    est.daemons[0].kill9();
    let mut in_flight = Vec::new();
    for pay in pays {
        let (id, key, r) = pay.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("pay {id}: nginx did not answer: {e}"));
        if r.status == StatusCode::OK {
            assert_eq!(r.body["state"], "PAID", "{}", r.body);
        } else {
            assert_clean_failure(&r, &format!("pay {id}, in flight on the killed host"));
            in_flight.push((id, key, r));
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the payments on app1 failed when app1 died, not when its gateway would have answered"
    );
    assert!(
        !in_flight.is_empty(),
        "no payment went to app1 (least_conn should have spread four at once)"
    );
    let paid = reservations.len() - in_flight.len();
    // Had nginx resent a payment to app2, app2 would have charged it.
    assert_eq!(
        est.app.gateway_charges().await,
        paid as i64,
        "only the payments that succeeded charged"
    );
    let log = est.nginx.access_log();
    for (id, _, r) in &in_flight {
        let request_id = r.header("x-request-id").unwrap();
        let line = log
            .iter()
            .find(|l| l["request_id"] == request_id)
            .unwrap_or_else(|| panic!("no access log line for pay {id}"));
        assert_eq!(
            line["upstream_addr"],
            est.upstream(0),
            "pay {id} was sent to app1 only: {line}"
        );
        assert_eq!(line["status"], 502, "{line}");
    }

    // The client retries with the same key: exactly one charge per reservation.
    for (id, key, _) in &in_flight {
        let r = retry(
            &est.app,
            &ada,
            &format!("/v1/reservations/{id}/pay"),
            key,
            json!({"payment_method": "sandbox_ok"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "retried pay {id}: {}", r.body);
        assert_eq!(r.body["state"], "PAID");
    }
    assert_eq!(
        est.app.gateway_charges().await,
        reservations.len() as i64,
        "one charge per reservation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_posted_around_a_kill_make_one_row_per_idempotency_key() {
    let mut est = Estate::builder()
        .env("COZY_IDEMPOTENCY_LEASE_SECS", "2")
        .start()
        .await;
    let admin = est.app.admin().await;
    let resource = est.app.resource(&admin, 1000, 600).await;
    let ada = est.app.user("ada@example.com").await;
    let body = json!({"resource_id": resource, "quantity": 1});

    // Three clients post reservations, each with keys of its own; app1 dies after the first few.
    let done = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (client, base, token, body, done) = (
                est.app.client.clone(),
                est.app.base.clone(),
                ada.clone(),
                body.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for n in 0..12 {
                    let key = format!("reserve-{w}-{n}");
                    let r = send_request(
                        &client,
                        &base,
                        Method::POST,
                        "/v1/reservations",
                        Some(&token),
                        Some(&key),
                        Some(body.clone()),
                    )
                    .await;
                    done.fetch_add(1, Ordering::SeqCst);
                    outcomes.push((key, r));
                }
                outcomes
            })
        })
        .collect();
    while done.load(Ordering::SeqCst) < 6 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    est.daemons[0].kill9();
    let mut outcomes = Vec::new();
    for w in writers {
        outcomes.extend(w.await.unwrap());
    }

    let mut created = Vec::new();
    let mut failed = Vec::new();
    for (key, r) in outcomes {
        let r = r.unwrap_or_else(|e| panic!("{key}: nginx did not answer: {e}"));
        if r.status == StatusCode::CREATED {
            created.push((key, r.id()));
        } else {
            assert_clean_failure(&r, &key);
            failed.push(key);
        }
    }
    eprintln!(
        "{} reservations created, {} failed cleanly around the kill",
        created.len(),
        failed.len()
    );

    let rows = |db: &crate::helpers::TestDb| {
        let url = db.url.clone();
        async move {
            let pool = sqlx::MySqlPool::connect(&url).await.unwrap();
            // request_key is ascii_bin: VARBINARY to the driver.
            let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "SELECT request_key, COUNT(*) FROM reservations WHERE request_key IS NOT NULL \
                 GROUP BY user_id, request_key",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows.into_iter()
                .map(|(k, n)| (String::from_utf8(k).unwrap(), n))
                .collect::<BTreeMap<String, i64>>()
        }
    };
    let before = rows(&est.app.db).await;
    for (key, n) in &before {
        assert_eq!(*n, 1, "{key} made {n} reservations");
    }
    for (key, _) in &created {
        assert_eq!(before.get(key), Some(&1), "{key} answered 201");
    }

    // A client retries what failed: each key ends with exactly one reservation.
    for key in &failed {
        let r = retry(&est.app, &ada, "/v1/reservations", key, body.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "retried {key}: {}", r.body);
    }
    let after = rows(&est.app.db).await;
    assert_eq!(after.len(), 36, "one reservation per key: {after:?}");
    assert!(after.values().all(|n| *n == 1), "{after:?}");
    let reserved = est.app.db.scalar("SELECT COUNT(*) FROM reservations").await;
    assert_eq!(reserved, 36, "no reservation without its key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_on_a_killed_upstream_reconnects_through_nginx_and_resumes_without_gap() {
    let mut est = Estate::builder().start().await;
    let port = est.nginx.http;
    let ada = est.app.user("ada@example.com").await;
    let bob = est.app.user("bob@example.com").await;
    let room = "chat:resume";

    // One connection on each host (least_conn); which is which shows when app1 dies.
    let mut one = Ws::open(port, &ada, None).await.unwrap();
    let mut two = Ws::open(port, &bob, None).await.unwrap();
    one.subscribe(room, None).await;
    two.subscribe(room, None).await;
    let mut seen: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (n, ws) in [&mut one, &mut two].into_iter().enumerate() {
        ws.publish(room, &format!("before-{n}"), json!(n)).await;
    }
    for (name, ws) in [("one", &mut one), ("two", &mut two)] {
        for _ in 0..2 {
            let m = ws.message(room).await;
            seen.entry(name).or_default().push(seq(&m));
        }
    }

    est.daemons[0].kill9();
    let (closed_one, closed_two) = tokio::join!(
        one.closed_within(Duration::from_secs(3)),
        two.closed_within(Duration::from_secs(3))
    );
    assert!(
        closed_one != closed_two,
        "exactly one client was on app1 (one closed: {closed_one}, two closed: {closed_two})"
    );
    let (victim_name, victim_token, mut survivor) = if closed_one {
        ("one", &ada, two)
    } else {
        ("two", &bob, one)
    };
    let mut last = *seen[victim_name].iter().max().unwrap();
    assert_eq!(last, 2, "{seen:?}");

    // Published while the victim is away.
    let mut meanwhile = Vec::new();
    for n in 0..4 {
        let ack = survivor
            .publish(room, &format!("meanwhile-{n}"), json!(n))
            .await;
        meanwhile.push(seq(&ack));
    }
    assert_eq!(meanwhile, [3, 4, 5, 6]);

    // The victim comes back through nginx (to app2: app1 is gone) and resumes from its last seq.
    let mut back = Ws::open(port, victim_token, None)
        .await
        .unwrap_or_else(|e| panic!("reconnect through nginx: {e}"));
    let (subscribed, replay) = back.subscribe(room, Some(last)).await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
    let replayed: Vec<u64> = replay.iter().map(seq).collect();
    assert_eq!(
        replayed, meanwhile,
        "the replay is what was missed, in order"
    );
    for (m, n) in replay.iter().zip(0..) {
        assert_eq!(m["client_msg_id"], format!("meanwhile-{n}"), "{m}");
    }
    last = *replayed.last().unwrap();

    // And live delivery goes on after the replay, with no duplicate.
    let ack = survivor.publish(room, "after", json!("after")).await;
    let live = back.message(room).await;
    assert_eq!(seq(&live), seq(&ack));
    assert_eq!(
        seq(&live),
        last + 1,
        "no gap, no duplicate after the resume"
    );
}
