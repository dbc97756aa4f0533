//! cozy's own limit on credential endpoints (`POST /v1/sessions`, `POST /v1/users`), per client address.
//!
//! Each attempt costs an argon2id hash, and each one is a guess at a password; the limit bounds both. It
//! is a GCRA (the "generic cell rate algorithm", a token bucket stored as one timestamp per client):
//! `auth_rate_per_minute` attempts a minute on average, `auth_burst` at once after a quiet spell, for
//! each of the two routes separately (a sign-up followed by a login is one attempt at each). Every
//! attempt counts, successful or not. Over it, 429 `rate_limited` with `Retry-After`, before the body is
//! read or a hash computed. `auth_rate_per_minute: 0` turns it off.
//!
//! **Per process**: the buckets live in this process's memory, so each worker of a cluster keeps its own
//! and a client spread over N workers gets up to N times the rate. The estate-wide limit is the nginx in
//! front (`limit_req` in the rendered config); this one is the backstop for a daemon reached some other
//! way, and it needs no Redis round trip on the login path.
//!
//! The key is [`super::forwarded::ClientAddr::ip`], so behind a proxy it is only as good as
//! `trusted_proxies`. IPv6 clients are keyed by their /64, the block one subscriber usually gets:
//! otherwise a single host could take a fresh address, and a fresh bucket, for every attempt.
//!
//! The table is bounded: a client whose bucket has refilled is indistinguishable from one never seen, so
//! such entries are dropped (every minute, and whenever the table is full). If it is still full of
//! clients mid-burst, which takes a flood from more than [`MAX_CLIENTS`] addresses, newcomers share one
//! overflow bucket until entries age out: the flood is limited as a whole, known clients keep theirs.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::forwarded::ClientAddr;
use super::problem::Problem;

/// Most clients tracked at once (about 32 bytes each, so a few MiB at most).
pub const MAX_CLIENTS: usize = 100_000;

/// Refilled buckets are dropped at least this often.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A full table is pruned at most this often (a prune walks the whole table).
const PRUNE_WHEN_FULL_EVERY: Duration = Duration::from_secs(1);

/// The limiter of one process; `None` inside when the limit is off.
#[derive(Debug)]
pub struct AuthLimiter(Option<Gcra>);

impl AuthLimiter {
    /// `per_minute == 0` turns the limit off; `burst` is at least 1.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        AuthLimiter((per_minute > 0).then(|| Gcra::new(per_minute, burst, MAX_CLIENTS)))
    }
}

/// Middleware for the credential routes: lets the request through or answers 429.
pub async fn limit(State(limiter): State<Arc<AuthLimiter>>, req: Request, next: Next) -> Response {
    let Some(gcra) = &limiter.0 else {
        return next.run(req).await;
    };
    // Always set by the forwarded::resolve middleware; the fallback only keeps a bare router usable.
    let ip = req
        .extensions()
        .get::<ClientAddr>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.ip);
    match gcra.check(ip, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => rate_limited(wait).into_response(),
    }
}

/// The 429 answer: `Retry-After` is the wait in whole seconds, rounded up.
fn rate_limited(wait: Duration) -> Problem {
    let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
    let mut p = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "too many sign-up or login attempts from this address; retry in {secs} second{}",
            if secs == 1 { "" } else { "s" }
        ),
    );
    p.retry_after = Some(secs);
    p
}

/// A GCRA over client addresses. Each entry is the client's "theoretical arrival time" (TAT): when its
/// bucket will be full again, in nanoseconds since `epoch`.
#[derive(Debug)]
pub struct Gcra {
    /// Time that one attempt costs: a minute / rate.
    interval: u64,
    /// How far ahead of now the TAT may run: (burst − 1) intervals.
    tolerance: u64,
    capacity: usize,
    epoch: Instant,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    tats: HashMap<IpAddr, u64>,
    /// The bucket newcomers share while the table is full.
    overflow: u64,
    overflowing: bool,
    last_prune: u64,
}

impl Gcra {
    pub fn new(per_minute: u32, burst: u32, capacity: usize) -> Self {
        let interval = (60_000_000_000 / u64::from(per_minute.max(1))).max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1) - 1)),
            capacity: capacity.max(1),
            epoch: Instant::now(),
            table: Mutex::new(Table::default()),
        }
    }

    /// Takes one attempt for `ip` at `now`, or says how long to wait until one is allowed.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = bucket_key(ip);
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let t = &mut *table;
        if now.saturating_sub(t.last_prune) >= PRUNE_EVERY.as_nanos() as u64 {
            t.prune(now);
        }
        if !t.tats.contains_key(&key) && t.tats.len() >= self.capacity {
            if now.saturating_sub(t.last_prune) >= PRUNE_WHEN_FULL_EVERY.as_nanos() as u64 {
                t.prune(now);
            }
            if t.tats.len() >= self.capacity {
                if !t.overflowing {
                    t.overflowing = true;
                    tracing::warn!(
                        clients = t.tats.len(),
                        "login rate limit: table full; new addresses share one bucket until entries age out"
                    );
                }
                return self.take(&mut t.overflow, now);
            }
        }
        let tat = t.tats.entry(key).or_insert(now);
        self.take(tat, now)
    }

    fn take(&self, tat: &mut u64, now: u64) -> Result<(), Duration> {
        let start = (*tat).max(now);
        let ahead = start - now;
        if ahead > self.tolerance {
            return Err(Duration::from_nanos(ahead - self.tolerance));
        }
        *tat = start + self.interval;
        Ok(())
    }

    /// Clients tracked right now.
    pub fn clients(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tats
            .len()
    }
}

impl Table {
    /// Drops every client whose bucket is full again (TAT not after now): forgetting it changes nothing.
    fn prune(&mut self, now: u64) {
        self.tats.retain(|_, tat| *tat > now);
        self.last_prune = now;
        self.overflowing = false;
    }
}

/// IPv4 addresses as they are, IPv6 ones by their /64.
fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn at(gcra: &Gcra, ms: u64) -> Instant {
        gcra.epoch + Duration::from_millis(ms)
    }

    #[test]
    fn a_burst_passes_then_attempts_come_at_the_rate() {
        // 60 a minute: one a second, three at once.
        let gcra = Gcra::new(60, 3, 10);
        let a = ip("198.51.100.1");
        for _ in 0..3 {
            assert_eq!(gcra.check(a, at(&gcra, 0)), Ok(()));
        }
        assert_eq!(gcra.check(a, at(&gcra, 0)), Err(Duration::from_secs(1)));
        assert_eq!(
            gcra.check(a, at(&gcra, 400)),
            Err(Duration::from_millis(600))
        );
        assert_eq!(gcra.check(a, at(&gcra, 1000)), Ok(()));
        assert!(gcra.check(a, at(&gcra, 1000)).is_err());
        // After a quiet spell the whole burst is back.
        for _ in 0..3 {
            assert_eq!(gcra.check(a, at(&gcra, 10_000)), Ok(()));
        }
    }

    #[test]
    fn refused_attempts_do_not_push_the_wait_further() {
        let gcra = Gcra::new(60, 1, 10);
        let a = ip("198.51.100.1");
        assert_eq!(gcra.check(a, at(&gcra, 0)), Ok(()));
        for _ in 0..100 {
            assert!(gcra.check(a, at(&gcra, 10)).is_err());
        }
        assert_eq!(gcra.check(a, at(&gcra, 1000)), Ok(()));
    }

    #[test]
    fn clients_have_their_own_buckets_and_ipv6_ones_share_their_64() {
        let gcra = Gcra::new(60, 1, 10);
        assert_eq!(gcra.check(ip("198.51.100.1"), at(&gcra, 0)), Ok(()));
        assert_eq!(gcra.check(ip("198.51.100.2"), at(&gcra, 0)), Ok(()));
        assert_eq!(gcra.check(ip("2001:db8:1:2::1"), at(&gcra, 0)), Ok(()));
        assert!(gcra.check(ip("2001:db8:1:2::ffff"), at(&gcra, 0)).is_err());
        assert_eq!(gcra.check(ip("2001:db8:1:3::1"), at(&gcra, 0)), Ok(()));
        // A mapped address is its IPv4 client.
        assert!(gcra.check(ip("::ffff:198.51.100.1"), at(&gcra, 0)).is_err());
    }

    #[test]
    fn the_table_never_holds_more_than_its_capacity_and_newcomers_then_share_a_bucket() {
        let gcra = Gcra::new(60, 2, 100);
        for i in 0..100u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(gcra.check(client, at(&gcra, 0)), Ok(()));
        }
        assert_eq!(gcra.clients(), 100);
        // A flood of new addresses, all mid-burst: they share the overflow bucket (burst 2).
        let mut allowed = 0;
        for i in 0..10_000u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0xc000_0000 + i));
            allowed += gcra.check(client, at(&gcra, 0)).is_ok() as u32;
        }
        assert_eq!(allowed, 2);
        assert_eq!(gcra.clients(), 100);
        // Known clients keep their own bucket meanwhile.
        assert_eq!(gcra.check(ip("10.0.0.1"), at(&gcra, 0)), Ok(()));
        // Once their buckets refill, the entries go and newcomers get their own again.
        let fresh = ip("203.0.113.9");
        assert_eq!(gcra.check(fresh, at(&gcra, 5_000)), Ok(()));
        assert_eq!(gcra.check(fresh, at(&gcra, 5_000)), Ok(()));
        assert!(gcra.check(fresh, at(&gcra, 5_000)).is_err());
        assert_eq!(gcra.clients(), 1);
    }

    #[test]
    fn idle_clients_are_forgotten_within_a_minute() {
        let gcra = Gcra::new(60, 5, 1000);
        for i in 0..50u32 {
            let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            gcra.check(client, at(&gcra, 0)).unwrap();
        }
        assert_eq!(gcra.clients(), 50);
        gcra.check(ip("198.51.100.1"), at(&gcra, 61_000)).unwrap();
        assert_eq!(gcra.clients(), 1);
    }

    #[test]
    fn retry_after_is_the_wait_rounded_up_to_whole_seconds() {
        let p = rate_limited(Duration::from_millis(1));
        assert_eq!(p.retry_after, Some(1));
        assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(p.code, "rate_limited");
        assert!(p.detail.contains("retry in 1 second"), "{}", p.detail);
        assert_eq!(
            rate_limited(Duration::from_millis(2001)).retry_after,
            Some(3)
        );
        assert!(rate_limited(Duration::from_secs(2))
            .detail
            .contains("2 seconds"));
    }

    #[test]
    fn a_rate_of_zero_turns_the_limit_off() {
        assert!(AuthLimiter::new(0, 10).0.is_none());
        assert!(AuthLimiter::new(1, 0).0.is_some());
    }
}
