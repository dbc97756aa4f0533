//! `cozy serve`: open the database, migrate when allowed, listen, serve until SIGTERM/SIGINT.

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use tokio::net::TcpListener;

use super::DbArgs;
use crate::app::App;
use crate::config::{redact, Settings};
use crate::db::migrate::Migrator;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Worker processes. More than one needs Redis (COZY_REDIS_URL) for the realtime bus.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Apply pending migrations before serving (always done on the embedded SQLite).
    #[arg(long)]
    pub migrate: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

pub async fn run(settings: Settings, args: ServeArgs) -> anyhow::Result<u8> {
    if settings.workers > 1 {
        if settings.redis_url.is_none() {
            bail!(
                "--workers {} needs Redis: workers share sessions and the realtime bus through it. \
                 Set COZY_REDIS_URL=redis://HOST:6379 (or redis_url in cozy.yaml), or run with --workers 1",
                settings.workers
            );
        }
        bail!(
            "--workers {}: the supervised multi-process cluster is not available in this build yet; \
             run --workers 1 (one process uses every core through its async runtime)",
            settings.workers
        );
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
        config = ?app.settings.sources,
        "listening"
    );
    // The first line on stdout says where to connect; scripts and tests wait for it.
    println!("cozy listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let app = Arc::new(app);
    crate::http::serve(listener, app.clone(), shutdown_signal()).await?;
    tracing::info!("stopped");
    app.db.close().await;
    Ok(0)
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
