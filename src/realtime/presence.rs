//! Who is in a room: per user, cluster-wide, with expiry so a dead worker's connections leave.
//!
//! The contract (realtime-protocol.md) counts presence per *user*: two tabs are one member with
//! `connections: 2`, and the user leaves only when the last connection is gone — closed, dropped for
//! missed heartbeats, or held by a worker that was killed. This module keeps that state and computes
//! the transitions ([`Change`]); the announcer (`announce.rs`) turns them into `presence` frames
//! ([`presence_frames`]), at most one per room every 50 ms, and broadcasts them. It does no I/O besides its store and knows nothing of sockets.
//!
//! # Shape of the state
//! Every connection is an entry `(room, user, conn)` with an expiry instant. A worker refreshes the
//! entries of its live connections every heartbeat ([`Presence::refresh`]); entries of a killed
//! worker stop being refreshed, and whichever worker next runs [`Presence::expire`] on the room removes
//! them and reports the leaves. Each transition (a connection added or removed) is reported to exactly
//! one caller, so two workers never both — or neither — announce the same join or leave.
//!
//! # Redis layout, and why
//! Per room two keys, both with the room in a hash tag (`{…}`) so they live in one slot:
//! - `<prefix>:{<room>}:conns`, a ZSET of `"<user>:<conn>"` scored by expiry (ms). Expiry as the score
//!   makes "everything that expired by `now`" one range query.
//! - `<prefix>:{<room>}:users`, a HASH user → number of that user's entries in the ZSET. It is what has
//!   been announced; keeping it next to the ZSET makes "was that this user's last connection?" O(1).
//!
//! Every mutation is a Lua script (sent as EVALSHA by [`redis::Script`]), so the ZSET and the HASH change
//! together and the check ("was this member new? was it still there?") and the write are one atomic
//! step: that is what lets five workers call `expire` at once and have each removal reported once.
//! Mutations that add or extend entries also `PEXPIRE` both keys to 10 × ttl, so a room nobody touches
//! any more (every worker gone) vanishes from Redis by itself; both keys get the same deadline inside
//! one script, so they vanish together.
//!
//! `now` is passed in rather than read from Redis's clock so tests can drive time. In production every
//! worker passes its own wall clock: clock skew between hosts eats into the ttl, so the ttl should be
//! several heartbeat intervals (it is by default) and far above the skew.
//!
//! A `refresh` of one worker's connections goes out as one script call per [`REFRESH_CHUNK`] entries,
//! all sent at once over the multiplexed connection (one round trip), so a worker with 10 000
//! connections neither pays 10 000 round trips nor blocks Redis for one long script. That script
//! touches several rooms' keys, which a Redis *Cluster* would refuse (CROSSSLOT); cozy talks to a
//! single Redis (sessions do too), and grouping the chunks by room would be the change if that moves.
//!
//! # The embedded default
//! [`Presence::local`] keeps the same state in memory behind a mutex, for the single-process setup
//! without Redis. Same semantics, same tests (every test below runs against both).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use crate::realtime::frames::{PresenceEntry, PresenceLeave, ServerFrame};
use crate::time::{now_ms, Millis};

/// A user's connection count in a room changed; `connections == 0` means they left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub room: String,
    pub user_id: i64,
    pub connections: u32,
}

impl Change {
    pub fn is_leave(&self) -> bool {
        self.connections == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence store (redis): {0}")]
    Redis(#[from] redis::RedisError),
    /// A script answered something it never returns: the keys were written by something else.
    #[error("presence store (redis) returned an unexpected reply: {0}")]
    UnexpectedReply(String),
}

/// The key prefix used outside tests.
pub const DEFAULT_PREFIX: &str = "cozy:presence";

/// Entries per refresh script call: bounds how long one call holds Redis (a few ms).
pub const REFRESH_CHUNK: usize = 1000;

/// Redis keys live this many ttls after the last join or refresh of their room.
const KEY_LIFETIME_TTLS: i64 = 10;

/// Per-user presence per room, in Redis (cluster-wide) or in memory (one process).
///
/// Cheap to clone: clones share the connection (Redis) or the state (memory).
#[derive(Clone)]
pub struct Presence {
    ttl_ms: Millis,
    store: Store,
}

#[derive(Clone)]
enum Store {
    Redis {
        conn: ConnectionManager,
        prefix: Arc<str>,
    },
    Local(Arc<Mutex<HashMap<String, LocalRoom>>>),
}

impl Presence {
    /// Cluster-wide presence in the Redis at `url`; an entry lives `ttl` unless refreshed.
    pub async fn redis(url: &str, ttl: Duration) -> Result<Presence, PresenceError> {
        Self::redis_with_prefix(url, ttl, DEFAULT_PREFIX).await
    }

    /// As [`Presence::redis`], with every key under `prefix` (tests use a unique one each).
    pub async fn redis_with_prefix(
        url: &str,
        ttl: Duration,
        prefix: &str,
    ) -> Result<Presence, PresenceError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(3)));
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Presence {
            ttl_ms: ttl_ms(ttl),
            store: Store::Redis {
                conn,
                prefix: prefix.into(),
            },
        })
    }

    /// Presence in this process's memory (the embedded default, no Redis): same semantics.
    pub fn local(ttl: Duration) -> Presence {
        Presence {
            ttl_ms: ttl_ms(ttl),
            store: Store::Local(Arc::default()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.store {
            Store::Redis { .. } => "redis",
            Store::Local(_) => "memory",
        }
    }

    /// How long an entry lives without a refresh; refresh well within it (e.g. every heartbeat).
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms as u64)
    }

    /// Adds connection `conn` of `user_id` to `room`, expiring `ttl` after `now` unless refreshed.
    /// Returns the user's new count, or `None` if this connection was already there (its expiry is
    /// extended all the same).
    pub async fn join(
        &self,
        room: &str,
        user_id: i64,
        conn: &str,
        now: Millis,
    ) -> Result<Option<Change>, PresenceError> {
        let expires_at = now + self.ttl_ms;
        let count = match &self.store {
            Store::Redis {
                conn: redis,
                prefix,
            } => {
                let keys = RoomKeys::new(prefix, room);
                let count: Option<i64> = JOIN
                    .key(&keys.conns)
                    .key(&keys.users)
                    .arg(member(user_id, conn))
                    .arg(user_id)
                    .arg(expires_at)
                    .arg(self.key_lifetime_ms())
                    .invoke_async(&mut redis.clone())
                    .await?;
                count.map(to_count).transpose()?
            }
            Store::Local(rooms) => {
                let mut rooms = rooms.lock().expect("presence lock");
                rooms
                    .entry(room.to_string())
                    .or_default()
                    .add(user_id, conn, expires_at)
            }
        };
        Ok(count.map(|connections| Change {
            room: room.to_string(),
            user_id,
            connections,
        }))
    }

    /// Removes connection `conn` of `user_id` from `room`. Returns the user's new count (0: they
    /// left), or `None` if the connection was not there (never joined, or already expired and
    /// reported by [`Presence::expire`]).
    pub async fn leave(
        &self,
        room: &str,
        user_id: i64,
        conn: &str,
    ) -> Result<Option<Change>, PresenceError> {
        let count = match &self.store {
            Store::Redis {
                conn: redis,
                prefix,
            } => {
                let keys = RoomKeys::new(prefix, room);
                let count: Option<i64> = LEAVE
                    .key(&keys.conns)
                    .key(&keys.users)
                    .arg(member(user_id, conn))
                    .arg(user_id)
                    .invoke_async(&mut redis.clone())
                    .await?;
                count.map(to_count).transpose()?
            }
            Store::Local(rooms) => {
                let mut rooms = rooms.lock().expect("presence lock");
                let count = rooms.get_mut(room).and_then(|r| r.remove(user_id, conn));
                drop_if_empty(&mut rooms, room);
                count
            }
        };
        Ok(count.map(|connections| Change {
            room: room.to_string(),
            user_id,
            connections,
        }))
    }

    /// Heartbeat for this worker's live connections `(room, user_id, conn)`: pushes their expiry to
    /// `now + ttl`. An entry that had already expired and been removed (its leave announced) is added
    /// back and reported as a join. At most one change per `(room, user)`, with the final count.
    ///
    /// Take `entries` so that it cannot include a connection whose `leave` already ran, or that
    /// connection comes back for one ttl.
    pub async fn refresh(
        &self,
        entries: &[(String, i64, String)],
        now: Millis,
    ) -> Result<Vec<Change>, PresenceError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let expires_at = now + self.ttl_ms;
        // Sorted by room so that a chunk names few rooms (few KEYS) and a user's entries sit together.
        let mut sorted: Vec<&(String, i64, String)> = entries.iter().collect();
        sorted.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let changes = match &self.store {
            Store::Redis { conn, prefix } => {
                let calls =
                    sorted.chunks(REFRESH_CHUNK).map(|chunk| {
                        let mut conn = conn.clone();
                        let lifetime = self.key_lifetime_ms();
                        async move {
                            refresh_chunk(&mut conn, prefix, chunk, expires_at, lifetime).await
                        }
                    });
                // All chunks are queued on the one multiplexed connection before any reply is read.
                let replies = futures::future::try_join_all(calls).await?;
                replies.into_iter().flatten().collect()
            }
            Store::Local(rooms) => {
                let mut rooms = rooms.lock().expect("presence lock");
                let mut changes = Vec::new();
                for (room, user_id, conn) in sorted {
                    let state = rooms.entry(room.clone()).or_default();
                    if let Some(connections) = state.add(*user_id, conn, expires_at) {
                        changes.push(Change {
                            room: room.clone(),
                            user_id: *user_id,
                            connections,
                        });
                    }
                }
                changes
            }
        };
        Ok(last_per_user(changes))
    }

    /// Removes the connections of `room` whose expiry is at or before `now` (a killed worker's, or
    /// ones whose worker missed its refreshes) and returns the changes: one per affected user, with
    /// the count left (0: they left). Safe to call from every worker at once: each removal is
    /// reported to exactly one caller.
    pub async fn expire(&self, room: &str, now: Millis) -> Result<Vec<Change>, PresenceError> {
        let counts: Vec<(i64, u32)> = match &self.store {
            Store::Redis { conn, prefix } => {
                let keys = RoomKeys::new(prefix, room);
                let reply: Vec<String> = EXPIRE
                    .key(&keys.conns)
                    .key(&keys.users)
                    .arg(now)
                    .invoke_async(&mut conn.clone())
                    .await?;
                pairs(&reply)?
            }
            Store::Local(rooms) => {
                let mut rooms = rooms.lock().expect("presence lock");
                let counts = rooms
                    .get_mut(room)
                    .map(|r| r.expire(now))
                    .unwrap_or_default();
                drop_if_empty(&mut rooms, room);
                counts
            }
        };
        Ok(counts
            .into_iter()
            .map(|(user_id, connections)| Change {
                room: room.to_string(),
                user_id,
                connections,
            })
            .collect())
    }

    /// The room's members with their live connection counts, sorted by user (for `subscribed`).
    pub async fn snapshot(&self, room: &str) -> Result<Vec<PresenceEntry>, PresenceError> {
        self.snapshot_at(room, now_ms()).await
    }

    /// [`Presence::snapshot`] as of `now`: entries expiring after `now` count. Reads only: an expired
    /// entry not yet removed is left out here, and its leave is still reported by the next
    /// [`Presence::expire`].
    pub async fn snapshot_at(
        &self,
        room: &str,
        now: Millis,
    ) -> Result<Vec<PresenceEntry>, PresenceError> {
        let mut counts: BTreeMap<i64, u32> = BTreeMap::new();
        match &self.store {
            Store::Redis { conn, prefix } => {
                let keys = RoomKeys::new(prefix, room);
                let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                    .arg(&keys.conns)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(&mut conn.clone())
                    .await?;
                for m in &members {
                    *counts.entry(member_user(m)?).or_default() += 1;
                }
            }
            Store::Local(rooms) => {
                let rooms = rooms.lock().expect("presence lock");
                if let Some(state) = rooms.get(room) {
                    for ((user, _), expires_at) in &state.conns {
                        if *expires_at > now {
                            *counts.entry(*user).or_default() += 1;
                        }
                    }
                }
            }
        }
        Ok(counts
            .into_iter()
            .map(|(user_id, connections)| PresenceEntry {
                user_id,
                connections,
            })
            .collect())
    }

    fn key_lifetime_ms(&self) -> Millis {
        self.ttl_ms.saturating_mul(KEY_LIFETIME_TTLS)
    }
}

/// The `presence` frames for `changes`, one per room (in the order rooms first appear): a count
/// above 0 is in `joins` (a new member or a new count), 0 is a leave.
pub fn presence_frames(changes: &[Change]) -> Vec<ServerFrame> {
    let mut frames: Vec<ServerFrame> = Vec::new();
    for change in changes {
        let existing = frames
            .iter()
            .position(|f| matches!(f, ServerFrame::Presence { room, .. } if *room == change.room));
        let index = existing.unwrap_or_else(|| {
            frames.push(ServerFrame::Presence {
                room: change.room.clone(),
                joins: Vec::new(),
                leaves: Vec::new(),
            });
            frames.len() - 1
        });
        let ServerFrame::Presence { joins, leaves, .. } = &mut frames[index] else {
            unreachable!("only presence frames are pushed");
        };
        if change.is_leave() {
            leaves.push(PresenceLeave {
                user_id: change.user_id,
            });
        } else {
            joins.push(PresenceEntry {
                user_id: change.user_id,
                connections: change.connections,
            });
        }
    }
    frames
}

fn ttl_ms(ttl: Duration) -> Millis {
    (ttl.as_millis() as Millis).max(1)
}

/// Keeps only the last change of each `(room, user)`, in first-seen order.
pub(crate) fn last_per_user(changes: Vec<Change>) -> Vec<Change> {
    let mut index: HashMap<(String, i64), usize> = HashMap::new();
    let mut out: Vec<Change> = Vec::with_capacity(changes.len());
    for change in changes {
        match index.get(&(change.room.clone(), change.user_id)) {
            Some(&i) => out[i] = change,
            None => {
                index.insert((change.room.clone(), change.user_id), out.len());
                out.push(change);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

struct RoomKeys {
    conns: String,
    users: String,
}

impl RoomKeys {
    /// The braces are a Redis hash tag: both keys of a room hash to the same slot.
    fn new(prefix: &str, room: &str) -> RoomKeys {
        RoomKeys {
            conns: format!("{prefix}:{{{room}}}:conns"),
            users: format!("{prefix}:{{{room}}}:users"),
        }
    }
}

/// A ZSET member; the user id comes first and never contains `:`, so `conn` may.
fn member(user_id: i64, conn: &str) -> String {
    format!("{user_id}:{conn}")
}

fn member_user(member: &str) -> Result<i64, PresenceError> {
    member
        .split_once(':')
        .and_then(|(user, _)| user.parse().ok())
        .ok_or_else(|| PresenceError::UnexpectedReply(format!("presence member {member:?}")))
}

fn to_count(n: i64) -> Result<u32, PresenceError> {
    u32::try_from(n).map_err(|_| PresenceError::UnexpectedReply(format!("count {n}")))
}

/// `[user, count, user, count, …]` as the scripts return them.
fn pairs(reply: &[String]) -> Result<Vec<(i64, u32)>, PresenceError> {
    if reply.len() % 2 != 0 {
        return Err(PresenceError::UnexpectedReply(format!("{reply:?}")));
    }
    reply
        .chunks(2)
        .map(|pair| {
            let user = pair[0].parse::<i64>().ok();
            let count = pair[1].parse::<u32>().ok();
            user.zip(count)
                .ok_or_else(|| PresenceError::UnexpectedReply(format!("{pair:?}")))
        })
        .collect()
}

/// ARGV: member, user, expires_at, key lifetime (ms). Returns the user's new count if the member was
/// new, else nil (its expiry is updated either way).
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local count = false
if redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1]) == 1 then
  count = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return count
"#,
    )
});

/// ARGV: member, user. Returns the user's new count if the member was there, else nil.
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return false
end
local count = redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
if count <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  count = 0
end
return count
"#,
    )
});

/// ARGV: now. Removes every member scored at or before `now`; returns `[user, count left, …]`, one
/// pair per affected user, as strings.
static EXPIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #gone == 0 then
  return {}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local order, counts = {}, {}
for _, m in ipairs(gone) do
  local user = string.match(m, '^([^:]*):')
  if counts[user] == nil then
    order[#order + 1] = user
  end
  counts[user] = redis.call('HINCRBY', KEYS[2], user, -1)
end
local out = {}
for _, user in ipairs(order) do
  local count = counts[user]
  if count <= 0 then
    redis.call('HDEL', KEYS[2], user)
    count = 0
  end
  out[#out + 1] = user
  out[#out + 1] = tostring(count)
end
return out
"#,
    )
});

/// KEYS: conns and users key of room 1, of room 2, …
/// ARGV: expires_at, key lifetime, then `room index (1-based), user, conn` per entry.
/// Returns `[room index, user, new count, …]` (strings) for each entry that was not there.
static REFRESH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local expires_at, lifetime = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 3 do
  local r = tonumber(ARGV[i])
  local user = ARGV[i + 1]
  if redis.call('ZADD', KEYS[2 * r - 1], expires_at, user .. ':' .. ARGV[i + 2]) == 1 then
    out[#out + 1] = ARGV[i]
    out[#out + 1] = user
    out[#out + 1] = tostring(redis.call('HINCRBY', KEYS[2 * r], user, 1))
  end
end
for k = 1, #KEYS do
  redis.call('PEXPIRE', KEYS[k], lifetime)
end
return out
"#,
    )
});

/// One REFRESH call for `chunk` (sorted by room).
async fn refresh_chunk(
    conn: &mut ConnectionManager,
    prefix: &str,
    chunk: &[&(String, i64, String)],
    expires_at: Millis,
    key_lifetime: Millis,
) -> Result<Vec<Change>, PresenceError> {
    let mut rooms: Vec<&str> = Vec::new();
    let mut invocation = REFRESH.prepare_invoke();
    invocation.arg(expires_at).arg(key_lifetime);
    for (room, user_id, conn_id) in chunk {
        if rooms.last() != Some(&room.as_str()) {
            rooms.push(room);
            let keys = RoomKeys::new(prefix, room);
            invocation.key(keys.conns).key(keys.users);
        }
        invocation.arg(rooms.len()).arg(*user_id).arg(conn_id);
    }
    let reply: Vec<String> = invocation.invoke_async(conn).await?;
    if reply.len() % 3 != 0 {
        return Err(PresenceError::UnexpectedReply(format!("{reply:?}")));
    }
    reply
        .chunks(3)
        .map(|t| {
            let room = t[0]
                .parse::<usize>()
                .ok()
                .and_then(|i| rooms.get(i.checked_sub(1)?));
            let user = t[1].parse::<i64>().ok();
            let count = t[2].parse::<u32>().ok();
            match (room, user, count) {
                (Some(room), Some(user_id), Some(connections)) => Ok(Change {
                    room: room.to_string(),
                    user_id,
                    connections,
                }),
                _ => Err(PresenceError::UnexpectedReply(format!("{t:?}"))),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// One room in memory: the same two structures as the Redis keys.
#[derive(Default)]
struct LocalRoom {
    conns: HashMap<(i64, String), Millis>,
    users: HashMap<i64, u32>,
}

impl LocalRoom {
    /// The user's new count if the connection is new; else extends its expiry and returns `None`.
    fn add(&mut self, user_id: i64, conn: &str, expires_at: Millis) -> Option<u32> {
        match self.conns.insert((user_id, conn.to_string()), expires_at) {
            Some(_) => None,
            None => {
                let count = self.users.entry(user_id).or_default();
                *count += 1;
                Some(*count)
            }
        }
    }

    fn remove(&mut self, user_id: i64, conn: &str) -> Option<u32> {
        self.conns.remove(&(user_id, conn.to_string()))?;
        Some(self.decrement(user_id))
    }

    fn decrement(&mut self, user_id: i64) -> u32 {
        let count = self
            .users
            .get(&user_id)
            .copied()
            .unwrap_or(0)
            .saturating_sub(1);
        if count == 0 {
            self.users.remove(&user_id);
        } else {
            self.users.insert(user_id, count);
        }
        count
    }

    /// Removes entries expiring at or before `now`: `(user, count left)` per affected user.
    fn expire(&mut self, now: Millis) -> Vec<(i64, u32)> {
        let mut gone: Vec<i64> = Vec::new();
        self.conns.retain(|(user, _), expires_at| {
            let live = *expires_at > now;
            if !live {
                gone.push(*user);
            }
            live
        });
        let mut counts: BTreeMap<i64, u32> = BTreeMap::new();
        for user in gone {
            let left = self.decrement(user);
            counts.insert(user, left);
        }
        counts.into_iter().collect()
    }
}

fn drop_if_empty(rooms: &mut HashMap<String, LocalRoom>, room: &str) {
    if rooms.get(room).is_some_and(|r| r.conns.is_empty()) {
        rooms.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Instant;

    const TTL: Duration = Duration::from_secs(30);
    const TTL_MS: Millis = 30_000;
    /// A fixed "now": the tests drive time themselves.
    const T0: Millis = 1_800_000_000_000;

    /// Where a test's presence lives; `worker()` is another handle onto the same state, as a second
    /// worker process would have (its own Redis connection; for memory, the same map).
    enum Backend {
        Redis { url: String, prefix: String },
        Local(Presence),
    }

    impl Backend {
        fn redis() -> Backend {
            let url = std::env::var("COZY_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let prefix = format!("cozy-test:presence:{:016x}", rand::random::<u64>());
            Backend::Redis { url, prefix }
        }

        fn local() -> Backend {
            Backend::Local(Presence::local(TTL))
        }

        async fn worker(&self) -> Presence {
            match self {
                Backend::Redis { url, prefix } => Presence::redis_with_prefix(url, TTL, prefix)
                    .await
                    .expect("test redis (COZY_TEST_REDIS_URL; see scripts/ensure-services)"),
                Backend::Local(p) => p.clone(),
            }
        }
    }

    /// Each test body runs twice: `<name>::redis` and `<name>::local`.
    macro_rules! on_both_backends {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn redis() {
                    super::$name(super::Backend::redis()).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn local() {
                    super::$name(super::Backend::local()).await
                }
            }
        )*};
    }

    on_both_backends!(
        two_tabs_are_one_member_who_leaves_with_the_last_tab,
        joining_the_same_connection_twice_reports_nothing_the_second_time,
        a_killed_workers_connections_expire_and_each_leave_is_reported_once,
        refresh_keeps_entries_alive_and_brings_expired_ones_back_as_joins,
        snapshot_is_sorted_by_user_and_leaves_out_expired_entries,
        concurrent_joins_count_exactly,
        refreshing_ten_thousand_connections_is_one_quick_batch,
    );

    fn change(room: &str, user_id: i64, connections: u32) -> Change {
        Change {
            room: room.into(),
            user_id,
            connections,
        }
    }

    fn entry(user_id: i64, connections: u32) -> PresenceEntry {
        PresenceEntry {
            user_id,
            connections,
        }
    }

    async fn two_tabs_are_one_member_who_leaves_with_the_last_tab(b: Backend) {
        let p = b.worker().await;
        let room = "chat:lobby";
        assert_eq!(
            p.join(room, 7, "tab-a", T0).await.unwrap(),
            Some(change(room, 7, 1))
        );
        assert_eq!(
            p.join(room, 7, "tab-b", T0).await.unwrap(),
            Some(change(room, 7, 2))
        );
        assert_eq!(p.snapshot_at(room, T0).await.unwrap(), vec![entry(7, 2)]);

        assert_eq!(
            p.leave(room, 7, "tab-a").await.unwrap(),
            Some(change(room, 7, 1))
        );
        assert_eq!(p.snapshot_at(room, T0).await.unwrap(), vec![entry(7, 1)]);
        let last = p.leave(room, 7, "tab-b").await.unwrap().unwrap();
        assert!(last.is_leave(), "{last:?}");
        assert_eq!(last, change(room, 7, 0));
        assert_eq!(p.snapshot_at(room, T0).await.unwrap(), vec![]);
        // Gone is gone: a second leave of the same tab reports nothing.
        assert_eq!(p.leave(room, 7, "tab-b").await.unwrap(), None);
        // And an expire later finds nothing left to report.
        assert_eq!(p.expire(room, T0 + 10 * TTL_MS).await.unwrap(), vec![]);
    }

    async fn joining_the_same_connection_twice_reports_nothing_the_second_time(b: Backend) {
        let p = b.worker().await;
        let room = "resource:3";
        assert_eq!(
            p.join(room, 1, "c1", T0).await.unwrap(),
            Some(change(room, 1, 1))
        );
        assert_eq!(p.join(room, 1, "c1", T0 + 1000).await.unwrap(), None);
        assert_eq!(p.snapshot_at(room, T0).await.unwrap(), vec![entry(1, 1)]);
        // The second join extended the expiry: alive just past the first deadline.
        assert_eq!(p.expire(room, T0 + TTL_MS + 500).await.unwrap(), vec![]);
        // The same conn id of another user, or in another room, is another entry.
        assert_eq!(
            p.join(room, 2, "c1", T0).await.unwrap(),
            Some(change(room, 2, 1))
        );
        assert_eq!(
            p.join("resource:4", 1, "c1", T0).await.unwrap(),
            Some(change("resource:4", 1, 1))
        );
    }

    async fn a_killed_workers_connections_expire_and_each_leave_is_reported_once(b: Backend) {
        let killed = b.worker().await;
        let alive = b.worker().await;
        // Many rooms, so that a non-atomic expire gets many chances to double-report.
        let rooms: Vec<String> = (0..20).map(|i| format!("chat:r{i}")).collect();
        for room in &rooms {
            // The killed worker held user 1 (three tabs), user 2 (one) and one of user 3's two tabs.
            for tab in ["a", "b", "c"] {
                killed
                    .join(room, 1, &format!("k-1{tab}"), T0)
                    .await
                    .unwrap();
            }
            killed.join(room, 2, "k-2", T0).await.unwrap();
            killed.join(room, 3, "k-3", T0).await.unwrap();
            // The live worker joined user 3's other tab later and keeps refreshing it.
            alive.join(room, 3, "a-3", T0 + TTL_MS / 2).await.unwrap();
        }
        // Not yet: nothing has expired at the deadline's last instant before.
        assert_eq!(
            alive.expire(&rooms[0], T0 + TTL_MS - 1).await.unwrap(),
            vec![]
        );

        let after = T0 + TTL_MS + 1;
        let barrier = Arc::new(tokio::sync::Barrier::new(5));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let worker = b.worker().await;
            let barrier = barrier.clone();
            let rooms = rooms.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut seen = Vec::new();
                for room in &rooms {
                    seen.extend(worker.expire(room, after).await.unwrap());
                }
                seen
            }));
        }
        let mut reported = Vec::new();
        for task in tasks {
            reported.extend(task.await.unwrap());
        }
        reported.sort_by(|a, b| (&a.room, a.user_id).cmp(&(&b.room, b.user_id)));
        let mut expected = Vec::new();
        for room in &rooms {
            expected.push(change(room, 1, 0));
            expected.push(change(room, 2, 0));
            expected.push(change(room, 3, 1));
        }
        expected.sort_by(|a, b| (&a.room, a.user_id).cmp(&(&b.room, b.user_id)));
        assert_eq!(reported, expected);

        for room in &rooms {
            assert_eq!(
                alive.snapshot_at(room, after).await.unwrap(),
                vec![entry(3, 1)]
            );
        }
        // The killed worker's tab was reported already: a late leave for it is not a second leave.
        assert_eq!(killed.leave(&rooms[0], 2, "k-2").await.unwrap(), None);
        let last = alive.leave(&rooms[0], 3, "a-3").await.unwrap();
        assert_eq!(last, Some(change(&rooms[0], 3, 0)));
    }

    async fn refresh_keeps_entries_alive_and_brings_expired_ones_back_as_joins(b: Backend) {
        let p = b.worker().await;
        let other = b.worker().await;
        let (room, other_room) = ("chat:refresh", "user:9");
        p.join(room, 5, "c5", T0).await.unwrap();
        p.join(other_room, 9, "c9", T0).await.unwrap();
        let mine = vec![
            (room.to_string(), 5, "c5".to_string()),
            (other_room.to_string(), 9, "c9".to_string()),
        ];

        // Refreshed halfway: still present a whole ttl after the original deadline.
        assert_eq!(p.refresh(&mine, T0 + TTL_MS / 2).await.unwrap(), vec![]);
        let past_first_deadline = T0 + TTL_MS + 1;
        assert_eq!(
            other.expire(room, past_first_deadline).await.unwrap(),
            vec![]
        );
        assert_eq!(
            other.snapshot_at(room, past_first_deadline).await.unwrap(),
            vec![entry(5, 1)]
        );

        // This worker stalls past its expiry; another worker removes it and announces the leave.
        let late = T0 + 3 * TTL_MS;
        assert_eq!(
            other.expire(room, late).await.unwrap(),
            vec![change(room, 5, 0)]
        );
        assert_eq!(other.snapshot_at(room, late).await.unwrap(), vec![]);
        // Its next heartbeat brings the connection back, announced as a join; user 9's entry had
        // expired too but was never removed, so it is only extended (no change to announce).
        assert_eq!(
            p.refresh(&mine, late).await.unwrap(),
            vec![change(room, 5, 1)]
        );
        assert_eq!(
            other.snapshot_at(room, late).await.unwrap(),
            vec![entry(5, 1)]
        );
        assert_eq!(other.expire(other_room, late).await.unwrap(), vec![]);

        // Two tabs of one user both brought back: one change, with the final count.
        let tabs = vec![
            ("chat:tabs".to_string(), 6, "t1".to_string()),
            ("chat:tabs".to_string(), 6, "t2".to_string()),
        ];
        assert_eq!(
            p.refresh(&tabs, late).await.unwrap(),
            vec![change("chat:tabs", 6, 2)]
        );
        assert_eq!(p.refresh(&[], late).await.unwrap(), vec![]);
    }

    async fn snapshot_is_sorted_by_user_and_leaves_out_expired_entries(b: Backend) {
        let p = b.worker().await;
        let room = "chat:snap";
        let now = T0 + TTL_MS + 10;
        // Expired but not yet removed by expire: user 40 entirely, and one of user 20's tabs.
        p.join(room, 40, "old", T0).await.unwrap();
        p.join(room, 20, "old", T0).await.unwrap();
        for (user, conn) in [(30, "x"), (10, "y"), (20, "z"), (-1, "neg")] {
            p.join(room, user, conn, T0 + 20).await.unwrap();
        }
        p.join(room, 10, "y2", T0 + 20).await.unwrap();
        assert_eq!(
            p.snapshot_at(room, now).await.unwrap(),
            vec![entry(-1, 1), entry(10, 2), entry(20, 1), entry(30, 1)]
        );
        // A snapshot reads only: the expired entries are still there to be reported once.
        assert_eq!(
            p.expire(room, now).await.unwrap().len(),
            2,
            "users 20 (down to 1) and 40 (gone)"
        );
        assert_eq!(p.snapshot_at("chat:empty", now).await.unwrap(), vec![]);
    }

    async fn concurrent_joins_count_exactly(b: Backend) {
        let room = "chat:crowd";
        let mut workers = Vec::new();
        for _ in 0..5 {
            workers.push(b.worker().await);
        }
        // 50 connections of 10 users, spread so each user's tabs join through different workers.
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let mut tasks = Vec::new();
        for i in 0..50i64 {
            let p = workers[(i % 5) as usize].clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                p.join(room, i % 10, &format!("c{i}"), T0).await.unwrap()
            }));
        }
        let mut seen: HashMap<i64, Vec<u32>> = HashMap::new();
        for task in tasks {
            let c = task
                .await
                .unwrap()
                .expect("every new connection is a change");
            seen.entry(c.user_id).or_default().push(c.connections);
        }
        assert_eq!(seen.len(), 10);
        for (user, mut counts) in seen {
            counts.sort_unstable();
            // Each step 1..=5 seen by exactly one joiner: no lost or doubled increments.
            assert_eq!(counts, vec![1, 2, 3, 4, 5], "user {user}");
        }
        let expected: Vec<_> = (0..10).map(|u| entry(u, 5)).collect();
        assert_eq!(workers[0].snapshot_at(room, T0).await.unwrap(), expected);

        // And back down concurrently: each user's leave (count 0) is reported exactly once.
        let mut tasks = Vec::new();
        for i in 0..50i64 {
            let p = workers[(i % 5) as usize].clone();
            tasks.push(tokio::spawn(async move {
                p.leave(room, i % 10, &format!("c{i}")).await.unwrap()
            }));
        }
        let mut leaves = HashSet::new();
        for task in tasks {
            let c = task.await.unwrap().unwrap();
            if c.is_leave() {
                assert!(leaves.insert(c.user_id), "user {} left twice", c.user_id);
            }
        }
        assert_eq!(leaves.len(), 10);
        assert_eq!(workers[1].snapshot_at(room, T0).await.unwrap(), vec![]);
    }

    async fn refreshing_ten_thousand_connections_is_one_quick_batch(b: Backend) {
        let p = b.worker().await;
        // One worker's connections: 10 000 across 200 rooms, 2 000 users with several tabs each.
        let entries: Vec<(String, i64, String)> = (0..10_000i64)
            .map(|i| (format!("chat:big{}", i % 200), i % 2000, format!("c{i}")))
            .collect();
        let pairs: HashSet<(String, i64)> =
            entries.iter().map(|(r, u, _)| (r.clone(), *u)).collect();

        let started = Instant::now();
        let first = p.refresh(&entries, T0).await.unwrap();
        let first_took = started.elapsed();
        // Nothing was there: every (room, user) is a join, reported once with its full count.
        assert_eq!(first.len(), pairs.len());
        let total: u32 = first.iter().map(|c| c.connections).sum();
        assert_eq!(total, 10_000);

        let started = Instant::now();
        let steady = p.refresh(&entries, T0 + 1000).await.unwrap();
        let steady_took = started.elapsed();
        assert_eq!(steady, vec![]);
        eprintln!(
            "presence ({}): refresh of 10 000 entries in 200 rooms: {first_took:?} adding them, {steady_took:?} extending them",
            p.kind()
        );
        assert!(
            steady_took < Duration::from_secs(2),
            "a heartbeat of 10 000 connections took {steady_took:?}"
        );
        // Extended, not re-added: alive past the first deadline.
        assert_eq!(
            p.expire("chat:big0", T0 + TTL_MS + 1).await.unwrap(),
            vec![]
        );
    }

    /// After a Redis restart (or SCRIPT FLUSH) EVALSHA fails with NOSCRIPT; each call, including each
    /// chunk of a refresh, must load the script and run exactly once.
    #[tokio::test]
    async fn scripts_forgotten_by_redis_are_loaded_again() {
        let b = Backend::redis();
        let p = b.worker().await;
        p.join("chat:flush", 1, "c1", T0).await.unwrap();
        let Store::Redis { conn, .. } = &p.store else {
            unreachable!()
        };
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        let entries: Vec<(String, i64, String)> = (0..2500i64)
            .map(|i| ("chat:flush".to_string(), i, format!("c{i}")))
            .collect();
        let changes = p.refresh(&entries, T0).await.unwrap();
        // User 1's `c1` was there already (only extended); the 2 499 others are joins, each once.
        assert_eq!(changes.len(), 2499);
        assert_eq!(p.snapshot_at("chat:flush", T0).await.unwrap().len(), 2500);
    }

    #[test]
    fn changes_become_one_presence_frame_per_room() {
        let frames = presence_frames(&[
            change("chat:a", 1, 1),
            change("chat:b", 2, 0),
            change("chat:a", 3, 0),
            change("chat:a", 4, 2),
        ]);
        let texts: Vec<String> = frames.iter().map(ServerFrame::to_text).collect();
        assert_eq!(
            texts,
            vec![
                r#"{"type":"presence","room":"chat:a","joins":[{"user_id":1,"connections":1},{"user_id":4,"connections":2}],"leaves":[{"user_id":3}]}"#,
                r#"{"type":"presence","room":"chat:b","joins":[],"leaves":[{"user_id":2}]}"#,
            ]
        );
        assert!(presence_frames(&[]).is_empty());
    }

    #[test]
    fn only_the_last_change_of_a_user_in_a_room_is_kept() {
        let kept = last_per_user(vec![
            change("r", 1, 1),
            change("s", 1, 1),
            change("r", 1, 2),
        ]);
        assert_eq!(kept, vec![change("r", 1, 2), change("s", 1, 1)]);
    }
}
