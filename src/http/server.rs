//! The HTTP/1.1 accept loop, with a drain that hands keep-alive clients over instead of dropping them.
//!
//! Why not `axum::serve(..).with_graceful_shutdown(..)`: at shutdown it closes every idle keep-alive
//! connection at once. A client that took such a connection from its pool a moment earlier already has
//! its request on the wire and gets a reset instead of an answer — a failed request on every rolling
//! reload. When `shutdown` resolves, [`serve`] instead:
//!
//! 1. stops accepting and closes *its copy* of the listening socket. The socket may be shared with other
//!    processes (the cluster's workers); they keep accepting from the same queue, so nothing is lost.
//! 2. marks every response `Connection: close`. A client sending on a kept-alive connection gets its
//!    answer, sees the header, and opens its next connection — which lands on a process still accepting.
//! 3. gives each connection [`DrainPolicy::idle_grace`] to send such a request, then asks hyper to close
//!    it gracefully: at once when idle, otherwise after the response in flight.
//! 4. waits up to [`DrainPolicy::timeout`] for every connection to end, then aborts the rest.
//!
//! Only HTTP/1.1 is served (with upgrades, for WebSockets), like the rest of the crate. An upgraded
//! connection leaves this loop once it is handed to its handler; such handlers watch
//! [`ServerStats::draining`] to say goodbye themselves.
//!
//! Everything a connection needs from the loop travels in a `watch` channel (draining or not) and an
//! `Arc<ServerStats>`; no globals, so several servers can run in one process (the tests do).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::Router;
use http::header::{HeaderValue, CONNECTION};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// A client must send a request's whole head within this time. In hyper 1 the clock also runs while a
/// kept-alive connection sits idle, so this doubles as the idle keep-alive timeout.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait before accepting again after an error that is about us (out of descriptors or
/// memory), not about one peer. Retrying at once would spin without freeing anything.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Live counters of one serving process (the cluster master shows them in `cozy status`).
#[derive(Debug)]
pub struct ServerStats {
    connections: AtomicU64,
    requests: AtomicU64,
    draining: watch::Sender<bool>,
}

impl ServerStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            draining: watch::Sender::new(false),
        })
    }

    /// Connections open right now (a gauge). Upgraded connections stop counting once handed over.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Responses handed to a connection for writing since start (a counter).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether the server has stopped accepting and is draining its connections.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Flips to `true` once when the drain starts. Long-lived handlers (WebSockets) watch it and close
    /// with 1001 "going away" so their clients reconnect elsewhere.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }
}

/// How [`serve`] lets its connections go when told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPolicy {
    /// How long each connection may still bring a request (answered with `Connection: close`) before it
    /// is closed. Covers a client that took the connection from its pool just before the drain.
    pub idle_grace: Duration,
    /// The longest the whole drain may take; connections still open then are cut off.
    pub timeout: Duration,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        Self {
            idle_grace: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains as the module documentation
/// describes and returns `Ok`. Accept errors are logged and retried, never returned: one bad moment
/// (a full descriptor table) must not end the process.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    policy: DrainPolicy,
    stats: Arc<ServerStats>,
) -> io::Result<()> {
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let open = OpenConnection::new(stats.clone());
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        router.clone(),
                        drain_rx.clone(),
                        policy.idle_grace,
                        open,
                    ));
                }
                Err(e) => accept_failed(e).await,
            },
            // Reap finished connections as we go, or the set grows with every connection ever served.
            Some(joined) = connections.join_next() => log_panic(joined),
        }
    }

    // Close only our copy of the socket: other processes accepting on it carry on with its queue.
    drop(listener);
    while let Some(joined) = connections.try_join_next() {
        log_panic(joined);
    }
    drain_tx.send_replace(true);
    stats.draining.send_replace(true);
    let started = Instant::now();
    tracing::info!(
        connections = connections.len(),
        idle_grace_ms = policy.idle_grace.as_millis() as u64,
        timeout_ms = policy.timeout.as_millis() as u64,
        "draining: stopped accepting; answering with Connection: close"
    );

    let _ = tokio::time::timeout(policy.timeout, async {
        while let Some(joined) = connections.join_next().await {
            log_panic(joined);
        }
    })
    .await;
    let cut = connections.len();
    // Aborting drops each connection's socket (the client sees it closed) and its gauge guard.
    connections.shutdown().await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if cut > 0 {
        tracing::info!(
            elapsed_ms,
            cut,
            "drained; connections still busy at the drain timeout were cut off"
        );
    } else {
        tracing::info!(elapsed_ms, cut, "drained");
    }
    Ok(())
}

/// One connection, from accept to close.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    mut drain: watch::Receiver<bool>,
    idle_grace: Duration,
    open: OpenConnection,
) {
    // Responses are written whole; Nagle would only hold back the last segment of each.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let service = {
        let drain = drain.clone();
        let stats = open.0.clone();
        hyper::service::service_fn(move |request| {
            respond(router.clone(), request, peer, drain.clone(), stats.clone())
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = pin!(conn);

    let ended = tokio::select! {
        ended = conn.as_mut() => Some(ended),
        () = drain_started(&mut drain) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        // Draining: a request still arriving is answered (with Connection: close, which makes hyper
        // close after writing it); after the grace, hyper closes at once if idle, or after the response.
        None => match tokio::time::timeout(idle_grace, conn.as_mut()).await {
            Ok(ended) => ended,
            Err(_) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        },
    };
    if let Err(e) = ended {
        // Clients hanging up mid-request, header timeouts, garbage: routine for a public server.
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    drop(open);
}

/// Runs one request through the router, noting the peer, counting the response and, once draining,
/// telling the client not to reuse the connection.
async fn respond(
    router: Router,
    mut request: Request<Incoming>,
    peer: SocketAddr,
    drain: watch::Receiver<bool>,
    stats: Arc<ServerStats>,
) -> Result<Response, Infallible> {
    request.extensions_mut().insert(ConnectInfo(peer));
    let Ok(mut response) = router.oneshot(request).await;
    // A 101 must keep its `Connection: upgrade`; the upgraded protocol says goodbye its own way.
    if *drain.borrow() && response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    Ok(response)
}

/// Resolves once draining starts (or the server is gone, which means the same).
async fn drain_started(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|draining| *draining).await;
}

async fn accept_failed(e: io::Error) {
    tracing::warn!(error = %e, "accept failed; accepting again");
    // A peer that gave up before we accepted says nothing about us: go on at once. Anything else
    // (EMFILE, ENFILE, ENOMEM) needs connections to close first; give them a moment.
    if !matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) {
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }
}

fn log_panic(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            tracing::error!(error = %e, "a connection task panicked");
        }
    }
}

/// Counts a connection as open for exactly as long as it lives; created at accept and moved into the
/// connection's task, so a task aborted (even before it first ran) still uncounts itself.
struct OpenConnection(Arc<ServerStats>);

impl OpenConnection {
    fn new(stats: Arc<ServerStats>) -> Self {
        stats.connections.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use axum::extract::{Query, State};
    use axum::routing::get;
    use serde::Deserialize;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;

    /// Far above anything the tests need on an idle machine, so a loaded one does not fail them.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Handlers of `/slow` that have started.
    type Started = Arc<AtomicUsize>;

    #[derive(Deserialize)]
    struct Slow {
        ms: u64,
    }

    fn test_router(started: Started) -> Router {
        Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(
                    |State(started): State<Started>, Query(slow): Query<Slow>| async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(slow.ms)).await;
                        "slow"
                    },
                ),
            )
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .with_state(started)
    }

    /// A server running in a task, and the handles to watch and stop it.
    struct Running {
        addr: SocketAddr,
        stats: Arc<ServerStats>,
        started: Started,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<io::Result<()>>,
    }

    impl Running {
        fn on(listener: std::net::TcpListener, policy: DrainPolicy) -> Self {
            listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(listener).unwrap();
            let addr = listener.local_addr().unwrap();
            let stats = ServerStats::new();
            let started = Started::default();
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(serve(
                listener,
                test_router(started.clone()),
                async {
                    let _ = stopped.await;
                },
                policy,
                stats.clone(),
            ));
            Self {
                addr,
                stats,
                started,
                stop: Some(stop),
                task,
            }
        }

        fn start(policy: DrainPolicy) -> Self {
            Self::on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), policy)
        }

        fn shut_down(&mut self) {
            let _ = self.stop.take().expect("stopped twice").send(());
        }

        /// Waits for `serve` to return and checks that it returned `Ok`.
        async fn finished(self) {
            tokio::time::timeout(PATIENCE, self.task)
                .await
                .expect("serve did not return")
                .expect("serve panicked")
                .expect("serve failed");
        }
    }

    /// A raw HTTP/1.1 client on one connection: it hides nothing (no retries, no pool).
    struct Client {
        conn: BufReader<TcpStream>,
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        close: bool,
        body: String,
    }

    impl Client {
        async fn connect(addr: SocketAddr) -> io::Result<Self> {
            Ok(Self {
                conn: BufReader::new(TcpStream::connect(addr).await?),
            })
        }

        fn local_addr(&self) -> SocketAddr {
            self.conn.get_ref().local_addr().unwrap()
        }

        async fn get(&mut self, path: &str) -> io::Result<Reply> {
            let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
            self.conn.get_mut().write_all(request.as_bytes()).await?;
            let status_line = self.line().await?;
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
            let (mut close, mut length) = (false, 0);
            loop {
                let line = self.line().await?;
                let Some((name, value)) = line.split_once(':') else {
                    break;
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("connection") {
                    close = value.eq_ignore_ascii_case("close");
                } else if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().map_err(io::Error::other)?;
                }
            }
            let mut body = vec![0; length];
            self.conn.read_exact(&mut body).await?;
            Ok(Reply {
                status,
                close,
                body: String::from_utf8(body).map_err(io::Error::other)?,
            })
        }

        async fn line(&mut self) -> io::Result<String> {
            let mut line = String::new();
            if self.conn.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(line.trim_end().to_owned())
        }

        /// True when the server closes the connection (rather than leaving it open for more).
        async fn closed_by_server(&mut self) -> bool {
            let mut byte = [0; 1];
            matches!(
                tokio::time::timeout(PATIENCE, self.conn.read(&mut byte)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }

    async fn eventually(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_slow_request_in_flight_at_shutdown_is_answered_before_serve_returns() {
        let mut server = Running::start(DrainPolicy::default());
        let mut client = Client::connect(server.addr).await.unwrap();
        let reply = tokio::spawn(async move { client.get("/slow?ms=2000").await });
        let started = server.started.clone();
        eventually("the slow handler runs", || {
            started.load(Ordering::SeqCst) == 1
        })
        .await;

        server.shut_down();
        let stats = server.stats.clone();
        eventually("the drain starts", || stats.is_draining()).await;
        assert!(
            !server.task.is_finished(),
            "serve returned with a request in flight"
        );

        let reply = reply.await.unwrap().expect("the in-flight request failed");
        assert_eq!((reply.status, reply.body.as_str()), (200, "slow"));
        server.finished().await;
    }

    #[tokio::test]
    async fn a_keep_alive_client_is_told_to_close_during_the_drain() {
        // A grace longer than the test: the connection can only close because of the header.
        let policy = DrainPolicy {
            idle_grace: Duration::from_secs(60),
            timeout: Duration::from_secs(60),
        };
        let mut server = Running::start(policy);
        let mut client = Client::connect(server.addr).await.unwrap();
        let before = client.get("/").await.unwrap();
        assert_eq!(before.status, 200);
        assert!(!before.close, "closed before the drain");

        server.shut_down();
        let stats = server.stats.clone();
        eventually("the drain starts", || stats.is_draining()).await;
        let during = client.get("/").await.expect("the pooled connection failed");
        assert_eq!(during.status, 200);
        assert!(during.close, "no Connection: close during the drain");
        assert!(client.closed_by_server().await);
        // The last connection is gone, so serve returns without waiting out the grace.
        server.finished().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rolling_handover_on_a_shared_socket_loses_no_request() {
        const CLIENTS: usize = 4;
        const BATCH: u64 = 100;

        #[derive(Default)]
        struct Tally {
            answered: AtomicU64,
            failed: AtomicU64,
            closes: AtomicU64,
            stop: std::sync::atomic::AtomicBool,
        }

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let second_copy = listener.try_clone().unwrap();
        // A grace far above any stall of a client task, so only a real race could fail a request.
        let policy = DrainPolicy {
            idle_grace: Duration::from_secs(5),
            timeout: PATIENCE,
        };
        let mut old = Running::on(listener, policy);
        let addr = old.addr;

        // Keep-alive clients under continuous load; each reconnects only when told to close.
        let tally = Arc::new(Tally::default());
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let tally = tally.clone();
            clients.push(tokio::spawn(async move {
                let mut client = None;
                while !tally.stop.load(Ordering::SeqCst) {
                    if client.is_none() {
                        match Client::connect(addr).await {
                            Ok(c) => client = Some(c),
                            Err(e) => {
                                eprintln!("connect failed: {e}");
                                tally.failed.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                        }
                    }
                    match client.as_mut().unwrap().get("/").await {
                        Ok(reply) if reply.status == 200 => {
                            tally.answered.fetch_add(1, Ordering::SeqCst);
                            if reply.close {
                                tally.closes.fetch_add(1, Ordering::SeqCst);
                                client = None;
                            }
                        }
                        outcome => {
                            eprintln!("request failed: {outcome:?}");
                            tally.failed.fetch_add(1, Ordering::SeqCst);
                            client = None;
                        }
                    }
                }
            }));
        }

        // Every client is on the old server (it is alone) when the new one starts on the same socket.
        let t = tally.clone();
        eventually("the old server has answered a batch", || {
            t.answered.load(Ordering::SeqCst) >= BATCH
        })
        .await;
        let new = Running::on(second_copy, policy);
        let old_stats = old.stats.clone();
        old.shut_down();
        old.finished().await;
        let handed_over = tally.answered.load(Ordering::SeqCst);
        eventually("the new server has answered a batch", || {
            t.answered.load(Ordering::SeqCst) >= handed_over + BATCH
        })
        .await;

        tally.stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        let new_stats = new.stats.clone();
        let mut new = new;
        new.shut_down();
        new.finished().await;

        let answered = tally.answered.load(Ordering::SeqCst);
        assert_eq!(tally.failed.load(Ordering::SeqCst), 0, "failed requests");
        assert_eq!(
            old_stats.requests() + new_stats.requests(),
            answered,
            "every response the servers counted reached a client, and no other"
        );
        assert!(
            tally.closes.load(Ordering::SeqCst) >= CLIENTS as u64,
            "each client on the old server was told to close"
        );
        assert!(new_stats.requests() >= BATCH, "the new server took over");
    }

    #[tokio::test]
    async fn a_request_still_running_at_the_drain_timeout_is_cut_off() {
        let policy = DrainPolicy {
            idle_grace: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
        };
        let mut server = Running::start(policy);
        let mut client = Client::connect(server.addr).await.unwrap();
        let reply = tokio::spawn(async move { client.get("/slow?ms=60000").await });
        let started = server.started.clone();
        eventually("the slow handler runs", || {
            started.load(Ordering::SeqCst) == 1
        })
        .await;

        let stopping = Instant::now();
        server.shut_down();
        let stats = server.stats.clone();
        server.finished().await;
        assert!(
            stopping.elapsed() >= policy.timeout,
            "serve returned before the drain timeout"
        );
        let reply = tokio::time::timeout(PATIENCE, reply)
            .await
            .expect("the cut connection stayed open")
            .unwrap();
        assert!(reply.is_err(), "a cut request got {reply:?}");
        assert_eq!(stats.connections(), 0);
    }

    #[tokio::test]
    async fn stats_count_open_connections_and_responses() {
        let mut server = Running::start(DrainPolicy::default());
        let stats = server.stats.clone();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(Client::connect(server.addr).await.unwrap());
        }
        eventually("three connections are open", || stats.connections() == 3).await;
        for client in &mut clients {
            for _ in 0..2 {
                assert_eq!(client.get("/").await.unwrap().status, 200);
            }
        }
        assert_eq!(stats.requests(), 6);

        drop(clients);
        eventually("every connection is closed", || stats.connections() == 0).await;
        assert_eq!(stats.requests(), 6);

        let mut draining = stats.draining();
        assert!(!stats.is_draining() && !*draining.borrow());
        server.shut_down();
        tokio::time::timeout(PATIENCE, draining.wait_for(|d| *d))
            .await
            .expect("draining never flipped")
            .unwrap();
        assert!(stats.is_draining());
        server.finished().await;
    }

    #[tokio::test]
    async fn handlers_see_the_peer_address_as_connect_info() {
        let mut server = Running::start(DrainPolicy::default());
        let mut client = Client::connect(server.addr).await.unwrap();
        let reply = client.get("/peer").await.unwrap();
        assert_eq!(reply.body, client.local_addr().to_string());
        drop(client);
        server.shut_down();
        server.finished().await;
    }
}
