//! The `copy` module (not written yet).

use super::{Module, ModuleSpec};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "copy",
    args: &[],
    free_form: None,
    build,
};

fn build(_args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    Err("the copy module is not written yet".into())
}
