//! The realtime hub: `GET /v1/realtime` (realtime-protocol.md) in every worker.
//!
//! - [`frames`]: every frame as a Rust type (the source of `docs/realtime-frames.schema.json`) and the
//!   room ACL.
//! - [`store`]: history in the database: per-room `seq` allocated in the same transaction as the message,
//!   `(user, room, client_msg_id)` dedupe, `since` replay, retention, and the outbox drain that turns
//!   reservation transitions into sequenced `reservation` frames exactly once.
//! - [`presence`]: who is in a room, per user, cluster-wide in Redis with expiry (in memory on the
//!   embedded default).
//! - [`announce`]: presence changes as `presence` frames, throttled to one per room per 50 ms so a
//!   room that N members join costs O(N) frames, not O(N²).
//! - [`bus`]: fan-out between workers (Redis pub/sub, or in-process).
//! - [`hub`]: this worker's rooms and subscribers; delivers each room in `seq` order, holding back a gap
//!   briefly and filling it from the database.
//! - [`ws`]: one WebSocket connection: hello/auth, heartbeats, limits, bounded outbound queue.
//! - [`service`]: the pieces wired together, plus the outbox publisher, presence keeper and retention.

pub mod announce;
pub mod bus;
pub mod frames;
pub mod hub;
pub mod presence;
pub mod service;
pub mod store;
pub mod ws;

pub use service::Realtime;
