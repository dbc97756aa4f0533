//! A WebSocket client of `/v1/realtime` through nginx (realtime-protocol.md), plain tokio-tungstenite:
//! it hides nothing (no reconnect, no dedupe), so a test sees exactly what a browser behind the proxy
//! would. The handshake names Host cozy.test (nginx serves no other name) and may carry an X-Request-Id,
//! which nginx logs with the upstream the connection went to.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::estate::HOST;
use crate::helpers::random_suffix;

/// How long one expected frame may take: far above anything on an idle machine.
pub const WAIT: Duration = Duration::from_secs(15);

pub struct Ws {
    ws: WebSocketStream<TcpStream>,
    /// Messages read while waiting for another frame, oldest first.
    pending: VecDeque<Value>,
    /// The `welcome` frame (conn_id, user_id, heartbeat_ms).
    pub welcome: Value,
}

/// What came next on the connection.
#[derive(Debug)]
pub enum Incoming {
    Frame(Value),
    /// The connection ended (with a close frame or without).
    Closed,
}

impl Ws {
    /// Connects through nginx's plain HTTP `port` and says hello with `token`.
    pub async fn open(port: u16, token: &str, request_id: Option<&str>) -> Result<Ws, String> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect to nginx: {e}"))?;
        let _ = stream.set_nodelay(true);
        let mut request = format!("ws://{HOST}:{port}/v1/realtime")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        if let Some(id) = request_id {
            request
                .headers_mut()
                .insert("x-request-id", id.parse().unwrap());
        }
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
            .await
            .map_err(|_| "no answer to the WebSocket handshake".to_string())?
            .map_err(|e| format!("handshake: {e}"))?;
        let mut ws = Ws {
            ws,
            pending: VecDeque::new(),
            welcome: Value::Null,
        };
        ws.send(json!({"type": "hello", "token": token})).await?;
        match ws.next(WAIT).await {
            Some(Incoming::Frame(f)) if f["type"] == "welcome" => {
                ws.welcome = f;
                Ok(ws)
            }
            other => Err(format!("no welcome: {other:?}")),
        }
    }

    pub fn heartbeat_ms(&self) -> u64 {
        self.welcome["heartbeat_ms"].as_u64().unwrap_or(0)
    }

    pub async fn send(&mut self, frame: Value) -> Result<(), String> {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .map_err(|e| e.to_string())
    }

    /// The next frame or the end of the connection; `None` if nothing came within `within`. Reading is
    /// also what answers the server's pings (tungstenite queues the pong and flushes it on the next I/O).
    pub async fn next(&mut self, within: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            return Some(match msg {
                Some(Ok(Message::Text(text))) => Incoming::Frame(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("a frame that is not JSON ({e}): {text}")),
                ),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Incoming::Closed,
                Some(Ok(_)) => continue,
            });
        }
    }

    /// Reads until a frame matches `pred` and returns it. Messages read on the way are kept for
    /// [`Ws::message`]; other frames (presence, typing) are dropped.
    pub async fn recv_until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(f)) if pred(&f) => return f,
                Some(Incoming::Frame(f)) if f["type"] == "message" => self.pending.push_back(f),
                Some(Incoming::Frame(_)) => {}
                other => panic!("waiting for {what}: got {other:?}"),
            }
        }
    }

    /// The next `message` frame of `room` (one read earlier, while waiting for something else, first).
    pub async fn message(&mut self, room: &str) -> Value {
        if let Some(i) = self.pending.iter().position(|f| f["room"] == room) {
            return self.pending.remove(i).unwrap();
        }
        self.recv_until(&format!("a message in {room}"), |f| {
            f["type"] == "message" && f["room"] == room
        })
        .await
    }

    /// Subscribes (with `since`, a resume); the `subscribed` reply and the room's messages replayed before it.
    pub async fn subscribe(&mut self, room: &str, since: Option<u64>) -> (Value, Vec<Value>) {
        let reference = random_suffix();
        let mut frame = json!({"type": "subscribe", "room": room, "ref": reference});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        self.send(frame).await.unwrap();
        let deadline = Instant::now() + WAIT;
        let mut replay = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(f)) if f["ref"] == reference.as_str() => {
                    assert_eq!(f["type"], "subscribed", "subscribe {room}: {f}");
                    return (f, replay);
                }
                Some(Incoming::Frame(f)) if f["type"] == "message" && f["room"] == room => {
                    replay.push(f)
                }
                Some(Incoming::Frame(f)) if f["type"] == "message" => self.pending.push_back(f),
                Some(Incoming::Frame(_)) => {}
                other => panic!("waiting for the reply to subscribe {room}: got {other:?}"),
            }
        }
    }

    /// Publishes; the `ack` (with the message's `seq`).
    pub async fn publish(&mut self, room: &str, client_msg_id: &str, body: Value) -> Value {
        self.send(
            json!({"type": "publish", "room": room, "client_msg_id": client_msg_id, "body": body}),
        )
        .await
        .unwrap_or_else(|e| panic!("publish {client_msg_id}: {e}"));
        self.recv_until(&format!("the ack of {client_msg_id}"), |f| {
            f["type"] == "ack" && f["client_msg_id"] == client_msg_id
        })
        .await
    }

    /// Reads for `within` with nothing sent: `Ok(frames)` if the connection stayed open, else
    /// `Err(how long it lasted)`.
    pub async fn idle(&mut self, within: Duration) -> Result<Vec<Value>, Duration> {
        let started = Instant::now();
        let deadline = started + within;
        let mut frames = Vec::new();
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(f)) => frames.push(f),
                Some(Incoming::Closed) => return Err(started.elapsed()),
                None => return Ok(frames),
            }
        }
    }

    /// Waits for the connection to end (frames before it are dropped); `false` if it is still open
    /// after `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Some(Incoming::Frame(_)) => {}
                Some(Incoming::Closed) => return true,
                None => return false,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        while let Some(Incoming::Frame(_)) = self.next(Duration::from_secs(5)).await {}
    }
}

/// The `seq` of a frame.
pub fn seq(f: &Value) -> u64 {
    f["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("a frame without seq: {f}"))
}
