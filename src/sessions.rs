//! Bearer-token sessions: Redis when `COZY_REDIS_URL` is set, else the database's `sessions` table.
//!
//! A token is 32 random bytes (base64url); only its SHA-256 is stored, so a leaked store does not leak
//! usable tokens. Expiry slides: every successful lookup pushes it `ttl` into the future. Revocation deletes
//! the record, so the token stops working at once. The two stores sit behind one enum rather than a trait
//! object because there are exactly two and both are known here.

use std::time::Duration;

use base64::Engine;
use rand::RngCore;
use redis::AsyncCommands;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::accounts::{Role, User};
use crate::db::Db;
use crate::time::{now_ms, Millis};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A new session as returned to the client.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub token: String,
    pub expires_at: Millis,
}

#[derive(Clone)]
pub enum SessionStore {
    Redis {
        conn: redis::aio::ConnectionManager,
        ttl: Duration,
        /// `cozy:session:<namespace>:`, the namespace being the installation's (its database), so that
        /// two installations sharing one Redis never accept each other's tokens.
        prefix: String,
    },
    Db {
        db: Db,
        ttl: Duration,
    },
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The Redis key of a session: the installation's prefix, then the token's hash.
fn redis_key(prefix: &str, hash: &str) -> String {
    format!("{prefix}{hash}")
}

impl SessionStore {
    /// Sessions in Redis; `namespace` tells this installation's keys from another's on the same server
    /// (see [`crate::realtime::bus::namespace`]).
    pub async fn redis(
        url: &str,
        namespace: &str,
        ttl: Duration,
    ) -> Result<SessionStore, SessionError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(3)));
        let conn = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        Ok(SessionStore::Redis {
            conn,
            ttl,
            prefix: format!("cozy:session:{namespace}:"),
        })
    }

    pub fn database(db: Db, ttl: Duration) -> SessionStore {
        SessionStore::Db { db, ttl }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SessionStore::Redis { .. } => "redis",
            SessionStore::Db { .. } => "database",
        }
    }

    fn ttl(&self) -> Duration {
        match self {
            SessionStore::Redis { ttl, .. } | SessionStore::Db { ttl, .. } => *ttl,
        }
    }

    pub async fn create(&self, user: &User) -> Result<NewSession, SessionError> {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let hash = token_hash(&token);
        let now = now_ms();
        let ttl = self.ttl();
        let expires_at = now + ttl.as_millis() as i64;
        match self {
            SessionStore::Redis { conn, prefix, .. } => {
                let value = serde_json::to_string(user).unwrap_or_default();
                let mut conn = conn.clone();
                let _: () = conn
                    .set_ex(redis_key(prefix, &hash), value, ttl.as_secs().max(1))
                    .await?;
            }
            SessionStore::Db { db, .. } => {
                sqlx::query("INSERT INTO sessions (token_hash, user_id, expires_at, created_at) VALUES (?, ?, ?, ?)")
                    .bind(&hash)
                    .bind(user.id)
                    .bind(expires_at)
                    .bind(now)
                    .execute(db.pool())
                    .await?;
            }
        }
        Ok(NewSession { token, expires_at })
    }

    /// The user behind a live token, sliding its expiry; `None` if unknown, expired or revoked.
    pub async fn lookup(&self, token: &str) -> Result<Option<User>, SessionError> {
        let hash = token_hash(token);
        let ttl = self.ttl();
        match self {
            SessionStore::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let value: Option<String> = redis::cmd("GETEX")
                    .arg(redis_key(prefix, &hash))
                    .arg("EX")
                    .arg(ttl.as_secs().max(1))
                    .query_async(&mut conn)
                    .await?;
                Ok(value.and_then(|v| serde_json::from_str(&v).ok()))
            }
            SessionStore::Db { db, .. } => {
                let now = now_ms();
                let row = sqlx::query(
                    "SELECT u.id, u.email, u.role, s.expires_at FROM sessions s JOIN users u ON u.id = s.user_id \
                     WHERE s.token_hash = ? AND s.expires_at > ?",
                )
                .bind(&hash)
                .bind(now)
                .fetch_optional(db.pool())
                .await?;
                let Some(row) = row else { return Ok(None) };
                let expires_at: Millis = row.get(3);
                let ttl_ms = ttl.as_millis() as i64;
                // Slide at most once a minute (or once per tenth of a short ttl) to spare the writes.
                if expires_at - now < ttl_ms - (ttl_ms / 10).min(60_000) {
                    sqlx::query("UPDATE sessions SET expires_at = ? WHERE token_hash = ?")
                        .bind(now + ttl_ms)
                        .bind(&hash)
                        .execute(db.pool())
                        .await?;
                }
                Ok(Some(User {
                    id: row.get(0),
                    email: row.get(1),
                    role: Role::parse(&row.get::<String, _>(2)),
                }))
            }
        }
    }

    /// Revokes a token; it stops working at once.
    pub async fn revoke(&self, token: &str) -> Result<(), SessionError> {
        let hash = token_hash(token);
        match self {
            SessionStore::Redis { conn, prefix, .. } => {
                let mut conn = conn.clone();
                let _: () = conn.del(redis_key(prefix, &hash)).await?;
            }
            SessionStore::Db { db, .. } => {
                sqlx::query("DELETE FROM sessions WHERE token_hash = ?")
                    .bind(&hash)
                    .execute(db.pool())
                    .await?;
            }
        }
        Ok(())
    }

    /// For `/readyz`: does the store answer?
    pub async fn ping(&self) -> Result<(), SessionError> {
        match self {
            SessionStore::Redis { conn, .. } => {
                let mut conn = conn.clone();
                let _: String = redis::cmd("PING").query_async(&mut conn).await?;
                Ok(())
            }
            SessionStore::Db { db, .. } => Ok(db.ping().await?),
        }
    }
}
