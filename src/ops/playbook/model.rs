//! The playbook model: what the parser produces and the runner executes.
//!
//! Arguments, `when` and `loop` stay as written (templates unrendered) until a host runs the task, because
//! they may use that host's variables and facts. Everything that can be checked without a host — the
//! module name, argument names, keyword types — is checked by the parser, with the location.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::ops::modules::ModuleSpec;

/// Where something was written: `file:line:column` (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<str>,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// A parsed playbook file.
#[derive(Debug, Clone)]
pub struct Playbook {
    /// The name shown to users: a path on disk, or `builtin:harden` for an embedded one.
    pub name: String,
    /// The directory of the file on disk (templates are looked up in `DIR/templates/` first).
    pub dir: Option<PathBuf>,
    pub plays: Vec<Play>,
}

/// One play: which hosts, with which defaults, run which tasks.
#[derive(Debug, Clone)]
pub struct Play {
    pub name: String,
    /// A host or group pattern of the inventory (`all` when not given).
    pub hosts: String,
    /// Variable defaults: the inventory, host vars and `-e` override them (so every setting of a built-in
    /// playbook can be changed without editing it).
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// Run tasks as root unless a task says otherwise (default true: provisioning is root's work).
    pub become_root: bool,
    pub tasks: Vec<Task>,
    pub handlers: Vec<Task>,
    pub location: Location,
}

/// One task (or handler): one module call with its keywords.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub module: &'static ModuleSpec,
    /// The module's arguments as written (strings may hold `{{ … }}`, rendered per host).
    pub args: serde_json::Value,
    /// Handler names to notify when this task changes something.
    pub notify: Vec<String>,
    /// minijinja expressions; the task runs when all are true.
    pub when: Vec<String>,
    pub tags: Vec<String>,
    /// Overrides the play's `become`.
    pub become_root: Option<bool>,
    /// `loop:` — the task runs once per item, with `item` bound.
    pub loop_items: Option<Loop>,
    /// `register: NAME` — the outcome is stored as a variable for later tasks.
    pub register: Option<String>,
    /// `ignore_errors: true` — a failure is reported but the host goes on.
    pub ignore_errors: bool,
    pub location: Location,
}

/// The items of a `loop:`.
#[derive(Debug, Clone, PartialEq)]
pub enum Loop {
    /// A literal YAML list (its strings may hold templates).
    Items(Vec<serde_json::Value>),
    /// A template that renders to a list, e.g. `"{{ packages }}"`.
    Expr(String),
}

/// Errors of the parser: always with the location of the fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ParseError {
    pub location: Location,
    pub message: String,
}
