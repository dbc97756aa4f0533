//! The SSH transport: one russh connection per host, a new session channel for every command.
//!
//! Why this shape: a playbook runs hundreds of small commands per host, so paying for a TCP connection,
//! a key exchange and an authentication for each (as Ansible does without ControlPersist) would dominate
//! the run time. Channels are cheap and independent, so concurrent [`Transport::run`] calls on one host are
//! fine; a semaphore keeps them below sshd's `MaxSessions` (10 by default and in our hardening).
//!
//! - [`connect`] opens and authenticates a connection (also used by
//!   [`Transport::probe_new_connection`], which must prove that a *new* login still works after a
//!   firewall or sshd change).
//! - [`known_hosts`] is the strict host-key check against an OpenSSH `known_hosts` file.
//! - [`SshError`] says why a connection could not be made; failures of a running command are
//!   [`TransportError`]s.
//!
//! Commands run as `sh -c '<script>'` in the login user's shell; with `become_root` and a login user
//! other than root, as `sudo -n -H sh -c '<script>'` (`-n`: never prompt — a password prompt would
//! hang a non-interactive run, so it is reported as [`TransportError::SudoRefused`] instead).

mod connect;
mod error;
pub mod known_hosts;

#[cfg(test)]
pub(crate) mod test_sshd;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use russh::client::Handle;
use russh::{ChannelMsg, Disconnect, Sig};
use tokio::sync::Semaphore;

use self::connect::ClientHandler;
pub use self::error::SshError;
use crate::ops::transport::{quote, Command, Output, Transport, TransportError};

/// At most this many commands at once on one connection: sshd refuses channels beyond `MaxSessions`.
const MAX_CHANNELS: usize = 8;

/// Where and how to connect to one host.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// The host's name in messages (the inventory name).
    pub name: String,
    /// Host name or IP address to connect to; also the name looked up in known_hosts.
    pub address: String,
    pub port: u16,
    /// The login user.
    pub user: String,
    /// Private key file; `None`: the keys of ssh-agent (`$SSH_AUTH_SOCK`, or [`Self::agent_socket`]).
    pub key: Option<PathBuf>,
    /// The ssh-agent socket to use instead of `$SSH_AUTH_SOCK` (tests, or several agents).
    pub agent_socket: Option<PathBuf>,
    /// The OpenSSH known_hosts file that host keys are checked against.
    pub known_hosts: PathBuf,
    /// Record the key of a host that is not in known_hosts yet (a changed key is refused regardless).
    pub accept_new: bool,
    /// Limit for resolving, connecting, the handshake and authentication together.
    pub connect_timeout: Duration,
    /// Limit for one command when the [`Command`] sets none.
    pub command_timeout: Duration,
}

impl SshTarget {
    /// A target with the defaults: port 22, ssh-agent, `~/.ssh/known_hosts`, unknown hosts refused,
    /// 15 s to connect, 10 min per command.
    pub fn new(
        name: impl Into<String>,
        address: impl Into<String>,
        user: impl Into<String>,
    ) -> Self {
        SshTarget {
            name: name.into(),
            address: address.into(),
            port: 22,
            user: user.into(),
            key: None,
            agent_socket: None,
            known_hosts: default_known_hosts(),
            accept_new: false,
            connect_timeout: Duration::from_secs(15),
            command_timeout: Duration::from_secs(600),
        }
    }
}

/// `~/.ssh/known_hosts` (`./.ssh/known_hosts` when there is no `$HOME`).
pub fn default_known_hosts() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".ssh")
        .join("known_hosts")
}

/// An open, authenticated connection to one host.
pub struct SshTransport {
    target: SshTarget,
    handle: Handle<ClientHandler>,
    channels: Semaphore,
    /// Why the connection ended, when it did (filled in by the handler).
    disconnect: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for SshTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTransport")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl SshTransport {
    /// Connects, checks the host key and logs in.
    pub async fn connect(target: SshTarget) -> Result<SshTransport, SshError> {
        let (handle, disconnect) = connect::establish(&target).await?;
        Ok(SshTransport {
            target,
            handle,
            channels: Semaphore::new(MAX_CHANNELS),
            disconnect,
        })
    }

    pub fn target(&self) -> &SshTarget {
        &self.target
    }

    /// Says goodbye to the server. Dropping the transport also ends the connection, less politely.
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "cozy is done", "en")
            .await;
    }

    fn lost(&self, fallback: impl Into<String>) -> TransportError {
        let reason = self
            .disconnect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| fallback.into());
        TransportError::Disconnected {
            host: self.target.name.clone(),
            reason,
        }
    }

    /// The command line sent to the server for `cmd`.
    fn command_line(&self, cmd: &Command) -> String {
        if cmd.become_root && self.target.user != "root" {
            format!("sudo -n -H sh -c {}", quote(&cmd.script))
        } else {
            format!("sh -c {}", quote(&cmd.script))
        }
    }

    async fn run_command(&self, cmd: Command) -> Result<Output, TransportError> {
        let host = &self.target.name;
        let _permit = self
            .channels
            .acquire()
            .await
            .map_err(|_| self.lost("the transport is closed"))?;
        let channel = match self.handle.channel_open_session().await {
            Ok(channel) => channel,
            Err(_) if self.handle.is_closed() => return Err(self.lost("the connection is closed")),
            Err(e) => {
                return Err(TransportError::Other {
                    host: host.clone(),
                    message: format!("cannot open an SSH session channel: {e}"),
                })
            }
        };
        let (mut read, write) = channel.split();
        let limit = cmd.timeout.unwrap_or(self.target.command_timeout);
        let sudo = cmd.become_root && self.target.user != "root";
        write
            .exec(true, self.command_line(&cmd))
            .await
            .map_err(|_| self.lost("the connection closed while starting the command"))?;

        // stdin is written while the output is read: a script that prints while it reads (or a large
        // upload, which has to wait for the server to open its window) must not deadlock.
        let stdin = cmd.stdin.map(Bytes::from);
        let writer = async {
            if let Some(bytes) = stdin {
                write.data_bytes(bytes).await?;
            }
            write.eof().await
        };
        let reader = async {
            let mut out = Output::default();
            let mut status = None;
            loop {
                match read.wait().await {
                    Some(ChannelMsg::Data { data }) => out.stdout.extend_from_slice(&data),
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                        out.stderr.extend_from_slice(&data)
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        status = Some(i32::try_from(exit_status).unwrap_or(255))
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                        status = Some(128 + signal_number(&signal_name))
                    }
                    Some(ChannelMsg::Failure) => {
                        return Err(TransportError::Other {
                            host: host.clone(),
                            message: "the server refused to run the command".into(),
                        })
                    }
                    Some(ChannelMsg::Close) | None => break,
                    Some(_) => {}
                }
            }
            match status {
                Some(status) => {
                    out.status = status;
                    Ok(out)
                }
                None if self.handle.is_closed() => {
                    Err(self.lost("the connection closed while the command ran"))
                }
                None => Err(TransportError::Other {
                    host: host.clone(),
                    message: "the command ended without an exit status".into(),
                }),
            }
        };
        let work = async {
            tokio::pin!(writer);
            tokio::pin!(reader);
            let mut writing = true;
            loop {
                tokio::select! {
                    // A script may exit without reading all of its stdin: not our error.
                    _ = &mut writer, if writing => writing = false,
                    out = &mut reader => return out,
                }
            }
        };
        let out = match tokio::time::timeout(limit, work).await {
            Ok(out) => out?,
            Err(_) => {
                // Best effort: stop the command and free the channel; the connection stays usable.
                let _ = write.signal(Sig::KILL).await;
                let _ = write.close().await;
                return Err(TransportError::Timeout {
                    host: host.clone(),
                    secs: limit.as_secs(),
                });
            }
        };
        if sudo {
            if let Some(err) = sudo_refusal(&out) {
                return Err(TransportError::SudoRefused {
                    host: host.clone(),
                    stderr: err,
                });
            }
        }
        Ok(out)
    }
}

/// sudo's own complaints (not the script's): it exits 1 before running anything.
fn sudo_refusal(out: &Output) -> Option<String> {
    let err = out.stderr_str();
    let err = err.trim();
    let refused = (out.status == 1
        && out.stdout.is_empty()
        && [
            "sudo: a password is required",
            "is not in the sudoers file",
            "is not allowed to execute",
            "may not run sudo",
            "sudo: a terminal is required",
        ]
        .iter()
        .any(|p| err.contains(p)))
        || (out.status == 127 && err.contains("sudo") && err.contains("not found"));
    refused.then(|| err.to_string())
}

/// Linux signal numbers, for the shell convention `128 + n`.
fn signal_number(sig: &Sig) -> i32 {
    match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(name) => match name.as_str() {
            "BUS" => 7,
            "USR2" => 12,
            "CHLD" => 17,
            "CONT" => 18,
            "STOP" => 19,
            "TSTP" => 20,
            "XCPU" => 24,
            "XFSZ" => 25,
            "VTALRM" => 26,
            "PROF" => 27,
            "SYS" => 31,
            _ => 0,
        },
    }
}

impl Transport for SshTransport {
    fn host(&self) -> &str {
        &self.target.name
    }

    fn login_user(&self) -> &str {
        &self.target.user
    }

    fn run<'a>(&'a self, cmd: Command) -> BoxFuture<'a, Result<Output, TransportError>> {
        Box::pin(self.run_command(cmd))
    }

    fn probe_new_connection<'a>(&'a self) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let mut target = self.target.clone();
            // The key is known by now; a probe must never learn a different one.
            target.accept_new = false;
            let (handle, _) =
                connect::establish(&target)
                    .await
                    .map_err(|e| TransportError::Other {
                        host: self.target.name.clone(),
                        message: format!("a new SSH connection fails: {e}"),
                    })?;
            let _ = handle
                .disconnect(Disconnect::ByApplication, "probe done", "en")
                .await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn sudo_complaints_are_told_apart_from_script_failures() {
        let out = |status, stdout: &str, stderr: &str| Output {
            status,
            stdout: stdout.into(),
            stderr: stderr.into(),
        };
        assert!(sudo_refusal(&out(1, "", "sudo: a password is required\n")).is_some());
        assert!(sudo_refusal(&out(
            1,
            "",
            "deploy is not in the sudoers file.  This incident will be reported.\n"
        ))
        .is_some());
        assert!(sudo_refusal(&out(127, "", "sh: 1: sudo: not found\n")).is_some());
        assert!(sudo_refusal(&out(1, "", "grep: no such file\n")).is_none());
        assert!(sudo_refusal(&out(2, "", "sudo: a password is required\n")).is_none());
    }
}
