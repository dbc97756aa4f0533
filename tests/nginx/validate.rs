//! Every variant of the site is one nginx accepts (`cozy nginx render --check` runs this machine's
//! `nginx -t`) and one gixy-ng finds nothing wrong with.
//!
//! The variants: plain HTTP, self-signed TLS, ACME (webroot), certificate files of one's own, with and
//! without trusted proxies (real_ip), and an environment (`--env staging`: other names for the site,
//! its zones and logs). The app hosts are addresses where nothing listens: neither tool connects.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::estate::{cozy_in, text, Inventory, SiteDir};

struct Variant {
    name: &'static str,
    lines: Vec<&'static str>,
    env: Option<&'static str>,
}

/// The variants, rendered in `work` (which holds the certificate files of the `certificate files` one).
fn variants(work: &Path) -> Vec<Variant> {
    let certs = work.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args([
            "-subj",
            "/CN=cozy.test",
            "-addext",
            "subjectAltName=DNS:cozy.test",
        ])
        .arg("-keyout")
        .arg(certs.join("privkey.pem"))
        .arg("-out")
        .arg(certs.join("fullchain.pem"))
        .output()
        .expect("openssl (scripts/ensure-nginx-tools installs it)");
    assert!(out.status.success(), "openssl req: {}", text(&out.stderr));
    let v = |name, lines: &[&'static str], env| Variant {
        name,
        lines: lines.to_vec(),
        env,
    };
    vec![
        v("plain HTTP", &[], None),
        v("self-signed TLS", &["tls: {self_signed: true}"], None),
        v("ACME", &["tls: {acme: {email: ops@cozy.test}}"], None),
        v(
            "certificate files",
            &["tls: {certificate: certs/fullchain.pem, key: certs/privkey.pem}"],
            None,
        ),
        v(
            "plain HTTP behind trusted proxies",
            &["trusted_proxies: [10.0.0.0/8, 192.0.2.7]"],
            None,
        ),
        v(
            "self-signed TLS behind trusted proxies",
            &[
                "tls: {self_signed: true}",
                "trusted_proxies: [10.0.0.0/8, '2001:db8::/32']",
            ],
            None,
        ),
        v(
            "ACME for staging",
            &["tls: {acme: {email: ops@cozy.test}}"],
            Some("staging"),
        ),
        v("plain HTTP for staging", &[], Some("staging")),
    ]
}

fn inventory(work: &Path, lines: &[&str]) -> String {
    Inventory {
        upstreams: vec![
            "127.0.0.1:18081".parse().unwrap(),
            "127.0.0.2:18082".parse().unwrap(),
        ],
        http: 18080,
        https: 18443,
        log_dir: work.join("nginx/log"),
        nginx: lines.iter().map(|l| l.to_string()).collect(),
    }
    .yaml()
}

#[test]
fn nginx_t_accepts_every_variant_of_the_site() {
    let dir = tempfile::tempdir().unwrap();
    for variant in variants(dir.path()) {
        let work = dir.path();
        std::fs::write(work.join("inv.yml"), inventory(work, &variant.lines)).unwrap();
        let mut args = vec!["nginx", "render", "-i", "inv.yml", "--check"];
        if let Some(env) = variant.env {
            args.extend(["--env", env]);
        }
        let out = cozy_in(work, &args);
        let stderr = text(&out.stderr);
        assert!(
            out.status.success(),
            "{}: cozy {} exited {}: {stderr}",
            variant.name,
            args.join(" "),
            out.status
        );
        let site = match variant.env {
            Some(e) => format!("cozy-{e}"),
            None => "cozy".into(),
        };
        assert!(
            stderr.contains(&format!("the rendered configuration of {site} is valid")),
            "{}: nginx -t did not run: {stderr}",
            variant.name
        );
        assert!(
            !stderr.contains("[warn]"),
            "{}: nginx -t warns: {stderr}",
            variant.name
        );
        assert!(
            text(&out.stdout).contains(&format!("# ==> sites-available/{site}.conf <==")),
            "{}: without --out the files are printed",
            variant.name
        );
    }
}

#[test]
fn gixy_reports_nothing_in_any_variant_of_the_rendered_site() {
    let gixy = std::env::var("COZY_TEST_GIXY").unwrap_or_else(|_| {
        panic!(
            "COZY_TEST_GIXY is not set: run the tests with scripts/test, or first \
             `eval \"$(scripts/ensure-nginx-tools)\"` (it installs gixy-ng and exports the variable)"
        )
    });
    let dir = tempfile::tempdir().unwrap();
    // Every variant is checked before the test fails, so one run names every finding.
    let mut problems = Vec::new();
    for (i, variant) in variants(dir.path()).into_iter().enumerate() {
        let work = dir.path().join(format!("v{i}"));
        std::fs::create_dir_all(&work).unwrap();
        // The certificate files are named relative to the inventory.
        std::os::unix::fs::symlink(dir.path().join("certs"), work.join("certs")).unwrap();
        let site = SiteDir::render(&work, &inventory(&work, &variant.lines), variant.env);
        let conf = site.root.join("nginx.conf");
        let out = Command::new(&gixy)
            .args(["-f", "json"])
            .arg(&conf)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {gixy}: {e}"));
        let stdout = text(&out.stdout);
        let findings: Vec<Value> = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "{}: gixy's output is not JSON ({e}): {stdout}\n{}",
                variant.name,
                text(&out.stderr)
            )
        });
        if findings.is_empty() && !out.status.success() {
            problems.push(format!(
                "{}: gixy found nothing but exited {}",
                variant.name, out.status
            ));
        }
        // Nothing anywhere: not in the rendered files, nor in the main nginx.conf shaped as the nginx
        // playbook leaves a host's (check::main_conf).
        for f in &findings {
            problems.push(format!(
                "{}: {} ({}) in {} line {}: {}\n{}",
                variant.name,
                f["plugin"],
                f["severity"],
                f["file"],
                f["line"],
                f["reason"],
                f["config"].as_str().unwrap_or("")
            ));
        }
        if variant.name == "certificate files" {
            use std::os::unix::fs::PermissionsExt as _;
            let key = site
                .root
                .join(format!("cozy/{}/tls/privkey.pem", site.name));
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(
                mode, 0o600,
                "the rendered tree keeps the private key to its owner"
            );
        }
    }
    assert!(
        problems.is_empty(),
        "gixy finds fault with the rendered site:\n{}",
        problems.join("\n\n")
    );
}

/// Edge values of the `nginx:` block: each must be refused by cozy at its place, or render a site nginx
/// accepts; never pass cozy's validation and then fail `nginx -t`.
const EDGE_VALUES: &[&str] = &[
    "rate_limits: {login_burst: 0}",
    "rate_limits: {api_burst: 0}",
    "rate_limits: {websocket_connections: 1}",
    "rate_limits: {login: 1r/m, api: 100000r/s}",
    "upstream: {max_fails: 0, keepalive: 1}",
    "upstream: {fail_timeout: 1ms}",
    "upstream: {fail_timeout: 30}",
    "client_max_body_size: 0",
    "client_max_body_size: 1M",
    "realtime_timeout: 500ms",
    "realtime_timeout: 1h",
    "http2: false",
    "catch_all: false",
    "demo: true",
    "expose_metrics: true",
    "gzip: false",
    "hsts_preload: true",
    "acme_root: /srv/acme/",
];

#[test]
fn every_value_the_settings_accept_renders_a_site_nginx_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let mut problems = Vec::new();
    for line in EDGE_VALUES {
        // With TLS: the site server, the redirecting one and the TLS includes are all rendered.
        let lines = ["tls: {self_signed: true}", line];
        std::fs::write(work.join("inv.yml"), inventory(work, &lines)).unwrap();
        let out = cozy_in(work, &["nginx", "render", "-i", "inv.yml", "--check"]);
        let stderr = text(&out.stderr);
        let refused_at_its_place = stderr.starts_with("error: inv.yml:");
        if !out.status.success() && !refused_at_its_place {
            problems.push(format!("`{line}`: {}", stderr.lines().next().unwrap_or("")));
        }
    }
    assert!(
        problems.is_empty(),
        "values cozy accepts but nginx refuses (they should be refused at their place, or rendered \
         so that nginx takes them):\n{}",
        problems.join("\n")
    );
}
