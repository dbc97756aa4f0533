//! The `sysctl` module: kernel settings written to a `sysctl.d` file (for the next boot) and applied
//! to the running kernel.
//!
//! The file is merged, not overwritten: keys already in it stay, the task's keys are set, and every line
//! is rendered `key = value`, sorted. That keeps a loop of `name`/`value` tasks (Ansible's usual form)
//! and several tasks sharing the default file idempotent instead of each rewriting the others away.
//!
//! One script reads the file and, for every key, whether `/proc/sys/…` exists, is writable and what it
//! holds; a second writes the keys that differ (straight to `/proc/sys`, no procps needed) and reads them
//! back. Keys the running kernel refuses are not failures: in a container `kernel.*` is read-only, a key
//! may not exist on this kernel, some settings only move one way (Yama's ptrace scope, BPF). They are
//! reported in [`Outcome::notes`] and, being detected before writing when possible, do not count as a
//! change run after run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{put_file, unified_diff, Ctx, FileAttrs, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "sysctl",
    args: &["settings", "name", "value", "file", "apply"],
    free_form: None,
    build,
};

const DEFAULT_FILE: &str = "/etc/sysctl.d/99-cozy.conf";
const HEADER: &str =
    "# Written by cozy provision (sysctl module); keys set here are kept, sorted.\n";

/// A value as YAML gives it: `1`, `"1"`, `true` (→ `1`), `"32768 60999"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Bool(b) => u8::from(*b).to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Text(s) => s.clone(),
        }
    }
}

fn default_file() -> String {
    DEFAULT_FILE.into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    settings: Option<BTreeMap<String, Scalar>>,
    name: Option<String>,
    value: Option<Scalar>,
    #[serde(default = "default_file")]
    file: String,
    #[serde(default = "yes")]
    apply: bool,
}

#[derive(Debug)]
struct Sysctl {
    /// Dotted key → normalised value.
    settings: BTreeMap<String, String>,
    file: String,
    apply: bool,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    let pairs: Vec<(String, String)> = match (args.settings, args.name, args.value) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err("give either `settings` or `name` + `value`, not both".into())
        }
        (Some(s), None, None) => s.into_iter().map(|(k, v)| (k, v.text())).collect(),
        (None, Some(n), Some(v)) => vec![(n, v.text())],
        (None, Some(_), None) => return Err("argument `value`: missing (with `name`)".into()),
        (None, None, Some(_)) => return Err("argument `name`: missing (with `value`)".into()),
        (None, None, None) => return Err("give `settings` (a map) or `name` + `value`".into()),
    };
    if pairs.is_empty() {
        return Err("argument `settings`: empty".into());
    }
    let mut settings = BTreeMap::new();
    for (k, v) in pairs {
        let key = normalize_key(&k).ok_or_else(|| format!("{k:?} is not a sysctl key"))?;
        let value = normalize_value(&v);
        if value.is_empty() || v.contains(['\n', '\r']) {
            return Err(format!("{key}: the value {v:?} is empty or has a newline"));
        }
        settings.insert(key, value);
    }
    if !args.file.starts_with('/') || args.file.contains('\n') {
        return Err(format!(
            "argument `file`: {:?} must be an absolute path",
            args.file
        ));
    }
    Ok(Box::new(Sysctl {
        settings,
        file: args.file,
        apply: args.apply,
    }))
}

/// The dotted form of a key (`net/ipv4/ip_forward` → `net.ipv4.ip_forward`, swapping `.` and `/` as
/// procps does, so that an interface name with a dot survives), or `None` when it is not a key.
fn normalize_key(key: &str) -> Option<String> {
    let key = key.trim();
    let ok = !key.is_empty()
        && !key.starts_with(['.', '/', '-'])
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/@:".contains(&b));
    if !ok {
        return None;
    }
    let slash_form = key
        .find(['.', '/'])
        .is_some_and(|i| key.as_bytes()[i] == b'/');
    Some(if slash_form {
        swap(key)
    } else {
        key.to_string()
    })
}

fn swap(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '.' => '/',
            '/' => '.',
            c => c,
        })
        .collect()
}

fn proc_path(key: &str) -> String {
    format!("/proc/sys/{}", swap(key))
}

/// Whitespace as the kernel prints multi-value settings (tabs) does not make a difference.
fn normalize_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `key = value` lines of a sysctl.d file (comments and blank lines dropped).
fn parse_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let k = k.trim();
            let key = normalize_key(k).unwrap_or_else(|| k.to_string());
            out.insert(key, normalize_value(v));
        }
    }
    out
}

/// The file's new content: its keys, the task's keys over them, sorted.
fn render_file(current: Option<&str>, settings: &BTreeMap<String, String>) -> String {
    let mut all = current.map(parse_file).unwrap_or_default();
    all.extend(settings.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut text = String::from(HEADER);
    for (k, v) in &all {
        let _ = writeln!(text, "{k} = {v}");
    }
    text
}

/// One key as the running kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Live {
    Missing,
    ReadOnly(String),
    Writable(String),
}

const SEP: &str = "--cozy--";

fn state_script(file: &str, keys: &[&String]) -> String {
    let f = quote(file);
    let mut s = format!(
        "export LC_ALL=C; if [ -f {f} ]; then echo present; base64 -w0 -- {f} || exit 3; echo; \
         else echo absent; echo; fi; echo {SEP}; "
    );
    for key in keys {
        let p = quote(&proc_path(key));
        let k = quote(key);
        let _ = write!(
            s,
            "if [ -e {p} ]; then if [ -w {p} ]; then w=rw; else w=ro; fi; \
             printf '%s\\t%s\\t' {k} $w; {{ tr '\\n\\t' '  ' < {p}; }} 2>/dev/null; echo; \
             else printf '%s\\tmissing\\t\\n' {k}; fi; "
        );
    }
    s
}

#[derive(Debug, Default)]
struct Observed {
    file: Option<String>,
    live: BTreeMap<String, Live>,
}

fn parse_state(text: &str) -> Result<Observed, String> {
    let (head, keys) = text
        .split_once(&format!("{SEP}\n"))
        .ok_or_else(|| format!("unexpected output {text:?}"))?;
    let mut head = head.lines();
    let file = match (head.next(), head.next()) {
        (Some("present"), b64) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.unwrap_or_default().trim())
                .map_err(|e| e.to_string())?;
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        _ => None,
    };
    let mut live = BTreeMap::new();
    for line in keys.lines() {
        let mut f = line.splitn(3, '\t');
        let (Some(k), Some(w)) = (f.next(), f.next()) else {
            continue;
        };
        let v = normalize_value(f.next().unwrap_or_default());
        let state = match w {
            "rw" => Live::Writable(v),
            "ro" => Live::ReadOnly(v),
            _ => Live::Missing,
        };
        live.insert(k.to_string(), state);
    }
    Ok(Observed { file, live })
}

/// Which keys to write, and notes for those the kernel will not take.
fn plan_live(
    settings: &BTreeMap<String, String>,
    live: &BTreeMap<String, Live>,
    file: &str,
    container: Option<&str>,
) -> (Vec<(String, String, String)>, Vec<String>) {
    let mut writes = Vec::new();
    let mut notes = Vec::new();
    for (key, want) in settings {
        match live.get(key).unwrap_or(&Live::Missing) {
            Live::Missing => notes.push(format!(
                "{key}: not available on this kernel (no {}); kept in {file}",
                proc_path(key)
            )),
            Live::ReadOnly(have) if have != want => {
                let why = match container {
                    Some(c) => format!("read-only inside this container ({c})"),
                    None => "read-only here".to_string(),
                };
                notes.push(format!(
                    "{key} = {want} not applied: {why}; it stays {have}; kept in {file} for the next boot"
                ));
            }
            Live::Writable(have) if have != want => {
                writes.push((key.clone(), have.clone(), want.clone()))
            }
            _ => {}
        }
    }
    (writes, notes)
}

fn apply_script(writes: &[(String, String, String)]) -> String {
    let mut s = String::from("export LC_ALL=C; ");
    for (key, _, want) in writes {
        let p = quote(&proc_path(key));
        let _ = write!(
            s,
            "if err=$({{ printf '%s\\n' {v} > {p}; }} 2>&1); then printf 'ok\\t%s\\t' {k}; \
             {{ tr '\\n\\t' '  ' < {p}; }} 2>/dev/null; echo; \
             else printf 'fail\\t%s\\t%s\\n' {k} \"$(printf '%s' \"$err\" | tr '\\n\\t' '  ')\"; fi; ",
            v = quote(want),
            k = quote(key),
        );
    }
    s
}

impl Sysctl {
    async fn execute(&self, ctx: &Ctx<'_>) -> Result<Outcome, ModuleError> {
        let path = &self.file;
        let keys: Vec<&String> = if self.apply {
            self.settings.keys().collect()
        } else {
            Vec::new()
        };
        let out = ctx.run(state_script(path, &keys)).await?;
        if !out.success() {
            return Err(ModuleError::new(format!(
                "sysctl: cannot read {path}: {}",
                out.error_text()
            )));
        }
        let obs = parse_state(&out.stdout_str())
            .map_err(|e| ModuleError::new(format!("sysctl: reading {path}: {e}")))?;

        let new = render_file(obs.file.as_deref(), &self.settings);
        let old = obs.file.clone().unwrap_or_default();
        let file_diff = if obs.file.is_none() {
            unified_diff(path, "", &new)
        } else {
            unified_diff(path, &old, &new)
        };
        let (writes, mut notes) = if self.apply {
            plan_live(
                &self.settings,
                &obs.live,
                path,
                ctx.facts.container.as_deref(),
            )
        } else {
            (Vec::new(), Vec::new())
        };

        if !ctx.check && file_diff.is_some() {
            let attrs = FileAttrs {
                mode: Some(0o644),
                owner: Some("root".into()),
                group: Some("root".into()),
            };
            ctx.run_ok(
                &format!("sysctl: creating the directory of {path}"),
                format!("mkdir -p -- {}", quote(super::parent_dir(path))),
            )
            .await?;
            put_file(ctx, path, new.as_bytes(), &attrs, None).await?;
        }

        let mut applied = Vec::new();
        if ctx.check {
            applied = writes
                .iter()
                .map(|(k, have, want)| format!("{k}: {have} → {want}"))
                .collect();
        } else if !writes.is_empty() {
            let out = ctx.run(apply_script(&writes)).await?;
            if !out.success() {
                return Err(ModuleError::new(format!(
                    "sysctl: applying settings failed: {}",
                    out.error_text()
                )));
            }
            let results = out.stdout_str();
            for (key, have, want) in &writes {
                let line = results
                    .lines()
                    .find(|l| l.split('\t').nth(1) == Some(key.as_str()));
                let mut f = line.unwrap_or_default().splitn(3, '\t');
                let (status, _, rest) = (f.next(), f.next(), f.next().unwrap_or_default());
                match status {
                    Some("ok") => {
                        let now = normalize_value(rest);
                        if now == *want {
                            applied.push(format!("{key}: {have} → {want}"));
                        } else {
                            if now != *have {
                                applied.push(format!("{key}: {have} → {now}"));
                            }
                            notes.push(format!(
                                "{key} = {want} written, but the kernel reads back {now}"
                            ));
                        }
                    }
                    Some("fail") => notes.push(format!(
                        "{key} = {want} not applied: the kernel refused it ({}); it stays {have}; kept in {path}",
                        rest.trim()
                    )),
                    _ => notes.push(format!("{key} = {want}: no result from the apply script")),
                }
            }
        }

        if file_diff.is_none() && applied.is_empty() {
            return Ok(Outcome {
                notes,
                ..Outcome::unchanged()
            });
        }
        let mut diff = file_diff.unwrap_or_default();
        for line in &applied {
            let _ = writeln!(diff, "live {line}");
        }
        Ok(Outcome {
            changed: true,
            diff: Some(diff.trim_end().to_string()),
            notes,
            ..Outcome::default()
        })
    }
}

impl Module for Sysctl {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(self.execute(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_are_dotted_and_slash_forms_are_swapped_like_procps() {
        assert_eq!(
            normalize_key("net/ipv4/ip_forward").as_deref(),
            Some("net.ipv4.ip_forward")
        );
        assert_eq!(
            normalize_key("net.ipv4.conf.eth0/1.rp_filter").as_deref(),
            Some("net.ipv4.conf.eth0/1.rp_filter")
        );
        assert_eq!(
            proc_path("net.ipv4.conf.eth0/1.rp_filter"),
            "/proc/sys/net/ipv4/conf/eth0.1/rp_filter"
        );
        assert_eq!(normalize_key("../../etc/passwd"), None);
        assert_eq!(normalize_key("a b"), None);
    }

    #[test]
    fn the_file_is_merged_and_rendered_sorted() {
        let current = "# old header\nvm.swappiness=10\nnet.ipv4.ip_forward = 1\n";
        let new = render_file(
            Some(current),
            &settings(&[("net.ipv4.ip_forward", "0"), ("kernel.sysrq", "0")]),
        );
        assert_eq!(
            new,
            format!("{HEADER}kernel.sysrq = 0\nnet.ipv4.ip_forward = 0\nvm.swappiness = 10\n")
        );
        // Rendering its own output again changes nothing.
        assert_eq!(
            render_file(Some(&new), &settings(&[("kernel.sysrq", "0")])),
            new
        );
    }

    #[test]
    fn live_values_that_differ_are_written_and_refused_ones_become_notes() {
        let live: BTreeMap<String, Live> = [
            ("net.ipv4.ip_forward", Live::Writable("1".into())),
            ("net.ipv4.tcp_syncookies", Live::Writable("1".into())),
            ("kernel.sysrq", Live::ReadOnly("438".into())),
            ("kernel.dmesg_restrict", Live::ReadOnly("1".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let want = settings(&[
            ("net.ipv4.ip_forward", "0"),
            ("net.ipv4.tcp_syncookies", "1"),
            ("kernel.sysrq", "0"),
            ("kernel.dmesg_restrict", "1"),
            ("net.ipv4.no_such_thing", "1"),
        ]);
        let (writes, notes) = plan_live(&want, &live, DEFAULT_FILE, Some("systemd-nspawn"));
        assert_eq!(
            writes,
            [("net.ipv4.ip_forward".into(), "1".into(), "0".into())]
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes
            .iter()
            .any(|n| n.starts_with("kernel.sysrq") && n.contains("read-only")));
        assert!(notes
            .iter()
            .any(|n| n.starts_with("net.ipv4.no_such_thing") && n.contains("not available")));
    }

    #[test]
    fn the_state_output_is_parsed_with_tabs_in_values_normalised() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode("a = 1\n");
        let obs = parse_state(&format!(
            "present\n{b64}\n{SEP}\nnet.ipv4.ip_local_port_range\trw\t32768 60999 \nkernel.sysrq\tro\t438 \nx.y\tmissing\t\n"
        ))
        .unwrap();
        assert_eq!(obs.file.as_deref(), Some("a = 1\n"));
        assert_eq!(
            obs.live["net.ipv4.ip_local_port_range"],
            Live::Writable("32768 60999".into())
        );
        assert_eq!(obs.live["kernel.sysrq"], Live::ReadOnly("438".into()));
        assert_eq!(obs.live["x.y"], Live::Missing);
        let obs = parse_state(&format!("absent\n\n{SEP}\n")).unwrap();
        assert!(obs.file.is_none());
    }

    #[test]
    fn arguments_take_a_map_or_a_name_and_value() {
        assert!(
            build(json!({"settings": {"net.ipv4.ip_forward": 0, "kernel.sysrq": "0"}})).is_ok()
        );
        assert!(build(json!({"name": "vm.swappiness", "value": 10})).is_ok());
        assert!(build(json!({"name": "vm.swappiness"}))
            .err()
            .unwrap()
            .contains("value"));
        assert!(build(json!({"settings": {"a.b": 1}, "name": "c", "value": 1})).is_err());
        assert!(build(json!({"settings": {"a.b": 1}, "file": "rel.conf"}))
            .err()
            .unwrap()
            .contains("file"));
        assert!(build(json!({"settings": {"a.b": 1}, "reload": true}))
            .err()
            .unwrap()
            .contains("reload"));
        assert!(build(json!({"settings": {"a.b": "1\n2"}})).is_err());
    }
}
