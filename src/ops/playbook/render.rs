//! Templating of playbooks with minijinja (Jinja2 syntax, which Ansible users already write).
//!
//! Arguments stay as written in the model until a host runs the task; here they are rendered with that
//! host's variables. A string that is exactly one `{{ expression }}` keeps the expression's type (a list
//! stays a list, a number a number), as in Ansible; any other string with `{{`/`{%` renders to a string.
//! Undefined variables are errors (a misspelt variable must not silently become an empty string), but
//! `x is defined` and `x | default(…)` work as usual.

use std::path::PathBuf;
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

use super::builtin;
use crate::ops::modules::Templates;

/// Where template files are looked up, first match wins: the playbook's `templates/`, the inventory's
/// `templates/`, then the built-in ones.
#[derive(Debug, Clone, Default)]
pub struct TemplateDirs {
    pub dirs: Vec<PathBuf>,
}

impl TemplateDirs {
    /// The text of template `name`, and where it came from.
    pub fn load(&self, name: &str) -> Result<(String, String), String> {
        if name.contains("..") {
            return Err(format!("template name `{name}` must not contain `..`"));
        }
        for dir in &self.dirs {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => return Ok((text, path.display().to_string())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        match builtin::template(name) {
            Some(text) => Ok((
                text.to_string(),
                format!("builtin:templates/provision/{name}"),
            )),
            None => Err(format!(
                "template `{name}` not found in {}the built-in templates",
                self.dirs
                    .iter()
                    .map(|d| format!("{}, ", d.display()))
                    .collect::<String>()
            )),
        }
    }

    /// Reads a plain file (for `copy: src=`) from the same folders, without the built-in fallback
    /// (there are no built-in plain files).
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>, String> {
        let candidates: Vec<PathBuf> = if std::path::Path::new(name).is_absolute() {
            vec![PathBuf::from(name)]
        } else {
            // `DIR/templates` → `DIR/files/NAME`, then `DIR/NAME` (Ansible's layout, and a plain one).
            self.dirs
                .iter()
                .filter_map(|d| d.parent())
                .flat_map(|base| [base.join("files").join(name), base.join(name)])
                .collect()
        };
        for path in &candidates {
            match std::fs::read(path) {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        Err(format!(
            "file `{name}` not found next to the playbook or the inventory"
        ))
    }
}

/// The minijinja environment of one run.
pub struct Renderer {
    env: Environment<'static>,
    dirs: Arc<TemplateDirs>,
}

impl Renderer {
    pub fn new(dirs: TemplateDirs) -> Self {
        let dirs = Arc::new(dirs);
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // As Ansible's `template`: a block tag's own newline is dropped, the file's last one kept.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .keep_trailing_newline(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        let loader_dirs = dirs.clone();
        env.set_loader(move |name| match loader_dirs.load(name) {
            Ok((text, _)) => Ok(Some(text)),
            Err(_) => Ok(None),
        });
        Renderer { env, dirs }
    }

    /// Renders every string in `value` with `vars`.
    pub fn render_value(&self, value: &Json, vars: &Value) -> Result<Json, String> {
        Ok(match value {
            Json::String(s) => self.render_str_value(s, vars)?,
            Json::Array(items) => Json::Array(
                items
                    .iter()
                    .map(|v| self.render_value(v, vars))
                    .collect::<Result<_, _>>()?,
            ),
            Json::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), self.render_value(v, vars)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }

    fn render_str_value(&self, s: &str, vars: &Value) -> Result<Json, String> {
        if !s.contains("{{") && !s.contains("{%") {
            return Ok(Json::String(s.to_string()));
        }
        if let Some(expr) = sole_expression(s) {
            let value = self.eval(expr, vars)?;
            return serde_json::to_value(&value).map_err(|e| format!("`{s}`: {e}"));
        }
        self.render_str(s, vars).map(Json::String)
    }

    /// Renders a template string.
    pub fn render_str(&self, s: &str, vars: &Value) -> Result<String, String> {
        self.env
            .render_str(s, vars.clone())
            .map_err(|e| format!("`{s}`: {}", describe(&e)))
    }

    /// Evaluates an expression (`when:`); `{{ … }}` around it is tolerated.
    pub fn eval(&self, expr: &str, vars: &Value) -> Result<Value, String> {
        let expr = sole_expression(expr).unwrap_or(expr).trim();
        let compiled = self
            .env
            .compile_expression(expr)
            .map_err(|e| format!("`{expr}`: {}", describe(&e)))?;
        let value = compiled
            .eval(vars.clone())
            .map_err(|e| format!("`{expr}`: {}", describe(&e)))?;
        // Strict mode only catches undefined values that are printed or iterated; an expression that
        // *is* undefined (a misspelt variable) must fail too.
        if value.is_undefined() {
            return Err(format!(
                "`{expr}` is undefined (a misspelt or missing variable?)"
            ));
        }
        Ok(value)
    }

    /// Whether every condition holds.
    pub fn when(&self, conditions: &[String], vars: &Value) -> Result<bool, String> {
        for c in conditions {
            if !self.eval(c, vars)?.is_true() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Renders template file `name` with `vars`.
    pub fn render_file(&self, name: &str, vars: &Value) -> Result<String, String> {
        let (_, origin) = self.dirs.load(name)?;
        let template = self
            .env
            .get_template(name)
            .map_err(|e| format!("{origin}: {}", describe(&e)))?;
        template
            .render(vars.clone())
            .map_err(|e| format!("{origin}: {}", describe(&e)))
    }

    pub fn dirs(&self) -> &TemplateDirs {
        &self.dirs
    }
}

/// `{{ expr }}` with nothing around it → `expr`.
fn sole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%"))
        .then_some(inner.trim())
}

/// A minijinja error with its line (when it has one) and its detail.
pub(crate) fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    if let Some(line) = e.line() {
        if !text.contains("line") {
            text = format!("line {line}: {text}");
        }
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// [`Templates`] for one task: the renderer plus that task's variables.
pub struct TaskTemplates<'a> {
    pub renderer: &'a Renderer,
    pub vars: Value,
}

impl Templates for TaskTemplates<'_> {
    fn render_file(&self, src: &str) -> Result<String, String> {
        self.renderer.render_file(src, &self.vars)
    }

    fn read_local_file(&self, src: &str) -> Result<Vec<u8>, String> {
        self.renderer.dirs().read_file(src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::value::Serde;
    use serde_json::json;

    fn vars() -> Value {
        Value::from(Serde(
            json!({"pkgs": ["a", "b"], "port": 22, "name": "web", "on": true}),
        ))
    }

    #[test]
    fn a_sole_expression_keeps_its_type_and_text_renders_to_a_string() {
        let r = Renderer::new(TemplateDirs::default());
        let v = vars();
        assert_eq!(
            r.render_value(&json!("{{ pkgs }}"), &v).unwrap(),
            json!(["a", "b"])
        );
        assert_eq!(r.render_value(&json!("{{ port }}"), &v).unwrap(), json!(22));
        assert_eq!(
            r.render_value(&json!({"dest": "/etc/{{ name }}.conf", "n": 1}), &v)
                .unwrap(),
            json!({"dest": "/etc/web.conf", "n": 1})
        );
    }

    #[test]
    fn undefined_variables_are_errors_but_default_and_defined_work() {
        let r = Renderer::new(TemplateDirs::default());
        let v = vars();
        let err = r.render_value(&json!("{{ nmae }}"), &v).unwrap_err();
        assert!(err.contains("nmae"), "{err}");
        assert_eq!(
            r.render_value(&json!("{{ x | default(3) }}"), &v).unwrap(),
            json!(3)
        );
        assert!(!r.when(&["x is defined".into()], &v).unwrap());
        assert!(r.when(&["on".into(), "port == 22".into()], &v).unwrap());
        assert!(!r.when(&["{{ port != 22 }}".into()], &v).unwrap());
    }
}
