//! The runner's [`Connector`] over SSH: inventory hosts → [`SshTransport`]s.
//!
//! Host-key policy (known_hosts file, accept new keys or not) is the same for every host of a run; the
//! rest (address, port, key) comes from the host's inventory entry.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::ops::inventory::HostSpec;
use crate::ops::playbook::run::{ConnectError, Connector};
use crate::ops::ssh::{SshTarget, SshTransport};
use crate::ops::transport::Transport;

/// Connects over SSH with one host-key policy.
#[derive(Debug, Clone)]
pub struct SshConnector {
    pub known_hosts: PathBuf,
    pub accept_new: bool,
}

impl SshConnector {
    fn target(&self, host: &HostSpec, user: &str) -> SshTarget {
        let mut t = SshTarget::new(host.name.clone(), host.address.clone(), user);
        t.port = host.port;
        t.key = host.ssh_key.clone();
        t.known_hosts = self.known_hosts.clone();
        t.accept_new = self.accept_new;
        t
    }
}

impl Connector for SshConnector {
    fn connect<'a>(
        &'a self,
        host: &'a HostSpec,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Arc<dyn Transport>, ConnectError>> {
        Box::pin(async move {
            match SshTransport::connect(self.target(host, user)).await {
                Ok(t) => Ok(Arc::new(t) as Arc<dyn Transport>),
                Err(e) if e.is_auth_refused() => Err(ConnectError::AuthRefused(e.to_string())),
                Err(e) => Err(ConnectError::Failed(e.to_string())),
            }
        })
    }

    fn public_key<'a>(&'a self, host: &'a HostSpec) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            match &host.ssh_key {
                Some(path) => {
                    let key = russh::keys::load_secret_key(path, None)
                        .map_err(|e| format!("cannot read the key {}: {e}", path.display()))?;
                    key.public_key().to_openssh().map_err(|e| {
                        format!("cannot encode the public key of {}: {e}", path.display())
                    })
                }
                None => {
                    let mut agent = russh::keys::agent::client::AgentClient::connect_env()
                        .await
                        .map_err(|e| format!("no ssh_key given and no ssh-agent: {e}"))?;
                    let keys = agent
                        .request_identities()
                        .await
                        .map_err(|e| format!("ssh-agent: {e}"))?;
                    let key = keys
                        .first()
                        .ok_or("no ssh_key given and ssh-agent holds no key")?;
                    key.public_key()
                        .to_openssh()
                        .map_err(|e| format!("cannot encode the agent's public key: {e}"))
                }
            }
        })
    }
}
