//! The `copy` module: a file on the host holds the given content (inline, or a file of the controller).
//!
//! One round trip reads the file's metadata and, to compare, either its content (small files: it is also
//! what `--diff` shows) or its SHA-256 (big ones are never downloaded). A different content is written
//! atomically through [`put_file`] (with `validate` run on the temporary file first); when only the mode
//! or owner differ, one `chmod`/`chown` script fixes them. [`converge`] is shared with `template`.

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{
    de_mode, parse_args, put_file, sha256_hex, stat_with, unified_diff, Ctx, FileAttrs, FileKind,
    Module, ModuleError, ModuleSpec, Outcome, Read,
};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "copy",
    args: &[
        "dest", "content", "src", "mode", "owner", "group", "validate",
    ],
    free_form: None,
    build,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    dest: String,
    content: Option<String>,
    /// A file on the controller, relative to the playbook's directory.
    src: Option<String>,
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
    match (&args.content, &args.src) {
        (Some(_), Some(_)) => Err("arguments `content` and `src`: give one, not both".into()),
        (None, None) => Err("argument `content` or `src` is required".into()),
        _ => Ok(Box::new(Copy { args })),
    }
}

/// `dest` names a file: not empty, not a directory path.
pub(crate) fn check_dest(dest: &str) -> Result<(), String> {
    if dest.is_empty() || dest.ends_with('/') {
        return Err(format!(
            "argument `dest`: {dest:?} must be the path of a file (with its name)"
        ));
    }
    Ok(())
}

/// `validate` must say where the candidate file goes.
pub(crate) fn check_validate(validate: &str) -> Result<(), String> {
    if validate.contains("%s") {
        Ok(())
    } else {
        Err(format!(
            "argument `validate`: {validate:?} must contain %s (the file to check)"
        ))
    }
}

struct Copy {
    args: Args,
}

impl Module for Copy {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let a = &self.args;
            let content = match (&a.content, &a.src) {
                (Some(text), _) => text.clone().into_bytes(),
                (None, Some(src)) => ctx
                    .templates
                    .read_local_file(src)
                    .map_err(|e| ModuleError::new(format!("argument `src`: {e}")))?,
                (None, None) => unreachable!("build requires content or src"),
            };
            let attrs = FileAttrs {
                mode: a.mode,
                owner: a.owner.clone(),
                group: a.group.clone(),
            };
            converge(ctx, &a.dest, &content, &attrs, a.validate.as_deref()).await
        })
    }
}

/// Makes `dest` hold `content` with `attrs`: reads it (one round trip), then writes it only if the
/// content differs, or fixes only the attributes that differ. The diff is a unified diff for text up to
/// [`super::DIFF_MAX_BYTES`], a one-line summary otherwise.
pub(crate) async fn converge(
    ctx: &Ctx<'_>,
    dest: &str,
    content: &[u8],
    attrs: &FileAttrs,
    validate: Option<&str>,
) -> Result<Outcome, ModuleError> {
    let state = stat_with(ctx, dest, Read::Compare).await?;
    match state.kind {
        FileKind::File | FileKind::Absent => {}
        kind => {
            return Err(ModuleError::new(format!(
                "{dest} is {}, not a file: give the path of the file itself",
                kind.describe()
            )))
        }
    }
    let same_content = state.kind == FileKind::File
        && match (&state.content, &state.sha256) {
            (Some(old), _) => old.as_slice() == content,
            (None, Some(sha)) => *sha == sha256_hex(content),
            (None, None) => false,
        };
    let attr_changes = if state.kind == FileKind::File {
        attrs.changes(&state)
    } else {
        Vec::new()
    };
    if same_content && attr_changes.is_empty() {
        return Ok(Outcome::unchanged());
    }

    let mut diff = String::new();
    if !same_content && (ctx.diff || ctx.check) {
        diff = content_diff(dest, &state, content);
    }
    if !attr_changes.is_empty() {
        diff.push_str(&format!("{dest}: {}\n", attr_changes.join(", ")));
    }

    if !ctx.check {
        if same_content {
            let p = quote(dest);
            ctx.run_ok(
                &format!("{dest}: {}", attr_changes.join(", ")),
                format!("set -e; {}", attrs.script(&p, false)),
            )
            .await?;
        } else {
            put_file(ctx, dest, content, attrs, validate).await?;
        }
    }
    Ok(Outcome::changed((!diff.is_empty()).then_some(diff)))
}

/// A unified diff when both sides are readable text, else a summary line.
fn content_diff(dest: &str, state: &super::FileState, new: &[u8]) -> String {
    let old: Option<&[u8]> = match state.kind {
        FileKind::Absent => Some(b""),
        _ => state.content.as_deref(),
    };
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
    match (old.and_then(text), text(new)) {
        (Some(old), Some(new)) if new.len() <= super::DIFF_MAX_BYTES => {
            unified_diff(dest, &old, &new).unwrap_or_default()
        }
        _ if state.kind == FileKind::Absent => {
            format!("{dest}: create ({} bytes)\n", new.len())
        }
        _ => format!(
            "{dest}: content differs (now {} bytes, sha256 {}…)\n",
            new.len(),
            &sha256_hex(new)[..12]
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::modules::file::tests::{run_local, NoTemplates};
    use crate::ops::modules::Templates;
    use std::os::unix::fs::PermissionsExt;

    async fn copy(args: serde_json::Value, check: bool) -> Result<Outcome, ModuleError> {
        run_local(&SPEC, args, check, &NoTemplates).await
    }

    #[tokio::test]
    async fn content_is_written_once_with_its_mode_and_diffed() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("motd");
        std::fs::write(&dest, "hello\nold line\n").unwrap();
        let args =
            serde_json::json!({"dest": dest, "content": "hello\nnew line\n", "mode": "0600"});

        let checked = copy(args.clone(), true).await.unwrap();
        assert!(checked.changed);
        let diff = checked.diff.unwrap();
        assert!(
            diff.contains("-old line") && diff.contains("+new line"),
            "{diff}"
        );
        assert!(diff.contains("mode 0644 → 0600"), "{diff}");
        assert_eq!(
            std::fs::read_to_string(&dest).unwrap(),
            "hello\nold line\n",
            "check mode wrote"
        );

        assert!(copy(args.clone(), false).await.unwrap().changed);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "hello\nnew line\n");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        let again = copy(args, false).await.unwrap();
        assert!(!again.changed, "{again:?}");
    }

    #[tokio::test]
    async fn a_new_file_gets_the_umask_mode_not_mktemps() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("new");
        let out = copy(serde_json::json!({"dest": dest, "content": "x\n"}), false)
            .await
            .unwrap();
        assert!(out.changed);
        assert!(out.diff.unwrap().contains("+x"));
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        // The test process's umask (022 or 002 usually): never mktemp's 0600.
        assert_eq!(mode & 0o444, 0o444, "mode {mode:o}");
    }

    #[tokio::test]
    async fn failed_validation_leaves_the_original_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("conf");
        std::fs::write(&dest, "good\n").unwrap();
        let args = serde_json::json!({
            "dest": dest, "content": "bad\n", "validate": "grep -q good %s"
        });
        let err = copy(args, false).await.unwrap_err();
        assert!(err.message.contains("validation failed"), "{err}");
        assert!(err.message.contains(dest.to_str().unwrap()), "{err}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "good\n");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");

        let ok = serde_json::json!({
            "dest": dest, "content": "good too\n", "validate": "grep -q good %s"
        });
        assert!(copy(ok, false).await.unwrap().changed);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "good too\n");
    }

    #[tokio::test]
    async fn big_files_are_compared_by_sha256_and_summarised() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("big");
        let big = "0123456789abcdef\n".repeat(super::super::DIFF_MAX_BYTES / 8);
        std::fs::write(&dest, &big).unwrap();
        let same = serde_json::json!({"dest": dest, "content": big});
        assert!(!copy(same, false).await.unwrap().changed);

        let bigger = format!("{big}tail\n");
        let out = copy(serde_json::json!({"dest": dest, "content": bigger}), false)
            .await
            .unwrap();
        assert!(out.changed);
        assert!(out.diff.unwrap().contains("content differs"));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), bigger);
    }

    struct LocalFiles(std::path::PathBuf);
    impl Templates for LocalFiles {
        fn render_file(&self, src: &str) -> Result<String, String> {
            Err(format!("no template {src}"))
        }
        fn read_local_file(&self, src: &str) -> Result<Vec<u8>, String> {
            std::fs::read(self.0.join(src)).map_err(|e| format!("{src}: {e}"))
        }
    }

    #[tokio::test]
    async fn src_is_read_on_the_controller() {
        let local = tempfile::tempdir().unwrap();
        std::fs::write(local.path().join("files.txt"), b"\x00binary\xff").unwrap();
        let remote = tempfile::tempdir().unwrap();
        let dest = remote.path().join("copy");
        let files = LocalFiles(local.path().into());
        let args = serde_json::json!({"dest": dest, "src": "files.txt"});

        let out = run_local(&SPEC, args.clone(), false, &files).await.unwrap();
        assert!(out.changed);
        assert_eq!(std::fs::read(&dest).unwrap(), b"\x00binary\xff");
        assert!(!run_local(&SPEC, args, false, &files).await.unwrap().changed);

        let missing = serde_json::json!({"dest": dest, "src": "nope"});
        let err = run_local(&SPEC, missing, false, &files).await.unwrap_err();
        assert!(
            err.message.contains("`src`") && err.message.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn content_xor_src_and_validate_needs_a_placeholder() {
        let err = |v| (SPEC.build)(v).err().unwrap();
        assert!(err(serde_json::json!({"dest": "/x"})).contains("`content` or `src`"));
        assert!(err(serde_json::json!({"dest": "/x", "content": "", "src": "a"})).contains("both"));
        assert!(
            err(serde_json::json!({"dest": "/x", "content": "", "validate": "true"}))
                .contains("%s")
        );
        assert!(err(serde_json::json!({"dest": "/etc/", "content": ""})).contains("`dest`"));
    }
}
