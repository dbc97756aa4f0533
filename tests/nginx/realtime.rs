//! WebSockets through the rendered nginx: the upgrade location, least_conn spreading connections over
//! both app hosts, the fan-out between them (Redis), and `realtime_timeout` against cozy's heartbeat.

use std::time::Duration;

use serde_json::json;

use crate::estate::Estate;
use crate::helpers::random_suffix;
use crate::ws::{seq, Ws};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_published_through_nginx_on_one_upstream_reaches_a_client_on_the_other() {
    let est = Estate::builder().start().await;
    let port = est.nginx.http;
    let ada = est.app.user("ada@example.com").await;
    let bob = est.app.user("bob@example.com").await;

    let (ada_id, bob_id) = (
        format!("ws-ada-{}", random_suffix()),
        format!("ws-bob-{}", random_suffix()),
    );
    let mut a = Ws::open(port, &ada, Some(&ada_id)).await.unwrap();
    // A request in between: round-robin would now send the next connection back to Ada's host;
    // least_conn sends it to the host with no open connection.
    let probe = est.app.get("/openapi.json", &ada).await;
    assert!(probe.status.is_success(), "{} {}", probe.status, probe.body);
    let mut b = Ws::open(port, &bob, Some(&bob_id)).await.unwrap();
    let room = "chat:lobby";
    a.subscribe(room, None).await;
    b.subscribe(room, None).await;
    let (a_user, b_user) = (a.welcome["user_id"].clone(), b.welcome["user_id"].clone());

    let first = b
        .publish(room, "b-1", json!({"text": "hello from bob"}))
        .await;
    let second = a.publish(room, "a-1", json!({"text": "hi bob"})).await;
    assert_eq!(
        (seq(&first), seq(&second)),
        (1, 2),
        "seq is per room, from 1, without gaps"
    );
    // Each sees both, in seq order, whichever host it is on.
    for ws in [&mut a, &mut b] {
        let one = ws.message(room).await;
        let two = ws.message(room).await;
        assert_eq!((seq(&one), seq(&two)), (1, 2), "{one} {two}");
        assert_eq!(one["body"], json!({"text": "hello from bob"}));
        assert_eq!(one["client_msg_id"], "b-1");
        assert_eq!(one["user_id"], b_user);
        assert_eq!(two["client_msg_id"], "a-1");
        assert_eq!(two["user_id"], a_user);
    }

    a.close().await;
    b.close().await;
    // nginx logs a WebSocket when it ends: the two went to different app hosts.
    let line_a = est
        .nginx
        .access_line("ada's WebSocket", |l| l["request_id"] == ada_id.as_str());
    let line_b = est
        .nginx
        .access_line("bob's WebSocket", |l| l["request_id"] == bob_id.as_str());
    for line in [&line_a, &line_b] {
        assert_eq!(line["status"], 101, "{line}");
        assert_eq!(line["uri"], "/v1/realtime", "{line}");
    }
    let mut upstreams = vec![
        line_a["upstream_addr"].as_str().unwrap().to_string(),
        line_b["upstream_addr"].as_str().unwrap().to_string(),
    ];
    upstreams.sort();
    let mut ours = vec![est.upstream(0), est.upstream(1)];
    ours.sort();
    assert_eq!(
        upstreams, ours,
        "one connection on each app host (least_conn)"
    );
    // cozy logged each upgrade under the id the client sent, on the host nginx names.
    for (id, line) in [(&ada_id, &line_a), (&bob_id, &line_b)] {
        let cozy = est.cozy_lines(id);
        assert_eq!(cozy.len(), 1, "{id} in cozy's logs once: {cozy:?}");
        let host = est.daemons.iter().find(|d| d.name == cozy[0].0).unwrap();
        assert_eq!(line["upstream_addr"], host.addr.to_string(), "{cozy:?}");
        assert_eq!(cozy[0].1["status"], 101, "{cozy:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_websocket_outlives_realtime_timeout_because_cozy_pings_it() {
    // app1 pings every 500 ms; app2 practically never, so nginx's 2 s read timeout ends its connections:
    // the control that shows the timeout is real.
    let est = Estate::builder()
        .nginx("realtime_timeout: 2s")
        .daemon_env(0, "COZY_REALTIME_HEARTBEAT_MS", "500")
        .daemon_env(1, "COZY_REALTIME_HEARTBEAT_MS", "600000")
        .start()
        .await;
    let port = est.nginx.http;
    let ada = est.app.user("ada@example.com").await;

    let first = Ws::open(port, &ada, None).await.unwrap();
    let second = Ws::open(port, &ada, None).await.unwrap();
    let (mut pinged, mut silent) = if first.heartbeat_ms() == 500 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        pinged.heartbeat_ms(),
        500,
        "one connection on app1: {}",
        pinged.welcome
    );
    assert_eq!(
        silent.heartbeat_ms(),
        600_000,
        "one on app2: {}",
        silent.welcome
    );
    pinged.subscribe("chat:pinged", None).await;
    silent.subscribe("chat:silent", None).await;

    let quiet = Duration::from_secs(5);
    let (p, s) = tokio::join!(pinged.idle(quiet), silent.idle(quiet));
    let frames = p.unwrap_or_else(|after| {
        panic!("the pinged connection was closed after {after:?} of silence")
    });
    assert!(
        frames.is_empty(),
        "no frame in the silence (pings are not frames): {frames:?}"
    );
    let cut = s.expect_err("a connection without pings outlived realtime_timeout (2 s)");
    assert!(
        cut >= Duration::from_millis(1500) && cut < Duration::from_millis(4500),
        "nginx ends a silent WebSocket after realtime_timeout (2 s), not after {cut:?}"
    );

    // Still usable after 5 s.
    let ack = pinged
        .publish("chat:pinged", "after-silence", json!("still here"))
        .await;
    assert_eq!(seq(&ack), 1, "{ack}");
}
