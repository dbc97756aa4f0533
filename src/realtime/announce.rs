//! Presence announcements, at most one `presence` frame per room every [`PRESENCE_BATCH`].
//!
//! Every join and leave is a frame to every member of the room, so N members joining one room one by
//! one would cost N²/2 frames (12.4 M for 5 000 subscribers, measured; a reconnect storm after a restart
//! is exactly that). The announcer throttles per room instead: a change in a room that has been quiet
//! for [`PRESENCE_BATCH`] goes out at once (a lone join is not delayed), and the changes that follow
//! within the window are held and go out together, one frame at the end of it, keeping only each user's
//! last state. Joining N members then costs about N × (duration of the burst ÷ [`PRESENCE_BATCH`])
//! frames instead of N²/2.
//!
//! Folding a user's changes into the last one keeps the contract: a diff carries a user's connection
//! count (or their leave), not a delta, so the last state is all a member needs, and a `subscribed`
//! snapshot taken while a change is held already shows that change or an earlier one, which the held
//! frame then overrides with the later state. [`Throttle`] is the pure bookkeeping, [`start`] the task
//! that runs it and publishes on the bus.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::bus::{Bus, BusEvent};
use super::frames::ServerFrame;
use super::presence::{last_per_user, presence_frames, Change};

/// The shortest time between two `presence` frames of one room from this worker.
pub const PRESENCE_BATCH: Duration = Duration::from_millis(50);

/// Which changes go out now and which wait, per room.
#[derive(Default)]
pub struct Throttle {
    /// When each room's last frame went out (rooms quiet for longer are forgotten).
    sent: HashMap<String, Instant>,
    /// Changes held per room, and when they are due.
    held: HashMap<String, (Instant, Vec<Change>)>,
    /// `sent` is swept of quiet rooms when it reaches this size (amortised: it doubles).
    sweep_at: usize,
}

impl Throttle {
    /// Takes `changes` made at `now`; returns those to announce at once (rooms quiet for a window).
    pub fn offer(&mut self, changes: Vec<Change>, now: Instant) -> Vec<Change> {
        let mut now_out = Vec::new();
        let mut opened: HashSet<String> = HashSet::new();
        for change in changes {
            if let Some((_, held)) = self.held.get_mut(&change.room) {
                held.push(change);
            } else if opened.contains(&change.room) {
                now_out.push(change);
            } else {
                match self.sent.get(&change.room) {
                    Some(&at) if now < at + PRESENCE_BATCH => {
                        self.held
                            .insert(change.room.clone(), (at + PRESENCE_BATCH, vec![change]));
                    }
                    _ => {
                        self.sent.insert(change.room.clone(), now);
                        opened.insert(change.room.clone());
                        now_out.push(change);
                    }
                }
            }
        }
        self.sweep(now);
        last_per_user(now_out)
    }

    /// When the earliest held changes are due.
    pub fn due(&self) -> Option<Instant> {
        self.held.values().map(|(due, _)| *due).min()
    }

    /// The held changes due by `now`, each user's last one per room; their rooms start a new window.
    pub fn take_due(&mut self, now: Instant) -> Vec<Change> {
        let rooms: Vec<String> = self
            .held
            .iter()
            .filter(|(_, (due, _))| *due <= now)
            .map(|(room, _)| room.clone())
            .collect();
        let mut out = Vec::new();
        for room in rooms {
            if let Some((_, changes)) = self.held.remove(&room) {
                out.extend(changes);
                self.sent.insert(room, now);
            }
        }
        last_per_user(out)
    }

    fn sweep(&mut self, now: Instant) {
        if self.sent.len() < self.sweep_at.max(1024) {
            return;
        }
        let held = &self.held;
        self.sent
            .retain(|room, at| now < *at + PRESENCE_BATCH || held.contains_key(room));
        self.sweep_at = self.sent.len() * 2;
    }
}

/// Starts the announcer task; changes sent to the returned channel are announced on `bus`.
pub fn start(bus: Bus) -> mpsc::UnboundedSender<Vec<Change>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Change>>();
    tokio::spawn(async move {
        let mut throttle = Throttle::default();
        loop {
            let due = throttle.due();
            let out = tokio::select! {
                changes = rx.recv() => match changes {
                    Some(changes) => throttle.offer(changes, Instant::now()),
                    None => return,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    throttle.take_due(Instant::now())
                }
            };
            publish(&bus, &out).await;
        }
    });
    tx
}

/// Broadcasts presence changes as `presence` frames, one per room.
async fn publish(bus: &Bus, changes: &[Change]) {
    for frame in presence_frames(changes) {
        let ServerFrame::Presence { room, .. } = &frame else {
            continue;
        };
        bus.publish(BusEvent::Ephemeral {
            room: room.clone(),
            frame: frame.to_text(),
            exclude_user: None,
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(room: &str, user_id: i64, connections: u32) -> Change {
        Change {
            room: room.to_string(),
            user_id,
            connections,
        }
    }

    #[test]
    fn a_change_in_a_quiet_room_goes_out_at_once() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert_eq!(
            t.offer(vec![join("chat:a", 1, 1)], now),
            vec![join("chat:a", 1, 1)]
        );
        assert_eq!(t.due(), None);
        // A window later the room is quiet again.
        let later = now + PRESENCE_BATCH;
        assert_eq!(
            t.offer(vec![join("chat:a", 2, 1)], later),
            vec![join("chat:a", 2, 1)]
        );
    }

    #[test]
    fn changes_within_the_window_are_held_and_go_out_together_at_its_end() {
        let mut t = Throttle::default();
        let now = Instant::now();
        t.offer(vec![join("chat:a", 1, 1)], now);
        let ms = Duration::from_millis(1);
        assert!(t.offer(vec![join("chat:a", 2, 1)], now + ms).is_empty());
        assert!(t.offer(vec![join("chat:a", 3, 1)], now + 2 * ms).is_empty());
        // Another room is not held back by this one.
        assert_eq!(
            t.offer(vec![join("chat:b", 2, 1)], now + 3 * ms),
            vec![join("chat:b", 2, 1)]
        );
        assert_eq!(t.due(), Some(now + PRESENCE_BATCH));
        assert!(t.take_due(now + PRESENCE_BATCH - ms).is_empty());
        assert_eq!(
            t.take_due(now + PRESENCE_BATCH),
            vec![join("chat:a", 2, 1), join("chat:a", 3, 1)]
        );
        assert_eq!(t.due(), None);
        // That frame opened a new window.
        assert!(t
            .offer(vec![join("chat:a", 4, 1)], now + PRESENCE_BATCH + ms)
            .is_empty());
        assert_eq!(t.due(), Some(now + 2 * PRESENCE_BATCH));
    }

    #[test]
    fn a_held_users_changes_fold_into_their_last_state() {
        let mut t = Throttle::default();
        let now = Instant::now();
        t.offer(vec![join("chat:a", 9, 1)], now);
        let ms = Duration::from_millis(1);
        t.offer(vec![join("chat:a", 1, 1)], now + ms);
        t.offer(vec![join("chat:a", 1, 2)], now + 2 * ms);
        t.offer(
            vec![join("chat:a", 2, 1), join("chat:a", 2, 0)],
            now + 3 * ms,
        );
        assert_eq!(
            t.take_due(now + PRESENCE_BATCH),
            vec![join("chat:a", 1, 2), join("chat:a", 2, 0)]
        );
    }

    #[test]
    fn several_changes_offered_at_once_to_a_quiet_room_go_out_together() {
        let mut t = Throttle::default();
        let now = Instant::now();
        let out = t.offer(
            vec![
                join("chat:a", 1, 0),
                join("chat:a", 2, 0),
                join("chat:b", 1, 0),
            ],
            now,
        );
        assert_eq!(out.len(), 3);
        assert_eq!(t.due(), None);
    }
}
