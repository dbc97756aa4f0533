//! The supervised cluster (`cozy serve --workers N`) seen from outside: a real master and real worker
//! processes on MySQL + Redis, killed, reloaded and stopped while clients keep sending requests.
//!
//! The tests assert what a client or an operator can observe — answers, exit statuses, `cozy status`,
//! the master's log, `/proc` — and never how fast something happened: the machine running them may be
//! two loaded cores. The one figure worth knowing, how long a slot stays empty after kill -9, is printed.
//!
//! Two kinds of load clients: reqwest with its default keep-alive pool (what most callers use), and a raw
//! HTTP/1.1 client over a `TcpStream` that never retries and reconnects only when told `Connection:
//! close`. reqwest may silently resend a request whose pooled connection turned out to be closed, so only
//! the raw client proves that a rolling reload loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::helpers::{mysql_base_url, random_suffix, send_request, Backend, TestApp, COZY};

/// Far above what anything here takes on an idle machine, so that a loaded one does not fail a test.
const PATIENCE: Duration = Duration::from_secs(30);

/// Each worker's database pool: several clusters of three workers run side by side (nextest runs four
/// tests at once) and must stay under MariaDB's default `max_connections` of 151.
const POOL_PER_WORKER: (&str, &str) = ("COZY_DB_MAX_CONNECTIONS", "6");

// ---------------------------------------------------------------------------------------------------
// The cluster under test
// ---------------------------------------------------------------------------------------------------

/// A running `cozy serve --workers N` on a fresh MySQL database with Redis sessions.
///
/// Derefs to the [`TestApp`] that holds its environment, database and HTTP helpers (`user`, `admin`,
/// `reserve`, `pay`, `audit` …), with `base` pointing at the cluster. Dropping it SIGKILLs the master and
/// every worker it has seen (through `cozy status` or the master's log), so a failed test leaves no
/// process behind.
pub(crate) struct TestCluster {
    app: TestApp,
    master: Child,
    first_line: Option<tokio::sync::oneshot::Receiver<String>>,
    seen: Mutex<BTreeSet<u32>>,
}

impl Deref for TestCluster {
    type Target = TestApp;

    fn deref(&self) -> &TestApp {
        &self.app
    }
}

impl TestCluster {
    /// Migrates a fresh database, starts the master with `workers` workers and waits until it listens.
    pub(crate) async fn start(workers: usize, env: &[(&str, &str)], args: &[&str]) -> TestCluster {
        let app = cluster_app(env).await;
        app.migrate();
        let mut cluster = Self::launch(app, workers, args);
        cluster.wait_listening().await;
        cluster
    }

    /// Starts `cozy serve --listen 127.0.0.1:0 --workers N ARGS` with `app`'s environment; does not wait.
    fn launch(app: TestApp, workers: usize, args: &[&str]) -> TestCluster {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(app.log_path())
            .expect("open the server log");
        let mut cmd = Command::new(COZY);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers"])
            .arg(workers.to_string())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &app.env {
            cmd.env(k, v);
        }
        cmd.current_dir(app.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut master = cmd.spawn().expect("spawn cozy serve --workers");
        let stdout = master.stdout.take().expect("piped stdout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the master never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        TestCluster {
            app,
            master,
            first_line: Some(rx),
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    /// Waits for `cozy listening on http://ADDR (master pid P, N workers)` and points `base` there.
    async fn wait_listening(&mut self) {
        let rx = self.first_line.take().expect("waited twice");
        let line = tokio::time::timeout(PATIENCE, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let Some(rest) = line.trim().strip_prefix("cozy listening on ") else {
            panic!("the cluster did not start: {line:?}\n{}", self.logs());
        };
        let (base, about) = rest.split_once(' ').unwrap_or((rest, ""));
        assert!(
            about.contains(&format!("master pid {}", self.master.id())),
            "{line:?}"
        );
        self.app.base = base.to_string();
    }

    fn master_pid(&self) -> u32 {
        self.master.id()
    }

    fn run_dir(&self) -> PathBuf {
        self.app.dir.path().join("run")
    }

    /// A `cozy` command with the cluster's environment (same COZY_RUN_DIR, so it finds the master).
    pub(crate) async fn cli(&self, args: &[&str]) -> Output {
        tokio::process::Command::from(self.app.cli_command(args, &[]))
            .kill_on_drop(true)
            .output()
            .await
            .expect("run cozy")
    }

    /// `cozy status --json`, asserting that it succeeds.
    pub(crate) async fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]).await;
        assert!(
            out.status.success(),
            "cozy status --json: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        self.seen.lock().unwrap().extend(pids_of(&status));
        status
    }

    /// The pids of the workers `cozy status` lists, in slot order.
    async fn worker_pids(&self) -> Vec<u32> {
        pids_of(&self.status().await)
    }

    /// Polls `cozy status` until `done` holds; returns that status.
    pub(crate) async fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; last status: {status:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `sig` to the master.
    fn signal(&self, sig: i32) {
        send_signal(self.master_pid(), sig).expect("signal the master");
    }

    /// Waits (reaping it) until the master exits.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.master.try_wait().expect("wait for the master") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the master did not exit within {within:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The master's stderr, one parsed JSON value per line (`Value::String` for a line that is not JSON).
    fn log_lines(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.to_string())))
            .collect()
    }

    /// The master's lifecycle events named `event`, in order.
    fn events(&self, event: &str) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["event"] == event)
            .collect()
    }

    /// Every worker pid the master ever started, according to its log.
    fn spawned_pids(&self) -> BTreeSet<u32> {
        self.events("worker_spawn")
            .iter()
            .filter_map(|e| e["pid"].as_u64().map(|p| p as u32))
            .collect()
    }

    /// Is `pid` a process started for this cluster (not one that got a recycled pid)?
    fn ours(&self, pid: u32) -> bool {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return false;
        };
        let mine = format!("COZY_RUN_DIR={}", self.run_dir().display());
        environ.split(|b| *b == 0).any(|v| v == mine.as_bytes())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        let mut pids = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        pids.extend(self.spawned_pids());
        for pid in pids {
            if alive(pid) && self.ours(pid) {
                let _ = send_signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// A prepared (not started) MySQL + Redis app with the cluster's defaults plus `env`.
async fn cluster_app(env: &[(&str, &str)]) -> TestApp {
    let mut all = vec![POOL_PER_WORKER];
    all.extend_from_slice(env);
    TestApp::prepare(Backend::MySql, &all).await
}

/// The non-null worker pids of a `cozy status --json` answer, in order.
fn pids_of(status: &Value) -> Vec<u32> {
    status["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// The status entries of worker slot `id` (two while one process replaces another).
pub(crate) fn slot(status: &Value, id: u64) -> Vec<&Value> {
    status["workers"]
        .as_array()
        .map(|ws| ws.iter().filter(|w| w["id"] == id).collect())
        .unwrap_or_default()
}

pub(crate) fn send_signal(pid: u32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `pid` is a running process. A zombie is not: it is dead and only waits for whoever adopted it
/// to reap it (here that may be an init that never does).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S …": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Whether `pid` is gone from the process table: exited *and* reaped by its parent.
fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until none of `pids` is running; panics naming the survivors. Zombies count as gone: use this
/// for processes whose parent is gone too (they were adopted by an init that may never reap them).
async fn wait_gone(pids: &[u32], within: Duration) {
    wait_until_all(pids, within, |p| !alive(p)).await
}

/// Waits until every one of `pids` has exited and been reaped (by the master, which must wait for its
/// workers before it exits).
async fn wait_reaped(pids: &[u32], within: Duration) {
    wait_until_all(pids, within, reaped).await
}

async fn wait_until_all(pids: &[u32], within: Duration, gone: impl Fn(u32) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| !gone(p)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {within:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `cmd`, killing it and failing the test if it has not exited within `within`.
async fn output_within(cmd: Command, within: Duration) -> Output {
    let child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cozy");
    match tokio::time::timeout(within, child.wait_with_output()).await {
        Ok(out) => out.expect("wait for cozy"),
        Err(_) => panic!("still running after {within:?} (it should have given up)"),
    }
}

// ---------------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: no pool, no retry
// ---------------------------------------------------------------------------------------------------

/// One keep-alive connection that hides nothing: a request is written once and its answer read back.
struct RawConn {
    conn: tokio::io::BufReader<TcpStream>,
}

#[derive(Debug)]
struct RawReply {
    status: u16,
    close: bool,
    body: Value,
}

impl RawConn {
    async fn connect(addr: &str) -> std::io::Result<RawConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            conn: tokio::io::BufReader::new(stream),
        })
    }

    async fn send(&mut self, req: &Req) -> std::io::Result<RawReply> {
        let body = req.body.as_ref().map(Value::to_string).unwrap_or_default();
        let mut head = format!("{} {} HTTP/1.1\r\nHost: cozy\r\n", req.method, req.path);
        if let Some(token) = &req.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if let Some(key) = &req.key {
            head.push_str(&format!("Idempotency-Key: {key}\r\n"));
        }
        if req.body.is_some() {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        head.push_str(&body);
        self.conn.get_mut().write_all(head.as_bytes()).await?;

        let status_line = self.line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let (mut close, mut length, mut chunked) = (false, 0usize, false);
        loop {
            let line = self.line().await?;
            let Some((name, value)) = line.split_once(':') else {
                break;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(std::io::Error::other)?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let mut bytes = Vec::new();
        if chunked {
            loop {
                let size = usize::from_str_radix(self.line().await?.trim(), 16)
                    .map_err(std::io::Error::other)?;
                let mut chunk = vec![0; size + 2];
                self.conn.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                bytes.extend_from_slice(&chunk[..size]);
            }
        } else {
            bytes.resize(length, 0);
            self.conn.read_exact(&mut bytes).await?;
        }
        Ok(RawReply {
            status,
            close,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }

    async fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.conn.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_owned())
    }
}

// ---------------------------------------------------------------------------------------------------
// Load: client tasks sending requests until told to stop, recording every outcome
// ---------------------------------------------------------------------------------------------------

/// One request to send.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    token: Option<String>,
    key: Option<String>,
    body: Option<Value>,
}

impl Req {
    fn get(path: impl Into<String>, token: Option<&str>) -> Req {
        Req {
            method: "GET",
            path: path.into(),
            token: token.map(str::to_string),
            key: None,
            body: None,
        }
    }

    fn post(path: impl Into<String>, token: &str, body: Value) -> Req {
        Req {
            method: "POST",
            path: path.into(),
            token: Some(token.to_string()),
            key: Some(random_suffix()),
            body: Some(body),
        }
    }
}

/// What the load sends, round after round.
#[derive(Clone)]
enum Mix {
    /// GET /healthz, then an authenticated GET of a resource.
    Reads { token: String, resource: i64 },
    /// GET /healthz, POST a reservation (with an Idempotency-Key), GET that reservation.
    Reserve { token: String, resource: i64 },
}

/// How a load task talks to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Its own reqwest client with the default keep-alive pool.
    Reqwest,
    /// A raw keep-alive connection, replaced only after `Connection: close` (or a failure).
    Raw,
    /// The same, pausing up to 150 ms between rounds, so its connection is often idle when a drain
    /// starts: the server must still hand it over (answer its next request with `Connection: close`)
    /// rather than close it under a request on its way.
    RawWithPauses,
}

/// The outcome of one request.
#[derive(Debug, Clone)]
struct Outcome {
    client: usize,
    sent: Instant,
    done: Instant,
    what: String,
    /// The status, or the transport error.
    result: Result<u16, String>,
    /// The answer said `Connection: close` (raw clients only).
    closed: bool,
}

impl Outcome {
    fn ok(&self) -> bool {
        matches!(self.result, Ok(s) if (200..300).contains(&s))
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts one task per entry of `transports`, each sending `mix` to `base` until stopped.
    fn start(base: &str, mix: Mix, transports: &[Transport]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let tasks = transports
            .iter()
            .enumerate()
            .map(|(client, &transport)| {
                tokio::spawn(load_task(
                    client,
                    transport,
                    base.to_string(),
                    mix.clone(),
                    stop.clone(),
                    outcomes.clone(),
                ))
            })
            .collect();
        Load {
            stop,
            outcomes,
            tasks,
        }
    }

    fn successes_since(&self, t: Instant) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|o| o.done >= t && o.ok())
            .count()
    }

    /// Waits until `n` more requests have succeeded after `t`.
    async fn wait_successes_since(&self, t: Instant, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.successes_since(t) < n {
            assert!(
                Instant::now() < deadline,
                "only {} requests succeeded in {PATIENCE:?}",
                self.successes_since(t)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every task and returns all outcomes.
    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.expect("a load task panicked");
        }
        let outcomes = self.outcomes.lock().unwrap().clone();
        outcomes
    }
}

async fn load_task(
    client: usize,
    transport: Transport,
    base: String,
    mix: Mix,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
) {
    let addr = base.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();
    let mut raw: Option<RawConn> = None;
    while !stop.load(Ordering::SeqCst) {
        let mut steps = vec![Req::get("/healthz", None)];
        match &mix {
            Mix::Reads { token, resource } => {
                steps.push(Req::get(format!("/v1/resources/{resource}"), Some(token)))
            }
            Mix::Reserve { token, resource } => steps.push(Req::post(
                "/v1/reservations",
                token,
                json!({"resource_id": resource, "quantity": 1}),
            )),
        }
        let mut i = 0;
        while i < steps.len() {
            let req = steps[i].clone();
            let sent = Instant::now();
            let result = match transport {
                Transport::Reqwest => send_reqwest(&http, &base, &req).await,
                Transport::Raw | Transport::RawWithPauses => send_raw(&mut raw, &addr, &req).await,
            };
            let (result, body, closed) = match result {
                Ok((status, body, closed)) => (Ok(status), body, closed),
                Err(e) => (Err(e), Value::Null, false),
            };
            let outcome = Outcome {
                client,
                sent,
                done: Instant::now(),
                what: format!("{} {}", req.method, req.path),
                result,
                closed,
            };
            let ok = outcome.ok();
            outcomes.lock().unwrap().push(outcome);
            // A reservation made is read back in the same round.
            if ok && req.method == "POST" {
                if let (Some(id), Mix::Reserve { token, .. }) = (body["id"].as_i64(), &mix) {
                    steps.push(Req::get(format!("/v1/reservations/{id}"), Some(token)));
                }
            }
            i += 1;
        }
        if transport == Transport::RawWithPauses {
            let pause = rand::random::<u64>() % 150;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

async fn send_reqwest(
    http: &reqwest::Client,
    base: &str,
    req: &Req,
) -> Result<(u16, Value, bool), String> {
    let method = Method::from_bytes(req.method.as_bytes()).expect("method");
    send_request(
        http,
        base,
        method,
        &req.path,
        req.token.as_deref(),
        req.key.as_deref(),
        req.body.clone(),
    )
    .await
    .map(|r| (r.status.as_u16(), r.body, false))
    .map_err(|e| format!("{e:?}"))
}

async fn send_raw(
    conn: &mut Option<RawConn>,
    addr: &str,
    req: &Req,
) -> Result<(u16, Value, bool), String> {
    if conn.is_none() {
        *conn = Some(
            RawConn::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        );
    }
    let sent = tokio::time::timeout(PATIENCE, conn.as_mut().unwrap().send(req)).await;
    match sent {
        Ok(Ok(reply)) => {
            if reply.close {
                *conn = None;
            }
            Ok((reply.status, reply.body, reply.close))
        }
        Ok(Err(e)) => {
            *conn = None;
            Err(e.to_string())
        }
        Err(_) => {
            *conn = None;
            Err("no answer".into())
        }
    }
}

/// A user, an admin-made resource with room for every reservation a test can make, and a token.
async fn shop(app: &TestApp) -> (String, i64) {
    let admin = app.admin().await;
    let resource = app.resource(&admin, 1_000_000, 3600).await;
    let user = app.user(&format!("{}@example.com", random_suffix())).await;
    (user, resource)
}

fn print_failures(failures: &[&Outcome], since: Instant) {
    for f in failures {
        eprintln!(
            "client {} {} sent at +{:?}, done at +{:?}: {:?}",
            f.client,
            f.what,
            f.sent.saturating_duration_since(since),
            f.done.saturating_duration_since(since),
            f.result
        );
    }
}

// ---------------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_under_load_fails_only_its_in_flight_requests_and_refills_the_slot() {
    const CLIENTS: usize = 8;
    let cluster = TestCluster::start(3, &[], &[]).await;
    let (token, resource) = shop(&cluster).await;
    let load = Load::start(
        &cluster.base,
        Mix::Reads { token, resource },
        &[Transport::Reqwest; CLIENTS],
    );
    let warm = Instant::now();
    load.wait_successes_since(warm, 200).await;

    let before = cluster.status().await;
    let victim = slot(&before, 2)[0]["pid"].as_u64().unwrap() as u32;
    let killed_at = Instant::now();
    send_signal(victim, libc::SIGKILL).unwrap();
    let after = cluster
        .wait_status("slot 2 runs a new online process after one restart", |s| {
            let entries = slot(s, 2);
            entries.len() == 1
                && entries[0]["state"] == "online"
                && entries[0]["restarts"] == 1
                && entries[0]["pid"]
                    .as_u64()
                    .is_some_and(|p| p as u32 != victim)
        })
        .await;
    eprintln!(
        "kill -9 of worker 2 → new worker online in `cozy status`: {:?}",
        killed_at.elapsed()
    );
    // The cluster keeps answering, on the survivors and on the replacement.
    load.wait_successes_since(Instant::now(), 200).await;
    let outcomes = load.finish().await;

    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    print_failures(&failures, killed_at);
    assert!(
        failures.len() <= CLIENTS,
        "{} failed requests, but at most one per client ({CLIENTS}) can have been in flight on the \
         killed worker",
        failures.len()
    );
    for f in &failures {
        assert!(
            f.result.is_err(),
            "only transport errors are expected, got {:?} for {}",
            f.result,
            f.what
        );
        assert!(f.done >= killed_at, "a request failed before the kill");
    }
    let per_client = failures.iter().fold(BTreeMap::new(), |mut m, f| {
        *m.entry(f.client).or_insert(0) += 1;
        m
    });
    assert!(
        per_client.values().all(|&n| n <= 1),
        "a client failed more than once (its next connection must land on a live worker): {per_client:?}"
    );
    let after_kill = outcomes
        .iter()
        .filter(|o| o.sent > killed_at && o.ok())
        .count();
    assert!(
        after_kill >= 200,
        "only {after_kill} successes after the kill"
    );

    assert!(!alive(victim), "the killed worker {victim} still exists");
    assert!(
        reaped(victim),
        "the master did not reap the killed worker {victim}"
    );
    for id in [1, 3] {
        assert_eq!(
            slot(&after, id)[0]["pid"],
            slot(&before, id)[0]["pid"],
            "worker {id} was not touched"
        );
        assert_eq!(slot(&after, id)[0]["restarts"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_that_cannot_start_make_the_master_give_up_with_a_crash_loop_and_leave_no_worker() {
    // The server refuses the connection (no such database), so every worker fails to open its
    // database and exits at once. (With nothing listening at all, each worker would first spend the
    // pool's 10 s acquire timeout retrying.)
    let refused = format!("{}/cozy_no_such_database", mysql_base_url());
    let app = cluster_app(&[
        ("COZY_DATABASE_URL", refused.as_str()),
        ("COZY_CRASH_LIMIT", "4"),
    ])
    .await;
    let mut cluster = TestCluster::launch(app, 2, &[]);
    let status = cluster.wait_exit(PATIENCE).await;
    let logs = cluster.logs();
    assert_eq!(status.code(), Some(1), "{logs}");
    assert!(logs.contains("crash loop"), "{logs}");
    let crashes = cluster.events("worker_crash");
    assert!(
        crashes.len() >= 4,
        "{} crashes logged:\n{logs}",
        crashes.len()
    );
    let spawned: Vec<u32> = cluster.spawned_pids().into_iter().collect();
    assert!(spawned.len() >= 4, "{spawned:?}");
    wait_reaped(&spawned, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_master_takes_every_worker_down_with_it() {
    let mut cluster = TestCluster::start(3, &[], &[]).await;
    let workers = cluster.worker_pids().await;
    assert_eq!(workers.len(), 3);
    cluster.master.kill().unwrap(); // SIGKILL
    cluster.master.wait().unwrap();
    wait_gone(&workers, Duration::from_secs(10)).await;

    // Its control socket file is left behind; nobody answers on it.
    let out = cluster.cli(&["status"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cozy master answers"), "{err}");
}

// ---------------------------------------------------------------------------------------------------
// Reload and stop
// ---------------------------------------------------------------------------------------------------

/// Reloads a two-worker cluster under load from `transports` and checks that nothing failed.
async fn reload_under_load(transports: &[Transport]) {
    let cluster = TestCluster::start(2, &[], &[]).await;
    let (token, resource) = shop(&cluster).await;
    let before = cluster.status().await;
    let old: BTreeSet<u32> = pids_of(&before).into_iter().collect();
    assert_eq!(old.len(), 2);

    let load = Load::start(&cluster.base, Mix::Reserve { token, resource }, transports);
    let started = Instant::now();
    load.wait_successes_since(started, 100).await;
    let reload_start = Instant::now();
    let out = cluster.cli(&["reload"]).await;
    let reload_end = Instant::now();
    assert!(
        out.status.success(),
        "cozy reload: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    load.wait_successes_since(reload_end, 100).await;
    let outcomes = load.finish().await;

    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    print_failures(&failures, reload_start);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the reload",
        failures.len(),
        outcomes.len()
    );
    let during = outcomes
        .iter()
        .filter(|o| o.sent >= reload_start && o.done <= reload_end)
        .count();
    eprintln!(
        "reload took {:?}; {during} requests were sent and answered during it, {} in all",
        reload_end - reload_start,
        outcomes.len()
    );
    assert!(during > 0, "no request was served during the reload");
    // Every raw connection opened before the reload was on an old worker, so each raw client must have
    // been told to close (and reconnected) at least once: the handover really happened on its path.
    for (client, _) in transports
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != Transport::Reqwest)
    {
        assert!(
            outcomes.iter().any(|o| o.client == client && o.closed),
            "raw client {client} was never told Connection: close"
        );
    }

    let after = cluster.status().await;
    let new: BTreeSet<u32> = pids_of(&after).into_iter().collect();
    assert_eq!(new.len(), 2, "{after:#}");
    assert!(
        old.is_disjoint(&new),
        "every worker is replaced: before {old:?}, after {new:?}"
    );
    for w in after["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "online", "{after:#}");
        assert_eq!(w["restarts"], 0, "a reload is not a restart: {after:#}");
    }
    assert_eq!(after["master"]["reloading"], false);
    wait_gone(&old.into_iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
    cluster.assert_audit_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_reload_under_load_fails_no_request_of_pooled_reqwest_clients() {
    reload_under_load(&[Transport::Reqwest; 6]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_reload_under_load_fails_no_request_of_raw_keep_alive_clients_that_never_retry() {
    use Transport::{Raw, RawWithPauses};
    reload_under_load(&[Raw, Raw, Raw, RawWithPauses, RawWithPauses, RawWithPauses]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_to_the_master_replaces_every_worker_like_cozy_reload() {
    let cluster = TestCluster::start(2, &[], &[]).await;
    let old: BTreeSet<u32> = cluster.worker_pids().await.into_iter().collect();
    cluster.signal(libc::SIGHUP);
    let after = cluster
        .wait_status("two new workers are online", |s| {
            let pids: BTreeSet<u32> = pids_of(s).into_iter().collect();
            pids.len() == 2
                && pids.is_disjoint(&old)
                && s["workers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|w| w["state"] == "online" && w["restarts"] == 0)
        })
        .await;
    let deadline = Instant::now() + PATIENCE;
    while cluster.events("reload_done").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no reload_done:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cluster.events("reload_start").len(), 1);
    assert!(
        cluster.events("worker_crash").is_empty(),
        "{}",
        cluster.logs()
    );
    wait_gone(&old.into_iter().collect::<Vec<_>>(), Duration::from_secs(5)).await;
    let r = reqwest::get(format!("{}/healthz", cluster.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_whose_new_workers_cannot_start_fails_and_the_old_workers_keep_serving() {
    // Two crashes within the window would be a crash loop: failed reloads must not count as crashes.
    let cluster = TestCluster::start(2, &[("COZY_CRASH_LIMIT", "2")], &[]).await;
    let before = cluster.status().await;
    // A new worker now finds the schema not current and refuses to start; the running ones carry on.
    let pool = cluster.db.pool().await;
    sqlx::query("RENAME TABLE cozy_migrations TO cozy_migrations_elsewhere")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    for attempt in 1..=3 {
        let out = cluster.cli(&["reload"]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "reload {attempt} succeeded: {err}");
        assert!(
            err.contains("before it was ready") && err.contains("keeps serving"),
            "reload {attempt}: {err}"
        );
    }
    let after = cluster.status().await;
    assert_eq!(pids_of(&after), pids_of(&before), "{after:#}");
    for w in after["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "online", "{after:#}");
        assert_eq!(w["restarts"], 0, "{after:#}");
    }
    assert!(
        cluster.events("crash_loop").is_empty(),
        "{}",
        cluster.logs()
    );
    let r = reqwest::get(format!("{}/healthz", cluster.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Starts a two-worker cluster whose gateway takes 3 s, starts a payment, and once a worker is running
/// it calls `stop`; the payment must still come back PAID and the whole cluster exit cleanly.
async fn stop_with_a_slow_payment_in_flight(stop: impl AsyncFnOnce(&TestCluster)) {
    let mut cluster = TestCluster::start(2, &[("COZY_GATEWAY_DELAY_MS", "3000")], &[]).await;
    let (token, resource) = shop(&cluster).await;
    let id = cluster.reserve(&token, resource, 2).await;
    let workers = cluster.worker_pids().await;

    let pay = {
        let (client, base) = (reqwest::Client::new(), cluster.base.clone());
        let token = token.clone();
        tokio::spawn(async move {
            send_request(
                &client,
                &base,
                Method::POST,
                &format!("/v1/reservations/{id}/pay"),
                Some(&token),
                Some("slow-pay"),
                Some(json!({"payment_method": "sandbox_ok"})),
            )
            .await
        })
    };
    // The idempotency lease is taken when a worker starts the request: from then on it is in flight.
    let deadline = Instant::now() + PATIENCE;
    while cluster
        .db
        .scalar("SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = 'slow-pay' AND status = 'running'")
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the payment never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&cluster).await;

    let paid = pay
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the payment in flight failed: {e:?}\n{}", cluster.logs()));
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    assert_eq!(paid.body["state"], "PAID");
    let exit = cluster.wait_exit(PATIENCE).await;
    assert_eq!(exit.code(), Some(0), "{}", cluster.logs());
    wait_reaped(&workers, Duration::from_secs(5)).await;
    assert!(
        !cluster.run_dir().join("cozy.sock").exists(),
        "the control socket is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_a_slow_payment_in_flight_lets_it_finish_then_exits_0_leaving_no_worker() {
    stop_with_a_slow_payment_in_flight(async |c: &TestCluster| c.signal(libc::SIGTERM)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cozy_stop_with_a_slow_payment_in_flight_lets_it_finish_then_exits_0_leaving_no_worker() {
    stop_with_a_slow_payment_in_flight(async |c: &TestCluster| {
        let out = c.cli(&["stop"]).await;
        assert!(
            out.status.success(),
            "cozy stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `cozy stop` answers once the drain is over: by then no worker runs any more.
        for pid in c.spawned_pids() {
            assert!(
                reaped(pid),
                "worker {pid} is still there after `cozy stop` returned"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_sigterm_forces_the_stop_and_leaves_no_worker() {
    // A payment that would keep a graceful stop waiting for a minute.
    let mut cluster = TestCluster::start(
        2,
        &[
            ("COZY_GATEWAY_DELAY_MS", "60000"),
            ("COZY_DRAIN_TIMEOUT_SECS", "120"),
        ],
        &[],
    )
    .await;
    let (token, resource) = shop(&cluster).await;
    let id = cluster.reserve(&token, resource, 1).await;
    let workers = cluster.worker_pids().await;
    let pay = {
        let (client, base) = (reqwest::Client::new(), cluster.base.clone());
        tokio::spawn(async move {
            send_request(
                &client,
                &base,
                Method::POST,
                &format!("/v1/reservations/{id}/pay"),
                Some(&token),
                Some("stuck-pay"),
                Some(json!({"payment_method": "sandbox_ok"})),
            )
            .await
        })
    };
    let deadline = Instant::now() + PATIENCE;
    while cluster
        .db
        .scalar("SELECT COUNT(*) FROM idempotency_keys WHERE idem_key = 'stuck-pay'")
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the payment never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.signal(libc::SIGTERM);
    // The first signal starts the drain (the payment holds it up); the second one ends it.
    let deadline = Instant::now() + PATIENCE;
    while cluster.events("stop").is_empty() {
        assert!(
            Instant::now() < deadline,
            "no stop event:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.signal(libc::SIGTERM);
    let exit = cluster.wait_exit(PATIENCE).await;
    assert!(exit.code().is_some(), "the master died of {exit:?}");
    wait_reaped(&workers, Duration::from_secs(5)).await;
    assert!(
        !cluster.events("stop_forced").is_empty(),
        "{}",
        cluster.logs()
    );
    let paid = tokio::time::timeout(PATIENCE, pay)
        .await
        .expect("the client hangs")
        .unwrap();
    assert!(
        paid.is_err(),
        "the payment cut off by the forced stop got {paid:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_over_max_memory_is_replaced_while_requests_keep_succeeding() {
    // Every worker is far above 1 MiB, so the master keeps replacing them.
    let cluster = TestCluster::start(2, &[], &["--max-memory", "1M"]).await;
    let (token, resource) = shop(&cluster).await;
    let load = Load::start(
        &cluster.base,
        Mix::Reads { token, resource },
        &[
            Transport::Raw,
            Transport::RawWithPauses,
            Transport::Reqwest,
            Transport::Reqwest,
        ],
    );
    let started = Instant::now();
    let status = cluster
        .wait_status("a worker has been replaced for its memory", |s| {
            s["workers"]
                .as_array()
                .is_some_and(|ws| ws.iter().any(|w| w["restarts"].as_u64() > Some(0)))
        })
        .await;
    load.wait_successes_since(Instant::now(), 100).await;
    let outcomes = load.finish().await;

    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok()).collect();
    print_failures(&failures, started);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed while workers were replaced",
        failures.len(),
        outcomes.len()
    );
    let memory = cluster.events("worker_memory");
    assert!(
        !memory.is_empty(),
        "no worker_memory event:\n{}",
        cluster.logs()
    );
    assert!(
        memory[0]["rss_bytes"].as_u64() > Some(1024 * 1024),
        "{}",
        memory[0]
    );
    eprintln!(
        "{} memory replacements; status then: {status}",
        memory.len()
    );
}

// ---------------------------------------------------------------------------------------------------
// What operators see: status, refusals, metrics, logs
// ---------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cozy_status_lists_the_real_processes_and_counts_restarts_and_requests() {
    let started = Instant::now();
    let cluster = TestCluster::start(2, &[], &[]).await;
    let status = cluster.status().await;
    assert_eq!(status["master"]["pid"], cluster.master_pid());
    assert_eq!(
        format!("http://{}", status["master"]["listen"].as_str().unwrap()),
        cluster.base
    );
    let master_uptime = status["master"]["uptime_s"].as_u64().unwrap();
    assert!(master_uptime <= started.elapsed().as_secs() + 1, "{status}");
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{status:#}");
    for (i, w) in workers.iter().enumerate() {
        assert_eq!(w["id"], i + 1);
        assert_eq!(w["state"], "online");
        assert_eq!(w["restarts"], 0);
        assert!(w["uptime_s"].as_u64().unwrap() <= master_uptime, "{w}");
        let pid = w["pid"].as_u64().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("cozy"),
            "pid {pid} is not a cozy process"
        );
        assert!(alive(pid as u32));
    }

    // The table: one line per worker, carrying its pid.
    let out = cluster.cli(&["status"]).await;
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    for pid in pids_of(&status) {
        let lines: Vec<&str> = table
            .lines()
            .filter(|l| l.split_whitespace().any(|cell| cell == pid.to_string()))
            .collect();
        assert_eq!(lines.len(), 1, "worker {pid} in:\n{table}");
        assert!(lines[0].contains("online"), "{table}");
    }

    // Requests: the counters add up to exactly what was sent, once the workers have pushed them.
    let total = |s: &Value| -> u64 {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["requests"].as_u64().unwrap())
            .sum()
    };
    let before = total(&status);
    const SENT: u64 = 10;
    for _ in 0..SENT {
        let r = reqwest::get(format!("{}/healthz", cluster.base))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    cluster
        .wait_status("the requests are counted", |s| total(s) >= before + SENT)
        .await;
    // One more push of the counters, to see them settle.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        total(&cluster.status().await) - before,
        SENT,
        "requests counted by the workers"
    );

    // kill -9 of worker 1: its slot gets a new process and one restart.
    let old = slot(&status, 1)[0]["pid"].as_u64().unwrap() as u32;
    send_signal(old, libc::SIGKILL).unwrap();
    let after = cluster
        .wait_status("worker 1 is back online after a restart", |s| {
            let w = slot(s, 1);
            w.len() == 1 && w[0]["state"] == "online" && w[0]["restarts"] == 1
        })
        .await;
    let new = slot(&after, 1)[0]["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old);
    assert!(alive(new), "the new worker {new} does not exist");
    assert!(!alive(old), "the killed worker {old} still exists");
    assert!(
        slot(&after, 1)[0]["uptime_s"].as_u64() <= after["master"]["uptime_s"].as_u64(),
        "{after}"
    );
    assert_eq!(slot(&after, 2)[0]["restarts"], 0);
    assert_eq!(slot(&after, 2)[0]["pid"], slot(&status, 2)[0]["pid"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_master_on_the_same_run_dir_is_refused_naming_the_socket() {
    let cluster = TestCluster::start(2, &[], &[]).await;
    let pids = cluster.worker_pids().await;
    let second = cluster.cli_command(&["serve", "--listen", "127.0.0.1:0", "--workers", "2"], &[]);
    let out = output_within(second, PATIENCE).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let socket = cluster.run_dir().join("cozy.sock");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    // The first master is untouched and still answers on its socket.
    assert_eq!(cluster.worker_pids().await, pids);
    let r = reqwest::get(format!("{}/healthz", cluster.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cozy_status_without_a_master_says_that_none_answers() {
    let app = cluster_app(&[]).await;
    let out = output_within(app.cli_command(&["status"], &[]), PATIENCE).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no cozy master answers"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_without_redis_are_refused_with_a_hint_at_cozy_redis_url() {
    let mut app = cluster_app(&[]).await;
    app.env.retain(|(k, _)| k != "COZY_REDIS_URL");
    let cmd = app.cli_command(&["serve", "--listen", "127.0.0.1:0", "--workers", "2"], &[]);
    let out = output_within(cmd, PATIENCE).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("COZY_REDIS_URL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_from_any_worker_cover_the_whole_cluster_with_one_type_line_per_family() {
    let cluster = TestCluster::start(2, &[], &[]).await;
    let deadline = Instant::now() + PATIENCE;
    let text = loop {
        let text = reqwest::get(format!("{}/metrics", cluster.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // The workers push their series every second; wait until the master has both.
        let both = ["1", "2"].iter().all(|w| {
            text.lines().any(|l| {
                l.starts_with("cozy_websocket_connections{")
                    && l.contains(&format!("worker=\"{w}\""))
            })
        });
        if both && text.contains("cozy_http_requests_total{") {
            break text;
        }
        assert!(Instant::now() < deadline, "incomplete exposition:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.lines()
            .any(|l| l == "cozy_cluster_workers{state=\"online\"} 2"),
        "{text}"
    );
    for w in ["1", "2"] {
        assert!(
            text.contains(&format!("cozy_worker_restarts_total{{worker=\"{w}\"}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("cozy_idempotent_replays_total{{worker=\"{w}\"}}")),
            "{text}"
        );
    }
    // Every sample of a worker's own series says which worker it comes from.
    for line in text
        .lines()
        .filter(|l| l.starts_with("cozy_http_requests_total{"))
    {
        assert!(line.contains("worker=\""), "{line}");
    }
    let mut types: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split_whitespace().nth(2).unwrap();
        *types.entry(family).or_default() += 1;
    }
    let repeated: Vec<_> = types.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        repeated.is_empty(),
        "families typed more than once: {repeated:?}\n{text}"
    );
    for family in [
        "cozy_http_requests_total",
        "cozy_cluster_workers",
        "cozy_worker_restarts_total",
        "cozy_websocket_connections",
    ] {
        assert_eq!(types.get(family), Some(&1), "{family}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_master_log_is_json_with_worker_ids_on_worker_lines_and_lifecycle_events() {
    let cluster = TestCluster::start(2, &[], &[]).await;
    let status = cluster.status().await;
    let pids = pids_of(&status);
    let r = reqwest::get(format!("{}/healthz", cluster.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let victim = slot(&status, 2)[0]["pid"].as_u64().unwrap();
    send_signal(victim as u32, libc::SIGKILL).unwrap();
    cluster
        .wait_status("worker 2 is back", |s| {
            let w = slot(s, 2);
            w.len() == 1 && w[0]["state"] == "online" && w[0]["restarts"] == 1
        })
        .await;

    let logs = cluster.logs();
    let raw: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    let lines = cluster.log_lines();
    for (text, line) in raw.iter().zip(&lines) {
        assert!(line.is_object(), "not a JSON line: {text}");
        // A line a worker wrote gets its id first; the master's own lines are lifecycle events.
        if text.starts_with("{\"worker\":") {
            assert!(matches!(line["worker"].as_u64(), Some(1 | 2)), "{text}");
        } else {
            assert!(
                line["event"].is_string(),
                "a master line without an event: {text}"
            );
        }
    }
    for (i, pid) in pids.iter().enumerate() {
        let id = i as u64 + 1;
        let own = raw.iter().zip(&lines).any(|(text, l)| {
            text.starts_with("{\"worker\":") && l["worker"] == id && l["pid"] == *pid
        });
        assert!(own, "no line written by worker {id} (pid {pid}):\n{logs}");
        for event in ["worker_spawn", "worker_ready"] {
            assert!(
                cluster
                    .events(event)
                    .iter()
                    .any(|e| e["worker"] == id && e["pid"] == *pid),
                "no {event} for worker {id} pid {pid}:\n{logs}"
            );
        }
    }
    let crash = cluster.events("worker_crash");
    assert_eq!(crash.len(), 1, "{logs}");
    assert_eq!(crash[0]["worker"], 2);
    assert_eq!(crash[0]["pid"], victim);
    assert!(
        crash[0]["status"]
            .as_str()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{}",
        crash[0]
    );
    let restart = cluster.events("worker_restart");
    assert_eq!(restart.len(), 1, "{logs}");
    assert_eq!(restart[0]["worker"], 2);
    assert_eq!(restart[0]["restarts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workers_access_log_line_reaches_the_master_log_with_its_request_id_at_the_top_level() {
    let cluster = TestCluster::start(1, &[], &[]).await;
    let id = format!("through-the-master-{}", random_suffix());
    let r = cluster
        .client
        .get(format!("{}/nope?q=1", cluster.base))
        .header("X-Request-Id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(id.as_str())
    );
    let deadline = Instant::now() + PATIENCE;
    let line = loop {
        // The master re-emits worker lines by prefixing the worker id: every field stays top-level.
        if let Some(line) = cluster
            .log_lines()
            .into_iter()
            .find(|l| l["request_id"] == id.as_str())
        {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no access line for {id}:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["worker"], 1, "{line}");
    assert_eq!(line["message"], "request", "{line}");
    assert_eq!(line["status"], 404, "{line}");
    assert_eq!(line["path"], "/nope", "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
}
