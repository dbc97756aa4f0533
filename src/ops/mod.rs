//! Operations on remote hosts: `cozy provision` (Ansible's job) over SSH, and `cozy nginx render`.
//!
//! How the pieces fit:
//!
//! - [`transport`] is the one seam between "what to do" and "where": a [`transport::Transport`] runs a
//!   shell script on a host (optionally as root through sudo) and returns its exit status and output.
//!   Uploads are the same call with the file on stdin. [`ssh`] implements it over one russh connection
//!   per host (a channel per command, never a reconnect) with strict known_hosts checking;
//!   [`transport::LocalTransport`] runs on this machine (or through a wrapper command such as
//!   `nsenter`), which the module tests use as ground truth.
//! - [`inventory`] reads the inventory YAML (hosts, groups, defaults, vars) and resolves targets.
//! - [`playbook`] is the model and parser of playbooks (with file:line:col spans), the per-host runner
//!   (facts, `when`, tags, loops, handlers, check/diff) and the reporting (progress bars, recap, JSON).
//! - [`modules`] holds one file per module (`apt`, `user`, `file`, `template`, `nftables`, …). A module
//!   reads the host's current state, plans the minimal change, and applies it only when not in check
//!   mode — one round trip where one is enough, as pyinfra does.
//! - [`nginx`] renders the estate's reverse proxy from the inventory and checks it with `nginx -t`; the
//!   `nginx_site` module installs it through the playbooks.

pub mod connect;
pub mod facts;
pub mod inventory;
pub mod modules;
pub mod nginx;
pub mod playbook;
pub mod ssh;
pub mod transport;
