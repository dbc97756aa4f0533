//! The realtime service of one worker: the pieces wired together, and its background duties.
//!
//! - the **outbox publisher** turns committed reservation transitions into sequenced history and onto the
//!   bus (kicked after each reservation call, and every 500 ms; on start it drains what a crash left);
//! - the **presence keeper** refreshes this worker's connections in the presence store every third of
//!   the presence TTL and expires other workers' dead connections in the rooms it serves;
//! - **retention** purges old history every ten minutes (and `cozy sweep` does too).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use super::announce;
use super::bus::{self, Bus, BusEvent};
use super::hub::Hub;
use super::presence::{Change, Presence};
use super::store::Store;
use crate::config::Settings;
use crate::db::Db;
use crate::time::now_ms;

/// How long the outbox publisher waits after a kick before draining, to batch a burst.
const OUTBOX_BATCH_WAIT: Duration = Duration::from_millis(10);

/// The realtime hub of this process.
pub struct Realtime {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub presence: Presence,
    pub bus: Bus,
    pub hub: Hub,
    /// Presence changes to announce (the announcer task throttles them per room).
    announcer: mpsc::UnboundedSender<Vec<Change>>,
    pub(super) draining: watch::Receiver<bool>,
    outbox_kick: Notify,
    open: AtomicUsize,
    closed: Notify,
    /// This worker's connections and their rooms, for presence refreshes.
    pub(super) local: Mutex<HashMap<u64, LocalConn>>,
}

pub(super) struct LocalConn {
    pub user_id: i64,
    pub conn: String,
    pub rooms: HashSet<String>,
}

impl Realtime {
    /// Connects the bus and presence (Redis when configured), starts the hub and the background tasks.
    pub async fn start(
        settings: Arc<Settings>,
        db: Db,
        draining: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Realtime>> {
        let store = Store::new(
            db,
            settings.realtime_history_count,
            settings.realtime_history_age,
        );
        let namespace = bus::namespace(&settings.database.url());
        let resubscribed = Arc::new(Notify::new());
        let (bus, presence) = match &settings.redis_url {
            Some(url) => (
                Bus::redis(url, &namespace, resubscribed.clone()).await?,
                Presence::redis_with_prefix(
                    url,
                    settings.realtime_presence_ttl,
                    &format!("cozy:{namespace}:presence"),
                )
                .await?,
            ),
            None => (
                Bus::local(),
                Presence::local(settings.realtime_presence_ttl),
            ),
        };
        let hub = Hub::start(store.clone(), bus.subscribe(), resubscribed);
        let announcer = announce::start(bus.clone());
        let rt = Arc::new(Realtime {
            settings,
            store,
            presence,
            bus,
            hub,
            announcer,
            draining,
            outbox_kick: Notify::new(),
            open: AtomicUsize::new(0),
            closed: Notify::new(),
            local: Mutex::new(HashMap::new()),
        });
        tokio::spawn(outbox_publisher(Arc::downgrade(&rt)));
        tokio::spawn(presence_keeper(Arc::downgrade(&rt)));
        tokio::spawn(retention(Arc::downgrade(&rt)));
        Ok(rt)
    }

    /// A reservation call just committed: publish its outbox rows now rather than at the next poll.
    pub fn kick_outbox(&self) {
        self.outbox_kick.notify_one();
    }

    /// Open WebSocket connections in this process.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub(super) fn opened(&self) {
        self.open.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("cozy_websocket_connections").increment(1.0);
    }

    pub(super) fn closed(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("cozy_websocket_connections").decrement(1.0);
        self.closed.notify_waiters();
    }

    /// After a drain started: waits (up to `timeout`) for every WebSocket to have said goodbye.
    pub async fn wait_closed(&self, timeout: Duration) {
        let wait = async {
            while self.connections() > 0 {
                let notified = self.closed.notified();
                if self.connections() == 0 {
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// Announces presence changes: `presence` frames on the bus, at once or, within 50 ms of the room's
    /// previous frame, together with the others of that window (see [`announce`]).
    pub fn announce(&self, changes: Vec<Change>) {
        let _ = self.announcer.send(changes);
    }
}

async fn outbox_publisher(rt: std::sync::Weak<Realtime>) {
    loop {
        let Some(r) = rt.upgrade() else { return };
        loop {
            match r.store.drain_outbox(now_ms(), 200).await {
                Ok(messages) if messages.is_empty() => break,
                Ok(messages) => {
                    for m in messages {
                        r.bus
                            .publish(BusEvent::Sequenced {
                                room: m.room.clone(),
                                seq: m.seq,
                                frame: m.to_frame().to_text(),
                            })
                            .await;
                    }
                }
                // The daemon is stopping: what is left is drained by the next start.
                Err(_) if r.store.is_closed() => return,
                Err(e) => {
                    tracing::warn!(error = %e, "realtime: cannot drain the outbox; retrying");
                    break;
                }
            }
        }
        let kicked = tokio::time::timeout(Duration::from_millis(500), r.outbox_kick.notified())
            .await
            .is_ok();
        if kicked {
            // Let the other calls of this moment commit too: one drain transaction for a burst of
            // transitions instead of one each (10 ms on a reservation frame's way out).
            tokio::time::sleep(OUTBOX_BATCH_WAIT).await;
        }
    }
}

async fn presence_keeper(rt: std::sync::Weak<Realtime>) {
    let period = match rt.upgrade() {
        Some(r) => r.settings.realtime_presence_ttl / 3,
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = rt.upgrade() else { return };
        let (entries, rooms) = {
            let local = r.local.lock().unwrap();
            let mut entries = Vec::new();
            let mut rooms = HashSet::new();
            for c in local.values() {
                for room in &c.rooms {
                    entries.push((room.clone(), c.user_id, c.conn.clone()));
                    rooms.insert(room.clone());
                }
            }
            (entries, rooms)
        };
        let now = now_ms();
        let mut changes = Vec::new();
        if !entries.is_empty() {
            match r.presence.refresh(&entries, now).await {
                Ok(c) => changes.extend(c),
                Err(e) => tracing::warn!(error = %e, "realtime: presence refresh failed"),
            }
        }
        for room in rooms {
            match r.presence.expire(&room, now).await {
                Ok(c) => changes.extend(c),
                Err(e) => tracing::warn!(error = %e, room, "realtime: presence expiry failed"),
            }
        }
        if !changes.is_empty() {
            r.announce(changes);
        }
    }
}

async fn retention(rt: std::sync::Weak<Realtime>) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = rt.upgrade() else { return };
        match r.store.purge(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "realtime: history purged"),
            Err(e) => tracing::warn!(error = %e, "realtime: history purge failed"),
        }
    }
}
