//! `cozy provision` end to end: the real binary, over SSH, against real test hosts.

use crate::scene::{cozy, host_recap, text, Scene};
use crate::testbed::Testbed;

#[test]
fn a_handler_notified_twice_runs_once_and_an_unnotified_one_never() {
    let tb = Testbed::up(1);
    let h = &tb.hosts[0];
    let scene = Scene::new(&tb, "");
    let playbook = scene.write(
        "handlers.yml",
        r#"
- name: handlers
  tasks:
    - name: first file
      copy: {dest: /tmp/one, content: "1\n"}
      notify: count
    - name: second file
      copy: {dest: /tmp/two, content: "2\n"}
      notify: count
    - name: unchanged file
      file: {path: /tmp, state: directory}
      notify: never
  handlers:
    - name: count
      shell: echo ran >> /tmp/handler-runs
    - name: never
      shell: echo ran >> /tmp/never-runs
"#,
    );
    let (code, recap) = scene.provision_json(&["-p", playbook.to_str().unwrap()]);
    assert_eq!(code, 0, "{recap}");
    assert_eq!(tb.exec_ok(h, "cat /tmp/handler-runs"), "ran\n");
    assert!(!tb.exec(h, "test -e /tmp/never-runs").status.success());
    // 3 tasks + 1 handler; 2 files and the handler changed.
    assert_eq!(host_recap(&recap, h)["ok"], 4, "{recap}");
    assert_eq!(host_recap(&recap, h)["changed"], 3, "{recap}");

    // Nothing changes the second time, so nothing is notified.
    let (code, recap) = scene.provision_json(&["-p", playbook.to_str().unwrap()]);
    assert_eq!(code, 0, "{recap}");
    assert_eq!(host_recap(&recap, h)["changed"], 0, "{recap}");
    assert_eq!(tb.exec_ok(h, "cat /tmp/handler-runs"), "ran\n");
}

#[test]
fn one_failing_or_unreachable_host_does_not_stop_the_others() {
    let tb = Testbed::up(2);
    let (good, bad) = (&tb.hosts[0], &tb.hosts[1]);
    // A host nobody listens on: an address of the testbed's own range that no host has.
    let scene = Scene::new(&tb, "  ghost: {address: 127.0.0.1, port: 1}\n");
    let playbook = scene.write(
        "fail.yml",
        &format!(
            r#"
- name: fail on one host
  tasks:
    - name: marker before
      copy: {{dest: /tmp/before, content: "x\n"}}
    - name: fails on {bad}
      command: "false"
      when: inventory_hostname == "{bad}"
    - name: marker after
      copy: {{dest: /tmp/after, content: "x\n"}}
"#,
            bad = bad.name
        ),
    );
    let (code, recap) = scene.provision_json(&["-p", playbook.to_str().unwrap()]);
    assert_eq!(code, 4, "unreachable wins the exit code: {recap}");
    assert_eq!(recap["ok"], false);
    let g = host_recap(&recap, good);
    assert_eq!(
        (g["failed"].as_u64(), g["unreachable"].as_bool()),
        (Some(0), Some(false)),
        "{recap}"
    );
    let b = host_recap(&recap, bad);
    assert_eq!(b["failed"], 1, "{recap}");
    assert!(b["error"].as_str().unwrap().contains("fails on"), "{recap}");
    assert_eq!(recap["hosts"]["ghost"]["unreachable"], true, "{recap}");
    // The good host ran to the end; the bad one stopped at its failure.
    tb.exec_ok(good, "test -e /tmp/after");
    tb.exec_ok(bad, "test -e /tmp/before");
    assert!(!tb.exec(bad, "test -e /tmp/after").status.success());

    // Without the unreachable host the exit code says "a task failed".
    let out = scene.provision(&[&good.name, &bad.name, "-p", playbook.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("RECAP"), "{t}");
}

#[test]
fn unknown_and_changed_host_keys_are_refused() {
    let tb = Testbed::up(1);
    let h = &tb.hosts[0];
    let scene = Scene::new(&tb, "");
    let playbook = scene.write(
        "noop.yml",
        "- name: noop\n  tasks:\n    - name: facts only\n      command: \"true\"\n",
    );
    let pb = playbook.to_str().unwrap();

    // Unknown: an empty known_hosts file.
    std::fs::write(&scene.known_hosts, "").unwrap();
    let (code, recap) = scene.provision_json(&["-p", pb]);
    assert_eq!(code, 4, "{recap}");
    let err = host_recap(&recap, h)["error"].as_str().unwrap().to_string();
    assert!(err.contains("accept-new-host-keys"), "{err}");

    // Accepted once with the flag (and recorded), then known without it.
    let (code, recap) = scene.provision_json(&["-p", pb, "--accept-new-host-keys"]);
    assert_eq!(code, 0, "{recap}");
    let recorded = std::fs::read_to_string(&scene.known_hosts).unwrap();
    assert!(recorded.contains(&h.address), "{recorded}");
    let (code, recap) = scene.provision_json(&["-p", pb]);
    assert_eq!(code, 0, "{recap}");

    // Changed: the host gets new keys; refused even with --accept-new-host-keys, both fingerprints shown.
    let rekey = std::process::Command::new(crate::testbed::script())
        .args(["rekey", &h.name])
        .output()
        .unwrap();
    assert!(rekey.status.success(), "{}", text(&rekey));
    let (code, recap) = scene.provision_json(&["-p", pb, "--accept-new-host-keys"]);
    assert_eq!(code, 4, "{recap}");
    let err = host_recap(&recap, h)["error"].as_str().unwrap().to_string();
    assert!(
        err.matches("SHA256:").count() >= 2,
        "both fingerprints: {err}"
    );
}

/// Bad playbooks are refused before any host is touched, with file:line:column.
#[test]
fn bad_playbooks_are_reported_at_their_location() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inventory.yml");
    std::fs::write(&inv, "hosts:\n  h1: {address: 127.0.0.1, port: 1}\n").unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "broken.yml",
            "- name: x\n  tasks:\n    - name: y\n     apt: {name: a}\n",
            "broken.yml:4:",
        ),
        (
            "module.yml",
            "- name: x\n  tasks:\n    - name: y\n      aptt: {name: a}\n",
            "module.yml:4:7",
        ),
        (
            "arg.yml",
            "- name: x\n  tasks:\n    - name: y\n      apt: {name: a, stat: present}\n",
            "arg.yml:4:",
        ),
    ];
    for (file, body, at) in cases {
        let p = dir.path().join(file);
        std::fs::write(&p, body).unwrap();
        let out = cozy(&[
            "provision",
            "-i",
            inv.to_str().unwrap(),
            "-p",
            p.to_str().unwrap(),
        ]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(t.contains(at), "expected {at} in: {t}");
        assert!(!t.contains("RECAP"), "nothing may run: {t}");
    }
    // The unknown argument lists the valid ones.
    let out = cozy(&[
        "provision",
        "-i",
        inv.to_str().unwrap(),
        "-p",
        dir.path().join("arg.yml").to_str().unwrap(),
    ]);
    assert!(text(&out).contains("state"), "{}", text(&out));
}

/// A login user without sudo: tasks that need root fail with a message about sudo, tasks that do not
/// still run.
#[test]
fn a_user_without_sudo_is_told_so_and_unprivileged_tasks_still_run() {
    let tb = Testbed::up(1);
    let h = &tb.hosts[0];
    let scene = Scene::new(
        &tb,
        &format!("  bob: {{address: {}, user: bob}}\n", h.address),
    );
    tb.exec_ok(
        h,
        &format!(
            "useradd -m -s /bin/sh bob && install -d -m 700 -o bob -g bob ~bob/.ssh && \
             install -m 600 -o bob -g bob {key} ~bob/.ssh/authorized_keys",
            key = "/root/.ssh/authorized_keys"
        ),
    );
    let playbook = scene.write(
        "sudo.yml",
        r#"
- name: sudo
  become: false
  tasks:
    - name: as bob
      copy: {dest: /tmp/bob-was-here, content: "x\n"}
    - name: as root
      copy: {dest: /etc/bob-was-here, content: "x\n"}
      become: true
"#,
    );
    let out = scene.provision(&["bob", "-p", playbook.to_str().unwrap(), "--json"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("sudo"), "the error names sudo: {t}");
    assert_eq!(tb.exec_ok(h, "stat -c %U /tmp/bob-was-here").trim(), "bob");
    assert!(!tb.exec(h, "test -e /etc/bob-was-here").status.success());
}
