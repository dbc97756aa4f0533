//! One way to boot the real thing for a test: [`TestApp::spawn`] starts the real `cozy` binary on port 0
//! against a fresh database (a temporary SQLite file, or a uniquely named MySQL database with Redis
//! sessions) and talks to it over HTTP. Server logs go to a file in the test's temp dir and are printed
//! when a test fails; set `TEST_LOG=1` to see them live.
//!
//! Every scenario runs on both backends through [`backend_tests!`].

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub const COZY: &str = env!("CARGO_BIN_EXE_cozy");

/// `COZY_AUTH_RATE_PER_MINUTE` and `COZY_AUTH_BURST` for servers whose tests log in a lot.
pub const GENEROUS_AUTH_RATE: (&str, &str) = ("600000", "100000");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    MySql,
}

pub fn mysql_base_url() -> String {
    std::env::var("COZY_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://cozy:cozy@127.0.0.1:3306".into())
}

pub fn redis_url() -> String {
    std::env::var("COZY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Runs each `async fn name(backend) { … }` once on SQLite and once on MySQL + Redis.
#[macro_export]
macro_rules! backend_tests {
    ($($(#[$meta:meta])* async fn $name:ident($backend:ident) $body:block)*) => {
        mod sqlite {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let $backend = $crate::helpers::Backend::Sqlite;
                    $body
                }
            )*
        }
        mod mysql {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$meta])*
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let $backend = $crate::helpers::Backend::MySql;
                    $body
                }
            )*
        }
    };
}

/// A fresh database for one test; dropped with the test.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    mysql_name: Option<String>,
}

impl TestDb {
    pub async fn create(backend: Backend, dir: &std::path::Path) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                backend,
                url: format!("sqlite://{}", dir.join("cozy.db").display()),
                mysql_name: None,
            },
            Backend::MySql => {
                let name = format!("cozy_t_{}", random_suffix());
                let base = mysql_base_url();
                let mut conn = <sqlx::MySqlConnection as sqlx::Connection>::connect(&format!(
                    "{base}/mysql"
                ))
                .await
                .unwrap_or_else(|e| {
                    panic!("cannot reach MySQL at {base} ({e}); run scripts/test, which starts it")
                });
                sqlx::query(&format!("CREATE DATABASE `{name}`"))
                    .execute(&mut conn)
                    .await
                    .expect("create database");
                TestDb {
                    backend,
                    url: format!("{base}/{name}"),
                    mysql_name: Some(name),
                }
            }
        }
    }

    /// A direct connection for assertions that look at the rows themselves.
    pub async fn pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .expect("connect to test db")
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        let pool = self.pool().await;
        let v: i64 = sqlx::query_scalar(sql)
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
        v
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.mysql_name.take() {
            let base = mysql_base_url();
            // Drop runs inside the test's runtime; use a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(mut conn) = <sqlx::MySqlConnection as sqlx::Connection>::connect(
                        &format!("{base}/mysql"),
                    )
                    .await
                    {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`"))
                            .execute(&mut conn)
                            .await;
                    }
                })
            })
            .join();
        }
    }
}

pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..12)
        .map(|_| char::from(b'a' + rng.gen_range(0..26)))
        .collect()
}

/// The real server, running.
pub struct TestApp {
    pub base: String,
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
    pub client: reqwest::Client,
    child: Option<Child>,
    log: PathBuf,
}

/// A response: status, headers, and the body as JSON (Null when empty or not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn id(&self) -> i64 {
        self.body["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no id in {}", self.body))
    }
}

/// Starts the real `cozy serve --listen LISTEN` with only `env` (and PATH), in `dir` when given, its stderr
/// appended to `log` (or shown live with `TEST_LOG`), and waits up to 30 s for the line that says where it
/// listens. Returns the process and its base URL (`http://ADDR`), `None` when it did not start.
pub fn spawn_serve(
    listen: &str,
    env: &[(String, String)],
    dir: Option<&std::path::Path>,
    log: &std::path::Path,
) -> (Child, Option<String>) {
    let mut cmd = Command::new(COZY);
    cmd.args(["serve", "--listen", listen]).env_clear();
    cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    if std::env::var_os("TEST_LOG").is_some() {
        cmd.stderr(Stdio::inherit());
    } else {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        cmd.stderr(Stdio::from(file));
    }
    let mut child = cmd.spawn().expect("spawn cozy serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the server never blocks on a full pipe.
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let base = line
        .trim()
        .strip_prefix("cozy listening on ")
        .map(str::to_string);
    (child, base)
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, &[]).await
    }

    /// Starts the server with extra environment variables (e.g. a slow gateway).
    pub async fn spawn_with(backend: Backend, extra: &[(&str, &str)]) -> TestApp {
        let mut app = Self::prepare(backend, extra).await;
        if backend == Backend::MySql {
            app.migrate();
        }
        app.start().await;
        app
    }

    /// Everything but the server: a temp dir, a fresh database (not migrated), the environment with
    /// `extra` applied, and a client. For tests that start the binary their own way (the cluster).
    pub async fn prepare(backend: Backend, extra: &[(&str, &str)]) -> TestApp {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = TestDb::create(backend, dir.path()).await;
        let mut env: Vec<(String, String)> = vec![
            ("COZY_DATABASE_URL".into(), db.url.clone()),
            (
                "COZY_RUN_DIR".into(),
                dir.path().join("run").display().to_string(),
            ),
            (
                "COZY_DATA_DIR".into(),
                dir.path().join("data").display().to_string(),
            ),
            // Cheap argon2id so tests that create many users stay fast; the algorithm is the real one.
            ("COZY_ARGON2_MEMORY_KIB".into(), "256".into()),
            ("COZY_ARGON2_ITERATIONS".into(), "1".into()),
            ("COZY_LOG_FORMAT".into(), "json".into()),
            // Tests create many users and sessions from 127.0.0.1: a login limit far out of their way
            // (tests/api/proxy.rs sets its own to test the limit itself).
            (
                "COZY_AUTH_RATE_PER_MINUTE".into(),
                GENEROUS_AUTH_RATE.0.into(),
            ),
            ("COZY_AUTH_BURST".into(), GENEROUS_AUTH_RATE.1.into()),
        ];
        if backend == Backend::MySql {
            env.push(("COZY_REDIS_URL".into(), redis_url()));
        }
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.to_string()));
        }
        let log = dir.path().join("server.log");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap();
        TestApp {
            base: String::new(),
            db,
            dir,
            env,
            client,
            child: None,
            log,
        }
    }

    /// `cozy migrate up`, asserting success.
    pub fn migrate(&self) {
        let out = self.cli(&["migrate", "up"], None);
        assert!(
            out.status.success(),
            "migrate up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The file the server's stderr goes to (what [`TestApp::logs`] reads and a failing test prints).
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    /// Starts (or restarts) the server process and waits until it listens.
    pub async fn start(&mut self) {
        let (child, base) = spawn_serve("127.0.0.1:0", &self.env, None, &self.log);
        let Some(base) = base else {
            let mut child = child;
            let _ = child.kill();
            panic!("server did not start\n{}", self.logs());
        };
        self.base = base;
        self.child = Some(child);
    }

    /// kill -9 the server.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a `cozy` CLI command with this app's environment.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(COZY);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.current_dir(self.dir.path());
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cozy");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().expect("cozy cli")
    }

    /// `cozy audit --json`, parsed; asserts nothing itself.
    pub fn audit(&self) -> Value {
        let out = self.cli(&["audit", "--json"], None);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "audit output: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub fn assert_audit_ok(&self) -> Value {
        let report = self.audit();
        assert_eq!(report["ok"], true, "audit failed: {report}");
        report
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.request(Method::GET, path, Some(token), None, None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, key: &str, body: Value) -> Resp {
        self.request(Method::POST, path, Some(token), Some(key), Some(body))
            .await
    }

    /// Registers a user and logs in; returns the token.
    pub async fn user(&self, email: &str) -> String {
        let r = self
            .request(
                Method::POST,
                "/v1/users",
                None,
                None,
                Some(json!({"email": email, "password": "correct horse"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        self.login(email, "correct horse").await
    }

    pub async fn login(&self, email: &str, password: &str) -> String {
        let r = self
            .request(
                Method::POST,
                "/v1/sessions",
                None,
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body["token"].as_str().unwrap().to_string()
    }

    /// Creates an admin through the CLI and logs in.
    pub async fn admin(&self) -> String {
        let out = self.cli(
            &[
                "users",
                "add",
                "admin@example.com",
                "--admin",
                "--password-stdin",
            ],
            Some("admin password\n"),
        );
        assert!(
            out.status.success(),
            "users add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.login("admin@example.com", "admin password").await
    }

    /// Creates a resource as `admin`; returns its id.
    pub async fn resource(&self, admin: &str, capacity: i64, hold_seconds: i64) -> i64 {
        let r = self
            .request(
                Method::POST,
                "/v1/resources",
                Some(admin),
                None,
                Some(json!({"name": "Concert", "capacity": capacity, "price_cents": 2500, "currency": "EUR", "hold_seconds": hold_seconds})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.id()
    }

    /// Reserves and asserts success; returns the reservation id.
    pub async fn reserve(&self, token: &str, resource: i64, quantity: i64) -> i64 {
        let r = self
            .post(
                "/v1/reservations",
                token,
                &random_suffix(),
                json!({"resource_id": resource, "quantity": quantity}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.id()
    }

    pub async fn pay(&self, token: &str, id: i64, method: &str, key: &str) -> Resp {
        self.post(
            &format!("/v1/reservations/{id}/pay"),
            token,
            key,
            json!({"payment_method": method}),
        )
        .await
    }

    pub async fn cancel(&self, token: &str, id: i64, key: &str) -> Resp {
        self.post(
            &format!("/v1/reservations/{id}/cancel"),
            token,
            key,
            json!({}),
        )
        .await
    }

    /// Rows in the sandbox gateway's ledger (charges it made, refunded or not).
    pub async fn gateway_charges(&self) -> i64 {
        self.db.scalar("SELECT COUNT(*) FROM sandbox_ledger").await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() && std::env::var_os("TEST_LOG").is_none() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- server log (last 60 lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Counts values, for "exactly one won" assertions.
pub fn tally<I: IntoIterator<Item = String>>(items: I) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// One HTTP request against `base`, handing back transport errors (refused, reset by a killed server)
/// instead of panicking; for clients that must survive a crash of the server.
#[allow(clippy::too_many_arguments)]
pub async fn send_request(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: Option<Value>,
) -> Result<Resp, reqwest::Error> {
    let mut req = client
        .request(method, format!("{base}{path}"))
        .timeout(Duration::from_secs(20));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await?;
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await?;
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Resp {
        status,
        headers,
        body,
    })
}

impl TestApp {
    /// A `cozy` CLI command with this app's environment plus `extra` variables, not started yet (spawn
    /// several to run them at the same time).
    pub fn cli_command(&self, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(COZY);
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            if !extra.iter().any(|(key, _)| key == k) {
                cmd.env(k, v);
            }
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.current_dir(self.dir.path());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a `cozy` CLI command with this app's environment plus `extra` variables.
    pub fn cli_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.cli_command(args, extra).output().expect("cozy cli")
    }
}

/// Environment for a server that takes many concurrent requests: on MySQL its pool is bounded so that
/// several such servers side by side (nextest runs 4 tests at once) stay under MariaDB's default
/// `max_connections` of 151; SQLite keeps its default.
pub fn busy_pool(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::MySql => ("COZY_DB_MAX_CONNECTIONS", "24"),
        Backend::Sqlite => ("COZY_DB_MAX_CONNECTIONS", "8"),
    }
}
