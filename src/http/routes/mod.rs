//! Handlers, one file per area of http-api.md.

pub mod accounts;
pub mod ops;
pub mod reservations;
pub mod resources;
