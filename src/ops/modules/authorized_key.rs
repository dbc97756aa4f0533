//! The `authorized_key` module: public keys in a user's `~/.ssh/authorized_keys`.
//!
//! Keys are the same key when their type and base64 blob match: a different comment or options do not
//! make a new line (the line on the host is kept as it is). `exclusive` leaves only the given keys;
//! `state: absent` removes them. One script reads the user's home (from `getent passwd`, not `~`, which
//! would be root's under sudo), primary group, the modes and owners of `~/.ssh` and the file, and its
//! content; one more writes what changed, with `~/.ssh` 0700 and the file 0600, owned by the user — sshd
//! (`StrictModes yes`) ignores keys in a file others can write.

use std::fmt::Write as _;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::user::{valid_account_name, Presence};
use super::{put_file, unified_diff, Ctx, FileAttrs, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "authorized_key",
    args: &["user", "key", "state", "exclusive"],
    free_form: None,
    build,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    user: String,
    #[serde(deserialize_with = "super::de_string_or_list")]
    key: Vec<String>,
    #[serde(default)]
    state: Presence,
    #[serde(default)]
    exclusive: bool,
}

#[derive(Debug)]
struct AuthorizedKey {
    user: String,
    /// The given key lines, trimmed, one key each.
    keys: Vec<String>,
    state: Presence,
    exclusive: bool,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    if !valid_account_name(&args.user) {
        return Err(format!(
            "argument `user`: {:?} is not a valid user name",
            args.user
        ));
    }
    let mut keys = Vec::new();
    for (i, line) in args
        .key
        .iter()
        .flat_map(|k| k.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
    {
        if key_id(line).is_none() {
            return Err(format!(
                "argument `key`: key {} is not an OpenSSH public key line (type base64 [comment]): {:?}",
                i + 1,
                shorten(line)
            ));
        }
        keys.push(line.to_string());
    }
    if keys.is_empty() && !(args.exclusive && args.state == Presence::Present) {
        return Err("argument `key`: no public key given".into());
    }
    Ok(Box::new(AuthorizedKey {
        user: args.user,
        keys,
        state: args.state,
        exclusive: args.exclusive,
    }))
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Splits an authorized_keys line into words, keeping `"…"` (option values) together.
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push(&line[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(s) = start {
        out.push(&line[s..]);
    }
    out
}

fn is_key_type(word: &str) -> bool {
    ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-sha2-"]
        .iter()
        .any(|p| word.starts_with(p))
}

/// What makes a key the same key: its type and base64 blob (options and comment aside).
fn key_id(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let w = words(line);
    // The type is the first word, or the second after an options word.
    let i = w.iter().take(2).position(|x| is_key_type(x))?;
    let blob = w.get(i + 1)?;
    let b64 = blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    (b64 && blob.len() >= 16).then(|| (w[i].to_string(), blob.to_string()))
}

/// The new content of the file given its current one (`None` when absent).
fn plan_content(
    current: Option<&str>,
    keys: &[String],
    state: Presence,
    exclusive: bool,
) -> String {
    let lines: Vec<&str> = current.map(|c| c.lines().collect()).unwrap_or_default();
    let wanted: Vec<(String, String)> = keys.iter().filter_map(|k| key_id(k)).collect();
    let mut out: Vec<String> = Vec::new();
    match state {
        Presence::Present => {
            for line in &lines {
                match key_id(line) {
                    Some(id) if wanted.contains(&id) => {
                        // Keep the host's line, once.
                        if !out.iter().any(|o| key_id(o).as_ref() == Some(&id)) {
                            out.push(line.to_string());
                        }
                    }
                    _ if exclusive => {}
                    _ => out.push(line.to_string()),
                }
            }
            for (key, id) in keys.iter().zip(&wanted) {
                if !out.iter().any(|o| key_id(o).as_ref() == Some(id)) {
                    out.push(key.clone());
                }
            }
        }
        Presence::Absent => {
            for line in &lines {
                if !key_id(line).is_some_and(|id| wanted.contains(&id)) {
                    out.push(line.to_string());
                }
            }
        }
    }
    let mut text = out.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

/// What the state script reports.
#[derive(Debug, Default, PartialEq, Eq)]
struct Observed {
    home: String,
    group: String,
    /// `mode owner group` of `~/.ssh`, `None` when missing.
    dir: Option<String>,
    file: Option<String>,
    content: Option<String>,
}

const SEP: &str = "--cozy--";

fn state_script(user: &str) -> String {
    let u = quote(user);
    format!(
        "export LC_ALL=C; p=$(getent passwd {u}) || {{ echo \"no such user: {user}\" >&2; exit 3; }}; \
         h=$(printf '%s' \"$p\" | cut -d: -f6); echo \"$h\"; id -gn {u}; \
         stat -c '%a %U %G' \"$h/.ssh\" 2>/dev/null || echo absent; \
         f=\"$h/.ssh/authorized_keys\"; \
         if [ -f \"$f\" ]; then stat -c '%a %U %G' \"$f\"; echo {SEP}; cat \"$f\"; else echo absent; fi"
    )
}

fn parse_state(text: &str) -> Result<Observed, String> {
    let (head, content) = match text.split_once(&format!("{SEP}\n")) {
        Some((h, c)) => (h, Some(c.to_string())),
        None => (text, None),
    };
    let l: Vec<&str> = head.lines().collect();
    if l.len() < 4 {
        return Err(format!("unexpected output {text:?}"));
    }
    let some = |s: &str| (s != "absent").then(|| s.to_string());
    Ok(Observed {
        home: l[0].to_string(),
        group: l[1].to_string(),
        dir: some(l[2]),
        file: some(l[3]),
        content,
    })
}

impl AuthorizedKey {
    async fn execute(&self, ctx: &Ctx<'_>) -> Result<Outcome, ModuleError> {
        let user = &self.user;
        let out = ctx.run(state_script(user)).await?;
        if !out.success() {
            return Err(ModuleError::new(format!(
                "authorized_key for {user}: {}",
                out.error_text()
            )));
        }
        let obs = parse_state(&out.stdout_str())
            .map_err(|e| ModuleError::new(format!("authorized_key for {user}: {e}")))?;
        if !obs.home.starts_with('/') {
            return Err(ModuleError::new(format!(
                "authorized_key for {user}: the user's home {:?} is not an absolute path",
                obs.home
            )));
        }
        let dir = format!("{}/.ssh", obs.home.trim_end_matches('/'));
        let path = format!("{dir}/authorized_keys");
        let want_attrs = |mode: &str| format!("{mode} {user} {}", obs.group);

        let new = plan_content(
            obs.content.as_deref(),
            &self.keys,
            self.state,
            self.exclusive,
        );
        let old = obs.content.clone().unwrap_or_default();
        let content_changes = new != old;
        // Removing keys from a file that does not exist: nothing to create.
        if obs.content.is_none() && new.is_empty() {
            return Ok(Outcome::unchanged());
        }
        let dir_ok = obs.dir.as_deref() == Some(&want_attrs("700"));
        let file_ok = obs.file.as_deref() == Some(&want_attrs("600"));
        if !content_changes && dir_ok && file_ok {
            return Ok(Outcome::unchanged());
        }

        let mut diff = String::new();
        if !dir_ok {
            let _ = writeln!(
                diff,
                "{dir}: {} → {}",
                obs.dir.as_deref().unwrap_or("absent"),
                want_attrs("700")
            );
        }
        if !file_ok && !content_changes {
            let _ = writeln!(
                diff,
                "{path}: {} → {}",
                obs.file.as_deref().unwrap_or("absent"),
                want_attrs("600")
            );
        }
        if let Some(d) = unified_diff(&path, &old, &new) {
            diff.push_str(&d);
        }

        if !ctx.check {
            let (d, u, g) = (quote(&dir), quote(user), quote(&obs.group));
            ctx.run_ok(
                &format!("authorized_key for {user}: preparing {dir}"),
                format!("set -e; mkdir -p {d}; chown {u}:{g} {d}; chmod 700 {d}"),
            )
            .await?;
            let attrs = FileAttrs {
                mode: Some(0o600),
                owner: Some(user.clone()),
                group: Some(obs.group.clone()),
            };
            put_file(ctx, &path, new.as_bytes(), &attrs, None).await?;
        }
        Ok(Outcome::changed(Some(diff.trim_end().to_string())))
    }
}

impl Module for AuthorizedKey {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(self.execute(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaa alice@laptop";
    const B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbb bob";
    const C: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY carol";

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keys_are_compared_by_type_and_blob_ignoring_comment_and_options() {
        let a = key_id(A).unwrap();
        assert_eq!(a.0, "ssh-ed25519");
        let renamed = A.replace("alice@laptop", "alice@desktop");
        assert_eq!(key_id(&renamed), Some(a.clone()));
        let with_opts = format!("from=\"10.0.0.1,10.0.0.2\",no-pty {A}");
        assert_eq!(key_id(&with_opts), Some(a));
        assert_ne!(key_id(A), key_id(B));
        assert_eq!(key_id("# a comment"), None);
        assert_eq!(key_id("not a key"), None);
    }

    #[test]
    fn present_appends_a_missing_key_and_keeps_the_hosts_line_for_a_known_one() {
        let current = format!("# managed by hand\n{}\n", A.replace("alice@laptop", "old"));
        let new = plan_content(Some(&current), &keys(&[A, B]), Presence::Present, false);
        assert_eq!(
            new,
            format!(
                "# managed by hand\n{}\n{B}\n",
                A.replace("alice@laptop", "old")
            )
        );
        assert_eq!(
            plan_content(Some(&new), &keys(&[A, B]), Presence::Present, false),
            new
        );
        assert_eq!(
            plan_content(None, &keys(&[A]), Presence::Present, false),
            format!("{A}\n")
        );
    }

    #[test]
    fn exclusive_leaves_only_the_given_keys() {
        let current = format!("{A}\n{C}\n# note\n{A}\n");
        let new = plan_content(Some(&current), &keys(&[A, B]), Presence::Present, true);
        assert_eq!(new, format!("{A}\n{B}\n"));
    }

    #[test]
    fn absent_removes_the_key_whatever_its_comment() {
        let current = format!("{}\n{B}\n", A.replace("alice@laptop", "x"));
        let new = plan_content(Some(&current), &keys(&[A]), Presence::Absent, false);
        assert_eq!(new, format!("{B}\n"));
    }

    #[test]
    fn the_state_script_output_is_parsed() {
        let obs = parse_state(&format!(
            "/home/deploy\ndeploy\n700 deploy deploy\n600 deploy deploy\n{SEP}\n{A}\n"
        ))
        .unwrap();
        assert_eq!(obs.home, "/home/deploy");
        assert_eq!(obs.content.as_deref(), Some(&*format!("{A}\n")));
        let obs = parse_state("/home/x\nx\nabsent\nabsent\n").unwrap();
        assert_eq!((obs.dir, obs.file, obs.content), (None, None, None));
    }

    #[test]
    fn a_line_that_is_not_a_key_is_refused_at_parse_time() {
        let err = build(json!({"user": "deploy", "key": ["ssh-ed25519"]}))
            .err()
            .unwrap();
        assert!(err.contains("key 1"), "{err}");
        assert!(build(json!({"user": "deploy", "key": format!("{A}\n{B}\n")})).is_ok());
        assert!(build(json!({"user": "deploy", "key": A, "exclusve": true}))
            .err()
            .unwrap()
            .contains("exclusve"));
    }
}
