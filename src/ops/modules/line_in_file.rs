//! The `line_in_file` module: one line of a file is present (or absent), as Ansible's `lineinfile`.
//!
//! The file is read in one round trip, the new content is computed here ([`edit`], a pure function), and
//! written through [`put_file`] only when it differs: idempotent, atomic, and `--diff` shows a unified
//! diff. Semantics, as in Ansible: with `regexp`, the *last* matching line is replaced by `line`; when
//! nothing matches (and `line` is not already there), `line` goes after the last line matching
//! `insert_after`, or at the end. `state: absent` removes every line matching `regexp` (or equal to
//! `line`).

use futures::future::BoxFuture;
use regex::Regex;
use serde::Deserialize;

use super::{
    de_mode, parse_args, put_file, stat, unified_diff, Ctx, FileAttrs, FileKind, Module,
    ModuleError, ModuleSpec, Outcome,
};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "line_in_file",
    args: &[
        "path",
        "line",
        "regexp",
        "state",
        "insert_after",
        "create",
        "mode",
    ],
    free_form: None,
    build,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Present,
    Absent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    path: String,
    line: Option<String>,
    regexp: Option<String>,
    #[serde(default = "present")]
    state: State,
    insert_after: Option<String>,
    #[serde(default)]
    create: bool,
    #[serde(default, deserialize_with = "de_mode")]
    mode: Option<u32>,
}

fn present() -> State {
    State::Present
}

/// Where a missing line goes.
#[derive(Debug)]
enum InsertAfter {
    Eof,
    /// After the last line matching; at the end when none does.
    Match(Regex),
}

/// The edit, with its regular expressions compiled.
#[derive(Debug)]
struct Edit {
    state: State,
    line: Option<String>,
    regexp: Option<Regex>,
    insert_after: InsertAfter,
}

fn compile(arg: &str, pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("argument `{arg}`: {e}"))
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    if args.path.is_empty() {
        return Err("argument `path`: must not be empty".into());
    }
    if let Some(line) = &args.line {
        if line.contains('\n') {
            return Err("argument `line`: must be one line (no newline)".into());
        }
    }
    match args.state {
        State::Present if args.line.is_none() => {
            return Err("argument `line` is required with `state: present`".into())
        }
        State::Absent if args.line.is_none() && args.regexp.is_none() => {
            return Err("argument `regexp` or `line` is required with `state: absent`".into())
        }
        State::Absent if args.insert_after.is_some() => {
            return Err("argument `insert_after`: not valid with `state: absent`".into())
        }
        _ => {}
    }
    let edit = Edit::new(&args)?;
    Ok(Box::new(LineInFile { args, edit }))
}

impl Edit {
    fn new(args: &Args) -> Result<Edit, String> {
        Ok(Edit {
            state: args.state,
            line: args.line.clone(),
            regexp: args
                .regexp
                .as_deref()
                .map(|r| compile("regexp", r))
                .transpose()?,
            insert_after: match args.insert_after.as_deref() {
                None | Some("EOF") => InsertAfter::Eof,
                Some(r) => InsertAfter::Match(compile("insert_after", r)?),
            },
        })
    }

    /// The file's new content, or `None` when it already is as wanted. Lines are compared without
    /// their `\r`; a file without a final newline gets one only when a line is appended.
    fn apply(&self, text: &str) -> Option<String> {
        let mut lines: Vec<&str> = text.split_inclusive('\n').collect();
        let bare = |l: &str| l.trim_end_matches('\n').trim_end_matches('\r').to_string();
        let matches = |l: &str| match (&self.regexp, &self.line) {
            (Some(re), _) => re.is_match(&bare(l)),
            (None, Some(line)) => bare(l) == *line,
            (None, None) => false,
        };
        match self.state {
            State::Absent => {
                let before = lines.len();
                lines.retain(|l| !matches(l));
                (lines.len() != before).then(|| lines.concat())
            }
            State::Present => {
                let line = self.line.as_deref().unwrap_or_default();
                let new_line = format!("{line}\n");
                if let Some(i) = lines.iter().rposition(|l| matches(l)) {
                    if bare(lines[i]) == line {
                        return None;
                    }
                    // Keep the line's own ending (`\r\n`, or none on a last line).
                    let ending = &lines[i][lines[i].trim_end_matches(['\r', '\n']).len()..];
                    let replaced = format!("{line}{ending}");
                    let mut out: Vec<&str> = lines.clone();
                    out[i] = &replaced;
                    return Some(out.concat());
                }
                if lines.iter().any(|l| bare(l) == line) {
                    return None;
                }
                let at = match &self.insert_after {
                    InsertAfter::Match(re) => lines
                        .iter()
                        .rposition(|l| re.is_match(&bare(l)))
                        .map_or(lines.len(), |i| i + 1),
                    InsertAfter::Eof => lines.len(),
                };
                let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                if at > 0 && !out[at - 1].ends_with('\n') {
                    out[at - 1].push('\n');
                }
                out.insert(at, new_line);
                Some(out.concat())
            }
        }
    }
}

struct LineInFile {
    args: Args,
    edit: Edit,
}

impl Module for LineInFile {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let path = &self.args.path;
            let state = stat(ctx, path, true).await?;
            let old = match state.kind {
                FileKind::File => {
                    let bytes = state.content.clone().unwrap_or_default();
                    String::from_utf8(bytes).map_err(|_| {
                        ModuleError::new(format!(
                            "{path} is not UTF-8 text; line_in_file edits text"
                        ))
                    })?
                }
                FileKind::Absent if self.edit.state == State::Absent => {
                    return Ok(Outcome::unchanged())
                }
                FileKind::Absent if self.args.create => String::new(),
                // In check mode an earlier task may only have *planned* to install the file's package.
                FileKind::Absent if ctx.check => {
                    let mut outcome = Outcome::changed(Some(format!(
                        "{path}: does not exist yet; would be edited once an earlier task creates it"
                    )));
                    outcome.notes.push(format!(
                        "{path} does not exist yet (check mode: assuming an earlier task creates it)"
                    ));
                    return Ok(outcome);
                }
                FileKind::Absent => {
                    return Err(ModuleError::new(format!(
                        "{path} does not exist (set `create: true` to create it)"
                    )))
                }
                kind => {
                    return Err(ModuleError::new(format!(
                        "{path} is {}, not a file",
                        kind.describe()
                    )))
                }
            };
            let attrs = FileAttrs {
                mode: self.args.mode,
                ..FileAttrs::default()
            };
            let new = self.edit.apply(&old);
            let attr_changes = if state.kind == FileKind::File {
                attrs.changes(&state)
            } else {
                Vec::new()
            };
            if new.is_none() && attr_changes.is_empty() {
                return Ok(Outcome::unchanged());
            }
            let mut diff = String::new();
            if let Some(new) = &new {
                if ctx.diff || ctx.check {
                    diff = unified_diff(path, &old, new).unwrap_or_default();
                }
            }
            if !attr_changes.is_empty() {
                diff.push_str(&format!("{path}: {}\n", attr_changes.join(", ")));
            }
            if !ctx.check {
                match &new {
                    Some(new) => put_file(ctx, path, new.as_bytes(), &attrs, None).await?,
                    None => {
                        ctx.run_ok(
                            &format!("{path}: {}", attr_changes.join(", ")),
                            format!("set -e; {}", attrs.script(&quote(path), false)),
                        )
                        .await?;
                    }
                }
            }
            Ok(Outcome::changed((!diff.is_empty()).then_some(diff)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::modules::file::tests::{run_local, NoTemplates};

    fn edit(mut args: serde_json::Value) -> Edit {
        args["path"] = "/x".into();
        assert!(build(args.clone()).is_ok(), "{args}");
        Edit::new(&parse_args(args).unwrap()).unwrap()
    }

    #[test]
    fn regexp_replaces_the_last_matching_line() {
        let e =
            edit(serde_json::json!({"regexp": "^#?PermitRootLogin", "line": "PermitRootLogin no"}));
        let text = "#PermitRootLogin prohibit-password\nPort 22\nPermitRootLogin yes\n";
        assert_eq!(
            e.apply(text).unwrap(),
            "#PermitRootLogin prohibit-password\nPort 22\nPermitRootLogin no\n"
        );
        assert_eq!(e.apply(&e.apply(text).unwrap()), None, "not idempotent");
    }

    #[test]
    fn no_match_inserts_after_the_last_insert_after_match_or_at_the_end() {
        let e = edit(
            serde_json::json!({"regexp": "^UMASK", "line": "UMASK 027", "insert_after": "^#"}),
        );
        assert_eq!(
            e.apply("# a\nX 1\n# b\nY 2").unwrap(),
            "# a\nX 1\n# b\nUMASK 027\nY 2"
        );
        let e = edit(serde_json::json!({"line": "last"}));
        assert_eq!(e.apply("a\nb").unwrap(), "a\nb\nlast\n");
        assert_eq!(e.apply("").unwrap(), "last\n");
        assert_eq!(e.apply("a\nlast\nb\n"), None);
        let e = edit(serde_json::json!({"line": "x", "insert_after": "^nothing"}));
        assert_eq!(e.apply("a\n").unwrap(), "a\nx\n");
    }

    #[test]
    fn a_present_line_that_does_not_match_its_regexp_is_left_alone() {
        let e = edit(serde_json::json!({"regexp": "^never", "line": "kept"}));
        assert_eq!(e.apply("kept\n"), None);
    }

    #[test]
    fn absent_removes_every_matching_line() {
        let e = edit(serde_json::json!({"regexp": "^tmp", "state": "absent"}));
        assert_eq!(e.apply("tmp1\nkeep\ntmp2\r\n").unwrap(), "keep\n");
        assert_eq!(e.apply("keep\n"), None);
        let e = edit(serde_json::json!({"line": "exact", "state": "absent"}));
        assert_eq!(e.apply("exact\nexactly\n").unwrap(), "exactly\n");
    }

    #[test]
    fn crlf_endings_are_kept_on_a_replaced_line() {
        let e = edit(serde_json::json!({"regexp": "^a=", "line": "a=2"}));
        assert_eq!(e.apply("a=1\r\nb=1\r\n").unwrap(), "a=2\r\nb=1\r\n");
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = |v| (SPEC.build)(v).err().unwrap();
        assert!(
            err(serde_json::json!({"path": "/x", "line": "a", "regexp": "("})).contains("`regexp`")
        );
        assert!(err(serde_json::json!({"path": "/x"})).contains("`line`"));
        assert!(err(serde_json::json!({"path": "/x", "state": "absent"})).contains("`regexp`"));
        assert!(err(serde_json::json!({"path": "/x", "line": "a\nb"})).contains("one line"));
    }

    #[tokio::test]
    async fn edits_a_real_file_once_and_check_mode_leaves_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("login.defs");
        std::fs::write(&path, "PASS_MAX_DAYS 99999\nUMASK 022\n").unwrap();
        let args = serde_json::json!({"path": path, "regexp": "^UMASK", "line": "UMASK 027", "mode": "0640"});

        let checked = run_local(&SPEC, args.clone(), true, &NoTemplates)
            .await
            .unwrap();
        assert!(checked.changed);
        let diff = checked.diff.unwrap();
        assert!(
            diff.contains("-UMASK 022") && diff.contains("+UMASK 027"),
            "{diff}"
        );
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("UMASK 022"));

        assert!(
            run_local(&SPEC, args.clone(), false, &NoTemplates)
                .await
                .unwrap()
                .changed
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "PASS_MAX_DAYS 99999\nUMASK 027\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert!(
            !run_local(&SPEC, args, false, &NoTemplates)
                .await
                .unwrap()
                .changed
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_created_only_with_create() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("new.conf");
        let args = serde_json::json!({"path": path, "line": "a=1"});
        let err = run_local(&SPEC, args, false, &NoTemplates)
            .await
            .unwrap_err();
        assert!(err.message.contains("create: true"), "{err}");

        let args = serde_json::json!({"path": path, "line": "a=1", "create": true});
        assert!(
            run_local(&SPEC, args.clone(), false, &NoTemplates)
                .await
                .unwrap()
                .changed
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a=1\n");
        assert!(
            !run_local(&SPEC, args, false, &NoTemplates)
                .await
                .unwrap()
                .changed
        );

        let gone =
            serde_json::json!({"path": tmp.path().join("none"), "line": "a", "state": "absent"});
        assert!(
            !run_local(&SPEC, gone, false, &NoTemplates)
                .await
                .unwrap()
                .changed
        );
    }
}
