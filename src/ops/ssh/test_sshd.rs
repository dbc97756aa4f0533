//! A real OpenSSH server for tests: `/usr/sbin/sshd -D -e` on 127.0.0.1 and a free port, with its own
//! host key, a client key pair and an authorized_keys file in a temporary directory. No mocks: what
//! passes here talks to the same sshd the provisioned hosts run.
//!
//! It needs `openssh-server` and `openssh-client` (`apt-get install -y openssh-server openssh-client`);
//! without them the tests fail and say so, rather than pass without testing anything.

use std::fs;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::SshTarget;

const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd; stopped (with every connection it serves) when dropped.
pub(crate) struct TestSshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The login user: whoever runs the tests (sshd as non-root can only log that user in).
    pub user: String,
    /// Private key accepted by the server.
    pub client_key: PathBuf,
    /// The host key's public half.
    pub host_key_pub: PathBuf,
    child: Option<Child>,
}

/// How to configure the server.
#[derive(Default, Clone)]
pub(crate) struct SshdOptions {
    /// `ssh-keygen -t` of the host key: "ed25519" by default.
    pub host_key_type: Option<&'static str>,
    /// Extra sshd_config lines (algorithm lists, limits).
    pub extra_config: Vec<String>,
    /// `ssh-keygen -t` of the client key: "ed25519" by default.
    pub client_key_type: Option<&'static str>,
}

/// Runs `ssh-keygen` to make a key pair without passphrase at `path`.
pub(crate) fn keygen(path: &Path, kind: &str, passphrase: &str) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", "cozy-test", "-f"])
        .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "3072"]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen must be installed (apt-get install -y openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `SHA256:…` of a public key file, as ssh-keygen prints it: an independent check of our fingerprints.
pub(crate) fn keygen_fingerprint(pub_file: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_file)
        .output()
        .expect("ssh-keygen");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected ssh-keygen -l output: {text}"))
        .to_string()
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl TestSshd {
    pub fn start() -> TestSshd {
        TestSshd::start_with(SshdOptions::default())
    }

    pub fn start_with(opts: SshdOptions) -> TestSshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: the SSH tests need a real OpenSSH server \
             (apt-get install -y openssh-server openssh-client)"
        );
        let dir = tempfile::tempdir().unwrap();
        let host_key = dir.path().join("host_key");
        keygen(&host_key, opts.host_key_type.unwrap_or("ed25519"), "");
        let client_key = dir.path().join("client_key");
        keygen(&client_key, opts.client_key_type.unwrap_or("ed25519"), "");
        fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .unwrap();
        let user = current_user();
        let mut sshd = TestSshd {
            port: 0,
            user,
            client_key,
            host_key_pub: dir.path().join("host_key.pub"),
            child: None,
            dir,
        };
        sshd.launch(&opts.extra_config);
        sshd
    }

    fn launch(&mut self, extra: &[String]) {
        // sshd run as root insists on its privilege-separation directory.
        if current_user() == "root" {
            let _ = fs::create_dir_all("/run/sshd");
        }
        let d = self.dir.path();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel VERBOSE\n{extra}\n",
            hk = d.join("host_key").display(),
            d = d.display(),
            user = self.user,
            extra = extra.join("\n"),
        );
        let config_path = d.join("sshd_config");
        fs::write(&config_path, config).unwrap();
        let check = Command::new(SSHD)
            .arg("-t")
            .arg("-f")
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "sshd -t rejects the test config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.child = Some(child);
        self.port = port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on port {port}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// A target for this server with the client key, a known_hosts in the temp dir, unknown hosts
    /// accepted (tests of host-key checking change that).
    pub fn target(&self) -> SshTarget {
        let mut t = SshTarget::new("testhost", "127.0.0.1", self.user.clone());
        t.port = self.port;
        t.key = Some(self.client_key.clone());
        t.known_hosts = self.dir.path().join("known_hosts");
        t.accept_new = true;
        t.connect_timeout = Duration::from_secs(10);
        t.command_timeout = Duration::from_secs(60);
        t
    }

    /// Stops the server and every connection it serves.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // sshd puts each connection in a session of its own (setsid), so killing the listener's
            // process group is not enough: kill its descendants, found through /proc, too.
            let mut pids = descendants(child.id());
            pids.push(child.id());
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(pids.iter().map(u32::to_string))
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
        }
    }
}

/// All processes below `root` (by parent pid, from /proc/*/stat).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may contain spaces, so parse after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for TestSshd {
    fn drop(&mut self) {
        self.stop();
    }
}
