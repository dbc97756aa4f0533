//! The transactional outbox: events written in the same transaction as the change they describe.
//!
//! An outbox row exists if and only if its transaction committed, so a publisher that drains rows with
//! `published_at IS NULL` (the realtime hub, on start and continuously) can never announce a change that
//! rolled back, nor lose one that committed: a crash between commit and publish leaves the row pending.

use serde::Serialize;

use crate::time::Millis;

/// The kind of every reservation transition event.
pub const RESERVATION_KIND: &str = "reservation";

/// Payload of a reservation transition, as the realtime hub will publish it to `user:<owner>` and
/// `resource:<id>`.
#[derive(Debug, Clone, Serialize)]
pub struct ReservationEvent {
    pub reservation_id: i64,
    pub resource_id: i64,
    pub user_id: i64,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub quantity: i64,
    pub at: String,
    pub cause: String,
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
