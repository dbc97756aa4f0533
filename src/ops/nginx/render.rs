//! Rendering: validated settings + the estate's app hosts → the files of the site, as they lie under
//! `/etc/nginx` (h5bp-style: one site file and small includes under `cozy/<site>/`).
//!
//! Pure: no file is written and no process started here ([`super::check`] and the `nginx_site` module do
//! that), so the whole output is unit-tested. Includes and certificate paths in the output are relative,
//! which nginx resolves against its configuration folder: the same bytes work in `/etc/nginx` and in the
//! scratch folder where `--check` runs `nginx -t`. Only the log folder is absolute.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{json, Value};

use super::settings::{NginxSettings, Tls};
use crate::ops::inventory::Inventory;
use crate::ops::playbook::builtin;

/// The templates of a site, in the order their files are listed.
const TEMPLATES: &[(&str, &str)] = &[
    ("site.conf.j2", "sites-available/{site}.conf"),
    ("proxy.conf.j2", "cozy/{site}/proxy.conf"),
    (
        "security-headers.conf.j2",
        "cozy/{site}/security-headers.conf",
    ),
    ("errors.conf.j2", "cozy/{site}/errors.conf"),
    ("tls.conf.j2", "cozy/{site}/tls.conf"),
];

const LOCATIONS_README: &str = "\
Locations of your own for this site: every *.conf file in this folder is included at the end of the
site's HTTPS server block (or its HTTP one without TLS). cozy never writes, changes or deletes a file
here except this README. Use `include cozy/SITE/proxy.conf;` and `proxy_pass http://ZONE_app;` as the
site's own locations do, and do not use add_header (it would drop the security headers).
";

/// One file of the rendered tree.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteFile {
    /// Relative to the nginx folder (`sites-available/cozy.conf`).
    pub path: String,
    pub body: Body,
    pub mode: u32,
    /// Where it came from (a template, a certificate file), for headers and messages.
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Text(String),
    /// A private key: never printed.
    Secret(Vec<u8>),
    /// A symlink to this (relative) target.
    Link(String),
}

impl SiteFile {
    /// The bytes to write (empty for a link).
    pub fn bytes(&self) -> &[u8] {
        match &self.body {
            Body::Text(t) => t.as_bytes(),
            Body::Secret(b) => b,
            Body::Link(_) => &[],
        }
    }
}

/// A rendered site.
#[derive(Debug, Clone)]
pub struct Site {
    /// `cozy`, or `cozy-<env>`.
    pub name: String,
    /// The name made safe for nginx zone and variable names (`cozy_staging`).
    pub zone: String,
    pub files: Vec<SiteFile>,
    pub upstreams: Vec<UpstreamServer>,
    /// The certificate files the site uses, relative to the nginx folder, when the tree does not carry
    /// them (self-signed or ACME: made on the nginx host).
    pub host_made_certificate: Option<(String, String)>,
}

/// An app host as the upstream sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamServer {
    /// The inventory name.
    pub host: String,
    /// `address:port` as nginx's `server` takes it (`[v6]:port` for IPv6).
    pub address: String,
}

/// What the caller says about this rendering besides the settings.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// The environment's name (`staging`): in the site's name, its zones and its log lines.
    pub env: Option<String>,
    /// Folders whose files override the built-in templates of the same name.
    pub template_dirs: Vec<PathBuf>,
    /// Overrides `log_dir` (the scratch check logs into its own folder).
    pub log_dir: Option<String>,
    /// Where the estate came from, for the header comment.
    pub estate: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{0}")]
    Estate(String),
    #[error("{template}: {message}")]
    Template { template: String, message: String },
    #[error("{path}: {message}")]
    Read { path: String, message: String },
}

/// The app hosts of `settings.app_group` and their daemon's address.
///
/// A host's address is its `app_listen` variable (`ADDRESS:PORT`, as the `app` playbook uses it): an
/// unspecified address (`0.0.0.0`, `[::]`) means the host's inventory address with that port. A host
/// without `app_listen` is reached at its inventory address on `upstream.port`. `nginx_upstream`
/// (`address:port`) overrides both.
pub fn upstreams(
    inventory: &Inventory,
    settings: &NginxSettings,
) -> Result<Vec<UpstreamServer>, RenderError> {
    let group = inventory.group(&settings.app_group).ok_or_else(|| {
        let names: Vec<&str> = inventory.groups.iter().map(|g| g.name.as_str()).collect();
        RenderError::Estate(format!(
            "{}: {}: the app hosts are the group `{}` (nginx.app_group)",
            inventory.source,
            super::settings::unknown_group(&settings.app_group, &names),
            settings.app_group
        ))
    })?;
    if group.hosts.is_empty() {
        return Err(RenderError::Estate(format!(
            "{}: the group `{}` has no hosts: nothing to proxy to",
            inventory.source, settings.app_group
        )));
    }
    let mut out = Vec::new();
    for name in &group.hosts {
        let host = inventory
            .host(name)
            .expect("the parser checks group members");
        let bad = |var: &str, v: &Value| {
            RenderError::Estate(format!(
                "{}: host `{name}`: `{var}` must be ADDRESS:PORT (e.g. 10.0.0.5:8080), not {v}",
                inventory.source
            ))
        };
        let address = if let Some(v) = host.vars.get("nginx_upstream") {
            let text = v.as_str().ok_or_else(|| bad("nginx_upstream", v))?;
            let (a, p) = split_host_port(text).ok_or_else(|| bad("nginx_upstream", v))?;
            join_host_port(&a, p)
        } else if let Some(v) = host.vars.get("app_listen") {
            let addr: SocketAddr = v
                .as_str()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| bad("app_listen", v))?;
            if addr.ip().is_unspecified() {
                join_host_port(&host.address, addr.port())
            } else {
                join_host_port(&addr.ip().to_string(), addr.port())
            }
        } else {
            join_host_port(&host.address, settings.upstream.port)
        };
        if !out.iter().any(|u: &UpstreamServer| u.address == address) {
            out.push(UpstreamServer {
                host: name.clone(),
                address,
            });
        }
    }
    Ok(out)
}

fn split_host_port(text: &str) -> Option<(String, u16)> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Some((sa.ip().to_string(), sa.port()));
    }
    let (h, p) = text.rsplit_once(':')?;
    let port = p.parse::<u16>().ok().filter(|p| *p != 0)?;
    let ok = !h.is_empty()
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    ok.then(|| (h.to_string(), port))
}

fn join_host_port(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// The site's name for an environment: `cozy` or `cozy-<env>`.
pub fn site_name(env: Option<&str>) -> Result<String, RenderError> {
    match env {
        None => Ok("cozy".into()),
        Some(e)
            if !e.is_empty()
                && e.len() <= 32
                && e.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !e.starts_with('-') =>
        {
            Ok(format!("cozy-{e}"))
        }
        Some(e) => Err(RenderError::Estate(format!(
            "--env `{e}`: an environment name is 1 to 32 lower-case letters, digits and `-`"
        ))),
    }
}

/// Renders the site.
pub fn render(
    settings: &NginxSettings,
    upstreams: Vec<UpstreamServer>,
    opts: &RenderOptions,
) -> Result<Site, RenderError> {
    let site = site_name(opts.env.as_deref())?;
    let zone = site.replace('-', "_");
    let inc = format!("cozy/{site}");
    let tls = settings.tls != Tls::Off;
    let cert_dir = format!("{inc}/tls");
    let (certificate, certificate_key) = (
        format!("{cert_dir}/fullchain.pem"),
        format!("{cert_dir}/privkey.pem"),
    );
    let context = json!({
        "site": site,
        "zone": zone,
        "inc": inc,
        "env": opts.env.clone().unwrap_or_default(),
        "estate": if opts.estate.is_empty() { "the estate".to_string() } else { opts.estate.clone() },
        "upstreams": upstreams.iter().map(|u| json!({"host": u.host, "address": u.address})).collect::<Vec<_>>(),
        "upstream": {
            "max_fails": settings.upstream.max_fails,
            "fail_timeout": settings.upstream.fail_timeout,
            "keepalive": settings.upstream.keepalive,
        },
        "server_names": settings.server_names,
        "listen": {
            "http": listen_lines(settings, settings.http_port),
            "https": listen_lines(settings, settings.https_port),
        },
        "tls": tls,
        "acme": matches!(settings.tls, Tls::Acme { .. }),
        "acme_root": settings.acme_root,
        "http2": settings.http2,
        "https_port_suffix": if settings.https_port == 443 { String::new() } else { format!(":{}", settings.https_port) },
        "certificate": certificate,
        "certificate_key": certificate_key,
        "hsts_preload": settings.hsts_preload,
        "ocsp_stapling": settings.ocsp_stapling,
        "resolver": settings.resolver.iter().map(|a| match a { IpAddr::V6(v6) => format!("[{v6}]"), v4 => v4.to_string() }).collect::<Vec<_>>(),
        "catch_all": settings.catch_all,
        "trusted_proxies": settings.trusted_proxies.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "rate": {
            "login": settings.rate.login.to_string(),
            "login_burst": settings.rate.login_burst,
            "api": settings.rate.api.to_string(),
            "api_burst": settings.rate.api_burst,
            "websocket_connections": settings.rate.websocket_connections,
        },
        "client_max_body_size": settings.client_max_body_size,
        "gzip": settings.gzip,
        "demo": settings.demo,
        "expose_metrics": settings.expose_metrics,
        "realtime_timeout": settings.realtime_timeout,
        "log_dir": opts.log_dir.clone().unwrap_or_else(|| settings.log_dir.clone()),
        "csp": csp(settings),
        "errors": errors(settings, &zone),
        "login_retry_after": login_retry_after(settings),
    });

    let env = environment(&opts.template_dirs);
    let mut files = Vec::new();
    for (template, path) in TEMPLATES {
        if *template == "tls.conf.j2" && !tls {
            continue;
        }
        let origin = template_origin(&opts.template_dirs, template);
        let text = env
            .get_template(template)
            .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&context))))
            .map_err(|e| RenderError::Template {
                template: origin.clone(),
                message: crate::ops::playbook::render::describe(&e),
            })?;
        files.push(SiteFile {
            path: path.replace("{site}", &site),
            body: Body::Text(tidy(&text)),
            mode: 0o644,
            origin,
        });
    }
    files.insert(
        1,
        SiteFile {
            path: format!("sites-enabled/{site}.conf"),
            body: Body::Link(format!("../sites-available/{site}.conf")),
            mode: 0o777,
            origin: "a link: the site is enabled".into(),
        },
    );
    files.push(SiteFile {
        path: format!("{inc}/locations.d/README"),
        body: Body::Text(
            LOCATIONS_README
                .replace("SITE", &site)
                .replace("ZONE", &zone),
        ),
        mode: 0o644,
        origin: "cozy".into(),
    });
    let mut host_made_certificate = None;
    match &settings.tls {
        Tls::Files {
            certificate: c,
            key,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| RenderError::Read {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })
            };
            files.push(SiteFile {
                path: certificate.clone(),
                body: Body::Text(String::from_utf8_lossy(&read(c)?).into_owned()),
                mode: 0o644,
                origin: c.display().to_string(),
            });
            files.push(SiteFile {
                path: certificate_key.clone(),
                body: Body::Secret(read(key)?),
                mode: 0o600,
                origin: key.display().to_string(),
            });
        }
        Tls::SelfSigned | Tls::Acme { .. } => {
            host_made_certificate = Some((certificate, certificate_key));
        }
        Tls::Off => {}
    }
    Ok(Site {
        name: site,
        zone,
        files,
        upstreams,
        host_made_certificate,
    })
}

fn environment(dirs: &[PathBuf]) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    let dirs = dirs.to_vec();
    env.set_loader(move |name| {
        for dir in &dirs {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(text) => return Ok(Some(text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        format!("cannot read {}: {e}", dir.join(name).display()),
                    ))
                }
            }
        }
        Ok(builtin::nginx_template(name).map(str::to_string))
    });
    env
}

/// Where template `name` comes from: an override folder or the built-in set.
fn template_origin(dirs: &[PathBuf], name: &str) -> String {
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("builtin:templates/nginx/{name}"))
}

/// At most one blank line in a row, none at the end of a block (templates with conditionals leave gaps).
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            blank += 1;
            continue;
        }
        if blank > 0 && !out.is_empty() && line.trim() != "}" {
            out.push('\n');
        }
        blank = 0;
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn listen_lines(s: &NginxSettings, port: u16) -> Vec<String> {
    if s.listen_addresses.is_empty() {
        let mut lines = vec![port.to_string()];
        if s.ipv6 {
            lines.push(format!("[::]:{port}"));
        }
        return lines;
    }
    s.listen_addresses
        .iter()
        .map(|a| join_host_port(&a.to_string(), port))
        .collect()
}

/// A strict Content-Security-Policy that the demo page and cozy.js work under: everything from this
/// origin only, WebSockets to our own names, no inline script, no framing.
fn csp(s: &NginxSettings) -> String {
    let (scheme, port) = if s.tls == Tls::Off {
        ("ws", s.http_port)
    } else {
        ("wss", s.https_port)
    };
    let default_port = if s.tls == Tls::Off { 80 } else { 443 };
    let sockets: Vec<String> = s
        .server_names
        .iter()
        .map(|n| {
            if port == default_port {
                format!("{scheme}://{n}")
            } else {
                format!("{scheme}://{n}:{port}")
            }
        })
        .collect();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         font-src 'self'; connect-src 'self' {}; manifest-src 'self'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'",
        sockets.join(" ")
    )
}

/// Seconds until the login limit lets one more request through.
fn login_retry_after(s: &NginxSettings) -> u32 {
    if s.rate.login.per_minute {
        60u32.div_ceil(s.rate.login.count)
    } else {
        1
    }
}

/// The errors nginx answers itself, as problem+json with cozy's codes.
fn errors(s: &NginxSettings, zone: &str) -> Value {
    json!([
        {"name": "400", "status": 400, "code": "bad_request", "title": "Bad request",
         "detail": "nginx could not read this request"},
        {"name": "403", "status": 403, "code": "forbidden", "title": "Forbidden",
         "detail": "this path is not served"},
        {"name": "404", "status": 404, "code": "not_found", "title": "Not found",
         "detail": "nothing is served at this path"},
        {"name": "413", "status": 413, "code": "payload_too_large", "title": "Payload too large",
         "detail": format!("request bodies are limited to {}", s.client_max_body_size)},
        {"name": "429", "status": 429, "code": "rate_limited", "title": "Too many requests",
         "detail": format!("too many requests from this address; retry after the Retry-After seconds (sign-in: {}, API: {})", s.rate.login, s.rate.api),
         "retry_after": format!("${zone}_retry_after")},
        {"name": "502", "status": 502, "code": "unavailable", "title": "Service unavailable",
         "detail": "no app server answered; retry shortly", "retry_after": 1},
        {"name": "503", "status": 503, "code": "unavailable", "title": "Service unavailable",
         "detail": "the service is unavailable; retry shortly", "retry_after": 1},
        {"name": "504", "status": 504, "code": "unavailable", "title": "Service unavailable",
         "detail": "the app server did not answer in time; retry shortly", "retry_after": 1},
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory(text: &str) -> Inventory {
        Inventory::parse("inv.yml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    const ESTATE: &str = "\
hosts:
  app1: {address: 10.0.0.11, vars: {app_listen: '0.0.0.0:8080'}}
  app2: {address: 10.0.0.12, vars: {app_listen: '10.1.0.12:9000'}}
  app3: {address: app3.internal}
  app4: {address: 'fd00::4', vars: {nginx_upstream: '[fd00::44]:8081'}}
  lb1: {address: 10.0.0.2}
groups:
  app: [app1, app2, app3, app4]
  lb: [lb1]
";

    #[test]
    fn every_app_host_is_an_upstream_server_at_its_daemons_address() {
        let inv = inventory(ESTATE);
        let s = NginxSettings::defaults("t");
        let ups = upstreams(&inv, &s).unwrap();
        let addrs: Vec<&str> = ups.iter().map(|u| u.address.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "10.0.0.11:8080",
                "10.1.0.12:9000",
                "app3.internal:8080",
                "[fd00::44]:8081"
            ]
        );
    }

    #[test]
    fn a_missing_or_empty_app_group_is_an_error_naming_the_groups() {
        let inv = inventory("hosts:\n  a: {address: x}\ngroups:\n  ap: [a]\n  e: []\n");
        let mut s = NginxSettings::defaults("t");
        let e = upstreams(&inv, &s).unwrap_err().to_string();
        assert!(e.contains("no group `app` (did you mean `ap`?)"), "{e}");
        s.app_group = "e".into();
        let e = upstreams(&inv, &s).unwrap_err().to_string();
        assert!(e.contains("has no hosts"), "{e}");
        let bad = inventory(
            "hosts:\n  a: {address: x, vars: {app_listen: nowhere}}\ngroups:\n  app: [a]\n",
        );
        let e = upstreams(&bad, &NginxSettings::defaults("t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host `a`: `app_listen` must be ADDRESS:PORT"),
            "{e}"
        );
    }

    fn site(s: &NginxSettings, env: Option<&str>) -> Site {
        let inv = inventory(ESTATE);
        let opts = RenderOptions {
            env: env.map(str::to_string),
            ..RenderOptions::default()
        };
        render(s, upstreams(&inv, s).unwrap(), &opts).unwrap()
    }

    fn text<'a>(site: &'a Site, path: &str) -> &'a str {
        match &site
            .files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("no {path}"))
            .body
        {
            Body::Text(t) => t,
            other => panic!("{path} is {other:?}"),
        }
    }

    #[test]
    fn the_site_lists_every_upstream_with_keepalive_and_least_conn() {
        let site = site(&NginxSettings::defaults("t"), None);
        let conf = text(&site, "sites-available/cozy.conf");
        assert!(conf.contains("upstream cozy_app {"), "{conf}");
        assert!(conf.contains("least_conn;"));
        assert!(conf.contains("server 10.0.0.11:8080 max_fails=3 fail_timeout=10s;"));
        assert!(conf.contains("server [fd00::44]:8081 max_fails=3 fail_timeout=10s;"));
        assert!(conf.contains("keepalive 32;"));
        let proxy = text(&site, "cozy/cozy/proxy.conf");
        assert!(proxy.contains("proxy_http_version 1.1;"));
        assert!(proxy.contains("proxy_set_header Connection \"\";"));
        assert!(conf.contains("proxy_next_upstream error timeout;"));
        let directives = |t: &str, name: &str| {
            t.lines()
                .filter(|l| l.trim_start().starts_with(name))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let retries = directives(conf, "proxy_next_upstream ");
        assert_eq!(retries, ["    proxy_next_upstream error timeout;"]);
        assert!(directives(proxy, "proxy_next_upstream").is_empty());
        assert!(proxy.contains("proxy_set_header X-Forwarded-For $remote_addr;"));
        assert!(!proxy.contains("$http_host") && !proxy.contains("$proxy_add_x_forwarded_for"));
    }

    #[test]
    fn plain_http_has_no_tls_files_no_redirect_and_no_hsts() {
        let site = site(&NginxSettings::defaults("t"), None);
        assert!(site.files.iter().all(|f| f.path != "cozy/cozy/tls.conf"));
        let conf = text(&site, "sites-available/cozy.conf");
        assert!(!conf.contains("return 301"));
        assert!(!conf.contains(" ssl"));
        assert!(
            !text(&site, "cozy/cozy/security-headers.conf").contains("Strict-Transport-Security")
        );
    }

    #[test]
    fn tls_is_mozilla_intermediate_with_a_redirect_and_hsts() {
        let mut s = NginxSettings::defaults("t");
        s.tls = Tls::SelfSigned;
        s.https_port = 8443;
        let site = site(&s, Some("staging"));
        assert_eq!(site.name, "cozy-staging");
        let conf = text(&site, "sites-available/cozy-staging.conf");
        assert!(
            conf.contains("return 301 https://$host:8443$request_uri;"),
            "{conf}"
        );
        assert!(conf.contains("listen 8443 ssl http2;"));
        assert!(conf.contains("ssl_certificate cozy/cozy-staging/tls/fullchain.pem;"));
        assert!(conf.contains("ssl_reject_handshake on;"));
        let tls = text(&site, "cozy/cozy-staging/tls.conf");
        assert!(tls.contains("ssl_protocols TLSv1.2 TLSv1.3;"));
        assert!(tls.contains("ssl_session_tickets off;"));
        assert!(!tls.contains("ssl_stapling"));
        assert!(!tls.contains(":DHE-") && !tls.contains(" DHE-"), "{tls}");
        let headers = text(&site, "cozy/cozy-staging/security-headers.conf");
        assert!(headers.contains("max-age=63072000; includeSubDomains\" always;"));
        assert!(
            headers.contains("connect-src 'self' wss://localhost:8443;"),
            "{headers}"
        );
        assert_eq!(
            site.host_made_certificate,
            Some((
                "cozy/cozy-staging/tls/fullchain.pem".into(),
                "cozy/cozy-staging/tls/privkey.pem".into()
            ))
        );
    }

    #[test]
    fn add_header_appears_only_where_the_security_headers_are_included() {
        let site = site(&NginxSettings::defaults("t"), None);
        for f in &site.files {
            let Body::Text(t) = &f.body else { continue };
            if f.path.ends_with("security-headers.conf") {
                continue;
            }
            // A block with an add_header must include the security headers too (errors.conf).
            for block in t.split("location ") {
                if block
                    .lines()
                    .any(|l| l.trim_start().starts_with("add_header"))
                {
                    assert!(
                        block.contains("security-headers.conf"),
                        "{}: {block}",
                        f.path
                    );
                }
            }
        }
    }

    #[test]
    fn the_acme_challenge_is_served_from_the_webroot_on_port_80() {
        let mut s = NginxSettings::defaults("t");
        s.tls = Tls::Acme { email: None };
        let site = site(&s, None);
        let conf = text(&site, "sites-available/cozy.conf");
        assert!(
            conf.contains("location ^~ /.well-known/acme-challenge/ {"),
            "{conf}"
        );
        assert!(conf.contains("root /var/www/_letsencrypt;"));
    }

    #[test]
    fn real_ip_is_configured_only_for_trusted_proxies() {
        let plain = site(&NginxSettings::defaults("t"), None);
        assert!(!text(&plain, "sites-available/cozy.conf").contains("set_real_ip_from"));
        let mut s = NginxSettings::defaults("t");
        s.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        let site = site(&s, None);
        let conf = text(&site, "sites-available/cozy.conf");
        assert!(conf.contains("set_real_ip_from 10.0.0.0/8;"));
        assert!(conf.contains("real_ip_recursive on;"));
    }

    #[test]
    fn the_tree_holds_an_enabling_link_and_the_key_as_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(dir.path().join("k.pem"), "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let mut s = NginxSettings::defaults("t");
        s.tls = Tls::Files {
            certificate: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let site = site(&s, None);
        let link = site
            .files
            .iter()
            .find(|f| f.path == "sites-enabled/cozy.conf")
            .unwrap();
        assert_eq!(link.body, Body::Link("../sites-available/cozy.conf".into()));
        let key = site
            .files
            .iter()
            .find(|f| f.path == "cozy/cozy/tls/privkey.pem")
            .unwrap();
        assert!(matches!(key.body, Body::Secret(_)));
        assert_eq!(key.mode, 0o600);
        assert_eq!(site.host_made_certificate, None);
    }

    #[test]
    fn environment_names_are_checked() {
        assert_eq!(site_name(Some("prod-2")).unwrap(), "cozy-prod-2");
        assert!(site_name(Some("Prod")).is_err());
        assert!(site_name(Some("a b")).is_err());
        assert!(site_name(Some("")).is_err());
    }

    #[test]
    fn a_template_on_disk_overrides_the_built_in_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("proxy.conf.j2"), "# mine {{ zone }}\n").unwrap();
        let inv = inventory(ESTATE);
        let s = NginxSettings::defaults("t");
        let opts = RenderOptions {
            template_dirs: vec![dir.path().to_path_buf()],
            ..RenderOptions::default()
        };
        let site = render(&s, upstreams(&inv, &s).unwrap(), &opts).unwrap();
        assert_eq!(text(&site, "cozy/cozy/proxy.conf"), "# mine cozy\n");
        let f = site
            .files
            .iter()
            .find(|f| f.path == "cozy/cozy/proxy.conf")
            .unwrap();
        assert!(f.origin.ends_with("proxy.conf.j2") && !f.origin.starts_with("builtin"));
    }
}
