//! The database: one pool over MySQL or the embedded SQLite, plus the few places their SQL differs.
//!
//! All queries go through sqlx's `Any` driver so the reservation code is written once. The differences
//! that matter for correctness are named in [`Dialect`]: how a write transaction starts (SQLite needs
//! `BEGIN IMMEDIATE` so a read-then-write transaction takes the write lock up front instead of failing
//! with a busy snapshot) and how a row is locked (`FOR UPDATE` on MySQL; SQLite's single writer already
//! serialises). Instants are integer milliseconds (see [`crate::time`]), so no type differs.

pub mod migrate;

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyQueryResult};
use sqlx::{Any, AnyPool, Executor, Transaction};

use crate::config::DatabaseTarget;

/// Which SQL engine backs the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    MySql,
    Sqlite,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::MySql => "mysql",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// The SQL text that differs between backends, in one place.
#[derive(Debug, Clone, Copy)]
pub struct Dialect(pub Backend);

impl Dialect {
    /// Suffix that locks the selected rows until the transaction ends.
    pub fn for_update(self) -> &'static str {
        match self.0 {
            Backend::MySql => " FOR UPDATE",
            Backend::Sqlite => "",
        }
    }

    /// Statement that opens a transaction which is going to write.
    fn begin_write(self) -> &'static str {
        match self.0 {
            Backend::MySql => "BEGIN",
            Backend::Sqlite => "BEGIN IMMEDIATE",
        }
    }
}

/// Errors of the data layer that callers act on.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    // `cause`, not `source`: the message already carries it, and a source would print it again.
    #[error("cannot open the database {target}: {cause}")]
    Connect { target: String, cause: sqlx::Error },
    #[error("cannot create {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A connection pool and its dialect.
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Opens the pool. For SQLite the file (and its folder) is created when missing.
    pub async fn connect(target: &DatabaseTarget, max_connections: u32) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let backend = match target {
            DatabaseTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| DbError::DataDir {
                        path: dir.display().to_string(),
                        source,
                    })?;
                }
                Backend::Sqlite
            }
            DatabaseTarget::MySql(_) => Backend::MySql,
        };
        // One plain connection first: the pool retries failed connects until its acquire timeout and then
        // reports only "pool timed out", while this says at once what is wrong (refused, bad password, …).
        let probe = tokio::time::timeout(
            Duration::from_secs(10),
            <sqlx::AnyConnection as sqlx::Connection>::connect(&target.url()),
        )
        .await
        .unwrap_or_else(|_| Err(sqlx::Error::PoolTimedOut));
        match probe {
            Ok(conn) => {
                let _ = sqlx::Connection::close(conn).await;
            }
            Err(source) => {
                return Err(DbError::Connect {
                    target: crate::config::redact(&target.url()),
                    cause: source,
                })
            }
        }
        let options = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    let setup = match backend {
                        // Read committed: locking reads see the latest committed row and InnoDB takes
                        // no gap locks, so fewer deadlocks between concurrent reservers.
                        Backend::MySql => {
                            "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
                             SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'; \
                             SET time_zone = '+00:00'"
                        }
                        Backend::Sqlite => {
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 15000"
                        }
                    };
                    conn.execute(setup).await?;
                    Ok(())
                })
            });
        let pool = options
            .connect(&target.url())
            .await
            .map_err(|cause| DbError::Connect {
                target: crate::config::redact(&target.url()),
                cause,
            })?;
        Ok(Db { pool, backend })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn dialect(&self) -> Dialect {
        Dialect(self.backend)
    }

    /// Opens a transaction that will write (takes SQLite's write lock up front).
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        self.pool.begin_with(self.dialect().begin_write()).await
    }

    /// `SELECT 1`, for readiness.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_: AnyQueryResult| ())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// True for errors where rerunning the whole transaction is the right answer: deadlocks, lock wait
/// timeouts and SQLite busy errors. Every write path retries these a bounded number of times.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(e) => {
            if let Some(m) = e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return matches!(m.number(), 1213 | 1205);
            }
            matches!(
                e.code().as_deref(),
                Some("5") | Some("6") | Some("517") | Some("262")
            )
        }
        sqlx::Error::PoolTimedOut => false,
        _ => false,
    }
}

/// True when the statement violated a UNIQUE or PRIMARY KEY constraint.
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(e) => {
            e.is_unique_violation()
                || e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|m| m.number() == 1062)
        }
        _ => false,
    }
}

/// Runs `op` again (up to a bound, with a short jittered pause) while it fails with a retryable error.
pub async fn with_retry<T, E, F, Fut>(mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: AsRetryable,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && attempt < 20 => {
                attempt += 1;
                let jitter = rand::random::<u64>() % (5 * u64::from(attempt) + 1);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            other => return other,
        }
    }
}

/// Reads a text column of an `Any` row, NULL as `None`. Through sqlx's Any driver MySQL reports TEXT and
/// MEDIUMTEXT columns as BLOB, which it then refuses to decode as `String`; this accepts text and bytes.
pub fn text_column(row: &sqlx::any::AnyRow, index: usize) -> Result<Option<String>, sqlx::Error> {
    use sqlx::Row;
    match row.try_get::<Option<String>, _>(index) {
        Ok(text) => Ok(text),
        Err(_) => row
            .try_get::<Option<Vec<u8>>, _>(index)?
            .map(|bytes| String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e))))
            .transpose(),
    }
}

/// Errors that can say whether rerunning the transaction may succeed.
pub trait AsRetryable {
    fn is_retryable(&self) -> bool;
}

impl AsRetryable for sqlx::Error {
    fn is_retryable(&self) -> bool {
        is_retryable(self)
    }
}

impl Dialect {
    /// `expr` as a signed 64-bit integer (MySQL's SUM returns DECIMAL, which the Any driver cannot decode).
    pub fn int(self, expr: &str) -> String {
        match self.0 {
            Backend::MySql => format!("CAST({expr} AS SIGNED)"),
            Backend::Sqlite => format!("CAST({expr} AS INTEGER)"),
        }
    }

    /// String concatenation of two SQL expressions.
    pub fn concat(self, a: &str, b: &str) -> String {
        match self.0 {
            Backend::MySql => format!("CONCAT({a}, {b})"),
            Backend::Sqlite => format!("({a} || {b})"),
        }
    }
}

impl Db {
    /// Runs an INSERT on `conn` and returns the new row's id. MySQL reports it with the result; the Any
    /// driver does not pass SQLite's rowid through, so SQLite asks `last_insert_rowid()` on the same
    /// connection.
    pub async fn insert_id<'q>(
        &self,
        conn: &mut sqlx::AnyConnection,
        query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<i64, sqlx::Error> {
        let result = query.execute(&mut *conn).await?;
        match self.backend {
            Backend::MySql => result
                .last_insert_id()
                .ok_or_else(|| sqlx::Error::Protocol("no insert id".into())),
            Backend::Sqlite => {
                sqlx::query_scalar("SELECT last_insert_rowid()")
                    .fetch_one(&mut *conn)
                    .await
            }
        }
    }
}
