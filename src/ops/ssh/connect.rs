//! Opening one authenticated SSH connection: resolve, TCP connect, handshake with strict host-key
//! checking, then public-key authentication with a key file or ssh-agent.
//!
//! Used both for the long-lived connection of [`super::SshTransport`] and for
//! [`super::SshTransport::probe_new_connection`], which must prove that a *new* login still works.
//!
//! Algorithms: russh 0.65 has no `sntrup761x25519-sha512@openssh.com` and no `umac-*`, so against the
//! hardened server lists (docs/hardening) we meet on `curve25519-sha256`, any of its ciphers but with
//! `umac-128-etm` unusable, on `hmac-sha2-{512,256}-etm` for the CTR ciphers, and on `ssh-ed25519` or
//! `rsa-sha2-{512,256}` host keys. We offer `mlkem768x25519-sha256` first for servers that have it
//! (OpenSSH ≥ 9.9). Nothing weaker than the defaults of OpenSSH 9 is offered: no SHA-1 anything, no CBC,
//! no 2048-bit DH groups, no compression.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, AuthResult, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{
    Algorithm, EcdsaCurve, HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::{cipher, kex, mac, Preferred};
use tokio::net::TcpStream;

use super::error::SshError;
use super::known_hosts::{self, KnownHosts, Verdict};
use super::SshTarget;

/// How often to ping a silent server, and how many unanswered pings mean it is gone: a host that
/// vanished (powered off, firewalled) is noticed within about a minute instead of never.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_MAX: usize = 4;

const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::DH_GEX_SHA256,
    kex::DH_G18_SHA512,
    kex::DH_G16_SHA512,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
];

const CIPHERS: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];

const MACS: &[mac::Name] = &[
    mac::HMAC_SHA512_ETM,
    mac::HMAC_SHA256_ETM,
    mac::HMAC_SHA512,
    mac::HMAC_SHA256,
];

const HOST_KEYS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
];

/// The client configuration. `known` are the key types known_hosts holds for the host: they are asked
/// for first (as OpenSSH does), so that a host with several keys shows us one we can check.
pub(crate) fn client_config(known: &[Algorithm]) -> client::Config {
    let is_known = |a: &Algorithm| {
        known.iter().any(|k| match (k, a) {
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            (k, a) => k == a,
        })
    };
    let mut keys: Vec<Algorithm> = HOST_KEYS.iter().filter(|a| is_known(a)).cloned().collect();
    keys.extend(HOST_KEYS.iter().filter(|a| !is_known(a)).cloned());
    client::Config {
        preferred: Preferred {
            kex: Cow::Borrowed(KEX),
            key: Cow::Owned(keys),
            host_key_certificates: Cow::Borrowed(&[]),
            cipher: Cow::Borrowed(CIPHERS),
            mac: Cow::Borrowed(MACS),
            compression: Cow::Borrowed(&[russh::compression::NONE]),
        },
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        // An idle connection is fine: a host waits while the others of its play finish.
        inactivity_timeout: None,
        nodelay: true,
        ..client::Config::default()
    }
}

/// The russh event handler of one connection: judges the host key and remembers why the server went
/// away, so that errors can say more than "disconnected".
pub(crate) struct ClientHandler {
    host: String,
    address: String,
    port: u16,
    known_hosts: PathBuf,
    accept_new: bool,
    /// Set when we refused the host key: the precise error for the caller.
    rejection: Arc<Mutex<Option<SshError>>>,
    /// Set when the connection ended: why.
    pub(crate) disconnect: Arc<Mutex<Option<String>>>,
}

impl ClientHandler {
    fn judge(&self, offered: &PublicKey) -> Result<(), SshError> {
        let path = &self.known_hosts;
        let kh = KnownHosts::load(path).map_err(|source| SshError::KnownHosts {
            host: self.host.clone(),
            path: path.clone(),
            source,
        })?;
        let name = known_hosts::host_port_name(&self.address, self.port);
        let algorithm = offered.algorithm().to_string();
        let fingerprint = known_hosts::fingerprint(offered);
        match kh.check(&self.address, self.port, offered) {
            Verdict::Known => Ok(()),
            Verdict::Unknown if self.accept_new => {
                known_hosts::append(path, &self.address, self.port, offered).map_err(|source| {
                    SshError::KnownHosts {
                        host: self.host.clone(),
                        path: path.clone(),
                        source,
                    }
                })?;
                tracing::info!(host = %self.host, %name, %fingerprint, path = %path.display(),
                    "new host key recorded in known_hosts");
                Ok(())
            }
            Verdict::Unknown => Err(SshError::HostKeyUnknown {
                host: self.host.clone(),
                name,
                algorithm,
                fingerprint,
                known_hosts: path.clone(),
            }),
            Verdict::Changed { expected } => Err(SshError::HostKeyChanged {
                host: self.host.clone(),
                name,
                offered: format!("{algorithm} {fingerprint}"),
                expected,
                known_hosts: path.clone(),
            }),
            Verdict::Revoked { line } => Err(SshError::HostKeyRevoked {
                host: self.host.clone(),
                name,
                fingerprint,
                known_hosts: path.clone(),
                line,
            }),
        }
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let verdict = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.judge(key),
            // We never advertise certificate algorithms, so a certificate here is a protocol oddity.
            PublicKeyOrCertificate::Certificate(cert) => Err(SshError::Handshake {
                host: self.host.clone(),
                addr: self.address.clone(),
                reason: format!(
                    "the server presented a host certificate ({}) although none was asked for",
                    cert.algorithm()
                ),
            }),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(e) => {
                *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                Ok(false)
            }
        }
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let (text, result) = match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => (
                format!(
                    "the server closed the connection ({:?}: {})",
                    info.reason_code, info.message
                ),
                Ok(()),
            ),
            client::DisconnectReason::Error(e) => (describe(&e), Err(e)),
        };
        *self.disconnect.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
        result
    }
}

/// russh's errors, in words a user can act on.
pub(crate) fn describe(e: &russh::Error) -> String {
    match e {
        russh::Error::NoCommonAlgo { kind, ours, theirs } => format!(
            "no common {kind:?} algorithm: cozy offers [{}], the server offers [{}]; the server's \
             sshd_config allows nothing that cozy's SSH client (russh) implements",
            ours.join(", "),
            theirs.join(", ")
        ),
        russh::Error::KeepaliveTimeout => {
            "the host stopped answering (no reply to keepalives)".to_string()
        }
        russh::Error::HUP | russh::Error::Disconnect => {
            "the connection was closed by the host".to_string()
        }
        russh::Error::IO(io) => format!("I/O error: {io}"),
        other => other.to_string(),
    }
}

/// Opens, verifies and authenticates a new connection to `target`, all within its connect timeout.
pub(crate) async fn establish(
    target: &SshTarget,
) -> Result<(Handle<ClientHandler>, Arc<Mutex<Option<String>>>), SshError> {
    let started = Instant::now();
    let limit = target.connect_timeout;
    let host = target.name.clone();
    let remaining = |stage: &'static str, addr: &str| {
        limit
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| SshError::ConnectTimeout {
                host: host.clone(),
                addr: addr.to_string(),
                secs: limit.as_secs(),
                stage,
            })
    };
    let display_addr = format!("{}:{}", target.address, target.port);

    let known = KnownHosts::load(&target.known_hosts).map_err(|source| SshError::KnownHosts {
        host: host.clone(),
        path: target.known_hosts.clone(),
        source,
    })?;
    let config = Arc::new(client_config(
        &known.known_algorithms(&target.address, target.port),
    ));

    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        remaining("name resolution", &display_addr)?,
        tokio::net::lookup_host((target.address.as_str(), target.port)),
    )
    .await
    .map_err(|_| SshError::ConnectTimeout {
        host: host.clone(),
        addr: display_addr.clone(),
        secs: limit.as_secs(),
        stage: "name resolution",
    })?
    .map_err(|source| SshError::Resolve {
        host: host.clone(),
        address: target.address.clone(),
        source,
    })?
    .collect();

    let stream = connect_tcp(target, &addrs, &display_addr, &remaining).await?;
    let addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or(display_addr);

    let rejection = Arc::new(Mutex::new(None));
    let disconnect = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        host: host.clone(),
        address: target.address.clone(),
        port: target.port,
        known_hosts: target.known_hosts.clone(),
        accept_new: target.accept_new,
        rejection: rejection.clone(),
        disconnect: disconnect.clone(),
    };
    let handshake = tokio::time::timeout(
        remaining("handshake", &addr)?,
        client::connect_stream(config, stream, handler),
    )
    .await
    .map_err(|_| SshError::ConnectTimeout {
        host: host.clone(),
        addr: addr.clone(),
        secs: limit.as_secs(),
        stage: "handshake",
    })?;
    let mut handle = match handshake {
        Ok(handle) => handle,
        Err(e) => {
            if let Some(refused) = rejection.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(refused);
            }
            return Err(SshError::Handshake {
                host,
                addr,
                reason: describe(&e),
            });
        }
    };

    tokio::time::timeout(
        remaining("authentication", &addr)?,
        authenticate(&mut handle, target, &addr),
    )
    .await
    .map_err(|_| SshError::ConnectTimeout {
        host: host.clone(),
        addr: addr.clone(),
        secs: limit.as_secs(),
        stage: "authentication",
    })??;
    Ok((handle, disconnect))
}

async fn connect_tcp(
    target: &SshTarget,
    addrs: &[SocketAddr],
    display_addr: &str,
    remaining: &impl Fn(&'static str, &str) -> Result<Duration, SshError>,
) -> Result<TcpStream, SshError> {
    let mut last = None;
    for addr in addrs {
        let shown = addr.to_string();
        match tokio::time::timeout(remaining("TCP connect", &shown)?, TcpStream::connect(addr))
            .await
        {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(source)) => {
                last = Some(SshError::Connect {
                    host: target.name.clone(),
                    addr: shown,
                    source,
                })
            }
            Err(_) => {
                last = Some(SshError::ConnectTimeout {
                    host: target.name.clone(),
                    addr: shown,
                    secs: target.connect_timeout.as_secs(),
                    stage: "TCP connect",
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| SshError::Resolve {
        host: target.name.clone(),
        address: display_addr.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// RSA keys sign with the best hash the server accepts (never SHA-1 unless it accepts nothing else).
async fn rsa_hash(handle: &Handle<ClientHandler>, key: &Algorithm) -> Option<HashAlg> {
    if !matches!(key, Algorithm::Rsa { .. }) {
        return None;
    }
    match handle.best_supported_rsa_hash().await {
        Ok(Some(hash)) => hash,
        // No server-sig-algs: every OpenSSH since 7.2 accepts rsa-sha2-512.
        _ => Some(HashAlg::Sha512),
    }
}

async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    target: &SshTarget,
    addr: &str,
) -> Result<(), SshError> {
    let host = &target.name;
    let auth_error = |e: russh::Error| SshError::Handshake {
        host: host.clone(),
        addr: addr.to_string(),
        reason: format!("during authentication: {}", describe(&e)),
    };
    let Some(path) = &target.key else {
        return authenticate_with_agent(handle, target, addr, None).await;
    };
    let key = match russh::keys::load_secret_key(path, None) {
        Ok(key) => key,
        Err(russh::keys::Error::KeyIsEncrypted) => {
            // The agent may hold it (ssh-add): use it when there is one, as ssh does.
            if agent_socket(target).is_some() {
                let public = std::fs::read_to_string(pub_path(path))
                    .ok()
                    .and_then(|s| PublicKey::from_openssh(s.trim()).ok());
                if let Some(public) = public {
                    return authenticate_with_agent(handle, target, addr, Some(public)).await;
                }
            }
            return Err(SshError::KeyEncrypted {
                host: host.clone(),
                path: path.clone(),
            });
        }
        Err(russh::keys::Error::IO(e)) => {
            return Err(SshError::KeyFile {
                host: host.clone(),
                path: path.clone(),
                reason: e.to_string(),
            })
        }
        Err(e) => {
            return Err(SshError::KeyFile {
                host: host.clone(),
                path: path.clone(),
                reason: format!("not a private key cozy can read ({e})"),
            })
        }
    };
    let hash = rsa_hash(handle, &key.algorithm()).await;
    let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
    let result = handle
        .authenticate_publickey(
            target.user.clone(),
            PrivateKeyWithHashAlg::new(Arc::new(key), hash),
        )
        .await
        .map_err(auth_error)?;
    match result {
        AuthResult::Success => Ok(()),
        AuthResult::Failure { .. } => Err(SshError::AuthRefused {
            host: host.clone(),
            user: target.user.clone(),
            tried: format!("key {} ({fingerprint})", path.display()),
        }),
    }
}

fn pub_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn agent_socket(target: &SshTarget) -> Option<PathBuf> {
    target.agent_socket.clone().or_else(|| {
        std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    })
}

/// Tries the agent's keys in turn (only `only`, when given).
async fn authenticate_with_agent(
    handle: &mut Handle<ClientHandler>,
    target: &SshTarget,
    addr: &str,
    only: Option<PublicKey>,
) -> Result<(), SshError> {
    let host = &target.name;
    let agent_error = |reason: String| SshError::Agent {
        host: host.clone(),
        reason,
    };
    let Some(socket) = agent_socket(target) else {
        return Err(agent_error(
            "no key file is configured (`ssh_key` in the inventory) and no ssh-agent is running \
             ($SSH_AUTH_SOCK is not set)"
                .into(),
        ));
    };
    let mut agent = AgentClient::connect_uds(&socket).await.map_err(|e| {
        agent_error(format!(
            "cannot reach the agent at {} ($SSH_AUTH_SOCK): {e}",
            socket.display()
        ))
    })?;
    if let Some(binding) = handle.agent_session_binding() {
        // Lets OpenSSH's agent use destination-constrained keys; older agents refuse, which is fine.
        let _ = agent.bind_session(binding, false).await;
    }
    let identities = agent
        .request_identities()
        .await
        .map_err(|e| agent_error(format!("cannot list its keys: {e}")))?;
    let keys: Vec<PublicKey> = identities
        .into_iter()
        .filter_map(|id| match id {
            AgentIdentity::PublicKey { key, .. } => Some(key),
            AgentIdentity::Certificate { .. } => None,
        })
        .filter(|k| only.as_ref().is_none_or(|o| o.key_data() == k.key_data()))
        .collect();
    if keys.is_empty() {
        return Err(agent_error(match &only {
            Some(k) => format!(
                "the key {} is not loaded (`ssh-add` it)",
                k.fingerprint(HashAlg::Sha256)
            ),
            None => "the agent holds no keys (add one with `ssh-add`)".into(),
        }));
    }
    let mut tried = Vec::new();
    for key in keys {
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let hash = rsa_hash(handle, &key.algorithm()).await;
        let result = handle
            .authenticate_publickey_with(target.user.clone(), key, hash, &mut agent)
            .await;
        tried.push(fingerprint.clone());
        match result {
            Ok(AuthResult::Success) => return Ok(()),
            Ok(AuthResult::Failure { .. }) => {}
            Err(e) => {
                if handle.is_closed() {
                    break;
                }
                tracing::debug!(host = %host, %addr, %fingerprint, "agent could not sign: {e}");
            }
        }
    }
    Err(SshError::AuthRefused {
        host: host.clone(),
        user: target.user.clone(),
        tried: format!(
            "{} key(s) from ssh-agent ({})",
            tried.len(),
            tried.join(", ")
        ),
    })
}
