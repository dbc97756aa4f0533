//! `cozy migrate up | status | new NAME | repair`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::DbArgs;
use crate::config::Settings;
use crate::db::migrate::{new_migration, Migrator};
use crate::db::Db;

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Apply every pending migration (takes a lock: two hosts never migrate at once).
    Up(DbOnly),
    /// Show each migration: applied, pending, dirty or checksum_mismatch.
    Status(StatusArgs),
    /// Create the next-numbered migration file for both backends.
    New(NewArgs),
    /// Clear a failed (dirty) migration record and accept changed checksums, after fixing things by hand.
    Repair(DbOnly),
}

#[derive(Debug, Args)]
pub struct DbOnly {
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub db: DbArgs,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// Name of the migration: letters, digits, underscores.
    pub name: String,
    /// The migrations folder of the source tree.
    #[arg(long, default_value = "migrations")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub db: DbArgs,
}

impl MigrateCommand {
    pub fn db(&self) -> &DbArgs {
        match self {
            MigrateCommand::Up(a) | MigrateCommand::Repair(a) => &a.db,
            MigrateCommand::Status(a) => &a.db,
            MigrateCommand::New(a) => &a.db,
        }
    }
}

pub async fn run(settings: Settings, cmd: MigrateCommand) -> anyhow::Result<u8> {
    if let MigrateCommand::New(args) = &cmd {
        for path in new_migration(&args.dir, &args.name)? {
            println!("created {}", path.display());
        }
        println!("rebuild cozy to embed it (cargo build); `cozy migrate up` then applies it");
        return Ok(0);
    }
    let db = Db::connect(&settings.database, 2).await?;
    let migrator = Migrator::new(&db);
    match cmd {
        MigrateCommand::Up(_) => {
            let applied = migrator.up().await?;
            if applied.is_empty() {
                println!("schema is up to date ({})", db.backend().name());
            }
            for m in applied {
                println!("applied {:04} {}", m.version, m.name);
            }
        }
        MigrateCommand::Status(args) => {
            let status = migrator.status().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("{:<8} {:<32} {:<18} APPLIED AT", "VERSION", "NAME", "STATE");
                for s in &status {
                    println!(
                        "{:<8} {:<32} {:<18} {}",
                        format!("{:04}", s.version),
                        s.name,
                        s.state,
                        s.applied_at.as_deref().unwrap_or("-")
                    );
                }
            }
            if status
                .iter()
                .any(|s| matches!(s.state, "dirty" | "checksum_mismatch"))
            {
                return Ok(1);
            }
        }
        MigrateCommand::Repair(_) => {
            let changed = migrator.repair().await?;
            if changed.is_empty() {
                println!("nothing to repair");
            }
            for c in changed {
                println!("{c}");
            }
        }
        MigrateCommand::New(_) => unreachable!("handled above"),
    }
    db.close().await;
    Ok(0)
}
