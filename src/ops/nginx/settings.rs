//! The `nginx:` block: read from the inventory's `vars` or from `cozy.yaml`, validated into
//! [`NginxSettings`] with every error at its `file:line:column` (and a did-you-mean for unknown keys).
//!
//! Parse, don't validate: a [`NginxSettings`] that exists holds only values nginx accepts (host names,
//! rates like `10r/m`, sizes like `64k`, times like `75s`, networks), so the templates never need to
//! check anything. Paths of certificate files are resolved against the folder of the file that names
//! them and must exist and hold PEM data.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::Node;
use serde_json::Value;

use crate::ops::playbook::yaml::{
    self, check_keys, describe, did_you_mean, entry, is_null, list, port, Source, Top,
};
use crate::ops::playbook::ParseError;

const KEYS: &[&str] = &[
    "app_group",
    "server_names",
    "tls",
    "ports",
    "listen_addresses",
    "ipv6",
    "http2",
    "rate_limits",
    "client_max_body_size",
    "trusted_proxies",
    "demo",
    "expose_metrics",
    "catch_all",
    "gzip",
    "upstream",
    "realtime_timeout",
    "log_dir",
    "acme_root",
    "hsts_preload",
    "ocsp_stapling",
    "resolver",
];
const TLS_KEYS: &[&str] = &["certificate", "key", "self_signed", "acme"];
const ACME_KEYS: &[&str] = &["email"];
const PORT_KEYS: &[&str] = &["http", "https"];
const RATE_KEYS: &[&str] = &[
    "login",
    "login_burst",
    "api",
    "api_burst",
    "websocket_connections",
];
const UPSTREAM_KEYS: &[&str] = &["port", "max_fails", "fail_timeout", "keepalive"];

/// How the site gets its certificate.
#[derive(Debug, Clone, PartialEq)]
pub enum Tls {
    /// Plain HTTP only (a staging box behind a TLS-terminating load balancer, or a test).
    Off,
    /// Certificate and key files on this machine, installed with the site (key mode 0600).
    Files { certificate: PathBuf, key: PathBuf },
    /// A self-signed certificate made once on each nginx host (staging).
    SelfSigned,
    /// Let's Encrypt (or any ACME CA) through certbot's webroot: the challenge location is served on
    /// port 80; until certbot has run, a self-signed placeholder keeps nginx startable.
    Acme { email: Option<String> },
}

/// A `limit_req` rate: requests per second or per minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per_minute: bool,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}r/{}",
            self.count,
            if self.per_minute { "m" } else { "s" }
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimits {
    /// `POST /v1/sessions` and `POST /v1/users`, per client address.
    pub login: Rate,
    pub login_burst: u32,
    /// Every API request, per client address.
    pub api: Rate,
    pub api_burst: u32,
    /// Open WebSocket connections per client address.
    pub websocket_connections: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// The daemon's port on an app host that does not say (`app_listen` in its vars).
    pub port: u16,
    pub max_fails: u32,
    /// An nginx time (`10s`).
    pub fail_timeout: String,
    pub keepalive: u32,
}

/// The validated `nginx:` block.
#[derive(Debug, Clone, PartialEq)]
pub struct NginxSettings {
    /// Where the block was read from (`inventory.yml`, `cozy.yaml`, or `defaults`).
    pub source: String,
    /// The inventory group whose hosts run the daemon.
    pub app_group: String,
    pub server_names: Vec<String>,
    pub tls: Tls,
    pub http_port: u16,
    pub https_port: u16,
    /// Addresses to listen on; empty: every address.
    pub listen_addresses: Vec<IpAddr>,
    /// Also listen on IPv6 (`[::]`) when no addresses are given.
    pub ipv6: bool,
    pub http2: bool,
    pub rate: RateLimits,
    /// An nginx size (`64k`).
    pub client_max_body_size: String,
    /// Load balancers in front of nginx whose X-Forwarded-For is believed (none by default).
    pub trusted_proxies: Vec<IpNet>,
    pub demo: bool,
    pub expose_metrics: bool,
    pub catch_all: bool,
    pub gzip: bool,
    pub upstream: Upstream,
    /// An nginx time: how long a WebSocket may be silent (longer than cozy's heartbeat).
    pub realtime_timeout: String,
    pub log_dir: String,
    pub acme_root: String,
    pub hsts_preload: bool,
    pub ocsp_stapling: bool,
    pub resolver: Vec<IpAddr>,
}

impl NginxSettings {
    /// The settings when no `nginx:` block is given: plain HTTP for `localhost`.
    pub fn defaults(source: &str) -> NginxSettings {
        NginxSettings {
            source: source.to_string(),
            app_group: "app".into(),
            server_names: vec!["localhost".into()],
            tls: Tls::Off,
            http_port: 80,
            https_port: 443,
            listen_addresses: Vec::new(),
            ipv6: true,
            http2: true,
            rate: RateLimits {
                login: Rate {
                    count: 10,
                    per_minute: true,
                },
                login_burst: 5,
                api: Rate {
                    count: 50,
                    per_minute: false,
                },
                api_burst: 100,
                websocket_connections: 20,
            },
            client_max_body_size: "64k".into(),
            trusted_proxies: Vec::new(),
            demo: false,
            expose_metrics: false,
            catch_all: true,
            gzip: true,
            upstream: Upstream {
                port: 8080,
                max_fails: 3,
                fail_timeout: "10s".into(),
                keepalive: 32,
            },
            realtime_timeout: "75s".into(),
            log_dir: "/var/log/nginx".into(),
            acme_root: "/var/www/_letsencrypt".into(),
            hsts_preload: false,
            ocsp_stapling: false,
            resolver: Vec::new(),
        }
    }

    /// The `nginx:` block of a YAML file: at `vars.nginx` of an inventory, or at the top of cozy.yaml.
    /// `None` when the file has no such block. `base_dir` resolves relative certificate paths.
    pub fn from_file(
        source_name: &str,
        text: &str,
        at: BlockAt,
        base_dir: &Path,
    ) -> Result<Option<NginxSettings>, ParseError> {
        let src = Source::new(source_name);
        let root = src.load(text, Top::Mapping)?;
        let Node::Mapping(root) = &root else {
            return Ok(None);
        };
        let holder = match at {
            BlockAt::Top => root,
            BlockAt::InventoryVars => match entry(root, "vars") {
                Some((_, Node::Mapping(vars))) => vars,
                _ => return Ok(None),
            },
        };
        match entry(holder, "nginx") {
            None => Ok(None),
            Some((key, value)) => parse(&src, key, value, base_dir).map(Some),
        }
    }
}

/// Where the block sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockAt {
    /// `vars: {nginx: …}` of an inventory.
    InventoryVars,
    /// `nginx: …` at the top of cozy.yaml.
    Top,
}

fn parse(
    src: &Source,
    key: &MarkedScalarNode,
    value: &Node,
    base_dir: &Path,
) -> Result<NginxSettings, ParseError> {
    let mut s = NginxSettings::defaults(&src.file);
    let map = mapping(src, key, value)?;
    let Some(map) = map else { return Ok(s) };
    check_keys(src, map, KEYS, "`nginx` key")?;
    for (k, v) in map.iter() {
        match k.as_str() {
            "app_group" => s.app_group = name(src, k, v)?,
            "server_names" => {
                let names = yaml::string_or_list(src, k, v)?;
                if names.is_empty() {
                    return Err(src.error(
                        src.value(k, v),
                        "`server_names` must name at least one host",
                    ));
                }
                s.server_names = names
                    .into_iter()
                    .map(|(n, at)| server_name(&n).map_err(|why| src.error(at, why)))
                    .collect::<Result<_, _>>()?;
            }
            "tls" => s.tls = tls(src, k, v, base_dir)?,
            "ports" => {
                if let Some(ports) = mapping(src, k, v)? {
                    check_keys(src, ports, PORT_KEYS, "`nginx.ports` key")?;
                    for (pk, pv) in ports.iter() {
                        let p = port(src, pk, pv)?;
                        match pk.as_str() {
                            "http" => s.http_port = p,
                            _ => s.https_port = p,
                        }
                    }
                }
            }
            "listen_addresses" => {
                s.listen_addresses = yaml::string_or_list(src, k, v)?
                    .into_iter()
                    .map(|(a, at)| {
                        a.parse::<IpAddr>().map_err(|_| {
                            src.error(at, format!("`{a}` is not an IP address (listen_addresses)"))
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            "ipv6" => s.ipv6 = yaml::boolean(src, k, v)?,
            "http2" => s.http2 = yaml::boolean(src, k, v)?,
            "rate_limits" => {
                if let Some(rates) = mapping(src, k, v)? {
                    check_keys(src, rates, RATE_KEYS, "`nginx.rate_limits` key")?;
                    for (rk, rv) in rates.iter() {
                        match rk.as_str() {
                            "login" => s.rate.login = rate(src, rk, rv)?,
                            "api" => s.rate.api = rate(src, rk, rv)?,
                            "login_burst" => s.rate.login_burst = count(src, rk, rv, 0)?,
                            "api_burst" => s.rate.api_burst = count(src, rk, rv, 0)?,
                            _ => s.rate.websocket_connections = count(src, rk, rv, 1)?,
                        }
                    }
                }
            }
            "client_max_body_size" => s.client_max_body_size = size(src, k, v)?,
            "trusted_proxies" => {
                s.trusted_proxies = yaml::string_or_list(src, k, v)?
                    .into_iter()
                    .map(|(n, at)| network(&n).map_err(|why| src.error(at, why)))
                    .collect::<Result<_, _>>()?;
            }
            "demo" => s.demo = yaml::boolean(src, k, v)?,
            "expose_metrics" => s.expose_metrics = yaml::boolean(src, k, v)?,
            "catch_all" => s.catch_all = yaml::boolean(src, k, v)?,
            "gzip" => s.gzip = yaml::boolean(src, k, v)?,
            "upstream" => {
                if let Some(up) = mapping(src, k, v)? {
                    check_keys(src, up, UPSTREAM_KEYS, "`nginx.upstream` key")?;
                    for (uk, uv) in up.iter() {
                        match uk.as_str() {
                            "port" => s.upstream.port = port(src, uk, uv)?,
                            "max_fails" => s.upstream.max_fails = count(src, uk, uv, 0)?,
                            "keepalive" => s.upstream.keepalive = count(src, uk, uv, 1)?,
                            _ => {
                                let t = time(src, uk, uv)?;
                                // `server … fail_timeout=` takes whole seconds (or m, h, d), not ms.
                                if t.ends_with("ms") {
                                    return Err(src.error(
                                        src.value(uk, uv),
                                        format!("`fail_timeout` is counted in seconds: `{t}` is below nginx's smallest step (write e.g. `1s`)"),
                                    ));
                                }
                                s.upstream.fail_timeout = t;
                            }
                        }
                    }
                }
            }
            "realtime_timeout" => s.realtime_timeout = time(src, k, v)?,
            "log_dir" => s.log_dir = absolute_path(src, k, v)?,
            "acme_root" => s.acme_root = absolute_path(src, k, v)?,
            "hsts_preload" => s.hsts_preload = yaml::boolean(src, k, v)?,
            "ocsp_stapling" => s.ocsp_stapling = yaml::boolean(src, k, v)?,
            "resolver" => {
                s.resolver = yaml::string_or_list(src, k, v)?
                    .into_iter()
                    .map(|(a, at)| {
                        a.parse::<IpAddr>().map_err(|_| {
                            src.error(at, format!("`{a}` is not an IP address (resolver)"))
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ => unreachable!("refused by check_keys"),
        }
    }
    cross_checks(src, map, &s)?;
    Ok(s)
}

/// Rules between keys, reported at the key that breaks them.
fn cross_checks(
    src: &Source,
    map: &MarkedMappingNode,
    s: &NginxSettings,
) -> Result<(), ParseError> {
    let at = |name: &str| {
        entry(map, name)
            .map(|(k, _)| src.key(k))
            .unwrap_or_else(|| src.mapping(map))
    };
    if s.ocsp_stapling {
        if !matches!(s.tls, Tls::Files { .. }) {
            return Err(src.error(
                at("ocsp_stapling"),
                "`ocsp_stapling` needs `tls: {certificate, key}` from a CA that runs OCSP \
                 (not self_signed, and not Let's Encrypt, which ended OCSP in 2025)",
            ));
        }
        if s.resolver.is_empty() {
            return Err(src.error(
                at("ocsp_stapling"),
                "`ocsp_stapling` needs `resolver`: the DNS server(s) nginx asks for the OCSP responder",
            ));
        }
    }
    if s.http_port == s.https_port && s.tls != Tls::Off {
        return Err(src.error(
            at("ports"),
            format!("`ports`: http and https are both {}", s.http_port),
        ));
    }
    if matches!(s.tls, Tls::Acme { .. }) {
        if let Some(wild) = s.server_names.iter().find(|n| n.starts_with("*.")) {
            return Err(src.error(
                at("server_names"),
                format!("`{wild}`: a wildcard name cannot be validated by ACME's webroot (HTTP-01) challenge"),
            ));
        }
    }
    Ok(())
}

fn mapping<'a>(
    src: &Source,
    key: &MarkedScalarNode,
    value: &'a Node,
) -> Result<Option<&'a MarkedMappingNode>, ParseError> {
    match value {
        Node::Mapping(m) => Ok(Some(m)),
        Node::Scalar(s) if is_null(s) => Ok(None),
        other => Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be a mapping, not {}",
                key.as_str(),
                describe(other)
            ),
        )),
    }
}

fn tls(
    src: &Source,
    key: &MarkedScalarNode,
    value: &Node,
    base_dir: &Path,
) -> Result<Tls, ParseError> {
    // `tls: false` (or nothing): plain HTTP.
    if let Node::Scalar(s) = value {
        if is_null(s) || yaml::scalar_to_json(s) == Value::Bool(false) {
            return Ok(Tls::Off);
        }
    }
    let Node::Mapping(map) = value else {
        return Err(src.error(
            src.value(key, value),
            format!(
                "`tls` must be false or a mapping with `certificate` + `key`, `self_signed: true` or `acme`, not {}",
                describe(value)
            ),
        ));
    };
    check_keys(src, map, TLS_KEYS, "`nginx.tls` key")?;
    let cert = entry(map, "certificate");
    let keyfile = entry(map, "key");
    let self_signed = match entry(map, "self_signed") {
        Some((k, v)) => yaml::boolean(src, k, v)?,
        None => false,
    };
    let acme = entry(map, "acme");
    let ways = usize::from(cert.is_some() || keyfile.is_some())
        + usize::from(self_signed)
        + usize::from(acme.is_some());
    if ways > 1 {
        return Err(src.error(
            src.mapping(map),
            "`tls`: give one of `certificate` + `key`, `self_signed: true` or `acme`, not several",
        ));
    }
    if self_signed {
        return Ok(Tls::SelfSigned);
    }
    if let Some((k, v)) = acme {
        let mut email = None;
        if let Some(m) = mapping(src, k, v)? {
            check_keys(src, m, ACME_KEYS, "`nginx.tls.acme` key")?;
            if let Some((ek, ev)) = entry(m, "email") {
                let e = yaml::string(src, ek, ev)?;
                if !e.contains('@') || e.contains(char::is_whitespace) {
                    return Err(
                        src.error(src.value(ek, ev), format!("`{e}` is not an e-mail address"))
                    );
                }
                email = Some(e);
            }
        }
        return Ok(Tls::Acme { email });
    }
    match (cert, keyfile) {
        (Some((ck, cv)), Some((kk, kv))) => Ok(Tls::Files {
            certificate: pem_file(src, ck, cv, base_dir, "CERTIFICATE")?,
            key: pem_file(src, kk, kv, base_dir, "PRIVATE KEY")?,
        }),
        (Some((k, _)), None) => Err(src.error(src.key(k), "`certificate` needs `key` beside it")),
        (None, Some((k, _))) => Err(src.error(src.key(k), "`key` needs `certificate` beside it")),
        (None, None) => Err(src.error(
            src.mapping(map),
            "`tls` must give `certificate` + `key`, `self_signed: true` or `acme`",
        )),
    }
}

/// A PEM file on this machine holding a `-----BEGIN …{kind}-----` block.
fn pem_file(
    src: &Source,
    key: &MarkedScalarNode,
    value: &Node,
    base_dir: &Path,
    kind: &str,
) -> Result<PathBuf, ParseError> {
    let written = yaml::string(src, key, value)?;
    let path = crate::ops::inventory::expand_tilde(&written);
    let path = if path.is_absolute() {
        path
    } else {
        base_dir.join(path)
    };
    let at = src.value(key, value);
    let text = std::fs::read(&path).map_err(|e| {
        src.error(
            at.clone(),
            format!("`{}`: cannot read {}: {e}", key.as_str(), path.display()),
        )
    })?;
    let text = String::from_utf8_lossy(&text);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !found {
        return Err(src.error(
            at,
            format!(
                "`{}`: {} holds no PEM {kind} block",
                key.as_str(),
                path.display()
            ),
        ));
    }
    Ok(path)
}

fn name(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
    let s = yaml::string(src, key, value)?;
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        return Err(src.error(
            src.value(key, value),
            format!("`{}`: `{s}` is not a group name", key.as_str()),
        ));
    }
    Ok(s)
}

/// A DNS host name (RFC 1123 labels), optionally `*.` in front; lower-cased.
pub fn server_name(name: &str) -> Result<String, String> {
    let bad = |why: &str| format!("server name `{name}` is not a host name: {why}");
    let lower = name.to_ascii_lowercase();
    let rest = lower.strip_prefix("*.").unwrap_or(&lower);
    if rest.is_empty() {
        return Err(bad("it is empty"));
    }
    if rest.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    if rest.parse::<IpAddr>().is_ok() {
        return Err(bad(
            "an IP address is not a name (browsers and ACME need a name)",
        ));
    }
    for label in rest.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated part must have 1 to 63 characters"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(bad("only letters, digits, `-` and dots are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a part must not start or end with `-`"));
        }
    }
    Ok(lower)
}

/// A network (`10.0.0.0/8`) or a single address (`192.0.2.7`, a /32 or /128).
pub fn network(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "`{text}` has host bits set; the network is {}",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{text}` is not an address or a network like 10.0.0.0/8"))
}

fn count(src: &Source, key: &MarkedScalarNode, value: &Node, min: u32) -> Result<u32, ParseError> {
    let n = match value {
        Node::Scalar(s) => yaml::scalar_to_json(s).as_u64(),
        _ => None,
    };
    n.and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= min)
        .ok_or_else(|| {
            src.error(
                src.value(key, value),
                format!(
                    "`{}` must be a whole number of at least {min}, not {}",
                    key.as_str(),
                    describe(value)
                ),
            )
        })
}

/// `10r/s` or `30r/m`.
fn rate(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<Rate, ParseError> {
    let s = yaml::string(src, key, value)?;
    let parsed = s
        .strip_suffix("r/s")
        .map(|n| (n, false))
        .or_else(|| s.strip_suffix("r/m").map(|n| (n, true)));
    match parsed.and_then(|(n, per_minute)| {
        n.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .map(|count| Rate { count, per_minute })
    }) {
        Some(r) => Ok(r),
        None => Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be a rate like `10r/s` or `30r/m`, not `{s}`",
                key.as_str()
            ),
        )),
    }
}

/// An nginx size: digits with an optional `k` or `m`.
fn size(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
    let s = yaml::string(src, key, value)?;
    let digits = s.trim_end_matches(['k', 'K', 'm', 'M']);
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && s.len() - digits.len() <= 1;
    if !ok {
        return Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be a size like `64k` or `10m`, not `{s}`",
                key.as_str()
            ),
        ));
    }
    Ok(s)
}

/// An nginx time: digits with a unit (`ms`, `s`, `m`, `h`, `d`); plain digits are seconds.
fn time(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
    let s = yaml::string(src, key, value)?;
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && digits.parse::<u64>().is_ok_and(|n| n > 0)
        && ["", "ms", "s", "m", "h", "d"].contains(&unit);
    if !ok {
        return Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be a time like `75s`, `10m` or `500ms`, not `{s}`",
                key.as_str()
            ),
        ));
    }
    Ok(s)
}

fn absolute_path(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
    let s = yaml::string(src, key, value)?;
    if !s.starts_with('/')
        || s.contains(char::is_whitespace)
        || s.contains(['"', '\'', ';', '{', '}'])
    {
        return Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be an absolute path without spaces, quotes or `;{{}}`, not `{s}`",
                key.as_str()
            ),
        ));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// The names of every key the block takes, for the docs test.
pub fn keys() -> &'static [&'static str] {
    KEYS
}

/// " (did you mean …)" for a group name that is not in the inventory.
pub fn unknown_group(group: &str, groups: &[&str]) -> String {
    if groups.is_empty() {
        format!("the inventory has no group `{group}` (it has no groups)")
    } else {
        format!(
            "the inventory has no group `{group}`{}; groups: {}",
            did_you_mean(group, groups),
            list(groups)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_top(text: &str) -> Result<NginxSettings, ParseError> {
        NginxSettings::from_file("cozy.yaml", text, BlockAt::Top, Path::new("/nonexistent"))
            .map(|s| s.expect("an nginx block"))
    }

    fn err(text: &str, line: usize, column: usize) -> String {
        let e = parse_top(text).expect_err("should be refused");
        assert_eq!(
            (e.location.line, e.location.column),
            (line, column),
            "wrong location: {e}"
        );
        assert!(e
            .to_string()
            .starts_with(&format!("cozy.yaml:{line}:{column}: ")));
        e.message
    }

    #[test]
    fn an_absent_block_is_none_and_an_empty_one_is_the_defaults() {
        let none = NginxSettings::from_file(
            "i.yml",
            "hosts: {}\n",
            BlockAt::InventoryVars,
            Path::new("."),
        )
        .unwrap();
        assert!(none.is_none());
        let s = parse_top("nginx:\n").unwrap();
        assert_eq!(s, NginxSettings::defaults("cozy.yaml"));
    }

    #[test]
    fn the_inventory_block_sits_under_vars() {
        let s = NginxSettings::from_file(
            "inv.yml",
            "hosts: {}\nvars:\n  nginx:\n    server_names: [API.example.com, www.example.com]\n    demo: true\n",
            BlockAt::InventoryVars,
            Path::new("."),
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.server_names, ["api.example.com", "www.example.com"]);
        assert!(s.demo);
    }

    #[test]
    fn every_setting_is_read() {
        let s = parse_top(
            "nginx:
  app_group: daemons
  server_names: api.example.com
  tls: {self_signed: true}
  ports: {http: 8080, https: 8443}
  listen_addresses: [127.0.0.1, '::1']
  ipv6: false
  http2: false
  rate_limits: {login: 5r/m, login_burst: 2, api: 100r/s, api_burst: 50, websocket_connections: 4}
  client_max_body_size: 1m
  trusted_proxies: [10.0.0.0/8, 192.0.2.7]
  expose_metrics: true
  catch_all: false
  gzip: false
  upstream: {port: 9000, max_fails: 1, fail_timeout: 5s, keepalive: 8}
  realtime_timeout: 2m
  log_dir: /srv/log/
",
        )
        .unwrap();
        assert_eq!(s.app_group, "daemons");
        assert_eq!(s.tls, Tls::SelfSigned);
        assert_eq!((s.http_port, s.https_port), (8080, 8443));
        assert_eq!(s.listen_addresses.len(), 2);
        assert_eq!(s.rate.login.to_string(), "5r/m");
        assert_eq!(s.rate.api.to_string(), "100r/s");
        assert_eq!(s.rate.websocket_connections, 4);
        assert_eq!(s.trusted_proxies[1].to_string(), "192.0.2.7/32");
        assert_eq!(s.upstream.port, 9000);
        assert_eq!(s.realtime_timeout, "2m");
        assert_eq!(s.log_dir, "/srv/log");
        assert!(!s.catch_all && !s.gzip && !s.http2 && !s.ipv6 && s.expose_metrics);
    }

    #[test]
    fn an_unknown_key_is_reported_at_itself_with_a_suggestion() {
        let msg = err("nginx:\n  server_name: [a.example]\n", 2, 3);
        assert!(
            msg.starts_with("unknown `nginx` key `server_name` (did you mean `server_names`?); valid: `app_group`"),
            "{msg}"
        );
        let msg = err("nginx:\n  rate_limits:\n    logn: 1r/s\n", 3, 5);
        assert!(msg.contains("(did you mean `login`?)"), "{msg}");
        let msg = err("nginx:\n  tls: {certficate: a, key: b}\n", 2, 9);
        assert!(msg.contains("(did you mean `certificate`?)"), "{msg}");
    }

    #[test]
    fn a_server_name_that_is_not_a_host_name_is_refused_at_itself() {
        let msg = err(
            "nginx:\n  server_names:\n    - ok.example\n    - bad_name.example\n",
            4,
            7,
        );
        assert!(
            msg.starts_with("server name `bad_name.example` is not a host name"),
            "{msg}"
        );
        assert!(server_name("-a.example").is_err());
        assert!(server_name("10.0.0.1").is_err());
        assert!(server_name(&"a".repeat(64)).is_err());
        assert!(server_name("*.example.com").is_ok());
        assert!(server_name("a b").is_err());
        let msg = err("nginx:\n  server_names: []\n", 2, 17);
        assert!(msg.contains("at least one"), "{msg}");
    }

    #[test]
    fn a_certificate_that_does_not_exist_is_refused_at_its_path() {
        let msg = err(
            "nginx:\n  tls:\n    certificate: /nonexistent/fullchain.pem\n    key: /nonexistent/privkey.pem\n",
            3,
            18,
        );
        assert!(
            msg.starts_with("`certificate`: cannot read /nonexistent/fullchain.pem: "),
            "{msg}"
        );
    }

    #[test]
    fn certificate_files_must_hold_pem_and_resolve_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("c.pem"),
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("k.pem"),
            "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("junk"), "hello\n").unwrap();
        let ok = NginxSettings::from_file(
            "c.yaml",
            "nginx:\n  tls: {certificate: c.pem, key: k.pem}\n",
            BlockAt::Top,
            dir.path(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            ok.tls,
            Tls::Files {
                certificate: dir.path().join("c.pem"),
                key: dir.path().join("k.pem")
            }
        );
        let e = NginxSettings::from_file(
            "c.yaml",
            "nginx:\n  tls: {certificate: junk, key: k.pem}\n",
            BlockAt::Top,
            dir.path(),
        )
        .unwrap_err();
        assert!(e.message.contains("holds no PEM CERTIFICATE block"), "{e}");
        let e = NginxSettings::from_file(
            "c.yaml",
            "nginx:\n  tls: {certificate: c.pem, key: c.pem}\n",
            BlockAt::Top,
            dir.path(),
        )
        .unwrap_err();
        assert!(e.message.contains("holds no PEM PRIVATE KEY block"), "{e}");
    }

    #[test]
    fn values_are_checked_with_their_location() {
        assert!(
            err("nginx:\n  rate_limits: {login: 10/m}\n", 2, 24).contains("a rate like `10r/s`")
        );
        assert!(err("nginx:\n  client_max_body_size: 64kb\n", 2, 25).contains("a size like"));
        assert!(err("nginx:\n  realtime_timeout: soon\n", 2, 21).contains("a time like"));
        assert!(err("nginx:\n  upstream: {fail_timeout: 500ms}\n", 2, 28)
            .contains("counted in seconds"));
        assert!(err("nginx:\n  trusted_proxies: [10.0.0.1/8]\n", 2, 21).contains("host bits set"));
        assert!(err("nginx:\n  trusted_proxies: [nowhere]\n", 2, 21).contains("not an address"));
        assert!(err("nginx:\n  ports: {http: 0}\n", 2, 17).contains("port number"));
        assert!(err("nginx:\n  demo: yes\n", 2, 9).contains("true or false"));
        assert!(err("nginx:\n  log_dir: logs\n", 2, 12).contains("absolute path"));
        assert!(err("nginx:\n  tls: {self_signed: true, acme: {}}\n", 2, 8).contains("not several"));
        assert!(err("nginx:\n  tls: {acme: {email: nobody}}\n", 2, 23).contains("e-mail"));
        assert!(err("nginx:\n  tls: yes\n", 2, 8).contains("must be false or a mapping"));
        assert!(err(
            "nginx:\n  ocsp_stapling: true\n  tls: {self_signed: true}\n",
            2,
            3
        )
        .contains("needs `tls: {certificate, key}`"));
        assert!(err(
            "nginx:\n  server_names: ['*.example.com']\n  tls: {acme: {}}\n",
            2,
            3
        )
        .contains("wildcard"));
        assert!(err(
            "nginx:\n  tls: {self_signed: true}\n  ports: {http: 80, https: 80}\n",
            3,
            3
        )
        .contains("both 80"));
    }

    #[test]
    fn tls_false_is_plain_http() {
        assert_eq!(parse_top("nginx:\n  tls: false\n").unwrap().tls, Tls::Off);
        assert_eq!(
            parse_top("nginx:\n  tls: {acme: {email: ops@example.com}}\n")
                .unwrap()
                .tls,
            Tls::Acme {
                email: Some("ops@example.com".into())
            }
        );
    }
}
