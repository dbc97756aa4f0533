//! The `command` and `shell` modules: run something on the host, unless the host says it is done.
//!
//! `command` splits `cmd` into words (shell-words rules) and runs them with `exec`, every word quoted:
//! no variables, globs, pipes or redirections, so a value from a variable cannot inject a second command.
//! `shell` gives `cmd` to `sh -c` as it is. Both skip when `creates` exists, when `removes` does not, or
//! when the `unless` shell command exits 0 — checked on the host in the same round trip as the run (the
//! script prints `run` or `skip:…` on its first line, then the command's own output follows). `unless`
//! commands only read, by contract, so `--check` runs them too and reports "would run" only for
//! commands that would really run. Changed means "ran".

use std::fmt::Write as _;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{parse_args, Ctx, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::{quote, Command};

const ARGS: &[&str] = &["cmd", "creates", "removes", "unless", "chdir", "stdin"];

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "command",
    args: ARGS,
    free_form: Some("cmd"),
    build: build_command,
};

/// `shell`: like `command`, through `sh -c` (pipes, redirections, globbing).
pub static SHELL: ModuleSpec = ModuleSpec {
    name: "shell",
    args: ARGS,
    free_form: Some("cmd"),
    build: build_shell,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    cmd: String,
    /// Skip when this path exists.
    creates: Option<String>,
    /// Skip when this path does not exist.
    removes: Option<String>,
    /// A shell command; skip when it exits 0.
    unless: Option<String>,
    chdir: Option<String>,
    /// Written to the command's stdin, with a final newline added when missing (as Ansible does).
    stdin: Option<String>,
}

fn build_command(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    let words = shell_words::split(&args.cmd).map_err(|e| format!("argument `cmd`: {e}"))?;
    if words.is_empty() {
        return Err("argument `cmd`: empty command".into());
    }
    // `exec` makes the first word a program even when it looks like `VAR=value` or a keyword.
    let quoted: Vec<String> = words.iter().map(|w| quote(w)).collect();
    let script = format!("exec {}", quoted.join(" "));
    Ok(Box::new(Run { args, script }))
}

fn build_shell(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    if args.cmd.trim().is_empty() {
        return Err("argument `cmd`: empty command".into());
    }
    let script = args.cmd.clone();
    Ok(Box::new(Run { args, script }))
}

struct Run {
    args: Args,
    /// The shell script that runs the command itself.
    script: String,
}

/// Why a command was skipped, or that it runs.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Run,
    Skip(String),
}

impl Run {
    /// The script: `cd`, the skip checks (printing the verdict on stdout's first line) and, unless only
    /// `checking`, the command.
    fn script(&self, checking: bool) -> String {
        let a = &self.args;
        let mut s = String::new();
        if let Some(dir) = &a.chdir {
            let _ = writeln!(s, "cd -- {} || exit 125", quote(dir));
        }
        if let Some(path) = &a.creates {
            let p = quote(path);
            let _ = writeln!(
                s,
                "if [ -e {p} ] || [ -L {p} ]; then echo skip:creates; exit 0; fi"
            );
        }
        if let Some(path) = &a.removes {
            let p = quote(path);
            let _ = writeln!(
                s,
                "if [ ! -e {p} ] && [ ! -L {p} ]; then echo skip:removes; exit 0; fi"
            );
        }
        if let Some(unless) = &a.unless {
            let _ = writeln!(
                s,
                "if sh -c {} </dev/null >/dev/null 2>&1; then echo skip:unless; exit 0; fi",
                quote(unless)
            );
        }
        s.push_str("echo run\n");
        if !checking {
            s.push_str(&self.script);
            s.push('\n');
        }
        s
    }

    fn skip_message(&self, why: &str) -> String {
        let a = &self.args;
        match why {
            "creates" => format!(
                "skipped, since {} exists",
                a.creates.as_deref().unwrap_or_default()
            ),
            "removes" => format!(
                "skipped, since {} does not exist",
                a.removes.as_deref().unwrap_or_default()
            ),
            _ => format!(
                "skipped, since `{}` succeeded",
                a.unless.as_deref().unwrap_or_default()
            ),
        }
    }
}

/// Splits the verdict line off the script's stdout.
fn split_verdict(stdout: &[u8]) -> Option<(Verdict, &[u8])> {
    let end = stdout.iter().position(|&b| b == b'\n')?;
    let (line, rest) = (&stdout[..end], &stdout[end + 1..]);
    match line {
        b"run" => Some((Verdict::Run, rest)),
        _ => {
            let why = std::str::from_utf8(line).ok()?.strip_prefix("skip:")?;
            Some((Verdict::Skip(why.to_string()), rest))
        }
    }
}

/// `rc`, `stdout`, `stderr` (without their final newline) and their lines, for `register`.
fn result_data(rc: i32, stdout: &[u8], stderr: &[u8]) -> Map<String, Value> {
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches('\n')
            .to_string()
    };
    let (out, err) = (text(stdout), text(stderr));
    let mut data = Map::new();
    data.insert("rc".into(), json!(rc));
    data.insert(
        "stdout_lines".into(),
        json!(out.lines().collect::<Vec<_>>()),
    );
    data.insert(
        "stderr_lines".into(),
        json!(err.lines().collect::<Vec<_>>()),
    );
    data.insert("stdout".into(), json!(out));
    data.insert("stderr".into(), json!(err));
    data
}

impl Module for Run {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let cmd = &self.args.cmd;
            let mut command = Command::new(self.script(ctx.check)).root(ctx.become_root);
            if let (Some(input), false) = (&self.args.stdin, ctx.check) {
                let mut bytes = input.clone().into_bytes();
                if !bytes.ends_with(b"\n") {
                    bytes.push(b'\n');
                }
                command = command.stdin(bytes);
            }
            let out = ctx.host.run(command).await?;
            let Some((verdict, stdout)) = split_verdict(&out.stdout) else {
                // Nothing ran: the `cd` (or the shell itself) failed before the checks.
                let what = match &self.args.chdir {
                    Some(dir) if out.status == 125 => format!("cannot change to chdir {dir}"),
                    _ => format!("cannot run `{cmd}`"),
                };
                return Err(ModuleError::new(format!("{what}: {}", out.error_text())));
            };
            if let Verdict::Skip(why) = verdict {
                let mut data = result_data(0, b"", b"");
                data.insert("msg".into(), json!(self.skip_message(&why)));
                return Ok(Outcome {
                    data,
                    ..Outcome::unchanged()
                });
            }
            if ctx.check {
                return Ok(Outcome::changed(Some(format!("would run: {cmd}"))));
            }
            let data = result_data(out.status, stdout, &out.stderr);
            if out.status != 0 {
                let shown = match String::from_utf8_lossy(&out.stderr).trim() {
                    "" => String::from_utf8_lossy(stdout).trim().to_string(),
                    err => err.to_string(),
                };
                return Err(ModuleError::new(format!(
                    "`{cmd}` failed (exit {}): {shown}",
                    out.status
                ))
                .with_data(data));
            }
            Ok(Outcome {
                changed: true,
                data,
                ..Outcome::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::modules::file::tests::{run_local, NoTemplates};

    async fn run(spec: &ModuleSpec, args: Value, check: bool) -> Result<Outcome, ModuleError> {
        run_local(spec, args, check, &NoTemplates).await
    }

    #[tokio::test]
    async fn command_passes_words_without_a_shell() {
        let out = run(
            &SPEC,
            json!({"cmd": "printf '%s|' 'a b' $HOME '*' ;"}),
            false,
        )
        .await
        .unwrap();
        assert!(out.changed);
        assert_eq!(out.data["stdout"], "a b|$HOME|*|;|");
        assert_eq!(out.data["rc"], 0);

        let out = run(&SPEC, json!({"cmd": "FOO=1 true"}), false).await;
        assert!(out.is_err(), "FOO=1 ran as an assignment: {out:?}");
    }

    #[tokio::test]
    async fn shell_runs_pipes_and_reads_stdin() {
        let out = run(
            &SHELL,
            json!({"cmd": "tr a-z A-Z | sed 's/^/> /'; echo warn >&2", "stdin": "hello"}),
            false,
        )
        .await
        .unwrap();
        assert_eq!(out.data["stdout"], "> HELLO");
        assert_eq!(out.data["stderr"], "warn");
        assert_eq!(out.data["stdout_lines"], json!(["> HELLO"]));
    }

    #[tokio::test]
    async fn a_failing_command_is_an_error_carrying_rc_and_stderr() {
        let err = run(
            &SHELL,
            json!({"cmd": "echo out; echo broken >&2; exit 3"}),
            false,
        )
        .await
        .unwrap_err();
        assert!(
            err.message.contains("exit 3") && err.message.contains("broken"),
            "{err}"
        );
        assert_eq!(err.data["rc"], 3);
        assert_eq!(err.data["stdout"], "out");
        assert_eq!(err.data["stderr"], "broken");

        let err = run(&SPEC, json!({"cmd": "/nonexistent/program"}), false)
            .await
            .unwrap_err();
        assert_eq!(err.data["rc"], 127, "{err}");
    }

    #[tokio::test]
    async fn creates_removes_and_unless_skip_in_one_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("done");
        let touch = |extra: Value| {
            let mut args = json!({"cmd": format!("touch {}", marker.display())});
            args.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            args
        };

        let first = run(&SPEC, touch(json!({"creates": marker})), false)
            .await
            .unwrap();
        assert!(first.changed && marker.exists());
        let second = run(&SPEC, touch(json!({"creates": marker})), false)
            .await
            .unwrap();
        assert!(!second.changed);
        assert!(second.data["msg"].as_str().unwrap().contains("exists"));

        let gone = tmp.path().join("gone");
        let out = run(&SPEC, touch(json!({"removes": gone})), false)
            .await
            .unwrap();
        assert!(!out.changed);

        let out = run(&SHELL, json!({"cmd": "exit 9", "unless": "true"}), false)
            .await
            .unwrap();
        assert!(!out.changed);
        let err = run(&SHELL, json!({"cmd": "exit 9", "unless": "false"}), false).await;
        assert!(err.is_err());
    }

    #[tokio::test]
    async fn check_mode_runs_only_the_unless_probe() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("m");
        let probe = tmp.path().join("probed");
        let args = json!({
            "cmd": format!("touch {}", marker.display()),
            "unless": format!("touch {}; false", probe.display()),
        });
        let out = run(&SHELL, args, true).await.unwrap();
        assert!(out.changed);
        assert!(out.diff.unwrap().starts_with("would run: touch"));
        assert!(!marker.exists(), "check mode ran the command");
        assert!(probe.exists(), "check mode did not run `unless`");

        let skipped = run(&SHELL, json!({"cmd": "exit 1", "unless": "true"}), true)
            .await
            .unwrap();
        assert!(!skipped.changed);
    }

    #[tokio::test]
    async fn chdir_is_where_the_command_runs_and_must_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let out = run(&SPEC, json!({"cmd": "pwd", "chdir": tmp.path()}), false)
            .await
            .unwrap();
        assert_eq!(out.data["stdout"], tmp.path().to_str().unwrap());
        let err = run(&SPEC, json!({"cmd": "pwd", "chdir": "/nonexistent"}), false)
            .await
            .unwrap_err();
        assert!(err.message.contains("chdir /nonexistent"), "{err}");
    }

    #[test]
    fn unbalanced_quotes_and_unknown_arguments_are_refused() {
        let err = |spec: &ModuleSpec, v| (spec.build)(v).err().unwrap();
        assert!(err(&SPEC, json!({"cmd": "echo 'open"})).contains("`cmd`"));
        assert!(err(&SPEC, json!({"cmd": ""})).contains("empty"));
        assert!(err(&SHELL, json!({"cmd": "ls", "creates_": "/x"})).contains("creates_"));
        assert_eq!(SPEC.free_form, Some("cmd"));
    }
}
