//! The worker side of the cluster: a `cozy serve` process started by the master.
//!
//! The master hands each worker the listening socket (fd 3, created once by the master, so every worker
//! accepts from one queue and a worker going away never resets a waiting connection) and one end of a
//! private socketpair (fd 4). Over the socketpair the worker reports `ready`, pushes its counters and metrics
//! every second, and asks for the cluster-wide `/metrics`. When the socketpair reaches end-of-file the master
//! is gone and the worker drains and exits (the kernel's parent-death signal normally kills it first).

use std::collections::HashMap;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot, Notify};

use super::protocol::{ToMaster, ToWorker, CONTROL_FD, ENV_WORKER_ID, LISTEN_FD};

/// Who this process is, when the master started it.
#[derive(Debug, Clone, Copy)]
pub struct WorkerEnv {
    pub id: usize,
}

impl WorkerEnv {
    /// `Some` when this process was started by a cluster master.
    pub fn detect() -> Option<WorkerEnv> {
        let id = std::env::var(ENV_WORKER_ID).ok()?.parse().ok()?;
        Some(WorkerEnv { id })
    }

    /// Takes the inherited listening socket (fd 3).
    pub fn listener(&self) -> anyhow::Result<tokio::net::TcpListener> {
        // SAFETY: the master dup2()s its listening socket to fd 3 just before exec and nothing else in
        // this process opens fd 3 before this call, which happens once.
        let std_listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FD) };
        std_listener
            .set_nonblocking(true)
            .context("the inherited listening socket (fd 3) is not usable")?;
        Ok(tokio::net::TcpListener::from_std(std_listener)?)
    }

    /// Connects to the master over the inherited socketpair (fd 4).
    pub fn link(&self) -> anyhow::Result<(Arc<Link>, MasterGone)> {
        // SAFETY: as for fd 3: the master placed the socketpair end there, and it is taken once.
        let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(CONTROL_FD) };
        stream
            .set_nonblocking(true)
            .context("the inherited control socket (fd 4) is not usable")?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel::<ToMaster>();
        let link = Arc::new(Link {
            id: self.id,
            tx,
            next: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
        });
        let gone = Arc::new(Notify::new());
        tokio::spawn(super::protocol::write_lines(write, rx));
        let reader_link = link.clone();
        let reader_gone = gone.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(ToWorker::ClusterMetrics { id, text }) => {
                        let waiter = reader_link.pending.lock().unwrap().remove(&id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(text);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "unreadable message from the master"),
                }
            }
            reader_gone.notify_one();
        });
        Ok((link, MasterGone(gone)))
    }
}

/// Resolves when the master has gone away (its end of the socketpair closed).
pub struct MasterGone(Arc<Notify>);

impl MasterGone {
    pub async fn wait(self) {
        self.0.notified().await
    }
}

/// This worker's line to the master.
pub struct Link {
    pub id: usize,
    tx: mpsc::UnboundedSender<ToMaster>,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<String>>>,
}

impl Link {
    pub fn send(&self, msg: ToMaster) {
        let _ = self.tx.send(msg);
    }

    /// The whole cluster's Prometheus exposition, assembled by the master; `None` if it does not answer.
    pub async fn cluster_metrics(&self, timeout: Duration) -> Option<String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.send(ToMaster::ClusterMetrics { id });
        let answer = tokio::time::timeout(timeout, rx)
            .await
            .ok()
            .and_then(Result::ok);
        self.pending.lock().unwrap().remove(&id);
        answer
    }
}
