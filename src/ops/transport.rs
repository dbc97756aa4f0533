//! The seam between modules and hosts: run a shell script, get its status and output.
//!
//! Everything a module does on a host is a [`Command`]: a POSIX `sh` script, optional bytes on its
//! stdin (that is also how files are uploaded: `cat > tmp && mv tmp dest`), and whether it needs root
//! (`become`, done with `sudo -n` when the login user is not root). Keeping the seam this narrow is
//! what lets one module run unchanged over SSH ([`crate::ops::ssh`]) or locally ([`LocalTransport`]).

use std::fmt;
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;

/// One script to run on a host.
#[derive(Debug, Clone, Default)]
pub struct Command {
    /// A POSIX shell script, run with `sh -c`.
    pub script: String,
    /// Bytes written to the script's stdin, then stdin is closed. `None`: empty stdin.
    pub stdin: Option<Vec<u8>>,
    /// Run as root (`sudo -n sh -c …` when the login user is not root).
    pub become_root: bool,
    /// Give up after this long (the transport's default when `None`).
    pub timeout: Option<Duration>,
}

impl Command {
    pub fn new(script: impl Into<String>) -> Self {
        Command {
            script: script.into(),
            ..Command::default()
        }
    }

    /// The same command, as root.
    pub fn root(mut self, become_root: bool) -> Self {
        self.become_root = become_root;
        self
    }

    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// What a finished command left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The exit status; a script killed by a signal reports 128 + signal, as shells do.
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// stderr, or stdout when stderr is empty, trimmed: the text to show when the command failed.
    pub fn error_text(&self) -> String {
        let err = self.stderr_str();
        let text = if err.trim().is_empty() {
            self.stdout_str()
        } else {
            err
        };
        text.trim().to_string()
    }
}

/// Why a command could not be run at all (a command that ran and failed is an [`Output`]).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{host}: connection lost: {reason}")]
    Disconnected { host: String, reason: String },
    #[error("{host}: command timed out after {secs} s")]
    Timeout { host: String, secs: u64 },
    #[error("{host}: sudo needs a password or is not allowed for this user: {stderr}")]
    SudoRefused { host: String, stderr: String },
    #[error("{host}: {message}")]
    Other { host: String, message: String },
}

/// Runs commands on one host. Implementations are cheap to share (`&dyn Transport` across tasks).
pub trait Transport: Send + Sync {
    /// The host's name for messages (inventory name or `user@address`).
    fn host(&self) -> &str;

    /// The user commands run as when `become_root` is false.
    fn login_user(&self) -> &str;

    /// Runs `cmd` to completion.
    fn run<'a>(&'a self, cmd: Command) -> BoxFuture<'a, Result<Output, TransportError>>;

    /// Proves that a brand-new connection (TCP, handshake, auth) to the host still succeeds. Modules that
    /// can lock us out (firewall, sshd) call it after applying a change and roll back when it fails.
    /// Established connections survive a firewall change, so only a new one proves anything.
    fn probe_new_connection<'a>(&'a self) -> BoxFuture<'a, Result<(), TransportError>>;
}

/// Quotes `s` for a POSIX shell: `'…'` with embedded single quotes as `'\''`.
pub fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs commands on this machine with `sh -c`, optionally through a wrapper (e.g. `["nsenter", "-t",
/// PID, "-a", "--"]` to run inside a test host). `become_root` needs no sudo here: the wrapper or the
/// current user decides. Used by module tests as ground truth and for `localhost` targets.
#[derive(Debug, Clone)]
pub struct LocalTransport {
    name: String,
    user: String,
    wrapper: Vec<String>,
    default_timeout: Duration,
}

impl LocalTransport {
    pub fn new(name: impl Into<String>) -> Self {
        LocalTransport {
            name: name.into(),
            user: std::env::var("USER").unwrap_or_else(|_| "root".into()),
            wrapper: Vec::new(),
            default_timeout: Duration::from_secs(600),
        }
    }

    /// Prefix every command with `wrapper` (program and its arguments).
    pub fn with_wrapper(mut self, wrapper: Vec<String>) -> Self {
        self.wrapper = wrapper;
        self
    }
}

impl fmt::Display for LocalTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Transport for LocalTransport {
    fn host(&self) -> &str {
        &self.name
    }

    fn login_user(&self) -> &str {
        &self.user
    }

    fn run<'a>(&'a self, cmd: Command) -> BoxFuture<'a, Result<Output, TransportError>> {
        Box::pin(async move {
            let mut argv: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
            argv.extend(["sh", "-c", cmd.script.as_str()]);
            let mut child = tokio::process::Command::new(argv[0]);
            child
                .args(&argv[1..])
                .stdin(if cmd.stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let other = |e: std::io::Error| TransportError::Other {
                host: self.name.clone(),
                message: format!("cannot run `{}`: {e}", argv[0]),
            };
            let mut child = child.spawn().map_err(other)?;
            if let Some(bytes) = cmd.stdin {
                let mut stdin = child.stdin.take().expect("stdin is piped");
                // A script that exits without reading its stdin closes the pipe: not our error.
                let _ = stdin.write_all(&bytes).await;
                drop(stdin);
            }
            let limit = cmd.timeout.unwrap_or(self.default_timeout);
            let out = tokio::time::timeout(limit, child.wait_with_output())
                .await
                .map_err(|_| TransportError::Timeout {
                    host: self.name.clone(),
                    secs: limit.as_secs(),
                })?
                .map_err(other)?;
            use std::os::unix::process::ExitStatusExt;
            let status = out
                .status
                .code()
                .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0));
            Ok(Output {
                status,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        })
    }

    fn probe_new_connection<'a>(&'a self) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_leaves_plain_words_and_wraps_the_rest() {
        assert_eq!(quote("/etc/ssh/sshd_config"), "/etc/ssh/sshd_config");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[tokio::test]
    async fn local_transport_returns_status_output_and_reads_stdin() {
        let t = LocalTransport::new("local");
        let out = t
            .run(Command::new("cat; echo err >&2; exit 3").stdin(b"hello".to_vec()))
            .await
            .unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr_str(), "err\n");
    }
}
