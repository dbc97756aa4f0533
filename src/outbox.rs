//! The transactional outbox: events written in the same transaction as the change they describe.
//!
//! An outbox row exists if and only if its transaction committed, so a publisher that drains rows with
//! `published_at IS NULL` (the realtime hub, on start and continuously) can never announce a change that
//! rolled back, nor lose one that committed: a crash between commit and publish leaves the row pending.
//!
//! Writing is [`append`], in the business transaction. Draining is [`take_pending`] (a locking read, so
//! two publishers never take the same row, and the second waits for the first instead of skipping ahead,
//! which keeps one reservation's events in order) and [`mark_published`], both in the publisher's own
//! transaction; `realtime::store::Store::drain_outbox` is that publisher.

use serde::{Deserialize, Serialize};

use crate::db::Dialect;
use crate::reservations::model::Reservation;
use crate::time::Millis;

/// The kind of every reservation transition event.
pub const RESERVATION_KIND: &str = "reservation";

/// Payload of a reservation transition, as the realtime hub publishes it to `user:<owner>` and
/// `resource:<id>`.
#[derive(Debug, Clone, Serialize)]
pub struct ReservationEvent<'a> {
    pub reservation_id: i64,
    pub resource_id: i64,
    pub user_id: i64,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub quantity: i64,
    pub at: String,
    pub cause: String,
    /// The reservation as the HTTP API shows it, read in the transition's own transaction: the state
    /// *at* this transition, not whatever it is when the hub gets to publish it.
    pub reservation: &'a Reservation,
    /// The resource's `available` right after the transition, computed as `GET /v1/resources/{id}` does.
    pub available: i64,
}

/// What a publisher reads back from a [`ReservationEvent`] payload (unknown fields are ignored, so the
/// writer may add more).
#[derive(Debug, Clone, Deserialize)]
pub struct ReservationEventIn {
    pub reservation_id: i64,
    pub resource_id: i64,
    pub user_id: i64,
    pub reservation: serde_json::Value,
    pub available: i64,
}

/// Appends one event through `exec` (pass the business transaction).
pub async fn append<'c, E>(
    exec: E,
    topic: &str,
    kind: &str,
    payload: &impl Serialize,
    now: Millis,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let payload = serde_json::to_string(payload).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("INSERT INTO outbox (topic, kind, payload, created_at) VALUES (?, ?, ?, ?)")
        .bind(topic)
        .bind(kind)
        .bind(payload)
        .bind(now)
        .execute(exec)
        .await?;
    Ok(())
}

/// An unpublished outbox row.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: i64,
    pub topic: String,
    pub kind: String,
    pub payload: String,
}

/// Takes up to `batch` unpublished rows, oldest first, locked until `conn`'s transaction ends.
///
/// On MySQL this is `FOR UPDATE` without `SKIP LOCKED`: a second publisher waits for the first to commit
/// and then finds the rows stamped, rather than skipping ahead to later rows and publishing a
/// reservation's second transition before its first. SQLite's write transaction already serialises.
pub async fn take_pending(
    conn: &mut sqlx::AnyConnection,
    dialect: Dialect,
    batch: i64,
) -> Result<Vec<Pending>, sqlx::Error> {
    use sqlx::Row;
    let sql = format!(
        "SELECT id, topic, kind, payload FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT ?{}",
        dialect.for_update()
    );
    let rows = sqlx::query(&sql).bind(batch).fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|row| {
            Ok(Pending {
                id: row.get(0),
                topic: row.get(1),
                kind: row.get(2),
                // TEXT: MySQL hands it to the Any driver as BLOB.
                payload: crate::db::text_column(row, 3)?.unwrap_or_default(),
            })
        })
        .collect()
}

/// Stamps rows as published, in the publisher's transaction.
pub async fn mark_published(
    conn: &mut sqlx::AnyConnection,
    ids: &[i64],
    now: Millis,
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "UPDATE outbox SET published_at = ? WHERE id IN ({}) AND published_at IS NULL",
        placeholders(ids.len())
    );
    let mut query = sqlx::query(&sql).bind(now);
    for id in ids {
        query = query.bind(*id);
    }
    let stamped = query.execute(&mut *conn).await?.rows_affected();
    if stamped != ids.len() as u64 {
        // The rows were taken with a lock, so this cannot happen unless two publishers share a row:
        // fail the transaction rather than publish anything twice.
        return Err(sqlx::Error::Protocol(format!(
            "outbox: stamped {stamped} of {} locked rows; another publisher took them",
            ids.len()
        )));
    }
    Ok(())
}

/// `?, ?, …` for an `IN (…)` list of `n` values.
pub fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}
