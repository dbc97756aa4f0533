//! The command line (clap derive): definitions here and one file per subcommand, no business logic.
//!
//! Each subcommand returns an exit code; errors bubble up as `anyhow::Error` to `src/bin/cozy.rs`, which
//! prints them and exits 1. Usage errors are clap's (exit 2).

pub mod admin;
pub mod cluster;
pub mod migrate;
pub mod nginx;
pub mod provision;
pub mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Layer, LogFormat, Settings};

const EXAMPLES: &str = "\
Examples:
  cozy serve                                   # embedded SQLite, http://127.0.0.1:8080
  COZY_DATABASE_URL=mysql://cozy:pw@db/cozy COZY_REDIS_URL=redis://127.0.0.1 cozy serve --migrate
  cozy migrate status
  echo \"$ADMIN_PASSWORD\" | cozy users add admin@example.com --admin --password-stdin
  cozy audit --json
  cozy sweep --dry-run
  COZY_REDIS_URL=redis://127.0.0.1 cozy serve --workers 4 --max-memory 512M   # supervised cluster
  cozy status                                  # the cluster's workers, like `pm2 ls`
  cozy reload                                  # rolling restart, zero dropped requests
  cozy provision -i inventory.yml              # harden every host of the inventory over SSH
  cozy nginx render -i inventory.yml --check   # the reverse proxy of the estate, proved by nginx -t

Configuration: flags > environment (COZY_DATABASE_URL, COZY_REDIS_URL, COZY_LISTEN, COZY_RUN_DIR,
COZY_DATA_DIR, ...) > cozy.yaml (or --config FILE) > defaults.";

#[derive(Debug, Parser)]
#[command(name = "cozy", version, about = "One binary for a small backend estate.", after_help = EXAMPLES)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log format; the daemon defaults to json when stderr is not a terminal.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Configuration file (default: ./cozy.yaml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the reservation/realtime daemon.
    Serve(serve::ServeArgs),
    /// Schema migrations (MySQL or the embedded SQLite).
    #[command(subcommand)]
    Migrate(migrate::MigrateCommand),
    /// Manage users.
    #[command(subcommand)]
    Users(admin::UsersCommand),
    /// Check the invariants straight from the database; exits 1 when one fails.
    Audit(admin::AuditArgs),
    /// Expire overdue holds, retry refunds, purge old idempotency keys and sessions.
    Sweep(admin::SweepArgs),
    /// Show the workers of the running cluster (id, pid, state, uptime, restarts, CPU, memory, …).
    Status(cluster::StatusArgs),
    /// Rolling restart of the running cluster from the binary on disk; exits 0 once every worker is new.
    Reload,
    /// Stop the running cluster gracefully; exits 0 once every process is gone.
    Stop,
    /// Provision and harden hosts over SSH with playbooks (built-in: base, harden, nginx, mysql, redis, app).
    Provision(provision::ProvisionArgs),
    /// The estate's reverse proxy and load balancer: render it from the inventory, check it with nginx -t.
    #[command(subcommand)]
    Nginx(nginx::NginxCommand),
}

/// Database flags shared by commands that open the database.
#[derive(Debug, Args, Clone, Default)]
pub struct DbArgs {
    /// Database URL (mysql://… or sqlite://…); default: the embedded SQLite file.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

impl Cli {
    pub fn verbosity(&self) -> i8 {
        if self.quiet {
            -1
        } else {
            self.verbose.min(3) as i8
        }
    }

    /// Settings from file + environment + this command's flags.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut flags = Layer {
            log_format: self.log_format,
            ..Layer::default()
        };
        match &self.command {
            Command::Serve(a) => {
                flags.listen = a.listen.clone();
                flags.workers = a.workers;
                flags.max_memory = a.max_memory.clone();
                flags.database_url = a.db.database_url.clone();
            }
            Command::Migrate(m) => flags.database_url = m.db().database_url.clone(),
            Command::Users(admin::UsersCommand::Add(a)) => {
                flags.database_url = a.db.database_url.clone()
            }
            Command::Audit(a) => flags.database_url = a.db.database_url.clone(),
            Command::Sweep(a) => flags.database_url = a.db.database_url.clone(),
            Command::Status(_)
            | Command::Reload
            | Command::Stop
            | Command::Provision(_)
            | Command::Nginx(_) => {}
        }
        Ok(Settings::load(self.config.as_deref(), flags)?)
    }
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let daemon = matches!(cli.command, Command::Serve(_));
    let settings = cli.settings();
    let log_format = crate::telemetry::init(
        settings
            .as_ref()
            .ok()
            .and_then(|s| s.log_format)
            .or(cli.log_format),
        cli.verbosity(),
        daemon,
    );
    let settings = settings?;
    match cli.command {
        Command::Serve(args) => serve::run(settings, args, log_format).await,
        Command::Migrate(cmd) => migrate::run(settings, cmd).await,
        Command::Users(cmd) => admin::users(settings, cmd).await,
        Command::Audit(args) => admin::audit(settings, args).await,
        Command::Sweep(args) => admin::sweep(settings, args).await,
        Command::Status(args) => cluster::status(settings, args).await,
        Command::Reload => cluster::reload(settings).await,
        Command::Stop => cluster::stop(settings).await,
        Command::Provision(args) => provision::run(args).await,
        Command::Nginx(cmd) => nginx::run(cmd, cli.config.as_deref()),
    }
}
