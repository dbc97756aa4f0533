//! The `apt` module: Debian packages present, absent or at the latest version.
//!
//! One round trip reads everything the plan needs: `dpkg-query` for what is installed, `apt-cache policy`
//! for the candidates (and whether apt knows a name at all), and the age of the package lists. A run with
//! nothing to do is that one read. `apt-get update` runs only when something must be installed or
//! upgraded and the lists are older than `cache_valid_time` (or lack a package we were asked for) — and
//! at most once per task; never in check mode, which plans from the lists as they are.
//!
//! All missing packages go into one `apt-get install`, non-interactive, keeping locally changed config
//! files (`--force-confold`), waiting for a held dpkg lock instead of failing at once. A name may carry
//! apt's own pins: `pkg/release` (at least the version that release offers, e.g. a package from
//! `bookworm-backports` in the same transaction as plain ones) or `pkg=version` (exactly that version).
//!
//! The lists count as stale when they are older than `cache_valid_time` *or* older than a file under
//! `/etc/apt/sources.list*`: a task that adds a repository needs no `apt-get update` of its own, the next
//! `apt` task that installs something updates once for all the sources added before it.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
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
    pkgs: Vec<Pkg>,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    let mut pkgs = Vec::new();
    for name in &args.name {
        let pkg = Pkg::parse(name).map_err(|e| format!("argument `name`: {e}"))?;
        if args.state == State::Absent && pkg.pin != Pin::Any {
            return Err(format!(
                "argument `name`: {name:?}: `state: absent` takes plain package names (no `/release` or `=version`)"
            ));
        }
        if !pkgs.contains(&pkg) {
            pkgs.push(pkg);
        }
    }
    if args.name.is_empty() && !args.update_cache {
        return Err("argument `name`: give at least one package (or `update_cache: true`)".into());
    }
    Ok(Box::new(Apt { args, pkgs }))
}

/// Which version of a package a task asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pin {
    /// Any version (`present`) or the candidate (`latest`).
    Any,
    /// `pkg/release`: at least the version that release (suite or codename as in the sources, e.g.
    /// `bookworm-backports`) offers.
    Release(String),
    /// `pkg=version`: exactly this version.
    Version(String),
}

/// One entry of `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pkg {
    /// The package name, possibly with `:arch`.
    name: String,
    pin: Pin,
}

impl Pkg {
    fn parse(spec: &str) -> Result<Pkg, String> {
        let (name, pin) = if let Some((name, version)) = spec.split_once('=') {
            if debversion::Version::from_str(version).is_err() {
                return Err(format!(
                    "{spec:?}: {version:?} is not a Debian version (epoch:upstream-revision)"
                ));
            }
            (name, Pin::Version(version.to_string()))
        } else if let Some((name, release)) = spec.split_once('/') {
            let ok = release
                .as_bytes()
                .first()
                .is_some_and(u8::is_ascii_alphanumeric)
                && release
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-+._~".contains(&b));
            if !ok {
                return Err(format!(
                    "{spec:?}: {release:?} is not a release name (e.g. bookworm-backports)"
                ));
            }
            (name, Pin::Release(release.to_string()))
        } else {
            (spec, Pin::Any)
        };
        if !valid_package_name(name) {
            return Err(format!("{spec:?}: {name:?} is not a Debian package name"));
        }
        Ok(Pkg {
            name: name.to_string(),
            pin,
        })
    }

    /// The word `apt-get install` gets for this package.
    fn apt_arg(&self) -> String {
        match &self.pin {
            Pin::Any => self.name.clone(),
            Pin::Release(r) => format!("{}/{r}", self.name),
            Pin::Version(v) => format!("{}={v}", self.name),
        }
    }
}

/// dpkg's order of two versions; `None` when either is not a Debian version.
fn version_cmp(a: &str, b: &str) -> Option<Ordering> {
    let a = debversion::Version::from_str(a).ok()?;
    let b = debversion::Version::from_str(b).ok()?;
    Some(a.cmp(&b))
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

/// What `apt-cache policy` says about one package.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Policy {
    installed: Option<String>,
    candidate: Option<String>,
    /// The version table: each version apt knows and the releases (the suite of each source line,
    /// e.g. `bookworm-backports`) that offer it.
    versions: Vec<(String, Vec<String>)>,
}

/// The host's packages as far as this task cares.
#[derive(Debug, Default, Clone)]
struct AptState {
    /// dpkg's status per package name (names dpkg has never heard of are missing).
    dpkg: BTreeMap<String, (Status, String)>,
    /// `apt-cache policy` per name apt knows.
    policy: BTreeMap<String, Policy>,
    /// Seconds since the package lists were last updated; `None` when there are no lists at all.
    cache_age: Option<u64>,
    /// A file under /etc/apt/sources.list* is newer than the last update: the lists miss a source.
    sources_changed: bool,
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
            .and_then(|p| p.candidate.as_deref())
    }

    /// The newest version `release` offers of `name`.
    fn release_version(&self, name: &str, release: &str) -> Option<&str> {
        let policy = self.policy.get(strip_arch(name))?;
        policy
            .versions
            .iter()
            .filter(|(_, releases)| releases.iter().any(|r| r == release))
            .map(|(v, _)| v.as_str())
            .max_by(|a, b| version_cmp(a, b).unwrap_or(Ordering::Equal))
    }

    /// Whether apt's lists offer exactly this version of `name`.
    fn has_version(&self, name: &str, version: &str) -> bool {
        self.policy.get(strip_arch(name)).is_some_and(|p| {
            p.versions
                .iter()
                .any(|(v, _)| version_cmp(v, version) == Some(Ordering::Equal))
        })
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
    // Modification times with fractions of a second (coreutils ≥ 8.6): a source written in the same
    // second as the last update still counts as newer.
    let _ = write!(
        s,
        "echo {SEP}; \
         if ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'; then \
           stat -c %.9Y {STAMP} /var/lib/apt/lists/partial 2>/dev/null; \
         fi; echo {SEP}; date +%s.%N; echo {SEP}; \
         stat -c %.9Y /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           /etc/apt/sources.list.d/*.sources 2>/dev/null; true"
    );
    s
}

fn parse_state(text: &str) -> AptState {
    let sep = format!("{SEP}\n");
    let mut sections = text.split(&sep);
    let dpkg = parse_dpkg_query(sections.next().unwrap_or_default());
    let policy = parse_policy(sections.next().unwrap_or_default());
    let times = |t: &str| -> Option<f64> {
        t.lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .reduce(f64::max)
    };
    let updated = times(sections.next().unwrap_or_default());
    let now = times(sections.next().unwrap_or_default());
    let sources = times(sections.next().unwrap_or_default());
    let cache_age = match (updated, now) {
        (Some(t), Some(now)) => Some((now - t).max(0.0) as u64),
        _ => None,
    };
    let sources_changed = match (updated, sources) {
        (Some(u), Some(s)) => s > u,
        _ => false,
    };
    AptState {
        dpkg,
        policy,
        cache_age,
        sources_changed,
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

/// Parses `apt-cache policy a b …`: a block per name apt knows, `name:` then indented fields and the
/// version table, where a version line (` *** 1:9.2p1-2 500`, indented at most 5) is followed by its
/// source lines (`        500 http://deb.debian.org/debian bookworm/main amd64 Packages`).
fn parse_policy(text: &str) -> BTreeMap<String, Policy> {
    let mut out: BTreeMap<String, Policy> = BTreeMap::new();
    let mut current: Option<String> = None;
    let version = |v: &str| {
        let v = v.trim();
        (v != "(none)" && !v.is_empty()).then(|| v.to_string())
    };
    let mut in_table = false;
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            let name = strip_arch(line.trim_end_matches(':')).to_string();
            out.insert(name.clone(), Policy::default());
            current = Some(name);
            in_table = false;
            continue;
        }
        let Some(name) = &current else { continue };
        let entry = out.get_mut(name).expect("inserted above");
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Installed:") {
            entry.installed = version(v);
        } else if let Some(v) = t.strip_prefix("Candidate:") {
            entry.candidate = version(v);
        } else if t == "Version table:" {
            in_table = true;
        } else if in_table {
            let indent = line.len() - line.trim_start().len();
            let words: Vec<&str> = t.trim_start_matches("***").split_whitespace().collect();
            if indent <= 5 || t.starts_with("***") {
                if let Some(v) = words.first() {
                    entry.versions.push((v.to_string(), Vec::new()));
                }
            } else if let (Some(suite), Some((_, releases))) =
                (words.get(2), entry.versions.last_mut())
            {
                // `bookworm-backports/main` → `bookworm-backports`; /var/lib/dpkg/status has none.
                let suite = suite.split('/').next().unwrap_or_default();
                if !suite.is_empty() && !releases.iter().any(|r| r == suite) {
                    releases.push(suite.to_string());
                }
            }
        }
    }
    out
}

/// What the task will do. Packages are named as `apt-get` gets them (`pkg`, `pkg/release`, `pkg=v`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    install: Vec<String>,
    /// (name, installed version, wanted version)
    upgrade: Vec<(String, String, String)>,
    remove: Vec<String>,
    /// Names (or releases, versions of them) apt does not know yet: worth one `apt-get update` before
    /// giving up on them.
    unknown: Vec<String>,
    /// A `pkg=version` below the installed one: apt-get needs `--allow-downgrades`.
    downgrade: bool,
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
            let verb = if self.downgrade { "change" } else { "upgrade" };
            lines.push(format!("↑ {verb}: {}", ups.join(" ")));
        }
        if !self.remove.is_empty() {
            let verb = if purge { "purge" } else { "remove" };
            lines.push(format!("- {verb}: {}", self.remove.join(" ")));
        }
        lines.join("\n")
    }
}

fn plan(args: &Args, pkgs: &[Pkg], st: &AptState) -> Plan {
    let mut p = Plan::default();
    for pkg in pkgs {
        let name = &pkg.name;
        let arg = pkg.apt_arg();
        let installed = st.installed_version(name);
        if args.state == State::Absent {
            let present = match st.status(name) {
                Status::Installed | Status::Broken => true,
                Status::ConfigFiles => args.purge,
                Status::NotInstalled => false,
            };
            if present {
                p.remove.push(arg);
            }
            continue;
        }
        // The version this task wants, when the pin or `latest` names one.
        let wanted = match &pkg.pin {
            Pin::Any if args.state == State::Latest => st.candidate(name).map(str::to_string),
            Pin::Any => None,
            Pin::Release(r) => st.release_version(name, r).map(str::to_string),
            Pin::Version(v) => st.has_version(name, v).then(|| v.clone()),
        };
        let known = match &pkg.pin {
            Pin::Any => st.candidate(name).is_some(),
            Pin::Release(_) | Pin::Version(_) => wanted.is_some(),
        };
        let Some(installed) = installed else {
            if !known {
                p.unknown.push(arg.clone());
            }
            p.install.push(arg);
            continue;
        };
        if !known && pkg.pin != Pin::Any {
            // Installed, but the lists do not show the release or version asked for: an update may.
            p.unknown.push(arg.clone());
            p.upgrade
                .push((arg, installed.to_string(), "?".to_string()));
            continue;
        }
        let Some(wanted) = wanted else { continue };
        let order = version_cmp(installed, &wanted);
        let satisfied = match &pkg.pin {
            // `latest`: the candidate; `/release`: at least what the release offers.
            Pin::Any => installed == wanted,
            Pin::Release(_) => order.is_some_and(Ordering::is_ge),
            Pin::Version(_) => order == Some(Ordering::Equal),
        };
        if !satisfied {
            p.downgrade |= order == Some(Ordering::Greater);
            p.upgrade.push((arg, installed.to_string(), wanted));
        }
    }
    p
}

fn is_stale(args: &Args, st: &AptState) -> bool {
    st.sources_changed || st.cache_age.is_none_or(|age| age > args.cache_valid_time)
}

const APT_GET: &str = "DEBIAN_FRONTEND=noninteractive apt-get -y -q \
    -o DPkg::Lock::Timeout=120 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold";

impl Apt {
    async fn read(&self, ctx: &Ctx<'_>) -> Result<AptState, ModuleError> {
        let names: Vec<String> = self.pkgs.iter().map(|p| p.name.clone()).collect();
        let out = ctx.run(state_script(&names)).await?;
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

        let mut p = plan(args, &self.pkgs, &st);
        let wants_fresh = args.state == State::Latest
            || (args.state == State::Present && !(p.install.is_empty() && p.upgrade.is_empty()));
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
                p = plan(args, &self.pkgs, &st);
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
                let downgrades = if p.downgrade {
                    " --allow-downgrades"
                } else {
                    ""
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
                    format!(
                        "{APT_GET} install {recommends}{downgrades} {}",
                        list.join(" ")
                    ),
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
            "{DPKG}{SEP}\n{POLICY}{SEP}\n1700000000.5\n1700000100.25\n{SEP}\n1700003000.75\n{SEP}\n1699999000.0\n"
        ))
    }

    fn pkgs(names: &[&str]) -> Vec<Pkg> {
        names.iter().map(|n| Pkg::parse(n).unwrap()).collect()
    }

    /// `plan` for `args`, its names parsed as `build` does.
    fn plan_for(v: serde_json::Value, st: &AptState) -> Plan {
        let a = args(v);
        let names: Vec<&str> = a.name.iter().map(String::as_str).collect();
        let mut ps = Vec::new();
        for p in pkgs(&names) {
            if !ps.contains(&p) {
                ps.push(p);
            }
        }
        plan(&a, &ps, st)
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
        assert!(!state().sources_changed);
        let st = parse_state(&format!("{SEP}\n{SEP}\n{SEP}\n1700003000\n{SEP}\n"));
        assert_eq!(st.cache_age, None);
        assert!(is_stale(&args(json!({"name": "jq"})), &st));
    }

    #[test]
    fn present_installs_only_what_is_missing_and_flags_names_apt_does_not_know() {
        let p = plan_for(
            json!({"name": ["tree", "jq", "libfoo", "ghost", "jq"]}),
            &state(),
        );
        assert_eq!(p.install, ["jq", "libfoo", "ghost"]);
        assert_eq!(p.unknown, ["libfoo", "ghost"]);
        assert!(p.upgrade.is_empty() && p.remove.is_empty());
        assert_eq!(p.summary(false), "+ install: jq libfoo ghost");
    }

    #[test]
    fn latest_upgrades_when_the_candidate_differs() {
        let p = plan_for(json!({"name": ["tree"], "state": "latest"}), &state());
        assert_eq!(
            p.upgrade,
            [("tree".into(), "2.1.0-1".into(), "2.1.1-1".into())]
        );
        assert!(p.install.is_empty());
    }

    #[test]
    fn absent_removes_installed_and_purges_leftover_config_only_with_purge() {
        let a = json!({"name": ["tree", "telnet", "jq"], "state": "absent"});
        assert_eq!(plan_for(a, &state()).remove, ["tree"]);
        let a = json!({"name": ["tree", "telnet", "jq"], "state": "absent", "purge": true});
        let p = plan_for(a, &state());
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

    /// `apt-cache policy` of a Debian 12 host with bookworm, bookworm-security and bookworm-backports
    /// (abridged from a test host).
    const POLICY_BACKPORTS: &str = "openssh-server:
  Installed: 1:9.2p1-2+deb12u7
  Candidate: 1:9.2p1-2+deb12u7
  Version table:
     1:10.0p1-7~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
 *** 1:9.2p1-2+deb12u7 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        500 http://security.debian.org/debian-security bookworm-security/main amd64 Packages
        100 /var/lib/dpkg/status
     1:9.2p1-2+deb12u5 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
openssh-client:
  Installed: 1:10.0p1-7~bpo12+1
  Candidate: 1:10.0p1-7~bpo12+1
  Version table:
 *** 1:10.0p1-7~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
        100 /var/lib/dpkg/status
     1:9.2p1-2+deb12u7 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
tree:
  Installed: (none)
  Candidate: 2.1.0-1
  Version table:
     2.1.0-1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
";

    const DPKG_BACKPORTS: &str = "openssh-server\tii \t1:9.2p1-2+deb12u7\n\
                                  openssh-client\tii \t1:10.0p1-7~bpo12+1\n";

    fn backports_state() -> AptState {
        parse_state(&format!(
            "{DPKG_BACKPORTS}{SEP}\n{POLICY_BACKPORTS}{SEP}\n1700000000\n{SEP}\n1700000010\n{SEP}\n1699990000\n"
        ))
    }

    #[test]
    fn the_version_table_says_which_release_offers_which_version() {
        let st = backports_state();
        let ssh = &st.policy["openssh-server"];
        assert_eq!(ssh.installed.as_deref(), Some("1:9.2p1-2+deb12u7"));
        assert_eq!(
            ssh.versions,
            [
                (
                    "1:10.0p1-7~bpo12+1".to_string(),
                    vec!["bookworm-backports".to_string()]
                ),
                (
                    "1:9.2p1-2+deb12u7".to_string(),
                    vec!["bookworm".to_string(), "bookworm-security".to_string()]
                ),
                (
                    "1:9.2p1-2+deb12u5".to_string(),
                    vec!["bookworm".to_string()]
                ),
            ]
        );
        assert_eq!(
            st.release_version("openssh-server", "bookworm-backports"),
            Some("1:10.0p1-7~bpo12+1")
        );
        // The newest of the versions a release offers, by dpkg's order (not the table's).
        assert_eq!(
            st.release_version("openssh-server", "bookworm"),
            Some("1:9.2p1-2+deb12u7")
        );
        assert_eq!(st.release_version("openssh-server", "trixie"), None);
        assert_eq!(st.release_version("tree", "bookworm-backports"), None);
        assert!(st.has_version("openssh-server", "1:9.2p1-2+deb12u5"));
        assert!(!st.has_version("openssh-server", "1:9.3p1-1"));
    }

    #[test]
    fn a_release_pin_upgrades_to_what_the_release_offers_and_is_then_satisfied() {
        let st = backports_state();
        let p = plan_for(
            json!({"name": ["openssh-server/bookworm-backports", "openssh-client/bookworm-backports",
                            "tree/bookworm", "tree"]}),
            &st,
        );
        assert_eq!(
            p.upgrade,
            [(
                "openssh-server/bookworm-backports".to_string(),
                "1:9.2p1-2+deb12u7".to_string(),
                "1:10.0p1-7~bpo12+1".to_string()
            )]
        );
        // openssh-client is at the backports version already; tree is missing: once, pinned and plain.
        assert_eq!(p.install, ["tree/bookworm", "tree"]);
        assert!(p.unknown.is_empty() && !p.downgrade);
        assert_eq!(
            p.summary(false),
            "+ install: tree/bookworm tree\n↑ upgrade: openssh-server/bookworm-backports \
             (1:9.2p1-2+deb12u7 → 1:10.0p1-7~bpo12+1)"
        );
        // A release that offers less than what is installed is satisfied (at least, not exactly).
        let p = plan_for(json!({"name": "openssh-client/bookworm"}), &st);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_release_the_lists_do_not_know_yet_asks_for_an_update() {
        let st = backports_state();
        let p = plan_for(
            json!({"name": ["openssh-server/trixie-backports", "tree/trixie"]}),
            &st,
        );
        assert_eq!(
            p.unknown,
            ["openssh-server/trixie-backports", "tree/trixie"]
        );
        assert_eq!(p.install, ["tree/trixie"]);
        assert_eq!(p.upgrade[0].2, "?");
    }

    #[test]
    fn a_version_pin_wants_exactly_that_version_and_may_downgrade() {
        let st = backports_state();
        let p = plan_for(json!({"name": "openssh-client=1:10.0p1-7~bpo12+1"}), &st);
        assert!(p.is_empty(), "{p:?}");
        let p = plan_for(json!({"name": "openssh-client=1:9.2p1-2+deb12u7"}), &st);
        assert!(p.downgrade);
        assert_eq!(
            p.summary(false),
            "↑ change: openssh-client=1:9.2p1-2+deb12u7 (1:10.0p1-7~bpo12+1 → 1:9.2p1-2+deb12u7)"
        );
        let p = plan_for(json!({"name": "openssh-server=1:10.0p1-7~bpo12+1"}), &st);
        assert!(!p.downgrade);
        assert_eq!(p.upgrade.len(), 1);
        let p = plan_for(json!({"name": "tree=9.9-1"}), &st);
        assert_eq!(p.unknown, ["tree=9.9-1"]);
    }

    #[test]
    fn sources_newer_than_the_last_update_make_the_lists_stale() {
        let fresh = args(json!({"name": "jq", "cache_valid_time": 86400}));
        let text = |sources: &str| {
            format!("{SEP}\n{SEP}\n1700000000.50\n{SEP}\n1700000100\n{SEP}\n{sources}")
        };
        let st = parse_state(&text("1699000000.0\n1700000000.25\n"));
        assert!(!st.sources_changed && !is_stale(&fresh, &st));
        // Written in the same second as the update, but after it.
        let st = parse_state(&text("1699000000.0\n1700000000.75\n"));
        assert!(st.sources_changed && is_stale(&fresh, &st));
        // No sources files at all (or stat without fractions): nothing to compare.
        let st = parse_state(&text(""));
        assert!(!st.sources_changed);
    }

    #[test]
    fn pins_are_checked_when_the_task_is_built() {
        assert!(build(
            json!({"name": ["openssh-server/bookworm-backports", "nginx=1.22.1-9+deb12u1"]})
        )
        .is_ok());
        let err = build(json!({"name": "nginx=not a version"})).err().unwrap();
        assert!(
            err.contains("`name`") && err.contains("not a Debian version"),
            "{err}"
        );
        let err = build(json!({"name": "nginx/bookworm backports"}))
            .err()
            .unwrap();
        assert!(err.contains("not a release name"), "{err}");
        let err = build(json!({"name": "Nginx/bookworm"})).err().unwrap();
        assert!(err.contains("not a Debian package name"), "{err}");
        let err = build(json!({"name": "nginx/bookworm", "state": "absent"}))
            .err()
            .unwrap();
        assert!(err.contains("plain package names"), "{err}");
        assert_eq!(
            Pkg::parse("libc6:amd64=2.36-9").unwrap(),
            Pkg {
                name: "libc6:amd64".into(),
                pin: Pin::Version("2.36-9".into())
            }
        );
    }

    #[test]
    fn the_spec_lists_every_argument_the_struct_accepts() {
        let all = json!({"name": "jq", "state": "present", "update_cache": true, "cache_valid_time": 1,
                         "purge": false, "install_recommends": false});
        assert!(build(all.clone()).is_ok());
        assert_eq!(SPEC.args.len(), all.as_object().unwrap().len());
    }
}
