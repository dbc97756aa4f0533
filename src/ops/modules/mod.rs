//! Modules: one file per kind of thing a playbook manages.
//!
//! A module is built from its task's arguments (already rendered through minijinja), then run against one
//! host: it reads the current state, plans the minimal change, and applies it unless in check mode. It
//! reports whether anything changed (in check mode: whether something *would* change), a diff for
//! `--diff`/`--check`, and notes (e.g. sysctl keys the kernel refused). Reading state in as few round trips
//! as possible is part of each module's job: a no-change run is mostly reads.
//!
//! The parser knows every module by its [`ModuleSpec`]: the name, the accepted arguments (so that a
//! misspelled one is reported at its file:line:col with the valid choices before anything runs), and
//! `build`, the typed parse of the arguments.

pub mod apt;
pub mod authorized_key;
pub mod command;
pub mod copy;
pub mod file;
pub mod group;
pub mod line_in_file;
pub mod nftables;
pub mod nginx_site;
pub mod service;
pub mod sysctl;
pub mod template;
pub mod user;

use std::fmt::Write as _;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::ops::facts::Facts;
use crate::ops::transport::{quote, Command, Output, Transport, TransportError};

/// Everything a module may use while it runs on one host.
pub struct Ctx<'a> {
    pub host: &'a dyn Transport,
    /// `--check`: plan and report, change nothing.
    pub check: bool,
    /// `--diff`: fill [`Outcome::diff`] when something changes.
    pub diff: bool,
    /// Run privileged steps as root (the task's or play's `become`).
    pub become_root: bool,
    pub facts: &'a Facts,
    /// Renders template files for the `template` (and `nftables` with `src`) module with the task's vars.
    pub templates: &'a dyn Templates,
}

impl Ctx<'_> {
    /// Runs `script` with this task's privileges.
    pub async fn run(&self, script: impl Into<String>) -> Result<Output, TransportError> {
        self.host
            .run(Command::new(script).root(self.become_root))
            .await
    }

    /// Runs `script`; a non-zero exit becomes a [`ModuleError`] that shows `what` and the command's output.
    pub async fn run_ok(
        &self,
        what: &str,
        script: impl Into<String>,
    ) -> Result<Output, ModuleError> {
        let out = self.run(script).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(ModuleError::new(format!(
                "{what} failed (exit {}): {}",
                out.status,
                out.error_text()
            )))
        }
    }
}

/// Template rendering, provided by the runner (it owns the minijinja environment and the variables).
pub trait Templates: Send + Sync {
    /// Renders the template file `src` (looked up next to the playbook, then in the built-in
    /// `templates/`) with the task's variables.
    fn render_file(&self, src: &str) -> Result<String, String>;

    /// Reads the file `src` on the controller machine (for `copy` with `src`), resolved like a template
    /// (next to the playbook, then next to the inventory). The default refuses: a runner without files.
    fn read_local_file(&self, src: &str) -> Result<Vec<u8>, String> {
        Err(format!(
            "cannot read the local file {src}: no playbook directory"
        ))
    }
}

/// What a module did (or would do, in check mode).
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub changed: bool,
    /// A unified diff or a short before → after summary; filled when `ctx.diff` or `ctx.check`.
    pub diff: Option<String>,
    /// Things the user should read even when the task succeeded (e.g. sysctl keys the kernel refused).
    pub notes: Vec<String>,
    /// Data for `register` (e.g. `rc`, `stdout`, `stderr` of `command`).
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Outcome {
    pub fn unchanged() -> Self {
        Outcome::default()
    }

    pub fn changed(diff: Option<String>) -> Self {
        Outcome {
            changed: true,
            diff,
            ..Outcome::default()
        }
    }
}

/// A module failed on a host; the message says what and why.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ModuleError {
    pub message: String,
    /// Data for `register` even on failure (e.g. `rc`, `stdout`, `stderr` of a failed `command`), so that
    /// a task with `ignore_errors` can look at them.
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl ModuleError {
    pub fn new(message: impl Into<String>) -> Self {
        ModuleError {
            message: message.into(),
            data: serde_json::Map::new(),
        }
    }

    pub fn with_data(mut self, data: serde_json::Map<String, serde_json::Value>) -> Self {
        self.data = data;
        self
    }
}

impl From<TransportError> for ModuleError {
    fn from(e: TransportError) -> Self {
        ModuleError::new(e.to_string())
    }
}

/// A module ready to run: its arguments are parsed and typed.
pub trait Module: Send + Sync {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>>;
}

/// How the parser and the runner know a module.
pub struct ModuleSpec {
    pub name: &'static str,
    /// Every argument the module accepts.
    pub args: &'static [&'static str],
    /// `command: "ls -l"`: a plain string stands for this argument.
    pub free_form: Option<&'static str>,
    /// Typed parse of the (rendered) arguments; the error names the argument at fault.
    pub build: fn(serde_json::Value) -> Result<Box<dyn Module>, String>,
}

impl std::fmt::Debug for ModuleSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModuleSpec({})", self.name)
    }
}

/// Every module, by name.
pub static MODULES: &[&ModuleSpec] = &[
    &apt::SPEC,
    &user::SPEC,
    &group::SPEC,
    &authorized_key::SPEC,
    &service::SPEC,
    &sysctl::SPEC,
    &file::SPEC,
    &copy::SPEC,
    &template::SPEC,
    &line_in_file::SPEC,
    &command::SPEC,
    &command::SHELL,
    &nftables::SPEC,
    &nginx_site::SPEC,
];

/// The module called `name`.
pub fn lookup(name: &str) -> Option<&'static ModuleSpec> {
    MODULES.iter().copied().find(|m| m.name == name)
}

/// The names of all modules, for "valid choices" in error messages.
pub fn names() -> Vec<&'static str> {
    MODULES.iter().map(|m| m.name).collect()
}

/// Parses arguments into a module's typed argument struct (which should use
/// `#[serde(deny_unknown_fields)]`); the error names the argument at fault.
pub fn parse_args<T: DeserializeOwned>(args: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(args).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("argument `{path}`: {}", e.inner())
        }
    })
}

/// A unified diff of two texts, labelled with `path`; `None` when they are equal.
pub fn unified_diff(path: &str, before: &str, after: &str) -> Option<String> {
    if before == after {
        return None;
    }
    Some(
        similar::TextDiff::from_lines(before, after)
            .unified_diff()
            .context_radius(3)
            .header(&format!("{path} (before)"), &format!("{path} (after)"))
            .to_string(),
    )
}

/// What a path is on the host, read in one round trip by [`stat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Absent,
    File,
    Directory,
    Link,
    Other,
}

impl FileKind {
    /// "file", "directory", … for messages.
    pub fn describe(self) -> &'static str {
        match self {
            FileKind::Absent => "absent",
            FileKind::File => "a file",
            FileKind::Directory => "a directory",
            FileKind::Link => "a symlink",
            FileKind::Other => "a special file",
        }
    }
}

/// The state of one path on the host.
#[derive(Debug, Clone)]
pub struct FileState {
    pub kind: FileKind,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    pub owner: String,
    pub group: String,
    pub uid: u32,
    pub gid: u32,
    /// Where a symlink points.
    pub link_target: Option<String>,
    /// The content of a regular file, when asked for.
    pub content: Option<Vec<u8>>,
    /// The hex SHA-256 of a regular file's content, when asked for ([`Read::Sha256`]).
    pub sha256: Option<String>,
}

impl FileState {
    fn absent() -> Self {
        FileState {
            kind: FileKind::Absent,
            mode: 0,
            owner: String::new(),
            group: String::new(),
            uid: 0,
            gid: 0,
            link_target: None,
            content: None,
            sha256: None,
        }
    }
}

/// How much of a regular file [`stat_with`] reads besides its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Meta,
    /// The whole content (base64 over the wire): for files small enough to diff.
    Content,
    /// Only `sha256sum` of the content: for big files, compared without downloading them.
    Sha256,
    /// The content when it is at most [`DIFF_MAX_BYTES`] long, else its SHA-256: to compare a file with
    /// what it should hold, diffing it when a diff is readable.
    Compare,
}

/// Files up to this size are downloaded to compare and diff them; bigger ones are compared by SHA-256.
pub const DIFF_MAX_BYTES: usize = 256 * 1024;

/// Reads `path`'s kind, mode, owner, group, link target and (if `with_content` and a regular file) its
/// content, in one round trip. Does not follow a symlink at `path` itself.
pub async fn stat(ctx: &Ctx<'_>, path: &str, with_content: bool) -> Result<FileState, ModuleError> {
    stat_with(
        ctx,
        path,
        if with_content {
            Read::Content
        } else {
            Read::Meta
        },
    )
    .await
}

/// [`stat`], reading as much of a regular file as `read` says, in one round trip.
pub async fn stat_with(ctx: &Ctx<'_>, path: &str, read: Read) -> Result<FileState, ModuleError> {
    let p = quote(path);
    let mut script = format!(
        "if [ -e {p} ] || [ -L {p} ]; then stat -c '%F|%a|%U|%G|%u|%g' -- {p} || exit 3; \
         if [ -L {p} ]; then readlink -- {p}; else echo; fi"
    );
    match read {
        Read::Meta => {}
        Read::Content => {
            let _ = write!(
                script,
                "; if [ -f {p} ] && [ ! -L {p} ]; then base64 -w0 -- {p} || exit 3; fi"
            );
        }
        Read::Sha256 => {
            let _ = write!(
                script,
                "; if [ -f {p} ] && [ ! -L {p} ]; then sha256sum < {p} || exit 3; fi"
            );
        }
        Read::Compare => {
            let _ = write!(
                script,
                "; if [ -f {p} ] && [ ! -L {p} ]; then \
                 if [ \"$(stat -c %s -- {p})\" -le {DIFF_MAX_BYTES} ]; then printf b; base64 -w0 -- {p}; \
                 else printf s; sha256sum < {p}; fi || exit 3; fi"
            );
        }
    }
    script.push_str("; else echo absent; fi");
    let out = ctx.run(script).await?;
    if !out.success() {
        return Err(ModuleError::new(format!(
            "cannot read {path}: {}",
            out.error_text()
        )));
    }
    parse_stat(path, &out.stdout_str(), read)
}

fn parse_stat(path: &str, text: &str, read: Read) -> Result<FileState, ModuleError> {
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    if first == "absent" {
        return Ok(FileState::absent());
    }
    let mut fields = first.split('|');
    let kind = match fields.next().unwrap_or_default() {
        "regular file" | "regular empty file" => FileKind::File,
        "directory" => FileKind::Directory,
        "symbolic link" => FileKind::Link,
        _ => FileKind::Other,
    };
    let mode = u32::from_str_radix(fields.next().unwrap_or("0"), 8).unwrap_or(0);
    let owner = fields.next().unwrap_or_default().to_string();
    let group = fields.next().unwrap_or_default().to_string();
    let uid = fields.next().unwrap_or_default().parse().unwrap_or(0);
    let gid = fields.next().unwrap_or_default().parse().unwrap_or(0);
    let link = lines.next().unwrap_or_default();
    let rest = lines.next().unwrap_or_default().trim();
    let is_file = kind == FileKind::File;
    // Read::Compare says which of the two it sent with a leading `b` (base64) or `s` (sha256sum).
    let (read, rest) = match (read, rest.get(..1)) {
        (Read::Compare, Some("s")) => (Read::Sha256, &rest[1..]),
        (Read::Compare, _) => (Read::Content, rest.get(1..).unwrap_or_default()),
        _ => (read, rest),
    };
    let content = match read {
        Read::Content if is_file => {
            use base64::Engine as _;
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .map_err(|e| ModuleError::new(format!("cannot read {path}: {e}")))?,
            )
        }
        _ => None,
    };
    let sha256 = match read {
        // `sha256sum < file` prints "HEX  -".
        Read::Sha256 if is_file => Some(rest.split(' ').next().unwrap_or_default().to_string()),
        _ => None,
    };
    Ok(FileState {
        kind,
        mode,
        owner,
        group,
        uid,
        gid,
        link_target: (kind == FileKind::Link).then(|| link.to_string()),
        content,
        sha256,
    })
}

/// The hex SHA-256 of `bytes`, as `sha256sum` prints it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Attributes to set on a file written by [`put_file`].
#[derive(Debug, Clone, Default)]
pub struct FileAttrs {
    /// e.g. `0o600`; `None` keeps the existing mode (or the umask's for a new file).
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

impl FileAttrs {
    /// What differs between `state` and these attributes, as "mode 0644 → 0600" lines; empty when
    /// nothing does. An owner or group given as a number is compared with the numeric id.
    pub fn changes(&self, state: &FileState) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(mode) = self.mode {
            if mode != state.mode {
                out.push(format!("mode {:04o} → {mode:04o}", state.mode));
            }
        }
        let differs = |want: &str, name: &str, id: u32| want != name && want != id.to_string();
        if let Some(owner) = &self.owner {
            if differs(owner, &state.owner, state.uid) {
                out.push(format!("owner {} → {owner}", state.owner));
            }
        }
        if let Some(group) = &self.group {
            if differs(group, &state.group, state.gid) {
                out.push(format!("group {} → {group}", state.group));
            }
        }
        out
    }

    /// Shell commands that set these attributes on `target` (already quoted, e.g. `"$tmp"` or a
    /// [`quote`]d path), each followed by `; `. `-h` for a symlink itself.
    pub fn script(&self, target: &str, no_deref: bool) -> String {
        let mut script = String::new();
        let h = if no_deref { "-h " } else { "" };
        if let Some(mode) = self.mode {
            if !no_deref {
                let _ = write!(script, "chmod {mode:o} {target}; ");
            }
        }
        match (&self.owner, &self.group) {
            (Some(o), Some(g)) => {
                let _ = write!(script, "chown {h}{}:{} {target}; ", quote(o), quote(g));
            }
            (Some(o), None) => {
                let _ = write!(script, "chown {h}{} {target}; ", quote(o));
            }
            (None, Some(g)) => {
                let _ = write!(script, "chgrp {h}{} {target}; ", quote(g));
            }
            (None, None) => {}
        }
        script
    }
}

/// Writes `content` to `path` atomically (a temporary file in the same directory, then `mv`), with
/// `attrs`, in one round trip. `validate` is a command with `%s` for the temporary file (e.g.
/// `sshd -t -f %s`, `nft -c -f %s`); when it fails, nothing is replaced and the error shows its output.
/// A new file without `attrs.mode` gets `0666` less the umask, as a shell redirection would.
pub async fn put_file(
    ctx: &Ctx<'_>,
    path: &str,
    content: &[u8],
    attrs: &FileAttrs,
    validate: Option<&str>,
) -> Result<(), ModuleError> {
    let p = quote(path);
    let mut script = format!(
        "set -e; tmp=$(mktemp -- {dir}/.cozy.XXXXXX); trap 'rm -f -- \"$tmp\"' EXIT; cat > \"$tmp\"; ",
        dir = quote(parent_dir(path))
    );
    // Keep the existing attributes unless told otherwise, as an editor would; mktemp's 0600 otherwise.
    let _ = write!(
        script,
        "if [ -e {p} ]; then chmod --reference={p} \"$tmp\"; chown --reference={p} \"$tmp\"; \
         else chmod \"$(umask -S | tr -d x)\" \"$tmp\"; fi; "
    );
    script.push_str(&attrs.script("\"$tmp\"", false));
    if let Some(v) = validate {
        let cmd = v.replace("%s", "\"$tmp\"");
        let _ =
            write!(
            script,
            "if ! out=$({cmd} 2>&1); then echo \"validation failed: {}: $out\" >&2; exit 65; fi; ",
            v.replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`")
        );
    }
    let _ = write!(script, "mv -f -- \"$tmp\" {p}; trap - EXIT");
    let out = ctx
        .host
        .run(Command::new(script).root(ctx.become_root).stdin(content))
        .await?;
    if out.success() {
        Ok(())
    } else {
        Err(ModuleError::new(format!(
            "cannot write {path}: {}",
            out.error_text()
        )))
    }
}

/// The directory part of `path` (`.` for a bare name).
pub fn parent_dir(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => ".",
    }
}

/// Parses a mode given as a string (`"0644"`, `"644"`, `"u=rw,go=r"` is not supported) or a YAML
/// integer written in octal digits (`0644` → 644 as YAML 1.2 reads it).
pub fn parse_mode(value: &serde_json::Value) -> Result<u32, String> {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => {
            return Err(format!(
                "mode must be an octal string like \"0644\", not {other}"
            ))
        }
    };
    let digits = text.trim_start_matches("0o");
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(format!(
            "mode must be octal digits like \"0644\", not {text:?}"
        ));
    }
    u32::from_str_radix(digits, 8).map_err(|e| e.to_string())
}

/// serde helper: a mode argument (see [`parse_mode`]).
pub fn de_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::Deserialize;
    let v = Option::<serde_json::Value>::deserialize(d)?;
    v.map(|v| parse_mode(&v).map_err(serde::de::Error::custom))
        .transpose()
}

/// serde helper: one string or a list of strings.
pub fn de_string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    use serde::Deserialize;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_strings_or_octal_looking_integers() {
        assert_eq!(parse_mode(&serde_json::json!("0644")), Ok(0o644));
        assert_eq!(parse_mode(&serde_json::json!("600")), Ok(0o600));
        assert_eq!(parse_mode(&serde_json::json!(750)), Ok(0o750));
        assert!(parse_mode(&serde_json::json!("0899")).is_err());
        assert!(parse_mode(&serde_json::json!(true)).is_err());
    }

    #[test]
    fn parent_dir_of_paths() {
        assert_eq!(parent_dir("/etc/ssh/sshd_config"), "/etc/ssh");
        assert_eq!(parent_dir("/x"), "/");
        assert_eq!(parent_dir("x"), ".");
    }
}
