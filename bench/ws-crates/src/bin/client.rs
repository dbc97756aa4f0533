//! Load client for `server` (tokio-tungstenite, the same for every server crate).
//!
//!   client idle  <port> <conns> [idle_secs]   RSS / heap per idle connection
//!   client warm  <port> <conns> [idle_secs]   the same after 0.2 s of broadcast to all of them
//!   client bcast <port> <conns> [secs]        broadcast throughput, server CPU per delivered message
//!
//! Prints one `key=value` line; `run.sh` collects them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Plain HTTP GET on a fresh connection; returns the body.
async fn get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default())
}

fn field(stats: &str, key: &str) -> i64 {
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

struct Counters {
    connected: AtomicUsize,
    received: AtomicU64,
    ended: AtomicUsize,
    closed: AtomicUsize,
}

/// Opens `n` WebSocket connections (64 handshakes in flight, source addresses 127.0.0.2..), each
/// read by its own task that counts text messages until "END".
async fn connect_all(port: u16, n: usize, c: Arc<Counters>) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let c = c.clone();
        // 5 000 connections per source address keeps well inside the ephemeral port range.
        let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i / 5000) as u8);
        tasks.push(tokio::spawn(async move {
            let sock = TcpSocket::new_v4().unwrap();
            // Let connect() pick the port against the full 4-tuple: bind(port 0) alone scans the
            // whole range per call and collides with the previous run's TIME_WAIT sockets.
            let on: libc::c_int = 1;
            unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &on as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.bind((src, 0).into()).unwrap();
            let tcp = match sock.connect(([127, 0, 0, 1], port).into()).await {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("connect {i}: {e}");
                    return;
                }
            };
            let _ = tcp.set_nodelay(true);
            let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
            let url = format!("ws://127.0.0.1:{port}/ws");
            let (ws, _) = match tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("handshake {i}: {e}");
                    return;
                }
            };
            drop(permit);
            c.connected.fetch_add(1, Ordering::Relaxed);
            let (_sink, mut stream) = ws.split();
            let mut got = 0u64;
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(Message::Text(t)) => {
                        if t.as_str() == "END" {
                            c.received.fetch_add(got, Ordering::Relaxed);
                            got = 0;
                            c.ended.fetch_add(1, Ordering::Relaxed);
                        } else {
                            got += 1;
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            c.closed.fetch_add(1, Ordering::Relaxed);
        }));
    }
    Ok(tasks)
}

async fn wait_server_conns(port: u16, n: usize) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let s = get(port, "/stats").await?;
        if field(&s, "conns") as usize >= n {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("server has only {s} after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn own_cpu_us() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as i64 * 1_000_000 + t.tv_usec as i64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let port: u16 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(9100);
    let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let secs: f64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(if mode != "bcast" { 2.0 } else { 10.0 });
    let c = Arc::new(Counters {
        connected: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        ended: AtomicUsize::new(0),
        closed: AtomicUsize::new(0),
    });

    match mode.as_str() {
        "idle" | "warm" => {
            let before = get(port, "/stats").await?;
            let t = Instant::now();
            let _tasks = connect_all(port, n, c.clone()).await?;
            wait_server_conns(port, n).await?;
            let connect_s = t.elapsed().as_secs_f64();
            if mode == "warm" {
                // Some traffic first: buffers that grow on use (write buffers, queues) show up too.
                get(port, "/broadcast?secs=0.2").await?;
                while c.ended.load(Ordering::Relaxed) < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let after = get(port, "/stats").await?;
            let conns = field(&after, "conns");
            let rss = (field(&after, "rss") - field(&before, "rss")) as f64 / conns as f64;
            let heap = (field(&after, "heap") - field(&before, "heap")) as f64 / conns as f64;
            println!(
                "mode={mode} conns={conns} rss_before={} rss_after={} rss_per_conn={rss:.0} heap_per_conn={heap:.0} connect_s={connect_s:.1}",
                field(&before, "rss"),
                field(&after, "rss")
            );
        }
        "bcast" => {
            let _tasks = connect_all(port, n, c.clone()).await?;
            wait_server_conns(port, n).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = get(port, "/stats").await?;
            let client_before = own_cpu_us();
            let t = Instant::now();
            let reply = get(port, &format!("/broadcast?secs={secs}")).await?;
            let queued_s = t.elapsed().as_secs_f64();
            while c.ended.load(Ordering::Relaxed) < n {
                if c.closed.load(Ordering::Relaxed) > 0 || t.elapsed() > Duration::from_secs_f64(secs + 60.0) {
                    anyhow::bail!("connections closed or stuck: ended {} of {n}", c.ended.load(Ordering::Relaxed));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let elapsed = t.elapsed().as_secs_f64();
            let after = get(port, "/stats").await?;
            let client_cpu_s = (own_cpu_us() - client_before) as f64 / 1e6;
            let delivered = c.received.load(Ordering::Relaxed);
            let cpu_us = (field(&after, "utime_us") + field(&after, "stime_us"))
                - (field(&before, "utime_us") + field(&before, "stime_us"));
            let sys_us = field(&after, "stime_us") - field(&before, "stime_us");
            println!(
                "mode=bcast conns={n} {} delivered={delivered} elapsed_s={elapsed:.2} queued_s={queued_s:.2} msgs_per_s={:.0} server_cpu_s={:.2} server_sys_share={:.2} server_ns_per_msg={:.0} client_cpu_s={client_cpu_s:.2} rss_after={}",
                reply.replace(' ', "_"),
                delivered as f64 / elapsed,
                cpu_us as f64 / 1e6,
                sys_us as f64 / cpu_us as f64,
                cpu_us as f64 * 1000.0 / delivered as f64,
                field(&after, "rss")
            );
        }
        _ => anyhow::bail!("usage: client <idle|bcast> <port> <conns> [secs]"),
    }
    Ok(())
}
