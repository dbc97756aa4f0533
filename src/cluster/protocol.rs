//! What the master and its workers, and `cozy status|reload|stop` and the master, say to each other.
//!
//! Both channels carry one JSON object per line. Master ↔ worker runs over a private socketpair the worker
//! inherits as fd 4; the control socket is `COZY_RUN_DIR/cozy.sock` (mode 0600, peer uid checked).

use serde::{Deserialize, Serialize};

/// Environment variable naming the worker id; its presence makes `cozy serve` run as a worker.
pub const ENV_WORKER_ID: &str = "COZY_WORKER_ID";
/// The inherited listening socket of a worker.
pub const LISTEN_FD: i32 = 3;
/// The inherited master ↔ worker socketpair end of a worker.
pub const CONTROL_FD: i32 = 4;

/// Writes every message from `rx` to `write` as one JSON line, until either side goes away (both ends of
/// the master ↔ worker socketpair use it).
pub async fn write_lines<T: Serialize>(
    mut write: impl tokio::io::AsyncWrite + Unpin,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) {
    use tokio::io::AsyncWriteExt;
    while let Some(msg) = rx.recv().await {
        let mut line = serde_json::to_vec(&msg).unwrap_or_default();
        line.push(b'\n');
        if write.write_all(&line).await.is_err() {
            return;
        }
    }
}

/// Worker → master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToMaster {
    /// The listener accepts and the database answers: the worker can take traffic.
    Ready,
    /// Sent every second: live counters and the worker's own Prometheus exposition.
    Stats {
        connections: u64,
        requests: u64,
        metrics: String,
    },
    /// `GET /metrics` on this worker wants the whole cluster's exposition.
    ClusterMetrics { id: u64 },
}

/// Master → worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Answer to [`ToMaster::ClusterMetrics`].
    ClusterMetrics { id: u64, text: String },
}

/// `cozy status|reload|stop` → master.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
    Stop,
}

/// Master → `cozy status|reload|stop`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClusterStatus>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            status: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(message.into()),
            status: None,
        }
    }
}

/// What `cozy status --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub master: MasterStatus,
    pub workers: Vec<WorkerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterStatus {
    pub pid: u32,
    pub listen: String,
    pub uptime_s: u64,
    pub exe: String,
    pub reloading: bool,
}

/// One worker process (or a worker slot waiting to be restarted, with `pid` null).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: usize,
    pub pid: Option<u32>,
    /// `starting`, `online`, `draining` or `restarting` (crashed, waiting for its backoff).
    pub state: String,
    pub uptime_s: u64,
    pub restarts: u32,
    pub cpu_pct: f64,
    pub rss_bytes: u64,
    pub connections: u64,
    pub requests: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let m = ToMaster::Stats {
            connections: 2,
            requests: 7,
            metrics: "x 1\n".into(),
        };
        let line = serde_json::to_string(&m).unwrap();
        assert_eq!(
            line,
            r#"{"type":"stats","connections":2,"requests":7,"metrics":"x 1\n"}"#
        );
        assert_eq!(serde_json::from_str::<ToMaster>(&line).unwrap(), m);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"reload"}"#).unwrap(),
            Request::Reload
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }
}
