//! The built-in `nginx` playbook on a real host: it installs the site `cozy nginx render` makes from the
//! inventory, nginx on the host proxies to a real `cozy serve`, a second run changes nothing, and a site
//! nginx refuses is rolled back while the old one keeps serving.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Child;
use std::time::Duration;

use crate::scene::{host_recap, text, Scene};
use crate::testbed::{TestHost, Testbed};

/// The controller's end of a test host's veth pair (its /30's first address): reachable from the host.
fn gateway(host: &TestHost) -> String {
    let ip: Ipv4Addr = host.address.parse().expect("an IPv4 testbed address");
    Ipv4Addr::from(u32::from(ip) - 1).to_string()
}

/// A real `cozy serve` on the embedded SQLite, listening on `address:0`; killed on drop.
struct Daemon {
    child: Child,
    listen: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(address: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let env: Vec<(String, String)> = [
            ("COZY_DATA_DIR", dir.path().join("data")),
            ("COZY_RUN_DIR", dir.path().join("run")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.display().to_string()))
        .chain([("COZY_LOG_FORMAT".to_string(), "json".to_string())])
        .collect();
        let log = dir.path().join("serve.log");
        let (mut child, base) =
            crate::helpers::spawn_serve(&format!("{address}:0"), &env, None, &log);
        let Some(listen) = base.as_deref().and_then(|b| b.strip_prefix("http://")) else {
            let _ = child.kill();
            panic!(
                "cozy serve did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Daemon {
            listen: listen.to_string(),
            child,
            _dir: dir,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to `address` with `Host: host`; the whole response as text ("" when nginx
/// closed the connection without an answer).
fn http_get(address: &str, host: &str, path: &str) -> String {
    let mut stream =
        TcpStream::connect(address).unwrap_or_else(|e| panic!("connect {address}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn the_nginx_playbook_installs_the_rendered_site_and_nginx_proxies_to_the_app() {
    let tb = Testbed::up(1);
    let lb = &tb.hosts[0];
    let daemon = Daemon::start(&gateway(lb));
    let scene = Scene::new(
        &tb,
        &format!(
            "  app1: {{address: {}, vars: {{app_listen: '{}'}}}}\n",
            gateway(lb),
            daemon.listen
        ),
    );
    let inventory = scene.path("inventory.yml");
    let mut text_inv = std::fs::read_to_string(&inventory).unwrap();
    text_inv.push_str(&format!(
        "groups:\n  app: [app1]\n  lb: [{}]\nvars:\n  nginx_firewall: false\n  nginx:\n    server_names: [cozy.test]\n    ipv6: false\n",
        lb.name
    ));
    std::fs::write(&inventory, text_inv).unwrap();

    let (code, recap) = scene.provision_json(&["lb", "-p", "nginx"]);
    assert_eq!(code, 0, "{recap}");
    assert!(
        host_recap(&recap, lb)["changed"].as_u64().unwrap() >= 3,
        "{recap}"
    );
    assert_eq!(
        tb.exec_ok(lb, "readlink /etc/nginx/sites-enabled/cozy.conf"),
        "../sites-available/cozy.conf\n"
    );
    assert!(!tb
        .exec(lb, "test -e /etc/nginx/sites-enabled/default")
        .status
        .success());
    let main = tb.exec_ok(lb, "cat /etc/nginx/nginx.conf");
    for line in [
        "\tssl_protocols TLSv1.2 TLSv1.3;",
        "\tworker_connections 4096;",
        "worker_rlimit_nofile 16384;",
    ] {
        assert!(
            main.lines().any(|l| l == line),
            "no {line:?} in nginx.conf:\n{main}"
        );
    }

    // Through the host's nginx to the daemon on this machine: cozy's own answers, nginx's headers.
    let front = format!("{}:80", lb.address);
    let health = http_get(&front, "cozy.test", "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("X-Request-Id: "), "{health}");
    assert!(
        health.contains("X-Content-Type-Options: nosniff"),
        "{health}"
    );
    let api = http_get(&front, "cozy.test", "/v1/resources/1");
    assert!(api.starts_with("HTTP/1.1 401"), "{api}");
    assert!(api.contains("urn:cozy:problem:unauthenticated"), "{api}");
    // A name the site does not serve gets no answer at all.
    assert_eq!(http_get(&front, "evil.test", "/healthz"), "");

    // The second run changes nothing, so nginx is not reloaded.
    let (code, recap) = scene.provision_json(&["lb", "-p", "nginx"]);
    assert_eq!(code, 0, "{recap}");
    assert_eq!(host_recap(&recap, lb)["changed"], 0, "{recap}");

    // A template nginx refuses: the task fails, the old files are back, nginx still serves the site.
    let before = tb.exec_ok(
        lb,
        "sha256sum /etc/nginx/cozy/cozy/proxy.conf /etc/nginx/cozy/cozy/.cozy-manifest",
    );
    scene.write(
        "templates/nginx/proxy.conf.j2",
        "proxy_http_version 1.1;\nproxy_set_header Connection \"\";\nnot_a_directive on;\n",
    );
    let out = scene.provision(&["lb", "-p", "nginx"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains("nginx refused the new site cozy"),
        "{report}"
    );
    assert!(report.contains("not_a_directive"), "{report}");
    assert_eq!(
        tb.exec_ok(
            lb,
            "sha256sum /etc/nginx/cozy/cozy/proxy.conf /etc/nginx/cozy/cozy/.cozy-manifest"
        ),
        before
    );
    assert!(tb.exec(lb, "nginx -t").status.success());
    let still = http_get(&front, "cozy.test", "/healthz");
    assert!(still.starts_with("HTTP/1.1 200"), "{still}");
}
