//! One WebSocket server per process, the crate chosen on the command line; identical logic for all:
//!
//! - the accept loop of cozy's src/http/server.rs in miniature: hyper 1 `http1::Builder` with a timer,
//!   header read timeout, keep-alive, `.with_upgrades()`, requests through an axum `Router`;
//! - per upgraded connection: one reader task (the upgrade task itself) and one writer task fed by a
//!   bounded `tokio::sync::mpsc` (capacity 1024, cozy's `realtime_queue_frames` default) of [`Out`];
//! - a hub (id -> sender) and `/broadcast`, which sends one ~100-byte text frame to every connection,
//!   message after message, waiting on a full queue (so it goes as fast as the clients drain);
//! - `/stats`: RSS, live heap bytes (counting allocator), connections, CPU time (getrusage).
//!
//! Usage: server <axum|axum-small|axum-w0|axum-w1k|fws|fws-buf|tws|bare> <port>

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// Live heap bytes, to separate "what the program keeps" from what glibc keeps resident.

struct Counting;
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as i64 - l.size() as i64, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------------

const QUEUE: usize = 1024;
const MAX_MESSAGE: usize = 64 * 1024;
/// Frames written before a flush, at most.
const BATCH: usize = 64;

/// What the hub (and, for fastwebsockets, the reader's pong/close obligations) hands the writer.
enum Out {
    Text(Bytes),
    /// axum only: the same text, UTF-8 checked once by the broadcaster rather than once per connection.
    Utf8(axum::extract::ws::Utf8Bytes),
    /// fastwebsockets only: a control frame the reader must have sent (pong, close echo).
    Control(fastwebsockets::OpCode, Bytes),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    Axum,
    AxumSmall,
    /// read 4 KiB, write_buffer_size 0 (every frame written at once), as src/realtime/ws.rs had it.
    AxumW0,
    /// read 4 KiB, write_buffer_size 1 KiB: a batch goes out every ~9 frames of 110 bytes.
    AxumW1k,
    Fws,
    FwsBuf,
    Tws,
    /// Not a WebSocket: the same upgrade, tasks, queue and hub with a 64-byte read on the stack and
    /// raw writes. The floor that no crate can go below in this design.
    Bare,
}

struct Hub {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, mpsc::Sender<Out>>>,
    written: AtomicU64,
}

impl Hub {
    fn join(&self) -> (u64, mpsc::Sender<Out>, mpsc::Receiver<Out>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        self.conns.lock().unwrap().insert(id, tx.clone());
        (id, tx, rx)
    }
    fn leave(&self, id: u64) {
        self.conns.lock().unwrap().remove(&id);
    }
}

#[derive(Clone)]
struct App {
    imp: Impl,
    hub: Arc<Hub>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let imp = match args.get(1).map(String::as_str) {
        Some("axum") => Impl::Axum,
        Some("axum-small") => Impl::AxumSmall,
        Some("axum-w0") => Impl::AxumW0,
        Some("axum-w1k") => Impl::AxumW1k,
        Some("fws") => Impl::Fws,
        Some("fws-buf") => Impl::FwsBuf,
        Some("tws") => Impl::Tws,
        Some("bare") => Impl::Bare,
        _ => anyhow::bail!("usage: server <axum|axum-small|axum-w0|axum-w1k|fws|fws-buf|tws|bare> <port>"),
    };
    let port: u16 = args.get(2).map(|p| p.parse()).transpose()?.unwrap_or(9100);
    let app = App {
        imp,
        hub: Arc::new(Hub {
            next: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            written: AtomicU64::new(0),
        }),
    };
    let router = Router::new()
        .route("/ws", get(ws_handler))
        .route("/stats", get(stats))
        .route("/broadcast", get(broadcast))
        .with_state(app);

    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("server {imp:?} listening on {port}, pid {}", std::process::id());
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let _ = conn.await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Upgrade, per crate.

async fn ws_handler(State(app): State<App>, req: Request) -> Response {
    match app.imp {
        Impl::Axum | Impl::AxumSmall | Impl::AxumW0 | Impl::AxumW1k => {
            use axum::extract::FromRequestParts;
            let (mut parts, _body) = req.into_parts();
            let upgrade = match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
                Ok(u) => u,
                Err(e) => return e.into_response(),
            };
            let upgrade = upgrade.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE);
            let upgrade = if app.imp == Impl::AxumSmall {
                // Smallest sensible buffers: the read buffer is allocated up front at this size;
                // the write buffer grows on demand and is written out once it reaches this size.
                upgrade.read_buffer_size(4096).write_buffer_size(4096).max_write_buffer_size(64 * 1024)
            } else if app.imp == Impl::AxumW1k {
                upgrade.read_buffer_size(4096).write_buffer_size(1024).max_write_buffer_size(64 * 1024)
            } else if app.imp == Impl::AxumW0 {
                upgrade.read_buffer_size(4096).write_buffer_size(0).max_write_buffer_size(64 * 1024)
            } else {
                upgrade
            };
            let hub = app.hub.clone();
            upgrade.on_upgrade(move |socket| run_axum(socket, hub))
        }
        Impl::Fws | Impl::FwsBuf => {
            let mut req = req;
            let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
                Ok(x) => x,
                Err(e) => return (http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
            };
            let hub = app.hub.clone();
            let buffered = app.imp == Impl::FwsBuf;
            tokio::spawn(async move {
                match fut.await {
                    Ok(ws) => run_fws(ws, hub, buffered).await,
                    Err(e) => eprintln!("fws upgrade: {e}"),
                }
            });
            response.map(axum::body::Body::new)
        }
        Impl::Tws | Impl::Bare => {
            let bare = app.imp == Impl::Bare;
            let mut req = req;
            // tokio-websockets has no hyper integration: check the headers and answer ourselves.
            let key = match req.headers().get("sec-websocket-key") {
                Some(k) if req.headers().get("sec-websocket-version").map(|v| v.as_bytes()) == Some(b"13") => {
                    k.as_bytes().to_vec()
                }
                _ => return http::StatusCode::BAD_REQUEST.into_response(),
            };
            let mut sha = sha1_smol::Sha1::new();
            sha.update(&key);
            sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
            use base64::Engine;
            let accept = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            let hub = app.hub.clone();
            tokio::spawn(async move {
                match on_upgrade.await {
                    Ok(upgraded) if bare => run_bare(TokioIo::new(upgraded), hub).await,
                    Ok(upgraded) => {
                        let ws = tokio_websockets::ServerBuilder::new()
                            .limits(tokio_websockets::Limits::default().max_payload_len(Some(MAX_MESSAGE)))
                            .serve(TokioIo::new(upgraded));
                        run_tws(ws, hub).await
                    }
                    Err(e) => eprintln!("tws upgrade: {e}"),
                }
            });
            Response::builder()
                .status(http::StatusCode::SWITCHING_PROTOCOLS)
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, "websocket")
                .header("sec-websocket-accept", accept)
                .body(axum::body::Body::empty())
                .unwrap()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per connection: reader (this task) + writer task. Same shape for every crate.

async fn run_axum(socket: axum::extract::ws::WebSocket, hub: Arc<Hub>) {
    use axum::extract::ws::{Message, Utf8Bytes};
    let (id, tx, mut rx) = hub.join();
    drop(tx);
    let (mut sink, mut stream) = socket.split();
    let h = hub.clone();
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(out) = next.take() {
                let text = match out {
                    Out::Utf8(t) => Some(t),
                    Out::Text(b) => Some(Utf8Bytes::try_from(b).expect("utf-8")),
                    Out::Control(..) => None,
                };
                if let Some(text) = text {
                    if sink.feed(Message::Text(text)).await.is_err() {
                        return;
                    }
                    n += 1;
                }
                if n < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
            h.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = sink
            .send(Message::Close(Some(axum::extract::ws::CloseFrame { code: 1001, reason: "bye".into() })))
            .await;
    });
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    hub.leave(id);
    writer.abort();
}

async fn run_fws(
    ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    hub: Arc<Hub>,
    buffered: bool,
) {
    let mut ws = ws;
    ws.set_max_message_size(MAX_MESSAGE);
    // fastwebsockets writes every frame straight to the socket (one syscall each); `fws-buf` puts a
    // 4 KiB BufWriter under the write half so a batch goes out in one write, as the others do.
    if buffered {
        let (read, write) = ws.split(|s| {
            let (r, w) = tokio::io::split(s);
            (r, tokio::io::BufWriter::with_capacity(4096, w))
        });
        fws_conn(read, write, hub).await
    } else {
        let (read, write) = ws.split(tokio::io::split);
        fws_conn(read, write, hub).await
    }
}

async fn fws_conn<R, W>(
    mut read: fastwebsockets::WebSocketRead<R>,
    mut write: fastwebsockets::WebSocketWrite<W>,
    hub: Arc<Hub>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use fastwebsockets::{Frame, OpCode, Payload};
    let (id, tx, mut rx) = hub.join();
    let h = hub.clone();
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(out) = next.take() {
                let res = match &out {
                    Out::Text(b) => {
                        n += 1;
                        write.write_frame(Frame::text(Payload::Borrowed(b))).await
                    }
                    Out::Utf8(_) => unreachable!("axum only"),
                    Out::Control(op, b) => write.write_frame(Frame::new(true, *op, None, Payload::Borrowed(b))).await,
                };
                if res.is_err() {
                    return;
                }
                if n < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if write.flush().await.is_err() {
                return;
            }
            h.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = write.write_frame(Frame::close(1001, b"bye")).await;
        let _ = write.flush().await;
    });
    loop {
        // Pong and close echo are "obligated sends" the caller must deliver to the write half.
        let mut send = |f: Frame<'_>| {
            let tx = tx.clone();
            let out = Out::Control(f.opcode, Bytes::copy_from_slice(&f.payload));
            async move { tx.send(out).await }
        };
        match read.read_frame(&mut send).await {
            Ok(f) if f.opcode == OpCode::Close => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    hub.leave(id);
    drop(tx);
    writer.abort();
}

async fn run_tws(ws: tokio_websockets::WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, hub: Arc<Hub>) {
    use tokio_websockets::{CloseCode, Message, Payload};
    let (id, tx, mut rx) = hub.join();
    drop(tx);
    let (mut sink, mut stream) = ws.split();
    let h = hub.clone();
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(out) = next.take() {
                if let Out::Text(b) = out {
                    if sink.feed(Message::text(Payload::from(b))).await.is_err() {
                        return;
                    }
                    n += 1;
                }
                if n < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
            h.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = sink.send(Message::close(Some(CloseCode::GOING_AWAY), "bye")).await;
    });
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(m) if m.is_close() => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    hub.leave(id);
    writer.abort();
}

async fn run_bare(io: TokioIo<hyper::upgrade::Upgraded>, hub: Arc<Hub>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (id, tx, mut rx) = hub.join();
    drop(tx);
    let (mut read, mut write) = tokio::io::split(io);
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            if let Out::Text(b) = out {
                // Unmasked server text frame, payload < 126 bytes.
                let head = [0x81u8, b.len() as u8];
                if write.write_all(&head).await.is_err() || write.write_all(&b).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut buf = [0u8; 64];
    while let Ok(n) = read.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
    hub.leave(id);
    writer.abort();
}

// ---------------------------------------------------------------------------------------------
// Control endpoints (plain HTTP on the same listener).

fn cpu_us() -> (u64, u64) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

async fn stats(State(app): State<App>) -> String {
    let (u, s) = cpu_us();
    format!(
        "conns={} rss={} heap={} utime_us={} stime_us={} written={}\n",
        app.hub.conns.lock().unwrap().len(),
        rss_bytes(),
        LIVE.load(Ordering::Relaxed),
        u,
        s,
        app.hub.written.load(Ordering::Relaxed),
    )
}

/// Sends ~100-byte text frames to every connection for `secs`, then an "END" frame; answers with the
/// number of messages each connection was sent (END not counted) once all are queued.
async fn broadcast(State(app): State<App>, RawQuery(q): RawQuery) -> String {
    let secs: f64 = q.as_deref().and_then(|q| q.strip_prefix("secs=")).and_then(|v| v.parse().ok()).unwrap_or(10.0);
    let senders: Vec<mpsc::Sender<Out>> = app.hub.conns.lock().unwrap().values().cloned().collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        let text = format!("{{\"t\":\"msg\",\"room\":\"bench\",\"seq\":{seq:>10},\"body\":\"{}\"}}", "x".repeat(40));
        let frame = Bytes::from(text);
        let utf8 = matches!(app.imp, Impl::Axum | Impl::AxumSmall | Impl::AxumW0 | Impl::AxumW1k)
            .then(|| axum::extract::ws::Utf8Bytes::try_from(frame.clone()).expect("utf-8"));
        for tx in &senders {
            let out = match &utf8 {
                Some(t) => Out::Utf8(t.clone()),
                None => Out::Text(frame.clone()),
            };
            match tx.try_send(out) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(out)) => {
                    let _ = tx.send(out).await;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        seq += 1;
        // Let the writers run between messages on a busy runtime.
        if seq % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for tx in &senders {
        let _ = tx.send(Out::Text(Bytes::from_static(b"END"))).await;
    }
    format!("sent={seq} conns={} secs={:.3}\n", senders.len(), started.elapsed().as_secs_f64())
}
