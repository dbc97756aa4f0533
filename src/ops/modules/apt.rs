//! The `apt` module: Debian packages present, absent or at the latest version.
//!
//! One round trip reads everything the plan needs: `dpkg-query` for what is installed, `apt-cache policy`
//! for the candidates (and whether apt knows a name at all), and the age of the package lists. A run with
//! nothing to do is that one read. `apt-get update` runs only when something must be installed or
//! upgraded and the lists are older than `cache_valid_time` (or lack a package we were asked for) — and
//! at most once per task; never in check mode, which plans from the lists as they are.
//!
//! All missing packages go into one `apt-get install`, non-interactive, keeping locally changed config
//! files (`--force-confold`), waiting for a held dpkg lock instead of failing at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{Ctx, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::{quote, Command};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "apt",
    args: &[
        "name",
        "state",
        "update_cache",
        "cache_valid_time",
        "purge",
        "install_recommends",
    ],
    free_form: None,
    build,
};

/// Where we record a successful `apt-get update` (the same stamp Debian's periodic apt jobs touch).
const STAMP: &str = "/var/lib/apt/periodic/update-success-stamp";

/// apt-get may download for a long time on a slow mirror; the transport's default is too short.
const APT_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum State {
    #[default]
    Present,
    Absent,
    Latest,
}

fn yes() -> bool {
    true
}

fn hour() -> u64 {
    3600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default, deserialize_with = "super::de_string_or_list")]
    name: Vec<String>,
    #[serde(default)]
    state: State,
    #[serde(default = "yes")]
    update_cache: bool,
    #[serde(default = "hour")]
    cache_valid_time: u64,
    #[serde(default)]
    purge: bool,
    #[serde(default)]
    install_recommends: bool,
}

#[derive(Debug)]
struct Apt {
    args: Args,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    for name in &args.name {
        if !valid_package_name(name) {
            return Err(format!(
                "argument `name`: {name:?} is not a Debian package name"
            ));
        }
    }
    if args.name.is_empty() && !args.update_cache {
        return Err("argument `name`: give at least one package (or `update_cache: true`)".into());
    }
    Ok(Box::new(Apt { args }))
}

/// Debian policy: lower-case letters, digits, `+ - .`, at least two characters, starting with an
/// alphanumeric; optionally `:arch`.
fn valid_package_name(name: &str) -> bool {
    let (pkg, arch) = match name.split_once(':') {
        Some((p, a)) => (p, Some(a)),
        None => (name, None),
    };
    let pkg_ok = pkg.len() >= 2
        && pkg.as_bytes()[0].is_ascii_alphanumeric()
        && pkg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let arch_ok = arch.is_none_or(|a| {
        !a.is_empty()
            && a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    pkg_ok && arch_ok
}

/// What dpkg says about one package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Unpacked and configured (or only waiting for triggers).
    Installed,
    /// Removed, its configuration files are still there.
    ConfigFiles,
    /// Half-installed, unpacked, half-configured: `apt-get install` finishes the job.
    Broken,
    NotInstalled,
}

/// The host's packages as far as this task cares.
#[derive(Debug, Default, Clone)]
struct AptState {
    /// dpkg's status per package name (names dpkg has never heard of are missing).
    dpkg: BTreeMap<String, (Status, String)>,
    /// `apt-cache policy`: installed and candidate version per name apt knows (`None` for `(none)`).
    policy: BTreeMap<String, (Option<String>, Option<String>)>,
    /// Seconds since the package lists were last updated; `None` when there are no lists at all.
    cache_age: Option<u64>,
}

impl AptState {
    fn status(&self, name: &str) -> Status {
        self.dpkg
            .get(strip_arch(name))
            .map_or(Status::NotInstalled, |(s, _)| *s)
    }

    fn candidate(&self, name: &str) -> Option<&str> {
        self.policy
            .get(strip_arch(name))
            .and_then(|(_, c)| c.as_deref())
    }

    fn installed_version(&self, name: &str) -> Option<&str> {
        self.dpkg
            .get(strip_arch(name))
            .filter(|(s, _)| *s == Status::Installed)
            .map(|(_, v)| v.as_str())
    }
}

fn strip_arch(name: &str) -> &str {
    name.split_once(':').map_or(name, |(p, _)| p)
}

/// The separator between the sections of the state script's output.
const SEP: &str = "--cozy--";

fn state_script(names: &[String]) -> String {
    let list: Vec<String> = names.iter().map(|n| quote(n)).collect();
    let list = list.join(" ");
    let mut s = String::from("export LC_ALL=C; ");
    if !list.is_empty() {
        // Unknown names make dpkg-query exit 1 with a message on stderr: expected, not an error.
        let _ = write!(
            s,
            "dpkg-query -W -f='${{Package}}\\t${{db:Status-Abbrev}}\\t${{Version}}\\n' {list} 2>/dev/null; "
        );
    }
    let _ = write!(s, "echo {SEP}; ");
    if !list.is_empty() {
        let _ = write!(s, "apt-cache policy {list} 2>/dev/null; ");
    }
    let _ = write!(
        s,
        "echo {SEP}; \
         if ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'; then \
           stat -c %Y {STAMP} /var/lib/apt/lists/partial 2>/dev/null; \
         fi; echo {SEP}; date +%s"
    );
    s
}

fn parse_state(text: &str) -> AptState {
    let sep = format!("{SEP}\n");
    let mut sections = text.split(&sep);
    let dpkg = parse_dpkg_query(sections.next().unwrap_or_default());
    let policy = parse_policy(sections.next().unwrap_or_default());
    let stamps = sections.next().unwrap_or_default();
    let now: Option<u64> = sections.next().and_then(|t| t.trim().parse().ok());
    let newest = stamps
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max();
    let cache_age = match (newest, now) {
        (Some(t), Some(now)) => Some(now.saturating_sub(t)),
        _ => None,
    };
    AptState {
        dpkg,
        policy,
        cache_age,
    }
}

/// Parses `dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\t${Version}\n'` output. A package of
/// several architectures appears once per architecture: installed if any of them is.
fn parse_dpkg_query(text: &str) -> BTreeMap<String, (Status, String)> {
    let mut out: BTreeMap<String, (Status, String)> = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split('\t');
        let (Some(name), Some(abbrev)) = (f.next(), f.next()) else {
            continue;
        };
        let version = f.next().unwrap_or_default().to_string();
        // Status-Abbrev is "want status error", e.g. "ii ", "rc ", "un ", "iU ".
        let status = match abbrev.as_bytes().get(1) {
            Some(b'i' | b'W' | b't') if abbrev.as_bytes().get(2) != Some(&b'R') => {
                Status::Installed
            }
            Some(b'c') => Status::ConfigFiles,
            Some(b'n') | None => Status::NotInstalled,
            Some(_) => Status::Broken,
        };
        let name = name.trim().to_string();
        match out.get(&name) {
            Some((Status::Installed, _)) => {}
            _ => {
                out.insert(name, (status, version));
            }
        }
    }
    out
}

/// Parses `apt-cache policy a b …`: a block per name apt knows, `name:` then indented fields.
fn parse_policy(text: &str) -> BTreeMap<String, (Option<String>, Option<String>)> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    let version = |v: &str| {
        let v = v.trim();
        (v != "(none)" && !v.is_empty()).then(|| v.to_string())
    };
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            let name = line.trim_end_matches(':');
            let name = strip_arch(name).to_string();
            out.insert(name.clone(), (None, None));
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let entry = out.get_mut(name).expect("inserted above");
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Installed:") {
            entry.0 = version(v);
        } else if let Some(v) = t.strip_prefix("Candidate:") {
            entry.1 = version(v);
        }
    }
    out
}

/// What the task will do.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    install: Vec<String>,
    /// (name, installed version, candidate)
    upgrade: Vec<(String, String, String)>,
    remove: Vec<String>,
    /// Names apt does not know yet: worth one `apt-get update` before giving up on them.
    unknown: Vec<String>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.install.is_empty() && self.upgrade.is_empty() && self.remove.is_empty()
    }

    fn summary(&self, purge: bool) -> String {
        let mut lines = Vec::new();
        if !self.install.is_empty() {
            lines.push(format!("+ install: {}", self.install.join(" ")));
        }
        if !self.upgrade.is_empty() {
            let ups: Vec<String> = self
                .upgrade
                .iter()
                .map(|(n, from, to)| format!("{n} ({from} → {to})"))
                .collect();
            lines.push(format!("↑ upgrade: {}", ups.join(" ")));
        }
        if !self.remove.is_empty() {
            let verb = if purge { "purge" } else { "remove" };
            lines.push(format!("- {verb}: {}", self.remove.join(" ")));
        }
        lines.join("\n")
    }
}

fn plan(args: &Args, st: &AptState) -> Plan {
    let mut p = Plan::default();
    let mut seen = BTreeSet::new();
    for name in &args.name {
        if !seen.insert(name.as_str()) {
            continue;
        }
        let status = st.status(name);
        match args.state {
            State::Present | State::Latest => {
                if status != Status::Installed {
                    if st.candidate(name).is_none() {
                        p.unknown.push(name.clone());
                    }
                    p.install.push(name.clone());
                } else if args.state == State::Latest {
                    let installed = st.installed_version(name).unwrap_or_default();
                    if let Some(cand) = st.candidate(name) {
                        if cand != installed {
                            p.upgrade
                                .push((name.clone(), installed.to_string(), cand.to_string()));
                        }
                    }
                }
            }
            State::Absent => {
                let present = match status {
                    Status::Installed | Status::Broken => true,
                    Status::ConfigFiles => args.purge,
                    Status::NotInstalled => false,
                };
                if present {
                    p.remove.push(name.clone());
                }
            }
        }
    }
    p
}

fn is_stale(args: &Args, st: &AptState) -> bool {
    st.cache_age.is_none_or(|age| age > args.cache_valid_time)
}

const APT_GET: &str = "DEBIAN_FRONTEND=noninteractive apt-get -y -q \
    -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";

impl Apt {
    async fn read(&self, ctx: &Ctx<'_>) -> Result<AptState, ModuleError> {
        let out = ctx.run(state_script(&self.args.name)).await?;
        if !out.success() {
            return Err(ModuleError::new(format!(
                "apt: cannot read the package state: {}",
                out.error_text()
            )));
        }
        Ok(parse_state(&out.stdout_str()))
    }

    async fn apt_get(&self, ctx: &Ctx<'_>, what: &str, script: String) -> Result<(), ModuleError> {
        let out = ctx
            .host
            .run(
                Command::new(script)
                    .root(ctx.become_root)
                    .timeout(APT_TIMEOUT),
            )
            .await?;
        if out.success() {
            Ok(())
        } else {
            Err(ModuleError::new(format!(
                "{what} failed (exit {}): {}",
                out.status,
                out.error_text()
            )))
        }
    }

    async fn update(&self, ctx: &Ctx<'_>) -> Result<(), ModuleError> {
        self.apt_get(
            ctx,
            "apt-get update",
            format!(
                "{APT_GET} update && mkdir -p {dir} && touch {STAMP}",
                dir = super::parent_dir(STAMP)
            ),
        )
        .await
    }

    async fn execute(&self, ctx: &Ctx<'_>) -> Result<Outcome, ModuleError> {
        let args = &self.args;
        let mut st = self.read(ctx).await?;
        let mut notes = Vec::new();
        let mut updated = false;

        if args.name.is_empty() {
            // Only `update_cache`: the update is the change.
            if !is_stale(args, &st) {
                return Ok(Outcome::unchanged());
            }
            if !ctx.check {
                self.update(ctx).await?;
            }
            return Ok(Outcome::changed(Some("apt-get update".into())));
        }

        let mut p = plan(args, &st);
        let wants_fresh =
            args.state == State::Latest || (args.state == State::Present && !p.install.is_empty());
        // `update_cache: false` means never; otherwise stale lists, or a name apt does not know yet.
        let need_update =
            args.update_cache && ((wants_fresh && is_stale(args, &st)) || !p.unknown.is_empty());
        if need_update && args.state != State::Absent {
            if ctx.check {
                if !p.unknown.is_empty() {
                    notes.push(format!(
                        "not in the apt cache yet (an apt-get update would run first): {}",
                        p.unknown.join(" ")
                    ));
                }
            } else {
                self.update(ctx).await?;
                updated = true;
                st = self.read(ctx).await?;
                p = plan(args, &st);
            }
        }

        if p.is_empty() {
            return Ok(Outcome {
                notes,
                ..Outcome::unchanged()
            });
        }
        let summary = p.summary(args.purge);
        if !ctx.check {
            let mut to_install: Vec<String> = p.install.clone();
            to_install.extend(p.upgrade.iter().map(|(n, _, _)| n.clone()));
            if !to_install.is_empty() {
                let recommends = if args.install_recommends {
                    "-o APT::Install-Recommends=true"
                } else {
                    "--no-install-recommends"
                };
                let list: Vec<String> = to_install.iter().map(|n| quote(n)).collect();
                let what = format!("apt-get install {}", to_install.join(" "));
                let what = if updated {
                    what
                } else {
                    format!("{what} (apt lists not updated: fresh enough)")
                };
                self.apt_get(
                    ctx,
                    &what,
                    format!("{APT_GET} install {recommends} {}", list.join(" ")),
                )
                .await?;
            }
            if !p.remove.is_empty() {
                let verb = if args.purge { "purge" } else { "remove" };
                let list: Vec<String> = p.remove.iter().map(|n| quote(n)).collect();
                self.apt_get(
                    ctx,
                    &format!("apt-get {verb} {}", p.remove.join(" ")),
                    format!("{APT_GET} {verb} {}", list.join(" ")),
                )
                .await?;
            }
        }
        Ok(Outcome {
            changed: true,
            diff: Some(summary),
            notes,
            ..Outcome::default()
        })
    }
}

impl Module for Apt {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(self.execute(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: serde_json::Value) -> Args {
        super::super::parse_args(v).unwrap()
    }

    const DPKG: &str = "tree\tii \t2.1.0-1\n\
                        telnet\trc \t0.17+2.4-2\n\
                        jq\tun \t\n\
                        libfoo\tiU \t1.0\n";

    const POLICY: &str = "tree:\n  Installed: 2.1.0-1\n  Candidate: 2.1.1-1\n  Version table:\n \
                          *** 2.1.0-1 500\n        500 http://deb.debian.org/debian bookworm/main amd64 Packages\n\
                          jq:\n  Installed: (none)\n  Candidate: 1.6-2.1\n\
                          mail-transport-agent:\n  Installed: (none)\n  Candidate: (none)\n";

    fn state() -> AptState {
        parse_state(&format!(
            "{DPKG}{SEP}\n{POLICY}{SEP}\n1700000000\n1700000100\n{SEP}\n1700003000\n"
        ))
    }

    #[test]
    fn dpkg_query_output_gives_each_package_its_status() {
        let st = state();
        assert_eq!(st.status("tree"), Status::Installed);
        assert_eq!(st.status("telnet"), Status::ConfigFiles);
        assert_eq!(st.status("jq"), Status::NotInstalled);
        assert_eq!(st.status("libfoo"), Status::Broken);
        assert_eq!(st.status("never-heard-of"), Status::NotInstalled);
        assert_eq!(st.status("tree:amd64"), Status::Installed);
        assert_eq!(st.installed_version("tree"), Some("2.1.0-1"));
    }

    #[test]
    fn policy_gives_candidates_and_none_for_virtual_or_unknown() {
        let st = state();
        assert_eq!(st.candidate("tree"), Some("2.1.1-1"));
        assert_eq!(st.candidate("jq"), Some("1.6-2.1"));
        assert_eq!(st.candidate("mail-transport-agent"), None);
        assert_eq!(st.candidate("nope"), None);
    }

    #[test]
    fn cache_age_is_from_the_newest_stamp_and_missing_lists_mean_stale() {
        assert_eq!(state().cache_age, Some(2900));
        let st = parse_state(&format!("{SEP}\n{SEP}\n{SEP}\n1700003000\n"));
        assert_eq!(st.cache_age, None);
        assert!(is_stale(&args(json!({"name": "jq"})), &st));
    }

    #[test]
    fn present_installs_only_what_is_missing_and_flags_names_apt_does_not_know() {
        let p = plan(
            &args(json!({"name": ["tree", "jq", "libfoo", "ghost", "jq"]})),
            &state(),
        );
        assert_eq!(p.install, ["jq", "libfoo", "ghost"]);
        assert_eq!(p.unknown, ["libfoo", "ghost"]);
        assert!(p.upgrade.is_empty() && p.remove.is_empty());
        assert_eq!(p.summary(false), "+ install: jq libfoo ghost");
    }

    #[test]
    fn latest_upgrades_when_the_candidate_differs() {
        let p = plan(
            &args(json!({"name": ["tree"], "state": "latest"})),
            &state(),
        );
        assert_eq!(
            p.upgrade,
            [("tree".into(), "2.1.0-1".into(), "2.1.1-1".into())]
        );
        assert!(p.install.is_empty());
    }

    #[test]
    fn absent_removes_installed_and_purges_leftover_config_only_with_purge() {
        let a = args(json!({"name": ["tree", "telnet", "jq"], "state": "absent"}));
        assert_eq!(plan(&a, &state()).remove, ["tree"]);
        let a = args(json!({"name": ["tree", "telnet", "jq"], "state": "absent", "purge": true}));
        let p = plan(&a, &state());
        assert_eq!(p.remove, ["tree", "telnet"]);
        assert_eq!(p.summary(true), "- purge: tree telnet");
    }

    #[test]
    fn bad_arguments_are_refused_naming_the_argument() {
        let err = build(json!({"name": "jq", "stat": "present"}))
            .err()
            .unwrap();
        assert!(err.contains("stat"), "{err}");
        let err = build(json!({"name": "jq", "state": "installed"}))
            .err()
            .unwrap();
        assert!(err.contains("state"), "{err}");
        let err = build(json!({"name": "jq; rm -rf /"})).err().unwrap();
        assert!(err.contains("name"), "{err}");
        assert!(build(json!({"name": ["jq", "libc6:amd64", "g++"]})).is_ok());
    }

    #[test]
    fn the_spec_lists_every_argument_the_struct_accepts() {
        let all = json!({"name": "jq", "state": "present", "update_cache": true, "cache_valid_time": 1,
                         "purge": false, "install_recommends": false});
        assert!(build(all.clone()).is_ok());
        assert_eq!(SPEC.args.len(), all.as_object().unwrap().len());
    }
}
