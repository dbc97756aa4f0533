//! `cozy nginx render`: the reverse proxy and load balancer of the estate, rendered from what the
//! inventory knows (which hosts run the daemon, on which port) and proved with the real `nginx -t`.
//!
//! How the pieces fit:
//!
//! - [`settings`] reads the `nginx:` block (inventory `vars` or `cozy.yaml`) into typed, valid settings,
//!   every error at its `file:line:column`.
//! - [`render`] is pure: settings + the app hosts → the files of the site as they lie under `/etc/nginx`
//!   (`sites-available/<site>.conf`, its `sites-enabled` link, includes under `cozy/<site>/`), from the
//!   minijinja templates in `templates/nginx/` (embedded; a folder on disk overrides them).
//! - [`check`] lays the files out in a scratch folder beside a Debian-shaped main config and runs
//!   `nginx -t`, naming the file and line nginx refused.
//!
//! Installing is the `nginx_site` module's job ([`crate::ops::modules::nginx_site`]), run by the built-in
//! `nginx` playbook on the `lb` group: it writes the tree, runs `nginx -t` on the host and puts the old
//! files back if nginx refuses, so a refused configuration is never left enabled.

pub mod check;
pub mod render;
pub mod settings;

use std::path::{Path, PathBuf};

use crate::ops::inventory::{Inventory, InventoryError};
use crate::ops::playbook::ParseError;
use settings::{BlockAt, NginxSettings};

/// Reading the estate's nginx settings failed.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        // Not `source`: the message already says it, and a source would print it a second time.
        error: std::io::Error,
    },
    #[error(
        "the nginx settings are given twice, in {0} (vars.nginx) and in {1} (nginx): keep one"
    )]
    Twice(String, String),
}

/// The template folders that override the built-in ones when none is named: `templates/nginx/` next to
/// the inventory, when it exists (as playbooks are looked up next to it).
pub fn template_dirs_beside(inventory_path: &Path) -> Vec<PathBuf> {
    let beside = inventory_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("templates/nginx");
    if beside.is_dir() {
        vec![beside]
    } else {
        Vec::new()
    }
}

/// The inventory at `inventory_path` and the `nginx:` block of the estate: the inventory's `vars.nginx`,
/// else `cozy.yaml`'s `nginx` (`config`, or ./cozy.yaml when it exists), else the defaults.
pub fn load(
    inventory_path: &Path,
    config: Option<&Path>,
) -> Result<(Inventory, NginxSettings), SettingsError> {
    let inventory = Inventory::load(inventory_path)?;
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|error| SettingsError::Read {
            path: path.to_path_buf(),
            error,
        })
    };
    let dir_of = |path: &Path| match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let from_inventory = NginxSettings::from_file(
        &inventory.source,
        &read(inventory_path)?,
        BlockAt::InventoryVars,
        &dir_of(inventory_path),
    )?;
    let config = match config {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(crate::config::DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
    };
    let from_config = match &config {
        Some(path) => NginxSettings::from_file(
            &path.display().to_string(),
            &read(path)?,
            BlockAt::Top,
            &dir_of(path),
        )?,
        None => None,
    };
    let settings = match (from_inventory, from_config) {
        (Some(a), Some(b)) => return Err(SettingsError::Twice(a.source, b.source)),
        (Some(s), None) | (None, Some(s)) => s,
        (None, None) => NginxSettings::defaults("defaults"),
    };
    Ok((inventory, settings))
}
