//! Playbooks: the model, the parser (with file:line:col spans), the per-host runner and the reporting.
//!
//! - [`model`]: plays, tasks, handlers, locations.
//! - [`parse`]: YAML → [`model::Playbook`], every error at its file:line:column with the valid choices.
//! - [`yaml`]: YAML with positions (shared with the inventory): loading, scalar typing, located errors.
//! - [`builtin`]: the playbooks and templates embedded in the binary (`playbooks/`, `templates/`), which
//!   files on disk override.
//! - [`run`]: runs plays on hosts in parallel: connect (bootstrap when needed), gather facts, then per
//!   task: tags, `when`, loop, render arguments, run the module, notify handlers; handlers after the
//!   play's tasks, once each.
//! - [`report`]: progress bars on a terminal, plain lines otherwise, the recap table and `--json`.

pub mod builtin;
pub mod model;
pub mod parse;
pub mod render;
pub mod report;
pub mod run;
pub mod yaml;

pub use model::{Location, Loop, ParseError, Play, Playbook, Task};
