//! Schema migrations for both backends: embedded, checksummed, locked.
//!
//! Files live in `migrations/<backend>/NNNN_name.sql` and are compiled into the binary (see `build.rs`).
//! Lessons from sqlx and Flyway: checksums are taken over normalised text (CRLF and trailing blanks do not
//! count), a failed migration on MySQL (whose DDL commits as it goes) leaves a *dirty* row naming the
//! statement that failed, and `cozy migrate repair` clears it once the operator has fixed things. Two hosts
//! cannot migrate at once: MySQL takes a named lock (`GET_LOCK`), SQLite runs each migration inside one
//! `BEGIN IMMEDIATE` transaction, which is atomic for DDL too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sqlx::{Connection, Row};

use super::{Backend, Db};
use crate::time::{now_ms, rfc3339};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// One migration file.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: i64,
    pub name: String,
    pub file: String,
    pub sql: String,
}

impl Migration {
    /// SHA-256 of the text with line endings and trailing whitespace normalised.
    pub fn checksum(&self) -> String {
        checksum(&self.sql)
    }

    pub fn statements(&self) -> Vec<String> {
        split_statements(&self.sql)
    }
}

pub fn checksum(sql: &str) -> String {
    let normalised: String = sql
        .replace("\r\n", "\n")
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n");
    hex::encode(Sha256::digest(normalised.trim().as_bytes()))
}

/// The migrations compiled into this binary for `backend`, in version order.
pub fn embedded(backend: Backend) -> Vec<Migration> {
    let files = match backend {
        Backend::MySql => embedded::MYSQL,
        Backend::Sqlite => embedded::SQLITE,
    };
    files
        .iter()
        .filter_map(|(file, sql)| {
            let (version, name) = parse_file_name(file)?;
            Some(Migration {
                version,
                name,
                file: format!("migrations/{}/{}", backend.name(), file),
                sql: sql.to_string(),
            })
        })
        .collect()
}

fn parse_file_name(file: &str) -> Option<(i64, String)> {
    let stem = file.strip_suffix(".sql")?;
    let (num, name) = stem.split_once('_')?;
    Some((num.parse().ok()?, name.to_string()))
}

/// Splits a migration into statements: a statement ends with a `;` at the end of a line, except inside a
/// `CREATE TRIGGER … END;` block, which ends only at a line `END;`. Comment-only lines are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_trigger = false;
    for line in sql.replace("\r\n", "\n").lines() {
        let trimmed = line.trim();
        if current.trim().is_empty() && (trimmed.is_empty() || trimmed.starts_with("--")) {
            continue;
        }
        if current.trim().is_empty() && trimmed.to_ascii_uppercase().starts_with("CREATE TRIGGER") {
            in_trigger = true;
        }
        current.push_str(line);
        current.push('\n');
        let ends = if in_trigger {
            trimmed.eq_ignore_ascii_case("END;")
        } else {
            trimmed.ends_with(';')
        };
        if ends {
            let stmt = current.trim().trim_end_matches(';').trim().to_string();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            current.clear();
            in_trigger = false;
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        out.push(rest.trim_end_matches(';').to_string());
    }
    out
}

/// What went wrong while migrating; each variant names the file or statement at fault.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{file}: checksum changed since it was applied on {applied_at}; restore the file, or run `cozy migrate repair` to accept the new text")]
    ChecksumMismatch { file: String, applied_at: String },
    #[error("migration {version} ({name}) failed earlier at statement:\n  {statement}\nerror: {error}\nFix the schema by hand if needed, then run `cozy migrate repair` and `cozy migrate up` again")]
    Dirty {
        version: i64,
        name: String,
        statement: String,
        error: String,
    },
    #[error("{file}: statement failed: {error}\n  {statement}")]
    Statement {
        file: String,
        statement: String,
        error: String,
    },
    #[error("another process holds the migration lock (waited {0} s); is a deploy running on another host?")]
    Locked(u64),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("{0}")]
    Io(String),
}

/// The state of one migration as `cozy migrate status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationStatus {
    pub version: i64,
    pub name: String,
    /// `applied`, `pending`, `dirty`, `checksum_mismatch`, or `unknown` (applied, not in this binary).
    pub state: &'static str,
    pub applied_at: Option<String>,
}

#[derive(Debug)]
struct Applied {
    name: String,
    checksum: String,
    applied_at: i64,
    success: bool,
    failed_statement: Option<String>,
    error: Option<String>,
}

const CREATE_TABLE_MYSQL: &str = "CREATE TABLE IF NOT EXISTS cozy_migrations (
  version BIGINT NOT NULL PRIMARY KEY, name VARCHAR(255) NOT NULL, checksum CHAR(64) NOT NULL,
  applied_at BIGINT NOT NULL, success INT NOT NULL, failed_statement TEXT NULL, error TEXT NULL
) ENGINE=InnoDB";
const CREATE_TABLE_SQLITE: &str = "CREATE TABLE IF NOT EXISTS cozy_migrations (
  version INTEGER NOT NULL PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,
  applied_at INTEGER NOT NULL, success INTEGER NOT NULL, failed_statement TEXT NULL, error TEXT NULL
)";

const LOCK_WAIT_SECS: u64 = 60;

/// Runs migrations against `db`.
pub struct Migrator<'a> {
    db: &'a Db,
    migrations: Vec<Migration>,
}

impl<'a> Migrator<'a> {
    pub fn new(db: &'a Db) -> Self {
        Migrator {
            db,
            migrations: embedded(db.backend()),
        }
    }

    /// For tests: migrate with a given set of files.
    pub fn with_migrations(db: &'a Db, migrations: Vec<Migration>) -> Self {
        Migrator { db, migrations }
    }

    async fn ensure_table(&self, conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
        let ddl = match self.db.backend() {
            Backend::MySql => CREATE_TABLE_MYSQL,
            Backend::Sqlite => CREATE_TABLE_SQLITE,
        };
        sqlx::query(ddl).execute(&mut *conn).await?;
        Ok(())
    }

    async fn applied(
        &self,
        conn: &mut sqlx::AnyConnection,
    ) -> Result<BTreeMap<i64, Applied>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT version, name, checksum, applied_at, success, failed_statement, error FROM cozy_migrations",
        )
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.get::<i64, _>(0),
                    Applied {
                        name: r.get(1),
                        checksum: r.get(2),
                        applied_at: r.get(3),
                        success: r.get::<i64, _>(4) != 0,
                        // TEXT columns: MySQL hands them to the Any driver as BLOB.
                        failed_statement: super::text_column(&r, 5)?,
                        error: super::text_column(&r, 6)?,
                    },
                ))
            })
            .collect()
    }

    /// Verifies what was applied: dirty rows and changed files are errors.
    fn verify(&self, applied: &BTreeMap<i64, Applied>) -> Result<(), MigrateError> {
        for (version, a) in applied {
            if !a.success {
                return Err(MigrateError::Dirty {
                    version: *version,
                    name: a.name.clone(),
                    statement: a.failed_statement.clone().unwrap_or_default(),
                    error: a.error.clone().unwrap_or_default(),
                });
            }
            if let Some(m) = self.migrations.iter().find(|m| m.version == *version) {
                if m.checksum() != a.checksum {
                    return Err(MigrateError::ChecksumMismatch {
                        file: m.file.clone(),
                        applied_at: rfc3339(a.applied_at),
                    });
                }
            }
        }
        Ok(())
    }

    /// Applies every pending migration; returns the versions applied now.
    pub async fn up(&self) -> Result<Vec<Migration>, MigrateError> {
        let mut conn = self.db.pool().acquire().await?;
        self.lock(&mut conn).await?;
        let result = self.up_locked(&mut conn).await;
        self.unlock(&mut conn).await;
        result
    }

    async fn up_locked(
        &self,
        conn: &mut sqlx::AnyConnection,
    ) -> Result<Vec<Migration>, MigrateError> {
        self.ensure_table(conn).await?;
        let mut done = Vec::new();
        for m in &self.migrations {
            let applied = self.applied(conn).await?;
            self.verify(&applied)?;
            if applied.contains_key(&m.version) {
                continue;
            }
            match self.db.backend() {
                Backend::Sqlite => self.apply_sqlite(conn, m).await?,
                Backend::MySql => self.apply_mysql(conn, m).await?,
            }
            tracing::info!(version = m.version, name = %m.name, "migration applied");
            done.push(m.clone());
        }
        Ok(done)
    }

    /// SQLite: the whole file and its bookkeeping row in one IMMEDIATE transaction (DDL is transactional).
    async fn apply_sqlite(
        &self,
        conn: &mut sqlx::AnyConnection,
        m: &Migration,
    ) -> Result<(), MigrateError> {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        // Re-check under the write lock: another process may have applied it while we waited.
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT version FROM cozy_migrations WHERE version = ?")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_some() {
            return Ok(());
        }
        for stmt in m.statements() {
            if let Err(e) = sqlx::query(&stmt).execute(&mut *tx).await {
                return Err(MigrateError::Statement {
                    file: m.file.clone(),
                    statement: stmt,
                    error: e.to_string(),
                });
            }
        }
        insert_row(&mut *tx, m, true, None, None).await?;
        tx.commit().await?;
        Ok(())
    }

    /// MySQL: DDL commits implicitly, so progress is recorded as a dirty row first and marked clean after.
    async fn apply_mysql(
        &self,
        conn: &mut sqlx::AnyConnection,
        m: &Migration,
    ) -> Result<(), MigrateError> {
        insert_row(&mut *conn, m, false, None, None).await?;
        for stmt in m.statements() {
            if let Err(e) = sqlx::query(&stmt).execute(&mut *conn).await {
                sqlx::query(
                    "UPDATE cozy_migrations SET failed_statement = ?, error = ? WHERE version = ?",
                )
                .bind(&stmt)
                .bind(e.to_string())
                .bind(m.version)
                .execute(&mut *conn)
                .await?;
                return Err(MigrateError::Statement {
                    file: m.file.clone(),
                    statement: stmt,
                    error: e.to_string(),
                });
            }
        }
        sqlx::query("UPDATE cozy_migrations SET success = 1, applied_at = ? WHERE version = ?")
            .bind(now_ms())
            .bind(m.version)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    async fn lock(&self, conn: &mut sqlx::AnyConnection) -> Result<(), MigrateError> {
        if self.db.backend() == Backend::MySql {
            let got: Option<i64> =
                sqlx::query_scalar("SELECT CAST(GET_LOCK('cozy.migrate', ?) AS SIGNED)")
                    .bind(LOCK_WAIT_SECS as i64)
                    .fetch_one(&mut *conn)
                    .await?;
            if got != Some(1) {
                return Err(MigrateError::Locked(LOCK_WAIT_SECS));
            }
        }
        Ok(())
    }

    async fn unlock(&self, conn: &mut sqlx::AnyConnection) {
        if self.db.backend() == Backend::MySql {
            let _ = sqlx::query("SELECT CAST(RELEASE_LOCK('cozy.migrate') AS SIGNED)")
                .fetch_one(&mut *conn)
                .await;
        }
    }

    /// Every known migration with its state.
    pub async fn status(&self) -> Result<Vec<MigrationStatus>, MigrateError> {
        let mut conn = self.db.pool().acquire().await?;
        self.ensure_table(&mut conn).await?;
        let applied = self.applied(&mut conn).await?;
        let mut out: Vec<MigrationStatus> = self
            .migrations
            .iter()
            .map(|m| {
                let a = applied.get(&m.version);
                let state = match a {
                    None => "pending",
                    Some(a) if !a.success => "dirty",
                    Some(a) if a.checksum != m.checksum() => "checksum_mismatch",
                    Some(_) => "applied",
                };
                MigrationStatus {
                    version: m.version,
                    name: m.name.clone(),
                    state,
                    applied_at: a.filter(|a| a.success).map(|a| rfc3339(a.applied_at)),
                }
            })
            .collect();
        for (v, a) in &applied {
            if !self.migrations.iter().any(|m| m.version == *v) {
                out.push(MigrationStatus {
                    version: *v,
                    name: a.name.clone(),
                    state: "unknown",
                    applied_at: Some(rfc3339(a.applied_at)),
                });
            }
        }
        out.sort_by_key(|s| s.version);
        Ok(out)
    }

    /// Removes dirty rows and accepts the current checksums of applied files. Returns what it changed.
    pub async fn repair(&self) -> Result<Vec<String>, MigrateError> {
        let mut conn = self.db.pool().acquire().await?;
        self.lock(&mut conn).await?;
        let result = async {
            self.ensure_table(&mut conn).await?;
            let applied = self.applied(&mut conn).await?;
            let mut changed = Vec::new();
            for (v, a) in &applied {
                if !a.success {
                    sqlx::query("DELETE FROM cozy_migrations WHERE version = ?")
                        .bind(*v)
                        .execute(&mut *conn)
                        .await?;
                    changed.push(format!("removed dirty record of {v} ({})", a.name));
                } else if let Some(m) = self.migrations.iter().find(|m| m.version == *v) {
                    if m.checksum() != a.checksum {
                        sqlx::query("UPDATE cozy_migrations SET checksum = ? WHERE version = ?")
                            .bind(m.checksum())
                            .bind(*v)
                            .execute(&mut *conn)
                            .await?;
                        changed.push(format!("accepted the new checksum of {}", m.file));
                    }
                }
            }
            Ok::<_, MigrateError>(changed)
        }
        .await;
        self.unlock(&mut conn).await;
        result
    }
}

async fn insert_row<'c, E>(
    exec: E,
    m: &Migration,
    success: bool,
    stmt: Option<&str>,
    error: Option<&str>,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO cozy_migrations (version, name, checksum, applied_at, success, failed_statement, error) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(m.version)
    .bind(&m.name)
    .bind(m.checksum())
    .bind(now_ms())
    .bind(i64::from(success))
    .bind(stmt)
    .bind(error)
    .execute(exec)
    .await?;
    Ok(())
}

/// `cozy migrate new NAME`: creates the next-numbered empty file for both backends under `dir`.
pub fn new_migration(dir: &Path, name: &str) -> Result<Vec<PathBuf>, MigrateError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(MigrateError::Io(format!(
            "migration name {name:?}: use letters, digits and underscores only"
        )));
    }
    let mut next = 1;
    for backend in ["mysql", "sqlite"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(backend)) {
            for entry in rd.flatten() {
                if let Some((v, _)) = parse_file_name(&entry.file_name().to_string_lossy()) {
                    next = next.max(v + 1);
                }
            }
        }
    }
    let mut created = Vec::new();
    for backend in ["mysql", "sqlite"] {
        let folder = dir.join(backend);
        std::fs::create_dir_all(&folder)
            .map_err(|e| MigrateError::Io(format!("{}: {e}", folder.display())))?;
        let path = folder.join(format!("{next:04}_{name}.sql"));
        std::fs::write(&path, format!("-- {name} ({backend})\n"))
            .map_err(|e| MigrateError::Io(format!("{}: {e}", path.display())))?;
        created.push(path);
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_are_one_statement_and_comments_are_dropped() {
        let sql = "-- a comment\nCREATE TABLE a (x INT);\n\nCREATE TRIGGER t BEFORE UPDATE ON a\nFOR EACH ROW\nBEGIN\n  SIGNAL SQLSTATE '45000';\nEND;\nINSERT INTO a VALUES (1);\n";
        let stmts = split_statements(sql);
        assert_eq!(stmts.len(), 3, "{stmts:?}");
        assert!(stmts[1].starts_with("CREATE TRIGGER") && stmts[1].ends_with("END"));
        assert_eq!(stmts[2], "INSERT INTO a VALUES (1)");
    }

    #[test]
    fn checksums_ignore_line_endings_and_trailing_blanks() {
        assert_eq!(checksum("a;\nb;\n"), checksum("a;  \r\nb;\r\n\r\n"));
        assert_ne!(checksum("a;\nb;\n"), checksum("a;\nc;\n"));
    }

    #[test]
    fn both_backends_embed_the_same_versions() {
        let v = |b| {
            embedded(b)
                .iter()
                .map(|m| (m.version, m.name.clone()))
                .collect::<Vec<_>>()
        };
        assert!(!v(Backend::MySql).is_empty());
        assert_eq!(v(Backend::MySql), v(Backend::Sqlite));
    }

    #[test]
    fn new_migration_takes_the_next_number_for_both_backends() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("mysql")).unwrap();
        std::fs::write(dir.path().join("mysql/0007_x.sql"), "").unwrap();
        let made = new_migration(dir.path(), "add_things").unwrap();
        assert!(made[0].ends_with("mysql/0008_add_things.sql"));
        assert!(made[1].ends_with("sqlite/0008_add_things.sql"));
        assert!(new_migration(dir.path(), "bad name").is_err());
    }
}
