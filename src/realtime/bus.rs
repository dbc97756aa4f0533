//! Fan-out between workers: every event published here reaches the hub of every worker (this one too).
//!
//! With Redis it is one pub/sub channel per cozy installation (`cozy:rt:<namespace>`, the namespace
//! derived from the database URL so two installations sharing a Redis never mix); on the embedded default
//! it is an in-process broadcast channel. Pub/sub is at-most-once and, across publishers, unordered: the
//! hub copes with both (it fills gaps from the database), so this module does not try to.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One event on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum BusEvent {
    /// A persisted frame of a room (`message` or `reservation`), as JSON text.
    Sequenced {
        room: String,
        seq: u64,
        frame: String,
    },
    /// A frame that is not persisted (presence, typing); `exclude_user`'s own connections skip it.
    Ephemeral {
        room: String,
        frame: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exclude_user: Option<i64>,
    },
}

impl BusEvent {
    pub fn room(&self) -> &str {
        match self {
            BusEvent::Sequenced { room, .. } | BusEvent::Ephemeral { room, .. } => room,
        }
    }
}

/// Capacity of the in-process channel feeding this worker's hub; a hub that falls further behind loses
/// events (and then fills the gaps from the database like any other loss).
const LOCAL_CAPACITY: usize = 65_536;

#[derive(Clone)]
pub struct Bus {
    local: broadcast::Sender<Arc<BusEvent>>,
    redis: Option<RedisBus>,
}

#[derive(Clone)]
struct RedisBus {
    conn: redis::aio::ConnectionManager,
    channel: String,
}

impl Bus {
    /// In-process only (the embedded default: one process).
    pub fn local() -> Bus {
        Bus {
            local: broadcast::channel(LOCAL_CAPACITY).0,
            redis: None,
        }
    }

    /// Through Redis pub/sub on `cozy:rt:<namespace>`. A background task keeps the subscription up,
    /// reconnecting with backoff; `resubscribed` is notified after every (re)connection so the hub can
    /// check its rooms for events missed meanwhile.
    pub async fn redis(
        url: &str,
        namespace: &str,
        resubscribed: Arc<tokio::sync::Notify>,
    ) -> Result<Bus, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        let conn = redis::aio::ConnectionManager::new_with_config(client.clone(), config).await?;
        let channel = format!("cozy:rt:{namespace}");
        let local = broadcast::channel(LOCAL_CAPACITY).0;
        // The first subscription is made here so that an event published right after `redis()` returns
        // is not missed; later ones by the task.
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        tokio::spawn(subscriber(
            client,
            channel.clone(),
            local.clone(),
            pubsub,
            resubscribed,
        ));
        Ok(Bus {
            local,
            redis: Some(RedisBus { conn, channel }),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<BusEvent>> {
        self.local.subscribe()
    }

    /// Publishes to every worker. A Redis failure is logged and dropped: subscribers recover sequenced
    /// events from the database; ephemeral ones (typing, presence diffs) are best-effort by contract.
    pub async fn publish(&self, event: BusEvent) {
        match &self.redis {
            None => {
                let _ = self.local.send(Arc::new(event));
            }
            Some(r) => {
                let text = serde_json::to_string(&event).expect("bus events serialize");
                let mut conn = r.conn.clone();
                let sent: Result<i64, _> = redis::cmd("PUBLISH")
                    .arg(&r.channel)
                    .arg(text)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = sent {
                    tracing::warn!(error = %e, room = event.room(), "realtime bus: publish failed");
                }
            }
        }
    }
}

async fn subscriber(
    client: redis::Client,
    channel: String,
    local: broadcast::Sender<Arc<BusEvent>>,
    first: redis::aio::PubSub,
    resubscribed: Arc<tokio::sync::Notify>,
) {
    let mut pubsub = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut ps = match pubsub.take() {
            Some(ps) => ps,
            None => {
                let connected = async {
                    let mut ps = client.get_async_pubsub().await?;
                    ps.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(ps)
                }
                .await;
                match connected {
                    Ok(ps) => {
                        tracing::info!("realtime bus: resubscribed to Redis");
                        backoff = Duration::from_millis(100);
                        resubscribed.notify_waiters();
                        ps
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "realtime bus: cannot subscribe to Redis; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
        };
        {
            let mut messages = ps.on_message();
            while let Some(msg) = messages.next().await {
                let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                match serde_json::from_slice::<BusEvent>(&payload) {
                    Ok(event) => {
                        let _ = local.send(Arc::new(event));
                    }
                    Err(e) => tracing::warn!(error = %e, "realtime bus: unreadable event"),
                }
            }
        }
        tracing::warn!("realtime bus: Redis subscription lost; reconnecting");
    }
}

/// A short, stable namespace for one installation: its database, so that tests (and installations)
/// sharing a Redis server never see each other's rooms.
pub fn namespace(database_url: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(database_url.as_bytes());
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_json() {
        let e = BusEvent::Ephemeral {
            room: "chat:a".into(),
            frame: "{}".into(),
            exclude_user: Some(3),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<BusEvent>(&text).unwrap(), e);
        assert_eq!(e.room(), "chat:a");
        assert_ne!(namespace("mysql://a/b"), namespace("mysql://a/c"));
        assert_eq!(namespace("x").len(), 16);
    }

    #[tokio::test]
    async fn the_local_bus_delivers_to_every_subscriber() {
        let bus = Bus::local();
        let mut a = bus.subscribe();
        let mut b = bus.subscribe();
        bus.publish(BusEvent::Sequenced {
            room: "chat:a".into(),
            seq: 1,
            frame: "f".into(),
        })
        .await;
        assert_eq!(a.recv().await.unwrap().room(), "chat:a");
        assert_eq!(b.recv().await.unwrap().room(), "chat:a");
    }

    #[tokio::test]
    async fn redis_carries_events_between_two_buses() {
        let Ok(url) = std::env::var("COZY_TEST_REDIS_URL") else {
            eprintln!("COZY_TEST_REDIS_URL not set: skipping (scripts/test always sets it)");
            return;
        };
        let ns = format!("test-{}", rand::random::<u64>());
        let notify = Arc::new(tokio::sync::Notify::new());
        let one = Bus::redis(&url, &ns, notify.clone()).await.unwrap();
        let two = Bus::redis(&url, &ns, notify).await.unwrap();
        let mut rx = two.subscribe();
        let mut own = one.subscribe();
        for seq in 1..=3 {
            one.publish(BusEvent::Sequenced {
                room: "chat:x".into(),
                seq,
                frame: format!("{seq}"),
            })
            .await;
        }
        for seq in 1..=3 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(&*got, BusEvent::Sequenced { seq: s, .. } if *s == seq));
            // The publisher's own hub hears it too.
            let mine = tokio::time::timeout(Duration::from_secs(5), own.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(&*mine, BusEvent::Sequenced { seq: s, .. } if *s == seq));
        }
    }
}
