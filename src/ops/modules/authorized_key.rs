//! The `authorized_key` module (not written yet).

use super::{Module, ModuleSpec};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "authorized_key",
    args: &[],
    free_form: None,
    build,
};

fn build(_args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    Err("the authorized_key module is not written yet".into())
}
