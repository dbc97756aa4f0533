//! Memory per idle connection: the server's RSS before and after N connections that joined a room and
//! then only answer heartbeats.
//!
//! cozy connections say `hello` and subscribe to `chat:idle-<i / room_size>` (rooms of `room_size`
//! members: an idle connection of a real client is authenticated and in some room, and one room of
//! 10 000 would add 50 M presence frames to the setup), or with `room_size` 0 stop after `welcome`
//! (authenticated, in no room: the floor); Socket.IO connections connect the namespace and
//! the server puts them in its room. The server's VmRSS is read after a quiet spell (nothing arrived
//! for 2 s) plus `settle` seconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Semaphore;

use crate::procstat;
use crate::wire::{self, Kind, System};

pub struct Args {
    pub system: System,
    pub server: SocketAddr,
    pub server_pid: u32,
    pub conns: usize,
    pub room_size: usize,
    pub settle: f64,
    pub tokens: Vec<String>,
    pub round: u32,
    /// A shell command run after the measurement, connections still open, before a second RSS
    /// reading: `malloc_trim(0)` through gdb for cozy, a forced GC for node. It separates memory the
    /// connections hold from freed memory the allocator has not given back yet.
    pub then: Option<String>,
}

#[derive(Default)]
struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// Connections that were ready and then ended before the measurement.
    ended: AtomicUsize,
    frames: AtomicU64,
    presence: AtomicU64,
    ends: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn note(&self, what: String) {
        *self.ends.lock().unwrap().entry(what).or_default() += 1;
    }
}

async fn idle_conn(sh: Arc<Shared>, system: System, i: usize, server: SocketAddr, token: String, room: String, gate: Arc<Semaphore>) {
    let permit = gate.acquire_owned().await.unwrap();
    let joined = async {
        let mut ws = wire::open(system, server, wire::source(i)).await?;
        let setup = wire::join(system, &mut ws, &token, &room).await?;
        anyhow::Ok((ws, setup))
    };
    let mut ws = match joined.await {
        Ok((ws, setup)) => {
            sh.presence.fetch_add(setup.presence, Ordering::Relaxed);
            ws
        }
        Err(e) => {
            sh.note(format!("failed: {e:#}"));
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    drop(permit);
    sh.ready.fetch_add(1, Ordering::Relaxed);
    loop {
        match wire::next_text(&mut ws).await {
            Ok(text) => {
                sh.frames.fetch_add(1, Ordering::Relaxed);
                match wire::classify(system, &text) {
                    Kind::Presence => {
                        sh.presence.fetch_add(1, Ordering::Relaxed);
                    }
                    Kind::Ping => {
                        if let Err(end) = wire::pong(&mut ws).await {
                            sh.note(end.label());
                            sh.ended.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    _ => {}
                }
            }
            Err(end) => {
                sh.note(end.label());
                sh.ended.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.system == System::SocketIo || !args.tokens.is_empty(), "cozy needs --tokens");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = procstat::status_kib(args.server_pid, "VmRSS").unwrap_or(0);
    let sh = Arc::new(Shared::default());
    let gate = Arc::new(Semaphore::new(64));
    let t = Instant::now();
    for i in 0..args.conns {
        let token = args.tokens.get(i % args.tokens.len().max(1)).cloned().unwrap_or_default();
        let room = match args.room_size {
            0 => String::new(),
            size => format!("chat:idle-{}", i / size),
        };
        tokio::spawn(idle_conn(sh.clone(), args.system, i, args.server, token, room, gate.clone()));
    }
    while sh.ready.load(Ordering::Relaxed) + sh.failed.load(Ordering::Relaxed) < args.conns
        && t.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t.elapsed().as_secs_f64();
    // Quiet: nothing received for 2 s (cozy's presence announcements are over).
    let mut last = sh.frames.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(2) && t.elapsed() < Duration::from_secs(400) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sh.frames.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let after = procstat::status_kib(args.server_pid, "VmRSS").unwrap_or(0);
    let ready = sh.ready.load(Ordering::Relaxed);
    let released = match &args.then {
        Some(cmd) => {
            let status = tokio::process::Command::new("sh").arg("-c").arg(cmd).output().await?.status;
            anyhow::ensure!(status.success(), "--then {cmd:?}: {status}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            procstat::status_kib(args.server_pid, "VmRSS")
        }
        None => None,
    };
    let ends = sh.ends.lock().unwrap().clone();
    Ok(json!({
        "kind": "idle",
        "system": args.system.name(),
        "round": args.round,
        "conns": args.conns,
        "room_size": args.room_size,
        "connected": ready,
        "failures": sh.failed.load(Ordering::Relaxed),
        "still_open": ready - sh.ended.load(Ordering::Relaxed),
        "connect_s": connect_s,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "hwm_kib": procstat::status_kib(args.server_pid, "VmHWM"),
        "bytes_per_conn": (after as f64 - before as f64) * 1024.0 / ready.max(1) as f64,
        "rss_released_kib": released,
        "bytes_per_conn_released": released.map(|r| (r as f64 - before as f64) * 1024.0 / ready.max(1) as f64),
        "presence_frames": sh.presence.load(Ordering::Relaxed),
        "ends": ends,
        "server_cpu_s": procstat::cpu_secs(args.server_pid),
    }))
}
