//! The inventory: which hosts exist, how to log in to them, how they are grouped, and their variables.
//!
//! Read from YAML (see docs/provisioning.md) with every error at its `file:line:column`, then used to
//! resolve the command line's targets (host names, groups, `all`, or ad-hoc `user@address[:port]`) into
//! [`HostSpec`]s, and to match a play's `hosts:` pattern against a host. `defaults` are applied while
//! reading, so a [`HostSpec`] is complete: the connection code never looks at the inventory again.

use std::path::{Path, PathBuf};

use marked_yaml::types::MarkedScalarNode;
use marked_yaml::Node;
use serde_json::{Map, Value};

use crate::ops::playbook::yaml::{
    self, check_keys, describe, did_you_mean, entry, is_null, list, port, Source, Top,
};
use crate::ops::playbook::ParseError;

/// The user cozy logs in as when neither the host nor `defaults` says.
pub const DEFAULT_USER: &str = "root";
pub const DEFAULT_PORT: u16 = 22;

const TOP_KEYS: &[&str] = &["defaults", "hosts", "groups", "vars"];
const HOST_KEYS: &[&str] = &[
    "address",
    "port",
    "user",
    "bootstrap_user",
    "ssh_key",
    "vars",
];
const DEFAULT_KEYS: &[&str] = &["port", "user", "bootstrap_user", "ssh_key"];

/// One host, with the defaults applied: everything needed to connect and run.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSpec {
    /// The inventory name (`inventory_hostname`); for an ad-hoc target, its address.
    pub name: String,
    /// A DNS name or an IP address (IPv6 without brackets).
    pub address: String,
    pub port: u16,
    /// The account cozy logs in with.
    pub user: String,
    /// Tried once when logging in as `user` is refused (a fresh host); `None`: no bootstrap.
    pub bootstrap_user: Option<String>,
    /// The private key to use (`~` expanded); `None`: the keys of ssh-agent.
    pub ssh_key: Option<PathBuf>,
    /// The host's own variables (`hosts.NAME.vars`).
    pub vars: Map<String, Value>,
}

/// A group of hosts, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    /// Host names, in the order written.
    pub hosts: Vec<String>,
}

/// The connection settings that `defaults` may give.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Defaults {
    pub port: Option<u16>,
    pub user: Option<String>,
    pub bootstrap_user: Option<String>,
    pub ssh_key: Option<PathBuf>,
}

/// A parsed inventory. [`Inventory::default`] is the empty one (only ad-hoc targets resolve).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// Where it was read from (for messages).
    pub source: String,
    pub defaults: Defaults,
    /// In the order written.
    pub hosts: Vec<HostSpec>,
    pub groups: Vec<Group>,
    /// Variables for every host.
    pub vars: Map<String, Value>,
}

/// Reading an inventory file failed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read the inventory {path}: {error}")]
    Read {
        path: PathBuf,
        // Not `source`: the message already says it, and a source would print it a second time.
        error: std::io::Error,
    },
    #[error(transparent)]
    Parse(#[from] ParseError),
}

impl Inventory {
    /// Reads and parses the inventory file at `path`.
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|error| InventoryError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Ok(Inventory::parse(&path.display().to_string(), &text)?)
    }

    /// Parses inventory YAML; `source_name` is used in error locations.
    pub fn parse(source_name: &str, text: &str) -> Result<Inventory, ParseError> {
        let src = Source::new(source_name);
        let root = src.load(text, Top::Mapping)?;
        let Node::Mapping(root) = &root else {
            return Err(src.error(src.node(&root), "the inventory must be a mapping"));
        };
        check_keys(&src, root, TOP_KEYS, "inventory key")?;
        let mut inv = Inventory {
            source: source_name.to_string(),
            ..Inventory::default()
        };
        if let Some((key, value)) = entry(root, "defaults") {
            inv.defaults = parse_defaults(&src, key, value)?;
        }
        if let Some((key, value)) = entry(root, "vars") {
            inv.vars = yaml::vars(&src, key, value)?;
        }
        if let Some((key, value)) = entry(root, "hosts") {
            for (name, host) in mapping(&src, key, value, "a mapping of host names to hosts")? {
                check_name(&src, name, "host")?;
                inv.hosts.push(parse_host(&src, &inv.defaults, name, host)?);
            }
        }
        if let Some((key, value)) = entry(root, "groups") {
            for (name, members) in mapping(
                &src,
                key,
                value,
                "a mapping of group names to lists of hosts",
            )? {
                inv.groups.push(parse_group(&src, &inv, name, members)?);
            }
        }
        Ok(inv)
    }

    /// Every name a target may use: hosts, groups and `all`.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        names.extend(self.groups.iter().map(|g| g.name.as_str()));
        names.push("all");
        names
    }

    pub fn host(&self, name: &str) -> Option<&HostSpec> {
        self.hosts.iter().find(|h| h.name == name)
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// The hosts named by `targets` (none: all hosts), without duplicates, in inventory order followed
    /// by ad-hoc hosts in the order given. A target is a host, a group, `all`, an ad-hoc
    /// `user@address[:port]` (`user@[::1]:22` for IPv6), or a comma-separated list of those.
    pub fn resolve(&self, targets: &[String]) -> Result<Vec<HostSpec>, String> {
        if targets.is_empty() {
            return Ok(self.hosts.clone());
        }
        let mut wanted = vec![false; self.hosts.len()];
        let mut ad_hoc: Vec<HostSpec> = Vec::new();
        for target in targets.iter().flat_map(|t| t.split(',')).map(str::trim) {
            if target.is_empty() {
                continue;
            }
            if target.contains('@') {
                let host = self.ad_hoc(target)?;
                if !ad_hoc.iter().any(|h| h.name == host.name) {
                    ad_hoc.push(host);
                }
                continue;
            }
            let Some(members) = self.members(target) else {
                return Err(self.unknown(target));
            };
            for (i, host) in self.hosts.iter().enumerate() {
                if members.contains(&host.name.as_str()) {
                    wanted[i] = true;
                }
            }
        }
        let mut hosts: Vec<HostSpec> = self
            .hosts
            .iter()
            .zip(wanted)
            .filter(|(_, w)| *w)
            .map(|(h, _)| h.clone())
            .collect();
        for host in ad_hoc {
            if !hosts.iter().any(|h| h.name == host.name) {
                hosts.push(host);
            }
        }
        Ok(hosts)
    }

    /// Whether a play's `hosts:` pattern (a host, a group, `all`, or a list of those separated by `,` or
    /// `:`) includes the host called `host`. `all` includes ad-hoc hosts too.
    pub fn pattern_matches(&self, pattern: &str, host: &str) -> bool {
        pattern_parts(pattern).any(|part| match part {
            "all" => true,
            name => match self.group(name) {
                Some(g) => g.hosts.iter().any(|h| h == host),
                None => name == host,
            },
        })
    }

    /// Checks a play's `hosts:` pattern: every part must be a host or group of this inventory, or `all`.
    pub fn check_pattern(&self, pattern: &str) -> Result<(), String> {
        match pattern_parts(pattern).find(|p| self.members(p).is_none()) {
            None => Ok(()),
            Some(part) => Err(self.unknown(part)),
        }
    }

    /// The host names of a host, group or `all`.
    fn members(&self, name: &str) -> Option<Vec<&str>> {
        if name == "all" {
            return Some(self.hosts.iter().map(|h| h.name.as_str()).collect());
        }
        if let Some(g) = self.group(name) {
            return Some(g.hosts.iter().map(String::as_str).collect());
        }
        self.host(name).map(|h| vec![h.name.as_str()])
    }

    fn unknown(&self, target: &str) -> String {
        let names = self.names();
        format!(
            "`{target}` is neither a host nor a group of {}{}; valid names: {} \
             (or an ad-hoc host: user@address[:port])",
            if self.source.is_empty() {
                "the inventory"
            } else {
                &self.source
            },
            did_you_mean(target, &names),
            list(&names)
        )
    }

    /// An ad-hoc `user@address[:port]` host, with the inventory's defaults for what it does not say.
    fn ad_hoc(&self, target: &str) -> Result<HostSpec, String> {
        let (user, address, port) = parse_ad_hoc(target)?;
        Ok(HostSpec {
            name: address.clone(),
            address,
            port: port.or(self.defaults.port).unwrap_or(DEFAULT_PORT),
            user,
            bootstrap_user: self.defaults.bootstrap_user.clone(),
            ssh_key: self.defaults.ssh_key.clone(),
            vars: Map::new(),
        })
    }
}

fn pattern_parts(pattern: &str) -> impl Iterator<Item = &str> {
    pattern
        .split([',', ':'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Splits `user@address[:port]` (`user@[v6address]:port` for IPv6).
pub fn parse_ad_hoc(target: &str) -> Result<(String, String, Option<u16>), String> {
    let bad = |why: &str| format!("ad-hoc host `{target}`: {why} (write user@address[:port])");
    let (user, rest) = target.split_once('@').ok_or_else(|| bad("no user"))?;
    if user.is_empty() {
        return Err(bad("no user before `@`"));
    }
    let (address, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (address, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("`[` without `]` around the IPv6 address"))?;
        match after {
            "" => (address, None),
            p => match p.strip_prefix(':') {
                Some(p) => (address, Some(p)),
                None => return Err(bad("unexpected text after `]`")),
            },
        }
    } else if rest.matches(':').count() > 1 {
        // A bare IPv6 address: its colons cannot be told from a port.
        return Err(bad(
            "an IPv6 address must be in brackets, e.g. root@[::1]:22",
        ));
    } else {
        match rest.split_once(':') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        }
    };
    if address.is_empty() {
        return Err(bad("no address"));
    }
    if address.contains(['@', '/', ' ']) {
        return Err(bad("the address has a character that is not allowed"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("`{p}` is not a port number (1-65535)")))?,
        ),
    };
    Ok((user.to_string(), address.to_string(), port))
}

/// The entries of a mapping value (nothing written: no entries).
fn mapping<'a>(
    src: &Source,
    key: &MarkedScalarNode,
    value: &'a Node,
    what: &str,
) -> Result<Vec<(&'a MarkedScalarNode, &'a Node)>, ParseError> {
    match value {
        Node::Mapping(m) => Ok(m.iter().collect()),
        Node::Scalar(s) if is_null(s) => Ok(Vec::new()),
        other => Err(src.error(
            src.value(key, value),
            format!("`{}` must be {what}, not {}", key.as_str(), describe(other)),
        )),
    }
}

/// Host and group names must not look like the other things a target can be.
fn check_name(src: &Source, name: &MarkedScalarNode, what: &str) -> Result<(), ParseError> {
    let n = name.as_str();
    let why = if n.is_empty() {
        Some("must not be empty".to_string())
    } else if n == "all" {
        Some("`all` is the built-in group of every host".to_string())
    } else if n.contains(['@', ',', ':', ' ', '[', ']']) {
        Some("must not contain `@`, `,`, `:`, `[`, `]` or spaces".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(src.error(src.key(name), format!("{what} name `{n}`: {why}"))),
        None => Ok(()),
    }
}

fn parse_defaults(
    src: &Source,
    key: &MarkedScalarNode,
    value: &Node,
) -> Result<Defaults, ParseError> {
    let mut d = Defaults::default();
    let Node::Mapping(map) = value else {
        if matches!(value, Node::Scalar(s) if is_null(s)) {
            return Ok(d);
        }
        return Err(src.error(
            src.value(key, value),
            format!("`defaults` must be a mapping, not {}", describe(value)),
        ));
    };
    for (k, v) in map.iter() {
        match k.as_str() {
            "port" => d.port = Some(port(src, k, v)?),
            "user" => d.user = Some(non_empty(src, k, v)?),
            "bootstrap_user" => d.bootstrap_user = Some(non_empty(src, k, v)?),
            "ssh_key" => d.ssh_key = Some(expand_tilde(&non_empty(src, k, v)?)),
            other => {
                let hint = if HOST_KEYS.contains(&other) {
                    " (set it per host)"
                } else {
                    ""
                };
                return Err(src.error(
                    src.key(k),
                    format!(
                        "unknown key `{other}` in `defaults`{}{hint}; valid: {}",
                        did_you_mean(other, DEFAULT_KEYS),
                        list(DEFAULT_KEYS)
                    ),
                ));
            }
        }
    }
    Ok(d)
}

fn parse_host(
    src: &Source,
    defaults: &Defaults,
    name: &MarkedScalarNode,
    value: &Node,
) -> Result<HostSpec, ParseError> {
    let Node::Mapping(map) = value else {
        return Err(src.error(
            src.value(name, value),
            format!(
                "host `{}` must be a mapping with at least `address`, not {}",
                name.as_str(),
                describe(value)
            ),
        ));
    };
    check_keys(
        src,
        map,
        HOST_KEYS,
        &format!("key of host `{}`:", name.as_str()),
    )?;
    let mut host = HostSpec {
        name: name.as_str().to_string(),
        address: String::new(),
        port: defaults.port.unwrap_or(DEFAULT_PORT),
        user: defaults
            .user
            .clone()
            .unwrap_or_else(|| DEFAULT_USER.to_string()),
        bootstrap_user: defaults.bootstrap_user.clone(),
        ssh_key: defaults.ssh_key.clone(),
        vars: Map::new(),
    };
    let mut has_address = false;
    for (k, v) in map.iter() {
        match k.as_str() {
            "address" => {
                host.address = non_empty(src, k, v)?;
                has_address = true;
            }
            "port" => host.port = port(src, k, v)?,
            "user" => host.user = non_empty(src, k, v)?,
            "bootstrap_user" => host.bootstrap_user = Some(non_empty(src, k, v)?),
            "ssh_key" => host.ssh_key = Some(expand_tilde(&non_empty(src, k, v)?)),
            "vars" => host.vars = yaml::vars(src, k, v)?,
            _ => {} // refused by check_keys
        }
    }
    if !has_address {
        return Err(src.error(
            src.key(name),
            format!("host `{}` has no `address`", name.as_str()),
        ));
    }
    Ok(host)
}

fn parse_group(
    src: &Source,
    inv: &Inventory,
    name: &MarkedScalarNode,
    value: &Node,
) -> Result<Group, ParseError> {
    check_name(src, name, "group")?;
    if inv.host(name.as_str()).is_some() {
        return Err(src.error(
            src.key(name),
            format!("group `{}` has the name of a host", name.as_str()),
        ));
    }
    let members = yaml::string_or_list(src, name, value).map_err(|_| {
        src.error(
            src.value(name, value),
            format!(
                "group `{}` must be a list of host names, not {}",
                name.as_str(),
                describe(value)
            ),
        )
    })?;
    let host_names: Vec<&str> = inv.hosts.iter().map(|h| h.name.as_str()).collect();
    let mut hosts = Vec::new();
    for (member, at) in members {
        if !host_names.contains(&member.as_str()) {
            let message = if host_names.is_empty() {
                format!(
                    "`{member}` in group `{}` is not a host: the inventory has no hosts",
                    name.as_str()
                )
            } else {
                format!(
                    "`{member}` in group `{}` is not a host of the inventory{}; hosts: {}",
                    name.as_str(),
                    did_you_mean(&member, &host_names),
                    list(&host_names)
                )
            };
            return Err(src.error(at, message));
        }
        if !hosts.contains(&member) {
            hosts.push(member);
        }
    }
    Ok(Group {
        name: name.as_str().to_string(),
        hosts,
    })
}

fn non_empty(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
    let s = yaml::string(src, key, value)?;
    if s.trim().is_empty() {
        return Err(src.error(
            src.value(key, value),
            format!("`{}` must not be empty", key.as_str()),
        ));
    }
    Ok(s)
}

/// `~` and `~/…` are the home directory ($HOME); anything else is kept as written.
pub fn expand_tilde(path: &str) -> PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match (path, home) {
        ("~", Some(home)) => PathBuf::from(home),
        (p, Some(home)) if p.starts_with("~/") => PathBuf::from(home).join(&p[2..]),
        (p, _) => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const INVENTORY: &str = "\
defaults:
  user: deploy
  bootstrap_user: root
  ssh_key: ~/.ssh/id_ed25519
hosts:
  web1: {address: web1.example.com}
  web2: {address: web2.example.com, port: 2222, vars: {role: replica}}
  db1:
    address: 10.0.0.9
    user: admin
    ssh_key: /keys/db
groups:
  web: [web1, web2]
  db: [db1]
vars:
  timezone: UTC
";

    fn inv() -> Inventory {
        Inventory::parse("inv.yml", INVENTORY).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str, line: usize, column: usize) -> String {
        let e = Inventory::parse("inv.yml", text).expect_err("should be refused");
        assert_eq!(
            (e.location.line, e.location.column),
            (line, column),
            "wrong location: {e}"
        );
        assert!(e
            .to_string()
            .starts_with(&format!("inv.yml:{line}:{column}: ")));
        e.message
    }

    fn names(hosts: &[HostSpec]) -> Vec<&str> {
        hosts.iter().map(|h| h.name.as_str()).collect()
    }

    fn targets(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_apply_to_every_host_that_does_not_override_them() {
        let inv = inv();
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());
        let web2 = inv.host("web2").unwrap();
        assert_eq!(web2.address, "web2.example.com");
        assert_eq!(web2.port, 2222);
        assert_eq!(web2.user, "deploy");
        assert_eq!(web2.bootstrap_user.as_deref(), Some("root"));
        assert_eq!(web2.ssh_key, Some(home.join(".ssh/id_ed25519")));
        assert_eq!(Value::Object(web2.vars.clone()), json!({"role": "replica"}));
        let db1 = inv.host("db1").unwrap();
        assert_eq!((db1.user.as_str(), db1.port), ("admin", 22));
        assert_eq!(db1.ssh_key, Some(PathBuf::from("/keys/db")));
        assert_eq!(Value::Object(inv.vars.clone()), json!({"timezone": "UTC"}));
    }

    #[test]
    fn without_defaults_hosts_log_in_as_root_on_port_22_with_the_agent() {
        let inv = Inventory::parse("i", "hosts:\n  a: {address: 10.0.0.1}\n").unwrap();
        let a = &inv.hosts[0];
        assert_eq!((a.user.as_str(), a.port), ("root", 22));
        assert_eq!((a.bootstrap_user.clone(), a.ssh_key.clone()), (None, None));
    }

    #[test]
    fn targets_resolve_to_hosts_in_inventory_order_without_duplicates() {
        let inv = inv();
        assert_eq!(names(&inv.resolve(&[]).unwrap()), ["web1", "web2", "db1"]);
        assert_eq!(
            names(&inv.resolve(&targets(&["db", "web1"])).unwrap()),
            ["web1", "db1"]
        );
        assert_eq!(
            names(&inv.resolve(&targets(&["web", "web2", "web1,db1"])).unwrap()),
            ["web1", "web2", "db1"]
        );
        assert_eq!(
            names(&inv.resolve(&targets(&["all"])).unwrap()),
            ["web1", "web2", "db1"]
        );
    }

    #[test]
    fn an_unknown_target_lists_the_valid_names() {
        let e = inv().resolve(&targets(&["wbe"])).unwrap_err();
        assert!(
            e.starts_with("`wbe` is neither a host nor a group of inv.yml (did you mean `web`?)"),
            "{e}"
        );
        assert!(
            e.contains("valid names: `web1`, `web2`, `db1`, `web`, `db`, `all`"),
            "{e}"
        );
    }

    #[test]
    fn ad_hoc_targets_are_user_at_address_with_an_optional_port() {
        assert_eq!(
            parse_ad_hoc("deploy@10.0.0.5:2222"),
            Ok(("deploy".into(), "10.0.0.5".into(), Some(2222)))
        );
        assert_eq!(
            parse_ad_hoc("root@host.example"),
            Ok(("root".into(), "host.example".into(), None))
        );
        assert_eq!(
            parse_ad_hoc("root@[::1]:22"),
            Ok(("root".into(), "::1".into(), Some(22)))
        );
        assert_eq!(
            parse_ad_hoc("root@[fe80::1]"),
            Ok(("root".into(), "fe80::1".into(), None))
        );
        assert!(parse_ad_hoc("root@::1")
            .unwrap_err()
            .contains("in brackets"));
        assert!(parse_ad_hoc("@host").unwrap_err().contains("no user"));
        assert!(parse_ad_hoc("root@").unwrap_err().contains("no address"));
        assert!(parse_ad_hoc("root@h:99999")
            .unwrap_err()
            .contains("`99999` is not a port number"));
        assert!(parse_ad_hoc("root@h:0").is_err());
        assert!(parse_ad_hoc("root@[::1").is_err());
    }

    #[test]
    fn ad_hoc_hosts_take_the_inventory_defaults_and_follow_inventory_hosts() {
        let hosts = inv()
            .resolve(&targets(&["ops@10.0.0.7", "db", "ops@10.0.0.7"]))
            .unwrap();
        assert_eq!(names(&hosts), ["db1", "10.0.0.7"]);
        let h = &hosts[1];
        assert_eq!(
            (h.user.as_str(), h.address.as_str(), h.port),
            ("ops", "10.0.0.7", 22)
        );
        assert_eq!(h.bootstrap_user.as_deref(), Some("root"));
        let empty = Inventory::default();
        let hosts = empty.resolve(&targets(&["root@[::1]:2200"])).unwrap();
        assert_eq!((hosts[0].address.as_str(), hosts[0].port), ("::1", 2200));
        assert!(ssh_key_is_none(&hosts[0]));
    }

    fn ssh_key_is_none(h: &HostSpec) -> bool {
        h.ssh_key.is_none()
    }

    #[test]
    fn play_patterns_match_hosts_groups_all_and_lists() {
        let inv = inv();
        assert!(inv.pattern_matches("all", "web1"));
        assert!(inv.pattern_matches("all", "10.0.0.7"));
        assert!(inv.pattern_matches("web", "web2"));
        assert!(!inv.pattern_matches("web", "db1"));
        assert!(inv.pattern_matches("db1", "db1"));
        assert!(inv.pattern_matches("web:db", "db1"));
        assert!(inv.pattern_matches("web, db1", "db1"));
        assert!(!inv.pattern_matches("web", "10.0.0.7"));
        assert!(inv.check_pattern("web,db1:all").is_ok());
        assert!(inv
            .check_pattern("db,wbe")
            .unwrap_err()
            .contains("`wbe` is neither a host nor a group of inv.yml (did you mean `web`?)"));
    }

    #[test]
    fn an_unknown_key_is_reported_at_itself_with_the_valid_ones() {
        let msg = err("hosts:\n  a: {address: x}\ngroup:\n  g: [a]\n", 3, 1);
        assert_eq!(msg, "unknown inventory key `group` (did you mean `groups`?); valid: `defaults`, `hosts`, `groups`, `vars`");
        let msg = err("hosts:\n  a:\n    address: x\n    prot: 22\n", 4, 5);
        assert!(
            msg.starts_with(
                "unknown key of host `a`: `prot` (did you mean `port`?); valid: `address`"
            ),
            "{msg}"
        );
        let msg = err("defaults:\n  address: x\n", 2, 3);
        assert!(msg.contains("(set it per host)"), "{msg}");
    }

    #[test]
    fn a_group_member_that_is_not_a_host_is_reported_at_itself() {
        let msg = err("hosts:\n  web1: {address: a}\n  web2: {address: b}\ngroups:\n  web:\n    - web1\n    - web3\n", 7, 7);
        assert_eq!(msg, "`web3` in group `web` is not a host of the inventory (did you mean `web1`?); hosts: `web1`, `web2`");
        let msg = err("hosts:\n  a: {address: x}\ngroups:\n  a: [a]\n", 4, 3);
        assert!(msg.contains("has the name of a host"), "{msg}");
        let msg = err("hosts:\n  a: {address: x}\ngroups:\n  all: [a]\n", 4, 3);
        assert!(msg.contains("built-in group"), "{msg}");
        let msg = err("hosts:\n  a: {address: x}\ngroups:\n  g: {a: 1}\n", 4, 6);
        assert!(
            msg.starts_with("group `g` must be a list of host names"),
            "{msg}"
        );
    }

    #[test]
    fn host_values_are_checked() {
        let msg = err("hosts:\n  a: {port: 22}\n", 2, 3);
        assert_eq!(msg, "host `a` has no `address`");
        let msg = err("hosts:\n  a: {address: x, port: \"22\"}\n", 2, 25);
        assert_eq!(
            msg,
            "`port` must be a port number from 1 to 65535, not `22`"
        );
        let msg = err("hosts:\n  a: {address: x, port: 70000}\n", 2, 25);
        assert!(msg.starts_with("`port` must be a port number"), "{msg}");
        let msg = err("hosts:\n  a: {address: [x]}\n", 2, 16);
        assert_eq!(msg, "`address` must be a string, not a list");
        let msg = err("hosts:\n  a:\n", 2, 3);
        assert!(msg.starts_with("host `a` must be a mapping"), "{msg}");
        let msg = err("hosts:\n  a@b: {address: x}\n", 2, 3);
        assert!(msg.contains("must not contain"), "{msg}");
        let msg = err("hosts:\n  a: {address: x}\n  a: {address: y}\n", 3, 3);
        assert!(msg.contains("given twice"), "{msg}");
    }

    #[test]
    fn broken_yaml_is_reported_at_its_line() {
        let msg = err("hosts:\n  a:\n    address: x\n   port: 22\n", 4, 8);
        assert!(msg.starts_with("invalid YAML"), "{msg}");
    }

    #[test]
    fn load_names_the_file_it_cannot_read() {
        let e = Inventory::load(Path::new("/nonexistent/inv.yml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the inventory /nonexistent/inv.yml: "),
            "{e}"
        );
    }
}
