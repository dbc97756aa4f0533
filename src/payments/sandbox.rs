//! The `sandbox` gateway: a stand-in for a card network, with its own ledger.
//!
//! The ledger is the `sandbox_ledger` table, written with autocommit statements of its own and never
//! inside cozy's transactions, so it behaves like a remote system: a charge it records survives a crash of
//! the caller, and the caller may never learn about it. Test methods (http-api.md):
//! `sandbox_ok`, `sandbox_decline`, `sandbox_timeout_after_charge`. `COZY_GATEWAY_DELAY_MS` makes every
//! call slow, so crash tests can kill the server while charges are in flight.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use sqlx::Row;

use super::{Charge, ChargeRequest, Gateway, GatewayError};
use crate::db::{is_unique_violation, Db};
use crate::time::now_ms;

pub const METHODS: [&str; 3] = [
    "sandbox_ok",
    "sandbox_decline",
    "sandbox_timeout_after_charge",
];

pub struct SandboxGateway {
    db: Db,
    delay: Duration,
}

impl SandboxGateway {
    pub fn new(db: Db, delay: Duration) -> Self {
        SandboxGateway { db, delay }
    }

    async fn lookup(&self, key: &str) -> Result<Option<Charge>, GatewayError> {
        let row = sqlx::query(
            "SELECT id, amount_cents, currency, created_at FROM sandbox_ledger WHERE idem_key = ?",
        )
        .bind(key)
        .fetch_optional(self.db.pool())
        .await
        .map_err(unavailable)?;
        Ok(row.map(|r| Charge {
            provider_ref: format!("sbx_{}", r.get::<i64, _>(0)),
            amount_cents: r.get(1),
            currency: r.get(2),
            captured_at: r.get(3),
        }))
    }

    async fn do_charge(&self, req: &ChargeRequest) -> Result<Charge, GatewayError> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        // Idempotency: a key that already charged returns that charge, whatever the method says now.
        if let Some(existing) = self.lookup(&req.key).await? {
            return Ok(existing);
        }
        match req.method.as_str() {
            "sandbox_decline" => {
                return Err(GatewayError::Declined(
                    "card declined (sandbox_decline)".into(),
                ))
            }
            "sandbox_ok" | "sandbox_timeout_after_charge" => {}
            other => {
                return Err(GatewayError::Declined(format!(
                    "unknown sandbox method {other:?}"
                )))
            }
        }
        let insert = sqlx::query(
            "INSERT INTO sandbox_ledger (idem_key, amount_cents, currency, method, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&req.key)
        .bind(req.amount_cents)
        .bind(&req.currency)
        .bind(&req.method)
        .bind(now_ms())
        .execute(self.db.pool())
        .await;
        match insert {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {} // a concurrent call with the same key won; return its charge
            Err(e) => return Err(unavailable(e)),
        }
        let charge = self
            .lookup(&req.key)
            .await?
            .ok_or_else(|| GatewayError::Unavailable("ledger row vanished".into()))?;
        if req.method == "sandbox_timeout_after_charge" {
            return Err(GatewayError::Unavailable(
                "timed out after charging (sandbox_timeout_after_charge)".into(),
            ));
        }
        Ok(charge)
    }

    async fn do_refund(&self, key: &str) -> Result<String, GatewayError> {
        let charge = self
            .lookup(key)
            .await?
            .ok_or_else(|| GatewayError::Declined(format!("no charge under {key}")))?;
        sqlx::query(
            "UPDATE sandbox_ledger SET refunded_at = ? WHERE idem_key = ? AND refunded_at IS NULL",
        )
        .bind(now_ms())
        .bind(key)
        .execute(self.db.pool())
        .await
        .map_err(unavailable)?;
        Ok(format!("re_{}", charge.provider_ref))
    }
}

fn unavailable(e: sqlx::Error) -> GatewayError {
    GatewayError::Unavailable(format!("sandbox ledger: {e}"))
}

impl Gateway for SandboxGateway {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn accepts(&self, method: &str) -> bool {
        METHODS.contains(&method)
    }

    fn charge<'a>(&'a self, req: &'a ChargeRequest) -> BoxFuture<'a, Result<Charge, GatewayError>> {
        self.do_charge(req).boxed()
    }

    fn refund<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<String, GatewayError>> {
        self.do_refund(key).boxed()
    }

    fn find<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Charge>, GatewayError>> {
        self.lookup(key).boxed()
    }
}
