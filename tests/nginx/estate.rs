//! The estate under test, built the way an operator builds it: two `cozy serve` processes as two app
//! hosts, an inventory naming them, the site rendered by the real `cozy nginx render --out`, and this
//! machine's nginx running that site in a folder of its own.
//!
//! [`TestApp`] (tests/api/helpers.rs) provides the fresh database, the environment and the HTTP helpers;
//! its `base` and `client` are pointed at nginx, so `app.user(…)`, `app.pay(…)` … go through the proxy.
//! The daemons are started here rather than by `TestApp::start`, which knows one process on 127.0.0.1
//! only: [`Daemon`] starts one on any loopback address, on the same database and Redis.
//!
//! Everything is per test (free ports, a temp folder holding the database file, the inventory, the
//! rendered tree and every log), and everything is stopped on drop: nginx (its whole process group, so no
//! worker outlives a failed test), the daemons, then the folder.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{Backend, TestApp, COZY};

/// The site's one server name; any other Host is closed by nginx's catch-all server (444).
pub const HOST: &str = "cozy.test";
/// Debian's nginx (scripts/ensure-nginx-tools installs it).
pub const NGINX: &str = "/usr/sbin/nginx";

/// A port nobody listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `cozy ARGS` run in `dir`, with nothing of the test's environment but PATH: no COZY_* variable, and
/// no cozy.yaml unless the test put one in `dir` (the CLI reads ./cozy.yaml).
pub fn cozy_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(COZY)
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("run cozy")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------------------------------
// The inventory
// ---------------------------------------------------------------------------------------------------

/// An inventory with one app host per upstream address (`app1` at 127.0.0.1, `app2` at 127.0.0.2 …, each
/// with its daemon's `app_listen`) and an `nginx:` block for `cozy.test` on 127.0.0.1 only.
pub struct Inventory {
    pub upstreams: Vec<SocketAddr>,
    pub http: u16,
    pub https: u16,
    pub log_dir: PathBuf,
    /// More lines of the `nginx:` block, unindented (`tls: {self_signed: true}`).
    pub nginx: Vec<String>,
}

impl Inventory {
    pub fn yaml(&self) -> String {
        let mut y = String::from("hosts:\n");
        for (i, up) in self.upstreams.iter().enumerate() {
            y += &format!(
                "  app{n}:\n    address: {ip}\n    vars: {{app_listen: \"{up}\"}}\n",
                n = i + 1,
                ip = up.ip()
            );
        }
        let names: Vec<String> = (1..=self.upstreams.len())
            .map(|n| format!("app{n}"))
            .collect();
        y += &format!("groups:\n  app: [{}]\n", names.join(", "));
        y += &format!(
            "vars:\n  nginx:\n    server_names: [{HOST}]\n    ports: {{http: {}, https: {}}}\n    \
             listen_addresses: [127.0.0.1]\n    ipv6: false\n    log_dir: {}\n",
            self.http,
            self.https,
            self.log_dir.display()
        );
        for line in &self.nginx {
            y += &format!("    {line}\n");
        }
        y
    }
}

// ---------------------------------------------------------------------------------------------------
// The rendered site, as a folder nginx runs
// ---------------------------------------------------------------------------------------------------

/// A site written by `cozy nginx render --out ROOT` and completed by [`complete`].
pub struct SiteDir {
    /// The nginx folder (`-p` and the folder of `nginx.conf`).
    pub root: PathBuf,
    /// `cozy`, or `cozy-ENV`.
    pub name: String,
}

impl SiteDir {
    /// `cozy nginx render -i inv.yml [--env ENV] --out nginx` in `work`, through the real binary; the
    /// result completed into a runnable folder. Panics with cozy's stderr when it refuses.
    pub fn render(work: &Path, inventory: &str, env: Option<&str>) -> SiteDir {
        std::fs::create_dir_all(work).unwrap();
        std::fs::write(work.join("inv.yml"), inventory).unwrap();
        let mut args = vec!["nginx", "render", "-i", "inv.yml", "--out", "nginx"];
        if let Some(e) = env {
            args.extend(["--env", e]);
        }
        let out = cozy_in(work, &args);
        assert!(
            out.status.success(),
            "cozy {}: {}\n{inventory}",
            args.join(" "),
            text(&out.stderr)
        );
        let name = match env {
            Some(e) => format!("cozy-{e}"),
            None => "cozy".to_string(),
        };
        let root = work.join("nginx");
        complete(&root, &name);
        SiteDir { root, name }
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.root
            .join("log")
            .join(format!("{}.access.log", self.name))
    }
}

/// Makes a rendered tree runnable as it would be on a Debian host: the main `nginx.conf` of
/// `cozy::ops::nginx::check` (Debian's shape, every path under `root`), this machine's `mime.types`, the
/// `log/`, `tmp/` and `conf.d/` folders, and for a site whose certificate is made on the host (self-signed,
/// ACME before certbot) a throwaway one where the site expects it.
pub fn complete(root: &Path, site: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(
        root.join("nginx.conf"),
        cozy::ops::nginx::check::main_conf(root),
    )
    .unwrap();
    std::fs::copy("/etc/nginx/mime.types", root.join("mime.types"))
        .expect("/etc/nginx/mime.types (Debian's nginx package)");
    for dir in ["log", "tmp", "conf.d"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    // nginx's workers run as `nobody` under root: they must reach tmp/ (request bodies, buffers), and the
    // temp folders of tempfile are 0700.
    let mut ancestor = Some(root);
    while let Some(dir) = ancestor {
        if dir.starts_with(std::env::temp_dir()) && dir != std::env::temp_dir() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        ancestor = dir.parent();
    }
    let tls = root.join("cozy").join(site).join("tls.conf");
    let cert = root.join("cozy").join(site).join("tls/fullchain.pem");
    if tls.exists() && !cert.exists() {
        cozy::ops::nginx::check::placeholder_certificate(
            &cert,
            &root.join("cozy").join(site).join("tls/privkey.pem"),
            &[HOST.to_string()],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

// ---------------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------------

/// nginx running a [`SiteDir`] in the foreground (`daemon off`), in a process group of its own.
pub struct Nginx {
    child: Option<Child>,
    pub root: PathBuf,
    pub access_log: PathBuf,
    pub http: u16,
    pub https: u16,
}

impl Nginx {
    /// Renders the site on two free ports (`inventory` makes the inventory for them) and starts nginx on
    /// it. Free ports are only free until someone takes them: a port taken meanwhile by a parallel test
    /// is a fresh try on other ports, not a failure.
    pub fn serve(work: &Path, env: Option<&str>, inventory: impl Fn(u16, u16) -> String) -> Nginx {
        let mut tries = 0;
        loop {
            let (http, https) = (free_port(), free_port());
            let site = SiteDir::render(work, &inventory(http, https), env);
            match Nginx::try_start(&site, http, https) {
                Ok(nginx) => return nginx,
                Err(e) if e.contains("Address already in use") && tries < 3 => tries += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Starts nginx on `site` and waits until it listens on `http` (the port the site listens on);
    /// `Err` with what nginx said when it exited instead.
    pub fn try_start(site: &SiteDir, http: u16, https: u16) -> Result<Nginx, String> {
        let root = site.root.clone();
        let _ = std::fs::remove_file(root.join("nginx.pid"));
        let stderr = std::fs::File::create(root.join("log/nginx.stderr")).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(format!("{}/", root.display()))
            .args(["-e", "stderr", "-c"])
            .arg(root.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {NGINX} ({e}); scripts/ensure-nginx-tools installs it")
            });
        let mut nginx = Nginx {
            child: Some(child),
            access_log: site.access_log_path(),
            root,
            http,
            https,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The master writes its pid file once every listening socket is bound; until then a
            // connection could reach whoever else holds the port.
            if nginx.root.join("nginx.pid").exists()
                && TcpStream::connect(("127.0.0.1", http)).is_ok()
            {
                return Ok(nginx);
            }
            if let Some(status) = nginx.child.as_mut().unwrap().try_wait().unwrap() {
                nginx.child = None;
                return Err(format!("nginx exited ({status}): {}", nginx.stderr()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx does not listen on {http} after 10 s: {}",
                    nginx.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        let mut s = std::fs::read_to_string(self.root.join("log/nginx.stderr")).unwrap_or_default();
        s += &std::fs::read_to_string(self.root.join("log/error.log")).unwrap_or_default();
        s
    }

    /// The site's JSON access log, one object per request (a WebSocket's line is written when it ends).
    pub fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("an access log line that is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits (up to 10 s) for an access log line matching `pred`.
    pub fn access_line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.access_log().into_iter().find(&pred) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no access log line for {what} in {}:\n{}",
                self.access_log.display(),
                std::fs::read_to_string(&self.access_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!("---- nginx ----\n{}", self.stderr());
        }
        // The group is nginx's own (process_group(0)): its master and the workers it forked.
        let group = -(child.id() as libc::pid_t);
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; the group is gone already unless nginx hung.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = child.wait();
    }
}

/// nginx alone, for what it answers itself (TLS handshakes, redirects): the inventory's two app hosts are
/// addresses where nothing listens. Fields drop in order: nginx, then its folder.
pub struct Proxy {
    pub nginx: Nginx,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// The site with these lines in its `nginx:` block, rendered by the CLI and running.
    pub fn start(lines: &[&str]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let nginx = Nginx::serve(dir.path(), None, |http, https| {
            Inventory {
                // Port 1: refused at once, should a request reach them.
                upstreams: vec![
                    "127.0.0.1:1".parse().unwrap(),
                    "127.0.0.2:1".parse().unwrap(),
                ],
                http,
                https,
                log_dir: dir.path().join("nginx/log"),
                nginx: lines.iter().map(|l| l.to_string()).collect(),
            }
            .yaml()
        });
        Proxy { nginx, _dir: dir }
    }
}

// ---------------------------------------------------------------------------------------------------
// The daemons
// ---------------------------------------------------------------------------------------------------

/// One `cozy serve` process: an app host of the estate.
pub struct Daemon {
    pub name: String,
    pub addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// `cozy serve --listen IP:0` with `env` (and PATH only), in `dir`; its stderr (JSON logs) goes to
    /// `dir/NAME.log`. Waits for the line that says where it listens.
    pub fn start(name: &str, ip: &str, env: &[(String, String)], dir: &Path) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let (child, base) = crate::helpers::spawn_serve(&format!("{ip}:0"), env, Some(dir), &log);
        let line = base.unwrap_or_default();
        let mut daemon = Daemon {
            name: name.to_string(),
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
            child: Some(child),
        };
        match line
            .trim()
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
        {
            Some(addr) => daemon.addr = addr,
            None => {
                daemon.kill9();
                panic!("{name} did not start: {line:?}\n{}", daemon.logs());
            }
        }
        daemon
    }

    /// Its own URL, bypassing nginx.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// kill -9: the host dies without a word to anyone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its access log events (JSON lines with `message: "request"`, src/http/access_log.rs).
    pub fn requests(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == "request")
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            eprintln!("---- {} ({}) log, last 30 lines ----", self.name, self.addr);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// The estate
// ---------------------------------------------------------------------------------------------------

/// Two daemons on one MySQL database and Redis, behind the rendered nginx. Fields drop in order: nginx
/// first, then the daemons, then the app (database and temp folder).
pub struct Estate {
    pub nginx: Nginx,
    pub daemons: Vec<Daemon>,
    /// `base` and `client` point at nginx (plain HTTP, Host cozy.test).
    pub app: TestApp,
}

/// How to build an [`Estate`]: environment of both daemons or of one, and lines of the `nginx:` block.
pub struct EstateBuilder {
    env: Vec<(String, String)>,
    daemon_env: [Vec<(String, String)>; 2],
    nginx: Vec<String>,
}

impl Estate {
    pub fn builder() -> EstateBuilder {
        EstateBuilder {
            env: vec![
                // The proxy's addresses: cozy believes X-Forwarded-For from nginx only (nginx reaches
                // both daemons from 127.0.0.1; 127.0.0.2 in case the kernel picks the target's address).
                ("COZY_TRUSTED_PROXIES".into(), "127.0.0.1,127.0.0.2".into()),
                // Two daemons per test and four tests at once stay far under MariaDB's 151 connections.
                ("COZY_DB_MAX_CONNECTIONS".into(), "8".into()),
            ],
            daemon_env: [Vec::new(), Vec::new()],
            nginx: Vec::new(),
        }
    }

    /// The site's URL through nginx (plain HTTP; with TLS this port only redirects).
    pub fn base(&self) -> String {
        format!("http://{HOST}:{}", self.nginx.http)
    }

    /// The upstream addresses as nginx logs them (`127.0.0.1:PORT`).
    pub fn upstream(&self, i: usize) -> String {
        self.daemons[i].addr.to_string()
    }

    /// The request log lines of every daemon (with their host's name) for `request_id`, waiting up to
    /// 5 s for the first: cozy logs a request when its answer is ready, a moment after the client may
    /// have read it.
    pub fn cozy_lines(&self, request_id: &str) -> Vec<(String, Value)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<(String, Value)> = self
                .daemons
                .iter()
                .flat_map(|d| {
                    d.requests()
                        .into_iter()
                        .filter(|l| l["request_id"] == request_id)
                        .map(|l| (d.name.clone(), l))
                })
                .collect();
            if !lines.is_empty() || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client whose requests for cozy.test go to nginx's plain HTTP port, from `local` if given (a
    /// client address of its own, e.g. 127.0.0.3).
    pub fn client_from(&self, local: Option<IpAddr>) -> reqwest::Client {
        client_to(self.nginx.http, local)
    }
}

/// A reqwest client that resolves cozy.test to 127.0.0.1 (the URL's port is used), no redirects followed.
pub fn client_to(port: u16, local: Option<IpAddr>) -> reqwest::Client {
    reqwest::Client::builder()
        .resolve(HOST, SocketAddr::from(([127, 0, 0, 1], port)))
        .local_address(local)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(16)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

impl EstateBuilder {
    /// An environment variable of both daemons (and of `app.cli`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }

    /// An environment variable of daemon `i` only (0: app1 on 127.0.0.1, 1: app2 on 127.0.0.2).
    pub fn daemon_env(mut self, i: usize, key: &str, value: &str) -> Self {
        self.daemon_env[i].push((key.into(), value.into()));
        self
    }

    /// A line of the `nginx:` block (`rate_limits: {login: 6r/m}`).
    pub fn nginx(mut self, line: &str) -> Self {
        self.nginx.push(line.into());
        self
    }

    pub async fn start(self) -> Estate {
        let extra: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut app = TestApp::prepare(Backend::MySql, &extra).await;
        app.migrate();
        let dir = app.dir.path().to_path_buf();
        let env_of = |i: usize| {
            let mut env = app.env.clone();
            for (k, v) in &self.daemon_env[i] {
                env.retain(|(key, _)| key != k);
                env.push((k.clone(), v.clone()));
            }
            env
        };
        let (env_a, env_b) = (env_of(0), env_of(1));
        // Both at once: each start waits for its daemon's first line.
        let daemons = std::thread::scope(|s| {
            let a = s.spawn(|| Daemon::start("app1", "127.0.0.1", &env_a, &dir));
            let b = s.spawn(|| Daemon::start("app2", "127.0.0.2", &env_b, &dir));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        let work = dir.join("site");
        let upstreams: Vec<SocketAddr> = daemons.iter().map(|d| d.addr).collect();
        let nginx = Nginx::serve(&work, None, |http, https| {
            Inventory {
                upstreams: upstreams.clone(),
                http,
                https,
                log_dir: work.join("nginx/log"),
                nginx: self.nginx.clone(),
            }
            .yaml()
        });
        let http = nginx.http;
        app.base = format!("http://{HOST}:{http}");
        app.client = client_to(http, None);
        Estate {
            nginx,
            daemons,
            app,
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Assertions on responses
// ---------------------------------------------------------------------------------------------------

/// Response headers, names lower-cased, in order, repeated names kept (curl's or reqwest's).
#[derive(Debug, Clone, Default)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn from_reqwest(map: &reqwest::header::HeaderMap) -> Headers {
        Headers(
            map.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_ascii_lowercase(),
                        v.to_str().unwrap_or("").to_string(),
                    )
                })
                .collect(),
        )
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }
}

/// The security headers of the site, each exactly once (set once by nginx, the app's copies hidden);
/// HSTS for two years when the site is served over TLS.
pub fn assert_security_headers(h: &Headers, tls: bool, what: &str) {
    let once = |name: &str| -> &str {
        let values = h.all(name);
        assert_eq!(
            values.len(),
            1,
            "{what}: `{name}` must appear exactly once: {h:?}"
        );
        values[0]
    };
    assert_eq!(once("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(once("x-frame-options"), "DENY", "{what}");
    assert_eq!(
        once("referrer-policy"),
        "strict-origin-when-cross-origin",
        "{what}"
    );
    let csp = once("content-security-policy");
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "script-src 'self'",
    ] {
        assert!(
            csp.contains(directive),
            "{what}: CSP without {directive}: {csp}"
        );
    }
    if tls {
        let hsts = once("strict-transport-security");
        assert!(
            hsts.starts_with("max-age=63072000"),
            "{what}: HSTS for two years: {hsts}"
        );
    } else {
        assert!(
            h.get("strict-transport-security").is_none(),
            "{what}: no HSTS over plain HTTP: {h:?}"
        );
    }
}
