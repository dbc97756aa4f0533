//! Real Debian 12 test hosts for these tests, through `tests/testbed/testbed` (systemd-nspawn, each in
//! its own network namespace, with sshd, systemd, apt and nftables). A [`Testbed`] is torn down when
//! dropped, also when the test panics; if the test process is killed, the next `testbed up` reaps it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Deserialize;

/// One booted test host.
#[derive(Debug, Clone, Deserialize)]
pub struct TestHost {
    pub name: String,
    pub address: String,
    /// Its host keys as known_hosts lines.
    pub known_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct UpOutput {
    name: String,
    private_key: PathBuf,
    public_key: PathBuf,
    hosts: Vec<TestHost>,
}

/// Some test hosts, torn down on drop.
#[derive(Debug)]
pub struct Testbed {
    pub name: String,
    pub hosts: Vec<TestHost>,
    /// The key root's authorized_keys holds on every host.
    pub private_key: PathBuf,
    pub public_key: PathBuf,
}

pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testbed/testbed")
}

impl Testbed {
    /// Boots `count` fresh hosts (a few seconds once the base image is cached).
    pub fn up(count: usize) -> Testbed {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new(script())
            .args([
                "up",
                "--name",
                &name,
                "--count",
                &count.to_string(),
                "--json",
            ])
            .args(["--owner", &std::process::id().to_string()])
            .output()
            .expect("run tests/testbed/testbed");
        assert!(
            out.status.success(),
            "testbed up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let up: UpOutput = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "testbed up printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        Testbed {
            name: up.name,
            hosts: up.hosts,
            private_key: up.private_key,
            public_key: up.public_key,
        }
    }

    /// Runs `script` as root inside `host` without SSH: the ground truth the tests compare with.
    pub fn exec(&self, host: &TestHost, cmd: &str) -> Output {
        Command::new(script())
            .args(["exec", &host.name, "sh", "-c", cmd])
            .output()
            .expect("run testbed exec")
    }

    /// Like [`Testbed::exec`], and the command must succeed; returns its stdout.
    pub fn exec_ok(&self, host: &TestHost, cmd: &str) -> String {
        let out = self.exec(host, cmd);
        assert!(
            out.status.success(),
            "on {}: `{cmd}` failed: {}{}",
            host.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A known_hosts file trusting every host of this testbed.
    pub fn write_known_hosts(&self, path: &Path) {
        let lines: Vec<&str> = self
            .hosts
            .iter()
            .flat_map(|h| h.known_hosts.iter().map(String::as_str))
            .collect();
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", "--name", &self.name])
            .output();
    }
}
