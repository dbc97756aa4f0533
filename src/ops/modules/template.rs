//! The `template` module (not written yet).

use super::{Module, ModuleSpec};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "template",
    args: &[],
    free_form: None,
    build,
};

fn build(_args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    Err("the template module is not written yet".into())
}
