//! The running application: every service built once from [`Settings`] and shared by the handlers.

use std::sync::Arc;

use crate::accounts::Accounts;
use crate::config::Settings;
use crate::db::{Db, DbError};
use crate::idempotency::IdempotencyStore;
use crate::payments::SandboxGateway;
use crate::reservations::Reservations;
use crate::sessions::{SessionError, SessionStore};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot connect to Redis at {url}: {source}")]
    Redis { url: String, source: SessionError },
}

/// The services of one cozy process.
#[derive(Clone)]
pub struct App {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub accounts: Accounts,
    pub sessions: SessionStore,
    pub reservations: Reservations,
    pub idempotency: IdempotencyStore,
    /// The line to the cluster master when this process is a worker.
    pub cluster: Option<Arc<crate::cluster::worker::Link>>,
    /// The realtime hub, when this process serves `GET /v1/realtime` (`cozy serve`).
    pub realtime: Option<Arc<crate::realtime::Realtime>>,
}

impl App {
    /// Connects to the database (and Redis when configured). Does not migrate.
    pub async fn open(settings: Settings) -> Result<App, AppError> {
        let db = Db::connect(&settings.database, settings.db_max_connections).await?;
        let sessions = match &settings.redis_url {
            Some(url) => SessionStore::redis(
                url,
                &crate::realtime::bus::namespace(&settings.database.url()),
                settings.session_ttl,
            )
            .await
            .map_err(|source| AppError::Redis {
                url: crate::config::redact(url),
                source,
            })?,
            None => SessionStore::database(db.clone(), settings.session_ttl),
        };
        let gateway = Arc::new(SandboxGateway::new(db.clone(), settings.gateway_delay));
        Ok(App {
            accounts: Accounts::new(db.clone(), settings.password_cost),
            reservations: Reservations::new(db.clone(), gateway, settings.gateway_timeout),
            idempotency: IdempotencyStore::new(db.clone(), settings.idempotency_lease),
            sessions,
            cluster: None,
            realtime: None,
            db,
            settings: Arc::new(settings),
        })
    }
}
