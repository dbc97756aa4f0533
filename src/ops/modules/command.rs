//! The `command` module (not written yet).

use super::{Module, ModuleSpec};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "command",
    args: &[],
    free_form: None,
    build,
};

fn build(_args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    Err("the command module is not written yet".into())
}

/// `shell`: like `command`, through `sh -c` (pipes, redirections, globbing).
pub static SHELL: ModuleSpec = ModuleSpec {
    name: "shell",
    args: &[],
    free_form: None,
    build,
};
