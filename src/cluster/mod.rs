//! The supervised process cluster: a master that starts, watches and restarts `cozy serve` workers.
//!
//! The pure helpers the supervisor leans on live here as their own small modules: [`procstat`] samples a
//! worker's CPU and memory from `/proc`, [`prometheus`] merges the workers' `/metrics` expositions into one,
//! and [`size`] parses and prints byte sizes such as `--max-memory 512M`.

pub mod master;
pub mod procstat;
pub mod prometheus;
pub mod protocol;
pub mod size;
pub mod worker;
