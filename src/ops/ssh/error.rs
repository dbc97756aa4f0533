//! Why a connection to a host could not be made, one variant per situation the caller can act on.
//!
//! Every message starts with the host's name and says what failed and, where there is one, how to fix
//! it. [`SshError::AuthRefused`] is its own variant so that the runner can retry with the inventory's
//! `bootstrap_user` (a fresh VM only lets root or the cloud user in).

use std::io;
use std::path::PathBuf;

use super::known_hosts::KnownKey;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{host}: cannot resolve `{address}`: {source}")]
    Resolve {
        host: String,
        address: String,
        source: io::Error,
    },

    #[error("{host}: cannot connect to {addr}: {source}")]
    Connect {
        host: String,
        addr: String,
        source: io::Error,
    },

    #[error("{host}: no SSH connection to {addr} within {secs} s ({stage})")]
    ConnectTimeout {
        host: String,
        addr: String,
        secs: u64,
        /// What we were waiting for: "TCP connect", "handshake", "authentication".
        stage: &'static str,
    },

    #[error("{host}: SSH handshake with {addr} failed: {reason}")]
    Handshake {
        host: String,
        addr: String,
        reason: String,
    },

    #[error(
        "{host}: REFUSED: {name} is not in {known_hosts}, so its host key cannot be checked. It offered \
         {algorithm} {fingerprint}. Compare with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the \
         host, then connect once with `--accept-new-host-keys` (the key is then recorded) or add it \
         to the file yourself.",
        known_hosts = .known_hosts.display()
    )]
    HostKeyUnknown {
        host: String,
        /// The name looked up: `address` or `[address]:port`.
        name: String,
        algorithm: String,
        fingerprint: String,
        known_hosts: PathBuf,
    },

    #[error(
        "{host}: REFUSED: the host key of {name} has CHANGED. It offered {offered}, but \
         known_hosts records:\n{}\nEither the host was reinstalled or someone is intercepting the \
         connection. If you know the change is legitimate, remove the old key with `ssh-keygen -R '{name}' \
         -f {known_hosts}` and connect again with accept_new.",
        list_keys(.expected),
        known_hosts = .known_hosts.display()
    )]
    HostKeyChanged {
        host: String,
        name: String,
        /// The offered key: type and fingerprint (`ssh-ed25519 SHA256:…`).
        offered: String,
        expected: Vec<KnownKey>,
        known_hosts: PathBuf,
    },

    #[error(
        "{host}: REFUSED: the host key {fingerprint} of {name} is marked @revoked in {}:{line}",
        .known_hosts.display()
    )]
    HostKeyRevoked {
        host: String,
        name: String,
        fingerprint: String,
        known_hosts: PathBuf,
        line: usize,
    },

    #[error("{host}: known_hosts file {}: {source}", .path.display())]
    KnownHosts {
        host: String,
        path: PathBuf,
        source: io::Error,
    },

    #[error("{host}: cannot use the private key {}: {reason}", .path.display())]
    KeyFile {
        host: String,
        path: PathBuf,
        reason: String,
    },

    #[error(
        "{host}: the private key {} is protected by a passphrase, which cozy does not ask for: load it \
         into ssh-agent (`ssh-add {}`) and leave `key` unset so that the agent is used",
        .path.display(), .path.display()
    )]
    KeyEncrypted { host: String, path: PathBuf },

    #[error("{host}: ssh-agent: {reason}")]
    Agent { host: String, reason: String },

    #[error("{host}: authentication refused for user `{user}` with {tried}")]
    AuthRefused {
        host: String,
        user: String,
        /// What was offered: "key /path/id_ed25519 (SHA256:…)" or "2 keys from ssh-agent".
        tried: String,
    },
}

impl SshError {
    /// Whether the server refused our credentials (as opposed to not being reachable or not trusted):
    /// the one failure where trying another user makes sense.
    pub fn is_auth_refused(&self) -> bool {
        matches!(self, SshError::AuthRefused { .. })
    }
}

fn list_keys(keys: &[KnownKey]) -> String {
    keys.iter()
        .map(|k| format!("  {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}
