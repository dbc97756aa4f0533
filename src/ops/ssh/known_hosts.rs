//! Strict host-key checking against an OpenSSH `known_hosts` file.
//!
//! Our own small reader instead of `russh::keys::known_hosts`: that one splits lines on single spaces,
//! counts line numbers wrongly after comments, does not understand `@revoked`/`@cert-authority` markers
//! or negated patterns, fails the whole file on one unparseable key, and its "key changed" error does not
//! carry the key it expected — which the user needs to see to decide whether the change is legitimate.
//!
//! What a lookup honours, as OpenSSH does: `host` for port 22 and `[host]:port` otherwise; comma-separated
//! patterns with `*`/`?` wildcards and `!negation`; hashed names (`|1|salt|HMAC-SHA1(salt, name)`, what
//! `HashKnownHosts yes` writes); several keys (of several types) per host; `@revoked` keys.
//! `@cert-authority` lines are skipped: cozy does not do host certificates.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{Algorithm, HashAlg, PublicKey};
use sha1::Sha1;

/// A key recorded in a known_hosts file, as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownKey {
    pub path: PathBuf,
    /// 1-based line number in `path`.
    pub line: usize,
    /// `ssh-ed25519`, `rsa-sha2-512`, … (the key's type as written in the file).
    pub algorithm: String,
    /// `SHA256:…`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
}

impl std::fmt::Display for KnownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} ({}:{})",
            self.algorithm,
            self.fingerprint,
            self.path.display(),
            self.line
        )
    }
}

/// What the file says about the key a server offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The offered key is recorded for this host.
    Known,
    /// Nothing is recorded for this host.
    Unknown,
    /// Keys are recorded for this host, but not the offered one. `expected` lists them all (same type
    /// first); when none has the offered key's type the server has dropped the key type we know, which
    /// is treated the same way: a man in the middle would do exactly that.
    Changed { expected: Vec<KnownKey> },
    /// The offered key is marked `@revoked` at this line.
    Revoked { line: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
struct Entry {
    line: usize,
    marker: Marker,
    hosts: String,
    key: PublicKey,
}

/// A parsed known_hosts file (a missing file is an empty one).
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
}

/// The name a host is recorded under: `host` on port 22, `[host]:port` on any other.
pub fn host_port_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    }
}

/// `SHA256:…` of a key, as `ssh-keygen -lf` and `ssh` print it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl KnownHosts {
    /// Reads `path`. A missing file is empty; an unreadable one is an error naming the file.
    pub fn load(path: &Path) -> io::Result<KnownHosts> {
        let text = match fs::read(path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(KnownHosts::parse(path, &text))
    }

    /// Parses the text of a known_hosts file. Lines that cannot be understood (unknown key types,
    /// garbage) are skipped, as OpenSSH does, so one bad line does not lock the user out.
    pub fn parse(path: &Path, text: &str) -> KnownHosts {
        let entries = text
            .lines()
            .enumerate()
            .filter_map(|(i, line)| parse_line(i + 1, line))
            .collect();
        KnownHosts {
            path: path.to_path_buf(),
            entries,
        }
    }

    fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.entries
            .iter()
            .filter(move |e| hosts_field_matches(&e.hosts, name))
    }

    /// The key types recorded for the host: the client should ask the server for these first, so that a
    /// host with several keys presents one we can check.
    pub fn known_algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
        let name = host_port_name(host, port);
        let mut algos: Vec<Algorithm> = Vec::new();
        for e in self.matching(&name).filter(|e| e.marker == Marker::None) {
            let a = e.key.algorithm();
            if !algos.contains(&a) {
                algos.push(a);
            }
        }
        algos
    }

    /// Judges the key `offered` by `host:port`.
    pub fn check(&self, host: &str, port: u16, offered: &PublicKey) -> Verdict {
        let name = host_port_name(host, port);
        let mut known = false;
        let mut same_type = Vec::new();
        let mut other_type = Vec::new();
        for e in self.matching(&name) {
            let equal = e.key.key_data() == offered.key_data();
            match e.marker {
                Marker::Revoked if equal => return Verdict::Revoked { line: e.line },
                Marker::Revoked | Marker::CertAuthority => {}
                Marker::None if equal => known = true,
                Marker::None => {
                    let k = self.known_key(e);
                    if e.key.algorithm() == offered.algorithm() {
                        same_type.push(k);
                    } else {
                        other_type.push(k);
                    }
                }
            }
        }
        if known {
            Verdict::Known
        } else if same_type.is_empty() && other_type.is_empty() {
            Verdict::Unknown
        } else {
            same_type.extend(other_type);
            Verdict::Changed {
                expected: same_type,
            }
        }
    }

    fn known_key(&self, e: &Entry) -> KnownKey {
        KnownKey {
            path: self.path.clone(),
            line: e.line,
            algorithm: e.key.algorithm().to_string(),
            fingerprint: fingerprint(&e.key),
        }
    }
}

/// Serialises appends from concurrent connections (several new hosts at once) within this process.
static APPEND_LOCK: Mutex<()> = Mutex::new(());

/// Records `key` for `host:port` at the end of `path` (unhashed, so the user can see what cozy added),
/// creating the directory (0700) and the file (0600) when missing. A key already recorded is not
/// written twice.
pub fn append(path: &Path, host: &str, port: u16, key: &PublicKey) -> io::Result<()> {
    let _guard = APPEND_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if KnownHosts::load(path)?.check(host, port, key) == Verdict::Known {
        return Ok(());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    let existing = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut line = String::new();
    if existing.last().is_some_and(|&b| b != b'\n') {
        line.push('\n');
    }
    let openssh = key
        .to_openssh()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    // `to_openssh` appends the comment, if any; known_hosts lines carry none of ours.
    let mut parts = openssh.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "cannot encode the host key",
        ));
    };
    line.push_str(&format!("{} {kind} {blob}\n", host_port_name(host, port)));
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_all()
}

fn parse_line(line_no: usize, line: &str) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let kind = fields.next()?;
    let blob = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{kind} {blob}")).ok()?;
    Some(Entry {
        line: line_no,
        marker,
        hosts: first.to_string(),
        key,
    })
}

/// Whether the hosts field of a line (`name,name2,!bad,*.example.org` or one `|1|…` hash) matches
/// `name` (already `[host]:port`-formatted and lower-cased). A matching negation vetoes the line.
fn hosts_field_matches(field: &str, name: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        return hashed_matches(hashed, name);
    }
    let mut positive = false;
    for pattern in field.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob(&negated.to_ascii_lowercase(), name) {
                return false;
            }
        } else if glob(&pattern.to_ascii_lowercase(), name) {
            positive = true;
        }
    }
    positive
}

/// `salt|hash` (both base64): HMAC-SHA1 keyed with the salt over the name.
fn hashed_matches(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (BASE64.decode(salt), BASE64.decode(hash)) else {
        return false;
    };
    let Ok(mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// OpenSSH's pattern match: `*` any run of characters, `?` exactly one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn hashed_name(salt: &[u8], name: &str) -> String {
        let mac = <Hmac<Sha1> as KeyInit>::new_from_slice(salt)
            .unwrap()
            .chain_update(name.as_bytes());
        format!(
            "|1|{}|{}",
            BASE64.encode(salt),
            BASE64.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn a_key_recorded_under_the_bracketed_port_name_is_known_only_on_that_port() {
        let kh = KnownHosts::parse(
            Path::new("kh"),
            &format!("# comment\n\n[10.0.0.5]:2222 {ED_A}\n"),
        );
        assert_eq!(kh.check("10.0.0.5", 2222, &key(ED_A)), Verdict::Known);
        assert_eq!(kh.check("10.0.0.5", 22, &key(ED_A)), Verdict::Unknown);
        assert_eq!(kh.check("10.0.0.6", 2222, &key(ED_A)), Verdict::Unknown);
    }

    #[test]
    fn a_different_key_for_a_known_host_is_a_change_that_names_the_line() {
        let kh = KnownHosts::parse(
            Path::new("/home/u/.ssh/known_hosts"),
            &format!("# one\n# two\nweb1,10.0.0.5 {ED_A}\n"),
        );
        let Verdict::Changed { expected } = kh.check("web1", 22, &key(ED_B)) else {
            panic!("expected a change");
        };
        assert_eq!(expected.len(), 1);
        assert_eq!(expected[0].line, 3);
        assert_eq!(expected[0].fingerprint, fingerprint(&key(ED_A)));
        assert!(expected[0].fingerprint.starts_with("SHA256:"));
        assert!(expected[0]
            .to_string()
            .ends_with("(/home/u/.ssh/known_hosts:3)"));
    }

    #[test]
    fn hashed_entries_match_the_hmac_of_the_name() {
        let text = format!(
            "{} {ED_A}\n{} {ED_A}\n",
            hashed_name(b"0123456789abcdefghij", "[db1]:2200"),
            hashed_name(b"salt-salt-salt-salt-", "web1")
        );
        let kh = KnownHosts::parse(Path::new("kh"), &text);
        assert_eq!(kh.check("db1", 2200, &key(ED_A)), Verdict::Known);
        assert_eq!(kh.check("WEB1", 22, &key(ED_A)), Verdict::Known);
        assert_eq!(kh.check("db1", 22, &key(ED_A)), Verdict::Unknown);
        assert!(matches!(
            kh.check("web1", 22, &key(ED_B)),
            Verdict::Changed { .. }
        ));
    }

    #[test]
    fn a_hashed_entry_written_by_ssh_keygen_is_understood() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        fs::write(&path, format!("[127.0.0.1]:2022 {ED_A}\n")).unwrap();
        let status = std::process::Command::new("ssh-keygen")
            .arg("-H")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("ssh-keygen (openssh-client) must be installed for this test");
        assert!(status.success());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("|1|"), "{text}");
        let kh = KnownHosts::load(&path).unwrap();
        assert_eq!(kh.check("127.0.0.1", 2022, &key(ED_A)), Verdict::Known);
        assert_eq!(kh.check("127.0.0.1", 2023, &key(ED_A)), Verdict::Unknown);
    }

    #[test]
    fn several_key_types_per_host_and_a_dropped_type_counts_as_a_change() {
        let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDGtQ6E7hEz8lurxm/LW8YjZliQoiH4/h+GbGbn8yxs7j6e8B/3qSYEfPndpUFDP+mob2eQ/fczFnUL6oM2XltysO3IPcAfYD88ZYTf50q7DQic4i+gpsF2X9UKB7cfpoxC5wl6H+y279t9SldR6n0X2jGzJJB5KbXfbdhwPr+gWQ==";
        let rsa_key = key(rsa);
        let kh = KnownHosts::parse(Path::new("kh"), &format!("h {rsa}\nh {ED_A}\n"));
        assert_eq!(kh.check("h", 22, &rsa_key), Verdict::Known);
        assert_eq!(kh.check("h", 22, &key(ED_A)), Verdict::Known);
        assert_eq!(
            kh.known_algorithms("h", 22),
            vec![rsa_key.algorithm(), key(ED_A).algorithm()]
        );
        let only_rsa = KnownHosts::parse(Path::new("kh"), &format!("h {rsa}\n"));
        let Verdict::Changed { expected } = only_rsa.check("h", 22, &key(ED_B)) else {
            panic!("a host that stops offering its known key type must not pass");
        };
        assert_eq!(expected[0].algorithm, "ssh-rsa");
    }

    #[test]
    fn patterns_wildcards_negations_and_markers() {
        let text = format!(
            "*.example.org,!evil.example.org {ED_A}\n@revoked * {ED_B}\n@cert-authority * {ED_A}\nbogus-line\nx ssh-ed25519 notbase64\n"
        );
        let kh = KnownHosts::parse(Path::new("kh"), &text);
        assert_eq!(kh.check("web.example.org", 22, &key(ED_A)), Verdict::Known);
        assert_eq!(
            kh.check("evil.example.org", 22, &key(ED_A)),
            Verdict::Unknown
        );
        assert_eq!(
            kh.check("anything", 22, &key(ED_B)),
            Verdict::Revoked { line: 2 }
        );
        assert!(glob("web?.lan", "web1.lan"));
        assert!(!glob("web?.lan", "web12.lan"));
        assert!(glob("*", "[h]:22"));
    }

    #[test]
    fn append_creates_private_file_and_directory_and_does_not_duplicate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/.ssh/known_hosts");
        append(&path, "h1", 2022, &key(ED_A)).unwrap();
        append(&path, "h1", 2022, &key(ED_A)).unwrap();
        append(&path, "h2", 22, &key(ED_B)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("[h1]:2022 {ED_A}\nh2 {ED_B}\n"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let kh = KnownHosts::load(&path).unwrap();
        assert_eq!(kh.check("h1", 2022, &key(ED_A)), Verdict::Known);
    }

    #[test]
    fn append_adds_a_newline_when_the_file_lacks_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        fs::write(&path, format!("h0 {ED_B}")).unwrap();
        append(&path, "h1", 22, &key(ED_A)).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("h0 {ED_B}\nh1 {ED_A}\n")
        );
    }
}
