//! The `file` module: a path's kind (file, directory, symlink, absent) and its mode, owner and group.
//!
//! One `stat` round trip reads the path; when something differs, one script applies all of it. Content is
//! not this module's business (`copy`, `template`, `line_in_file` write files). `state: touch` creates a
//! missing file but, unlike Ansible, leaves an existing one's timestamps alone: a converged host must
//! report no change.

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{
    de_mode, parse_args, stat, Ctx, FileAttrs, FileKind, Module, ModuleError, ModuleSpec, Outcome,
};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "file",
    args: &["path", "state", "mode", "owner", "group", "src"],
    free_form: None,
    build,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    File,
    Directory,
    Link,
    Absent,
    Touch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
    #[serde(default = "default_state")]
    state: State,
    #[serde(default, deserialize_with = "de_mode")]
    mode: Option<u32>,
    owner: Option<String>,
    group: Option<String>,
    /// The link target for `state: link`.
    src: Option<String>,
}

fn default_state() -> State {
    State::File
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    if args.path.is_empty() {
        return Err("argument `path`: must not be empty".into());
    }
    match (args.state, &args.src) {
        (State::Link, None) => return Err("argument `src`: required with `state: link`".into()),
        (State::Link, Some(_)) | (_, None) => {}
        (_, Some(_)) => return Err("argument `src`: only valid with `state: link`".into()),
    }
    if args.state == State::Absent
        && (args.mode.is_some() || args.owner.is_some() || args.group.is_some())
    {
        return Err("arguments `mode`, `owner`, `group`: not valid with `state: absent`".into());
    }
    Ok(Box::new(File { args }))
}

struct File {
    args: Args,
}

impl File {
    fn attrs(&self) -> FileAttrs {
        FileAttrs {
            mode: self.args.mode,
            owner: self.args.owner.clone(),
            group: self.args.group.clone(),
        }
    }

    /// Plans the change: what to say about it, and the script that makes it (`None`: nothing to do).
    fn plan(&self, state: &super::FileState) -> Result<Option<(String, String)>, ModuleError> {
        let path = &self.args.path;
        let p = quote(path);
        let attrs = self.attrs();
        let wrong_kind = |want: &str| {
            ModuleError::new(format!(
                "{path} is {}, not {want}; remove it first (`state: absent`)",
                state.kind.describe()
            ))
        };
        // For an existing path of the right kind: only the attributes that differ.
        let fix_attrs = |no_deref: bool| {
            let changes = attrs.changes(state);
            (!changes.is_empty()).then(|| (changes.join(", "), attrs.script(&p, no_deref)))
        };
        Ok(match self.args.state {
            State::File => match state.kind {
                FileKind::File => fix_attrs(false),
                FileKind::Absent => {
                    return Err(ModuleError::new(format!(
                        "{path} does not exist (`state: file` does not create files: use `touch`, \
                         `copy` or `template`)"
                    )))
                }
                _ => return Err(wrong_kind("a file")),
            },
            State::Touch => match state.kind {
                FileKind::File => fix_attrs(false),
                FileKind::Absent => Some((
                    format!("create file{}", summary(&attrs)),
                    format!("touch -- {p}; {}", attrs.script(&p, false)),
                )),
                _ => return Err(wrong_kind("a file")),
            },
            State::Directory => match state.kind {
                FileKind::Directory => fix_attrs(false),
                FileKind::Absent => Some((
                    format!("create directory{}", summary(&attrs)),
                    format!("mkdir -p -- {p}; {}", attrs.script(&p, false)),
                )),
                _ => return Err(wrong_kind("a directory")),
            },
            State::Link => {
                let src = self.args.src.as_deref().unwrap_or_default();
                let relink = format!("ln -sfn -- {} {p}; {}", quote(src), attrs.script(&p, true));
                match state.kind {
                    FileKind::Link if state.link_target.as_deref() == Some(src) => fix_attrs(true),
                    FileKind::Link => Some((
                        format!(
                            "link target {} → {src}",
                            state.link_target.as_deref().unwrap_or_default()
                        ),
                        relink,
                    )),
                    FileKind::Absent => Some((format!("create link → {src}"), relink)),
                    // Replacing a real file or directory by a link loses data: the user says so first.
                    _ => return Err(wrong_kind("a symlink")),
                }
            }
            State::Absent => match state.kind {
                FileKind::Absent => None,
                kind => Some((
                    format!("remove {}", kind.describe()),
                    format!("rm -rf -- {p}"),
                )),
            },
        })
    }
}

/// " (mode 0750, owner deploy)" for a path being created.
fn summary(attrs: &FileAttrs) -> String {
    let mut parts = Vec::new();
    if let Some(mode) = attrs.mode {
        parts.push(format!("mode {mode:04o}"));
    }
    if let Some(owner) = &attrs.owner {
        parts.push(format!("owner {owner}"));
    }
    if let Some(group) = &attrs.group {
        parts.push(format!("group {group}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

impl Module for File {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let path = &self.args.path;
            let state = stat(ctx, path, false).await?;
            let Some((what, script)) = self.plan(&state)? else {
                return Ok(Outcome::unchanged());
            };
            if !ctx.check {
                ctx.run_ok(&format!("{path}: {what}"), format!("set -e; {script}"))
                    .await?;
            }
            Ok(Outcome::changed(Some(format!("{path}: {what}"))))
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::facts::Facts;
    use crate::ops::modules::Templates;
    use crate::ops::transport::LocalTransport;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// Templates for module tests: renders nothing, reads local files from a directory.
    pub(crate) struct NoTemplates;
    impl Templates for NoTemplates {
        fn render_file(&self, src: &str) -> Result<String, String> {
            Err(format!("no template {src}"))
        }
    }

    /// Runs the module `spec` with `args` on this machine (as the current user, root in CI).
    pub(crate) async fn run_local(
        spec: &ModuleSpec,
        args: serde_json::Value,
        check: bool,
        templates: &dyn Templates,
    ) -> Result<Outcome, ModuleError> {
        let module = (spec.build)(args).map_err(ModuleError::new)?;
        let host = LocalTransport::new("local");
        let facts = Facts::default();
        let ctx = Ctx {
            host: &host,
            check,
            diff: true,
            become_root: false,
            facts: &facts,
            templates,
        };
        module.run(&ctx).await
    }

    async fn file(args: serde_json::Value, check: bool) -> Result<Outcome, ModuleError> {
        run_local(&SPEC, args, check, &NoTemplates).await
    }

    fn mode_of(path: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[tokio::test]
    async fn directory_is_created_with_its_mode_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let args = serde_json::json!({"path": dir, "state": "directory", "mode": "0750"});

        let checked = file(args.clone(), true).await.unwrap();
        assert!(checked.changed);
        assert!(!dir.exists(), "check mode created the directory");

        let first = file(args.clone(), false).await.unwrap();
        assert!(first.changed);
        assert!(dir.is_dir());
        assert_eq!(mode_of(&dir), 0o750);
        let second = file(args, false).await.unwrap();
        assert!(!second.changed, "{second:?}");
    }

    #[tokio::test]
    async fn mode_and_owner_of_an_existing_file_are_fixed_and_summarised() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let args =
            serde_json::json!({"path": path, "mode": "0600", "owner": "nobody", "group": "0"});

        let out = file(args.clone(), false).await.unwrap();
        assert!(out.changed);
        let diff = out.diff.unwrap();
        assert!(diff.contains("mode 0644 → 0600"), "{diff}");
        assert!(diff.contains("owner root → nobody"), "{diff}");
        assert!(!diff.contains("group"), "group 0 is root's: {diff}");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_ne!(meta.uid(), 0);
        assert!(!file(args, false).await.unwrap().changed);
    }

    #[tokio::test]
    async fn state_file_refuses_a_missing_path() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("missing");
        let err = file(serde_json::json!({"path": path}), false)
            .await
            .unwrap_err();
        assert!(err.message.contains("does not exist"), "{err}");
        assert!(err.message.contains(path.to_str().unwrap()), "{err}");
    }

    #[tokio::test]
    async fn link_is_created_then_retargeted_but_never_replaces_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("current");
        let args = |src: &str| serde_json::json!({"path": link, "state": "link", "src": src});

        assert!(file(args("/etc/hostname"), false).await.unwrap().changed);
        assert_eq!(
            std::fs::read_link(&link).unwrap().to_str(),
            Some("/etc/hostname")
        );
        assert!(!file(args("/etc/hostname"), false).await.unwrap().changed);
        let out = file(args("/etc/hosts"), false).await.unwrap();
        assert!(out.changed);
        assert!(out.diff.unwrap().contains("/etc/hostname → /etc/hosts"));
        assert_eq!(
            std::fs::read_link(&link).unwrap().to_str(),
            Some("/etc/hosts")
        );

        let real = tmp.path().join("real");
        std::fs::write(&real, "data").unwrap();
        let err = file(
            serde_json::json!({"path": real, "state": "link", "src": "/etc/hosts"}),
            false,
        )
        .await
        .unwrap_err();
        assert!(err.message.contains("is a file, not a symlink"), "{err}");
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "data");
    }

    #[tokio::test]
    async fn absent_removes_a_tree_once_and_check_mode_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), "x").unwrap();
        let args = serde_json::json!({"path": dir, "state": "absent"});

        assert!(file(args.clone(), true).await.unwrap().changed);
        assert!(dir.exists());
        assert!(file(args.clone(), false).await.unwrap().changed);
        assert!(!dir.exists());
        assert!(!file(args, false).await.unwrap().changed);
    }

    #[tokio::test]
    async fn touch_creates_a_missing_file_and_then_reports_no_change() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t");
        let args = serde_json::json!({"path": path, "state": "touch", "mode": "0640"});
        assert!(file(args.clone(), false).await.unwrap().changed);
        assert_eq!(mode_of(&path), 0o640);
        assert!(!file(args, false).await.unwrap().changed);
    }

    #[test]
    fn arguments_are_checked_before_anything_runs() {
        let err = |v| (SPEC.build)(v).err().unwrap();
        assert!(err(serde_json::json!({"path": "/x", "state": "link"})).contains("`src`"));
        assert!(err(serde_json::json!({"path": "/x", "src": "/y"})).contains("`src`"));
        assert!(err(serde_json::json!({"path": "/x", "state": "gone"})).contains("state"));
        assert!(err(serde_json::json!({"path": "/x", "mod": "0644"})).contains("mod"));
        assert!(err(serde_json::json!({"path": "/x", "mode": "rw"})).contains("mode"));
    }
}
