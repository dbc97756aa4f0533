//! `cozy nginx render` end to end: the site it renders, run by this machine's real nginx (Debian's
//! `/usr/sbin/nginx`) in front of two real `cozy serve` processes on MySQL + Redis, no mocks.
//!
//! Every test builds its own estate ([`estate::Estate`]): a fresh database, two daemons (one on
//! 127.0.0.1, one on 127.0.0.2, as two app hosts), an inventory naming them, the site rendered by the
//! real `cozy nginx render --out`, completed into a runnable nginx folder and started on free ports. So
//! tests run in parallel without sharing anything but the MySQL and Redis servers.
//!
//! The areas, one file each: `validate` (nginx -t and gixy on every variant), `bad_input` (file:line:col
//! errors, nothing written), `flows` (reserve + pay + replay through nginx), `realtime` (WebSockets across
//! the upstreams, heartbeats against `proxy_read_timeout`), `failover` (an upstream killed), `tls`
//! (protocols, ciphers, redirect, headers), `rate_limit` (nginx's own 429) and `request_ids` (one id from
//! nginx's log to cozy's, forwarded headers).
//!
//! Needs what `scripts/test` sets up: MariaDB + Redis (`scripts/ensure-services`) and nginx, openssl, curl
//! and gixy-ng (`scripts/ensure-nginx-tools`, which exports `COZY_TEST_GIXY`).

#[path = "../api/helpers.rs"]
mod helpers;

mod estate;
mod ws;

mod bad_input;
mod failover;
mod flows;
mod rate_limit;
mod realtime;
mod request_ids;
mod tls;
mod validate;
