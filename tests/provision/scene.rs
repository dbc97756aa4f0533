//! A scratch folder with an inventory for a testbed, and helpers to run the real `cozy` binary on it.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

use crate::testbed::{TestHost, Testbed};

/// A scratch folder with an inventory for a testbed, and the known_hosts file cozy uses.
pub struct Scene {
    pub dir: tempfile::TempDir,
    pub known_hosts: PathBuf,
}

impl Scene {
    /// An inventory where every host logs in as `deploy`, bootstrapped through root with the testbed key.
    pub fn new(tb: &Testbed, extra_hosts: &str) -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let known_hosts = dir.path().join("known_hosts");
        tb.write_known_hosts(&known_hosts);
        let mut hosts = String::new();
        for h in &tb.hosts {
            hosts.push_str(&format!("  {}: {{address: {}}}\n", h.name, h.address));
        }
        hosts.push_str(extra_hosts);
        let inventory = format!(
            "defaults:\n  user: deploy\n  bootstrap_user: root\n  ssh_key: {}\nhosts:\n{hosts}",
            tb.private_key.display()
        );
        std::fs::write(dir.path().join("inventory.yml"), inventory).unwrap();
        Scene { dir, known_hosts }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `cozy provision -i inventory.yml --known-hosts … ARGS`.
    pub fn provision(&self, args: &[&str]) -> Output {
        let inventory = self.path("inventory.yml");
        let mut all = vec![
            "provision",
            "-i",
            inventory.to_str().unwrap(),
            "--known-hosts",
            self.known_hosts.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        cozy(&all)
    }

    /// Like [`Scene::provision`] with `--json`; returns the exit code and the recap.
    pub fn provision_json(&self, args: &[&str]) -> (i32, Value) {
        let out = self.provision(&[args, &["--json"]].concat());
        let recap: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON recap ({e}); stdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), recap)
    }
}

pub fn cozy(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cozy"))
        .args(args)
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run cozy")
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn host_recap<'a>(recap: &'a Value, host: &TestHost) -> &'a Value {
    &recap["hosts"][&host.name]
}
