//! `cozy sweep`: housekeeping that correctness never depends on.
//!
//! Every step is a conditional write that a second sweeper (another host) running at the same time turns
//! into a no-op, so sweeps can overlap freely: overdue holds are expired one short transaction at a time
//! (the `UPDATE … WHERE state = 'RESERVED' AND expires_at <= now` succeeds for exactly one sweeper),
//! refunds recorded but not confirmed by the gateway are retried, payments interrupted by a crash are
//! reconciled with the gateway, and old idempotency keys, sessions and realtime history are purged.

use serde::Serialize;
use sqlx::Row;

use super::repo::Reservations;
use super::ReservationError;
use crate::idempotency::IdempotencyStore;
use crate::payments::charge_key;
use crate::realtime::store::{Store, StoreError};
use crate::time::{now_ms, Millis};

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    pub dry_run: bool,
    /// Overdue holds written as EXPIRED by this sweep (would be, with --dry-run).
    pub expired: u64,
    /// Refunds of cancelled paid reservations confirmed with the gateway now.
    pub refunds_confirmed: u64,
    /// Gateway charges of reservations that never became PAID (crash mid-payment), refunded now.
    pub stray_charges_refunded: u64,
    pub idempotency_keys_purged: u64,
    pub sessions_purged: u64,
    /// Realtime history beyond its retention (`realtime_history_count` and `realtime_history_age`).
    pub messages_purged: u64,
}

/// What stopped a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Reservations(#[from] ReservationError),
    #[error("purging realtime history: {0}")]
    History(#[from] StoreError),
}

impl From<sqlx::Error> for SweepError {
    fn from(e: sqlx::Error) -> Self {
        SweepError::Reservations(e.into())
    }
}

pub struct Sweeper<'a> {
    pub reservations: &'a Reservations,
    pub idempotency: &'a IdempotencyStore,
    pub history: &'a Store,
    pub idempotency_retention_ms: Millis,
    pub batch: i64,
}

impl Sweeper<'_> {
    pub async fn run(&self, dry_run: bool) -> Result<SweepReport, SweepError> {
        let db = self.reservations.db();
        let pool = db.pool();
        let now = now_ms();
        let mut report = SweepReport {
            dry_run,
            ..Default::default()
        };

        if dry_run {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM reservations WHERE state = 'RESERVED' AND expires_at <= ?",
            )
            .bind(now)
            .fetch_one(pool)
            .await?;
            report.expired = n as u64;
        } else {
            let mut after = 0i64;
            loop {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM reservations WHERE state = 'RESERVED' AND expires_at <= ? AND id > ? ORDER BY id LIMIT ?",
                )
                .bind(now)
                .bind(after)
                .bind(self.batch)
                .fetch_all(pool)
                .await?;
                let Some(last) = ids.last().copied() else {
                    break;
                };
                for id in ids {
                    if crate::db::with_retry(|| {
                        self.reservations.expire_one(0, id, "expired (sweep)")
                    })
                    .await?
                    {
                        report.expired += 1;
                    }
                }
                after = last;
            }
        }

        // Refunds recorded in a cancelling transaction but not yet confirmed by the gateway.
        let pending: Vec<i64> = sqlx::query_scalar(
            "SELECT reservation_id FROM charges WHERE refunded_at IS NOT NULL AND refund_ref IS NULL LIMIT 1000",
        )
        .fetch_all(pool)
        .await?;
        for id in pending {
            if dry_run || self.reservations.confirm_refund(id).await {
                report.refunds_confirmed += 1;
            }
        }

        // Payments interrupted between the gateway's charge and cozy's commit, whose reservation then
        // ended without being PAID: the gateway holds money cozy has no record of. Give it back.
        let stray = sqlx::query(
            "SELECT r.id FROM reservations r LEFT JOIN charges c ON c.reservation_id = r.id \
             WHERE r.payment_started_at IS NOT NULL AND r.state IN ('EXPIRED', 'CANCELLED') AND c.id IS NULL LIMIT 1000",
        )
        .fetch_all(pool)
        .await?;
        for row in stray {
            let id: i64 = row.get(0);
            let gateway = self.reservations.gateway();
            let Ok(found) = gateway.find(&charge_key(id)).await else {
                continue;
            };
            if found.is_some() {
                if dry_run {
                    report.stray_charges_refunded += 1;
                    continue;
                }
                if gateway.refund(&charge_key(id)).await.is_err() {
                    continue;
                }
                report.stray_charges_refunded += 1;
            }
            if !dry_run {
                sqlx::query("UPDATE reservations SET payment_started_at = NULL WHERE id = ?")
                    .bind(id)
                    .execute(pool)
                    .await?;
            }
        }

        report.idempotency_keys_purged = self
            .idempotency
            .purge(now - self.idempotency_retention_ms, dry_run)
            .await?;
        report.sessions_purged = if dry_run {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE expires_at <= ?")
                .bind(now)
                .fetch_one(pool)
                .await?;
            n as u64
        } else {
            sqlx::query("DELETE FROM sessions WHERE expires_at <= ?")
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        };
        report.messages_purged = if dry_run {
            self.history.purgeable(now).await?
        } else {
            self.history.purge(now).await?
        };
        Ok(report)
    }
}
