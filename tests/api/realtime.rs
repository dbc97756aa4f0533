//! The realtime hub (realtime-protocol.md) seen from WebSocket clients: every row of the contract, then
//! its guarantees under stress — typing and presence, reservation frames after HTTP calls, `since` resync
//! under churn, ordering across workers, kill -9 of a worker, a slow consumer, and draining.
//!
//! [`WsClient`] is a plain tokio-tungstenite client that hides nothing (no reconnect, no dedupe); the
//! clients that must survive churn ([`Follow`], [`Publish`]) are written out below, doing what the
//! contract asks of a real client: reconnect, resubscribe with `since` = the last seq seen, resend an
//! unacknowledged message with the same `client_msg_id`.
//!
//! Single-process scenarios run on both backends (SQLite with the in-process bus and presence; MySQL +
//! Redis); multi-worker ones on a [`TestCluster`]. Like the cluster tests, these assert what a client
//! observes, never how fast it happened (bounds are generous); the one figure worth knowing — how long a
//! killed worker's users take to leave — is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::backend_tests;
use crate::cluster::{send_signal, slot, TestCluster};
use crate::helpers::{random_suffix, Backend, TestApp};

/// How long one expected frame may take: far above anything on an idle machine.
const WAIT: Duration = Duration::from_secs(15);
/// How long a whole churn scenario may take before a follower gives up and reports where it is stuck.
const PATIENCE: Duration = Duration::from_secs(90);
/// No client here should ever be rate limited unless the test is about it.
const NO_RATE_LIMIT: (&str, &str) = ("COZY_REALTIME_RATE_PER_SEC", "1000000");

// ---------------------------------------------------------------------------------------------------
// A WebSocket client
// ---------------------------------------------------------------------------------------------------

/// One connection to `GET /v1/realtime`.
struct WsClient {
    ws: WebSocketStream<TcpStream>,
    /// From `welcome` (0 before hello).
    user_id: i64,
}

/// What the server sent next.
#[derive(Debug)]
enum Incoming {
    Frame(Value),
    /// The connection ended: the server's close code, or `None` when it went without a close frame.
    Closed(Option<u16>),
}

impl WsClient {
    /// Opens the WebSocket without saying hello.
    async fn connect(base: &str) -> Result<WsClient, String> {
        Self::connect_with(base, None).await
    }

    /// Opens the WebSocket; `recv_buffer` shrinks the socket's receive buffer, so that a client that
    /// stops reading fills the server's side quickly.
    async fn connect_with(base: &str, recv_buffer: Option<u32>) -> Result<WsClient, String> {
        let addr: std::net::SocketAddr = base
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| format!("{base}: {e}"))?;
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(size) = recv_buffer {
            socket
                .set_recv_buffer_size(size)
                .map_err(|e| e.to_string())?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let url = format!("ws://{addr}/v1/realtime");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
            .await
            .map_err(|_| "no answer to the WebSocket handshake".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(WsClient { ws, user_id: 0 })
    }

    /// Connects and says hello; `Err` when the server cannot be reached or does not welcome us.
    async fn try_open(base: &str, token: &str) -> Result<WsClient, String> {
        let mut ws = Self::connect(base).await?;
        ws.try_send(json!({"type": "hello", "token": token}))
            .await?;
        match ws.next(WAIT).await {
            Some(Incoming::Frame(f)) if f["type"] == "welcome" => {
                ws.user_id = f["user_id"]
                    .as_i64()
                    .ok_or_else(|| format!("welcome without user_id: {f}"))?;
                Ok(ws)
            }
            other => Err(format!("no welcome: {other:?}")),
        }
    }

    async fn open(base: &str, token: &str) -> WsClient {
        Self::try_open(base, token)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn try_send(&mut self, frame: Value) -> Result<(), String> {
        self.send_text(frame.to_string()).await
    }

    async fn send_text(&mut self, text: String) -> Result<(), String> {
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    async fn send(&mut self, frame: Value) {
        self.try_send(frame)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"))
    }

    /// The next frame or the end of the connection; `None` if nothing came within `within`.
    async fn next(&mut self, within: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            return Some(match msg {
                Some(Ok(Message::Text(text))) => {
                    Incoming::Frame(serde_json::from_str(&text).unwrap_or_else(|e| {
                        panic!("the server sent a frame that is not JSON ({e}): {text}")
                    }))
                }
                Some(Ok(Message::Close(frame))) => {
                    Incoming::Closed(frame.map(|f| u16::from(f.code)))
                }
                Some(Ok(Message::Binary(b))) => panic!("the server sent a binary frame: {b:?}"),
                // Protocol pings (tungstenite answers them) and pongs.
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => Incoming::Closed(None),
            });
        }
    }

    /// The next frame; fails the test on a close or a timeout.
    async fn recv(&mut self) -> Value {
        match self.next(WAIT).await {
            Some(Incoming::Frame(f)) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Reads until a frame matches `pred`; returns it and the frames before it.
    async fn recv_until(
        &mut self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + WAIT;
        let mut before = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(f)) if pred(&f) => return (f, before),
                Some(Incoming::Frame(f)) => before.push(f),
                other => panic!("waiting for {what}: got {other:?} after {before:?}"),
            }
        }
    }

    /// Every frame that arrives within `within` (the connection must stay open).
    async fn frames_during(&mut self, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(f)) => frames.push(f),
                Some(Incoming::Closed(code)) => panic!("closed ({code:?}) after {frames:?}"),
                None => return frames,
            }
        }
    }

    /// Reads (and drops) frames until the server closes; its close code.
    async fn expect_close(&mut self, within: Duration) -> Option<u16> {
        let deadline = Instant::now() + within;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(_)) => {}
                Some(Incoming::Closed(code)) => return code,
                None => panic!("the server did not close the connection within {within:?}"),
            }
        }
    }

    /// Sends `frame` with a fresh `ref` and returns the reply that echoes it.
    async fn call(&mut self, mut frame: Value) -> Value {
        let reference = random_suffix();
        frame["ref"] = json!(reference);
        self.send(frame.clone()).await;
        self.recv_until(&format!("the reply to {frame}"), |f| f["ref"] == reference)
            .await
            .0
    }

    /// Subscribes; returns the `subscribed` reply and the frames before it (the replay).
    async fn subscribe(&mut self, room: &str, since: Option<u64>) -> (Value, Vec<Value>) {
        let reference = random_suffix();
        let mut frame = json!({"type": "subscribe", "room": room, "ref": reference});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        self.send(frame).await;
        let (reply, before) = self
            .recv_until("subscribed", |f| f["ref"] == reference)
            .await;
        assert_eq!(reply["type"], "subscribed", "subscribe {room}: {reply}");
        assert_eq!(reply["room"], room, "{reply}");
        // The replay is this room's frames; live traffic of the client's other rooms may interleave
        // (presence diffs are coalesced for up to 50 ms, so one can arrive after a later subscribe).
        let replay = before.into_iter().filter(|f| f["room"] == room).collect();
        (reply, replay)
    }

    async fn join(&mut self, room: &str) -> Value {
        self.subscribe(room, None).await.0
    }

    /// Publishes and returns the `ack`.
    async fn publish(&mut self, room: &str, client_msg_id: &str, body: Value) -> Value {
        let ack = self
            .call(json!({"type": "publish", "room": room, "client_msg_id": client_msg_id, "body": body}))
            .await;
        assert_eq!(ack["type"], "ack", "publish {client_msg_id}: {ack}");
        ack
    }

    /// A normal close (1000) from our side.
    async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Wait for the server's echo, so that it has seen the close before the test goes on.
        while let Some(Incoming::Frame(_)) = self.next(WAIT).await {}
    }
}

fn error_code(frame: &Value) -> &str {
    assert_eq!(frame["type"], "error", "{frame}");
    assert!(frame["message"].is_string(), "an error says why: {frame}");
    frame["code"].as_str().unwrap_or("")
}

fn rfc3339_utc(v: &Value) {
    let text = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert!(text.ends_with('Z'), "not UTC: {text}");
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("not RFC 3339: {text}: {e}"));
}

/// The entries of a `presence` frame, as (user, connections) joins and user leaves.
fn presence_of(frame: &Value) -> (Vec<(i64, u64)>, Vec<i64>) {
    let joins = frame["joins"]
        .as_array()
        .unwrap_or_else(|| panic!("presence without joins: {frame}"))
        .iter()
        .map(|j| {
            (
                j["user_id"].as_i64().unwrap(),
                j["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    let leaves = frame["leaves"]
        .as_array()
        .unwrap_or_else(|| panic!("presence without leaves: {frame}"))
        .iter()
        .map(|l| l["user_id"].as_i64().unwrap())
        .collect();
    (joins, leaves)
}

fn is_presence(f: &Value, room: &str) -> bool {
    f["type"] == "presence" && f["room"] == room
}

/// A `presence` frame of `room` that announces `user`'s (new) connection count.
fn counts(f: &Value, room: &str, user: i64) -> bool {
    is_presence(f, room) && presence_of(f).0.iter().any(|(u, _)| *u == user)
}

/// A `presence` frame of `room` in which `user` leaves.
fn leaves(f: &Value, room: &str, user: i64) -> bool {
    is_presence(f, room) && presence_of(f).1.contains(&user)
}

/// A user with a unique email; returns the token.
async fn someone(app: &TestApp, name: &str) -> String {
    app.user(&format!("{name}-{}@example.com", random_suffix()))
        .await
}

// ---------------------------------------------------------------------------------------------------
// The contract, row by row (both backends)
// ---------------------------------------------------------------------------------------------------

backend_tests! {
    async fn a_hello_with_a_session_token_is_welcomed_with_the_connection_and_the_user(backend) {
        let app = TestApp::spawn(backend).await;
        let email = format!("ada-{}@example.com", random_suffix());
        let token = app.user(&email).await;
        let session = app
            .request(Method::POST, "/v1/sessions", None, None, Some(json!({"email": email, "password": "correct horse"})))
            .await;
        let user_id = session.body["user"]["id"].as_i64().unwrap();

        let mut one = WsClient::connect(&app.base).await.unwrap();
        one.send(json!({"type": "hello", "token": token, "ref": "h1"})).await;
        let welcome = one.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["user_id"], user_id, "{welcome}");
        assert_eq!(welcome["heartbeat_ms"], 25_000, "the default heartbeat: {welcome}");
        assert_eq!(welcome["ref"], "h1", "{welcome}");
        let conn_id = welcome["conn_id"].as_str().unwrap_or_else(|| panic!("{welcome}"));
        assert!(!conn_id.is_empty());

        let mut two = WsClient::connect(&app.base).await.unwrap();
        two.send(json!({"type": "hello", "token": token})).await;
        let other = two.recv().await;
        assert_eq!(other["type"], "welcome");
        assert_ne!(other["conn_id"], welcome["conn_id"], "each connection has its own id");
        assert!(other.get("ref").is_none(), "no ref sent, none echoed: {other}");

        let pong = one.call(json!({"type": "ping"})).await;
        assert_eq!(pong["type"], "pong", "{pong}");
        two.send(json!({"type": "ping"})).await;
        assert_eq!(two.recv().await, json!({"type": "pong"}));
    }

    async fn no_hello_within_5_s_a_bad_token_or_another_first_frame_close_with_4001(backend) {
        let app = TestApp::spawn(backend).await;
        let token = someone(&app, "ada").await;

        let started = Instant::now();
        let mut silent = WsClient::connect(&app.base).await.unwrap();
        let mut wrong = WsClient::connect(&app.base).await.unwrap();
        wrong.send(json!({"type": "hello", "token": "not-a-session"})).await;
        assert_eq!(wrong.expect_close(WAIT).await, Some(4001), "a token that is no session");

        let mut rude = WsClient::connect(&app.base).await.unwrap();
        rude.send(json!({"type": "subscribe", "room": "chat:a"})).await;
        assert_eq!(rude.expect_close(WAIT).await, Some(4001), "a first frame that is not hello");

        // A session that was logged out no longer opens a connection.
        let out = app.request(Method::DELETE, "/v1/sessions/current", Some(&token), None, None).await;
        assert_eq!(out.status, StatusCode::NO_CONTENT);
        let mut revoked = WsClient::connect(&app.base).await.unwrap();
        revoked.send(json!({"type": "hello", "token": token})).await;
        assert_eq!(revoked.expect_close(WAIT).await, Some(4001), "a revoked session");

        assert_eq!(silent.expect_close(Duration::from_secs(20)).await, Some(4001), "no hello at all");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(4500), "closed after {waited:?}: the hello gets 5 s");
    }

    async fn a_chat_room_is_open_to_anyone_and_its_presence_includes_oneself(backend) {
        let app = TestApp::spawn(backend).await;
        let mut ada = WsClient::open(&app.base, &someone(&app, "ada").await).await;
        let mut bob = WsClient::open(&app.base, &someone(&app, "bob").await).await;

        let (first, replay) = ada.subscribe("chat:lobby", None).await;
        assert!(replay.is_empty(), "{replay:?}");
        assert_eq!(first["last_seq"], 0, "{first}");
        assert_eq!(first["recovered"], false, "no since, nothing recovered: {first}");
        assert_eq!(first["presence"], json!([{"user_id": ada.user_id, "connections": 1}]), "{first}");

        let joined = bob.join("chat:lobby").await;
        let mut presence = joined["presence"].as_array().unwrap().clone();
        presence.sort_by_key(|p| p["user_id"].as_i64());
        let mut expected = vec![
            json!({"user_id": ada.user_id, "connections": 1}),
            json!({"user_id": bob.user_id, "connections": 1}),
        ];
        expected.sort_by_key(|p| p["user_id"].as_i64());
        assert_eq!(presence, expected, "{joined}");

        // Ada is told that Bob came.
        let (seen, _) = ada.recv_until("bob's join", |f| counts(f, "chat:lobby", bob.user_id)).await;
        assert_eq!(presence_of(&seen), (vec![(bob.user_id, 1)], vec![]), "{seen}");

        // One's own user room is open; resource rooms are open to anyone.
        let own = format!("user:{}", ada.user_id);
        ada.join(&own).await;
        ada.join("resource:1").await;

        // Unsubscribing, and the rules around it.
        let left = ada.call(json!({"type": "unsubscribe", "room": "chat:lobby"})).await;
        assert_eq!(left["type"], "unsubscribed", "{left}");
        assert_eq!(left["room"], "chat:lobby");
        let again = ada.call(json!({"type": "unsubscribe", "room": "chat:lobby"})).await;
        assert_eq!(error_code(&again), "not_subscribed", "{again}");
        let (gone, _) = bob.recv_until("ada's leave", |f| leaves(f, "chat:lobby", ada.user_id)).await;
        assert_eq!(presence_of(&gone), (vec![], vec![ada.user_id]), "{gone}");
    }

    async fn another_users_room_is_forbidden_and_repeated_attempts_close_with_4003(backend) {
        let app = TestApp::spawn(backend).await;
        let mut ada = WsClient::open(&app.base, &someone(&app, "ada").await).await;
        let bob = WsClient::open(&app.base, &someone(&app, "bob").await).await;
        let theirs = format!("user:{}", bob.user_id);

        let refused = ada.call(json!({"type": "subscribe", "room": theirs})).await;
        assert_eq!(error_code(&refused), "forbidden", "{refused}");
        // The connection is still usable after one refusal.
        assert_eq!(ada.call(json!({"type": "ping"})).await["type"], "pong");

        let mut attempts = 1;
        let code = loop {
            ada.send(json!({"type": "subscribe", "room": theirs, "ref": format!("a{attempts}")})).await;
            attempts += 1;
            match ada.next(WAIT).await {
                Some(Incoming::Frame(f)) => assert_eq!(error_code(&f), "forbidden", "{f}"),
                Some(Incoming::Closed(code)) => break code,
                None => panic!("no answer to a forbidden subscribe"),
            }
            assert!(attempts < 50, "still open after {attempts} forbidden subscribes");
        };
        assert_eq!(code, Some(4003), "closed after {attempts} attempts");
    }

    async fn only_subscribers_publish_and_only_in_chat_rooms(backend) {
        let app = TestApp::spawn(backend).await;
        let mut ada = WsClient::open(&app.base, &someone(&app, "ada").await).await;

        let outside = ada
            .call(json!({"type": "publish", "room": "chat:quiet", "client_msg_id": "c1", "body": "hi"}))
            .await;
        assert_eq!(error_code(&outside), "not_subscribed", "{outside}");

        ada.join("resource:1").await;
        let server_room = ada
            .call(json!({"type": "publish", "room": "resource:1", "client_msg_id": "c2", "body": "hi"}))
            .await;
        assert_eq!(error_code(&server_room), "forbidden", "{server_room}");
        let own = format!("user:{}", ada.user_id);
        ada.join(&own).await;
        let own_room = ada
            .call(json!({"type": "publish", "room": own, "client_msg_id": "c3", "body": "hi"}))
            .await;
        assert_eq!(error_code(&own_room), "forbidden", "{own_room}");

        ada.join("chat:quiet").await;
        let ack = ada.publish("chat:quiet", "c4", json!("hi")).await;
        assert_eq!(ack["seq"], 1, "{ack}");
        ada.call(json!({"type": "unsubscribe", "room": "chat:quiet"})).await;
        let after = ada
            .call(json!({"type": "publish", "room": "chat:quiet", "client_msg_id": "c5", "body": "hi"}))
            .await;
        assert_eq!(error_code(&after), "not_subscribed", "{after}");
        let typing = ada.call(json!({"type": "typing", "room": "chat:quiet", "active": true})).await;
        assert_eq!(error_code(&typing), "not_subscribed", "{typing}");
        // Nothing refused was stored.
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM rt_messages").await, 1);
    }

    async fn malformed_frames_get_the_error_that_names_the_problem_and_the_connection_lives_on(backend) {
        let app = TestApp::spawn(backend).await;
        let mut ada = WsClient::open(&app.base, &someone(&app, "ada").await).await;
        ada.join("chat:a").await;

        let unknown = ada.call(json!({"type": "dance"})).await;
        assert_eq!(error_code(&unknown), "unknown_type", "{unknown}");

        let missing = ada.call(json!({"type": "publish", "room": "chat:a", "body": 1})).await;
        assert_eq!(error_code(&missing), "bad_frame", "{missing}");
        assert!(missing["message"].as_str().unwrap().contains("client_msg_id"), "names the field: {missing}");
        let no_room = ada.call(json!({"type": "subscribe"})).await;
        assert_eq!(error_code(&no_room), "bad_frame", "{no_room}");
        assert!(no_room["message"].as_str().unwrap().contains("room"), "names the field: {no_room}");
        let wrong_type = ada.call(json!({"type": "typing", "room": "chat:a", "active": "yes"})).await;
        assert_eq!(error_code(&wrong_type), "bad_frame", "{wrong_type}");

        ada.send_text("{not json".into()).await.unwrap();
        let garbage = ada.recv().await;
        assert_eq!(error_code(&garbage), "bad_frame", "{garbage}");

        // A body over 16 KiB is refused; one just under is fine (the frame stays far below 64 KiB).
        let big = "x".repeat(16 * 1024 + 1);
        let too_large = ada
            .call(json!({"type": "publish", "room": "chat:a", "client_msg_id": "big", "body": big}))
            .await;
        assert_eq!(error_code(&too_large), "too_large", "{too_large}");
        let fits = "x".repeat(16 * 1024 - 2);
        let ack = ada.publish("chat:a", "fits", json!(fits)).await;
        assert_eq!(ack["seq"], 1, "only the message that fits was stored: {ack}");

        let pong = ada.call(json!({"type": "ping"})).await;
        assert_eq!(pong["type"], "pong", "still connected after every error: {pong}");
    }

    async fn a_frame_over_64_kib_closes_the_connection_with_4008(backend) {
        let app = TestApp::spawn(backend).await;
        let token = someone(&app, "ada").await;
        for size in [64 * 1024 + 100, 300 * 1024] {
            let mut ada = WsClient::open(&app.base, &token).await;
            ada.join("chat:a").await;
            let frame = json!({"type": "publish", "room": "chat:a", "client_msg_id": "huge", "body": "x".repeat(size)});
            // The server may close before it has read all of it: a failed send is fine.
            let _ = ada.try_send(frame).await;
            assert_eq!(ada.expect_close(WAIT).await, Some(4008), "a frame of {size} bytes");
        }
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM rt_messages").await, 0);
    }

    async fn a_publish_is_acked_and_a_resend_of_its_client_msg_id_returns_the_same_ack_and_delivers_nothing(backend) {
        let app = TestApp::spawn(backend).await;
        let ada_token = someone(&app, "ada").await;
        let mut ada = WsClient::open(&app.base, &ada_token).await;
        let mut bob = WsClient::open(&app.base, &someone(&app, "bob").await).await;
        // Ada's second tab only listens: its stream is what a client sees, her own messages included.
        let mut tab = WsClient::open(&app.base, &ada_token).await;
        ada.join("chat:acks").await;
        bob.join("chat:acks").await;
        tab.join("chat:acks").await;

        let ack = ada
            .call(json!({"type": "publish", "room": "chat:acks", "client_msg_id": "c1", "body": {"text": "hi"}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["client_msg_id"], "c1");
        assert_eq!(ack["seq"], 1);
        rfc3339_utc(&ack["ts"]);
        assert!(ack["ref"].is_string(), "{ack}");

        let (message, _) = bob.recv_until("the message", |f| f["type"] == "message").await;
        assert_eq!(message["room"], "chat:acks");
        assert_eq!(message["seq"], 1);
        assert_eq!(message["user_id"], ada.user_id);
        assert_eq!(message["client_msg_id"], "c1");
        assert_eq!(message["body"], json!({"text": "hi"}));
        assert_eq!(message["ts"], ack["ts"], "the ack and the message carry one timestamp");
        assert!(message["id"].as_i64().is_some_and(|id| id > 0), "{message}");

        // The resend (even with another body) gets the original ack, with its own ref.
        let again = ada
            .call(json!({"type": "publish", "room": "chat:acks", "client_msg_id": "c1", "body": {"text": "changed"}}))
            .await;
        assert_eq!(again["type"], "ack");
        assert_eq!(again["seq"], ack["seq"]);
        assert_eq!(again["ts"], ack["ts"]);
        assert_eq!(again["client_msg_id"], "c1");
        assert_ne!(again["ref"], ack["ref"]);

        let next = ada.publish("chat:acks", "c2", json!("second")).await;
        assert_eq!(next["seq"], 2, "the resend took no seq: {next}");
        let (message, skipped) = bob.recv_until("the next message", |f| f["type"] == "message").await;
        assert_eq!(message["seq"], 2, "bob got no second copy of c1: {message} after {skipped:?}");
        assert_eq!(message["client_msg_id"], "c2");

        // The same client_msg_id from another user is another message.
        let bobs = bob.publish("chat:acks", "c1", json!("mine")).await;
        assert_eq!(bobs["seq"], 3, "{bobs}");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM rt_messages WHERE room = 'chat:acks'").await, 3);

        let mut seqs = Vec::new();
        while seqs.last() != Some(&3) {
            let (m, _) = tab.recv_until("a message", |f| f["type"] == "message").await;
            seqs.push(m["seq"].as_u64().unwrap());
        }
        assert_eq!(seqs, [1, 2, 3], "every message once, the resend not at all");
    }

    async fn frames_beyond_the_rate_get_rate_limited_and_a_flood_closes_with_4008(backend) {
        let app = TestApp::spawn_with(backend, &[("COZY_REALTIME_RATE_PER_SEC", "5")]).await;
        let mut ada = WsClient::open(&app.base, &someone(&app, "ada").await).await;
        // 5 per second with bursts of 10: 14 pings at once are 10 answers and 4 refusals.
        for i in 0..14 {
            ada.send(json!({"type": "ping", "ref": format!("p{i}")})).await;
        }
        let mut pongs = 0;
        let mut limited = Vec::new();
        for _ in 0..14 {
            let f = ada.recv().await;
            match f["type"].as_str() {
                Some("pong") => pongs += 1,
                Some("error") => {
                    assert_eq!(error_code(&f), "rate_limited", "{f}");
                    limited.push(f);
                }
                _ => panic!("{f}"),
            }
        }
        assert!((10..=12).contains(&pongs), "{pongs} pongs for 14 pings at 5/s with bursts of 10");
        assert!(!limited.is_empty(), "no rate_limited error");
        for f in &limited {
            assert!(f["ref"].as_str().is_some_and(|r| r.starts_with('p')), "the refusal echoes the ref: {f}");
        }
        // Keeping it up closes the connection.
        for i in 0..60 {
            if ada.try_send(json!({"type": "ping", "ref": format!("q{i}")})).await.is_err() {
                break;
            }
        }
        assert_eq!(ada.expect_close(WAIT).await, Some(4008));

        // A well-behaved client is not limited at all.
        let mut bob = WsClient::open(&app.base, &someone(&app, "bob").await).await;
        for _ in 0..4 {
            assert_eq!(bob.call(json!({"type": "ping"})).await["type"], "pong");
        }
    }

    async fn typing_reaches_the_others_not_oneself_and_ends_by_itself_after_6_s(backend) {
        let app = TestApp::spawn(backend).await;
        let mut ada = WsClient::open(&app.base, &someone(&app, "ada").await).await;
        let mut bob = WsClient::open(&app.base, &someone(&app, "bob").await).await;
        ada.join("chat:t").await;
        bob.join("chat:t").await;
        let _ = ada.recv_until("bob's join", |f| counts(f, "chat:t", bob.user_id)).await;

        // Started and stopped explicitly.
        ada.send(json!({"type": "typing", "room": "chat:t", "active": true})).await;
        let (on, _) = bob.recv_until("typing", |f| f["type"] == "typing").await;
        assert_eq!(on, json!({"type": "typing", "room": "chat:t", "user_id": ada.user_id, "active": true}));
        ada.send(json!({"type": "typing", "room": "chat:t", "active": false})).await;
        let (off, _) = bob.recv_until("typing", |f| f["type"] == "typing").await;
        assert_eq!(off["active"], false, "{off}");

        // Started and abandoned: the server ends it.
        let started = Instant::now();
        ada.send(json!({"type": "typing", "room": "chat:t", "active": true})).await;
        let (on, _) = bob.recv_until("typing", |f| f["type"] == "typing").await;
        assert_eq!(on["active"], true, "{on}");
        let (off, between) = bob.recv_until("the end of typing", |f| f["type"] == "typing").await;
        let after = started.elapsed();
        assert_eq!(off, json!({"type": "typing", "room": "chat:t", "user_id": ada.user_id, "active": false}));
        assert!(between.is_empty(), "{between:?}");
        assert!(after >= Duration::from_secs(5), "typing ended after {after:?}, before its 6 s were up");
        eprintln!("an abandoned typing indicator ended after {after:?}");

        // Ada never saw her own indicator.
        let hers = ada.frames_during(Duration::from_millis(300)).await;
        assert!(hers.iter().all(|f| f["type"] != "typing"), "{hers:?}");
    }

    async fn presence_counts_tabs_per_user_and_a_user_leaves_with_the_last_one(backend) {
        let app = TestApp::spawn(backend).await;
        let room = "chat:p";
        let mut watcher = WsClient::open(&app.base, &someone(&app, "watcher").await).await;
        watcher.join(room).await;
        let token = someone(&app, "tabs").await;

        let mut tab1 = WsClient::open(&app.base, &token).await;
        let user = tab1.user_id;
        tab1.join(room).await;
        let (seen, _) = watcher.recv_until("the first tab", |f| counts(f, room, user)).await;
        assert_eq!(presence_of(&seen), (vec![(user, 1)], vec![]), "{seen}");

        let mut tab2 = WsClient::open(&app.base, &token).await;
        let joined = tab2.join(room).await;
        assert!(
            joined["presence"].as_array().unwrap().contains(&json!({"user_id": user, "connections": 2})),
            "{joined}"
        );
        let (seen, _) = watcher.recv_until("the second tab", |f| counts(f, room, user)).await;
        assert_eq!(presence_of(&seen), (vec![(user, 2)], vec![]), "{seen}");

        // One tab closes: the user is still there.
        tab1.close().await;
        let meanwhile = watcher.frames_during(Duration::from_secs(2)).await;
        for f in meanwhile.iter().filter(|f| is_presence(f, room)) {
            assert_eq!(presence_of(f), (vec![(user, 1)], vec![]), "one tab of two closed: {f}");
        }

        // The last one closes: the user leaves, once.
        tab2.close().await;
        let (seen, _) = watcher.recv_until("the leave", |f| leaves(f, room, user)).await;
        assert_eq!(presence_of(&seen), (vec![], vec![user]), "{seen}");
        let late = watcher.frames_during(Duration::from_secs(1)).await;
        assert!(late.iter().all(|f| !is_presence(f, room)), "{late:?}");

        let mut newcomer = WsClient::open(&app.base, &someone(&app, "new").await).await;
        let snapshot = newcomer.join(room).await;
        assert!(
            snapshot["presence"].as_array().unwrap().iter().all(|p| p["user_id"] != user),
            "{snapshot}"
        );
    }

    async fn reservation_transitions_reach_the_owner_and_the_resource_room_in_seq_order(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let token = someone(&app, "ada").await;
        let other = someone(&app, "bob").await;
        let mut ada = WsClient::open(&app.base, &token).await;
        let mine = format!("user:{}", ada.user_id);
        let shared = format!("resource:{resource}");
        ada.join(&mine).await;
        ada.join(&shared).await;

        let id = app.reserve(&token, resource, 3).await;
        let paid = app.pay(&token, id, "sandbox_ok", &random_suffix()).await;
        assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
        let cancelled = app.cancel(&token, id, &random_suffix()).await;
        assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
        let bobs = app.reserve(&other, resource, 2).await;

        let mut rooms: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        while rooms.get(&mine).map_or(0, Vec::len) < 3 || rooms.get(&shared).map_or(0, Vec::len) < 4 {
            let (f, _) = ada.recv_until("reservation frames", |f| f["type"] == "reservation").await;
            rooms.entry(f["room"].as_str().unwrap().to_string()).or_default().push(f);
        }
        let stray = ada.frames_during(Duration::from_millis(500)).await;
        assert!(stray.iter().all(|f| f["type"] != "reservation"), "more than expected: {stray:?}");

        let http = app.get(&format!("/v1/reservations/{id}"), &token).await;
        assert_eq!(http.status, StatusCode::OK);
        let check = |f: &Value, seq: u64, state: &str, reservation: i64| {
            assert_eq!(f["seq"], seq, "{f}");
            let r = &f["reservation"];
            assert_eq!(r["id"], reservation, "{f}");
            assert_eq!(r["state"], state, "{f}");
            if reservation == id {
                for field in ["id", "resource_id", "user_id", "quantity", "amount_cents", "currency", "created_at", "expires_at"] {
                    assert_eq!(r[field], http.body[field], "{field}: {f} vs {}", http.body);
                }
                let mut frame_fields: Vec<_> = r.as_object().unwrap().keys().collect();
                let mut http_fields: Vec<_> = http.body.as_object().unwrap().keys().collect();
                frame_fields.sort();
                http_fields.sort();
                assert_eq!(frame_fields, http_fields, "the HTTP API's shape");
            }
        };
        let own = &rooms[&mine];
        for (i, (state, expect_payment)) in [("RESERVED", false), ("PAID", true), ("CANCELLED", true)].iter().enumerate() {
            check(&own[i], i as u64 + 1, state, id);
            assert!(own[i].get("available").is_none(), "no availability in a user room: {}", own[i]);
            assert_eq!(!own[i]["reservation"]["payment"].is_null(), *expect_payment, "{}", own[i]);
        }
        let public = &rooms[&shared];
        for (i, (state, reservation, available)) in
            [("RESERVED", id, 7), ("PAID", id, 7), ("CANCELLED", id, 10), ("RESERVED", bobs, 8)].iter().enumerate()
        {
            check(&public[i], i as u64 + 1, state, *reservation);
            assert_eq!(public[i]["available"], *available, "{}", public[i]);
        }
        let now = app.get(&format!("/v1/resources/{resource}"), &token).await;
        assert_eq!(now.body["available"], 8);

        // The same frames again, from history.
        let mut late = WsClient::open(&app.base, &token).await;
        let (reply, replay) = late.subscribe(&mine, Some(0)).await;
        assert_eq!(reply["recovered"], true, "{reply}");
        assert_eq!(reply["last_seq"], 3, "{reply}");
        assert_eq!(replay, *own, "the replay is what was delivered live");
        let (reply, replay) = late.subscribe(&shared, Some(2)).await;
        assert_eq!((reply["recovered"].clone(), reply["last_seq"].clone()), (json!(true), json!(4)), "{reply}");
        assert_eq!(replay, public[2..].to_vec());
        let (reply, replay) = late.subscribe(&mine, Some(3)).await;
        assert_eq!(reply["recovered"], true, "nothing missed is recovered too: {reply}");
        assert!(replay.is_empty(), "{replay:?}");
        let (reply, replay) = late.subscribe(&mine, Some(99)).await;
        assert_eq!(reply["recovered"], false, "a since beyond the head is not recovered: {reply}");
        assert!(replay.is_empty(), "{replay:?}");
        let (reply, replay) = late.subscribe(&mine, None).await;
        assert_eq!((reply["recovered"].clone(), reply["last_seq"].clone()), (json!(false), json!(3)), "{reply}");
        assert!(replay.is_empty(), "no since, no replay: {replay:?}");
        // Bob's reservation never reached Ada's own room.
        assert!(own.iter().all(|f| f["reservation"]["id"] != bobs));
    }

    async fn an_expired_hold_is_announced_in_both_rooms_with_its_capacity_back(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 5, 1).await;
        let token = someone(&app, "ada").await;
        let mut ada = WsClient::open(&app.base, &token).await;
        let mine = format!("user:{}", ada.user_id);
        let shared = format!("resource:{resource}");
        ada.join(&mine).await;
        ada.join(&shared).await;
        let id = app.reserve(&token, resource, 2).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let out = app.cli(&["sweep"], None);
        assert!(out.status.success(), "cozy sweep: {}", String::from_utf8_lossy(&out.stderr));

        let mut frames: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        while frames.values().map(Vec::len).sum::<usize>() < 4 {
            let (f, _) = ada.recv_until("reservation frames", |f| f["type"] == "reservation").await;
            frames.entry(f["room"].as_str().unwrap().to_string()).or_default().push(f);
        }
        for room in [&mine, &shared] {
            let states: Vec<(&Value, &Value, &Value)> = frames[room]
                .iter()
                .map(|f| (&f["seq"], &f["reservation"]["state"], &f["reservation"]["id"]))
                .collect();
            assert_eq!(
                states,
                [(&json!(1), &json!("RESERVED"), &json!(id)), (&json!(2), &json!("EXPIRED"), &json!(id))],
                "{room}"
            );
        }
        assert_eq!(frames[&shared][0]["available"], 3);
        assert_eq!(frames[&shared][1]["available"], 5, "the capacity is back");
    }

    async fn a_client_that_answers_no_heartbeat_is_dropped_and_its_user_leaves(backend) {
        let app = TestApp::spawn_with(backend, &[("COZY_REALTIME_HEARTBEAT_MS", "200")]).await;
        let room = "chat:hb";
        let mut watcher = WsClient::open(&app.base, &someone(&app, "watcher").await).await;
        watcher.join(room).await;
        let mut silent = WsClient::connect(&app.base).await.unwrap();
        silent.send(json!({"type": "hello", "token": someone(&app, "silent").await})).await;
        let welcome = silent.recv().await;
        assert_eq!(welcome["heartbeat_ms"], 200, "{welcome}");
        let user = welcome["user_id"].as_i64().unwrap();
        silent.join(room).await;
        // From now on `silent` reads nothing, so it answers no ping; the watcher reads (and so answers
        // every ping) for far longer than two heartbeats.
        let frames = watcher.frames_during(Duration::from_secs(4)).await;
        assert!(
            frames.iter().any(|f| leaves(f, room, user)),
            "the silent client's user did not leave: {frames:?}"
        );
        assert!(frames.iter().all(|f| !leaves(f, room, watcher.user_id)));
        assert_eq!(watcher.call(json!({"type": "ping"})).await["type"], "pong");
        assert_eq!(silent.expect_close(WAIT).await, None, "dropped without a close frame");
    }

    async fn sigterm_closes_every_websocket_with_1001(backend) {
        let app = TestApp::spawn(backend).await;
        let token = someone(&app, "ada").await;
        let mut clients = Vec::new();
        for i in 0..3 {
            let mut ws = WsClient::open(&app.base, &token).await;
            if i > 0 {
                ws.join("chat:drain").await;
            }
            clients.push(ws);
        }
        send_signal(app.pid().unwrap(), libc::SIGTERM).unwrap();
        for ws in &mut clients {
            assert_eq!(ws.expect_close(WAIT).await, Some(1001), "server going away");
        }
    }

    async fn a_slow_consumer_is_closed_with_4009_while_the_others_receive_everything(backend) {
        let app = TestApp::spawn_with(
            backend,
            &[("COZY_REALTIME_QUEUE_FRAMES", "64"), NO_RATE_LIMIT],
        )
        .await;
        slow_consumer(&app).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Clients that survive churn
// ---------------------------------------------------------------------------------------------------

/// What a [`Follow`] client saw, shared with the test while it runs.
#[derive(Default)]
struct Seen {
    user_id: i64,
    /// The publisher's message number (`body.n`) of every seq received: index `seq - 1`.
    ns: Vec<u64>,
    /// When each message arrived.
    at: Vec<Instant>,
    /// The first subscription was confirmed.
    subscribed: bool,
    connections: usize,
    /// How the server ended connections (its close code, `None` when it just dropped), and when.
    ends: Vec<(Instant, Option<u16>)>,
    /// Every `presence` frame, and when it arrived.
    presence: Vec<(Instant, Value)>,
}

/// A subscriber of one chat room that receives `total` messages whatever happens: it comes back after
/// every end of its connection (or a planned cut) with `since` = the last seq it saw, and checks on every
/// connection that seqs come in order without a gap.
#[derive(Clone)]
struct Follow {
    base: String,
    token: String,
    room: String,
    total: u64,
    /// Leave (cleanly or by dropping the socket) after these seqs, then come back.
    cuts: Vec<u64>,
    /// After the *server* ended a connection, wait until this says true before coming back.
    gate: Option<watch::Receiver<bool>>,
}

struct Follower {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<Result<(), String>>,
}

impl Follow {
    fn new(base: &str, token: &str, room: &str, total: u64) -> Follow {
        Follow {
            base: base.to_string(),
            token: token.to_string(),
            room: room.to_string(),
            total,
            cuts: Vec::new(),
            gate: None,
        }
    }

    fn start(self) -> Follower {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = tokio::spawn(self.run(seen.clone()));
        Follower { seen, task }
    }

    async fn run(mut self, seen: Arc<Mutex<Seen>>) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        let mut last = 0u64;
        let mut first = true;
        self.cuts.sort_unstable();
        let mut cuts = self.cuts.clone().into_iter().peekable();
        loop {
            let mut ws = match WsClient::try_open(&self.base, &self.token).await {
                Ok(ws) => ws,
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(format!("cannot reconnect at seq {last}: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let connection = {
                let mut s = seen.lock().unwrap();
                s.user_id = ws.user_id;
                s.connections += 1;
                s.connections
            };
            let since = (!first).then_some(last);
            let mut frame = json!({"type": "subscribe", "room": self.room, "ref": "sub"});
            if let Some(since) = since {
                frame["since"] = json!(since);
            }
            let sent = ws.try_send(frame).await;
            let mut confirmed = false;
            // How this connection ended: by the server (Some) or by our cut (None).
            let ended = loop {
                if sent.is_err() {
                    break Some(None);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let f = match ws.next(left).await {
                    None => {
                        return Err(format!(
                            "stuck at seq {last} of {} on connection {connection}",
                            self.total
                        ))
                    }
                    Some(Incoming::Closed(code)) => break Some(code),
                    Some(Incoming::Frame(f)) => f,
                };
                match f["type"].as_str().unwrap_or("") {
                    "subscribed" => {
                        let head = f["last_seq"].as_u64().unwrap_or(0);
                        if since.is_some() && (f["recovered"] != true || head != last) {
                            return Err(format!(
                                "connection {connection}: resubscribed with since {last}: {f}"
                            ));
                        }
                        if since.is_none() {
                            if f["recovered"] != false {
                                return Err(format!("no since but {f}"));
                            }
                            // Whatever came before is not ours to see (the test starts publishing after
                            // every follower subscribed, so this is 0).
                            last = head;
                            let mut s = seen.lock().unwrap();
                            s.ns.resize(head as usize, u64::MAX);
                            s.at.resize(head as usize, Instant::now());
                        }
                        confirmed = true;
                        seen.lock().unwrap().subscribed = true;
                    }
                    "message" => {
                        let seq = f["seq"].as_u64().unwrap_or(0);
                        if since.is_none() && !confirmed {
                            return Err(format!("a replay without since: {f}"));
                        }
                        if seq != last + 1 {
                            return Err(format!(
                                "connection {connection} (since {since:?}): seq {seq} after {last}"
                            ));
                        }
                        last = seq;
                        {
                            let mut s = seen.lock().unwrap();
                            s.ns.push(f["body"]["n"].as_u64().unwrap_or(u64::MAX));
                            s.at.push(Instant::now());
                        }
                        if last == self.total {
                            ws.close().await;
                            return Ok(());
                        }
                        if cuts.next_if(|&c| c <= last).is_some() {
                            break None;
                        }
                    }
                    "presence" => seen.lock().unwrap().presence.push((Instant::now(), f)),
                    "error" => return Err(format!("connection {connection}: {f}")),
                    _ => {}
                }
            };
            first = false;
            match ended {
                Some(code) => {
                    seen.lock().unwrap().ends.push((Instant::now(), code));
                    if let Some(gate) = &mut self.gate {
                        let _ = gate.wait_for(|open| *open).await;
                    }
                }
                None => {
                    if rand::random::<bool>() {
                        ws.close().await;
                    } else {
                        drop(ws);
                    }
                }
            }
            let pause = rand::thread_rng().gen_range(0..100);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

/// A publisher of messages `{"n": n}` with `client_msg_id` `m<n>` into one chat room: up to `window`
/// unacknowledged at a time, an optional pause before each; after a lost connection it reconnects and
/// resends what was not acknowledged, with the same ids.
#[derive(Clone)]
struct Publish {
    base: String,
    token: String,
    room: String,
    ns: Vec<u64>,
    window: usize,
    pace: Option<Duration>,
}

#[derive(Debug, Default)]
struct Published {
    /// `(n, seq)` of every ack, in order.
    acks: Vec<(u64, u64)>,
    connections: usize,
    /// Messages sent again after a reconnect because their ack had not come.
    resent: usize,
    /// How the server ended connections.
    ends: Vec<Option<u16>>,
}

impl Publish {
    fn start(self) -> JoinHandle<Result<Published, String>> {
        tokio::spawn(self.run())
    }

    async fn run(self) -> Result<Published, String> {
        let deadline = Instant::now() + PATIENCE;
        let mut out = Published::default();
        // Sent so far (on any connection): what lies between this and the acks is resent.
        let mut sent = 0;
        while out.acks.len() < self.ns.len() {
            let mut ws = match WsClient::try_open(&self.base, &self.token).await {
                Ok(ws) => ws,
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(format!("publisher cannot reconnect: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            out.connections += 1;
            let mut next = out.acks.len();
            out.resent += sent - next;
            let mut ready = ws
                .try_send(json!({"type": "subscribe", "room": self.room}))
                .await
                .is_ok();
            let mut joined = false;
            while ready && out.acks.len() < self.ns.len() {
                while joined && next < self.ns.len() && next - out.acks.len() < self.window {
                    if let Some(pace) = self.pace {
                        tokio::time::sleep(pace).await;
                    }
                    let n = self.ns[next];
                    let frame = json!({"type": "publish", "room": self.room, "client_msg_id": format!("m{n}"), "body": {"n": n}});
                    if ws.try_send(frame).await.is_err() {
                        ready = false;
                        break;
                    }
                    next += 1;
                    sent = sent.max(next);
                }
                if !ready {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match ws.next(left).await {
                    None => return Err(format!("publisher stuck after {} acks", out.acks.len())),
                    Some(Incoming::Closed(code)) => {
                        out.ends.push(code);
                        ready = false;
                    }
                    Some(Incoming::Frame(f)) => match f["type"].as_str().unwrap_or("") {
                        "subscribed" => joined = true,
                        "ack" => {
                            let n = self.ns[out.acks.len()];
                            if f["client_msg_id"] != format!("m{n}") {
                                return Err(format!("expected the ack of m{n}, got {f}"));
                            }
                            out.acks.push((n, f["seq"].as_u64().unwrap_or(0)));
                        }
                        "error" => return Err(format!("publisher: {f}")),
                        _ => {}
                    },
                }
            }
        }
        Ok(out)
    }
}

/// Splits message numbers `1..=total` between `publishers`.
fn split(total: u64, publishers: u64) -> Vec<Vec<u64>> {
    (0..publishers)
        .map(|p| (1..=total).filter(|n| n % publishers == p).collect())
        .collect()
}

/// Waits for the publishers, then checks the outcome: the acks cover seqs `1..=total` once each (a
/// resend never took a second seq), and every follower received exactly that history.
async fn check_history(
    total: u64,
    publishers: Vec<JoinHandle<Result<Published, String>>>,
    followers: Vec<Follower>,
) -> (Vec<Published>, Vec<Seen>) {
    let mut published = Vec::new();
    for p in publishers {
        published.push(
            p.await
                .expect("publisher task")
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let mut by_seq: BTreeMap<u64, u64> = BTreeMap::new();
    for p in &published {
        for &(n, seq) in &p.acks {
            if let Some(other) = by_seq.insert(seq, n) {
                panic!("seq {seq} acknowledged for both m{other} and m{n}");
            }
        }
    }
    assert_eq!(by_seq.len() as u64, total, "one seq per message");
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "the acknowledged seqs are 1..={total}"
    );
    let expected: Vec<u64> = by_seq.values().copied().collect();
    let mut seen = Vec::new();
    for (i, f) in followers.into_iter().enumerate() {
        let outcome = f.task.await.expect("follower task");
        let s = std::mem::take(&mut *f.seen.lock().unwrap());
        if let Err(e) = outcome {
            panic!(
                "follower {i}: {e} (after {} connections, ends {:?})",
                s.connections,
                s.ends.iter().map(|e| e.1).collect::<Vec<_>>()
            );
        }
        assert!(
            s.ns == expected,
            "follower {i} does not have the history: {} of {total} messages",
            s.ns.len()
        );
        seen.push(s);
    }
    (published, seen)
}

async fn wait_subscribed(followers: &[Follower]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = followers
            .iter()
            .filter(|f| f.seen.lock().unwrap().subscribed)
            .count();
        if ready == followers.len() {
            return;
        }
        assert!(
            followers.iter().all(|f| !f.task.is_finished()),
            "a follower ended before subscribing"
        );
        assert!(
            Instant::now() < deadline,
            "only {ready} of {} followers subscribed",
            followers.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------------
// Resync under churn
// ---------------------------------------------------------------------------------------------------

/// `clients` followers of one room (sharing ten users) leave and come back at random points with `since`
/// while five publishers send `total` messages: each ends with every seq exactly once, in order.
async fn resync_under_churn(app: &TestApp, clients: usize, total: u64) -> BTreeMap<String, i64> {
    let room = "chat:churn";
    let mut tokens = Vec::new();
    for i in 0..15 {
        tokens.push(someone(app, &format!("u{i}")).await);
    }
    let started = Instant::now();
    // One at a time: a burst of connections tends to land on one worker of a cluster (the first to
    // wake accepts them all), one by one they spread.
    let mut followers: Vec<Follower> = Vec::new();
    for i in 0..clients {
        let mut follow = Follow::new(&app.base, &tokens[i % 10], room, total);
        let mut rng = rand::thread_rng();
        follow.cuts = (0..3).map(|_| rng.gen_range(1..total)).collect();
        followers.push(follow.start());
        wait_subscribed(&followers[i..]).await;
    }
    // Per worker on a cluster (a single process has no worker label: empty).
    let placement = if ws_per_worker(&app.base).await.is_empty() {
        BTreeMap::new()
    } else {
        wait_ws_total(&app.base, clients as i64).await
    };
    let publishers = split(total, 5)
        .into_iter()
        .enumerate()
        .map(|(p, ns)| {
            Publish {
                base: app.base.clone(),
                token: tokens[10 + p].clone(),
                room: room.into(),
                ns,
                window: 16,
                pace: None,
            }
            .start()
        })
        .collect();
    let (_, seen) = check_history(total, publishers, followers).await;
    let connections: usize = seen.iter().map(|s| s.connections).sum();
    let server_ends: usize = seen.iter().map(|s| s.ends.len()).sum();
    eprintln!(
        "{clients} followers received {total} messages each over {connections} connections in {:?}",
        started.elapsed()
    );
    // The only reason the server may end a connection here is a follower that fell too far behind
    // (4009: a slow consumer, which then resyncs like any other).
    let codes: Vec<Option<u16>> = seen
        .iter()
        .flat_map(|s| s.ends.iter().map(|e| e.1))
        .collect();
    assert!(codes.iter().all(|c| *c == Some(4009)), "{codes:?}");
    eprintln!("{server_ends} connections were closed by the server as slow consumers");
    assert!(connections > clients * 2, "followers came back with since");
    placement
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_that_come_back_with_since_end_with_every_seq_once_in_order_on_mysql_and_redis() {
    let app = TestApp::spawn_with(Backend::MySql, &[NO_RATE_LIMIT]).await;
    resync_under_churn(&app, 100, 5000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_that_come_back_with_since_end_with_every_seq_once_in_order_on_two_workers() {
    let cluster = TestCluster::start(2, &[NO_RATE_LIMIT], &[]).await;
    let placement = resync_under_churn(&cluster, 100, 5000).await;
    eprintln!("followers per worker at the start: {placement:?}");
    assert!(
        placement.values().filter(|n| **n > 0).count() == 2,
        "every follower was on one worker: {placement:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Across workers
// ---------------------------------------------------------------------------------------------------

/// Open WebSocket connections per worker, from the cluster's `/metrics` (workers push every second).
async fn ws_per_worker(base: &str) -> BTreeMap<String, i64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("cozy_websocket_connections{"))
        .filter_map(|l| {
            let worker = l.split("worker=\"").nth(1)?.split('"').next()?.to_string();
            let value: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((worker, value as i64))
        })
        .collect()
}

/// Polls `/metrics` until the workers report `total` connections in all.
async fn wait_ws_total(base: &str, total: i64) -> BTreeMap<String, i64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = ws_per_worker(base).await;
        if counts.values().sum::<i64>() == total {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "the workers report {counts:?}, expected {total} connections in all"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a connection and finds out which worker holds it (the one whose count went up by one).
async fn open_located(base: &str, token: &str, open_now: i64) -> (WsClient, String) {
    let before = wait_ws_total(base, open_now).await;
    let ws = WsClient::open(base, token).await;
    let after = wait_ws_total(base, open_now + 1).await;
    (ws, grown(&before, &after))
}

/// Starts a follower and finds out which worker holds its connection (as [`open_located`]).
async fn start_located(base: &str, follow: Follow, open_now: i64) -> (Follower, String) {
    let before = wait_ws_total(base, open_now).await;
    let follower = follow.start();
    wait_subscribed(std::slice::from_ref(&follower)).await;
    let after = wait_ws_total(base, open_now + 1).await;
    (follower, grown(&before, &after))
}

/// The worker whose connection count went up by one.
fn grown(before: &BTreeMap<String, i64>, after: &BTreeMap<String, i64>) -> String {
    after
        .iter()
        .find(|(w, n)| **n == before.get(*w).copied().unwrap_or(0) + 1)
        .map(|(w, _)| w.clone())
        .unwrap_or_else(|| panic!("{before:?} → {after:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishers_on_different_workers_give_every_subscriber_one_order_without_gaps() {
    let cluster = TestCluster::start(3, &[NO_RATE_LIMIT], &[]).await;
    let base = cluster.base.clone();
    let room = "chat:cross";
    let token = someone(&cluster, "pub").await;
    let reader = someone(&cluster, "sub").await;

    // Publishers: keep connections until at least two workers hold one (at most two per worker).
    let mut located: Vec<(WsClient, String)> = Vec::new();
    let mut open = 0;
    for _ in 0..24 {
        let (ws, worker) = open_located(&base, &token, open).await;
        open += 1;
        if located.iter().filter(|(_, w)| *w == worker).count() >= 2 {
            ws.close().await;
            open -= 1;
        } else {
            located.push((ws, worker));
        }
        let workers: BTreeSet<&String> = located.iter().map(|(_, w)| w).collect();
        if workers.len() == 3 || (workers.len() == 2 && located.len() >= 4) {
            break;
        }
    }
    let workers: BTreeSet<String> = located.iter().map(|(_, w)| w.clone()).collect();
    eprintln!(
        "publishers on workers {:?}",
        located.iter().map(|(_, w)| w).collect::<Vec<_>>()
    );
    assert!(
        workers.len() >= 2,
        "every publisher landed on worker {workers:?}"
    );
    let (publishers, workers_of_publishers): (Vec<WsClient>, Vec<String>) =
        located.into_iter().unzip();
    let per = 150u64;
    let total = per * publishers.len() as u64;

    // Subscribers: enough that at least two workers hold some.
    let mut followers: Vec<Follower> = Vec::new();
    let by_worker = loop {
        // One at a time, so that they spread over the workers (see `resync_under_churn`).
        for _ in 0..10 {
            followers.push(Follow::new(&base, &reader, room, total).start());
            wait_subscribed(&followers[followers.len() - 1..]).await;
        }
        let counts = wait_ws_total(&base, open + followers.len() as i64).await;
        let with_subscribers = counts
            .iter()
            .filter(|(w, n)| **n > workers_of_publishers.iter().filter(|p| p == w).count() as i64)
            .count();
        if (with_subscribers >= 2 && followers.len() >= 20) || followers.len() >= 60 {
            break counts;
        }
    };
    eprintln!(
        "{} subscribers; connections per worker {by_worker:?}",
        followers.len()
    );

    // Every publisher joins, then all publish at once.
    let ns = split(total, publishers.len() as u64);
    let tasks: Vec<_> = publishers
        .into_iter()
        .zip(ns)
        .map(|(mut ws, ns)| {
            let room = room.to_string();
            tokio::spawn(async move {
                ws.join(&room).await;
                let mut acks = Vec::new();
                for chunk in ns.chunks(8) {
                    for n in chunk {
                        ws.send(json!({"type": "publish", "room": room, "client_msg_id": format!("m{n}"), "body": {"n": n}})).await;
                    }
                    for n in chunk {
                        let (ack, _) = ws.recv_until("an ack", |f| f["type"] == "ack" || f["type"] == "error").await;
                        assert_eq!(ack["client_msg_id"], format!("m{n}"), "{ack}");
                        acks.push((*n, ack["seq"].as_u64().unwrap()));
                    }
                }
                Ok::<_, String>(Published { acks, connections: 1, ..Published::default() })
            })
        })
        .collect();
    let (_, seen) = check_history(total, tasks, followers).await;
    for s in &seen {
        assert_eq!(s.connections, 1, "no subscriber lost its connection");
        assert!(s.ends.is_empty());
    }
}

/// Users whose only connection is on a worker that is killed leave once presence expires, as the
/// others see; a user with a tab on each worker does not leave. The killed clients come back (to the
/// survivor or the replacement) and resync without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_makes_its_users_leave_within_the_presence_ttl_and_its_clients_resync() {
    const TTL: Duration = Duration::from_secs(3);
    let cluster = TestCluster::start(
        2,
        &[NO_RATE_LIMIT, ("COZY_REALTIME_PRESENCE_TTL_SECS", "3")],
        &[],
    )
    .await;
    let base = cluster.base.clone();
    let room = "chat:crash";
    let total = 700;
    let publisher_token = someone(&cluster, "pub").await;
    let (gate_tx, gate) = watch::channel(false);

    // Followers, each placed on its worker as it connects: single-tab users until both workers hold
    // some, then one user with a tab on each worker.
    let mut followers: Vec<Follower> = Vec::new();
    let mut workers: Vec<String> = Vec::new();
    let follow = |token: &str| {
        let mut follow = Follow::new(&base, token, room, total);
        follow.gate = Some(gate.clone());
        follow
    };
    let on = |workers: &[String], w: &str| workers.iter().filter(|x| *x == w).count();
    while on(&workers, "1") == 0 || on(&workers, "2") == 0 || workers.len() < 4 {
        assert!(
            workers.len() < 30,
            "every follower landed on one worker: {workers:?}"
        );
        let token = someone(&cluster, "f").await;
        let (f, w) = start_located(&base, follow(&token), followers.len() as i64).await;
        followers.push(f);
        workers.push(w);
    }
    let singles = followers.len();
    let two_tabs = someone(&cluster, "tabs").await;
    let (f, first_tab) = start_located(&base, follow(&two_tabs), singles as i64).await;
    followers.push(f);
    workers.push(first_tab.clone());
    loop {
        let (f, w) = start_located(&base, follow(&two_tabs), followers.len() as i64).await;
        if w != first_tab {
            followers.push(f);
            workers.push(w);
            break;
        }
        // Same worker as the first tab: try again.
        f.task.abort();
        assert!(
            followers.len() < 40,
            "cannot place a second tab on the other worker"
        );
    }
    let status = cluster.status().await;
    let victim = slot(&status, 1)[0]["pid"].as_u64().unwrap() as u32;
    eprintln!(
        "followers on workers {workers:?} (the last two: one user's two tabs); killing worker 1"
    );

    let publisher = Publish {
        base: base.clone(),
        token: publisher_token,
        room: room.into(),
        ns: (1..=total).collect(),
        window: 4,
        pace: Some(Duration::from_millis(8)),
    }
    .start();
    // Let some history build up, then kill.
    let deadline = Instant::now() + WAIT;
    while followers[0].seen.lock().unwrap().ns.len() < 100 {
        assert!(Instant::now() < deadline, "nothing published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    send_signal(victim, libc::SIGKILL).unwrap();

    // Exactly the connections on the killed worker end.
    let dead: Vec<usize> = (0..followers.len())
        .filter(|&i| workers[i] == "1")
        .collect();
    let survivors: Vec<usize> = (0..followers.len())
        .filter(|&i| workers[i] != "1")
        .collect();
    let ended = |followers: &[Follower]| -> Vec<usize> {
        followers
            .iter()
            .enumerate()
            .filter(|(_, f)| !f.seen.lock().unwrap().ends.is_empty())
            .map(|(i, _)| i)
            .collect()
    };
    let deadline = Instant::now() + WAIT;
    while ended(&followers) != dead {
        assert!(
            Instant::now() < deadline,
            "connections ended: {:?}, on the killed worker: {dead:?}",
            ended(&followers)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let user = |i: usize| followers[i].seen.lock().unwrap().user_id;
    let survivor_users: BTreeSet<i64> = survivors.iter().map(|&i| user(i)).collect();
    // Users all of whose tabs were on the killed worker (not the two-tab user: one tab survives).
    let dead_users: BTreeSet<i64> = dead
        .iter()
        .map(|&i| user(i))
        .filter(|u| !survivor_users.contains(u))
        .collect();
    let split_user = user(followers.len() - 1);
    assert!(survivor_users.contains(&split_user) && dead.iter().any(|&i| user(i) == split_user));

    // Every survivor sees every dead user leave.
    let leaves_seen = |i: usize| -> BTreeMap<i64, Instant> {
        let s = followers[i].seen.lock().unwrap();
        let mut first: BTreeMap<i64, Instant> = BTreeMap::new();
        for (at, f) in s.presence.iter().filter(|(at, _)| *at >= killed_at) {
            for u in presence_of(f).1 {
                first.entry(u).or_insert(*at);
            }
        }
        first
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let last_leave = loop {
        let mut latest = Some(killed_at);
        for &i in &survivors {
            let seen = leaves_seen(i);
            for u in &dead_users {
                match (seen.get(u), latest) {
                    (Some(at), Some(l)) => latest = Some(l.max(*at)),
                    _ => latest = None,
                }
            }
        }
        if let Some(at) = latest {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "after {:?} the survivors have not seen every dead user leave",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = last_leave - killed_at;
    let bound = TTL + TTL / 3 + Duration::from_secs(5);
    eprintln!(
        "kill -9 of a worker → {} survivors saw its {} users leave after {took:?} (ttl {TTL:?}; bound {bound:?})",
        survivors.len(),
        dead_users.len()
    );
    assert!(
        took <= bound,
        "the leaves took {took:?}, more than {bound:?}"
    );
    // Nobody with a live connection left — the two-tab user included, whose count went down.
    tokio::time::sleep(TTL / 3 + Duration::from_millis(500)).await;
    for &i in &survivors {
        let false_leaves: Vec<i64> = leaves_seen(i)
            .keys()
            .filter(|u| survivor_users.contains(u))
            .copied()
            .collect();
        assert!(
            false_leaves.is_empty(),
            "users with a live connection were reported gone: {false_leaves:?} (the two-tab user is {split_user})"
        );
    }
    let split_count = followers[survivors[0]]
        .seen
        .lock()
        .unwrap()
        .presence
        .iter()
        .filter(|(at, _)| *at >= killed_at)
        .flat_map(|(_, f)| presence_of(f).0)
        .filter(|(u, _)| *u == split_user)
        .map(|(_, n)| n)
        .collect::<Vec<_>>();
    eprintln!("the two-tab user's counts announced after the kill: {split_count:?}");

    // The killed clients come back and catch up.
    gate_tx.send(true).unwrap();
    let (published, seen) = check_history(total, vec![publisher], followers).await;
    for &i in &dead {
        assert!(seen[i].connections >= 2, "follower {i} came back");
    }
    for &i in &survivors {
        assert!(
            seen[i].ends.is_empty(),
            "follower {i} on the surviving worker lost its connection"
        );
    }
    eprintln!(
        "publisher used {} connection(s), resent {} message(s); every follower has all {total} messages",
        published[0].connections, published[0].resent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_reload_closes_websockets_with_1001_and_their_clients_resync_without_a_gap() {
    let cluster = TestCluster::start(2, &[NO_RATE_LIMIT], &[]).await;
    let base = cluster.base.clone();
    let room = "chat:reload";
    let total = 800;
    let token = someone(&cluster, "f").await;
    let followers: Vec<Follower> = (0..8)
        .map(|_| Follow::new(&base, &token, room, total).start())
        .collect();
    wait_subscribed(&followers).await;
    let publisher = Publish {
        base: base.clone(),
        token: someone(&cluster, "pub").await,
        room: room.into(),
        ns: (1..=total).collect(),
        window: 4,
        pace: Some(Duration::from_millis(6)),
    }
    .start();
    let deadline = Instant::now() + WAIT;
    while followers[0].seen.lock().unwrap().ns.len() < 100 {
        assert!(Instant::now() < deadline, "nothing published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = cluster.cli(&["reload"]).await;
    assert!(
        out.status.success(),
        "cozy reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (published, seen) = check_history(total, vec![publisher], followers).await;
    for (i, s) in seen.iter().enumerate() {
        let codes: Vec<Option<u16>> = s.ends.iter().map(|e| e.1).collect();
        assert!(
            !codes.is_empty(),
            "follower {i} was on an old worker but was not closed"
        );
        assert!(
            codes.iter().all(|c| *c == Some(1001)),
            "follower {i}: {codes:?}"
        );
    }
    assert!(
        published[0].ends.iter().all(|c| *c == Some(1001)),
        "{:?}",
        published[0].ends
    );
    eprintln!(
        "reload: followers reconnected {:?} times; the publisher used {} connections and resent {} message(s)",
        seen.iter().map(|s| s.connections - 1).collect::<Vec<_>>(),
        published[0].connections,
        published[0].resent
    );
}

// ---------------------------------------------------------------------------------------------------
// A slow consumer
// ---------------------------------------------------------------------------------------------------

/// One subscriber stops reading while a publisher floods the room: it is closed with 4009 once its
/// queue overflows (and it reads its backlog up to that close), while a normal subscriber receives
/// everything in order without long stalls.
async fn slow_consumer(app: &TestApp) {
    let room = "chat:flood";
    let total = 1500u64;
    let slow_token = someone(app, "slow").await;
    let mut slow = WsClient::connect_with(&app.base, Some(4096)).await.unwrap();
    slow.send(json!({"type": "hello", "token": slow_token}))
        .await;
    let welcome = slow.recv().await;
    let slow_user = welcome["user_id"].as_i64().unwrap();
    slow.join(room).await;

    let normal = Follow::new(&app.base, &someone(app, "normal").await, room, total).start();
    wait_subscribed(std::slice::from_ref(&normal)).await;

    // 8 KiB bodies, so that the slow client's socket buffers (a few MB on the server's side) fill after
    // a few hundred messages.
    let pad = "x".repeat(8000);
    let publisher = {
        let (base, token, room, pad) = (
            app.base.clone(),
            someone(app, "pub").await,
            room.to_string(),
            pad.clone(),
        );
        tokio::spawn(async move {
            let mut ws = WsClient::open(&base, &token).await;
            ws.join(&room).await;
            let ns: Vec<u64> = (1..=total).collect();
            for chunk in ns.chunks(16) {
                for n in chunk {
                    ws.send(json!({"type": "publish", "room": room, "client_msg_id": format!("m{n}"), "body": {"n": n, "pad": pad}})).await;
                }
                for n in chunk {
                    let (ack, _) = ws
                        .recv_until("an ack", |f| f["type"] == "ack" || f["type"] == "error")
                        .await;
                    assert_eq!(ack["client_msg_id"], format!("m{n}"), "{ack}");
                }
            }
        })
    };

    // The hub gives up on the slow client when its queue overflows; its user then leaves the room, which
    // the normal subscriber sees. Reading from then on lets the close frame through.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dropped_at = loop {
        let left = normal
            .seen
            .lock()
            .unwrap()
            .presence
            .iter()
            .find(|(_, f)| presence_of(f).1.contains(&slow_user))
            .map(|(at, _)| *at);
        if let Some(at) = left {
            break at;
        }
        assert!(
            Instant::now() < deadline && !normal.task.is_finished(),
            "the slow consumer was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut backlog = Vec::new();
    let code = loop {
        match slow.next(WAIT).await {
            Some(Incoming::Frame(f)) => {
                if f["type"] == "message" {
                    backlog.push(f["seq"].as_u64().unwrap());
                }
            }
            Some(Incoming::Closed(code)) => break code,
            None => panic!("the slow consumer's connection neither closed nor sent anything"),
        }
    };
    eprintln!(
        "slow consumer: started reading {:?} after its user left; read {} messages, then {code:?}",
        dropped_at.elapsed(),
        backlog.len()
    );
    assert_eq!(
        backlog,
        (1..=backlog.len() as u64).collect::<Vec<_>>(),
        "what the slow consumer got is in order"
    );
    assert!(
        (backlog.len() as u64) < total,
        "the slow consumer got everything: it was not slow"
    );
    assert_eq!(code, Some(4009), "closed as a slow consumer");

    publisher.await.expect("publisher");
    let outcome = normal.task.await.expect("normal subscriber");
    let seen = std::mem::take(&mut *normal.seen.lock().unwrap());
    outcome.unwrap_or_else(|e| panic!("normal subscriber: {e}"));
    assert_eq!(seen.ns, (1..=total).collect::<Vec<_>>());
    let max_gap = seen
        .at
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!("normal subscriber: longest wait between two messages {max_gap:?}");
    assert!(
        max_gap < Duration::from_secs(5),
        "the normal subscriber stalled for {max_gap:?}"
    );
}
