//! The reservation transactions. Each public method is one request's worth of work.
//!
//! Guarding, in layers:
//! 1. [`state::decide`] refuses a transition in code;
//! 2. the `UPDATE … WHERE state = <from>` that performs it changes no row if a concurrent request moved
//!    the reservation first (the loser sees 0 rows and reports the conflict);
//! 3. the schema refuses what slipped through anyway: `held <= capacity` (no oversell), UNIQUE
//!    `charges(reservation_id)` (no double charge), CHECKed state names, foreign keys.
//!
//! Capacity: `resources.held` is the quantity of PAID reservations plus RESERVED ones not yet written as
//! EXPIRED. A reservation takes capacity with `UPDATE resources SET held = held + q WHERE held + q <=
//! capacity`; before that, the same transaction writes every overdue hold of that resource as EXPIRED and
//! gives its quantity back, so an overdue hold never blocks a new one and no cron job is needed.
//!
//! Payments leave the database for the gateway, so a payment is two short transactions around the call:
//! the first checks the hold and marks the attempt, the gateway charges under a key derived from the
//! reservation, and the second records the charge and the PAID state, or refunds if the reservation was
//! cancelled or expired meanwhile. Locks are never held across the network.

use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::model::{NewResource, Payment, Reservation, Resource, Transition};
use super::state::{self, Command, Refusal, State};
use crate::db::{with_retry, AsRetryable, Db, Dialect};
use crate::idempotency::{complete_in, Saved, Ticket};
use crate::outbox::{self, ReservationEvent};
use crate::payments::{charge_key, ChargeRequest, Gateway, GatewayError};
use crate::time::{now_ms, rfc3339, Millis};

/// Why a reservation operation did not succeed; each maps to one API error code.
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    #[error("not found")]
    NotFound,
    #[error("only {available} left")]
    SoldOut { available: i64 },
    #[error("the hold expired before it was paid")]
    Expired,
    #[error("cannot go from {from} to {to}")]
    InvalidTransition { from: State, to: State },
    #[error("{0}")]
    Declined(String),
    #[error("{0}")]
    PaymentUnavailable(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

impl AsRetryable for ReservationError {
    fn is_retryable(&self) -> bool {
        matches!(self, ReservationError::Sql(e) if e.is_retryable())
    }
}

impl From<Refusal> for ReservationError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Expired => ReservationError::Expired,
            Refusal::Invalid { from, to } => ReservationError::InvalidTransition { from, to },
        }
    }
}

type Result<T, E = ReservationError> = std::result::Result<T, E>;

/// The columns [`reservation_from_row`] reads, in order, from `reservations r LEFT JOIN charges c`.
macro_rules! reservation_columns {
    () => {
        "r.id, r.resource_id, r.user_id, r.quantity, r.state, r.amount_cents, r.currency, r.expires_at, \
         r.created_at, r.updated_at, c.id, c.amount_cents, c.currency, c.provider_ref, c.captured_at, \
         c.refunded_at"
    };
}

const RESERVATION_SELECT: &str = concat!(
    "SELECT ",
    reservation_columns!(),
    " FROM reservations r LEFT JOIN charges c ON c.reservation_id = r.id"
);

/// `available` of the resource aliased `res`: capacity − (held − overdue holds not yet written as
/// EXPIRED). `held` already counts PAID and RESERVED, so only the overdue part is subtracted back. Binds
/// one parameter: now.
fn available_sql(dialect: Dialect, res: &str) -> String {
    let overdue = dialect.int(&format!(
        "COALESCE((SELECT SUM(x.quantity) FROM reservations x WHERE x.resource_id = {res}.id \
         AND x.state = 'RESERVED' AND x.expires_at <= ?), 0)"
    ));
    format!("{res}.capacity - ({res}.held - {overdue})")
}

fn reservation_from_row(row: &AnyRow) -> Reservation {
    let state_text: String = row.get(4);
    let payment = row.get::<Option<i64>, _>(10).map(|id| Payment {
        id,
        amount_cents: row.get(11),
        currency: row.get(12),
        provider_ref: row.get(13),
        captured_at: row.get(14),
        refunded_at: row.get(15),
    });
    Reservation {
        id: row.get(0),
        resource_id: row.get(1),
        user_id: row.get(2),
        quantity: row.get(3),
        state: State::parse(&state_text).unwrap_or(State::Cancelled),
        amount_cents: row.get(5),
        currency: row.get(6),
        expires_at: row.get(7),
        created_at: row.get(8),
        updated_at: row.get(9),
        payment,
    }
}

/// The locked essentials of a reservation inside a transaction.
#[derive(Debug, Clone)]
struct Locked {
    id: i64,
    resource_id: i64,
    user_id: i64,
    quantity: i64,
    state: State,
    expires_at: Millis,
    amount_cents: i64,
    currency: String,
}

/// Transitions made by a transaction, reported to metrics only once it committed.
#[derive(Default)]
struct Done(Vec<(Option<State>, State)>);

impl Done {
    fn emit(self) {
        for (from, to) in self.0 {
            metrics::counter!(
                "cozy_reservation_transitions_total",
                "from" => from.map_or("NEW", State::as_str),
                "to" => to.as_str()
            )
            .increment(1);
        }
    }
}

/// The reservation service: the database plus the payment gateway.
#[derive(Clone)]
pub struct Reservations {
    db: Db,
    gateway: Arc<dyn Gateway>,
    gateway_timeout: Duration,
}

impl Reservations {
    pub fn new(db: Db, gateway: Arc<dyn Gateway>, gateway_timeout: Duration) -> Self {
        Reservations {
            db,
            gateway,
            gateway_timeout,
        }
    }

    pub fn gateway(&self) -> &Arc<dyn Gateway> {
        &self.gateway
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    // ---------------------------------------------------------------- resources

    #[tracing::instrument(skip(self))]
    pub async fn create_resource(&self, new: &NewResource) -> Result<Resource> {
        let mut conn = self.db.pool().acquire().await?;
        let insert = sqlx::query(
            "INSERT INTO resources (name, capacity, held, price_cents, currency, hold_seconds, created_at) \
             VALUES (?, ?, 0, ?, ?, ?, ?)",
        )
        .bind(&new.name)
        .bind(new.capacity)
        .bind(new.price_cents)
        .bind(&new.currency)
        .bind(new.hold_seconds)
        .bind(now_ms());
        let id = self.db.insert_id(&mut conn, insert).await?;
        drop(conn);
        self.resource(id).await?.ok_or(ReservationError::NotFound)
    }

    fn resource_select(&self) -> String {
        let available = available_sql(self.db.dialect(), "r");
        format!(
            "SELECT r.id, r.name, r.capacity, {available}, r.price_cents, r.currency, r.hold_seconds \
             FROM resources r"
        )
    }

    fn resource_from_row(row: &AnyRow) -> Resource {
        Resource {
            id: row.get(0),
            name: row.get(1),
            capacity: row.get(2),
            available: row.get::<i64, _>(3).max(0),
            price_cents: row.get(4),
            currency: row.get(5),
            hold_seconds: row.get(6),
        }
    }

    pub async fn resource(&self, id: i64) -> Result<Option<Resource>> {
        let sql = format!("{} WHERE r.id = ?", self.resource_select());
        let row = sqlx::query(&sql)
            .bind(now_ms())
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.as_ref().map(Self::resource_from_row))
    }

    /// A page of resources in id order after `cursor`; returns the page and the next cursor.
    pub async fn list_resources(
        &self,
        limit: i64,
        after: i64,
    ) -> Result<(Vec<Resource>, Option<i64>)> {
        let sql = format!(
            "{} WHERE r.id > ? ORDER BY r.id LIMIT ?",
            self.resource_select()
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms())
            .bind(after)
            .bind(limit + 1)
            .fetch_all(self.db.pool())
            .await?;
        let mut items: Vec<Resource> = rows.iter().map(Self::resource_from_row).collect();
        Ok(page(&mut items, limit, |r| r.id))
    }

    // ---------------------------------------------------------------- reserving

    /// Holds `quantity` of a resource for `user_id` until `now + hold_seconds`.
    #[tracing::instrument(skip(self, ticket))]
    pub async fn reserve(
        &self,
        user_id: i64,
        resource_id: i64,
        quantity: i64,
        request_key: Option<&str>,
        ticket: Option<&Ticket>,
    ) -> Result<Reservation> {
        let outcome =
            with_retry(|| self.reserve_once(user_id, resource_id, quantity, request_key, ticket))
                .await;
        match outcome {
            Err(ReservationError::Sql(e))
                if crate::db::is_unique_violation(&e) && request_key.is_some() =>
            {
                // The same Idempotency-Key created a reservation before (a retry after a crash or a lost
                // response whose saved outcome was lost too): hand back that one instead of a second.
                // Nothing of this call committed, so its outcome must still be saved by the caller.
                if let Some(t) = ticket {
                    t.saved_in_tx
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                }
                let sql = format!("{RESERVATION_SELECT} WHERE r.user_id = ? AND r.request_key = ?");
                let row = sqlx::query(&sql)
                    .bind(user_id)
                    .bind(request_key)
                    .fetch_optional(self.db.pool())
                    .await?;
                row.as_ref()
                    .map(reservation_from_row)
                    .ok_or(ReservationError::Sql(e))
            }
            other => other,
        }
    }

    async fn reserve_once(
        &self,
        user_id: i64,
        resource_id: i64,
        quantity: i64,
        request_key: Option<&str>,
        ticket: Option<&Ticket>,
    ) -> Result<Reservation> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let mut done = Done::default();
        let sql = format!(
            "SELECT capacity, price_cents, currency, hold_seconds FROM resources WHERE id = ?{}",
            self.db.dialect().for_update()
        );
        let Some(res) = sqlx::query(&sql)
            .bind(resource_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Err(ReservationError::NotFound);
        };
        let (capacity, price, currency, hold): (i64, i64, String, i64) =
            (res.get(0), res.get(1), res.get(2), res.get(3));
        self.expire_overdue_of_resource(&mut tx, resource_id, now, &mut done)
            .await?;
        let took = sqlx::query(
            "UPDATE resources SET held = held + ? WHERE id = ? AND held + ? <= capacity",
        )
        .bind(quantity)
        .bind(resource_id)
        .bind(quantity)
        .execute(&mut *tx)
        .await?;
        if took.rows_affected() == 0 {
            let held: i64 = sqlx::query_scalar("SELECT held FROM resources WHERE id = ?")
                .bind(resource_id)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?; // keep the expirations written above
            done.emit();
            return Err(ReservationError::SoldOut {
                available: (capacity - held).max(0),
            });
        }
        let expires_at = now + hold * 1000;
        let amount = price
            .checked_mul(quantity)
            .ok_or_else(|| sqlx::Error::Protocol("amount overflows".into()))?;
        let insert = sqlx::query(
            "INSERT INTO reservations (resource_id, user_id, quantity, state, amount_cents, currency, expires_at, \
             created_at, updated_at, request_key) VALUES (?, ?, ?, 'RESERVED', ?, ?, ?, ?, ?, ?)",
        )
        .bind(resource_id)
        .bind(user_id)
        .bind(quantity)
        .bind(amount)
        .bind(&currency)
        .bind(expires_at)
        .bind(now)
        .bind(now)
        .bind(request_key);
        let id = self.db.insert_id(&mut tx, insert).await?;
        let locked = Locked {
            id,
            resource_id,
            user_id,
            quantity,
            state: State::Reserved,
            expires_at,
            amount_cents: amount,
            currency,
        };
        let reservation = record(
            &mut tx,
            self.db.dialect(),
            &locked,
            None,
            State::Reserved,
            now,
            "reserved",
            &mut done,
        )
        .await?;
        save_in_tx(&mut tx, ticket, 201, &reservation).await?;
        tx.commit().await?;
        done.emit();
        Ok(reservation)
    }

    /// Writes every overdue hold of a resource as EXPIRED and gives its capacity back.
    async fn expire_overdue_of_resource(
        &self,
        tx: &mut Transaction<'static, Any>,
        resource_id: i64,
        now: Millis,
        done: &mut Done,
    ) -> Result<()> {
        loop {
            let sql = format!(
                "SELECT id, resource_id, user_id, quantity, state, expires_at, amount_cents, currency FROM reservations \
                 WHERE resource_id = ? AND state = 'RESERVED' AND expires_at <= ? ORDER BY id LIMIT 200{}",
                self.db.dialect().for_update()
            );
            let rows = sqlx::query(&sql)
                .bind(resource_id)
                .bind(now)
                .fetch_all(&mut **tx)
                .await?;
            if rows.is_empty() {
                return Ok(());
            }
            for row in &rows {
                let locked = locked_from_row(row);
                expire_locked(tx, self.db.dialect(), &locked, now, "expired", done).await?;
            }
        }
    }

    // ---------------------------------------------------------------- reading

    /// The reservation as of now; an overdue hold is written as EXPIRED before it is returned.
    pub async fn get(&self, user_id: i64, id: i64) -> Result<Reservation> {
        let found = self
            .fetch(user_id, id)
            .await?
            .ok_or(ReservationError::NotFound)?;
        if state::effective(found.state, found.expires_at, now_ms()) != found.state {
            with_retry(|| self.expire_one(user_id, id, "expired")).await?;
            return self
                .fetch(user_id, id)
                .await?
                .ok_or(ReservationError::NotFound);
        }
        Ok(found)
    }

    async fn fetch(&self, user_id: i64, id: i64) -> Result<Option<Reservation>> {
        let sql = format!("{RESERVATION_SELECT} WHERE r.id = ? AND r.user_id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(user_id)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(row.as_ref().map(reservation_from_row))
    }

    /// The caller's reservations, optionally of one state, in id order after `after`.
    pub async fn list(
        &self,
        user_id: i64,
        state_filter: Option<State>,
        limit: i64,
        after: i64,
    ) -> Result<(Vec<Reservation>, Option<i64>)> {
        // Write the caller's overdue holds as EXPIRED first, so the page (and a state filter) is true.
        loop {
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM reservations WHERE user_id = ? AND state = 'RESERVED' AND expires_at <= ? LIMIT 100",
            )
            .bind(user_id)
            .bind(now_ms())
            .fetch_all(self.db.pool())
            .await?;
            if ids.is_empty() {
                break;
            }
            for id in ids {
                with_retry(|| self.expire_one(user_id, id, "expired")).await?;
            }
        }
        let mut sql = format!("{RESERVATION_SELECT} WHERE r.user_id = ? AND r.id > ?");
        if state_filter.is_some() {
            sql.push_str(" AND r.state = ?");
        }
        sql.push_str(" ORDER BY r.id LIMIT ?");
        let mut q = sqlx::query(&sql).bind(user_id).bind(after);
        if let Some(s) = state_filter {
            q = q.bind(s.as_str());
        }
        let rows = q.bind(limit + 1).fetch_all(self.db.pool()).await?;
        let mut items: Vec<Reservation> = rows.iter().map(reservation_from_row).collect();
        Ok(page(&mut items, limit, |r| r.id))
    }

    /// The transition log of a reservation the caller owns.
    pub async fn events(&self, user_id: i64, id: i64) -> Result<Vec<Transition>> {
        self.get(user_id, id).await?; // ownership (404) and expiry-on-read
        let rows = sqlx::query(
            "SELECT from_state, to_state, at, cause FROM reservation_events WHERE reservation_id = ? ORDER BY id",
        )
        .bind(id)
        .fetch_all(self.db.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| Transition {
                from: r
                    .get::<Option<String>, _>(0)
                    .as_deref()
                    .and_then(State::parse),
                to: State::parse(&r.get::<String, _>(1)).unwrap_or(State::Cancelled),
                at: r.get(2),
                cause: r.get(3),
            })
            .collect())
    }

    /// Expires one overdue hold (no-op if it is not overdue or someone else did it). Returns whether this
    /// call wrote the transition. `user_id` 0 means any owner (used by `cozy sweep`).
    pub async fn expire_one(&self, user_id: i64, id: i64, cause: &str) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let mut done = Done::default();
        let Some(locked) = self.lock(&mut tx, user_id, id).await? else {
            return Ok(false);
        };
        let changed =
            expire_locked(&mut tx, self.db.dialect(), &locked, now, cause, &mut done).await?;
        tx.commit().await?;
        done.emit();
        Ok(changed)
    }

    async fn lock(
        &self,
        tx: &mut Transaction<'static, Any>,
        user_id: i64,
        id: i64,
    ) -> Result<Option<Locked>> {
        let sql = format!(
            "SELECT id, resource_id, user_id, quantity, state, expires_at, amount_cents, currency FROM reservations \
             WHERE id = ? AND (user_id = ? OR ? = 0){}",
            self.db.dialect().for_update()
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .bind(user_id)
            .bind(user_id)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(row.as_ref().map(locked_from_row))
    }

    // ---------------------------------------------------------------- paying

    /// Pays a hold with `method`. See the module comment for the two-transaction shape.
    #[tracing::instrument(skip(self, ticket))]
    pub async fn pay(
        &self,
        user_id: i64,
        id: i64,
        method: &str,
        ticket: Option<&Ticket>,
    ) -> Result<Reservation> {
        let requested_at = now_ms();
        let locked = with_retry(|| self.begin_payment(user_id, id, requested_at)).await?;
        let request = ChargeRequest {
            key: charge_key(id),
            amount_cents: locked.amount_cents,
            currency: locked.currency.clone(),
            method: method.to_string(),
        };
        let charged =
            match tokio::time::timeout(self.gateway_timeout, self.gateway.charge(&request)).await {
                Ok(result) => result,
                Err(_) => Err(GatewayError::Unavailable(
                    "the payment gateway did not answer in time".into(),
                )),
            };
        let charge = match charged {
            Ok(c) => c,
            Err(GatewayError::Declined(m)) => return Err(ReservationError::Declined(m)),
            Err(GatewayError::Unavailable(m)) => {
                return Err(ReservationError::PaymentUnavailable(m))
            }
        };
        let settled =
            with_retry(|| self.settle_payment(user_id, id, requested_at, &charge, ticket)).await?;
        match settled {
            Settled::Paid(r) => Ok(r),
            Settled::Lost(err) => {
                // Cancelled or expired while the gateway was charging: give the money back.
                if let Err(e) = self.gateway.refund(&charge_key(id)).await {
                    tracing::warn!(reservation = id, error = %e, "refund of a late charge failed; cozy sweep retries it");
                }
                Err(err)
            }
        }
    }

    async fn begin_payment(&self, user_id: i64, id: i64, now: Millis) -> Result<Locked> {
        let mut tx = self.db.begin_write().await?;
        let mut done = Done::default();
        let locked = self
            .lock(&mut tx, user_id, id)
            .await?
            .ok_or(ReservationError::NotFound)?;
        match state::decide(locked.state, locked.expires_at, now, Command::Pay) {
            Ok(_) => {
                sqlx::query("UPDATE reservations SET payment_started_at = ? WHERE id = ? AND state = 'RESERVED'")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(locked)
            }
            Err(Refusal::Expired) => {
                expire_locked(
                    &mut tx,
                    self.db.dialect(),
                    &locked,
                    now,
                    "expired",
                    &mut done,
                )
                .await?;
                tx.commit().await?;
                done.emit();
                Err(ReservationError::Expired)
            }
            // Already written EXPIRED (by a read, a reservation or the sweep): the same answer as for an
            // overdue hold nobody wrote yet (http-api.md: paying for an expired hold is 409 `expired`).
            Err(Refusal::Invalid {
                from: State::Expired,
                ..
            }) => Err(ReservationError::Expired),
            Err(refusal) => Err(refusal.into()),
        }
    }

    async fn settle_payment(
        &self,
        user_id: i64,
        id: i64,
        requested_at: Millis,
        charge: &crate::payments::Charge,
        ticket: Option<&Ticket>,
    ) -> Result<Settled> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let mut done = Done::default();
        let locked = self
            .lock(&mut tx, user_id, id)
            .await?
            .ok_or(ReservationError::NotFound)?;
        // The hold is judged at the time payment was requested: a customer who paid in time is not
        // refused because the gateway was slow. Anyone who already wrote the hold EXPIRED has won, though.
        match state::decide(locked.state, locked.expires_at, requested_at, Command::Pay) {
            Ok(_) => {}
            Err(Refusal::Invalid {
                from: State::Paid,
                to,
            }) => {
                // A concurrent request paid it with this very charge: nothing to refund.
                return Err(ReservationError::InvalidTransition {
                    from: State::Paid,
                    to,
                });
            }
            Err(r) => {
                let err = match locked.state {
                    State::Expired => ReservationError::Expired,
                    _ => r.into(),
                };
                return Ok(Settled::Lost(err));
            }
        }
        let moved = sqlx::query("UPDATE reservations SET state = 'PAID', updated_at = ? WHERE id = ? AND state = 'RESERVED'")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() != 1 {
            return Err(ReservationError::InvalidTransition {
                from: locked.state,
                to: State::Paid,
            });
        }
        sqlx::query(
            "INSERT INTO charges (reservation_id, provider, provider_ref, amount_cents, currency, captured_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(self.gateway.name())
        .bind(&charge.provider_ref)
        .bind(charge.amount_cents)
        .bind(&charge.currency)
        .bind(charge.captured_at)
        .execute(&mut *tx)
        .await?;
        let reservation = record(
            &mut tx,
            self.db.dialect(),
            &locked,
            Some(State::Reserved),
            State::Paid,
            now,
            "paid",
            &mut done,
        )
        .await?;
        save_in_tx(&mut tx, ticket, 200, &reservation).await?;
        tx.commit().await?;
        done.emit();
        Ok(Settled::Paid(reservation))
    }

    // ---------------------------------------------------------------- cancelling

    /// Cancels a hold, or a paid reservation (recording a refund). Capacity returns either way.
    #[tracing::instrument(skip(self, ticket))]
    pub async fn cancel(
        &self,
        user_id: i64,
        id: i64,
        reason: Option<&str>,
        ticket: Option<&Ticket>,
    ) -> Result<Reservation> {
        let (reservation, refund) =
            with_retry(|| self.cancel_once(user_id, id, reason, ticket)).await?;
        if refund {
            self.confirm_refund(id).await;
        }
        Ok(reservation)
    }

    async fn cancel_once(
        &self,
        user_id: i64,
        id: i64,
        reason: Option<&str>,
        ticket: Option<&Ticket>,
    ) -> Result<(Reservation, bool)> {
        let now = now_ms();
        let mut tx = self.db.begin_write().await?;
        let mut done = Done::default();
        let locked = self
            .lock(&mut tx, user_id, id)
            .await?
            .ok_or(ReservationError::NotFound)?;
        match state::decide(locked.state, locked.expires_at, now, Command::Cancel) {
            Ok(_) => {}
            Err(Refusal::Invalid {
                from: State::Expired,
                to,
            }) if locked.state == State::Reserved => {
                expire_locked(
                    &mut tx,
                    self.db.dialect(),
                    &locked,
                    now,
                    "expired",
                    &mut done,
                )
                .await?;
                tx.commit().await?;
                done.emit();
                return Err(ReservationError::InvalidTransition {
                    from: State::Expired,
                    to,
                });
            }
            Err(r) => return Err(r.into()),
        }
        let moved = sqlx::query("UPDATE reservations SET state = 'CANCELLED', updated_at = ? WHERE id = ? AND state = ?")
            .bind(now)
            .bind(id)
            .bind(locked.state.as_str())
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() != 1 {
            return Err(ReservationError::InvalidTransition {
                from: locked.state,
                to: State::Cancelled,
            });
        }
        release(&mut tx, &locked).await?;
        let refund = locked.state == State::Paid;
        if refund {
            sqlx::query("UPDATE charges SET refunded_at = ? WHERE reservation_id = ? AND refunded_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let cause = reason
            .map(|r| format!("cancelled: {r}"))
            .unwrap_or_else(|| "cancelled".into());
        let cause: String = cause.chars().take(255).collect();
        let reservation = record(
            &mut tx,
            self.db.dialect(),
            &locked,
            Some(locked.state),
            State::Cancelled,
            now,
            &cause,
            &mut done,
        )
        .await?;
        save_in_tx(&mut tx, ticket, 200, &reservation).await?;
        tx.commit().await?;
        done.emit();
        Ok((reservation, refund))
    }

    /// Asks the gateway to refund a cancelled paid reservation and records the confirmation. Failures are
    /// left for `cozy sweep` (the charge keeps `refunded_at` set and `refund_ref` NULL).
    pub async fn confirm_refund(&self, id: i64) -> bool {
        match self.gateway.refund(&charge_key(id)).await {
            Ok(reference) => {
                let r = sqlx::query("UPDATE charges SET refund_ref = ? WHERE reservation_id = ? AND refund_ref IS NULL")
                    .bind(reference)
                    .bind(id)
                    .execute(self.db.pool())
                    .await;
                r.is_ok()
            }
            Err(e) => {
                tracing::warn!(reservation = id, error = %e, "refund not confirmed yet; cozy sweep will retry");
                false
            }
        }
    }
}

enum Settled {
    Paid(Reservation),
    Lost(ReservationError),
}

fn locked_from_row(row: &AnyRow) -> Locked {
    Locked {
        id: row.get(0),
        resource_id: row.get(1),
        user_id: row.get(2),
        quantity: row.get(3),
        state: State::parse(&row.get::<String, _>(4)).unwrap_or(State::Cancelled),
        expires_at: row.get(5),
        amount_cents: row.get(6),
        currency: row.get(7),
    }
}

/// Writes a locked overdue hold as EXPIRED and gives its capacity back; false if it was not overdue.
async fn expire_locked(
    tx: &mut Transaction<'static, Any>,
    dialect: Dialect,
    locked: &Locked,
    now: Millis,
    cause: &str,
    done: &mut Done,
) -> Result<bool> {
    if state::decide(locked.state, locked.expires_at, now, Command::Expire).is_err() {
        return Ok(false);
    }
    let moved = sqlx::query(
        "UPDATE reservations SET state = 'EXPIRED', updated_at = ? WHERE id = ? AND state = 'RESERVED' AND expires_at <= ?",
    )
    .bind(now)
    .bind(locked.id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    if moved.rows_affected() != 1 {
        return Ok(false);
    }
    release(tx, locked).await?;
    record(
        tx,
        dialect,
        locked,
        Some(State::Reserved),
        State::Expired,
        now,
        cause,
        done,
    )
    .await?;
    Ok(true)
}

/// Gives a reservation's quantity back to its resource.
async fn release(tx: &mut Transaction<'static, Any>, locked: &Locked) -> Result<()> {
    sqlx::query("UPDATE resources SET held = held - ? WHERE id = ?")
        .bind(locked.quantity)
        .bind(locked.resource_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Appends the transition to the log and the outbox, in the caller's transaction, after the writes that
/// made it (every caller has already updated the reservation, its charge and `held`).
///
/// The outbox row carries the reservation as the HTTP API shows it and the resource's `available`, both
/// read here in one query, so the realtime frame shows the state *at* this transition however late it is
/// published. Returns that reservation: callers answer the request with it instead of reading it again.
#[allow(clippy::too_many_arguments)]
async fn record(
    tx: &mut Transaction<'static, Any>,
    dialect: Dialect,
    locked: &Locked,
    from: Option<State>,
    to: State,
    now: Millis,
    cause: &str,
    done: &mut Done,
) -> Result<Reservation> {
    sqlx::query("INSERT INTO reservation_events (reservation_id, from_state, to_state, at, cause) VALUES (?, ?, ?, ?, ?)")
        .bind(locked.id)
        .bind(from.map(State::as_str))
        .bind(to.as_str())
        .bind(now)
        .bind(cause)
        .execute(&mut **tx)
        .await?;
    let sql = format!(
        concat!(
            "SELECT ",
            reservation_columns!(),
            ", {available} FROM reservations r LEFT JOIN charges c ON c.reservation_id = r.id \
             JOIN resources res ON res.id = r.resource_id WHERE r.id = ?"
        ),
        available = available_sql(dialect, "res")
    );
    let row = sqlx::query(&sql)
        .bind(now)
        .bind(locked.id)
        .fetch_one(&mut **tx)
        .await?;
    let reservation = reservation_from_row(&row);
    let available = row.get::<i64, _>(16).max(0);
    let event = ReservationEvent {
        reservation_id: locked.id,
        resource_id: locked.resource_id,
        user_id: locked.user_id,
        from: from.map(State::as_str),
        to: to.as_str(),
        quantity: locked.quantity,
        at: rfc3339(now),
        cause: cause.to_string(),
        reservation: &reservation,
        available,
    };
    outbox::append(
        &mut **tx,
        &format!("user:{}", locked.user_id),
        outbox::RESERVATION_KIND,
        &event,
        now,
    )
    .await?;
    done.0.push((from, to));
    Ok(reservation)
}

/// Saves the response of an idempotent request in the business transaction.
async fn save_in_tx(
    tx: &mut Transaction<'static, Any>,
    ticket: Option<&Ticket>,
    status: u16,
    reservation: &Reservation,
) -> Result<()> {
    if let Some(ticket) = ticket {
        let body =
            serde_json::to_string(reservation).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        complete_in(&mut **tx, ticket, &Saved { status, body }).await?;
    }
    Ok(())
}

/// Trims a fetched `limit + 1` rows to `limit` and says where the next page starts.
fn page<T>(items: &mut Vec<T>, limit: i64, id: impl Fn(&T) -> i64) -> (Vec<T>, Option<i64>) {
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(&id)
    } else {
        None
    };
    (std::mem::take(items), next)
}
