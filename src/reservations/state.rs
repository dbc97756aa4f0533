//! The reservation state machine, pure: no clock, no database.
//!
//! ```text
//!   RESERVED ──pay (before expires_at)──▶ PAID ──cancel (refund)──▶ CANCELLED
//!      │  └──────────────cancel──────────────────────────────────▶ CANCELLED
//!      └──────expire (at/after expires_at)────────────────────────▶ EXPIRED
//! ```
//! The repository asks [`decide`] before every write and then repeats the same condition in SQL
//! (`UPDATE … WHERE state = 'RESERVED' AND expires_at > now`), so a race between two requests cannot slip a
//! transition past it: the loser's conditional update changes no row.

use serde::{Deserialize, Serialize};

use crate::time::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Reserved,
    Paid,
    Cancelled,
    Expired,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Reserved,
        State::Paid,
        State::Cancelled,
        State::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Reserved => "RESERVED",
            State::Paid => "PAID",
            State::Cancelled => "CANCELLED",
            State::Expired => "EXPIRED",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a reservation in this state occupies capacity (the `held` column counts it).
    pub fn holds_capacity(self) -> bool {
        matches!(self, State::Reserved | State::Paid)
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Cancelled | State::Expired)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller asks of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pay,
    Cancel,
    Expire,
}

impl Command {
    /// The state the command aims at; used to name `to` in an `invalid_transition` error.
    pub fn target(self) -> State {
        match self {
            Command::Pay => State::Paid,
            Command::Cancel => State::Cancelled,
            Command::Expire => State::Expired,
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The hold ran out before it was paid.
    #[error("the hold expired")]
    Expired,
    #[error("cannot go from {from} to {to}")]
    Invalid { from: State, to: State },
}

/// The state a stored reservation really is in at `now`: an overdue hold is EXPIRED whatever the row says.
pub fn effective(stored: State, expires_at: Millis, now: Millis) -> State {
    if stored == State::Reserved && now >= expires_at {
        State::Expired
    } else {
        stored
    }
}

/// Decides a command against the *effective* state. `Ok(to)` is the new state.
pub fn decide(
    stored: State,
    expires_at: Millis,
    now: Millis,
    cmd: Command,
) -> Result<State, Refusal> {
    let overdue = stored == State::Reserved && now >= expires_at;
    match (stored, cmd) {
        (State::Reserved, Command::Pay) if overdue => Err(Refusal::Expired),
        (State::Reserved, Command::Pay) => Ok(State::Paid),
        (State::Reserved, Command::Cancel) if overdue => Err(Refusal::Invalid {
            from: State::Expired,
            to: State::Cancelled,
        }),
        (State::Reserved, Command::Cancel) => Ok(State::Cancelled),
        (State::Paid, Command::Cancel) => Ok(State::Cancelled),
        (State::Reserved, Command::Expire) if overdue => Ok(State::Expired),
        (from, cmd) => Err(Refusal::Invalid {
            from: effective(from, expires_at, now),
            to: cmd.target(),
        }),
    }
}

/// Every edge of the machine, for documentation and tests.
pub fn allowed(from: State, to: State) -> bool {
    matches!(
        (from, to),
        (State::Reserved, State::Paid)
            | (State::Reserved, State::Cancelled)
            | (State::Reserved, State::Expired)
            | (State::Paid, State::Cancelled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXP: Millis = 1_000;

    #[test]
    fn paying_before_expiry_pays_and_after_is_expired() {
        assert_eq!(
            decide(State::Reserved, EXP, EXP - 1, Command::Pay),
            Ok(State::Paid)
        );
        assert_eq!(
            decide(State::Reserved, EXP, EXP, Command::Pay),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn paid_can_be_cancelled_but_not_paid_again() {
        assert_eq!(
            decide(State::Paid, EXP, EXP + 5, Command::Cancel),
            Ok(State::Cancelled)
        );
        assert_eq!(
            decide(State::Paid, EXP, 0, Command::Pay),
            Err(Refusal::Invalid {
                from: State::Paid,
                to: State::Paid
            })
        );
    }

    #[test]
    fn an_overdue_hold_reports_expired_as_its_from_state() {
        assert_eq!(
            decide(State::Reserved, EXP, EXP + 1, Command::Cancel),
            Err(Refusal::Invalid {
                from: State::Expired,
                to: State::Cancelled
            })
        );
        assert_eq!(effective(State::Reserved, EXP, EXP), State::Expired);
        assert_eq!(effective(State::Reserved, EXP, EXP - 1), State::Reserved);
    }

    #[test]
    fn final_states_refuse_everything() {
        for s in [State::Cancelled, State::Expired] {
            for c in [Command::Pay, Command::Cancel, Command::Expire] {
                assert!(decide(s, EXP, 0, c).is_err());
            }
        }
    }

    /// A model of one resource: random commands at random times never reach an invalid state, never
    /// take a transition outside the graph, and capacity held always equals the live reservations.
    #[derive(Debug, Clone)]
    enum Op {
        Reserve(i64),
        Pay(usize),
        Cancel(usize),
        Expire(usize),
        Tick(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..4).prop_map(Op::Reserve),
            (0usize..8).prop_map(Op::Pay),
            (0usize..8).prop_map(Op::Cancel),
            (0usize..8).prop_map(Op::Expire),
            (0i64..400).prop_map(Op::Tick),
        ]
    }

    proptest! {
        #[test]
        fn random_operation_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..80)) {
            let capacity = 6;
            let mut now: Millis = 0;
            let mut held = 0i64;
            let mut rows: Vec<(State, Millis, i64)> = Vec::new();
            for op in ops {
                // Capacity is only released by writing EXPIRED, as the repository does before reserving.
                if let Op::Reserve(q) = op {
                    for r in rows.iter_mut() {
                        if let Ok(to) = decide(r.0, r.1, now, Command::Expire) {
                            prop_assert!(allowed(r.0, to));
                            r.0 = to;
                            held -= r.2;
                        }
                    }
                    if held + q <= capacity {
                        rows.push((State::Reserved, now + 300, q));
                        held += q;
                    }
                    continue;
                }
                let (idx, cmd) = match op {
                    Op::Pay(i) => (i, Command::Pay),
                    Op::Cancel(i) => (i, Command::Cancel),
                    Op::Expire(i) => (i, Command::Expire),
                    Op::Tick(t) => { now += t; continue; }
                    Op::Reserve(_) => unreachable!(),
                };
                let Some(r) = rows.get_mut(idx) else { continue };
                match decide(r.0, r.1, now, cmd) {
                    Ok(to) => {
                        prop_assert!(allowed(r.0, to), "{:?} -> {:?}", r.0, to);
                        // A payment only ever succeeds before the hold runs out.
                        prop_assert!(cmd != Command::Pay || now < r.1);
                        if r.0.holds_capacity() && !to.holds_capacity() { held -= r.2; }
                        r.0 = to;
                    }
                    Err(Refusal::Expired) => prop_assert!(r.0 == State::Reserved && now >= r.1),
                    Err(Refusal::Invalid { .. }) => {}
                }
            }
            let live: i64 = rows.iter().filter(|r| r.0.holds_capacity()).map(|r| r.2).sum();
            prop_assert_eq!(live, held);
            prop_assert!(held >= 0 && held <= capacity);
        }
    }
}
