//! `cozy provision`: converge hosts over SSH with playbooks (Ansible's job).
//!
//! Everything that can be wrong without touching a host — inventory, playbooks, targets, `-e` — is
//! checked first and reported with its location (exit 1); then every host runs in parallel and the exit
//! code says how they ended: 0 all converged, 2 a task failed somewhere, 4 a host was unreachable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::{Map, Value as Json};

use crate::ops::connect::SshConnector;
use crate::ops::inventory::Inventory;
use crate::ops::playbook::run::{self, RunOptions};
use crate::ops::playbook::{builtin, parse, report, Playbook};

const EXAMPLES: &str = "\
Examples:
  cozy provision -i inventory.yml                        # built-in base + harden on every host
  cozy provision web -i inventory.yml -p nginx           # group `web`, built-in nginx playbook
  cozy provision -i inventory.yml -p site.yml --check --diff
  cozy provision root@10.0.0.5 -p harden --accept-new-host-keys
  cozy provision -i inventory.yml --json | jq .hosts

Exit codes: 0 every host converged; 1 bad input (nothing was run); 2 a task failed on some host;
4 some host was unreachable.";

#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ProvisionArgs {
    /// Hosts or groups of the inventory, or ad-hoc `user@address[:port]`; none: every host.
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
    /// The inventory file (YAML). Optional when every target is ad-hoc.
    #[arg(short = 'i', long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// A built-in playbook name (base, harden, nginx, mysql, redis, app) or a playbook file; repeatable,
    /// run in order. Default: base, then harden.
    #[arg(short = 'p', long = "playbook", value_name = "NAME|FILE")]
    pub playbooks: Vec<String>,
    /// Change nothing; report what would change.
    #[arg(long)]
    pub check: bool,
    /// Show what changes (unified diffs of files, before → after of settings).
    #[arg(long)]
    pub diff: bool,
    /// Print only the recap as JSON: {"ok": bool, "hosts": {NAME: {ok, changed, failed, unreachable, error}}}.
    #[arg(long)]
    pub json: bool,
    /// The OpenSSH known_hosts file that host keys are checked against.
    #[arg(long, value_name = "FILE", default_value_os_t = crate::ops::ssh::default_known_hosts())]
    pub known_hosts: PathBuf,
    /// Accept and record the key of a host that is not in known_hosts (a changed key is always refused).
    #[arg(long)]
    pub accept_new_host_keys: bool,
    /// A variable for every host, highest precedence; VALUE is YAML (`-e ports=[80,443]`).
    #[arg(short = 'e', long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// At most N hosts at once (default: all).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub forks: usize,
    /// Only tasks with one of these tags (and those tagged `always`).
    #[arg(long, value_name = "T,…", value_delimiter = ',')]
    pub tags: Vec<String>,
}

/// Runs `cozy provision`; returns the exit code.
pub async fn run(args: ProvisionArgs) -> anyhow::Result<u8> {
    let inventory = match &args.inventory {
        Some(path) => Inventory::load(path)?,
        None => Inventory::default(),
    };
    if args.inventory.is_none() {
        if args.targets.is_empty() {
            bail!("no inventory (-i FILE) and no ad-hoc target (user@address[:port]): nothing to provision");
        }
        if let Some(t) = args.targets.iter().find(|t| !t.contains('@')) {
            bail!("target `{t}`: without an inventory (-i FILE), targets must be ad-hoc `user@address[:port]`");
        }
    }
    let hosts = inventory
        .resolve(&args.targets)
        .map_err(anyhow::Error::msg)?;
    if hosts.is_empty() {
        bail!("the inventory {} has no hosts", inventory.source);
    }
    let inventory_dir = args
        .inventory
        .as_deref()
        .and_then(Path::parent)
        .map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
        .map(Path::to_path_buf);
    let names = if args.playbooks.is_empty() {
        vec!["base".to_string(), "harden".to_string()]
    } else {
        args.playbooks.clone()
    };
    let playbooks = names
        .iter()
        .map(|n| load_playbook(n, inventory_dir.as_deref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for pb in &playbooks {
        for play in &pb.plays {
            inventory
                .check_pattern(&play.hosts)
                .map_err(|e| anyhow::anyhow!("{}: play `{}`: {e}", play.location, play.name))?;
        }
    }
    let mut extra_vars = parse_vars(&args.vars)?;
    if uses_module(&playbooks, "nginx_site")
        && extra_vars.get("nginx_install_site") != Some(&Json::Bool(false))
    {
        let Some(path) = &args.inventory else {
            bail!("the nginx site is rendered from an inventory (-i FILE): its app hosts are the upstream \
                   (or pass -e nginx_install_site=false to install nginx alone)");
        };
        let site = nginx_site_var(path).map_err(|e| {
            anyhow::anyhow!("{e}\n(the nginx playbook installs the site of `cozy nginx render`; pass -e nginx_install_site=false to install nginx alone)")
        })?;
        extra_vars.insert("nginx_site".into(), site);
    }
    let opts = RunOptions {
        check: args.check,
        diff: args.diff,
        tags: args.tags.clone(),
        inventory: Arc::new(inventory),
        extra_vars,
        forks: args.forks,
        inventory_dir,
    };
    let connector = Arc::new(SshConnector {
        known_hosts: args.known_hosts.clone(),
        accept_new: args.accept_new_host_keys,
    });
    let reporter: Arc<dyn report::Reporter> =
        Arc::from(report::for_output(args.json, args.diff || args.check));
    let recap = run::run(hosts, playbooks, opts, connector, reporter).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&recap.to_json())?);
    } else {
        print!("{}", report::recap_table(&recap));
    }
    Ok(if recap.hosts.iter().any(|(_, r)| r.unreachable) {
        4
    } else if recap.success() {
        0
    } else {
        2
    })
}

/// Whether a task or handler of `playbooks` runs `module`.
fn uses_module(playbooks: &[Playbook], module: &str) -> bool {
    playbooks.iter().flat_map(|pb| &pb.plays).any(|play| {
        play.tasks
            .iter()
            .chain(&play.handlers)
            .any(|t| t.module.name == module)
    })
}

/// The `nginx_site` variable of the `nginx` playbook: the site `cozy nginx render -i INVENTORY` makes,
/// as the files the `nginx_site` module installs, and the facts the playbook's certificate tasks need.
fn nginx_site_var(inventory: &Path) -> anyhow::Result<Json> {
    use crate::ops::nginx::render::{self, RenderOptions};
    use crate::ops::nginx::settings::Tls;
    let (inv, settings) = crate::ops::nginx::load(inventory, None)?;
    let ups = render::upstreams(&inv, &settings)?;
    let opts = RenderOptions {
        template_dirs: crate::ops::nginx::template_dirs_beside(inventory),
        estate: inv.source.clone(),
        ..RenderOptions::default()
    };
    let site = render::render(&settings, ups, &opts)?;
    let (cert, key) = site.host_made_certificate.clone().unwrap_or_default();
    let tls = match &settings.tls {
        Tls::Off => "off",
        Tls::Files { .. } => "files",
        Tls::SelfSigned => "self_signed",
        Tls::Acme { .. } => "acme",
    };
    let email = match &settings.tls {
        Tls::Acme { email } => email.clone(),
        _ => None,
    };
    Ok(serde_json::json!({
        "name": site.name,
        "files": crate::ops::modules::nginx_site::files_var(&site),
        "tls": tls,
        "server_names": settings.server_names,
        "san": settings.server_names.iter().map(|n| format!("DNS:{n}")).collect::<Vec<_>>().join(","),
        "certificate": if cert.is_empty() { String::new() } else { format!("/etc/nginx/{cert}") },
        "certificate_key": if key.is_empty() { String::new() } else { format!("/etc/nginx/{key}") },
        "acme_email": email,
        "acme_root": settings.acme_root,
        "log_dir": settings.log_dir,
    }))
}

/// `-p NAME|FILE`: a file when one exists at that path; else `playbooks/NAME.yml` next to the inventory;
/// else the built-in playbook NAME.
pub fn load_playbook(name: &str, inventory_dir: Option<&Path>) -> anyhow::Result<Playbook> {
    let as_path = Path::new(name);
    let local = inventory_dir.map(|d| d.join("playbooks").join(format!("{name}.yml")));
    let file = if as_path.is_file() {
        Some(as_path.to_path_buf())
    } else {
        local.filter(|p| !name.contains('/') && p.is_file())
    };
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the playbook {}", path.display()))?;
        let dir = path.parent().map(|d| {
            if d.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                d.to_path_buf()
            }
        });
        return Ok(parse::parse(&path.display().to_string(), dir, &text)?);
    }
    if name.contains('/') || name.ends_with(".yml") || name.ends_with(".yaml") {
        bail!("playbook file {name} not found");
    }
    match builtin::playbook(name) {
        Some(text) => Ok(parse::parse(
            &format!("builtin:playbooks/{name}.yml"),
            None,
            text,
        )?),
        None => bail!(
            "no playbook `{name}`: not a file, and the built-in playbooks are: {}",
            builtin::playbook_names().join(", ")
        ),
    }
}

/// `-e KEY=VALUE` pairs; VALUE is read as YAML (`80` a number, `[a, b]` a list, `x` a string).
pub fn parse_vars(pairs: &[String]) -> anyhow::Result<Map<String, Json>> {
    let mut vars = Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("-e {pair}: expected KEY=VALUE");
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("-e {pair}: `{key}` is not a variable name (letters, digits, _)");
        }
        let value: Json = if value.is_empty() {
            Json::String(String::new())
        } else {
            serde_yaml_ng::from_str(value).unwrap_or_else(|_| Json::String(value.to_string()))
        };
        vars.insert(key.to_string(), value);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_vars_are_yaml_values() {
        let v = parse_vars(&[
            "ports=[80, 443]".into(),
            "name=web".into(),
            "on=true".into(),
        ])
        .unwrap();
        assert_eq!(v["ports"], serde_json::json!([80, 443]));
        assert_eq!(v["name"], "web");
        assert_eq!(v["on"], true);
        assert!(parse_vars(&["novalue".into()])
            .unwrap_err()
            .to_string()
            .contains("KEY=VALUE"));
        assert!(parse_vars(&["a b=1".into()]).is_err());
    }

    #[test]
    fn an_unknown_playbook_names_the_built_in_ones() {
        let err = load_playbook("nope", None).unwrap_err().to_string();
        assert!(err.contains("built-in playbooks are"), "{err}");
    }
}
