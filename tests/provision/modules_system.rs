//! The system modules (`apt`, `group`, `user`, `authorized_key`, `service`, `sysctl`) against real
//! Debian 12 test hosts. No SSH here: the modules run through a [`LocalTransport`] wrapped in
//! `testbed exec HOST`, and every result is checked with a raw command on the host, not with the
//! module's own reading of it. Each module is run three ways: check mode (nothing may change on the
//! host), apply (changed), apply again (unchanged).

use cozy::ops::facts::Facts;
use cozy::ops::modules::{lookup, Ctx, ModuleError, Outcome, Templates};
use cozy::ops::transport::LocalTransport;
use serde_json::{json, Value};

use crate::testbed::{script, TestHost, Testbed};

struct NoTemplates;

impl Templates for NoTemplates {
    fn render_file(&self, src: &str) -> Result<String, String> {
        Err(format!("no templates in these tests ({src})"))
    }
}

/// One test host and a transport into it.
struct Host {
    tb: Testbed,
    host: TestHost,
    transport: LocalTransport,
    facts: Facts,
}

impl Host {
    async fn up() -> Host {
        let tb = Testbed::up(1);
        let host = tb.hosts[0].clone();
        let transport = LocalTransport::new(host.name.clone()).with_wrapper(vec![
            script().display().to_string(),
            "exec".into(),
            host.name.clone(),
        ]);
        let facts = Facts::gather(&transport).await.expect("facts");
        Host {
            tb,
            host,
            transport,
            facts,
        }
    }

    async fn module(&self, name: &str, args: Value, check: bool) -> Result<Outcome, ModuleError> {
        let spec = lookup(name).unwrap_or_else(|| panic!("no module {name}"));
        let module = (spec.build)(args.clone())
            .unwrap_or_else(|e| panic!("{name} {args}: arguments refused: {e}"));
        let ctx = Ctx {
            host: &self.transport,
            check,
            diff: true,
            become_root: true,
            facts: &self.facts,
            templates: &NoTemplates,
        };
        module.run(&ctx).await
    }

    /// Applies (or checks) and expects success.
    async fn ok(&self, name: &str, args: Value, check: bool) -> Outcome {
        self.module(name, args.clone(), check)
            .await
            .unwrap_or_else(|e| panic!("{name} {args} (check: {check}) failed: {e}"))
    }

    /// Applies and expects a change, then applies again and expects none.
    async fn converges(&self, name: &str, args: Value) -> Outcome {
        let first = self.ok(name, args.clone(), false).await;
        assert!(first.changed, "{name} {args}: first run reported no change");
        let second = self.ok(name, args.clone(), false).await;
        assert!(
            !second.changed,
            "{name} {args}: second run changed again: {:?}",
            second.diff
        );
        first
    }

    /// Ground truth: a raw command on the host.
    fn sh(&self, script: &str) -> String {
        self.tb.exec_ok(&self.host, script).trim().to_string()
    }

    fn sh_status(&self, script: &str) -> i32 {
        self.tb.exec(&self.host, script).status.code().unwrap_or(-1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_installs_once_removes_and_check_mode_touches_nothing() {
    let h = Host::up().await;
    let installed = "dpkg-query -W -f='${Status}' tree 2>/dev/null || true";
    assert_ne!(h.sh(installed), "install ok installed");
    let lists = "ls -la --time-style=+%s /var/lib/apt/lists/ | md5sum";
    let lists_before = h.sh(lists);

    let present = json!({"name": ["tree"]});
    let planned = h.ok("apt", present.clone(), true).await;
    assert!(planned.changed);
    assert_eq!(planned.diff.as_deref(), Some("+ install: tree"));
    assert_ne!(
        h.sh(installed),
        "install ok installed",
        "check mode installed"
    );
    assert_eq!(
        h.sh(lists),
        lists_before,
        "check mode updated the apt lists"
    );

    let done = h.converges("apt", present.clone()).await;
    assert_eq!(done.diff.as_deref(), Some("+ install: tree"));
    assert_eq!(h.sh(installed), "install ok installed");
    // The update that preceded the install is recorded: the next task does not update again.
    assert_eq!(
        h.sh_status("test -f /var/lib/apt/periodic/update-success-stamp"),
        0
    );
    let latest = h
        .ok("apt", json!({"name": "tree", "state": "latest"}), false)
        .await;
    assert!(!latest.changed, "{:?}", latest.diff);

    let err = h
        .module(
            "apt",
            json!({"name": ["tree", "cozy-no-such-package"]}),
            false,
        )
        .await
        .expect_err("an unknown package must fail");
    assert!(
        err.message.contains("cozy-no-such-package"),
        "{}",
        err.message
    );

    let absent = json!({"name": "tree", "state": "absent", "purge": true});
    assert!(h.ok("apt", absent.clone(), true).await.changed);
    assert_eq!(
        h.sh(installed),
        "install ok installed",
        "check mode removed"
    );
    let removed = h.converges("apt", absent).await;
    assert_eq!(removed.diff.as_deref(), Some("- purge: tree"));
    assert_eq!(h.sh_status("dpkg-query -W tree 2>/dev/null | grep -q ."), 1);
}

/// A package from another release in the same task as plain ones, with no `apt-get update` task of
/// its own: the source file written after the last update makes the lists stale. Then an exact
/// version below the installed one (a downgrade). hprof-conv: a small package that bookworm and
/// bookworm-backports both carry, in different versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_installs_from_a_release_added_after_the_last_update_and_pins_versions() {
    let h = Host::up().await;
    let version = "dpkg-query -W -f='${Version}' hprof-conv 2>/dev/null || true";
    // Fresh lists first (the state of a host after any apt task), then the new source.
    assert!(
        h.ok("apt", json!({"name": "tree"}), false).await.changed,
        "tree was installed already"
    );
    h.sh(
        "mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list); \
         echo \"deb $mirror bookworm-backports main\" > /etc/apt/sources.list.d/test-backports.list",
    );

    let task = json!({"name": ["tree", "hprof-conv/bookworm-backports"]});
    let planned = h.ok("apt", task.clone(), true).await;
    assert!(planned.changed);
    assert!(
        planned
            .notes
            .iter()
            .any(|n| n.contains("hprof-conv/bookworm-backports")),
        "check mode should say the release is not in the lists yet: {:?}",
        planned.notes
    );
    assert_eq!(h.sh(version), "", "check mode installed");

    // Installing a package the fresh lists already know updates them first, because the new source
    // is newer than the last update (cache_valid_time alone would say "fresh").
    let in_lists = "apt-cache policy hprof-conv | grep -c bookworm-backports || true";
    assert_eq!(h.sh(in_lists), "0");
    assert!(h.ok("apt", json!({"name": "jq"}), false).await.changed);
    assert_ne!(
        h.sh(in_lists),
        "0",
        "the lists were not updated for the new source"
    );

    let done = h.converges("apt", task.clone()).await;
    assert_eq!(
        done.diff.as_deref(),
        Some("+ install: hprof-conv/bookworm-backports")
    );
    let bpo = h.sh(version);
    assert!(
        bpo.contains("~bpo12"),
        "installed {bpo:?}, not the backports version"
    );
    // A plain name is satisfied by the backports version; `latest` would not downgrade to bookworm's.
    assert!(
        !h.ok("apt", json!({"name": "hprof-conv"}), false)
            .await
            .changed
    );

    // Exactly bookworm's version: below the installed one.
    let stable = h.sh("apt-cache madison hprof-conv | awk -F'|' '$3 ~ /bookworm\\/main/ {gsub(/ /, \"\", $2); print $2; exit}'");
    assert!(!stable.is_empty() && !stable.contains("bpo"), "{stable:?}");
    let pinned = json!({"name": format!("hprof-conv={stable}")});
    let changed = h.converges("apt", pinned).await;
    assert_eq!(
        changed.diff,
        Some(format!("↑ change: hprof-conv={stable} ({bpo} → {stable})"))
    );
    assert_eq!(h.sh(version), stable);

    let err = h
        .module(
            "apt",
            json!({"name": "hprof-conv/cozy-no-such-release"}),
            false,
        )
        .await
        .expect_err("an unknown release must fail");
    assert!(
        err.message.contains("cozy-no-such-release"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_users_and_authorized_keys_converge() {
    let h = Host::up().await;

    // group
    let group = json!({"name": "cozyops", "gid": 2345});
    assert!(h.ok("group", group.clone(), true).await.changed);
    assert_eq!(
        h.sh_status("getent group cozyops"),
        2,
        "check mode created it"
    );
    h.converges("group", group).await;
    assert_eq!(h.sh("getent group cozyops | cut -d: -f3"), "2345");
    let regid = json!({"name": "cozyops", "gid": 2346});
    assert!(h.ok("group", regid.clone(), true).await.changed);
    assert_eq!(h.sh("getent group cozyops | cut -d: -f3"), "2345");
    h.converges("group", regid).await;
    assert_eq!(h.sh("getent group cozyops | cut -d: -f3"), "2346");

    // user
    let deploy = json!({"name": "deploy", "groups": ["sudo", "cozyops"], "shell": "/bin/bash",
                        "password_lock": true, "comment": "Deploy"});
    assert!(h.ok("user", deploy.clone(), true).await.changed);
    assert_eq!(
        h.sh_status("getent passwd deploy"),
        2,
        "check mode created it"
    );
    let created = h.converges("user", deploy).await;
    assert!(
        created
            .diff
            .as_deref()
            .unwrap_or_default()
            .contains("create"),
        "{:?}",
        created.diff
    );
    let groups = h.sh("id -Gn deploy");
    assert!(
        groups.contains("sudo") && groups.contains("cozyops"),
        "{groups}"
    );
    assert_eq!(
        h.sh("getent passwd deploy | cut -d: -f5,7"),
        "Deploy:/bin/bash"
    );
    assert!(h.sh("getent shadow deploy | cut -d: -f2").starts_with('!'));
    assert_eq!(h.sh("stat -c %U /home/deploy"), "deploy");

    let to_sh = json!({"name": "deploy", "shell": "/bin/sh"});
    let planned = h.ok("user", to_sh, true).await;
    assert!(planned.changed);
    assert_eq!(
        planned.diff.as_deref(),
        Some("user deploy: shell /bin/bash → /bin/sh")
    );
    assert_eq!(h.sh("getent passwd deploy | cut -d: -f7"), "/bin/bash");

    let exact = json!({"name": "deploy", "groups": ["sudo"], "append": false});
    let out = h.converges("user", exact).await;
    assert_eq!(out.diff.as_deref(), Some("user deploy: groups -cozyops"));
    assert_eq!(h.sh("id -Gn deploy"), "deploy sudo");

    // root's password locked (harden does this)
    h.converges("user", json!({"name": "root", "password_lock": true}))
        .await;
    assert!(h.sh("getent shadow root | cut -d: -f2").starts_with('!'));

    // authorized_key
    let key1 = std::fs::read_to_string(&h.tb.public_key).expect("testbed public key");
    let key1 = key1.trim().to_string();
    let key2 =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGNvenkgdGVzdCBrZXkgbnVtYmVyIHR3byAuLi4u second";
    let file = "/home/deploy/.ssh/authorized_keys";
    let one = json!({"user": "deploy", "key": key1});
    assert!(h.ok("authorized_key", one.clone(), true).await.changed);
    assert_eq!(
        h.sh_status("test -e /home/deploy/.ssh"),
        1,
        "check mode wrote"
    );
    h.converges("authorized_key", one).await;
    assert_eq!(
        h.sh(&format!("stat -c '%a %U %G' /home/deploy/.ssh {file}")),
        "700 deploy deploy\n600 deploy deploy"
    );
    assert_eq!(h.sh(&format!("cat {file}")), key1);

    // The same key with another comment is the same key.
    let mut renamed: Vec<&str> = key1.split(' ').take(2).collect();
    renamed.push("another-comment");
    let same = h
        .ok(
            "authorized_key",
            json!({"user": "deploy", "key": renamed.join(" ")}),
            false,
        )
        .await;
    assert!(!same.changed, "{:?}", same.diff);

    h.converges(
        "authorized_key",
        json!({"user": "deploy", "key": [key1.clone(), key2.to_string()]}),
    )
    .await;
    assert_eq!(h.sh(&format!("wc -l < {file}")), "2");
    let only2 = json!({"user": "deploy", "key": key2, "exclusive": true});
    let before = h.sh(&format!("sha256sum {file}"));
    assert!(h.ok("authorized_key", only2.clone(), true).await.changed);
    assert_eq!(
        h.sh(&format!("sha256sum {file}")),
        before,
        "check mode wrote"
    );
    h.converges("authorized_key", only2).await;
    assert_eq!(h.sh(&format!("cat {file}")), key2);
    h.converges(
        "authorized_key",
        json!({"user": "deploy", "key": key2, "state": "absent"}),
    )
    .await;
    assert_eq!(h.sh(&format!("wc -c < {file}")), "0");

    // A wrong mode is repaired even when the keys are right.
    h.sh(&format!("chmod 644 {file}"));
    h.converges("authorized_key", json!({"user": "deploy", "key": key1}))
        .await;
    assert_eq!(h.sh(&format!("stat -c %a {file}")), "600");

    let err = h
        .module(
            "authorized_key",
            json!({"user": "nobody-here", "key": key2}),
            false,
        )
        .await
        .expect_err("unknown user");
    assert!(err.message.contains("nobody-here"), "{}", err.message);

    // user absent
    h.converges("user", json!({"name": "deploy", "state": "absent"}))
        .await;
    assert_eq!(h.sh_status("getent passwd deploy"), 2);

    // move_home carries the files along; remove deletes the home with the account.
    h.converges("user", json!({"name": "mover", "shell": "/bin/sh"}))
        .await;
    h.sh("echo kept > /home/mover/note && chown mover: /home/mover/note");
    let moved = h
        .converges(
            "user",
            json!({"name": "mover", "home": "/srv/mover", "move_home": true}),
        )
        .await;
    assert_eq!(
        moved.diff.as_deref(),
        Some("user mover: home /home/mover → /srv/mover (moved)")
    );
    assert_eq!(h.sh("cat /srv/mover/note"), "kept");
    assert_eq!(h.sh_status("test -e /home/mover"), 1);
    assert_eq!(h.sh("getent passwd mover | cut -d: -f6"), "/srv/mover");
    h.converges(
        "user",
        json!({"name": "mover", "state": "absent", "remove": true}),
    )
    .await;
    assert_eq!(h.sh_status("getent passwd mover"), 2);
    assert_eq!(h.sh_status("test -e /srv/mover"), 1, "home left behind");
    h.converges("group", json!({"name": "cozyops", "state": "absent"}))
        .await;
    assert_eq!(h.sh_status("getent group cozyops"), 2);
}

const UNIT: &str =
    "[Unit]\nDescription=cozy test service\n[Service]\nExecStart=/bin/sleep infinity\n\
                    [Install]\nWantedBy=multi-user.target\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_start_enable_restart_stop_and_mask() {
    let h = Host::up().await;
    // Where packaged units live would be /lib/systemd/system; /etc/systemd/system is for the admin's
    // overrides, and systemd refuses to mask a unit whose file is there.
    h.sh(&format!(
        "mkdir -p /usr/local/lib/systemd/system; printf '%s' '{UNIT}' > /usr/local/lib/systemd/system/cozy-test.service"
    ));
    let active = "systemctl is-active cozy-test || true";
    let enabled = "systemctl is-enabled cozy-test || true";
    let pid = "systemctl show -p MainPID --value cozy-test";

    let up =
        json!({"name": "cozy-test", "state": "started", "enabled": true, "daemon_reload": true});
    // Check mode does not daemon-reload, so systemd may not know the new unit yet: either plan or refuse.
    h.sh("systemctl daemon-reload");
    let planned = h.ok("service", up.clone(), true).await;
    assert!(planned.changed);
    assert_eq!(h.sh(active), "inactive", "check mode started it");
    let out = h.converges("service", up).await;
    assert_eq!(
        out.diff.as_deref(),
        Some("service cozy-test: disabled → enabled, inactive → started")
    );
    assert_eq!(
        (h.sh(active), h.sh(enabled)),
        ("active".into(), "enabled".into())
    );

    // restarted always acts: a handler's meaning.
    let pid_before = h.sh(pid);
    let restart = json!({"name": "cozy-test", "state": "restarted"});
    assert!(h.ok("service", restart.clone(), false).await.changed);
    assert!(h.ok("service", restart, false).await.changed);
    assert_ne!(h.sh(pid), pid_before);
    // No ExecReload: reloaded restarts it.
    let pid_before = h.sh(pid);
    assert!(
        h.ok(
            "service",
            json!({"name": "cozy-test", "state": "reloaded"}),
            false
        )
        .await
        .changed
    );
    assert_eq!(h.sh(active), "active");
    assert_ne!(h.sh(pid), pid_before);

    let down = json!({"name": "cozy-test", "state": "stopped", "enabled": false});
    assert!(h.ok("service", down.clone(), true).await.changed);
    assert_eq!(h.sh(active), "active", "check mode stopped it");
    h.converges("service", down).await;
    assert_eq!(
        (h.sh(active), h.sh(enabled)),
        ("inactive".into(), "disabled".into())
    );

    h.converges("service", json!({"name": "cozy-test", "masked": true}))
        .await;
    assert_eq!(h.sh(enabled), "masked");
    let err = h
        .module(
            "service",
            json!({"name": "cozy-test", "state": "started"}),
            false,
        )
        .await
        .expect_err("a masked unit cannot start");
    assert!(err.message.contains("masked"), "{}", err.message);
    h.converges(
        "service",
        json!({"name": "cozy-test", "masked": false, "state": "started"}),
    )
    .await;
    assert_eq!(h.sh(active), "active");

    let err = h
        .module(
            "service",
            json!({"name": "cozy-nope", "state": "started"}),
            false,
        )
        .await
        .expect_err("unknown unit");
    assert!(
        err.message.contains("cozy-nope") && err.message.contains("no such unit"),
        "{}",
        err.message
    );

    // A unit that fails to start shows why.
    h.sh("printf '[Service]\\nType=oneshot\\nExecStart=/bin/false\\n' > /etc/systemd/system/cozy-bad.service");
    let err = h
        .module(
            "service",
            json!({"name": "cozy-bad", "state": "started", "daemon_reload": true}),
            false,
        )
        .await
        .expect_err("a unit that cannot start");
    assert!(err.message.contains("cozy-bad"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysctl_writes_the_file_applies_what_the_kernel_allows_and_reports_the_rest() {
    let h = Host::up().await;
    // testbed.md: net.* is per network namespace and settable; kernel.* is read-only in a container. Some
    // nspawn setups keep all of /proc/sys read-only: then net.* must be reported like kernel.*.
    let net_writable = h.sh_status("test -w /proc/sys/net/ipv4/ip_forward") == 0;
    eprintln!("/proc/sys/net writable on the test host: {net_writable}");
    if net_writable {
        h.sh("echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv4/conf/all/log_martians");
    }
    let forward_before = h.sh("cat /proc/sys/net/ipv4/ip_forward");
    let dmesg_before = h.sh("cat /proc/sys/kernel/dmesg_restrict");
    let want_dmesg = if dmesg_before == "1" { "0" } else { "1" };
    let file = "/etc/sysctl.d/99-cozy.conf";

    let args = json!({"settings": {
        "net.ipv4.ip_forward": 0,
        "net.ipv4.conf.all.log_martians": "1",
        "kernel.dmesg_restrict": want_dmesg,
        "net.ipv4.cozy_no_such_key": 1,
    }});
    let planned = h.ok("sysctl", args.clone(), true).await;
    assert!(planned.changed);
    assert_eq!(
        h.sh_status(&format!("test -e {file}")),
        1,
        "check mode wrote"
    );
    assert_eq!(h.sh("cat /proc/sys/net/ipv4/ip_forward"), forward_before);

    let first = h.ok("sysctl", args.clone(), false).await;
    assert!(first.changed);
    let diff = first.diff.clone().unwrap_or_default();
    assert_eq!(
        h.sh(&format!("grep -v '^#' {file}")),
        format!(
            "kernel.dmesg_restrict = {want_dmesg}\nnet.ipv4.conf.all.log_martians = 1\n\
             net.ipv4.cozy_no_such_key = 1\nnet.ipv4.ip_forward = 0"
        )
    );
    assert_eq!(h.sh(&format!("stat -c '%a %U' {file}")), "644 root");
    let has_note = |key: &str, what: &str| {
        first
            .notes
            .iter()
            .any(|n| n.starts_with(key) && n.contains(what))
    };
    assert!(
        has_note("net.ipv4.cozy_no_such_key", "not available"),
        "{:?}",
        first.notes
    );
    assert!(
        has_note("kernel.dmesg_restrict", "read-only"),
        "{:?}",
        first.notes
    );
    assert_eq!(h.sh("cat /proc/sys/kernel/dmesg_restrict"), dmesg_before);
    if net_writable {
        assert!(diff.contains("live net.ipv4.ip_forward: 1 → 0"), "{diff}");
        assert_eq!(h.sh("cat /proc/sys/net/ipv4/ip_forward"), "0");
        assert_eq!(h.sh("cat /proc/sys/net/ipv4/conf/all/log_martians"), "1");
    } else {
        assert!(!diff.contains("live "), "{diff}");
        assert!(
            has_note("net.ipv4.conf.all.log_martians", "read-only")
                || h.sh("cat /proc/sys/net/ipv4/conf/all/log_martians") == "1"
        );
    }

    // Refused keys are reported again, but are not a change.
    let second = h.ok("sysctl", args, false).await;
    assert!(!second.changed, "{:?}", second.diff);
    assert_eq!(second.notes.len(), first.notes.len(), "{:?}", second.notes);

    // A drifted live value is put back without rewriting the file.
    if net_writable {
        h.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
        let stamp = h.sh(&format!("stat -c %Y.%i {file}"));
        let fixed = h
            .converges(
                "sysctl",
                json!({"name": "net.ipv4.ip_forward", "value": "0"}),
            )
            .await;
        assert_eq!(
            fixed.diff.as_deref(),
            Some("live net.ipv4.ip_forward: 1 → 0")
        );
        assert_eq!(h.sh("cat /proc/sys/net/ipv4/ip_forward"), "0");
        assert_eq!(h.sh(&format!("stat -c %Y.%i {file}")), stamp);
    }
}
