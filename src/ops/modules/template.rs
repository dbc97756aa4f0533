//! The `template` module: a minijinja template of the controller, rendered with the task's variables,
//! then put on the host exactly as `copy` puts content (compare, atomic write, `validate`, diff).

use futures::future::BoxFuture;
use serde::Deserialize;

use super::copy::{check_dest, check_validate, converge};
use super::{de_mode, parse_args, Ctx, FileAttrs, Module, ModuleError, ModuleSpec, Outcome};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "template",
    args: &["src", "dest", "mode", "owner", "group", "validate"],
    free_form: None,
    build,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    src: String,
    dest: String,
    #[serde(default, deserialize_with = "de_mode")]
    mode: Option<u32>,
    owner: Option<String>,
    group: Option<String>,
    validate: Option<String>,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    check_dest(&args.dest)?;
    if let Some(v) = &args.validate {
        check_validate(v)?;
    }
    if args.src.is_empty() {
        return Err("argument `src`: must name a template file".into());
    }
    Ok(Box::new(Template { args }))
}

struct Template {
    args: Args,
}

impl Module for Template {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let a = &self.args;
            let text = ctx
                .templates
                .render_file(&a.src)
                .map_err(|e| ModuleError::new(format!("template {}: {e}", a.src)))?;
            let attrs = FileAttrs {
                mode: a.mode,
                owner: a.owner.clone(),
                group: a.group.clone(),
            };
            converge(ctx, &a.dest, text.as_bytes(), &attrs, a.validate.as_deref()).await
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::modules::file::tests::run_local;
    use crate::ops::modules::Templates;

    /// Templates for tests: minijinja over a directory of template files, with fixed variables.
    pub(crate) struct DirTemplates {
        pub dir: std::path::PathBuf,
        pub vars: serde_json::Value,
    }

    impl Templates for DirTemplates {
        fn render_file(&self, src: &str) -> Result<String, String> {
            let source =
                std::fs::read_to_string(self.dir.join(src)).map_err(|e| format!("{src}: {e}"))?;
            let mut env = minijinja::Environment::new();
            env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
            env.set_syntax(
                minijinja::syntax::SyntaxConfig::builder()
                    .keep_trailing_newline(true)
                    .build()
                    .map_err(|e| e.to_string())?,
            );
            env.render_str(&source, minijinja::value::Serde(&self.vars))
                .map_err(|e| format!("{e:#}"))
        }
    }

    #[tokio::test]
    async fn renders_with_the_vars_and_converges() {
        let local = tempfile::tempdir().unwrap();
        std::fs::write(
            local.path().join("site.conf.j2"),
            "listen {{ port }};\n{% for n in names %}server_name {{ n }};\n{% endfor %}",
        )
        .unwrap();
        let templates = DirTemplates {
            dir: local.path().into(),
            vars: serde_json::json!({"port": 8080, "names": ["a", "b"]}),
        };
        let remote = tempfile::tempdir().unwrap();
        let dest = remote.path().join("site.conf");
        let args = serde_json::json!({"src": "site.conf.j2", "dest": dest, "mode": "0644"});

        let checked = run_local(&SPEC, args.clone(), true, &templates)
            .await
            .unwrap();
        assert!(checked.changed);
        assert!(checked.diff.unwrap().contains("+listen 8080;"));
        assert!(!dest.exists());

        assert!(
            run_local(&SPEC, args.clone(), false, &templates)
                .await
                .unwrap()
                .changed
        );
        assert_eq!(
            std::fs::read_to_string(&dest).unwrap(),
            "listen 8080;\nserver_name a;\nserver_name b;\n"
        );
        assert!(
            !run_local(&SPEC, args, false, &templates)
                .await
                .unwrap()
                .changed
        );
    }

    #[tokio::test]
    async fn a_template_error_names_the_template() {
        let local = tempfile::tempdir().unwrap();
        std::fs::write(local.path().join("bad.j2"), "{{ missing_var }}\n").unwrap();
        let templates = DirTemplates {
            dir: local.path().into(),
            vars: serde_json::json!({}),
        };
        let remote = tempfile::tempdir().unwrap();
        let dest = remote.path().join("out");
        let args = serde_json::json!({"src": "bad.j2", "dest": dest});
        let err = run_local(&SPEC, args, false, &templates).await.unwrap_err();
        assert!(err.message.contains("template bad.j2"), "{err}");
        assert!(!dest.exists());
    }
}
