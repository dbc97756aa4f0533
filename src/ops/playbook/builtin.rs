//! The playbooks and templates embedded in the binary (`playbooks/*.yml`, `templates/provision/**` and
//! `templates/nginx/**` of this repository, listed by build.rs), so a bare `cozy` binary can harden a host with no files around it.
//! Files on disk override them (see [`crate::ops::playbook::load`]).

mod files {
    include!(concat!(env!("OUT_DIR"), "/builtin_files.rs"));
}

/// The built-in playbook `name` (`harden` → `playbooks/harden.yml`).
pub fn playbook(name: &str) -> Option<&'static str> {
    let file = format!("{name}.yml");
    files::PLAYBOOKS
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, text)| *text)
}

/// The names of the built-in playbooks, for error messages.
pub fn playbook_names() -> Vec<&'static str> {
    files::PLAYBOOKS
        .iter()
        .filter_map(|(n, _)| n.strip_suffix(".yml"))
        .collect()
}

/// The built-in template `path` (relative to `templates/provision/`).
pub fn template(path: &str) -> Option<&'static str> {
    files::TEMPLATES
        .iter()
        .find(|(n, _)| *n == path)
        .map(|(_, text)| *text)
}

/// The built-in nginx template `path` (relative to `templates/nginx/`).
pub fn nginx_template(path: &str) -> Option<&'static str> {
    files::NGINX_TEMPLATES
        .iter()
        .find(|(n, _)| *n == path)
        .map(|(_, text)| *text)
}
