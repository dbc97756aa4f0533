//! One fan-out run against one server: N subscribers in one room, P publishers, then numbers.
//!
//! Order of a run: connect the subscribers (64 handshakes in flight), then the publishers (room
//! members too: cozy lets only subscribers publish, and both servers deliver to them as well — their
//! copies are read but not counted); wait until nothing has arrived for a second (cozy announces the
//! joins as presence frames: at most one per room every 50 ms since `afc1118`, one per join — N²/2
//! for N joins — before); publish for `warmup` seconds, then measure for `secs`; stop publishing and
//! wait for the stragglers; check that every subscriber got every message exactly once.
//!
//! Two ways to pace the publishers:
//! - **rate**: R messages per second in total, whatever happens (open loop). If the server keeps up,
//!   both systems deliver R × N per second and only latency tells them apart.
//! - **window**: at most W messages *not yet delivered to every subscriber*; a publisher sends the next
//!   one as soon as a message completes. That is end-to-end flow control, identical for both systems,
//!   and finds the highest delivered rate each can sustain without its queues growing without bound
//!   (no slow-consumer closes, no unbounded buffering in node). Latency is then queueing at saturation.
//!
//! Latency is publish → deliver on the same clock (this process both stamps and receives), for the
//! messages sent inside the measured window, received at any time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::SinkExt;
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::hist::Histogram;
use crate::procstat::{self, Snapshot, Window};
use crate::wire::{self, Kind, System};

#[derive(Clone, Copy, Debug)]
pub enum Pace {
    Rate(f64),
    Window(usize),
}

pub struct Args {
    pub system: System,
    pub server: SocketAddr,
    pub server_pid: u32,
    pub subs: usize,
    pub pubs: usize,
    pub pace: Pace,
    pub warmup: f64,
    pub secs: f64,
    pub tokens: Vec<String>,
    pub room: String,
    pub round: u32,
}

/// Everything the connection tasks share.
struct Shared {
    system: System,
    subs: u32,
    clock: Instant,
    /// Receipts by subscribers, per message number.
    per_msg: Vec<AtomicU32>,
    delivered: AtomicU64,
    /// Every other frame received (presence, acks, pings…): with `delivered`, tells when it is quiet.
    other: AtomicU64,
    presence: AtomicU64,
    acks: AtomicU64,
    hist: Histogram,
    win_lo: AtomicU64,
    win_hi: AtomicU64,
    /// Window mode: one permit per message that may be in flight.
    window: Semaphore,
    windowed: bool,
    next_n: AtomicU64,
    stop: AtomicBool,
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// How connections ended before the run was over ("close 4009", "eof", …), and failures to join.
    ends: Mutex<BTreeMap<String, u64>>,
    /// cozy `error` frames, by text (first 120 characters).
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    fn note(map: &Mutex<BTreeMap<String, u64>>, what: String) {
        *map.lock().unwrap().entry(what).or_default() += 1;
    }

    fn received(&self, n: u64, t: u64) {
        let now = self.now_us();
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if t >= self.win_lo.load(Ordering::Relaxed) && t < self.win_hi.load(Ordering::Relaxed) {
            self.hist.record(now.saturating_sub(t));
        }
        if let Some(c) = self.per_msg.get(n as usize) {
            if c.fetch_add(1, Ordering::Relaxed) + 1 == self.subs && self.windowed {
                self.window.add_permits(1);
            }
        }
    }

    fn quiet_counter(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed) + self.other.load(Ordering::Relaxed)
    }
}

async fn subscriber(sh: Arc<Shared>, i: usize, server: SocketAddr, token: String, room: String, gate: Arc<Semaphore>) {
    let permit = gate.acquire_owned().await.unwrap();
    let mut ws = match wire::open(sh.system, server, wire::source(i)).await {
        Ok(ws) => ws,
        Err(e) => {
            Shared::note(&sh.ends, format!("connect failed: {e:#}"));
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    match wire::join(sh.system, &mut ws, &token, &room).await {
        Ok(setup) => {
            sh.presence.fetch_add(setup.presence, Ordering::Relaxed);
        }
        Err(e) => {
            Shared::note(&sh.ends, format!("join failed: {e:#}"));
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    drop(permit);
    sh.ready.fetch_add(1, Ordering::Relaxed);
    loop {
        match wire::next_text(&mut ws).await {
            Ok(text) => match wire::classify(sh.system, &text) {
                Kind::Message { n, t } => sh.received(n, t),
                other => {
                    sh.other.fetch_add(1, Ordering::Relaxed);
                    match other {
                        Kind::Presence => {
                            sh.presence.fetch_add(1, Ordering::Relaxed);
                        }
                        Kind::Ping => {
                            if let Err(end) = wire::pong(&mut ws).await {
                                Shared::note(&sh.ends, format!("subscriber {}", end.label()));
                                return;
                            }
                        }
                        Kind::Error(e) => Shared::note(&sh.errors, e.chars().take(120).collect()),
                        _ => {}
                    }
                }
            },
            Err(end) => {
                Shared::note(&sh.ends, format!("subscriber {}", end.label()));
                return;
            }
        }
    }
}

async fn publisher(
    sh: Arc<Shared>,
    p: usize,
    args_pubs: usize,
    pace: Pace,
    server: SocketAddr,
    token: String,
    room: String,
    mut start: watch::Receiver<bool>,
) {
    let src = wire::source(sh.subs as usize + p);
    let mut ws = match wire::open(sh.system, server, src).await {
        Ok(ws) => ws,
        Err(e) => {
            Shared::note(&sh.ends, format!("publisher connect failed: {e:#}"));
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if let Err(e) = wire::join(sh.system, &mut ws, &token, &room).await {
        Shared::note(&sh.ends, format!("publisher join failed: {e:#}"));
        sh.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    sh.ready.fetch_add(1, Ordering::Relaxed);
    let period = match pace {
        Pace::Rate(r) => Duration::from_secs_f64(args_pubs as f64 / r),
        Pace::Window(_) => Duration::from_secs(3600),
    };
    let mut started = false;
    let mut tick = tokio::time::interval(period);
    loop {
        let sending = started && !sh.stop.load(Ordering::Relaxed);
        // What to send next, decided while reading at the same time (pings, acks, own copies).
        let go = tokio::select! {
            r = start.changed(), if !started => {
                if r.is_ok() && *start.borrow() {
                    started = true;
                    tick.reset();
                }
                false
            }
            _ = tick.tick(), if sending && matches!(pace, Pace::Rate(_)) => true,
            permit = sh.window.acquire(), if sending && matches!(pace, Pace::Window(_)) => {
                if let Ok(permit) = permit {
                    permit.forget();
                }
                true
            }
            r = wire::next_text(&mut ws) => {
                match r {
                    Ok(text) => match wire::classify(sh.system, &text) {
                        Kind::Message { .. } => {}
                        Kind::Ack => {
                            sh.acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Kind::Ping => {
                            if let Err(end) = wire::pong(&mut ws).await {
                                Shared::note(&sh.ends, format!("publisher {}", end.label()));
                                return;
                            }
                        }
                        Kind::Error(e) => Shared::note(&sh.errors, e.chars().take(120).collect()),
                        _ => {}
                    },
                    Err(end) => {
                        Shared::note(&sh.ends, format!("publisher {}", end.label()));
                        return;
                    }
                }
                false
            }
        };
        if go && !sh.stop.load(Ordering::Relaxed) {
            let n = sh.next_n.fetch_add(1, Ordering::Relaxed);
            if n as usize >= sh.per_msg.len() {
                sh.next_n.fetch_sub(1, Ordering::Relaxed);
                sh.stop.store(true, Ordering::Relaxed);
                continue;
            }
            let frame = wire::publish_frame(sh.system, &room, p, n, sh.now_us());
            if let Err(e) = ws.send(Message::text(frame)).await {
                Shared::note(&sh.ends, format!("publisher send: {e}"));
                return;
            }
        }
    }
}

/// Waits until no frame has arrived for `still` (at most `limit`); returns the time waited.
async fn settle(sh: &Shared, still: Duration, limit: Duration) -> f64 {
    let t = Instant::now();
    let mut last = sh.quiet_counter();
    let mut since = Instant::now();
    while t.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sh.quiet_counter();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= still {
            break;
        }
    }
    t.elapsed().as_secs_f64()
}

pub async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.system == System::SocketIo || !args.tokens.is_empty(), "cozy needs --tokens");
    let capacity = match args.pace {
        Pace::Rate(r) => (r * (args.warmup + args.secs) * 1.5) as usize + 1000,
        Pace::Window(_) => 4_000_000,
    };
    let sh = Arc::new(Shared {
        system: args.system,
        subs: args.subs as u32,
        clock: Instant::now(),
        per_msg: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
        delivered: AtomicU64::new(0),
        other: AtomicU64::new(0),
        presence: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        hist: Histogram::new(),
        win_lo: AtomicU64::new(u64::MAX),
        win_hi: AtomicU64::new(u64::MAX),
        window: Semaphore::new(match args.pace {
            Pace::Window(w) => w,
            Pace::Rate(_) => 0,
        }),
        windowed: matches!(args.pace, Pace::Window(_)),
        next_n: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        ends: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(BTreeMap::new()),
    });
    let token = |i: usize| args.tokens.get(i % args.tokens.len().max(1)).cloned().unwrap_or_default();

    // 1. Subscribers.
    let t_connect = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    for i in 0..args.subs {
        tokio::spawn(subscriber(sh.clone(), i, args.server, token(i), args.room.clone(), gate.clone()));
    }
    let wait_ready = |n: usize| {
        let sh = sh.clone();
        async move {
            let t = Instant::now();
            while sh.ready.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < n
                && t.elapsed() < Duration::from_secs(300)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_ready(args.subs).await;
    // 2. Publishers (their own users: the last tokens).
    let (start_tx, start_rx) = watch::channel(false);
    for p in 0..args.pubs {
        let t = token(args.tokens.len().saturating_sub(1 + p));
        tokio::spawn(publisher(sh.clone(), p, args.pubs, args.pace, args.server, t, args.room.clone(), start_rx.clone()));
    }
    wait_ready(args.subs + args.pubs).await;
    let connect_s = t_connect.elapsed().as_secs_f64();
    let failed = sh.failed.load(Ordering::Relaxed);
    let setup_presence = sh.presence.load(Ordering::Relaxed);
    let settle_s = settle(&sh, Duration::from_secs(1), Duration::from_secs(240)).await;
    let presence_before = sh.presence.load(Ordering::Relaxed);
    eprintln!(
        "[{}] {} of {} connections ready in {connect_s:.1} s ({failed} failed), quiet after {settle_s:.1} s more; {presence_before} presence frames so far",
        args.system.name(),
        sh.ready.load(Ordering::Relaxed),
        args.subs + args.pubs
    );

    // 3. Publish: warm-up, then the measured window.
    start_tx.send(true)?;
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    sh.win_lo.store(sh.now_us(), Ordering::Relaxed);
    let (cpu_a, delivered_a, n_a) = (Snapshot::take(args.server_pid), sh.delivered.load(Ordering::Relaxed), sh.next_n.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(args.secs)).await;
    sh.win_hi.store(sh.now_us(), Ordering::Relaxed);
    let (cpu_b, delivered_b, n_b) = (Snapshot::take(args.server_pid), sh.delivered.load(Ordering::Relaxed), sh.next_n.load(Ordering::Relaxed));
    sh.stop.store(true, Ordering::Relaxed);
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("").to_string();

    // 4. Stragglers, then the exactly-once check.
    let published = sh.next_n.load(Ordering::Relaxed) as usize;
    let t_drain = Instant::now();
    let complete = |sh: &Shared| sh.per_msg[..published].iter().all(|c| c.load(Ordering::Relaxed) >= sh.subs);
    while !complete(&sh) && t_drain.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_s = t_drain.elapsed().as_secs_f64();
    let (mut missing, mut dup, mut incomplete) = (0u64, 0u64, 0u64);
    for c in &sh.per_msg[..published] {
        let c = c.load(Ordering::Relaxed);
        if c < sh.subs {
            missing += (sh.subs - c) as u64;
            incomplete += 1;
        } else {
            dup += (c - sh.subs) as u64;
        }
    }

    let w = Window::between(cpu_a, cpu_b);
    let delivered = delivered_b - delivered_a;
    let per_s = delivered as f64 / w.secs;
    let q = |x: f64| sh.hist.quantile_ms(x);
    let (pace, pace_value) = match args.pace {
        Pace::Rate(r) => ("rate", r),
        Pace::Window(w) => ("window", w as f64),
    };
    let ends = sh.ends.lock().unwrap().clone();
    let errors = sh.errors.lock().unwrap().clone();
    Ok(json!({
        "kind": "fanout",
        "system": args.system.name(),
        "round": args.round,
        "subs": args.subs,
        "pubs": args.pubs,
        "pace": pace,
        "pace_value": pace_value,
        "warmup_s": args.warmup,
        "secs": w.secs,
        "connect_s": connect_s,
        "settle_s": settle_s,
        "join_failures": failed,
        "presence_frames_setup": setup_presence,
        "presence_frames_total": sh.presence.load(Ordering::Relaxed),
        "published_total": published,
        "published_in_window": n_b - n_a,
        "publish_per_s": (n_b - n_a) as f64 / w.secs,
        "delivered_in_window": delivered,
        "delivered_per_s": per_s,
        "latency_samples": sh.hist.count(),
        "p50_ms": q(0.5),
        "p90_ms": q(0.9),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": sh.hist.max_ms(),
        "missing": missing,
        "incomplete_messages": incomplete,
        "duplicates": dup,
        "drain_s": drain_s,
        "acks": sh.acks.load(Ordering::Relaxed),
        "ends": ends,
        "error_frames": errors,
        "server_cores": w.server_cores,
        "loadgen_cores": w.loadgen_cores,
        "machine_cores": w.machine_cores,
        "other_cores": w.machine_cores - w.server_cores - w.loadgen_cores,
        "ksoftirqd_cores": w.ksoftirqd_cores,
        "server_us_per_delivered": w.server_cpu_secs * 1e6 / delivered.max(1) as f64,
        "server_sys_share": w.server_sys_share,
        "loadgen_us_per_delivered": w.loadgen_cores * w.secs * 1e6 / delivered.max(1) as f64,
        "server_rss_kib": procstat::status_kib(args.server_pid, "VmRSS"),
        "load1": load1,
    }))
}
