//! `nginx -t` on a rendered site, in a scratch folder, with this machine's nginx.
//!
//! The scratch folder is laid out like `/etc/nginx`: a main `nginx.conf` shaped like Debian's as the nginx
//! playbook leaves it (the same http-level directives, so a directive our site repeats at the wrong level
//! is caught), `mime.types`
//! (this machine's), the rendered tree, and, for a site whose certificate is made on the nginx host
//! (self-signed, ACME), a throwaway certificate at the path the site names. Includes and certificate
//! paths in the site are relative to the configuration folder, so nginx reads exactly the rendered
//! bytes; only the log folder is pointed into the scratch folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::render::{self, Body, RenderOptions, Site, SiteFile, UpstreamServer};
use super::settings::NginxSettings;

/// What `nginx -t` said of a site.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Render(#[from] render::RenderError),
    /// nginx refused the configuration: the file (relative to the nginx folder) and line it named.
    #[error("nginx -t refused the rendered configuration: {place}: {message}\n{output}")]
    Refused {
        place: String,
        message: String,
        output: String,
    },
    #[error("cannot check the rendered configuration: {0}")]
    Setup(String),
}

/// This machine's nginx, if any (PATH, then /usr/sbin).
pub fn nginx_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// Renders the site for a scratch folder and runs `nginx -t` on it. `Ok` carries nginx's warnings
/// (empty when it had none).
pub fn check(
    nginx: &Path,
    settings: &NginxSettings,
    upstreams: Vec<UpstreamServer>,
    opts: &RenderOptions,
) -> Result<Vec<String>, CheckError> {
    let scratch = tempfile::Builder::new()
        .prefix("cozy-nginx-check.")
        .tempdir()
        .map_err(|e| CheckError::Setup(format!("scratch folder: {e}")))?;
    let root = scratch.path();
    let log_dir = root.join("log");
    let opts = RenderOptions {
        log_dir: Some(log_dir.display().to_string()),
        ..opts.clone()
    };
    let site = render::render(settings, upstreams, &opts)?;
    prepare(root, &site, &settings.server_names)?;
    run_test(nginx, root)
}

/// Lays out `root` as an nginx folder holding `site`: main config, mime.types, the tree, a throwaway
/// certificate where the site expects one made on the host, and a `log/` folder.
pub fn prepare(root: &Path, site: &Site, names: &[String]) -> Result<(), CheckError> {
    let setup = |what: &str, e: std::io::Error| CheckError::Setup(format!("{what}: {e}"));
    std::fs::create_dir_all(root.join("log")).map_err(|e| setup("log folder", e))?;
    std::fs::create_dir_all(root.join("conf.d")).map_err(|e| setup("conf.d", e))?;
    std::fs::write(root.join("nginx.conf"), main_conf(root)).map_err(|e| setup("nginx.conf", e))?;
    let mime = Path::new("/etc/nginx/mime.types");
    let types = std::fs::read_to_string(mime)
        .unwrap_or_else(|_| "types {\n    application/json json;\n}\n".into());
    std::fs::write(root.join("mime.types"), types).map_err(|e| setup("mime.types", e))?;
    write_tree(root, &site.files).map_err(|e| setup("the rendered tree", e))?;
    if let Some((cert, key)) = &site.host_made_certificate {
        placeholder_certificate(&root.join(cert), &root.join(key), names)
            .map_err(CheckError::Setup)?;
    }
    Ok(())
}

/// `nginx -t` with `root` as prefix and configuration folder.
pub fn run_test(nginx: &Path, root: &Path) -> Result<Vec<String>, CheckError> {
    let out = Command::new(nginx)
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", root.display()))
        .arg("-e")
        .arg("stderr")
        .arg("-c")
        .arg(root.join("nginx.conf"))
        .output()
        .map_err(|e| CheckError::Setup(format!("cannot run {}: {e}", nginx.display())))?;
    let text = String::from_utf8_lossy(&out.stderr).replace(&format!("{}/", root.display()), "");
    let lines: Vec<&str> = text.lines().collect();
    if out.status.success() {
        return Ok(lines
            .iter()
            .filter(|l| l.contains("[warn]"))
            .map(|l| l.trim_start_matches("nginx: ").to_string())
            .collect());
    }
    let first = lines
        .iter()
        .find(|l| l.contains("[emerg]") || l.contains("[crit]") || l.contains("[alert]"))
        .copied()
        .unwrap_or_else(|| lines.first().copied().unwrap_or("no output"));
    let (message, place) = match first.rsplit_once(" in ") {
        Some((m, p)) if p.contains(':') => (m, p.to_string()),
        _ => (first, "nginx.conf".to_string()),
    };
    // "2026/12/03 06:32:28 [emerg] 19226#19226: MESSAGE" (with -e stderr) or "nginx: [emerg] MESSAGE".
    let message = match message.find("] ") {
        Some(i) => &message[i + 2..],
        None => message,
    };
    let message = match message.split_once(": ") {
        Some((pid, rest))
            if pid.contains('#') && pid.chars().all(|c| c.is_ascii_digit() || c == '#') =>
        {
            rest
        }
        _ => message,
    }
    .to_string();
    Err(CheckError::Refused {
        place,
        message,
        output: text.trim_end().to_string(),
    })
}

/// A main configuration shaped like Debian 12's /etc/nginx/nginx.conf, with every path under `prefix`.
pub fn main_conf(prefix: &Path) -> String {
    let p = prefix.display();
    format!(
        "# The scratch main configuration of `cozy nginx render --check` (shaped like Debian's).
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/log/error.log;
# As the nginx playbook sets them on a host: room for many WebSockets (each one holds two connections).
worker_rlimit_nofile 16384;

events {{
    worker_connections 4096;
}}

http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    include mime.types;
    default_type application/octet-stream;
    # Debian's http-level TLS lines, as the nginx playbook rewrites them (the site sets its own per server).
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers off;
    access_log {p}/log/access.log;
    gzip on;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    include conf.d/*.conf;
    include sites-enabled/*;
}}
"
    )
}

/// Writes the files of a tree under `root` (links as symlinks, modes as given).
pub fn write_tree(root: &Path, files: &[SiteFile]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(root.join("tmp"))?;
    for f in files {
        let path = root.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("cozy-tmp");
        let _ = std::fs::remove_file(&tmp);
        match &f.body {
            Body::Link(target) => std::os::unix::fs::symlink(target, &tmp)?,
            _ => {
                std::fs::write(&tmp, f.bytes())?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(f.mode))?;
            }
        }
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// A self-signed P-256 certificate for `names`, made with the openssl command.
pub fn placeholder_certificate(cert: &Path, key: &Path, names: &[String]) -> Result<(), String> {
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let first = names.first().map(String::as_str).unwrap_or("localhost");
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={first}")])
        .args(["-addext", &format!("subjectAltName={san}")])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .map_err(|e| format!("a throwaway certificate needs the openssl command: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}
