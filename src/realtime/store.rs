//! Realtime history in the database: the sequenced frames of every room, for `since` replay.
//!
//! A room's messages carry a `seq` that starts at 1 and has no gaps, shared by every worker and surviving
//! restarts, so it comes from the database: `rt_rooms.last_seq` is the room's head, and a message takes
//! the next value in the *same transaction* that inserts it. The bump is an upsert on the room row, which
//! then stays locked until commit, so publishers of one room queue behind each other; a transaction that
//! rolls back gives its seq back with it, and `UNIQUE (room, seq)` refuses a duplicate whatever happens.
//!
//! Two sources write history:
//! - [`Store::publish`]: a client's `publish` frame, deduplicated on `(user, room, client_msg_id)` so a
//!   resend after a reconnect gets the original back and stores nothing;
//! - [`Store::drain_outbox`]: reservation transitions, which the reservation transactions leave in the
//!   transactional outbox (`crate::outbox`). Each outbox row becomes one `reservation` message in
//!   `user:<owner>` and one in `resource:<id>`, in the transaction that stamps the row, so it is published
//!   exactly once however many workers drain at the same time.
//!
//! [`Store::replay`] answers `subscribe` with `since`, and [`Store::purge`] applies retention (run by
//! `cozy sweep`). Live fan-out between workers is not here: the hub sends what these calls return.
//!
//! Room names are whatever `frames::Room` accepted; the store only bounds their length.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::frames::ServerFrame;
use crate::config::Settings;
use crate::db::{is_unique_violation, text_column, with_retry, AsRetryable, Backend, Db};
use crate::outbox::{self, placeholders, Pending, ReservationEventIn};
use crate::time::{rfc3339, Millis};

/// The longest room name the schema holds (`rt_rooms.room VARCHAR(191)`).
pub const MAX_ROOM_CHARS: usize = 191;
/// The longest `client_msg_id` (`rt_messages.client_msg_id VARCHAR(128)`).
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 128;

/// Messages deleted per statement by [`Store::purge`], so no single delete holds many locks.
const PURGE_BATCH: i64 = 500;
/// Rooms per query of [`Store::purge`] and [`Store::last_seqs`] (far below every bind limit).
const ROOM_PAGE: usize = 500;

const COLUMNS: &str = "id, room, seq, kind, user_id, client_msg_id, body, created_at";

/// What a history entry is: a client's message, or a reservation transition published by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message,
    Reservation,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Reservation => "reservation",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "message" => Some(Kind::Message),
            "reservation" => Some(Kind::Reservation),
            _ => None,
        }
    }
}

/// One entry of a room's history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub id: i64,
    pub room: String,
    pub seq: u64,
    pub kind: Kind,
    /// The publisher; `None` for server events.
    pub user_id: Option<i64>,
    /// The publisher's id for the message; `None` for server events.
    pub client_msg_id: Option<String>,
    /// A message: the client's body. A reservation: `{"reservation": …, "available"?: …}`.
    pub body: Value,
    pub created_at: Millis,
}

impl StoredMessage {
    /// The frame subscribers receive: `message`, or `reservation` (with `available` in `resource:`
    /// rooms).
    pub fn to_frame(&self) -> ServerFrame {
        match self.kind {
            Kind::Message => ServerFrame::Message {
                room: self.room.clone(),
                seq: self.seq,
                id: self.id,
                user_id: self.user_id.unwrap_or_default(),
                client_msg_id: self.client_msg_id.clone().unwrap_or_default(),
                body: self.body.clone(),
                ts: rfc3339(self.created_at),
            },
            Kind::Reservation => ServerFrame::Reservation {
                room: self.room.clone(),
                seq: self.seq,
                reservation: self.body.get("reservation").cloned().unwrap_or(Value::Null),
                available: self.body.get("available").and_then(Value::as_i64),
            },
        }
    }

    /// The `ack` its publisher gets (the same for the original and every resend); `None` for server
    /// events, which nobody acknowledges.
    pub fn ack(&self, reference: Option<String>) -> Option<ServerFrame> {
        Some(ServerFrame::Ack {
            client_msg_id: self.client_msg_id.clone()?,
            seq: self.seq,
            ts: rfc3339(self.created_at),
            reference,
        })
    }
}

/// The outcome of [`Store::publish`].
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    /// Stored now with a new seq: broadcast it.
    New(StoredMessage),
    /// The same `(user, room, client_msg_id)` was stored before: this is that message, unchanged (the
    /// resent body is ignored). Ack it again; do not broadcast.
    Duplicate(StoredMessage),
}

impl Published {
    pub fn message(&self) -> &StoredMessage {
        match self {
            Published::New(m) | Published::Duplicate(m) => m,
        }
    }

    pub fn into_message(self) -> StoredMessage {
        match self {
            Published::New(m) | Published::Duplicate(m) => m,
        }
    }

    pub fn is_new(&self) -> bool {
        matches!(self, Published::New(_))
    }
}

/// The answer to a `subscribe` with `since`.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// The room's head when the replay was read (0 for a room never used).
    pub last_seq: u64,
    /// False when history no longer reaches back to `since + 1`, or `since` is beyond the head: then
    /// `messages` is empty and the client must reload its state.
    pub recovered: bool,
    /// `since + 1 ..= last_seq`, in order, when recovered.
    pub messages: Vec<StoredMessage>,
}

/// Why a history operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller passed something the schema cannot hold (the hub validates first; this is the guard).
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// A stored row that cannot be turned back into a message.
    #[error("history row {id} cannot be read: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

impl AsRetryable for StoreError {
    fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Sql(e) if e.is_retryable())
    }
}

/// One message the outbox drain is about to write.
#[derive(Debug, Clone, PartialEq)]
struct Planned {
    outbox_id: i64,
    room: String,
    body: Value,
}

/// The realtime history of every room.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    history_count: u64,
    history_age: Duration,
    purge_batch: i64,
}

impl Store {
    /// History keeps at least the last `history_count` messages of each room and everything younger than
    /// `history_age` (see [`Store::purge`]).
    pub fn new(db: Db, history_count: u64, history_age: Duration) -> Self {
        Store {
            db,
            history_count,
            history_age,
            purge_batch: PURGE_BATCH,
        }
    }

    /// Whether the database pool was closed (the daemon is stopping): background tasks end quietly.
    pub fn is_closed(&self) -> bool {
        self.db.pool().is_closed()
    }

    /// [`Store::new`] with the retention of `realtime_history_count` / `realtime_history_age`.
    pub fn from_settings(db: Db, settings: &Settings) -> Self {
        Store::new(
            db,
            settings.realtime_history_count,
            settings.realtime_history_age,
        )
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    // ---------------------------------------------------------------- writing

    /// Persists a client message.
    ///
    /// Deduplicates on `(user_id, room, client_msg_id)`: a resend returns the original as
    /// [`Published::Duplicate`] and stores nothing. Otherwise the room's next seq is allocated and the
    /// message inserted in one transaction. A concurrent resend that loses the race on the UNIQUE key rolls
    /// back (giving its seq back) and also returns the original. Deadlocks and busy errors are retried.
    #[tracing::instrument(skip(self, body))]
    pub async fn publish(
        &self,
        room: &str,
        user_id: i64,
        client_msg_id: &str,
        body: &Value,
        now: Millis,
    ) -> Result<Published, StoreError> {
        check_room(room)?;
        if client_msg_id.is_empty() || client_msg_id.chars().count() > MAX_CLIENT_MSG_ID_CHARS {
            return Err(StoreError::Invalid {
                field: "client_msg_id",
                message: format!("must be 1 to {MAX_CLIENT_MSG_ID_CHARS} characters"),
            });
        }
        let text = body.to_string();
        // A lost race is followed by a look for the row that beat us: its transaction committed (our insert
        // would have waited for it rather than failed otherwise), so one more round is all it takes.
        for _ in 0..3 {
            let attempt =
                with_retry(|| self.publish_once(room, user_id, client_msg_id, body, &text, now))
                    .await?;
            if let Some(published) = attempt {
                return Ok(published);
            }
            let pool = self.db.pool();
            if let Some(original) = find_client_msg(pool, user_id, room, client_msg_id).await? {
                return Ok(Published::Duplicate(original));
            }
        }
        Err(StoreError::Sql(sqlx::Error::Protocol(format!(
            "publish to {room}: client_msg_id {client_msg_id:?} collides but its original cannot be read"
        ))))
    }

    /// One attempt of [`Store::publish`]; `None` when a concurrent publish of the same client message won.
    async fn publish_once(
        &self,
        room: &str,
        user_id: i64,
        client_msg_id: &str,
        body: &Value,
        text: &str,
        now: Millis,
    ) -> Result<Option<Published>, StoreError> {
        let mut tx = self.db.begin_write().await?;
        // Before taking the room's lock: the common resend costs one indexed read and blocks nobody.
        if let Some(original) = find_client_msg(&mut *tx, user_id, room, client_msg_id).await? {
            tx.rollback().await?;
            return Ok(Some(Published::Duplicate(original)));
        }
        let seq = self.allocate(&mut tx, room, 1).await?;
        let insert = sqlx::query(
            "INSERT INTO rt_messages (room, seq, kind, user_id, client_msg_id, body, created_at) \
             VALUES (?, ?, 'message', ?, ?, ?, ?)",
        )
        .bind(room)
        .bind(seq as i64)
        .bind(user_id)
        .bind(client_msg_id)
        .bind(text)
        .bind(now);
        let id = match self.db.insert_id(&mut tx, insert).await {
            Ok(id) => id,
            Err(e) if is_unique_violation(&e) => {
                tx.rollback().await?;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        Ok(Some(Published::New(StoredMessage {
            id,
            room: room.to_string(),
            seq,
            kind: Kind::Message,
            user_id: Some(user_id),
            client_msg_id: Some(client_msg_id.to_string()),
            body: body.clone(),
            created_at: now,
        })))
    }

    /// Reserves the next `n` seqs of `room` in the caller's transaction and returns the first.
    ///
    /// The upsert creates the room on first use and leaves its row locked until the transaction ends, so
    /// the seqs are this transaction's alone; reading `last_seq` back in the same transaction sees our own
    /// bump.
    async fn allocate(
        &self,
        conn: &mut AnyConnection,
        room: &str,
        n: u64,
    ) -> Result<u64, sqlx::Error> {
        let bump = match self.db.backend() {
            Backend::MySql => {
                "INSERT INTO rt_rooms (room, last_seq) VALUES (?, ?) \
                 ON DUPLICATE KEY UPDATE last_seq = last_seq + ?"
            }
            Backend::Sqlite => {
                "INSERT INTO rt_rooms (room, last_seq) VALUES (?, ?) \
                 ON CONFLICT (room) DO UPDATE SET last_seq = last_seq + ?"
            }
        };
        sqlx::query(bump)
            .bind(room)
            .bind(n as i64)
            .bind(n as i64)
            .execute(&mut *conn)
            .await?;
        let last: i64 = sqlx::query_scalar("SELECT last_seq FROM rt_rooms WHERE room = ?")
            .bind(room)
            .fetch_one(&mut *conn)
            .await?;
        Ok(last as u64 + 1 - n)
    }

    /// Publishes pending outbox rows into history, exactly once, and returns the new messages (for live
    /// fan-out).
    ///
    /// Takes up to `batch` rows with `published_at IS NULL` in id order with a locking read (a second
    /// drainer waits rather than skipping ahead, so the transitions of one reservation — whose outbox rows
    /// are written in transition order under the reservation's lock — land in history in that order). Each
    /// reservation row becomes one `reservation` message in `user:<owner>` and one in `resource:<id>` (the
    /// latter with `available`); seqs are allocated as in [`Store::publish`], and the rows are stamped
    /// `published_at` in the same transaction. A row without a realtime payload (another kind, or one
    /// written before payloads carried the reservation) is stamped and skipped with a warning rather than
    /// blocking the queue.
    ///
    /// Publishes one batch (more only while batches carry nothing to publish): call again while it
    /// returns messages. An empty result means nothing was pending.
    #[tracing::instrument(skip(self))]
    pub async fn drain_outbox(
        &self,
        now: Millis,
        batch: i64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        loop {
            let (rows, messages) = with_retry(|| self.drain_once(now, batch.max(1))).await?;
            if rows == 0 || !messages.is_empty() {
                return Ok(messages);
            }
        }
    }

    /// One transaction of [`Store::drain_outbox`]: how many outbox rows it stamped, and the messages.
    async fn drain_once(
        &self,
        now: Millis,
        batch: i64,
    ) -> Result<(usize, Vec<StoredMessage>), StoreError> {
        let mut tx = self.db.begin_write().await?;
        let pending = outbox::take_pending(&mut tx, self.db.dialect(), batch).await?;
        if pending.is_empty() {
            tx.rollback().await?;
            return Ok((0, Vec::new()));
        }
        let planned: Vec<Planned> = pending.iter().flat_map(plan).collect();
        // One bump per room for the whole batch, rooms in a fixed order so two transactions that bump the
        // same rooms take their locks in the same order.
        let mut per_room: BTreeMap<&str, u64> = BTreeMap::new();
        for p in &planned {
            *per_room.entry(p.room.as_str()).or_default() += 1;
        }
        let mut next: HashMap<String, u64> = HashMap::new();
        for (room, n) in per_room {
            let first = self.allocate(&mut tx, room, n).await?;
            next.insert(room.to_string(), first);
        }
        let mut messages = Vec::with_capacity(planned.len());
        for p in planned {
            let slot = next
                .get_mut(&p.room)
                .expect("every planned room was allocated");
            let seq = *slot;
            *slot += 1;
            let insert = sqlx::query(
                "INSERT INTO rt_messages (room, seq, kind, outbox_id, body, created_at) \
                 VALUES (?, ?, 'reservation', ?, ?, ?)",
            )
            .bind(p.room.as_str())
            .bind(seq as i64)
            .bind(p.outbox_id)
            .bind(p.body.to_string())
            .bind(now);
            let id = self.db.insert_id(&mut tx, insert).await?;
            messages.push(StoredMessage {
                id,
                room: p.room,
                seq,
                kind: Kind::Reservation,
                user_id: None,
                client_msg_id: None,
                body: p.body,
                created_at: now,
            });
        }
        let ids: Vec<i64> = pending.iter().map(|p| p.id).collect();
        outbox::mark_published(&mut tx, &ids, now).await?;
        tx.commit().await?;
        Ok((pending.len(), messages))
    }

    // ---------------------------------------------------------------- reading

    /// The room's head: the seq of its latest message, 0 for a room never used.
    pub async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        let last: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM rt_rooms WHERE room = ?")
            .bind(room)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(last.unwrap_or(0) as u64)
    }

    /// The heads of several rooms in one query (per 500 rooms); every requested room is in the map, 0 for
    /// a room never used.
    pub async fn last_seqs(&self, rooms: &[String]) -> Result<HashMap<String, u64>, StoreError> {
        let mut heads: HashMap<String, u64> = rooms.iter().map(|r| (r.clone(), 0)).collect();
        for chunk in rooms.chunks(ROOM_PAGE) {
            let sql = format!(
                "SELECT room, last_seq FROM rt_rooms WHERE room IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for room in chunk {
                query = query.bind(room.as_str());
            }
            for row in query.fetch_all(self.db.pool()).await? {
                let room = text_column(&row, 0)?.unwrap_or_default();
                heads.insert(room, row.try_get::<i64, _>(1)? as u64);
            }
        }
        Ok(heads)
    }

    /// The room's messages with `after < seq <= upto`, in seq order (what is still in history of it).
    pub async fn range(
        &self,
        room: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let sql =
            format!("SELECT {COLUMNS} FROM rt_messages WHERE room = ? AND seq > ? AND seq <= ? ORDER BY seq");
        let rows = sqlx::query(&sql)
            .bind(room)
            .bind(clamp(after))
            .bind(clamp(upto))
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    /// The `since` resync of `subscribe`: every message with `seq > since` up to the head, in order, with
    /// `recovered: true`. If history no longer reaches back to `since + 1` (purged), or `since` is beyond
    /// the head (the client saw a different history), `recovered: false` and no messages.
    #[tracing::instrument(skip(self))]
    pub async fn replay(&self, room: &str, since: u64) -> Result<Replay, StoreError> {
        let head = self.last_seq(room).await?;
        let refused = Replay {
            last_seq: head,
            recovered: false,
            messages: Vec::new(),
        };
        if since > head {
            return Ok(refused);
        }
        let messages = self.range(room, since, head).await?;
        // Purge removes the oldest seqs first, so a missing prefix shows as a later first seq; the count
        // catches any other hole.
        let complete = messages.len() as u64 == head - since
            && messages.first().is_none_or(|m| m.seq == since + 1);
        if !complete {
            return Ok(refused);
        }
        Ok(Replay {
            last_seq: head,
            recovered: true,
            messages,
        })
    }

    // ---------------------------------------------------------------- retention

    /// Retention: deletes the messages that are BOTH not among the last `history_count` of their room
    /// (`seq <= head - history_count`) AND older than `history_age` (`created_at < now - age`). Room by
    /// room, at most 500 rows per statement. Returns how many were deleted. Safe to run concurrently
    /// with publishers and with another purge.
    #[tracing::instrument(skip(self))]
    pub async fn purge(&self, now: Millis) -> Result<u64, StoreError> {
        let cutoff = self.cutoff(now);
        let keep = clamp(self.history_count);
        let mut purged = 0;
        let mut after = String::new();
        loop {
            let rows = sqlx::query(
                "SELECT room, last_seq FROM rt_rooms WHERE room > ? AND last_seq > ? ORDER BY room LIMIT ?",
            )
            .bind(after.as_str())
            .bind(keep)
            .bind(ROOM_PAGE as i64)
            .fetch_all(self.db.pool())
            .await?;
            for row in &rows {
                let room = text_column(row, 0)?.unwrap_or_default();
                let head: i64 = row.try_get(1)?;
                purged += self.purge_room(&room, head - keep, cutoff).await?;
                after = room;
            }
            if rows.len() < ROOM_PAGE {
                return Ok(purged);
            }
        }
    }

    /// Deletes `room`'s messages with `seq <= upto` created before `cutoff`, a batch per statement.
    async fn purge_room(&self, room: &str, upto: i64, cutoff: Millis) -> Result<u64, StoreError> {
        let pool = self.db.pool();
        let mut purged = 0;
        loop {
            // The (room, created_at, seq) index answers this without reading rows.
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM rt_messages WHERE room = ? AND created_at < ? AND seq <= ? LIMIT ?",
            )
            .bind(room)
            .bind(cutoff)
            .bind(upto)
            .bind(self.purge_batch)
            .fetch_all(pool)
            .await?;
            if ids.is_empty() {
                return Ok(purged);
            }
            let sql = format!(
                "DELETE FROM rt_messages WHERE id IN ({})",
                placeholders(ids.len())
            );
            let deleted = with_retry(|| {
                let mut query = sqlx::query(&sql);
                for id in &ids {
                    query = query.bind(*id);
                }
                query.execute(pool)
            })
            .await?;
            purged += deleted.rows_affected();
            if (ids.len() as i64) < self.purge_batch {
                return Ok(purged);
            }
        }
    }

    /// How many messages [`Store::purge`] would delete now (for `cozy sweep --dry-run`).
    pub async fn purgeable(&self, now: Millis) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM rt_messages m JOIN rt_rooms r ON r.room = m.room \
             WHERE m.created_at < ? AND m.seq <= r.last_seq - ?",
        )
        .bind(self.cutoff(now))
        .bind(clamp(self.history_count))
        .fetch_one(self.db.pool())
        .await?;
        Ok(n as u64)
    }

    fn cutoff(&self, now: Millis) -> Millis {
        now.saturating_sub(i64::try_from(self.history_age.as_millis()).unwrap_or(i64::MAX))
    }
}

/// The messages an outbox row turns into (none for a row without a realtime payload).
fn plan(row: &Pending) -> Vec<Planned> {
    if row.kind != outbox::RESERVATION_KIND {
        tracing::warn!(outbox_id = row.id, kind = %row.kind, "outbox row of an unknown kind: stamped, not published");
        return Vec::new();
    }
    let event: ReservationEventIn = match serde_json::from_str(&row.payload) {
        Ok(event) => event,
        Err(e) => {
            tracing::warn!(outbox_id = row.id, error = %e, "outbox row without a realtime payload: stamped, not published");
            return Vec::new();
        }
    };
    vec![
        Planned {
            outbox_id: row.id,
            room: format!("user:{}", event.user_id),
            body: json!({ "reservation": event.reservation }),
        },
        Planned {
            outbox_id: row.id,
            room: format!("resource:{}", event.resource_id),
            body: json!({ "reservation": event.reservation, "available": event.available }),
        },
    ]
}

fn check_room(room: &str) -> Result<(), StoreError> {
    if room.is_empty() || room.chars().count() > MAX_ROOM_CHARS {
        return Err(StoreError::Invalid {
            field: "room",
            message: format!("must be 1 to {MAX_ROOM_CHARS} characters"),
        });
    }
    Ok(())
}

/// A seq or count as the BIGINT it is stored in.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn find_client_msg<'c, E>(
    exec: E,
    user_id: i64,
    room: &str,
    client_msg_id: &str,
) -> Result<Option<StoredMessage>, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    let sql = format!(
        "SELECT {COLUMNS} FROM rt_messages WHERE user_id = ? AND room = ? AND client_msg_id = ?"
    );
    let row = sqlx::query(&sql)
        .bind(user_id)
        .bind(room)
        .bind(client_msg_id)
        .fetch_optional(exec)
        .await?;
    row.as_ref().map(message_from_row).transpose()
}

fn message_from_row(row: &AnyRow) -> Result<StoredMessage, StoreError> {
    let id: i64 = row.try_get(0)?;
    let corrupt = |reason: String| StoreError::Corrupt { id, reason };
    // Text columns through text_column: MySQL hands MEDIUMTEXT (and binary-collated VARCHAR) to the Any
    // driver as bytes.
    let kind_text = text_column(row, 3)?.unwrap_or_default();
    let kind =
        Kind::parse(&kind_text).ok_or_else(|| corrupt(format!("unknown kind {kind_text:?}")))?;
    let body_text = text_column(row, 6)?.unwrap_or_default();
    let body = serde_json::from_str(&body_text)
        .map_err(|e| corrupt(format!("the body is not JSON: {e}")))?;
    let seq: i64 = row.try_get(2)?;
    Ok(StoredMessage {
        id,
        room: text_column(row, 1)?.unwrap_or_default(),
        seq: u64::try_from(seq).map_err(|_| corrupt(format!("seq {seq}")))?,
        kind,
        user_id: row.try_get(4)?,
        client_msg_id: text_column(row, 5)?,
        body,
        created_at: row.try_get(7)?,
    })
}

#[cfg(test)]
mod tests {
    //! Against real databases: SQLite in a temp dir always, MySQL when `COZY_TEST_MYSQL_URL` is set (a
    //! fresh database per test, dropped afterwards).

    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use sqlx::Connection;

    use super::*;
    use crate::config::DatabaseTarget;
    use crate::db::migrate::Migrator;
    use crate::payments::SandboxGateway;
    use crate::reservations::{NewResource, Reservations};
    use crate::time::now_ms;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    struct Fixture {
        db: Db,
        target: DatabaseTarget,
        _dir: tempfile::TempDir,
        /// (server URL, database name) of a MySQL database to drop.
        mysql: Option<(String, String)>,
    }

    impl Fixture {
        async fn sqlite() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let target = DatabaseTarget::Sqlite(dir.path().join("cozy.db"));
            Fixture::open(target, dir, None).await
        }

        async fn mysql() -> Option<Fixture> {
            let base = std::env::var("COZY_TEST_MYSQL_URL").ok()?;
            let base = base.trim_end_matches('/').to_string();
            if base.is_empty() {
                return None;
            }
            let name = format!("cozy_t_rt_{}", rand::random::<u64>());
            let mut conn = sqlx::MySqlConnection::connect(&format!("{base}/mysql"))
                .await
                .unwrap_or_else(|e| panic!("cannot reach MySQL at {base}: {e}"));
            sqlx::query(&format!("CREATE DATABASE `{name}`"))
                .execute(&mut conn)
                .await
                .unwrap();
            let _ = conn.close().await;
            let target = DatabaseTarget::MySql(format!("{base}/{name}"));
            Some(Fixture::open(target, tempfile::tempdir().unwrap(), Some((base, name))).await)
        }

        async fn open(
            target: DatabaseTarget,
            dir: tempfile::TempDir,
            mysql: Option<(String, String)>,
        ) -> Fixture {
            let db = Db::connect(&target, 24).await.unwrap();
            Migrator::new(&db).up().await.unwrap();
            Fixture {
                db,
                target,
                _dir: dir,
                mysql,
            }
        }

        fn store(&self) -> Store {
            Store::new(self.db.clone(), 1000, DAY)
        }

        async fn user(&self, email: &str) -> i64 {
            let mut conn = self.db.pool().acquire().await.unwrap();
            let insert = sqlx::query(
                "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, 'x', 'user', 0)",
            )
            .bind(email);
            self.db.insert_id(&mut conn, insert).await.unwrap()
        }

        fn reservations(&self) -> Reservations {
            let gateway = Arc::new(SandboxGateway::new(self.db.clone(), Duration::ZERO));
            Reservations::new(self.db.clone(), gateway, Duration::from_secs(10))
        }

        async fn resource(&self, capacity: i64) -> i64 {
            let new = NewResource::parse("Gig", capacity, 2500, "EUR", 600).unwrap();
            self.reservations().create_resource(&new).await.unwrap().id
        }

        async fn count(&self, sql: &str) -> i64 {
            sqlx::query_scalar(sql)
                .fetch_one(self.db.pool())
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let Some((base, name)) = self.mysql.take() else {
                return;
            };
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut conn) =
                        sqlx::MySqlConnection::connect(&format!("{base}/mysql")).await
                    {
                        // A failed test may leave a transaction open: leak the database, never hang.
                        let _ = sqlx::query("SET SESSION lock_wait_timeout = 5")
                            .execute(&mut conn)
                            .await;
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                            .execute(&mut conn)
                            .await;
                    }
                })
            })
            .join();
        }
    }

    /// Runs each `async fn name(fx: &Fixture)` of this module on SQLite and on MySQL.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        super::$name(&super::Fixture::sqlite().await).await;
                    }
                )*
            }
            mod mysql {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                    async fn $name() {
                        match super::Fixture::mysql().await {
                            Some(fx) => super::$name(&fx).await,
                            None => eprintln!("COZY_TEST_MYSQL_URL is not set: skipped"),
                        }
                    }
                )*
            }
        };
    }

    on_both_backends!(
        concurrent_publishers_get_seqs_one_to_n_without_gaps_or_duplicates,
        a_resent_client_msg_id_returns_the_original_and_stores_nothing,
        replay_returns_what_was_missed_or_says_it_cannot,
        range_is_after_exclusive_upto_inclusive,
        last_seqs_reads_every_head_with_zero_for_unused_rooms,
        purge_keeps_the_last_n_and_everything_recent,
        two_drainers_publish_each_outbox_row_exactly_once_in_transition_order,
        rows_pending_when_a_drainer_dies_are_published_by_the_next,
        reservation_frames_show_the_reservation_as_it_was_at_each_transition,
        an_outbox_row_without_a_realtime_payload_does_not_block_the_queue,
        the_schema_refuses_what_the_code_must_never_write,
        cozy_sweep_purges_history_and_counts_it,
    );

    fn seqs(messages: &[StoredMessage]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    async fn publish_n(store: &Store, room: &str, user: i64, n: u64, now: Millis) {
        for i in 0..n {
            let p = store
                .publish(room, user, &format!("{room}-{i}"), &json!({ "i": i }), now)
                .await
                .unwrap();
            assert!(p.is_new());
        }
    }

    async fn concurrent_publishers_get_seqs_one_to_n_without_gaps_or_duplicates(fx: &Fixture) {
        let users = [fx.user("a@x.io").await, fx.user("b@x.io").await];
        let store = fx.store();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                let user = users[t % 2];
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for i in 0..50 {
                        let body = json!({ "task": t, "i": i, "text": "héllo ✓" });
                        let p = store
                            .publish("chat:busy", user, &format!("t{t}-{i}"), &body, now_ms())
                            .await
                            .unwrap();
                        let Published::New(m) = p else {
                            panic!("a fresh client_msg_id came back as a duplicate: {p:?}")
                        };
                        assert_eq!(m.body, body);
                        got.push(m.seq);
                    }
                    got
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            let got = task.await.unwrap();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "one publisher's seqs go up: {got:?}"
            );
            all.extend(got);
        }
        all.sort_unstable();
        assert_eq!(all, (1..=400).collect::<Vec<u64>>());
        assert_eq!(store.last_seq("chat:busy").await.unwrap(), 400);
        let stored = store.range("chat:busy", 0, 400).await.unwrap();
        assert_eq!(seqs(&stored), (1..=400).collect::<Vec<u64>>());
        assert_eq!(stored[0].body["text"], "héllo ✓", "bodies round-trip");
        assert_eq!(
            fx.count("SELECT COUNT(*) FROM rt_messages").await,
            400,
            "nothing else was stored"
        );
    }

    async fn a_resent_client_msg_id_returns_the_original_and_stores_nothing(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let bob = fx.user("bob@x.io").await;
        let store = fx.store();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .publish("chat:a", ann, "c-1", &json!({ "try": i }), now_ms())
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        let new: Vec<_> = outcomes.iter().filter(|p| p.is_new()).collect();
        assert_eq!(new.len(), 1, "exactly one stored: {outcomes:?}");
        let original = new[0].message().clone();
        for p in &outcomes {
            assert_eq!(
                p.message(),
                &original,
                "every resend answers with the original"
            );
        }
        assert_eq!(original.seq, 1);
        assert_eq!(
            fx.count("SELECT COUNT(*) FROM rt_messages").await,
            1,
            "one row"
        );
        assert_eq!(
            store.last_seq("chat:a").await.unwrap(),
            1,
            "losers gave their seq back"
        );

        // Later, sequentially, with another body: still the original.
        let again = store
            .publish("chat:a", ann, "c-1", &json!("changed"), now_ms())
            .await
            .unwrap();
        assert_eq!(again, Published::Duplicate(original.clone()));
        assert_eq!(
            again.message().ack(Some("r".into())),
            original.ack(Some("r".into()))
        );
        // Scoped per user and per room; the next message follows without a gap.
        let bobs = store
            .publish("chat:a", bob, "c-1", &json!(1), now_ms())
            .await
            .unwrap();
        assert!(bobs.is_new());
        assert_eq!(bobs.message().seq, 2);
        let elsewhere = store
            .publish("chat:b", ann, "c-1", &json!(1), now_ms())
            .await
            .unwrap();
        assert!(elsewhere.is_new());
        assert_eq!(elsewhere.message().seq, 1);

        let long = "x".repeat(MAX_CLIENT_MSG_ID_CHARS + 1);
        assert!(matches!(
            store
                .publish("chat:a", ann, &long, &json!(1), now_ms())
                .await,
            Err(StoreError::Invalid {
                field: "client_msg_id",
                ..
            })
        ));
        assert!(matches!(
            store.publish("", ann, "c-2", &json!(1), now_ms()).await,
            Err(StoreError::Invalid { field: "room", .. })
        ));
    }

    async fn replay_returns_what_was_missed_or_says_it_cannot(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let now = now_ms();
        let store = Store::new(fx.db.clone(), 3, Duration::from_secs(60));
        publish_n(&store, "chat:r", ann, 10, now - 3_600_000).await;

        let r = store.replay("chat:r", 3).await.unwrap();
        assert!(r.recovered);
        assert_eq!(r.last_seq, 10);
        assert_eq!(seqs(&r.messages), (4..=10).collect::<Vec<u64>>());
        assert_eq!(r.messages[0].body, json!({ "i": 3 }));

        let up_to_date = store.replay("chat:r", 10).await.unwrap();
        assert_eq!((up_to_date.recovered, up_to_date.messages.len()), (true, 0));
        let from_zero = store.replay("chat:r", 0).await.unwrap();
        assert_eq!(seqs(&from_zero.messages), (1..=10).collect::<Vec<u64>>());

        let beyond = store.replay("chat:r", 11).await.unwrap();
        assert_eq!(
            beyond,
            Replay {
                last_seq: 10,
                recovered: false,
                messages: vec![]
            }
        );
        let absurd = store.replay("chat:r", u64::MAX).await.unwrap();
        assert!(!absurd.recovered);
        let never_used = store.replay("chat:nobody", 0).await.unwrap();
        assert_eq!(
            never_used,
            Replay {
                last_seq: 0,
                recovered: true,
                messages: vec![]
            }
        );

        // Retention keeps seqs 8..=10: a client that saw 7 is fine, one that saw 6 must reload.
        assert_eq!(store.purge(now).await.unwrap(), 7);
        let still = store.replay("chat:r", 7).await.unwrap();
        assert!(still.recovered);
        assert_eq!(seqs(&still.messages), vec![8, 9, 10]);
        let gone = store.replay("chat:r", 6).await.unwrap();
        assert_eq!(
            gone,
            Replay {
                last_seq: 10,
                recovered: false,
                messages: vec![]
            }
        );
        assert!(!store.replay("chat:r", 0).await.unwrap().recovered);

        // A hole in the middle (not something purge makes, but history must not paper over it).
        sqlx::query("DELETE FROM rt_messages WHERE room = 'chat:r' AND seq = 9")
            .execute(fx.db.pool())
            .await
            .unwrap();
        assert!(!store.replay("chat:r", 7).await.unwrap().recovered);
    }

    async fn range_is_after_exclusive_upto_inclusive(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let store = fx.store();
        publish_n(&store, "chat:g", ann, 6, now_ms()).await;
        publish_n(&store, "chat:other", ann, 2, now_ms()).await;
        assert_eq!(
            seqs(&store.range("chat:g", 2, 5).await.unwrap()),
            vec![3, 4, 5]
        );
        assert_eq!(
            seqs(&store.range("chat:g", 0, 100).await.unwrap()),
            (1..=6).collect::<Vec<u64>>()
        );
        assert!(store.range("chat:g", 4, 4).await.unwrap().is_empty());
        assert!(store.range("chat:g", 5, 2).await.unwrap().is_empty());
        assert!(store.range("chat:g", 6, u64::MAX).await.unwrap().is_empty());
        let one = store.range("chat:g", 0, 1).await.unwrap();
        assert_eq!(one[0].room, "chat:g");
        assert_eq!(one[0].client_msg_id.as_deref(), Some("chat:g-0"));
        assert_eq!(one[0].user_id, Some(ann));
        assert_eq!(one[0].kind, Kind::Message);
    }

    async fn last_seqs_reads_every_head_with_zero_for_unused_rooms(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let store = fx.store();
        publish_n(&store, "chat:a", ann, 3, now_ms()).await;
        publish_n(&store, "chat:B", ann, 1, now_ms()).await;
        let rooms: Vec<String> = ["chat:a", "chat:B", "chat:b", "chat:none"]
            .map(String::from)
            .to_vec();
        let heads = store.last_seqs(&rooms).await.unwrap();
        let expected: HashMap<String, u64> = [
            ("chat:a", 3),
            ("chat:B", 1),
            ("chat:b", 0),
            ("chat:none", 0),
        ]
        .map(|(r, n)| (r.to_string(), n))
        .into();
        assert_eq!(heads, expected, "room names are case-sensitive");
        assert!(store.last_seqs(&[]).await.unwrap().is_empty());
        // More rooms than one query takes.
        let many: Vec<String> = (0..1200).map(|i| format!("chat:n{i}")).collect();
        let heads = store.last_seqs(&many).await.unwrap();
        assert_eq!(heads.len(), 1200);
        assert!(heads.values().all(|&n| n == 0));
    }

    async fn purge_keeps_the_last_n_and_everything_recent(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let now = now_ms();
        let old = now - 2 * 3_600_000;
        let mut store = Store::new(fx.db.clone(), 3, Duration::from_secs(3600));
        store.purge_batch = 4; // several statements per room
                               // chat:old — 10 old then 2 recent: seqs 1..=9 are both beyond the last 3 and old.
        publish_n(&store, "chat:old", ann, 10, old).await;
        store
            .publish("chat:old", ann, "r1", &json!(1), now - 1000)
            .await
            .unwrap();
        store
            .publish("chat:old", ann, "r2", &json!(2), now)
            .await
            .unwrap();
        // chat:few — old, but only 3 messages: all kept.
        publish_n(&store, "chat:few", ann, 3, old).await;
        // chat:new — many, all recent: all kept.
        publish_n(&store, "chat:new", ann, 12, now).await;

        assert_eq!(store.purgeable(now).await.unwrap(), 9);
        assert_eq!(store.purge(now).await.unwrap(), 9);
        assert_eq!(
            seqs(&store.range("chat:old", 0, 100).await.unwrap()),
            vec![10, 11, 12]
        );
        assert_eq!(store.range("chat:few", 0, 100).await.unwrap().len(), 3);
        assert_eq!(store.range("chat:new", 0, 100).await.unwrap().len(), 12);
        assert_eq!(
            store.last_seq("chat:old").await.unwrap(),
            12,
            "the head stays"
        );
        assert_eq!(store.purge(now).await.unwrap(), 0, "nothing left to purge");
        assert_eq!(store.purgeable(now).await.unwrap(), 0);

        // An hour later the recent ones are old too, and only the last 3 of each room stay.
        let later = now + 2 * 3_600_000;
        assert_eq!(store.purge(later).await.unwrap(), 9);
        assert_eq!(
            seqs(&store.range("chat:new", 0, 100).await.unwrap()),
            vec![10, 11, 12]
        );
        assert_eq!(
            seqs(&store.range("chat:old", 0, 100).await.unwrap()),
            vec![10, 11, 12]
        );
        // New messages continue the sequence.
        let next = store
            .publish("chat:old", ann, "r3", &json!(3), later)
            .await
            .unwrap();
        assert_eq!(next.message().seq, 13);
    }

    /// What one room received, in seq order, as (reservation id, state, available).
    fn timeline(messages: &[StoredMessage], room: &str) -> Vec<(i64, String, Option<i64>)> {
        let mut mine: Vec<_> = messages.iter().filter(|m| m.room == room).collect();
        mine.sort_by_key(|m| m.seq);
        mine.iter()
            .map(|m| {
                let ServerFrame::Reservation {
                    reservation,
                    available,
                    ..
                } = m.to_frame()
                else {
                    panic!("not a reservation frame: {m:?}")
                };
                (
                    reservation["id"].as_i64().unwrap(),
                    reservation["state"].as_str().unwrap().to_string(),
                    available,
                )
            })
            .collect()
    }

    async fn drain_all(store: &Store, batch: i64) -> Vec<StoredMessage> {
        let mut all = Vec::new();
        loop {
            let got = store.drain_outbox(now_ms(), batch).await.unwrap();
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
    }

    async fn two_drainers_publish_each_outbox_row_exactly_once_in_transition_order(fx: &Fixture) {
        let users = [
            fx.user("a@x.io").await,
            fx.user("b@x.io").await,
            fx.user("c@x.io").await,
        ];
        let resources = [fx.resource(1000).await, fx.resource(1000).await];
        let writing_done = Arc::new(AtomicBool::new(false));

        // Two drainers (two "workers": separate stores, same database) run while reservations are made.
        let drainers: Vec<_> = (0..2)
            .map(|_| {
                let store = Store::new(fx.db.clone(), 1000, DAY);
                let done = writing_done.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let finished = done.load(Ordering::SeqCst);
                        let batch = store.drain_outbox(now_ms(), 3).await.unwrap();
                        if batch.is_empty() {
                            if finished {
                                return got;
                            }
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                        got.extend(batch);
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..6)
            .map(|w| {
                let reservations = fx.reservations();
                let user = users[w % 3];
                let resource = resources[w % 2];
                tokio::spawn(async move {
                    for i in 0..6 {
                        let r = reservations
                            .reserve(user, resource, 1 + (i % 3), None, None)
                            .await
                            .unwrap();
                        if i % 2 == 0 {
                            reservations
                                .pay(user, r.id, "sandbox_ok", None)
                                .await
                                .unwrap();
                        }
                        if i % 3 == 0 {
                            reservations.cancel(user, r.id, None, None).await.unwrap();
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        writing_done.store(true, Ordering::SeqCst);
        let mut drained = Vec::new();
        for d in drainers {
            drained.extend(d.await.unwrap());
        }

        let rows = fx.count("SELECT COUNT(*) FROM outbox").await;
        assert_eq!(rows, 36 + 18 + 12, "reserve, pay, cancel");
        assert_eq!(
            fx.count("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .await,
            0
        );
        // Each outbox row became exactly two messages, and the drainers returned exactly what is stored.
        assert_eq!(drained.len() as i64, 2 * rows);
        assert_eq!(fx.count("SELECT COUNT(*) FROM rt_messages").await, 2 * rows);
        assert_eq!(
            fx.count("SELECT COUNT(DISTINCT outbox_id) FROM rt_messages")
                .await,
            rows
        );
        let keys: BTreeSet<(String, u64)> =
            drained.iter().map(|m| (m.room.clone(), m.seq)).collect();
        assert_eq!(keys.len(), drained.len(), "no (room, seq) twice");

        let store = fx.store();
        let mut rooms: Vec<String> = users.iter().map(|u| format!("user:{u}")).collect();
        rooms.extend(resources.iter().map(|r| format!("resource:{r}")));
        // Every room is gap-free from 1, and history agrees with what was returned.
        for room in &rooms {
            let head = store.last_seq(room).await.unwrap();
            let stored = store.range(room, 0, head).await.unwrap();
            assert_eq!(seqs(&stored), (1..=head).collect::<Vec<u64>>(), "{room}");
            let mut returned: Vec<_> = drained
                .iter()
                .filter(|m| &m.room == room)
                .cloned()
                .collect();
            returned.sort_by_key(|m| m.seq);
            assert_eq!(stored, returned, "{room}");
        }

        // Per reservation, both of its rooms show its transitions in the order they happened.
        let log =
            sqlx::query("SELECT reservation_id, to_state FROM reservation_events ORDER BY id")
                .fetch_all(fx.db.pool())
                .await
                .unwrap();
        let mut expected: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for row in &log {
            expected
                .entry(row.get(0))
                .or_default()
                .push(row.get::<String, _>(1));
        }
        for room in &rooms {
            let mut seen: BTreeMap<i64, Vec<String>> = BTreeMap::new();
            for (id, state, _) in timeline(&drained, room) {
                seen.entry(id).or_default().push(state);
            }
            for (id, states) in &seen {
                assert_eq!(states, &expected[id], "reservation {id} in {room}");
            }
        }
        let paid_after_reserved = expected
            .values()
            .filter(|s| s.starts_with(&["RESERVED".to_string(), "PAID".to_string()]))
            .count();
        assert_eq!(paid_after_reserved, 18);
    }

    async fn rows_pending_when_a_drainer_dies_are_published_by_the_next(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let resource = fx.resource(100).await;
        let reservations = fx.reservations();
        for i in 0..5 {
            let r = reservations
                .reserve(ann, resource, 1, None, None)
                .await
                .unwrap();
            if i < 2 {
                reservations
                    .pay(ann, r.id, "sandbox_ok", None)
                    .await
                    .unwrap();
            }
        }
        assert_eq!(fx.count("SELECT COUNT(*) FROM outbox").await, 7);

        // A drainer that took rows and died before committing: its locks and work go with its connection.
        {
            let mut conn = fx.db.pool().acquire().await.unwrap().detach();
            let begin = match fx.db.backend() {
                Backend::MySql => "BEGIN",
                Backend::Sqlite => "BEGIN IMMEDIATE",
            };
            let mut tx = conn.begin_with(begin).await.unwrap();
            let taken = outbox::take_pending(&mut tx, fx.db.dialect(), 3)
                .await
                .unwrap();
            assert_eq!(taken.len(), 3);
            sqlx::query("INSERT INTO rt_rooms (room, last_seq) VALUES ('user:1', 1)")
                .execute(&mut *tx)
                .await
                .unwrap();
            drop(tx);
            conn.close().await.unwrap();
        }
        // A process that published one batch and then died.
        let first = Store::new(fx.db.clone(), 1000, DAY)
            .drain_outbox(now_ms(), 2)
            .await
            .unwrap();
        assert_eq!(first.len(), 4);
        fx.db.close().await;

        // The restarted process: a new pool.
        let db = Db::connect(&fx.target, 4).await.unwrap();
        let restarted = Store::new(db.clone(), 1000, DAY);
        let rest = drain_all(&restarted, 2).await;
        assert_eq!(rest.len(), 10);
        let count = |sql: &'static str| {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(db.pool())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            count("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL").await,
            0
        );
        assert_eq!(count("SELECT COUNT(*) FROM rt_messages").await, 14);
        assert_eq!(
            count("SELECT COUNT(DISTINCT outbox_id) FROM rt_messages").await,
            7
        );
        let user_room = format!("user:{ann}");
        let head = restarted.last_seq(&user_room).await.unwrap();
        assert_eq!(head, 7, "the dead drainer's seq bump was rolled back");
        let states: Vec<String> = timeline(&[first, rest].concat(), &user_room)
            .into_iter()
            .map(|(_, s, _)| s)
            .collect();
        assert_eq!(
            states,
            ["RESERVED", "PAID", "RESERVED", "PAID", "RESERVED", "RESERVED", "RESERVED"]
        );
        db.close().await;
    }

    async fn reservation_frames_show_the_reservation_as_it_was_at_each_transition(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let resource = fx.resource(10).await;
        let reservations = fx.reservations();
        let first = reservations
            .reserve(ann, resource, 3, None, None)
            .await
            .unwrap();
        reservations
            .pay(ann, first.id, "sandbox_ok", None)
            .await
            .unwrap();
        reservations
            .cancel(ann, first.id, Some("changed plans"), None)
            .await
            .unwrap();
        let second = reservations
            .reserve(ann, resource, 2, None, None)
            .await
            .unwrap();
        let messages = drain_all(&fx.store(), 100).await;
        assert_eq!(messages.len(), 8);

        let user_room = format!("user:{ann}");
        let resource_room = format!("resource:{resource}");
        let by_seq = |room: &str| {
            let mut m: Vec<_> = messages
                .iter()
                .filter(|m| m.room == room)
                .cloned()
                .collect();
            m.sort_by_key(|m| m.seq);
            m
        };
        let mine = by_seq(&user_room);
        let res = by_seq(&resource_room);
        assert_eq!(
            timeline(&messages, &user_room)
                .iter()
                .map(|(id, s, a)| (*id, s.as_str(), *a))
                .collect::<Vec<_>>(),
            vec![
                (first.id, "RESERVED", None),
                (first.id, "PAID", None),
                (first.id, "CANCELLED", None),
                (second.id, "RESERVED", None),
            ]
        );
        assert_eq!(
            timeline(&messages, &resource_room)
                .iter()
                .map(|(_, s, a)| (s.as_str(), *a))
                .collect::<Vec<_>>(),
            vec![
                ("RESERVED", Some(7)),
                ("PAID", Some(7)),
                ("CANCELLED", Some(10)),
                ("RESERVED", Some(8)),
            ]
        );
        // The reservation as it was then: no payment while RESERVED, a payment once PAID, refunded once
        // cancelled.
        let at = |i: usize| mine[i].body["reservation"].clone();
        assert_eq!(at(0)["payment"], Value::Null);
        assert!(at(1)["payment"]["provider_ref"].is_string());
        assert_eq!(at(1)["payment"]["refunded_at"], Value::Null);
        assert!(at(2)["payment"]["refunded_at"].is_string());
        // …in exactly the HTTP API's shape.
        let api = |r: &crate::reservations::Reservation| serde_json::to_value(r).unwrap();
        assert_eq!(at(2), api(&reservations.get(ann, first.id).await.unwrap()));
        assert_eq!(at(3), api(&second));
        assert_eq!(at(0), api(&first));
        assert_eq!(res[3].body["reservation"], at(3));

        // Frames: `available` only in the resource room; the user room's body carries none.
        assert_eq!(
            res[3].to_frame().to_text(),
            json!({
                "type": "reservation",
                "room": resource_room,
                "seq": 4,
                "reservation": at(3),
                "available": 8,
            })
            .to_string()
        );
        assert!(!mine[3].to_frame().to_text().contains("available"));
        assert_eq!(mine[3].ack(None), None, "server events are not acked");

        // The outbox payload keeps its original fields next to the new ones.
        let payload = sqlx::query("SELECT payload FROM outbox ORDER BY id LIMIT 1")
            .fetch_one(fx.db.pool())
            .await
            .unwrap();
        let payload: Value =
            serde_json::from_str(&text_column(&payload, 0).unwrap().unwrap()).unwrap();
        for field in [
            "reservation_id",
            "resource_id",
            "user_id",
            "from",
            "to",
            "quantity",
            "at",
            "cause",
            "reservation",
            "available",
        ] {
            assert!(payload.get(field).is_some(), "{field} in {payload}");
        }
    }

    async fn an_outbox_row_without_a_realtime_payload_does_not_block_the_queue(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let resource = fx.resource(10).await;
        // Written by a version before payloads carried the reservation.
        crate::outbox::append(
            fx.db.pool(),
            &format!("user:{ann}"),
            crate::outbox::RESERVATION_KIND,
            &json!({ "reservation_id": 1, "resource_id": resource, "user_id": ann, "to": "RESERVED" }),
            now_ms(),
        )
        .await
        .unwrap();
        fx.reservations()
            .reserve(ann, resource, 1, None, None)
            .await
            .unwrap();
        let messages = drain_all(&fx.store(), 1).await;
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert_eq!(seqs(&messages), vec![1, 1]);
        assert_eq!(
            fx.count("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
                .await,
            0
        );
    }

    async fn the_schema_refuses_what_the_code_must_never_write(fx: &Fixture) {
        let ann = fx.user("ann@x.io").await;
        let store = fx.store();
        publish_n(&store, "chat:s", ann, 1, now_ms()).await;
        let refused = |sql: String| async move {
            let result = sqlx::query(&sql).execute(fx.db.pool()).await;
            assert!(result.is_err(), "accepted: {sql}");
        };
        let insert = "INSERT INTO rt_messages (room, seq, kind, user_id, client_msg_id, outbox_id, body, created_at) VALUES";
        // A second seq 1; a seq 0; a room without its counter row; an unknown kind; a client message
        // without its publisher; a server event with one; a body that is not JSON; a duplicate
        // client_msg_id; a negative head.
        refused(format!(
            "{insert} ('chat:s', 1, 'message', {ann}, 'other', NULL, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 0, 'message', {ann}, 'z', NULL, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:nope', 1, 'message', {ann}, 'z', NULL, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 5, 'typing', {ann}, 'z', NULL, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 5, 'message', NULL, 'z', NULL, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 5, 'reservation', {ann}, NULL, 1, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 5, 'message', {ann}, 'z', NULL, '{{nope', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 5, 'message', {ann}, 'chat:s-0', NULL, '1', 0)"
        ))
        .await;
        refused(format!(
            "{insert} ('chat:s', 5, 'message', 999999, 'z', NULL, '1', 0)"
        ))
        .await;
        refused("UPDATE rt_rooms SET last_seq = -1".to_string()).await;
        // The same outbox row twice in one room.
        sqlx::query(&format!(
            "{insert} ('chat:s', 2, 'reservation', NULL, NULL, 77, '{{}}', 0)"
        ))
        .execute(fx.db.pool())
        .await
        .unwrap();
        refused(format!(
            "{insert} ('chat:s', 3, 'reservation', NULL, NULL, 77, '{{}}', 0)"
        ))
        .await;
    }

    async fn cozy_sweep_purges_history_and_counts_it(fx: &Fixture) {
        use crate::idempotency::IdempotencyStore;
        use crate::reservations::sweep::Sweeper;
        let ann = fx.user("ann@x.io").await;
        let history = Store::new(fx.db.clone(), 2, Duration::from_secs(60));
        publish_n(&history, "chat:s", ann, 5, now_ms() - 120_000).await;
        let reservations = fx.reservations();
        let idempotency = IdempotencyStore::new(fx.db.clone(), Duration::from_secs(60));
        let sweeper = Sweeper {
            reservations: &reservations,
            idempotency: &idempotency,
            history: &history,
            idempotency_retention_ms: 3_600_000,
            batch: 100,
        };
        let dry = sweeper.run(true).await.unwrap();
        assert_eq!(dry.messages_purged, 3);
        assert_eq!(history.range("chat:s", 0, 5).await.unwrap().len(), 5);
        let real = sweeper.run(false).await.unwrap();
        assert_eq!(real.messages_purged, 3);
        assert_eq!(
            seqs(&history.range("chat:s", 0, 5).await.unwrap()),
            vec![4, 5]
        );
        let json = serde_json::to_value(&real).unwrap();
        assert_eq!(json["messages_purged"], 3);
    }

    // ---------------------------------------------------------------- pure

    #[test]
    fn a_message_becomes_the_contract_frame_and_ack() {
        let m = StoredMessage {
            id: 41,
            room: "chat:a".into(),
            seq: 7,
            kind: Kind::Message,
            user_id: Some(3),
            client_msg_id: Some("c-9".into()),
            body: json!({ "text": "hi" }),
            created_at: 1_764_000_000_123,
        };
        assert_eq!(
            m.to_frame().to_text(),
            r#"{"type":"message","room":"chat:a","seq":7,"id":41,"user_id":3,"client_msg_id":"c-9","body":{"text":"hi"},"ts":"2025-11-24T16:00:00.123Z"}"#
        );
        assert_eq!(
            m.ack(Some("r1".into())).unwrap().to_text(),
            r#"{"type":"ack","client_msg_id":"c-9","seq":7,"ts":"2025-11-24T16:00:00.123Z","ref":"r1"}"#
        );
    }

    #[test]
    fn an_outbox_row_plans_one_message_per_room_and_only_the_resource_room_has_available() {
        let row = Pending {
            id: 5,
            topic: "user:3".into(),
            kind: "reservation".into(),
            payload: json!({
                "reservation_id": 9, "resource_id": 2, "user_id": 3, "from": null, "to": "RESERVED",
                "reservation": { "id": 9, "state": "RESERVED" }, "available": 4, "future_field": true,
            })
            .to_string(),
        };
        assert_eq!(
            plan(&row),
            vec![
                Planned {
                    outbox_id: 5,
                    room: "user:3".into(),
                    body: json!({ "reservation": { "id": 9, "state": "RESERVED" } }),
                },
                Planned {
                    outbox_id: 5,
                    room: "resource:2".into(),
                    body: json!({ "reservation": { "id": 9, "state": "RESERVED" }, "available": 4 }),
                },
            ]
        );
        let other = Pending {
            kind: "email".into(),
            ..row.clone()
        };
        assert!(plan(&other).is_empty());
        let legacy = Pending {
            payload: r#"{"reservation_id":9,"resource_id":2,"user_id":3}"#.into(),
            ..row
        };
        assert!(plan(&legacy).is_empty());
    }
}
