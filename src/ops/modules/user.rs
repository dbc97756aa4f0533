//! The `user` module (not written yet).

use super::{Module, ModuleSpec};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "user",
    args: &[],
    free_form: None,
    build,
};

fn build(_args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    Err("the user module is not written yet".into())
}
