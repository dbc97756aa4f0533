//! Facts: what a playbook may ask about a host, read in one round trip before the first task.
//!
//! Exposed to `when` and templates as `facts.*` (e.g. `facts.os_codename`, `facts.ssh_port`,
//! `facts.container`). One shell script prints `key=value` lines; nothing here needs root.

use serde::Serialize;

use crate::ops::transport::{Command, Transport, TransportError};

/// Facts about one host.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Facts {
    pub hostname: String,
    /// `ID` of /etc/os-release, e.g. `debian`, `ubuntu`.
    pub os_id: String,
    /// `VERSION_ID`, e.g. `12`.
    pub os_version: String,
    /// `VERSION_CODENAME`, e.g. `bookworm`.
    pub os_codename: String,
    /// `uname -m`, e.g. `x86_64`.
    pub arch: String,
    pub kernel: String,
    /// The user cozy logged in as.
    pub user: String,
    /// The server-side port of the SSH connection in use (from `$SSH_CONNECTION`); the firewall and sshd
    /// modules never close it. `None` when not over SSH.
    pub ssh_port: Option<u16>,
    /// The container technology when the host is a container (`systemd-nspawn`, `lxc`, `docker`, …): some
    /// kernel settings are read-only there.
    pub container: Option<String>,
    /// systemd is PID 1.
    pub systemd: bool,
    pub cpus: u32,
    pub memory_mb: u64,
}

const SCRIPT: &str = r#"
. /etc/os-release 2>/dev/null
echo "hostname=$(hostname 2>/dev/null || cat /etc/hostname)"
echo "os_id=$ID"
echo "os_version=$VERSION_ID"
echo "os_codename=$VERSION_CODENAME"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
echo "user=$(id -un)"
echo "ssh_connection=$SSH_CONNECTION"
c=$(cat /run/systemd/container 2>/dev/null || true)
[ -z "$c" ] && [ -f /.dockerenv ] && c=docker
echo "container=$c"
[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && echo systemd=1 || echo systemd=0
echo "cpus=$(nproc 2>/dev/null || echo 1)"
echo "memory_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)"
"#;

impl Facts {
    /// Reads the facts of the host behind `host` in one round trip.
    pub async fn gather(host: &dyn Transport) -> Result<Facts, TransportError> {
        let out = host.run(Command::new(SCRIPT)).await?;
        Ok(Facts::parse(&out.stdout_str()))
    }

    fn parse(text: &str) -> Facts {
        let mut f = Facts::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().to_string();
            match key {
                "hostname" => f.hostname = value,
                "os_id" => f.os_id = value,
                "os_version" => f.os_version = value,
                "os_codename" => f.os_codename = value,
                "arch" => f.arch = value,
                "kernel" => f.kernel = value,
                "user" => f.user = value,
                // "client_ip client_port server_ip server_port"
                "ssh_connection" => {
                    f.ssh_port = value.split(' ').nth(3).and_then(|p| p.parse().ok())
                }
                "container" => f.container = (!value.is_empty()).then_some(value),
                "systemd" => f.systemd = value == "1",
                "cpus" => f.cpus = value.parse().unwrap_or(1),
                "memory_kb" => f.memory_mb = value.parse::<u64>().unwrap_or(0) / 1024,
                _ => {}
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::transport::LocalTransport;

    #[test]
    fn parses_the_ssh_port_and_container() {
        let f = Facts::parse(
            "os_id=debian\nssh_connection=10.0.0.1 50000 10.0.0.2 2222\ncontainer=systemd-nspawn\nsystemd=1\n",
        );
        assert_eq!(f.os_id, "debian");
        assert_eq!(f.ssh_port, Some(2222));
        assert_eq!(f.container.as_deref(), Some("systemd-nspawn"));
        assert!(f.systemd);
    }

    #[tokio::test]
    async fn gathers_this_machine() {
        let f = Facts::gather(&LocalTransport::new("local")).await.unwrap();
        assert!(!f.os_id.is_empty(), "{f:?}");
        assert!(!f.kernel.is_empty());
        assert!(f.cpus >= 1);
        assert!(f.memory_mb > 0);
    }
}
