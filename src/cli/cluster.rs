//! `cozy status`, `cozy reload`, `cozy stop`: talk to a running master over its control socket.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::cluster::master::SOCKET_NAME;
use crate::cluster::protocol::{ClusterStatus, Reply, Request};
use crate::cluster::size::format_size;
use crate::config::Settings;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print `{"workers":[{"id","pid","state","uptime_s","restarts","cpu_pct","rss_bytes","connections","requests"}]}`.
    #[arg(long)]
    pub json: bool,
}

fn socket_path(settings: &Settings) -> PathBuf {
    settings.run_dir.join(SOCKET_NAME)
}

/// Sends one request and waits for the reply (a reload or stop may take a while).
async fn call(path: &Path, request: Request) -> anyhow::Result<Reply> {
    let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
        anyhow::anyhow!(
            "no cozy master answers on {} ({e}); is `cozy serve --workers N` running with this COZY_RUN_DIR?",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .context("reading the master's reply")?;
    if answer.trim().is_empty() {
        bail!("the master closed the control connection without answering");
    }
    serde_json::from_str(&answer)
        .with_context(|| format!("unreadable reply from the master: {answer}"))
}

fn ensure_ok(reply: &Reply, what: &str) -> anyhow::Result<()> {
    if !reply.ok {
        bail!(
            "{what} failed: {}",
            reply.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

pub async fn status(settings: Settings, args: StatusArgs) -> anyhow::Result<u8> {
    let reply = call(&socket_path(&settings), Request::Status).await?;
    ensure_ok(&reply, "status")?;
    let status = reply.status.context("the master sent no status")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &status)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", table(&status))?;
    }
    Ok(0)
}

pub async fn reload(settings: Settings) -> anyhow::Result<u8> {
    let reply = call(&socket_path(&settings), Request::Reload).await?;
    ensure_ok(&reply, "reload")?;
    if let Some(status) = reply.status {
        let pids: Vec<String> = status
            .workers
            .iter()
            .filter_map(|w| w.pid.map(|p| p.to_string()))
            .collect();
        eprintln!("reloaded: workers now run as pids {}", pids.join(", "));
    }
    Ok(0)
}

pub async fn stop(settings: Settings) -> anyhow::Result<u8> {
    let path = socket_path(&settings);
    let reply = call(&path, Request::Stop).await?;
    ensure_ok(&reply, "stop")?;
    // The master removes its socket just before it exits.
    for _ in 0..50 {
        if !path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("stopped");
    Ok(0)
}

/// The `pm2 ls`-like table.
pub fn table(status: &ClusterStatus) -> String {
    let mut rows = vec![[
        "id", "pid", "state", "uptime", "restarts", "cpu", "mem", "conns", "requests",
    ]
    .map(String::from)];
    for w in &status.workers {
        rows.push([
            w.id.to_string(),
            w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            w.state.clone(),
            human_duration(w.uptime_s),
            w.restarts.to_string(),
            format!("{:.1}%", w.cpu_pct),
            format_size(w.rss_bytes),
            w.connections.to_string(),
            w.requests.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "master pid {} on {}, up {}{}\n",
        status.master.pid,
        status.master.listen,
        human_duration(status.master.uptime_s),
        if status.master.reloading {
            ", reloading"
        } else {
            ""
        }
    );
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::protocol::{MasterStatus, WorkerStatus};

    #[test]
    fn the_table_has_one_aligned_row_per_worker() {
        let status = ClusterStatus {
            master: MasterStatus {
                pid: 10,
                listen: "127.0.0.1:8080".into(),
                uptime_s: 3700,
                exe: "/usr/bin/cozy".into(),
                reloading: false,
            },
            workers: vec![
                WorkerStatus {
                    id: 1,
                    pid: Some(11),
                    state: "online".into(),
                    uptime_s: 65,
                    restarts: 2,
                    cpu_pct: 1.5,
                    rss_bytes: 30 * 1024 * 1024,
                    connections: 3,
                    requests: 1200,
                },
                WorkerStatus {
                    id: 2,
                    pid: None,
                    state: "restarting".into(),
                    uptime_s: 0,
                    restarts: 5,
                    cpu_pct: 0.0,
                    rss_bytes: 0,
                    connections: 0,
                    requests: 0,
                },
            ],
        };
        let t = table(&status);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("master pid 10") && lines[0].contains("1h1m"));
        assert!(lines[1].starts_with("id  pid  state"));
        assert!(
            lines[2].contains("online") && lines[2].contains("1m5s") && lines[2].contains("1200")
        );
        assert!(lines[3].contains("restarting") && lines[3].contains(" - "));
        // Columns line up: "state" starts at the same offset on every row.
        let col = lines[1].find("state").unwrap();
        assert_eq!(&lines[2][col..col + 6], "online");
    }
}
