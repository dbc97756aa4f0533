//! The SSH transport against a real OpenSSH sshd (see [`super::test_sshd`]).

use std::fs;
use std::time::{Duration, Instant};

use super::test_sshd::{keygen, keygen_fingerprint, SshdOptions, TestSshd};
use super::*;

async fn connect(sshd: &TestSshd) -> SshTransport {
    match SshTransport::connect(sshd.target()).await {
        Ok(t) => t,
        Err(e) => panic!("connect failed: {e}\nsshd log:\n{}", sshd.log()),
    }
}

#[tokio::test]
async fn runs_a_script_with_its_status_stdout_stderr_and_stdin() {
    let sshd = TestSshd::start();
    let t = connect(&sshd).await;
    let out = t
        .run(
            Command::new("read line; echo \"got $line\"; echo oops >&2; exit 3")
                .stdin(b"hi\n".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout_str(), "got hi\n");
    assert_eq!(out.stderr_str(), "oops\n");

    // Quoting survives the trip through the remote login shell.
    let out = t
        .run(Command::new("printf '%s|' \"it's\" '$HOME' \"a  b\""))
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "it's|$HOME|a  b|");

    // No stdin: the script sees end of file at once rather than hanging.
    let out = t.run(Command::new("cat; echo done")).await.unwrap();
    assert_eq!(out.stdout_str(), "done\n");

    // A script killed by a signal reports 128 + n, as a shell would.
    let out = t.run(Command::new("kill -TERM $$")).await.unwrap();
    assert_eq!(out.status, 143);

    // become_root as root needs no sudo (the test user here is whoever runs the tests).
    assert_eq!(t.login_user(), sshd.user);
    if sshd.user == "root" {
        let out = t.run(Command::new("id -u").root(true)).await.unwrap();
        assert_eq!(out.stdout_str(), "0\n");
    }
}

#[tokio::test]
async fn a_five_megabyte_upload_and_download_are_byte_exact() {
    let sshd = TestSshd::start();
    let t = connect(&sshd).await;
    let data: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let dest = sshd.dir.path().join("upload.bin");
    let script = format!(
        "cat > {d}.tmp && mv {d}.tmp {d} && wc -c < {d}",
        d = quote(dest.to_str().unwrap())
    );
    let out = t
        .run(Command::new(script).stdin(data.clone()))
        .await
        .unwrap();
    assert_eq!(out.status, 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str().trim(), data.len().to_string());
    assert!(fs::read(&dest).unwrap() == data, "uploaded bytes differ");

    // And back: the whole file through stdout while stdin is also streaming (cat both ways).
    let out = t
        .run(Command::new("cat").stdin(data.clone()))
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "echoed bytes differ");
}

#[tokio::test]
async fn many_concurrent_commands_share_one_connection() {
    let sshd = TestSshd::start();
    let t = connect(&sshd).await;
    let runs = (0..40).map(|i| {
        let t = &t;
        async move {
            // SSH_CONNECTION names the client's port: the same for every command iff one connection.
            let out = t
                .run(Command::new(format!("echo {i} $SSH_CONNECTION")))
                .await
                .unwrap();
            assert_eq!(out.status, 0, "{}", out.stderr_str());
            out.stdout_str()
        }
    });
    let outputs = futures::future::join_all(runs).await;
    let mut connections: Vec<String> = outputs
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some(i.to_string().as_str()));
            words.collect::<Vec<_>>().join(" ")
        })
        .collect();
    connections.dedup();
    assert_eq!(connections.len(), 1, "{connections:?}");
    assert!(connections[0].starts_with("127.0.0.1 "), "{connections:?}");
}

#[tokio::test]
async fn commands_on_one_connection_really_run_at_the_same_time() {
    // A barrier: each command waits until all have started. Run one after the other, the first would
    // wait in vain and the test would time out instead of passing.
    let sshd = TestSshd::start();
    let t = connect(&sshd).await;
    let dir = sshd.dir.path().join("barrier");
    fs::create_dir(&dir).unwrap();
    let n = MAX_CHANNELS;
    let script = format!(
        "touch {d}/$1; i=0; while [ $(ls {d} | wc -l) -lt {n} ]; do i=$((i+1)); \
         [ $i -gt 300 ] && exit 9; sleep 0.1; done; echo through",
        d = quote(dir.to_str().unwrap())
    );
    let runs = (0..n).map(|i| {
        let t = &t;
        let script = format!("set -- {i}; {script}");
        async move { t.run(Command::new(script)).await.unwrap() }
    });
    for out in futures::future::join_all(runs).await {
        assert_eq!(
            out.status,
            0,
            "the commands did not overlap: {}",
            out.stderr_str()
        );
        assert_eq!(out.stdout_str(), "through\n");
    }
}

#[tokio::test]
async fn a_command_that_overruns_its_timeout_is_abandoned_and_the_connection_stays_usable() {
    let sshd = TestSshd::start();
    let t = connect(&sshd).await;
    let started = Instant::now();
    let err = t
        .run(Command::new("sleep 30").timeout(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { secs: 1, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().starts_with("testhost: "), "{err}");
    let out = t.run(Command::new("echo still here")).await.unwrap();
    assert_eq!(out.stdout_str(), "still here\n");
}

#[tokio::test]
async fn an_unknown_host_is_refused_unless_accept_new_which_records_its_key() {
    let sshd = TestSshd::start();
    let expected = keygen_fingerprint(&sshd.host_key_pub);
    let mut target = sshd.target();
    target.known_hosts = sshd.dir.path().join("fresh/.ssh/known_hosts");
    target.accept_new = false;

    let err = SshTransport::connect(target.clone()).await.unwrap_err();
    let SshError::HostKeyUnknown { fingerprint, .. } = &err else {
        panic!("expected an unknown-host refusal, got: {err}");
    };
    assert_eq!(fingerprint, &expected);
    let msg = err.to_string();
    assert!(msg.contains(&format!("[127.0.0.1]:{}", sshd.port)), "{msg}");
    assert!(msg.contains("--accept-new-host-keys"), "{msg}");
    assert!(
        !target.known_hosts.exists(),
        "a refused key must not be recorded"
    );

    target.accept_new = true;
    let t = SshTransport::connect(target.clone()).await.unwrap();
    assert_eq!(t.run(Command::new("true")).await.unwrap().status, 0);
    let recorded = fs::read_to_string(&target.known_hosts).unwrap();
    assert!(
        recorded.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port)),
        "{recorded}"
    );

    // Known now: no accept_new needed, and nothing is added twice.
    target.accept_new = false;
    SshTransport::connect(target.clone()).await.unwrap();
    assert_eq!(fs::read_to_string(&target.known_hosts).unwrap(), recorded);

    // ssh itself agrees with what we wrote.
    let out = std::process::Command::new("ssh-keygen")
        .arg("-F")
        .arg(format!("[127.0.0.1]:{}", sshd.port))
        .arg("-f")
        .arg(&target.known_hosts)
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test]
async fn hashed_known_hosts_entries_are_honoured() {
    let sshd = TestSshd::start();
    let mut target = sshd.target();
    let host_pub = fs::read_to_string(&sshd.host_key_pub).unwrap();
    let mut fields = host_pub.split_whitespace();
    let line = format!(
        "[127.0.0.1]:{} {} {}\n",
        sshd.port,
        fields.next().unwrap(),
        fields.next().unwrap()
    );
    fs::write(&target.known_hosts, line).unwrap();
    let status = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&target.known_hosts)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(fs::read_to_string(&target.known_hosts)
        .unwrap()
        .starts_with("|1|"));
    target.accept_new = false;
    SshTransport::connect(target).await.unwrap();
}

#[tokio::test]
async fn a_changed_host_key_is_refused_even_with_accept_new_showing_both_fingerprints() {
    let sshd = TestSshd::start();
    let other = sshd.dir.path().join("other_host_key");
    keygen(&other, "ed25519", "");
    let old_fp = keygen_fingerprint(&other.with_extension("pub"));
    let new_fp = keygen_fingerprint(&sshd.host_key_pub);
    let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
    let mut fields = other_pub.split_whitespace();
    let target = sshd.target(); // accept_new is on
    fs::write(
        &target.known_hosts,
        format!(
            "# cozy test\nunrelated.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ\n[127.0.0.1]:{} {} {}\n",
            sshd.port,
            fields.next().unwrap(),
            fields.next().unwrap()
        ),
    )
    .unwrap();
    let before = fs::read_to_string(&target.known_hosts).unwrap();

    let err = SshTransport::connect(target.clone()).await.unwrap_err();
    assert!(matches!(err, SshError::HostKeyChanged { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("testhost: "), "{msg}");
    assert!(msg.contains("CHANGED"), "{msg}");
    assert!(msg.contains(&new_fp), "offered fingerprint missing: {msg}");
    assert!(msg.contains(&old_fp), "expected fingerprint missing: {msg}");
    assert!(
        msg.contains(&format!("{}:3", target.known_hosts.display())),
        "file:line missing: {msg}"
    );
    assert!(msg.contains("ssh-keygen -R"), "{msg}");
    assert_eq!(fs::read_to_string(&target.known_hosts).unwrap(), before);
}

#[tokio::test]
async fn a_refused_login_is_its_own_error_naming_user_and_key() {
    let sshd = TestSshd::start();
    let stranger = sshd.dir.path().join("stranger_key");
    keygen(&stranger, "ed25519", "");
    let mut target = sshd.target();
    target.key = Some(stranger.clone());
    let err = SshTransport::connect(target.clone()).await.unwrap_err();
    assert!(err.is_auth_refused(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("user `{}`", sshd.user)), "{msg}");
    assert!(msg.contains(stranger.to_str().unwrap()), "{msg}");

    // The right key for a user the server does not let in: refused the same way.
    let mut target = sshd.target();
    target.user = "nobody".into();
    let err = SshTransport::connect(target).await.unwrap_err();
    assert!(err.is_auth_refused(), "{err}");
}

#[tokio::test]
async fn key_file_problems_are_reported_with_the_file() {
    let sshd = TestSshd::start();
    let mut target = sshd.target();
    target.key = Some(sshd.dir.path().join("no_such_key"));
    let err = SshTransport::connect(target.clone()).await.unwrap_err();
    assert!(matches!(err, SshError::KeyFile { .. }), "{err}");
    assert!(err.to_string().contains("no_such_key"), "{err}");

    let locked = sshd.dir.path().join("locked_key");
    keygen(&locked, "ed25519", "secret passphrase");
    target.key = Some(locked);
    target.agent_socket = None;
    // No agent to fall back to in this process's environment for this check.
    if std::env::var_os("SSH_AUTH_SOCK").is_none() {
        let err = SshTransport::connect(target.clone()).await.unwrap_err();
        assert!(matches!(err, SshError::KeyEncrypted { .. }), "{err}");
        assert!(err.to_string().contains("ssh-add"), "{err}");
    }

    fs::write(sshd.dir.path().join("garbage"), "not a key").unwrap();
    target.key = Some(sshd.dir.path().join("garbage"));
    let err = SshTransport::connect(target).await.unwrap_err();
    assert!(matches!(err, SshError::KeyFile { .. }), "{err}");
}

/// A running `ssh-agent -D` on a socket in `dir`, holding `keys`.
struct Agent {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &std::path::Path, keys: &[&std::path::Path]) -> Agent {
        let socket = dir.join("agent.sock");
        let child = std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ssh-agent (openssh-client)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "ssh-agent did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for key in keys {
            let out = std::process::Command::new("ssh-add")
                .arg(key)
                .env("SSH_AUTH_SOCK", &socket)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Agent { child, socket }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn without_a_key_file_the_keys_of_ssh_agent_are_used() {
    let sshd = TestSshd::start();
    let stranger = sshd.dir.path().join("stranger_key");
    keygen(&stranger, "ed25519", "");
    // The agent offers a key the server does not know first, then the right one.
    let agent = Agent::start(sshd.dir.path(), &[&stranger, &sshd.client_key]);
    let mut target = sshd.target();
    target.key = None;
    target.agent_socket = Some(agent.socket.clone());
    let t = SshTransport::connect(target.clone()).await.unwrap();
    assert_eq!(
        t.run(Command::new("echo ok")).await.unwrap().stdout_str(),
        "ok\n"
    );

    // An agent with only unknown keys: refused, the distinguishable way.
    let dir2 = tempfile::tempdir().unwrap();
    let agent2 = Agent::start(dir2.path(), &[&stranger]);
    target.agent_socket = Some(agent2.socket.clone());
    let err = SshTransport::connect(target.clone()).await.unwrap_err();
    assert!(err.is_auth_refused(), "{err}");
    assert!(err.to_string().contains("ssh-agent"), "{err}");

    // No agent at all.
    target.agent_socket = Some(dir2.path().join("nothing-here.sock"));
    let err = SshTransport::connect(target).await.unwrap_err();
    assert!(matches!(err, SshError::Agent { .. }), "{err}");
}

#[tokio::test]
async fn a_passphrase_protected_key_is_used_through_the_agent_that_holds_it() {
    let sshd = TestSshd::start();
    let locked = sshd.dir.path().join("locked_key");
    keygen(&locked, "ed25519", "");
    // Authorise it, then protect it with a passphrase; the agent got the key while it was open.
    let mut auth = fs::read_to_string(sshd.dir.path().join("authorized_keys")).unwrap();
    auth.push_str(&fs::read_to_string(locked.with_extension("pub")).unwrap());
    fs::write(sshd.dir.path().join("authorized_keys"), auth).unwrap();
    let agent = Agent::start(sshd.dir.path(), &[&locked]);
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", "", "-N", "secret passphrase", "-f"])
        .arg(&locked)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let mut target = sshd.target();
    target.key = Some(locked);
    target.agent_socket = Some(agent.socket.clone());
    SshTransport::connect(target).await.unwrap();
}

#[tokio::test]
async fn connection_failures_name_the_host_and_address() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut target = SshTarget::new("web9", "127.0.0.1", "deploy");
    target.port = port;
    let err = SshTransport::connect(target.clone()).await.unwrap_err();
    assert!(matches!(err, SshError::Connect { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("web9: cannot connect to 127.0.0.1:"),
        "{msg}"
    );

    target.address = "no-such-host.invalid".into();
    let err = SshTransport::connect(target).await.unwrap_err();
    assert!(
        matches!(
            err,
            SshError::Resolve { .. } | SshError::ConnectTimeout { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
}

#[tokio::test]
async fn a_hardened_server_still_accepts_our_client() {
    // The lists of docs/hardening (ssh-audit clean) — exactly what the harden playbook writes.
    let hardened = vec![
        "KexAlgorithms sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org".to_string(),
        "Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr".to_string(),
        "MACs hmac-sha2-512-etm@openssh.com,hmac-sha2-256-etm@openssh.com,umac-128-etm@openssh.com".to_string(),
        "HostKeyAlgorithms ssh-ed25519,rsa-sha2-512,rsa-sha2-256".to_string(),
        "PubkeyAcceptedAlgorithms ssh-ed25519,rsa-sha2-512,rsa-sha2-256".to_string(),
        "MaxAuthTries 3".to_string(),
        "MaxSessions 10".to_string(),
    ];
    let sshd = TestSshd::start_with(SshdOptions {
        extra_config: hardened.clone(),
        ..SshdOptions::default()
    });
    let t = connect(&sshd).await;
    assert_eq!(
        t.run(Command::new("echo ok")).await.unwrap().stdout_str(),
        "ok\n"
    );
    assert!(sshd.log().contains("Accepted publickey"), "{}", sshd.log());

    // An RSA host key and an RSA login key (rsa-sha2-512 only, no SHA-1) work too.
    let sshd = TestSshd::start_with(SshdOptions {
        extra_config: hardened,
        host_key_type: Some("rsa"),
        client_key_type: Some("rsa"),
    });
    let t = connect(&sshd).await;
    assert_eq!(
        t.run(Command::new("echo ok")).await.unwrap().stdout_str(),
        "ok\n"
    );
}

#[tokio::test]
async fn each_hardened_cipher_and_mac_that_russh_implements_is_negotiated() {
    // One server per algorithm, offering only that one: proves the overlap one entry at a time.
    let ciphers = [
        "chacha20-poly1305@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-gcm@openssh.com",
        "aes256-ctr",
        "aes192-ctr",
        "aes128-ctr",
    ];
    for cipher in ciphers {
        let sshd = TestSshd::start_with(SshdOptions {
            extra_config: vec![format!("Ciphers {cipher}")],
            ..SshdOptions::default()
        });
        SshTransport::connect(sshd.target())
            .await
            .unwrap_or_else(|e| panic!("cipher {cipher}: {e}"));
    }
    for mac in [
        "hmac-sha2-512-etm@openssh.com",
        "hmac-sha2-256-etm@openssh.com",
    ] {
        let sshd = TestSshd::start_with(SshdOptions {
            extra_config: vec!["Ciphers aes256-ctr".into(), format!("MACs {mac}")],
            ..SshdOptions::default()
        });
        SshTransport::connect(sshd.target())
            .await
            .unwrap_or_else(|e| panic!("MAC {mac}: {e}"));
    }
    for kex in ["curve25519-sha256", "curve25519-sha256@libssh.org"] {
        let sshd = TestSshd::start_with(SshdOptions {
            extra_config: vec![format!("KexAlgorithms {kex}")],
            ..SshdOptions::default()
        });
        SshTransport::connect(sshd.target())
            .await
            .unwrap_or_else(|e| panic!("KEX {kex}: {e}"));
    }
    // russh has neither umac nor sntrup761: a server offering only those cannot be reached, and the
    // error says which algorithm class had nothing in common.
    let sshd = TestSshd::start_with(SshdOptions {
        extra_config: vec![
            "Ciphers aes256-ctr".into(),
            "MACs umac-128-etm@openssh.com".into(),
        ],
        ..SshdOptions::default()
    });
    let err = SshTransport::connect(sshd.target()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SshError::Handshake { .. }), "{msg}");
    assert!(msg.contains("no common Mac algorithm"), "{msg}");
    assert!(msg.contains("umac-128-etm@openssh.com"), "{msg}");
}

#[tokio::test]
async fn probe_new_connection_succeeds_while_the_server_is_up_and_fails_once_it_is_gone() {
    let mut sshd = TestSshd::start();
    let t = connect(&sshd).await;
    t.probe_new_connection().await.unwrap();
    assert_eq!(
        sshd.log().matches("Accepted publickey").count(),
        2,
        "{}",
        sshd.log()
    );
    sshd.stop();
    let err = t.probe_new_connection().await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("testhost: a new SSH connection fails"),
        "{err}"
    );
    // The established connection died with the server: a run says so instead of hanging.
    let err = tokio::time::timeout(Duration::from_secs(20), t.run(Command::new("true")))
        .await
        .expect("a run on a dead connection must not hang")
        .unwrap_err();
    assert!(matches!(err, TransportError::Disconnected { .. }), "{err}");
}
