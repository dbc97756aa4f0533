//! cozy: one binary for a small backend estate.
//!
//! How the pieces fit:
//!
//! - [`config`] turns `cozy.yaml`, the environment and flags into one validated [`config::Settings`].
//! - [`db`] owns the connection pool (MySQL or the embedded SQLite), the SQL dialect differences and the
//!   migration runner. Everything else talks SQL through [`db::Db`] and never asks which backend it is on,
//!   except through [`db::Dialect`].
//! - [`reservations`] is the product's core: a pure state machine ([`reservations::state`]) and the
//!   repository that applies it inside database transactions guarded by conditional updates, so the
//!   database — not the code alone — refuses oversell, double charges and invalid transitions.
//! - [`payments`] is the gateway seam: a trait and the built-in `sandbox` gateway.
//! - [`idempotency`] implements `Idempotency-Key` (begin / replay / finish) over a database table.
//! - [`sessions`] and [`accounts`] are authentication: users with argon2id passwords, bearer-token sessions in
//!   Redis or the database.
//! - [`http`] is the axum router: handlers, problem+json errors, auth, metrics, OpenAPI.
//! - [`realtime`] is the WebSocket hub: rooms, sequenced history, presence, cross-worker fan-out.
//! - [`cluster`] is the supervised process cluster: the master and its workers.
//! - [`cli`] is the clap command line; `src/bin/cozy.rs` only parses it and maps errors to exit codes.

pub mod accounts;
pub mod app;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod db;
pub mod http;
pub mod idempotency;
pub mod ops;
pub mod outbox;
pub mod payments;
pub mod realtime;
pub mod reservations;
pub mod sessions;
pub mod telemetry;
pub mod time;
