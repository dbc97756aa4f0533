//! This worker's rooms and subscribers, and the one rule that matters: every subscriber gets a room's
//! sequenced frames in `seq` order, each exactly once, with no gap.
//!
//! The hub is an actor (one task owns all state; connections and the bus talk to it through a channel),
//! so per-room bookkeeping needs no locks. It never waits on the database itself: reads run in spawned
//! tasks that report back with a command.
//!
//! Per room it keeps `head`, the highest `seq` up to which it has seen every frame. A frame from the bus
//! with `seq == head + 1` is delivered at once; a later one is held in `pending` while the gap lasts —
//! pub/sub delivers two workers' publications in any order, and can lose some — and if the gap is still
//! there after [`GAP_WAIT`] it is filled from the database, which has every `seq` (allocated in the
//! publishing transaction, so there are no holes). A periodic check of the rooms' heads in the database
//! also catches trailing losses (a lost last message, a crash between commit and publish).
//!
//! Per subscriber it keeps `sent`, the last `seq` handed to that connection; a frame is sent only when it
//! is exactly `sent + 1`. A new subscriber is first *synced*: its `since` replay (or just the room's head)
//! is read from the database, then the hub sends the replay, the `subscribed` reply, and whatever the room
//! delivered meanwhile from a ring of recent frames, before it sees live frames.
//!
//! A subscriber whose outbound queue is full is a slow consumer: it is told to close with 4009 and
//! dropped from every room here; it never holds up the others.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{broadcast, mpsc, Notify};

use super::bus::BusEvent;
use super::frames::{PresenceEntry, ServerFrame};
use super::store::{Store, StoredMessage};

/// How long a gap in a room's sequence may last before the hub reads the missing frames from the
/// database (they are usually just late on the bus).
pub const GAP_WAIT: Duration = Duration::from_millis(40);
/// How often the heads of all active rooms are compared with the database.
pub const HEAD_CHECK: Duration = Duration::from_secs(2);
/// Recent frames kept per room for subscribers that finish syncing behind the live head.
const RING: usize = 512;

/// What a connection receives from the hub.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A text frame (JSON), shared between all recipients (UTF-8 checked once, when it was made).
    Text(Utf8Bytes),
    /// Close with this code and reason (slow consumer, server going away).
    Close(u16, &'static str),
}

/// A connection as the hub knows it.
#[derive(Clone)]
pub struct ConnHandle {
    pub id: u64,
    pub user_id: i64,
    pub out: mpsc::Sender<Outbound>,
    /// Notified when the hub gives up on the connection (its queue overflowed): close with 4009.
    pub slow: Arc<Notify>,
}

enum Cmd {
    Subscribe {
        conn: ConnHandle,
        room: String,
        since: Option<u64>,
        reference: Option<String>,
        presence: Vec<PresenceEntry>,
    },
    Unsubscribe {
        conn: u64,
        room: String,
    },
    Disconnect {
        conn: u64,
    },
    Synced {
        conn: u64,
        room: String,
        result: Result<Synced, String>,
    },
    GapTimer {
        room: String,
    },
    Filled {
        room: String,
        frames: Vec<(u64, Utf8Bytes)>,
        upto: u64,
    },
    Heads(HashMap<String, u64>),
}

struct Synced {
    last_seq: u64,
    recovered: bool,
    frames: Vec<(u64, Utf8Bytes)>,
}

struct Sub {
    conn: ConnHandle,
    /// Last seq handed to the connection.
    sent: u64,
    /// Still syncing: live frames are not sent yet (the ring covers them afterwards).
    syncing: Option<Syncing>,
}

struct Syncing {
    since: Option<u64>,
    reference: Option<String>,
    presence: Vec<PresenceEntry>,
}

#[derive(Default)]
struct RoomState {
    subs: HashMap<u64, Sub>,
    head: Option<u64>,
    /// Highest seq known to exist (from the bus or the database).
    known: u64,
    pending: BTreeMap<u64, Utf8Bytes>,
    ring: VecDeque<(u64, Utf8Bytes)>,
    gap_timer: bool,
    filling: bool,
}

/// Handle to this worker's hub.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Hub {
    /// Starts the hub task, fed by `bus` (every worker's sequenced and ephemeral events).
    pub fn start(
        store: Store,
        mut bus: broadcast::Receiver<Arc<BusEvent>>,
        resubscribed: Arc<Notify>,
    ) -> Hub {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let hub = Hub { tx: tx.clone() };
        tokio::spawn(async move {
            let mut state = State {
                rooms: HashMap::new(),
                conn_rooms: HashMap::new(),
                store,
                tx,
            };
            let mut heads = tokio::time::interval(HEAD_CHECK);
            heads.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => state.handle(cmd),
                        None => return,
                    },
                    event = bus.recv() => match event {
                        Ok(event) => state.bus(&event),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(lost = n, "realtime hub fell behind the bus; filling from the database");
                            state.check_heads();
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = heads.tick() => state.check_heads(),
                    _ = resubscribed.notified() => state.check_heads(),
                }
            }
        });
        hub
    }

    pub fn subscribe(
        &self,
        conn: ConnHandle,
        room: String,
        since: Option<u64>,
        reference: Option<String>,
        presence: Vec<PresenceEntry>,
    ) {
        let _ = self.tx.send(Cmd::Subscribe {
            conn,
            room,
            since,
            reference,
            presence,
        });
    }

    pub fn unsubscribe(&self, conn: u64, room: String) {
        let _ = self.tx.send(Cmd::Unsubscribe { conn, room });
    }

    pub fn disconnect(&self, conn: u64) {
        let _ = self.tx.send(Cmd::Disconnect { conn });
    }
}

struct State {
    rooms: HashMap<String, RoomState>,
    conn_rooms: HashMap<u64, HashSet<String>>,
    store: Store,
    tx: mpsc::UnboundedSender<Cmd>,
}

fn text(frame: &ServerFrame) -> Utf8Bytes {
    Utf8Bytes::from(frame.to_text())
}

/// Stored messages as `(seq, frame text)`, ready to hand to connections.
fn frames_of(messages: &[StoredMessage]) -> Vec<(u64, Utf8Bytes)> {
    messages
        .iter()
        .map(|m| (m.seq, text(&m.to_frame())))
        .collect()
}

impl State {
    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe {
                conn,
                room,
                since,
                reference,
                presence,
            } => self.subscribe(conn, room, since, reference, presence),
            Cmd::Unsubscribe { conn, room } => self.remove(conn, &room),
            Cmd::Disconnect { conn } => {
                for room in self.conn_rooms.remove(&conn).unwrap_or_default() {
                    self.remove_from_room(conn, &room);
                }
            }
            Cmd::Synced { conn, room, result } => self.synced(conn, &room, result),
            Cmd::GapTimer { room } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.gap_timer = false;
                }
                self.fill(&room);
            }
            Cmd::Filled { room, frames, upto } => self.filled(&room, frames, upto),
            Cmd::Heads(heads) => {
                for (room, last) in heads {
                    let Some(r) = self.rooms.get_mut(&room) else {
                        continue;
                    };
                    if last > r.known {
                        r.known = last;
                    }
                    self.check_gap(&room);
                }
            }
        }
    }

    fn subscribe(
        &mut self,
        conn: ConnHandle,
        room: String,
        since: Option<u64>,
        reference: Option<String>,
        presence: Vec<PresenceEntry>,
    ) {
        let id = conn.id;
        self.conn_rooms.entry(id).or_default().insert(room.clone());
        let r = self.rooms.entry(room.clone()).or_default();
        r.subs.insert(
            id,
            Sub {
                conn,
                sent: 0,
                syncing: Some(Syncing {
                    since,
                    reference,
                    presence,
                }),
            },
        );
        let store = self.store.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = match since {
                Some(since) => store
                    .replay(&room, since)
                    .await
                    .map(|r| Synced {
                        last_seq: r.last_seq,
                        recovered: r.recovered,
                        frames: frames_of(&r.messages),
                    })
                    .map_err(|e| e.to_string()),
                None => store
                    .last_seq(&room)
                    .await
                    .map(|last_seq| Synced {
                        last_seq,
                        recovered: false,
                        frames: Vec::new(),
                    })
                    .map_err(|e| e.to_string()),
            };
            let _ = tx.send(Cmd::Synced {
                conn: id,
                room,
                result,
            });
        });
    }

    fn remove(&mut self, conn: u64, room: &str) {
        if let Some(rooms) = self.conn_rooms.get_mut(&conn) {
            rooms.remove(room);
            if rooms.is_empty() {
                self.conn_rooms.remove(&conn);
            }
        }
        self.remove_from_room(conn, room);
    }

    fn remove_from_room(&mut self, conn: u64, room: &str) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.subs.remove(&conn);
            if r.subs.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    fn synced(&mut self, conn: u64, room: &str, result: Result<Synced, String>) {
        let synced = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(room, error = %e, "realtime: cannot read the room's history; closing the subscriber");
                if let Some(sub) = self.rooms.get(room).and_then(|r| r.subs.get(&conn)) {
                    let _ = sub
                        .conn
                        .out
                        .try_send(Outbound::Close(1011, "history unavailable"));
                }
                self.remove(conn, room);
                return;
            }
        };
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if r.head.is_none() {
            r.head = Some(synced.last_seq);
            r.known = r.known.max(synced.last_seq);
            let head = synced.last_seq;
            r.pending.retain(|seq, _| *seq > head);
        }
        r.known = r.known.max(synced.last_seq);
        let head = r.head.unwrap_or(0);
        // Disjoint borrows: the subscriber is updated while the ring is read, without copying it.
        let RoomState { subs, ring, .. } = r;
        let Some(sub) = subs.get_mut(&conn) else {
            return;
        };
        let Some(syncing) = sub.syncing.take() else {
            return;
        };
        let since = syncing.since.unwrap_or(synced.last_seq);
        let mut ok = true;
        for (seq, frame) in &synced.frames {
            if *seq > since && ok {
                ok = sub.conn.out.try_send(Outbound::Text(frame.clone())).is_ok();
            }
        }
        sub.sent = synced.last_seq;
        let reply = ServerFrame::Subscribed {
            room: room.to_string(),
            last_seq: synced.last_seq,
            recovered: synced.recovered,
            presence: syncing.presence,
            reference: syncing.reference,
        };
        ok = ok && sub.conn.out.try_send(Outbound::Text(text(&reply))).is_ok();
        // Frames this hub delivered while the subscriber was syncing.
        if ok && head > sub.sent {
            for (seq, frame) in ring.iter() {
                if *seq == sub.sent + 1 {
                    if sub
                        .conn
                        .out
                        .try_send(Outbound::Text(frame.clone()))
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                    sub.sent = *seq;
                }
            }
            if ok && sub.sent < head {
                // The ring did not reach back far enough: read the rest and sync again.
                let (store, tx, room_name, after) = (
                    self.store.clone(),
                    self.tx.clone(),
                    room.to_string(),
                    sub.sent,
                );
                sub.syncing = Some(Syncing {
                    since: Some(after),
                    reference: None,
                    presence: Vec::new(),
                });
                tokio::spawn(async move {
                    let result = store
                        .range(&room_name, after, head)
                        .await
                        .map(|messages| Synced {
                            last_seq: head,
                            recovered: true,
                            frames: frames_of(&messages),
                        })
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Cmd::Synced {
                        conn,
                        room: room_name,
                        result,
                    });
                });
                return;
            }
        }
        if !ok {
            self.slow(conn);
            return;
        }
        self.check_gap(room);
    }

    /// An event from the bus.
    fn bus(&mut self, event: &BusEvent) {
        match event {
            BusEvent::Sequenced { room, seq, frame } => {
                let Some(r) = self.rooms.get_mut(room) else {
                    return;
                };
                let seq = *seq;
                r.known = r.known.max(seq);
                match r.head {
                    Some(head) if seq <= head => {}
                    Some(head) if seq == head + 1 => {
                        let frame = Utf8Bytes::from(frame.clone());
                        self.deliver(room, seq, frame);
                        self.drain_pending(room);
                    }
                    _ => {
                        r.pending.insert(seq, Utf8Bytes::from(frame.clone()));
                    }
                }
                self.check_gap(room);
            }
            BusEvent::Ephemeral {
                room,
                frame,
                exclude_user,
            } => {
                let Some(r) = self.rooms.get(room) else {
                    return;
                };
                let frame = Utf8Bytes::from(frame.clone());
                let mut slow = Vec::new();
                for (id, sub) in &r.subs {
                    if sub.syncing.is_some() || Some(sub.conn.user_id) == *exclude_user {
                        continue;
                    }
                    if let Err(mpsc::error::TrySendError::Full(_)) =
                        sub.conn.out.try_send(Outbound::Text(frame.clone()))
                    {
                        slow.push(*id);
                    }
                }
                for id in slow {
                    self.slow(id);
                }
            }
        }
    }

    /// Hands frame `seq` (== head + 1) to every live subscriber and advances the head.
    fn deliver(&mut self, room: &str, seq: u64, frame: Utf8Bytes) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.head = Some(seq);
        r.ring.push_back((seq, frame.clone()));
        if r.ring.len() > RING {
            r.ring.pop_front();
        }
        let mut slow = Vec::new();
        for (id, sub) in r.subs.iter_mut() {
            if sub.syncing.is_some() || sub.sent + 1 != seq {
                continue;
            }
            match sub.conn.out.try_send(Outbound::Text(frame.clone())) {
                Ok(()) => sub.sent = seq,
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*id),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        for id in slow {
            self.slow(id);
        }
    }

    fn drain_pending(&mut self, room: &str) {
        loop {
            let Some(r) = self.rooms.get_mut(room) else {
                return;
            };
            let Some(head) = r.head else { return };
            let Some(frame) = r.pending.remove(&(head + 1)) else {
                r.pending.retain(|seq, _| *seq > head);
                return;
            };
            self.deliver(room, head + 1, frame);
        }
    }

    /// Arms the gap timer when the room is behind what is known to exist.
    fn check_gap(&mut self, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(head) = r.head else { return };
        if r.known > head && !r.gap_timer && !r.filling {
            r.gap_timer = true;
            let tx = self.tx.clone();
            let room = room.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(GAP_WAIT).await;
                let _ = tx.send(Cmd::GapTimer { room });
            });
        }
    }

    /// Reads the frames the room is missing from the database.
    fn fill(&mut self, room: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(head) = r.head else { return };
        if r.known <= head || r.filling {
            return;
        }
        r.filling = true;
        let upto = r.known;
        let (store, tx, room) = (self.store.clone(), self.tx.clone(), room.to_string());
        tokio::spawn(async move {
            let frames = match store.range(&room, head, upto).await {
                Ok(messages) => frames_of(&messages),
                Err(e) => {
                    tracing::warn!(room, error = %e, "realtime: gap fill failed; retrying");
                    Vec::new()
                }
            };
            let _ = tx.send(Cmd::Filled { room, frames, upto });
        });
    }

    fn filled(&mut self, room: &str, frames: Vec<(u64, Utf8Bytes)>, upto: u64) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.filling = false;
        let head = r.head.unwrap_or(0);
        if let Some(&(first, _)) = frames.first() {
            if first > head + 1 {
                // Retention purged the missing frames (a subscriber this far behind cannot be served in
                // order any more): move on from the oldest frame still there.
                tracing::warn!(
                    room,
                    head,
                    first,
                    "realtime: missing frames were purged; skipping ahead"
                );
                r.head = Some(first - 1);
                for sub in r.subs.values_mut() {
                    if sub.syncing.is_none() && sub.sent < first - 1 {
                        sub.sent = first - 1;
                    }
                }
            }
        }
        let empty = frames.is_empty();
        for (seq, frame) in frames {
            let head = self.rooms.get(room).and_then(|r| r.head).unwrap_or(0);
            if seq == head + 1 {
                self.deliver(room, seq, frame);
                self.drain_pending(room);
            }
        }
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        if empty && r.head.unwrap_or(0) < upto && !r.gap_timer {
            // Not visible yet (or a transient error): try again a little later, not in a tight loop.
            r.gap_timer = true;
            let (tx, room) = (self.tx.clone(), room.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(GAP_WAIT * 10).await;
                let _ = tx.send(Cmd::GapTimer { room });
            });
            return;
        }
        self.check_gap(room);
    }

    fn check_heads(&mut self) {
        if self.rooms.is_empty() {
            return;
        }
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        let (store, tx) = (self.store.clone(), self.tx.clone());
        tokio::spawn(async move {
            match store.last_seqs(&rooms).await {
                Ok(heads) => {
                    let _ = tx.send(Cmd::Heads(heads));
                }
                Err(e) => tracing::warn!(error = %e, "realtime: cannot read room heads"),
            }
        });
    }

    /// Gives up on a connection whose queue is full: close with 4009, drop it everywhere.
    fn slow(&mut self, conn: u64) {
        let mut notified = false;
        for room in self.conn_rooms.remove(&conn).unwrap_or_default() {
            if let Some(r) = self.rooms.get_mut(&room) {
                if let Some(sub) = r.subs.remove(&conn) {
                    if !notified {
                        sub.conn.slow.notify_one();
                        notified = true;
                    }
                }
                if r.subs.is_empty() {
                    self.rooms.remove(&room);
                }
            }
        }
    }
}
