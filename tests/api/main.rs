//! Integration tests: the real `cozy` binary over HTTP, on SQLite and on MySQL + Redis.
//! All modules compile into this one test binary so linking happens once.

mod helpers;

mod accounts;
mod cli;
mod cluster;
mod concurrency;
mod crash;
mod expiry;
mod idempotency;
mod ops;
mod payments;
mod proxy;
mod realtime;
mod reservations;
mod resources;
