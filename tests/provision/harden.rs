//! The built-in `base` + `harden` on a fresh host: check mode first (nothing may change), then converge,
//! then a second run with nothing to change, then the host is judged from outside.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::scene::{host_recap, text, Scene};
use crate::testbed::{TestHost, Testbed};

/// What the host looks like, read from inside (not through cozy): anything cozy would change shows here.
fn snapshot(tb: &Testbed, h: &TestHost) -> String {
    tb.exec_ok(
        h,
        "md5sum /etc/ssh/sshd_config /etc/login.defs 2>&1; getent passwd deploy || echo no-deploy; \
         ls /etc/sudoers.d /etc/sysctl.d /etc/ssh; nft list ruleset | md5sum; \
         dpkg-query -W -f='${Package}\\n' | md5sum",
    )
}

fn port_open(address: &str, port: u16) -> bool {
    let addr: SocketAddr = format!("{address}:{port}").parse().unwrap();
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[test]
fn base_and_harden_converge_once_and_leave_a_hardened_host() {
    let tb = Testbed::up(1);
    let h = &tb.hosts[0];
    let scene = Scene::new(&tb, "");

    // 1. --check on a fresh host: reports what it would change, changes nothing.
    let before = snapshot(&tb, h);
    let out = scene.provision(&["--check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("changed"), "check mode names the changes: {t}");
    let (code, recap) = scene.provision_json(&["--check"]);
    assert_eq!(code, 0, "{recap}");
    assert!(
        host_recap(&recap, h)["changed"].as_u64().unwrap() > 10,
        "{recap}"
    );
    assert_eq!(snapshot(&tb, h), before, "--check changed the host");

    // 2. Converge: bootstrap (deploy user through root), base, harden.
    let (code, recap) = scene.provision_json(&[]);
    assert_eq!(code, 0, "{recap}");
    assert!(
        host_recap(&recap, h)["changed"].as_u64().unwrap() > 10,
        "{recap}"
    );

    // 3. Nothing left to change — and cozy still connects after hardening (as deploy, with sudo).
    let (code, recap) = scene.provision_json(&[]);
    assert_eq!(code, 0, "{recap}");
    assert_eq!(host_recap(&recap, h)["changed"], 0, "second run: {recap}");
    assert_eq!(host_recap(&recap, h)["failed"], 0, "{recap}");

    // 4. Judged from outside.
    // Root cannot log in any more, even with the key that used to work.
    let noop = scene.write(
        "noop.yml",
        "- name: noop\n  tasks:\n    - name: nothing\n      command: \"true\"\n",
    );
    let out = crate::scene::cozy(&[
        "provision",
        &format!("root@{}", h.address),
        "-p",
        noop.to_str().unwrap(),
        "--known-hosts",
        scene.known_hosts.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "root login must be refused: {}",
        text(&out)
    );
    // The deploy user has passwordless sudo, and is in the admin group SSH is limited to.
    tb.exec_ok(h, "su deploy -s /bin/sh -c 'sudo -n true'");
    assert!(tb
        .exec_ok(h, "id -Gn deploy")
        .split_whitespace()
        .any(|g| g == "admins"));
    let sshd = tb.exec_ok(h, "sshd -T");
    for line in [
        "permitrootlogin no",
        "passwordauthentication no",
        "kbdinteractiveauthentication no",
        "maxauthtries 3",
        "allowtcpforwarding no",
        "x11forwarding no",
    ] {
        assert!(sshd.lines().any(|l| l == line), "sshd -T lacks `{line}`");
    }
    // The firewall is active: SSH open, anything else that listens is dropped.
    let ruleset = tb.exec_ok(h, "nft list ruleset");
    assert!(ruleset.contains("policy drop"), "{ruleset}");
    tb.exec_ok(
        h,
        "nohup python3 -m http.server 8081 >/dev/null 2>&1 & sleep 1; ss -ltn | grep -q ':8081'",
    );
    assert!(port_open(&h.address, 22));
    assert!(
        !port_open(&h.address, 8081),
        "port 8081 is not allowed by the play"
    );
    // Kernel settings: all in /etc/sysctl.d for the next boot (a container refuses most of them live,
    // which the module reports instead of failing).
    let sysctl = tb.exec_ok(h, "cat /etc/sysctl.d/*.conf");
    for line in [
        "net.ipv4.conf.all.accept_redirects = 0",
        "net.ipv4.tcp_syncookies = 1",
        "kernel.kptr_restrict = 2",
        "fs.suid_dumpable = 0",
    ] {
        assert!(sysctl.contains(line), "sysctl.d lacks `{line}`: {sysctl}");
    }
    // net.* is the host's own (its network namespace): applied live.
    assert_eq!(
        tb.exec_ok(h, "sysctl -n net.ipv4.conf.all.accept_redirects")
            .trim(),
        "0"
    );
    // ssh-audit from outside: exit 0 means no failure and no warning.
    // The pinned ssh-audit of `testbed audit-tools` (scripts/test installs it), not whatever is on PATH.
    let audit = std::process::Command::new(crate::testbed::script())
        .args(["ssh-audit", &h.name])
        .output()
        .expect("tests/testbed/testbed ssh-audit");
    assert_eq!(audit.status.code(), Some(0), "ssh-audit: {}", text(&audit));
}
