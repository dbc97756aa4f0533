//! Integration tests of `cozy provision` on real test hosts (tests/testbed): one test binary, so that
//! linking happens once.

#[path = "../api/helpers.rs"]
mod helpers;

mod harden;
mod modules_system;
mod nginx;
mod playbooks;
mod scene;
mod testbed;
