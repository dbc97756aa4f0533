//! The `group` module (not written yet).

use super::{Module, ModuleSpec};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "group",
    args: &[],
    free_form: None,
    build,
};

fn build(_args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    Err("the group module is not written yet".into())
}
