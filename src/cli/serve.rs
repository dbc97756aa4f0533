//! `cozy serve`: open the database, migrate when allowed, listen, serve until SIGTERM/SIGINT.
//!
//! Three roles share this entry point:
//! - without `--workers` (and no `workers` setting): one unsupervised process, as in development;
//! - with `--workers N`: the cluster master ([`crate::cluster::master`]), which starts N workers;
//! - with `COZY_WORKER_ID` set by a master: one worker of the cluster.

use std::io::Write;
use std::sync::Arc;

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio::net::TcpListener;

use super::DbArgs;
use crate::app::App;
use crate::cluster::master::{self, Launch};
use crate::cluster::protocol::ToMaster;
use crate::cluster::worker::WorkerEnv;
use crate::config::{redact, LogFormat, Settings};
use crate::db::migrate::Migrator;
use crate::http::server::{self, DrainPolicy, ServerStats};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Run a supervised cluster of N worker processes behind one listening socket (crash restarts,
    /// `cozy reload`, `cozy status`). More than one needs Redis (COZY_REDIS_URL) for the realtime bus.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Replace a worker (rolling, no dropped requests) when its resident memory exceeds SIZE, e.g. 512M.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Apply pending migrations before serving (always done on the embedded SQLite).
    #[arg(long)]
    pub migrate: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

pub async fn run(settings: Settings, args: ServeArgs, log_format: LogFormat) -> anyhow::Result<u8> {
    if let Some(worker) = WorkerEnv::detect() {
        return run_worker(settings, args, worker).await;
    }
    if settings.supervised {
        let exe = std::env::current_exe().context("cannot find the path of the cozy binary")?;
        return master::run(Launch {
            settings,
            log_format,
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
        .await;
    }
    crate::http::routes::ops::install_metrics();
    let app = App::open(settings).await?;
    prepare_schema(&app, args.migrate).await?;
    if let Err(e) = std::fs::create_dir_all(&app.settings.run_dir) {
        tracing::warn!(dir = %app.settings.run_dir.display(), error = %e, "cannot create the run directory");
    }
    let listen = app.settings.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        database = %redact(&app.settings.database.url()),
        sessions = app.sessions.kind(),
        trusted_proxies = %app.settings.trusted_proxies,
        config = ?app.settings.sources,
        "listening"
    );
    // The first line on stdout says where to connect; scripts and tests wait for it.
    println!("cozy listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let stats = ServerStats::new();
    let mut app = app;
    app.realtime = Some(start_realtime(&app, &stats).await?);
    let app = Arc::new(app);
    let policy = drain_policy(&app.settings);
    server::serve(
        listener,
        crate::http::router(app.clone()),
        shutdown_signal(),
        policy,
        stats,
    )
    .await?;
    finish_realtime(&app).await;
    tracing::info!("stopped");
    app.db.close().await;
    Ok(0)
}

fn drain_policy(settings: &Settings) -> DrainPolicy {
    DrainPolicy {
        timeout: settings.drain_timeout,
        ..DrainPolicy::default()
    }
}

/// One worker of the cluster: the inherited socket, ready once the database answers, counters to the master.
async fn run_worker(settings: Settings, args: ServeArgs, worker: WorkerEnv) -> anyhow::Result<u8> {
    crate::http::routes::ops::install_metrics();
    // A hangup sent to the whole process group (a closing terminal) is the master's business (reload);
    // without a handler its default action would kill the worker.
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move { while hup.recv().await.is_some() {} });
    }
    let (link, master_gone) = worker.link()?;
    let listener = worker.listener()?;
    let mut app = App::open(settings).await?;
    prepare_schema(&app, args.migrate).await?;
    app.db
        .ping()
        .await
        .context("the database does not answer")?;
    app.sessions
        .ping()
        .await
        .map_err(|e| anyhow::anyhow!("{} does not answer: {e}", app.sessions.kind()))?;
    app.cluster = Some(link.clone());
    let stats = ServerStats::new();
    app.realtime = Some(start_realtime(&app, &stats).await?);
    let app = Arc::new(app);
    let push_stats = {
        let (link, stats, realtime) = (link.clone(), stats.clone(), app.realtime.clone());
        move || {
            // Open connections: HTTP ones, plus WebSockets (which leave the HTTP loop once upgraded).
            let websockets = realtime.as_ref().map_or(0, |rt| rt.connections()) as u64;
            link.send(ToMaster::Stats {
                connections: stats.connections() + websockets,
                requests: stats.requests(),
                metrics: crate::http::routes::ops::render_local(),
            })
        }
    };
    push_stats();
    link.send(ToMaster::Ready);
    tracing::info!(pid = std::process::id(), "worker ready");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            push_stats();
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = master_gone.wait() => tracing::warn!("the master is gone: draining"),
        }
    };
    let policy = drain_policy(&app.settings);
    server::serve(
        listener,
        crate::http::router(app.clone()),
        shutdown,
        policy,
        stats,
    )
    .await?;
    finish_realtime(&app).await;
    app.db.close().await;
    Ok(0)
}

async fn start_realtime(
    app: &App,
    stats: &Arc<ServerStats>,
) -> anyhow::Result<Arc<crate::realtime::Realtime>> {
    crate::realtime::Realtime::start(app.settings.clone(), app.db.clone(), stats.draining())
        .await
        .context("cannot start the realtime hub")
}

/// The HTTP drain is over; WebSockets were told 1001 when it began: give them a moment to go.
async fn finish_realtime(app: &App) {
    if let Some(rt) = &app.realtime {
        rt.wait_closed(Duration::from_secs(2)).await;
    }
}

/// Migrates on the embedded default or when asked; otherwise refuses to run against an old schema.
pub async fn prepare_schema(app: &App, migrate: bool) -> anyhow::Result<()> {
    let migrator = Migrator::new(&app.db);
    if migrate || app.settings.database.is_embedded() {
        for m in migrator.up().await? {
            tracing::info!(version = m.version, name = %m.name, "applied migration");
        }
        return Ok(());
    }
    let pending: Vec<_> = migrator
        .status()
        .await?
        .into_iter()
        .filter(|s| !matches!(s.state, "applied" | "unknown"))
        .collect();
    if let Some(first) = pending.first() {
        bail!(
            "the database schema is not current (migration {} {} is {}): run `cozy migrate up`, or start with --migrate",
            first.version,
            first.name,
            first.state
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
