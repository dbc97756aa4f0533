//! The master: one process that owns the listening socket and supervises N worker processes.
//!
//! - **Spawning.** A worker is this binary, re-executed from its path on disk with the master's own
//!   arguments, so replacing the binary and reloading is an upgrade. It inherits the listening socket as
//!   fd 3 and a private socketpair as fd 4 (see [`super::worker`]), and gets `PR_SET_PDEATHSIG = SIGKILL`
//!   so that no worker outlives a master killed with -9.
//! - **Crashes.** A worker that exits unasked is restarted after an exponential backoff (first restart at
//!   once, then 100 ms doubling up to 10 s; reset once a worker has been healthy for `healthy_after`).
//!   `crash_limit` crashes within `crash_window` make the master stop everything and exit 1, so the service
//!   manager takes over instead of a restart storm.
//! - **Rolling replacement** (reload, `--max-memory`): per worker slot, start the new process, wait until
//!   it reports ready, then drain the old one (SIGTERM: stop accepting, finish in-flight requests within
//!   `drain_timeout`). A new process that fails to become ready is killed and the old one keeps serving.
//! - **Stop**: SIGTERM/SIGINT or `cozy stop` drains every worker at once and exits 0; a second signal
//!   kills them with SIGKILL.
//! - **Logs**: every line a worker writes is passed through with its worker id (a `"worker"` field on JSON
//!   lines, a `[worker N]` prefix otherwise); the master's own events are structured tracing events.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use super::procstat;
use super::protocol::{
    ClusterStatus, MasterStatus, Reply, Request, ToMaster, ToWorker, WorkerStatus, CONTROL_FD,
    ENV_WORKER_ID, LISTEN_FD,
};
use crate::config::{LogFormat, Settings};

/// The control socket's file name inside `COZY_RUN_DIR`.
pub const SOCKET_NAME: &str = "cozy.sock";

/// Backoff before the k-th consecutive restart of one worker slot (k starts at 1).
pub fn backoff(consecutive: u32) -> Duration {
    match consecutive {
        0 | 1 => Duration::ZERO,
        k => Duration::from_millis(100u64.saturating_mul(1 << (k - 2).min(16))).min(MAX_BACKOFF),
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the master needs to start workers.
pub struct Launch {
    pub settings: Settings,
    pub log_format: LogFormat,
    /// The binary to execute for workers (re-read from disk at every spawn).
    pub exe: PathBuf,
    /// The master's own arguments, handed to every worker.
    pub args: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Online,
    Draining,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Online => "online",
            State::Draining => "draining",
        }
    }
}

#[derive(Default)]
struct Counters {
    connections: u64,
    requests: u64,
    metrics: String,
    cpu_prev: Option<procstat::Sample>,
    cpu_pct: f64,
    rss_bytes: u64,
}

/// One worker process.
struct Worker {
    seq: u64,
    slot: usize,
    pid: u32,
    started: Instant,
    state: Mutex<State>,
    /// Set when the master asked it to go (reload, stop, memory): its exit is not a crash.
    retiring: AtomicBool,
    ready: watch::Sender<bool>,
    /// `Some(description of the exit status)` once it has exited.
    exited: watch::Sender<Option<String>>,
    counters: Mutex<Counters>,
    tx: mpsc::UnboundedSender<ToWorker>,
}

impl Worker {
    fn state(&self) -> State {
        *self.state.lock().unwrap()
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap() = s;
    }

    fn signal(&self, sig: i32) {
        if self.exited.borrow().is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }

    /// Waits until the process has exited; returns the description of its status.
    async fn wait_exit(&self) -> String {
        let mut rx = self.exited.subscribe();
        let r = rx.wait_for(Option::is_some).await;
        r.map(|v| v.clone().unwrap_or_default()).unwrap_or_default()
    }

    /// Waits for `ready`; `Err` with the reason when it exits first or `timeout` passes.
    async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let mut ready = self.ready.subscribe();
        tokio::select! {
            r = ready.wait_for(|r| *r) => r.map(|_| ()).map_err(|_| "lost track of it".to_string()),
            status = self.wait_exit() => Err(format!("exited ({status}) before it was ready")),
            _ = tokio::time::sleep(timeout) => {
                Err(format!("was not ready within {} s", timeout.as_secs()))
            }
        }
    }
}

/// A worker position (ids 1..=N); its process changes over restarts and reloads.
struct Slot {
    id: usize,
    /// Held by whoever replaces this slot's process (crash restart, reload step, memory replacement).
    lock: tokio::sync::Mutex<()>,
    current: Mutex<Option<Arc<Worker>>>,
    restarts: AtomicU32,
    consecutive: AtomicU32,
}

impl Slot {
    fn current(&self) -> Option<Arc<Worker>> {
        self.current.lock().unwrap().clone()
    }
}

struct Cluster {
    settings: Settings,
    log_format: LogFormat,
    exe: PathBuf,
    args: Vec<OsString>,
    listen_fd: OwnedFd,
    listen: SocketAddr,
    started: Instant,
    slots: Vec<Slot>,
    live: Mutex<BTreeMap<u64, Arc<Worker>>>,
    seq: AtomicU64,
    stopping: AtomicBool,
    crashes: Mutex<VecDeque<Instant>>,
    fatal: watch::Sender<Option<String>>,
    reload_lock: tokio::sync::Mutex<()>,
    reloading: AtomicBool,
}

/// Runs the master until it is stopped (exit 0) or gives up on a crash loop (error).
pub async fn run(launch: Launch) -> anyhow::Result<u8> {
    let settings = launch.settings;
    if settings.workers > 1 && settings.redis_url.is_none() {
        bail!(
            "--workers {} needs Redis: the workers share sessions and the realtime bus through it. \
             Set COZY_REDIS_URL=redis://HOST:6379 (or redis_url in cozy.yaml), or run with --workers 1",
            settings.workers
        );
    }
    let run_dir = settings.run_dir.clone();
    prepare_run_dir(&run_dir)?;
    let socket_path = run_dir.join(SOCKET_NAME);
    let control = bind_control_socket(&socket_path).await?;
    let (listen_fd, listen) = bind_listener(settings.listen)?;

    let (fatal, mut fatal_rx) = watch::channel(None);
    let slots = (1..=settings.workers)
        .map(|id| Slot {
            id,
            lock: tokio::sync::Mutex::new(()),
            current: Mutex::new(None),
            restarts: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
        })
        .collect();
    let cluster = Arc::new(Cluster {
        settings,
        log_format: launch.log_format,
        exe: launch.exe,
        args: launch.args,
        listen_fd,
        listen,
        started: Instant::now(),
        slots,
        live: Mutex::new(BTreeMap::new()),
        seq: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        crashes: Mutex::new(VecDeque::new()),
        fatal,
        reload_lock: tokio::sync::Mutex::new(()),
        reloading: AtomicBool::new(false),
    });
    tracing::info!(
        event = "master_start",
        pid = std::process::id(),
        workers = cluster.slots.len(),
        listen = %listen,
        exe = %cluster.exe.display(),
        socket = %socket_path.display(),
        config = ?cluster.settings.sources,
        "master starting"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;

    // Start: the first worker alone (it applies migrations when asked), then the rest together.
    let startup = async {
        cluster.start_slot(0).await?;
        cluster.wait_all_ready(&[0]).await;
        let rest: Vec<usize> = (1..cluster.slots.len()).collect();
        for &i in &rest {
            cluster.start_slot(i).await?;
        }
        cluster.wait_all_ready(&rest).await;
        anyhow::Ok(())
    };
    tokio::select! {
        r = startup => r?,
        message = fatal_message(&mut fatal_rx) => {
            cluster.stop(Duration::from_secs(5)).await;
            let _ = std::fs::remove_file(&socket_path);
            bail!(message);
        }
        _ = term.recv() => return cluster.shutdown(&socket_path, "SIGTERM during start").await,
        _ = int.recv() => return cluster.shutdown(&socket_path, "SIGINT during start").await,
    }
    let pids: Vec<u32> = cluster
        .slots
        .iter()
        .filter_map(|s| s.current().map(|w| w.pid))
        .collect();
    tracing::info!(event = "cluster_ready", listen = %listen, ?pids, "all workers ready");
    println!(
        "cozy listening on http://{listen} (master pid {}, {} workers)",
        std::process::id(),
        cluster.slots.len()
    );
    let _ = std::io::stdout().flush();

    let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<oneshot::Sender<Reply>>();
    tokio::spawn(serve_control(control, cluster.clone(), stop_tx));
    tokio::spawn(cluster.clone().tick());

    let mut stop_waiters = Vec::new();
    let reason = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => {
                let c = cluster.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.reload().await {
                        tracing::error!(event = "reload_failed", error = %e, "reload (SIGHUP) failed");
                    }
                });
            }
            Some(waiter) = stop_rx.recv() => {
                stop_waiters.push(waiter);
                break "cozy stop";
            }
            message = fatal_message(&mut fatal_rx) => {
                tracing::error!(event = "crash_loop", message = %message, "giving up");
                cluster.stop(Duration::from_secs(5)).await;
                let _ = std::fs::remove_file(&socket_path);
                bail!(message);
            }
        }
    };
    // Graceful stop; a second signal forces it.
    tracing::info!(event = "stop", reason, "stopping: draining every worker");
    cluster.stopping.store(true, Ordering::SeqCst);
    let graceful = cluster.stop(cluster.settings.drain_timeout + Duration::from_secs(5));
    tokio::pin!(graceful);
    let forced = loop {
        tokio::select! {
            _ = &mut graceful => break false,
            _ = term.recv() => break true,
            _ = int.recv() => break true,
            Some(waiter) = stop_rx.recv() => stop_waiters.push(waiter),
        }
    };
    if forced {
        tracing::warn!(event = "stop_forced", "second signal: killing every worker");
        cluster.kill_all().await;
    }
    let _ = std::fs::remove_file(&socket_path);
    for waiter in stop_waiters {
        let _ = waiter.send(Reply::ok());
    }
    // Give the control connections a moment to write their replies.
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::info!(event = "master_exit", forced, "master stopped");
    Ok(if forced { 1 } else { 0 })
}

impl Cluster {
    async fn shutdown(self: &Arc<Self>, socket: &Path, reason: &str) -> anyhow::Result<u8> {
        tracing::info!(event = "stop", reason, "stopping");
        self.stop(self.settings.drain_timeout).await;
        let _ = std::fs::remove_file(socket);
        Ok(0)
    }

    /// Starts slot `i`'s first process.
    async fn start_slot(self: &Arc<Self>, i: usize) -> anyhow::Result<()> {
        let slot = &self.slots[i];
        let _guard = slot.lock.lock().await;
        let w = self.spawn(i)?;
        *slot.current.lock().unwrap() = Some(w);
        Ok(())
    }

    /// Waits until the current process of each of `slots` is online (restarts happen meanwhile).
    async fn wait_all_ready(&self, slots: &[usize]) {
        loop {
            let all = slots.iter().all(|&i| {
                self.slots[i]
                    .current()
                    .is_some_and(|w| w.state() == State::Online)
            });
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts one worker process for slot `i` (not yet made the slot's current one).
    fn spawn(self: &Arc<Self>, i: usize) -> anyhow::Result<Arc<Worker>> {
        if self.stopping.load(Ordering::SeqCst) {
            bail!("the cluster is stopping");
        }
        let slot_id = self.slots[i].id;
        let (master_end, worker_end) =
            std::os::unix::net::UnixStream::pair().context("socketpair for a worker")?;
        // Out of the way of fds 3 and 4, which the child's pre_exec fills.
        let worker_end = dup_high(worker_end.as_raw_fd())?;
        let listen_fd: RawFd = self.listen_fd.as_raw_fd();
        let control_fd: RawFd = worker_end.as_raw_fd();
        let master_pid = std::process::id();
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&self.args)
            .env(ENV_WORKER_ID, slot_id.to_string())
            .env(
                "COZY_LOG_FORMAT",
                match self.log_format {
                    LogFormat::Json => "json",
                    LogFormat::Pretty => "pretty",
                },
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
        // system calls (dup2, prctl, getppid, _exit) on plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(listen_fd, LISTEN_FD) < 0 || libc::dup2(control_fd, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The master may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() as u32 != master_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| {
            format!("cannot start worker {slot_id} from {}", self.exe.display())
        })?;
        drop(worker_end);
        let pid = child.id().unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Arc::new(Worker {
            seq,
            slot: i,
            pid,
            started: Instant::now(),
            state: Mutex::new(State::Starting),
            retiring: AtomicBool::new(false),
            ready: watch::channel(false).0,
            exited: watch::channel(None).0,
            counters: Mutex::new(Counters::default()),
            tx,
        });
        self.live.lock().unwrap().insert(seq, worker.clone());
        tracing::info!(
            event = "worker_spawn",
            worker = slot_id,
            pid,
            "worker started"
        );

        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_logs(out, slot_id, self.log_format));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_logs(err, slot_id, self.log_format));
        }
        master_end.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(master_end)?;
        let (read, write) = stream.into_split();
        tokio::spawn(super::protocol::write_lines(write, rx));
        tokio::spawn(self.clone().read_from_worker(worker.clone(), read));
        let cluster = self.clone();
        let w = worker.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => describe(s),
                Err(e) => format!("unknown ({e})"),
            };
            cluster.exited(w, status).await;
        });
        Ok(worker)
    }

    async fn read_from_worker(
        self: Arc<Self>,
        w: Arc<Worker>,
        read: tokio::net::unix::OwnedReadHalf,
    ) {
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<ToMaster>(&line) {
                Ok(ToMaster::Ready) => {
                    if w.state() == State::Starting {
                        w.set_state(State::Online);
                    }
                    w.ready.send_replace(true);
                    tracing::info!(
                        event = "worker_ready",
                        worker = self.slots[w.slot].id,
                        pid = w.pid,
                        startup_ms = w.started.elapsed().as_millis() as u64,
                        "worker ready"
                    );
                }
                Ok(ToMaster::Stats {
                    connections,
                    requests,
                    metrics,
                }) => {
                    let mut c = w.counters.lock().unwrap();
                    c.connections = connections;
                    c.requests = requests;
                    c.metrics = metrics;
                }
                Ok(ToMaster::ClusterMetrics { id }) => {
                    let text = self.metrics_text();
                    let _ = w.tx.send(ToWorker::ClusterMetrics { id, text });
                }
                Err(e) => tracing::warn!(
                    worker = self.slots[w.slot].id,
                    error = %e,
                    "unreadable message from a worker"
                ),
            }
        }
    }

    /// A process has exited: bookkeeping, then a restart unless it was asked to go.
    async fn exited(self: Arc<Self>, w: Arc<Worker>, status: String) {
        let slot_id = self.slots[w.slot].id;
        let expected = w.retiring.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst);
        w.exited.send_replace(Some(status.clone()));
        self.live.lock().unwrap().remove(&w.seq);
        let uptime_ms = w.started.elapsed().as_millis() as u64;
        if expected {
            tracing::info!(event = "worker_exit", worker = slot_id, pid = w.pid, status = %status, uptime_ms, "worker exited");
            return;
        }
        tracing::warn!(event = "worker_crash", worker = slot_id, pid = w.pid, status = %status, uptime_ms, "worker exited unexpectedly");
        self.crashed(w, status).await;
    }

    /// Restarts the slot of a crashed process with backoff, or declares a crash loop.
    async fn crashed(self: Arc<Self>, w: Arc<Worker>, status: String) {
        let slot = &self.slots[w.slot];
        let _guard = slot.lock.lock().await;
        if slot.current().map(|c| c.seq) != Some(w.seq) {
            // A replacement that never took over (`replace` reports it; the old process keeps serving),
            // or a process already replaced. Not a crash of the slot's worker: counting it would turn a
            // few failed reloads into a "crash loop" that takes the healthy workers down.
            return;
        }
        if self.record_crash(slot.id, &status) {
            return;
        }
        let healthy = *w.ready.borrow() && w.started.elapsed() >= self.settings.healthy_after;
        let mut consecutive = if healthy {
            slot.consecutive.store(1, Ordering::SeqCst);
            1
        } else {
            slot.consecutive.fetch_add(1, Ordering::SeqCst) + 1
        };
        loop {
            let delay = backoff(consecutive);
            if !delay.is_zero() {
                tracing::info!(
                    event = "worker_backoff",
                    worker = slot.id,
                    delay_ms = delay.as_millis() as u64,
                    "waiting before restart"
                );
                let mut fatal = self.fatal.subscribe();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = fatal.wait_for(Option::is_some) => return,
                }
            }
            if self.stopping.load(Ordering::SeqCst) || self.fatal.borrow().is_some() {
                return;
            }
            match self.spawn(w.slot) {
                Ok(new) => {
                    let restarts = slot.restarts.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::info!(
                        event = "worker_restart",
                        worker = slot.id,
                        pid = new.pid,
                        restarts,
                        "worker restarted"
                    );
                    *slot.current.lock().unwrap() = Some(new);
                    return;
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    tracing::error!(event = "worker_spawn_failed", worker = slot.id, error = %message, "cannot start a worker");
                    if self.record_crash(slot.id, &message) {
                        return;
                    }
                    consecutive = slot.consecutive.fetch_add(1, Ordering::SeqCst) + 1;
                }
            }
        }
    }

    /// Counts a crash; true when that makes a crash loop (and the master is told to give up).
    fn record_crash(&self, slot_id: usize, status: &str) -> bool {
        let now = Instant::now();
        let window = self.settings.crash_window;
        let mut crashes = self.crashes.lock().unwrap();
        crashes.push_back(now);
        while crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            crashes.pop_front();
        }
        if crashes.len() >= self.settings.crash_limit as usize {
            let message = format!(
                "crash loop: workers crashed {} times within {} s (limit {}); the last one, worker {slot_id}, \
                 exited with {status}. Giving up so that the service manager can take over; see the worker \
                 log lines above for the cause",
                crashes.len(),
                window.as_secs(),
                self.settings.crash_limit
            );
            self.fatal.send_replace(Some(message));
            return true;
        }
        false
    }

    /// Rolling replacement of every worker, one at a time. Concurrent callers run one after the other.
    async fn reload(self: &Arc<Self>) -> anyhow::Result<()> {
        let _one_at_a_time = self.reload_lock.lock().await;
        self.reloading.store(true, Ordering::SeqCst);
        let started = Instant::now();
        tracing::info!(event = "reload_start", exe = %self.exe.display(), "rolling reload");
        let mut result = Ok(());
        for i in 0..self.slots.len() {
            if let Err(e) = self.replace(i, "reload").await {
                result = Err(e);
                break;
            }
        }
        self.reloading.store(false, Ordering::SeqCst);
        match &result {
            Ok(()) => tracing::info!(
                event = "reload_done",
                duration_ms = started.elapsed().as_millis() as u64,
                "rolling reload finished"
            ),
            Err(e) => {
                tracing::error!(event = "reload_failed", error = %e, "rolling reload stopped")
            }
        }
        result
    }

    /// Replaces slot `i`'s process: start the new one, wait for ready, then drain the old one.
    async fn replace(self: &Arc<Self>, i: usize, why: &str) -> anyhow::Result<()> {
        let slot = &self.slots[i];
        let guard = slot.lock.lock().await;
        let new = self.spawn(i)?;
        tracing::info!(
            event = "replace_start",
            worker = slot.id,
            pid = new.pid,
            why,
            "new worker started, waiting for ready"
        );
        if let Err(reason) = new.wait_ready(self.settings.ready_timeout).await {
            new.retiring.store(true, Ordering::SeqCst);
            new.signal(libc::SIGKILL);
            new.wait_exit().await;
            bail!(
                "worker {}: the new process (pid {}) {reason}; the old process keeps serving",
                slot.id,
                new.pid
            );
        }
        let old = slot.current.lock().unwrap().replace(new);
        if why == "memory" {
            slot.restarts.fetch_add(1, Ordering::SeqCst);
        }
        drop(guard);
        if let Some(old) = old {
            self.retire(&old, self.settings.drain_timeout + Duration::from_secs(5))
                .await;
        }
        Ok(())
    }

    /// Asks a process to drain (SIGTERM) and waits for it; SIGKILL after `grace`.
    async fn retire(&self, w: &Arc<Worker>, grace: Duration) {
        w.retiring.store(true, Ordering::SeqCst);
        w.set_state(State::Draining);
        tracing::info!(
            event = "worker_drain",
            worker = self.slots[w.slot].id,
            pid = w.pid,
            "draining worker"
        );
        w.signal(libc::SIGTERM);
        if tokio::time::timeout(grace, w.wait_exit()).await.is_err() {
            tracing::warn!(
                event = "worker_kill",
                worker = self.slots[w.slot].id,
                pid = w.pid,
                "worker did not drain in time: SIGKILL"
            );
            w.signal(libc::SIGKILL);
            w.wait_exit().await;
        }
    }

    /// Drains every live process at once and waits for all of them.
    async fn stop(self: &Arc<Self>, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let all: Vec<Arc<Worker>> = self.live.lock().unwrap().values().cloned().collect();
        futures::future::join_all(all.iter().map(|w| self.retire(w, grace))).await;
    }

    async fn kill_all(&self) {
        let all: Vec<Arc<Worker>> = self.live.lock().unwrap().values().cloned().collect();
        for w in &all {
            w.retiring.store(true, Ordering::SeqCst);
            w.signal(libc::SIGKILL);
        }
        for w in &all {
            w.wait_exit().await;
        }
    }

    /// Every second: sample CPU and memory, replace a worker over `--max-memory`.
    async fn tick(self: Arc<Self>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let all: Vec<Arc<Worker>> = self.live.lock().unwrap().values().cloned().collect();
            for w in &all {
                let Ok(now) = procstat::sample(w.pid) else {
                    continue;
                };
                let mut c = w.counters.lock().unwrap();
                if let Some(prev) = &c.cpu_prev {
                    c.cpu_pct = procstat::cpu_percent(prev, &now);
                }
                c.rss_bytes = now.rss_bytes;
                c.cpu_prev = Some(now);
            }
            let Some(limit) = self.settings.max_memory else {
                continue;
            };
            if self.stopping.load(Ordering::SeqCst) {
                continue;
            }
            for (i, slot) in self.slots.iter().enumerate() {
                let Some(w) = slot.current() else { continue };
                let rss = w.counters.lock().unwrap().rss_bytes;
                if w.state() != State::Online || rss <= limit || slot.lock.try_lock().is_err() {
                    continue;
                }
                tracing::warn!(
                    event = "worker_memory",
                    worker = slot.id,
                    pid = w.pid,
                    rss_bytes = rss,
                    limit_bytes = limit,
                    "worker above --max-memory: replacing it"
                );
                let c = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.replace(i, "memory").await {
                        tracing::error!(event = "replace_failed", error = %e, "memory replacement failed");
                    }
                });
            }
        }
    }

    fn status(&self) -> ClusterStatus {
        let live: Vec<Arc<Worker>> = self.live.lock().unwrap().values().cloned().collect();
        let mut workers = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            let mine: Vec<&Arc<Worker>> = live.iter().filter(|w| w.slot == i).collect();
            let restarts = slot.restarts.load(Ordering::SeqCst);
            if mine.is_empty() {
                workers.push(WorkerStatus {
                    id: slot.id,
                    pid: None,
                    state: "restarting".into(),
                    uptime_s: 0,
                    restarts,
                    cpu_pct: 0.0,
                    rss_bytes: 0,
                    connections: 0,
                    requests: 0,
                });
            }
            for w in mine {
                let c = w.counters.lock().unwrap();
                workers.push(WorkerStatus {
                    id: slot.id,
                    pid: Some(w.pid),
                    state: w.state().as_str().into(),
                    uptime_s: w.started.elapsed().as_secs(),
                    restarts,
                    cpu_pct: (c.cpu_pct * 10.0).round() / 10.0,
                    rss_bytes: c.rss_bytes,
                    connections: c.connections,
                    requests: c.requests,
                });
            }
        }
        ClusterStatus {
            master: MasterStatus {
                pid: std::process::id(),
                listen: self.listen.to_string(),
                uptime_s: self.started.elapsed().as_secs(),
                exe: self.exe.display().to_string(),
                reloading: self.reloading.load(Ordering::SeqCst),
            },
            workers,
        }
    }

    /// The cluster's Prometheus exposition: each worker's own series with a `worker` label, plus the
    /// master's view of the processes.
    fn metrics_text(&self) -> String {
        let mut parts = Vec::new();
        for slot in &self.slots {
            if let Some(w) = slot.current() {
                let text = w.counters.lock().unwrap().metrics.clone();
                if !text.is_empty() {
                    parts.push((slot.id.to_string(), text));
                }
            }
        }
        let mut out = super::prometheus::merge(&parts, "worker");
        let status = self.status();
        let mut by_state: BTreeMap<&str, usize> = ["starting", "online", "draining", "restarting"]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
        for w in &status.workers {
            *by_state.entry(w.state.as_str()).or_default() += 1;
        }
        out.push_str(
            "# HELP cozy_cluster_workers Worker processes by state, as the master sees them\n",
        );
        out.push_str("# TYPE cozy_cluster_workers gauge\n");
        for (state, n) in by_state {
            out.push_str(&format!("cozy_cluster_workers{{state=\"{state}\"}} {n}\n"));
        }
        out.push_str("# HELP cozy_worker_restarts_total Worker processes restarted by the master (crash or memory limit)\n");
        out.push_str("# TYPE cozy_worker_restarts_total counter\n");
        for slot in &self.slots {
            out.push_str(&format!(
                "cozy_worker_restarts_total{{worker=\"{}\"}} {}\n",
                slot.id,
                slot.restarts.load(Ordering::SeqCst)
            ));
        }
        out.push_str(
            "# HELP cozy_worker_resident_memory_bytes Resident memory of each worker process\n",
        );
        out.push_str("# TYPE cozy_worker_resident_memory_bytes gauge\n");
        for w in status.workers.iter().filter(|w| w.state == "online") {
            out.push_str(&format!(
                "cozy_worker_resident_memory_bytes{{worker=\"{}\"}} {}\n",
                w.id, w.rss_bytes
            ));
        }
        out
    }
}

/// Resolves with the crash-loop message once there is one.
async fn fatal_message(rx: &mut watch::Receiver<Option<String>>) -> String {
    match rx.wait_for(Option::is_some).await {
        Ok(m) => m.clone().unwrap_or_default(),
        Err(_) => std::future::pending().await,
    }
}

/// `exit status 3` / `signal 9 (SIGKILL)`.
fn describe(status: std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit status {code}");
    }
    match status.signal() {
        Some(sig) => format!("signal {sig} ({})", signal_name(sig)),
        None => "unknown status".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "?",
    }
}

/// Duplicates `fd` to a number ≥ 10 with close-on-exec set.
fn dup_high(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a valid fd returns a new fd that we then own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a freshly created descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The shared listening socket: created once here, inherited by every worker.
fn bind_listener(addr: SocketAddr) -> anyhow::Result<(OwnedFd, SocketAddr)> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let listener = socket
        .listen(1024)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let std_listener = listener.into_std()?;
    let fd = dup_high(std_listener.as_raw_fd())?;
    Ok((fd, local))
}

fn prepare_run_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (0700)", dir.display()))?;
    }
    Ok(())
}

async fn bind_control_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another cozy master is running with this run directory (its control socket {} answers); \
                 stop it with `cozy stop`, or give this one its own COZY_RUN_DIR",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| {
            format!("cannot remove the stale control socket {}", path.display())
        })?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve_control(
    listener: tokio::net::UnixListener,
    cluster: Arc<Cluster>,
    stop: mpsc::UnboundedSender<oneshot::Sender<Reply>>,
) {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let me = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let allowed = stream
            .peer_cred()
            .map(|c| c.uid() == me || c.uid() == 0)
            .unwrap_or(false);
        let cluster = cluster.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let reply = if !allowed {
                Reply::error("permission denied: only the user running the master may control it")
            } else {
                let mut line = String::new();
                let mut reader = BufReader::new(read);
                match reader.read_line(&mut line).await {
                    Ok(_) => match serde_json::from_str::<Request>(&line) {
                        Ok(Request::Status) => Reply {
                            status: Some(cluster.status()),
                            ..Reply::ok()
                        },
                        Ok(Request::Reload) => match cluster.reload().await {
                            Ok(()) => Reply {
                                status: Some(cluster.status()),
                                ..Reply::ok()
                            },
                            Err(e) => Reply::error(format!("{e:#}")),
                        },
                        Ok(Request::Stop) => {
                            let (tx, rx) = oneshot::channel();
                            let _ = stop.send(tx);
                            rx.await
                                .unwrap_or_else(|_| Reply::error("the master went away"))
                        }
                        Err(e) => Reply::error(format!("bad request: {e}")),
                    },
                    Err(e) => Reply::error(format!("cannot read the request: {e}")),
                }
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
            let _ = write.shutdown().await;
        });
    }
}

/// Copies a worker's output to the master's stderr, marking every line with the worker id.
async fn forward_logs(stream: impl AsyncRead + Unpin, worker: usize, format: LogFormat) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let marked = mark_line(&line, worker, format);
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{marked}");
    }
}

/// Adds the worker id to one log line: a `"worker"` field on a JSON object, a prefix otherwise.
pub fn mark_line(line: &str, worker: usize, format: LogFormat) -> String {
    let trimmed = line.trim_start();
    if format == LogFormat::Json && trimmed.starts_with('{') {
        let rest = trimmed[1..].trim_start();
        if rest.starts_with('}') {
            return format!("{{\"worker\":{worker}{rest}");
        }
        return format!("{{\"worker\":{worker},{rest}");
    }
    format!("[worker {worker}] {line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(800));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn log_lines_carry_the_worker_id() {
        let json = mark_line(r#"{"level":"INFO","message":"hi"}"#, 3, LogFormat::Json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["worker"], 3);
        assert_eq!(v["message"], "hi");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&mark_line("{}", 1, LogFormat::Json))
                .unwrap()["worker"],
            1
        );
        // An access log line keeps its fields at the top level, where `jq .request_id` finds them.
        let access = mark_line(
            r#"{"level":"INFO","message":"request","request_id":"abc","status":404}"#,
            2,
            LogFormat::Json,
        );
        let v: serde_json::Value = serde_json::from_str(&access).unwrap();
        assert_eq!(
            (v["worker"].as_u64(), v["request_id"].as_str()),
            (Some(2), Some("abc"))
        );
        assert_eq!(v["status"], 404);
        assert_eq!(
            mark_line("error: boom", 2, LogFormat::Json),
            "[worker 2] error: boom"
        );
        assert_eq!(
            mark_line("  INFO listening", 2, LogFormat::Pretty),
            "[worker 2]   INFO listening"
        );
    }
}
