//! Operator commands: `cozy users add`, `cozy audit`, `cozy sweep`.

use std::io::{BufRead, IsTerminal};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::DbArgs;
use crate::accounts::Role;
use crate::app::App;
use crate::config::Settings;
use crate::realtime::store::Store;
use crate::reservations::audit::audit as run_audit;
use crate::reservations::sweep::Sweeper;

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user, or reset the password and role of an existing one.
    Add(AddUser),
}

#[derive(Debug, Args)]
pub struct AddUser {
    /// The user's email address.
    pub email: String,
    /// Make the user an administrator (may create resources).
    #[arg(long)]
    pub admin: bool,
    /// Read the password from the first line of standard input (required: never pass it as an argument).
    #[arg(long)]
    pub password_stdin: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Count what would be done, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Overdue holds handled per batch.
    #[arg(long, default_value_t = 500)]
    pub batch: i64,
    #[command(flatten)]
    pub db: DbArgs,
}

/// Opens the app for an operator command: the embedded database is migrated on the spot, MySQL must be.
async fn open(settings: Settings) -> anyhow::Result<App> {
    let app = App::open(settings).await?;
    super::serve::prepare_schema(&app, false).await?;
    Ok(app)
}

pub async fn users(settings: Settings, cmd: UsersCommand) -> anyhow::Result<u8> {
    let UsersCommand::Add(args) = cmd;
    if !args.password_stdin {
        bail!("pass the password on standard input with --password-stdin (arguments show up in `ps` and shell history)");
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password for {}: ", args.email);
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']);
    let app = open(settings).await?;
    let role = if args.admin { Role::Admin } else { Role::User };
    let (user, created) = app
        .accounts
        .upsert(&args.email, password, role)
        .await
        .map_err(|e| match e {
            crate::accounts::AccountError::Invalid(f) => {
                anyhow::anyhow!("{}: {}", f.field, f.message)
            }
            other => anyhow::anyhow!(other),
        })?;
    println!(
        "{} user {} (id {}, role {})",
        if created { "created" } else { "updated" },
        user.email,
        user.id,
        user.role.as_str()
    );
    app.db.close().await;
    Ok(0)
}

pub async fn audit(settings: Settings, args: AuditArgs) -> anyhow::Result<u8> {
    let app = open(settings).await?;
    let report = run_audit(&app.db).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (state, n) in &report.reservations {
            println!("reservations {state:<10} {n}");
        }
        println!("charges                 {}", report.charges);
        println!("double charges          {}", report.double_charges);
        println!("orphan charges          {}", report.orphan_charges);
        println!("oversold resources      {}", report.oversold_resources);
        println!("held-counter mismatches {}", report.held_mismatches);
        println!(
            "{}",
            if report.ok {
                "ok"
            } else {
                "FAILED: an invariant does not hold"
            }
        );
    }
    app.db.close().await;
    Ok(if report.ok { 0 } else { 1 })
}

pub async fn sweep(settings: Settings, args: SweepArgs) -> anyhow::Result<u8> {
    if args.batch < 1 {
        bail!("--batch must be at least 1");
    }
    let retention_ms = settings.idempotency_retention.as_millis() as i64;
    let app = open(settings).await?;
    let history = Store::from_settings(app.db.clone(), &app.settings);
    let sweeper = Sweeper {
        reservations: &app.reservations,
        idempotency: &app.idempotency,
        history: &history,
        idempotency_retention_ms: retention_ms,
        batch: args.batch,
    };
    let report = sweeper.run(args.dry_run).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let verb = if args.dry_run {
            "would expire"
        } else {
            "expired"
        };
        println!("{verb} {} overdue holds", report.expired);
        println!("refunds confirmed: {}", report.refunds_confirmed);
        println!(
            "stray gateway charges refunded: {}",
            report.stray_charges_refunded
        );
        println!(
            "idempotency keys purged: {}",
            report.idempotency_keys_purged
        );
        println!("sessions purged: {}", report.sessions_purged);
        println!("realtime messages purged: {}", report.messages_purged);
    }
    app.db.close().await;
    Ok(0)
}
