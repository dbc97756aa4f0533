//! Users: creation, roles, and argon2id password checks.
//!
//! Hashing is deliberately slow (memory-hard), so it runs on tokio's blocking pool and never stalls the
//! async workers that serve other requests.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::config::PasswordCost;
use crate::db::{is_unique_violation, Db};
use crate::reservations::model::FieldError;
use crate::time::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Role {
        if s == "admin" {
            Role::Admin
        } else {
            Role::User
        }
    }
}

/// An authenticated user as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("a user with this email exists")]
    EmailTaken,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// A syntactically plausible email, trimmed and lower-cased.
pub fn parse_email(raw: &str) -> Result<String, FieldError> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && email.matches('@').count() == 1
        && !email.chars().any(char::is_whitespace);
    if valid {
        Ok(email)
    } else {
        Err(FieldError::new(
            "email",
            "must be an email address such as ada@example.com",
        ))
    }
}

pub fn parse_password(raw: &str) -> Result<&str, FieldError> {
    match raw.chars().count() {
        0..=7 => Err(FieldError::new("password", "must be at least 8 characters")),
        1025.. => Err(FieldError::new(
            "password",
            "must be at most 1024 characters",
        )),
        _ => Ok(raw),
    }
}

#[derive(Clone, Debug)]
pub struct Accounts {
    db: Db,
    cost: PasswordCost,
}

impl Accounts {
    pub fn new(db: Db, cost: PasswordCost) -> Self {
        Accounts { db, cost }
    }

    fn argon2(cost: PasswordCost) -> Result<Argon2<'static>, AccountError> {
        let params = Params::new(cost.memory_kib, cost.iterations, 1, None)
            .map_err(|e| AccountError::Hash(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    async fn hash(&self, password: &str) -> Result<String, AccountError> {
        let password = password.to_string();
        let cost = self.cost;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Self::argon2(cost)?
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AccountError::Hash(e.to_string()))
        })
        .await
        .map_err(|e| AccountError::Hash(e.to_string()))?
    }

    /// Creates a user; `email` and `password` are validated here.
    pub async fn create(
        &self,
        email: &str,
        password: &str,
        role: Role,
    ) -> Result<User, AccountError> {
        let email = parse_email(email).map_err(AccountError::Invalid)?;
        let password = parse_password(password).map_err(AccountError::Invalid)?;
        let hash = self.hash(password).await?;
        let mut conn = self.db.pool().acquire().await?;
        let insert = sqlx::query(
            "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&email)
        .bind(&hash)
        .bind(role.as_str())
        .bind(now_ms());
        match self.db.insert_id(&mut conn, insert).await {
            Ok(id) => Ok(User { id, email, role }),
            Err(e) if is_unique_violation(&e) => Err(AccountError::EmailTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the user, or (CLI) updates the password and role of an existing one.
    pub async fn upsert(
        &self,
        email: &str,
        password: &str,
        role: Role,
    ) -> Result<(User, bool), AccountError> {
        match self.create(email, password, role).await {
            Ok(u) => Ok((u, true)),
            Err(AccountError::EmailTaken) => {
                let email = parse_email(email).map_err(AccountError::Invalid)?;
                let hash = self.hash(password).await?;
                sqlx::query("UPDATE users SET password_hash = ?, role = ? WHERE email = ?")
                    .bind(&hash)
                    .bind(role.as_str())
                    .bind(&email)
                    .execute(self.db.pool())
                    .await?;
                let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE email = ?")
                    .bind(&email)
                    .fetch_one(self.db.pool())
                    .await?;
                Ok((User { id, email, role }, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Checks credentials. Unknown emails cost a hash too, so timing does not reveal which emails exist.
    pub async fn verify(&self, email: &str, password: &str) -> Result<User, AccountError> {
        let email = email.trim().to_lowercase();
        let row = sqlx::query("SELECT id, email, password_hash, role FROM users WHERE email = ?")
            .bind(&email)
            .fetch_optional(self.db.pool())
            .await?;
        let (user, hash) = match row {
            Some(r) => (
                Some(User {
                    id: r.get(0),
                    email: r.get(1),
                    role: Role::parse(&r.get::<String, _>(3)),
                }),
                r.get::<String, _>(2),
            ),
            None => (None, DUMMY_HASH.to_string()),
        };
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|e| AccountError::Hash(e.to_string()))?;
        match (user, ok) {
            (Some(u), true) => Ok(u),
            _ => Err(AccountError::InvalidCredentials),
        }
    }
}

/// A valid argon2id hash of a random string, verified against when the email is unknown.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0hFDcbDMOHcQ3rXSVnmSbYJ6GZBaU9o0zQ1xw4IgSxc";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(parse_email(" Ada@Example.COM ").unwrap(), "ada@example.com");
        for bad in [
            "", "ada", "ada@", "@x.io", "a@b", "a b@c.io", "a@@c.io", "a@.io",
        ] {
            assert!(parse_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_need_eight_characters() {
        assert!(parse_password("1234567").is_err());
        assert!(parse_password("12345678").is_ok());
    }
}
