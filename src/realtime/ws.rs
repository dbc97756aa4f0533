//! One WebSocket connection of `GET /v1/realtime`, from `hello` to close.
//!
//! Two tasks per connection: this reader (frames in, decisions) and a writer that drains the bounded
//! outbound queue the hub and the reader fill, and sends the heartbeat pings. Closing is always decided
//! here and carried out by the writer, through a separate unbounded control channel so that a close
//! still goes out when the queue is full (4009).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Notify};

use super::bus::BusEvent;
use super::frames::{
    close, ClientFrame, ErrorCode, Room, ServerFrame, MAX_BODY_BYTES, MAX_FRAME_BYTES,
};
use super::hub::{ConnHandle, Outbound};
use super::service::{LocalConn, Realtime};
use super::store::Published;
use crate::http::problem::Problem;
use crate::http::AppState;
use crate::time::{now_ms, rfc3339};

/// The first frame must be `hello` within this time.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// An `active: true` typing indicator not refreshed within this time is ended by the server.
pub const TYPING_TTL: Duration = Duration::from_secs(6);
/// Forbidden subscribe/publish attempts tolerated before closing with 4003.
const FORBIDDEN_LIMIT: u32 = 5;
/// Bytes of frames the writer feeds before it flushes. It matches the socket's write buffer
/// (`write_buffer_size` below: tungstenite writes out once its buffer holds more than that), so one
/// flush is one write of at most this much plus a frame, and the buffer never grows past about twice
/// it — a connection that once received a burst keeps that capacity (memory per idle connection).
const WRITE_BATCH_BYTES: usize = 4 * 1024;

/// Frames and socket writes of all connections, for `/metrics`: their ratio is how well the writer
/// coalesces (fan-out of one frame per subscriber at a time gives 1; a backlog gives more).
static FRAMES_SENT: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("cozy_websocket_frames_sent_total"));
static WRITES: LazyLock<metrics::Counter> =
    LazyLock::new(|| metrics::counter!("cozy_websocket_writes_total"));

/// One flush's worth of frames.
#[derive(Default)]
struct Batch {
    frames: u64,
    bytes: usize,
}

impl Batch {
    fn add(&mut self, text: &Utf8Bytes) {
        self.frames += 1;
        self.bytes += text.len();
    }

    fn count(&self) {
        FRAMES_SENT.increment(self.frames);
        WRITES.increment(1);
    }
}

/// `GET /v1/realtime`.
pub async fn handler(State(app): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let Some(rt) = app.realtime.clone() else {
        return Problem::unavailable("the realtime hub is not running in this process")
            .into_response();
    };
    ws
        // Small buffers: most connections are idle most of the time (memory per idle connection).
        .read_buffer_size(4 * 1024)
        // Frames are fed and flushed in batches of WRITE_BATCH_BYTES (see the writer); 4 KiB keeps an
        // idle connection under 16 KiB while costing ~8x less CPU per broadcast frame than writing
        // each one (docs/decisions.md, "WebSocket crate (measured)").
        .write_buffer_size(WRITE_BATCH_BYTES)
        // Frames over 64 KiB are refused by us with 4008; this only bounds what we read to decide that.
        .max_message_size(2 * MAX_FRAME_BYTES)
        .max_frame_size(2 * MAX_FRAME_BYTES)
        .on_upgrade(move |socket| connection(rt, app, socket))
}

fn close_msg(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

async fn connection(rt: Arc<Realtime>, app: AppState, socket: WebSocket) {
    rt.opened();
    let (mut sink, mut stream) = socket.split();

    // 1. hello.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await;
    let mut reference = None;
    let user = match hello {
        Ok(Some(Ok(Message::Text(text)))) => match ClientFrame::parse(&text) {
            Ok(ClientFrame::Hello {
                token,
                reference: r,
            }) => {
                reference = r;
                app.sessions.lookup(&token).await.ok().flatten()
            }
            _ => None,
        },
        _ => None,
    };
    let Some(user) = user else {
        let _ = sink
            .send(close_msg(
                close::AUTH,
                "authentication failed or no hello within 5 s",
            ))
            .await;
        rt.closed();
        return;
    };

    let conn_id: u64 = rand::random::<u64>() >> 1;
    let conn_name = format!("{conn_id:x}");
    let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(rt.settings.realtime_queue_frames);
    // At most one control message ever (the close): a oneshot costs a fraction of a channel's block.
    let (ctl_tx, mut ctl_rx) = tokio::sync::oneshot::channel::<Outbound>();
    let slow = Arc::new(Notify::new());
    let handle = ConnHandle {
        id: conn_id,
        user_id: user.id,
        out: out_tx.clone(),
        slow: slow.clone(),
    };
    rt.local.lock().unwrap().insert(
        conn_id,
        LocalConn {
            user_id: user.id,
            conn: conn_name.clone(),
            rooms: HashSet::new(),
        },
    );

    // 2. The writer: control first (closes), then queued frames, and the heartbeat pings.
    let heartbeat = rt.settings.realtime_heartbeat;
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        loop {
            let next = tokio::select! {
                biased;
                m = &mut ctl_rx => m.ok(),
                m = out_rx.recv() => m,
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            match next {
                Some(Outbound::Text(text)) => {
                    // Coalesce: feed every frame already queued (up to WRITE_BATCH_BYTES) and flush
                    // once, so a burst costs one socket write instead of one per frame.
                    let mut batch = Batch::default();
                    batch.add(&text);
                    if sink.feed(Message::Text(text)).await.is_err() {
                        return;
                    }
                    let mut closing = None;
                    while batch.bytes < WRITE_BATCH_BYTES {
                        match out_rx.try_recv() {
                            Ok(Outbound::Text(text)) => {
                                batch.add(&text);
                                if sink.feed(Message::Text(text)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(close) => {
                                closing = Some(close);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                    batch.count();
                    if let Some(Outbound::Close(code, reason)) = closing {
                        let _ = sink.send(close_msg(code, reason)).await;
                        let _ = sink.close().await;
                        return;
                    }
                }
                Some(Outbound::Close(code, reason)) => {
                    let _ = sink.send(close_msg(code, reason)).await;
                    let _ = sink.close().await;
                    return;
                }
                None => return,
            }
        }
    });

    let welcome = ServerFrame::Welcome {
        conn_id: conn_name.clone(),
        user_id: user.id,
        heartbeat_ms: heartbeat.as_millis() as u64,
        reference,
    };
    let _ = out_tx
        .send(Outbound::Text(Utf8Bytes::from(welcome.to_text())))
        .await;

    let mut conn = Conn {
        rt: rt.clone(),
        user_id: user.id,
        conn_id,
        conn_name,
        handle,
        out: out_tx,
        rooms: HashSet::new(),
        typing: HashMap::new(),
        forbidden: 0,
        bucket: Bucket::new(rt.settings.realtime_rate_per_sec),
    };

    // 3. The reader.
    let mut draining = rt.draining.clone();
    let mut last_seen = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let close: Option<(u16, &'static str)> = loop {
        if *draining.borrow() {
            break Some((close::GOING_AWAY, "server going away: reconnect and resume"));
        }
        tokio::select! {
            msg = stream.next() => {
                last_seen = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        // Boxed: the handling future (publish, subscribe) is large, and this loop's
                        // state would otherwise be that large for the whole life of an idle connection.
                        if let Some(c) = Box::pin(conn.frame(&text)).await {
                            break Some(c);
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        conn.reply(ServerFrame::error(ErrorCode::BadFrame, "text frames only (JSON)", None)).await;
                    }
                    Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => {
                        let message = e.to_string();
                        if message.contains("too long") || message.contains("Space limit") || message.contains("size") {
                            break Some((close::POLICY, "frame over 64 KiB"));
                        }
                        break None;
                    }
                }
            }
            _ = slow.notified() => break Some((close::SLOW_CONSUMER, "slow consumer: reconnect and resume")),
            _ = draining.changed() => {}
            _ = tick.tick() => {
                if last_seen.elapsed() > heartbeat * 2 + Duration::from_millis(500) {
                    tracing::debug!(conn = %conn.conn_name, "realtime: heartbeat timeout");
                    break None;
                }
                conn.expire_typing().await;
            }
        }
    };
    if let Some((code, reason)) = close {
        let _ = ctl_tx.send(Outbound::Close(code, reason));
    } else {
        drop(ctl_tx);
    }
    conn.cleanup().await;
    drop(conn);
    // A peer that reads nothing cannot receive its close frame: give up on it after 2 s.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    rt.closed();
}

/// A token bucket: `rate` frames per second, bursts of `2 × rate`.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
    violations: u32,
}

impl Bucket {
    fn new(rate: u32) -> Bucket {
        Bucket {
            rate: rate as f64,
            tokens: rate as f64 * 2.0,
            at: Instant::now(),
            violations: 0,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.violations = 0;
            true
        } else {
            self.violations += 1;
            false
        }
    }
}

struct Conn {
    rt: Arc<Realtime>,
    user_id: i64,
    conn_id: u64,
    conn_name: String,
    handle: ConnHandle,
    out: mpsc::Sender<Outbound>,
    rooms: HashSet<String>,
    typing: HashMap<String, Instant>,
    forbidden: u32,
    bucket: Bucket,
}

impl Conn {
    /// Direct replies wait for room in the queue (this connection's own reading pauses meanwhile).
    async fn reply(&self, frame: ServerFrame) {
        let _ = self
            .out
            .send(Outbound::Text(Utf8Bytes::from(frame.to_text())))
            .await;
    }

    /// Handles one text frame; `Some` closes the connection with that code.
    async fn frame(&mut self, text: &str) -> Option<(u16, &'static str)> {
        if text.len() > MAX_FRAME_BYTES {
            return Some((close::POLICY, "frame over 64 KiB"));
        }
        if !self.bucket.take() {
            if self.bucket.violations > self.bucket.rate as u32 {
                return Some((close::POLICY, "rate exceeded"));
            }
            self.reply(ServerFrame::error(
                ErrorCode::RateLimited,
                format!("more than {} frames per second", self.bucket.rate),
                reference_of(text),
            ))
            .await;
            return None;
        }
        let frame = match ClientFrame::parse(text) {
            Ok(f) => f,
            Err(error) => {
                self.reply(error).await;
                return None;
            }
        };
        let reference = frame.reference().map(str::to_string);
        match frame {
            ClientFrame::Hello { .. } => {
                self.reply(ServerFrame::error(
                    ErrorCode::BadFrame,
                    "already authenticated",
                    reference,
                ))
                .await;
            }
            ClientFrame::Ping { .. } => self.reply(ServerFrame::Pong { reference }).await,
            ClientFrame::Subscribe { room, since, .. } => {
                return self.subscribe(room, since, reference).await;
            }
            ClientFrame::Unsubscribe { room, .. } => {
                if !self.rooms.remove(&room) {
                    self.reply(ServerFrame::error(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {room}"),
                        reference,
                    ))
                    .await;
                    return None;
                }
                self.rt.hub.unsubscribe(self.conn_id, room.clone());
                self.stop_typing(&room).await;
                self.leave_presence(&room).await;
                self.reply(ServerFrame::Unsubscribed { room, reference })
                    .await;
            }
            ClientFrame::Publish {
                room,
                client_msg_id,
                body,
                ..
            } => return self.publish(room, client_msg_id, body, reference).await,
            ClientFrame::Typing { room, active, .. } => {
                let Some(parsed) = Room::parse(&room) else {
                    self.reply(bad_room(&room, reference)).await;
                    return None;
                };
                if !parsed.clients_may_publish() {
                    return self
                        .forbid(format!("typing is for chat rooms, not {room}"), reference)
                        .await;
                }
                if !self.rooms.contains(&room) {
                    self.reply(ServerFrame::error(
                        ErrorCode::NotSubscribed,
                        format!("subscribe to {room} first"),
                        reference,
                    ))
                    .await;
                    return None;
                }
                if active {
                    let fresh = self
                        .typing
                        .insert(room.clone(), Instant::now() + TYPING_TTL)
                        .is_none();
                    if fresh {
                        self.broadcast_typing(&room, true).await;
                    }
                } else {
                    self.stop_typing(&room).await;
                }
            }
        }
        None
    }

    async fn forbid(
        &mut self,
        message: String,
        reference: Option<String>,
    ) -> Option<(u16, &'static str)> {
        self.forbidden += 1;
        self.reply(ServerFrame::error(ErrorCode::Forbidden, message, reference))
            .await;
        (self.forbidden >= FORBIDDEN_LIMIT).then_some((close::FORBIDDEN, "forbidden"))
    }

    async fn subscribe(
        &mut self,
        room: String,
        since: Option<u64>,
        reference: Option<String>,
    ) -> Option<(u16, &'static str)> {
        let Some(parsed) = Room::parse(&room) else {
            self.reply(bad_room(&room, reference)).await;
            return None;
        };
        if !parsed.may_subscribe(self.user_id) {
            return self
                .forbid(format!("{room} is another user's room"), reference)
                .await;
        }
        let now = now_ms();
        match self
            .rt
            .presence
            .join(&room, self.user_id, &self.conn_name, now)
            .await
        {
            Ok(Some(change)) => self.rt.announce(vec![change]),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, room, "realtime: presence join failed"),
        }
        let presence = self.rt.presence.snapshot(&room).await.unwrap_or_default();
        self.rooms.insert(room.clone());
        if let Some(local) = self.rt.local.lock().unwrap().get_mut(&self.conn_id) {
            local.rooms.insert(room.clone());
        }
        self.rt
            .hub
            .subscribe(self.handle.clone(), room, since, reference, presence);
        None
    }

    async fn publish(
        &mut self,
        room: String,
        client_msg_id: String,
        body: serde_json::Value,
        reference: Option<String>,
    ) -> Option<(u16, &'static str)> {
        let Some(parsed) = Room::parse(&room) else {
            self.reply(bad_room(&room, reference)).await;
            return None;
        };
        if !parsed.clients_may_publish() {
            return self
                .forbid(format!("only the server publishes in {room}"), reference)
                .await;
        }
        if !self.rooms.contains(&room) {
            self.reply(ServerFrame::error(
                ErrorCode::NotSubscribed,
                format!("subscribe to {room} before publishing"),
                reference,
            ))
            .await;
            return None;
        }
        if client_msg_id.is_empty() || client_msg_id.len() > 128 {
            self.reply(ServerFrame::error(
                ErrorCode::BadFrame,
                "client_msg_id: 1 to 128 characters",
                reference,
            ))
            .await;
            return None;
        }
        let size = serde_json::to_string(&body)
            .map(|s| s.len())
            .unwrap_or(usize::MAX);
        if size > MAX_BODY_BYTES {
            self.reply(ServerFrame::error(
                ErrorCode::TooLarge,
                format!("body is {size} bytes; the limit is {MAX_BODY_BYTES}"),
                reference,
            ))
            .await;
            return None;
        }
        let published = self
            .rt
            .store
            .publish(&room, self.user_id, &client_msg_id, &body, now_ms())
            .await;
        let message = match published {
            Ok(Published::New(m)) => {
                self.rt
                    .bus
                    .publish(BusEvent::Sequenced {
                        room: m.room.clone(),
                        seq: m.seq,
                        frame: m.to_frame().to_text(),
                    })
                    .await;
                m
            }
            Ok(Published::Duplicate(m)) => m,
            Err(e) => {
                tracing::error!(error = %e, room, "realtime: cannot store a message");
                return Some((1011, "internal error: resend after reconnecting"));
            }
        };
        self.reply(ServerFrame::Ack {
            client_msg_id,
            seq: message.seq,
            ts: rfc3339(message.created_at),
            reference,
        })
        .await;
        None
    }

    async fn broadcast_typing(&self, room: &str, active: bool) {
        let frame = ServerFrame::Typing {
            room: room.to_string(),
            user_id: self.user_id,
            active,
        };
        self.rt
            .bus
            .publish(BusEvent::Ephemeral {
                room: room.to_string(),
                frame: frame.to_text(),
                exclude_user: Some(self.user_id),
            })
            .await;
    }

    async fn stop_typing(&mut self, room: &str) {
        if self.typing.remove(room).is_some() {
            self.broadcast_typing(room, false).await;
        }
    }

    /// Ends typing indicators not refreshed within [`TYPING_TTL`].
    async fn expire_typing(&mut self) {
        let now = Instant::now();
        let over: Vec<String> = self
            .typing
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(room, _)| room.clone())
            .collect();
        for room in over {
            self.stop_typing(&room).await;
        }
    }

    async fn leave_presence(&mut self, room: &str) {
        if let Some(local) = self.rt.local.lock().unwrap().get_mut(&self.conn_id) {
            local.rooms.remove(room);
        }
        match self
            .rt
            .presence
            .leave(room, self.user_id, &self.conn_name)
            .await
        {
            Ok(Some(change)) => self.rt.announce(vec![change]),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, room, "realtime: presence leave failed"),
        }
    }

    async fn cleanup(&mut self) {
        self.rt.hub.disconnect(self.conn_id);
        let rooms: Vec<String> = self.rooms.drain().collect();
        for room in &rooms {
            self.stop_typing(room).await;
            self.leave_presence(room).await;
        }
        self.rt.local.lock().unwrap().remove(&self.conn_id);
    }
}

/// The `ref` of a frame refused before it is parsed (over the rate): that reply echoes it too, as every
/// direct reply does. The parse costs about what the reply does, and a client that keeps going is closed
/// after `rate` refusals in a row.
fn reference_of(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ref {
        #[serde(rename = "ref")]
        reference: Option<String>,
    }
    serde_json::from_str::<Ref>(text)
        .ok()
        .and_then(|r| r.reference)
}

fn bad_room(room: &str, reference: Option<String>) -> ServerFrame {
    ServerFrame::error(
        ErrorCode::BadFrame,
        format!("unknown room {room:?}: rooms are chat:<name>, resource:<id> or user:<id>"),
        reference,
    )
}
