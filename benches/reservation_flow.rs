//! Reserve + pay throughput on MySQL through the HTTP API, against the raw-SQL floor.
//!
//! One process run measures both sides and prints their ratio (docs/benchmarks.md, "Reservation flow"):
//!
//! - **HTTP**: the real release binary (`cozy serve`) on a fresh MySQL database with Redis sessions.
//!   `C` client loops (one user each) do `POST /v1/reservations` then `POST /v1/reservations/{id}/pay`
//!   (`sandbox_ok`), each with a fresh `Idempotency-Key`. A flow counts when both answer 2xx.
//! - **raw floor**: a bare `sqlx::MySqlPool` (same size, same session settings as cozy's pool) on a second
//!   fresh database, `C` loops issuing, per flow, the same statements cozy issues (SQL text copied from
//!   `src/reservations/repo.rs`, `src/idempotency/mod.rs`, `src/payments/sandbox.rs`, `src/outbox.rs`):
//!   no HTTP, no `Any` driver, no sessions, no JSON parsing of requests.
//!
//! Rounds alternate HTTP, raw, HTTP, raw … so that slow drifts of a shared machine hit both sides alike.
//! Each round runs a warm-up, then counts the flows completed inside a fixed window.
//!
//! Environment: `COZY_TEST_MYSQL_URL` (default `mysql://cozy:cozy@127.0.0.1:3306`), `COZY_TEST_REDIS_URL`
//! (default `redis://127.0.0.1:6379`), `BENCH_SECS` (measured seconds per round, default 20),
//! `BENCH_WARMUP_SECS` (default 3), `BENCH_ROUNDS` (rounds per side, default 2), `BENCH_CONCURRENCY`
//! (default 64), `BENCH_RESOURCES` (default 64), `BENCH_KEEP_DB=1` (do not drop the databases).
//!
//! Run: `eval "$(scripts/ensure-services)"; BENCH_SECS=15 cargo bench --bench reservation_flow`

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::mysql::{MySqlConnection, MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{Connection, Executor, MySql, Row, Transaction};

const COZY: &str = env!("CARGO_BIN_EXE_cozy");

// ------------------------------------------------------------------------------------------ settings

struct Settings {
    secs: u64,
    warmup_secs: u64,
    rounds: usize,
    concurrency: usize,
    resources: usize,
    mysql_base: String,
    redis_url: String,
    keep_db: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}: expected a number, got {v:?}")),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let s = Settings {
            secs: env_num("BENCH_SECS", 20)?,
            warmup_secs: env_num("BENCH_WARMUP_SECS", 3)?,
            rounds: env_num("BENCH_ROUNDS", 2)?,
            concurrency: env_num("BENCH_CONCURRENCY", 64)?,
            resources: env_num("BENCH_RESOURCES", 64)?,
            mysql_base: std::env::var("COZY_TEST_MYSQL_URL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "mysql://cozy:cozy@127.0.0.1:3306".into())
                .trim_end_matches('/')
                .to_string(),
            redis_url: std::env::var("COZY_TEST_REDIS_URL")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            keep_db: std::env::var_os("BENCH_KEEP_DB").is_some(),
        };
        if s.secs == 0 || s.rounds == 0 || s.concurrency == 0 || s.resources == 0 {
            bail!(
                "BENCH_SECS, BENCH_ROUNDS, BENCH_CONCURRENCY and BENCH_RESOURCES must be positive"
            );
        }
        Ok(s)
    }
}

// ------------------------------------------------------------------------------------------ driver

/// One side of the comparison: something that runs one reserve + pay flow for client `client`.
trait Side: Send + Sync + 'static {
    fn flow(
        &self,
        client: usize,
        rng: &mut StdRng,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// What one measured window produced.
#[derive(Default)]
struct Stats {
    flows: u64,
    errors: u64,
    window: Duration,
    latencies_us: Vec<u64>,
    first_errors: Vec<String>,
    probe: Option<Delta>,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.flows as f64 / self.window.as_secs_f64()
    }

    fn merge(all: &[&Stats]) -> Stats {
        let mut m = Stats::default();
        for s in all {
            m.flows += s.flows;
            m.errors += s.errors;
            m.window += s.window;
            m.latencies_us.extend_from_slice(&s.latencies_us);
            if let Some(d) = &s.probe {
                m.probe = Some(match m.probe.take() {
                    Some(acc) => acc.add(d),
                    None => d.clone(),
                });
            }
            for e in &s.first_errors {
                if m.first_errors.len() < 5 {
                    m.first_errors.push(e.clone());
                }
            }
        }
        m.latencies_us.sort_unstable();
        m
    }

    /// Latency percentile in milliseconds (`latencies_us` must be sorted).
    fn pct_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, self.latencies_us.len())
            - 1;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Runs `concurrency` client loops for warm-up + window and counts the flows that completed in the window.
async fn drive<S: Side>(
    side: Arc<S>,
    s: &Settings,
    seed: u64,
    probe: Arc<Probe>,
) -> anyhow::Result<Stats> {
    let started = Instant::now();
    let measure_from = started + Duration::from_secs(s.warmup_secs);
    let until = measure_from + Duration::from_secs(s.secs);
    let watcher = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let a = probe.snap().await;
        tokio::time::sleep_until(until.into()).await;
        let b = probe.snap().await;
        b.minus(&a)
    });
    let mut tasks = Vec::with_capacity(s.concurrency);
    for client in 0..s.concurrency {
        let side = side.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ (client as u64).wrapping_mul(0x9e37_79b9));
            let mut st = Stats::default();
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let outcome = side.flow(client, &mut rng).await;
                let t1 = Instant::now();
                if t1 < measure_from || t1 > until {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        st.flows += 1;
                        st.latencies_us.push((t1 - t0).as_micros() as u64);
                    }
                    Err(e) => {
                        st.errors += 1;
                        if st.first_errors.len() < 3 {
                            st.first_errors.push(e);
                        }
                    }
                }
            }
            st
        }));
    }
    let mut parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        parts.push(t.await.context("client task panicked")?);
    }
    let mut stats = Stats::merge(&parts.iter().collect::<Vec<_>>());
    stats.window = Duration::from_secs(s.secs);
    stats.probe = watcher.await.ok();
    Ok(stats)
}

// ------------------------------------------------------------------------------------------ probe

/// MariaDB's global counters and the CPU time of the processes involved, read at both ends of a window.
/// The counters are server-wide, so anything else using the server meanwhile shows up in them too.
struct Probe {
    mysql_base: String,
    /// (label, pid) of the processes whose CPU time is reported.
    pids: Vec<(&'static str, u32)>,
}

const COUNTERS: [&str; 4] = [
    "Questions",
    "Com_commit",
    "Innodb_row_lock_waits",
    "Innodb_row_lock_time",
];

#[derive(Clone, Default)]
struct Delta {
    secs: f64,
    counters: Vec<i64>,
    /// CPU seconds per labelled process, in `Probe::pids` order.
    cpu: Vec<f64>,
    /// Whole-machine busy and total CPU seconds (all cores), from /proc/stat.
    machine_busy: f64,
    machine_total: f64,
}

impl Delta {
    fn minus(&self, earlier: &Delta) -> Delta {
        let sub = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect();
        Delta {
            secs: self.secs - earlier.secs,
            counters: self
                .counters
                .iter()
                .zip(&earlier.counters)
                .map(|(a, b)| a - b)
                .collect(),
            cpu: sub(&self.cpu, &earlier.cpu),
            machine_busy: self.machine_busy - earlier.machine_busy,
            machine_total: self.machine_total - earlier.machine_total,
        }
    }

    fn add(&self, other: &Delta) -> Delta {
        let sum = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect();
        Delta {
            secs: self.secs + other.secs,
            counters: self
                .counters
                .iter()
                .zip(&other.counters)
                .map(|(a, b)| a + b)
                .collect(),
            cpu: sum(&self.cpu, &other.cpu),
            machine_busy: self.machine_busy + other.machine_busy,
            machine_total: self.machine_total + other.machine_total,
        }
    }
}

/// Clock ticks per second of /proc CPU times (`getconf CLK_TCK`; 100 on Linux).
const CLK_TCK: f64 = 100.0;

fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 13 {
        return f64::NAN;
    }
    (f[11] + f[12]) / CLK_TCK
}

fn machine_cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (f64::NAN, f64::NAN);
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((total - idle) / CLK_TCK, total / CLK_TCK)
}

/// The pid of a local process by its exact command name (e.g. `mariadbd`), if there is one.
fn pid_of(names: &[&str]) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        names.contains(&comm.trim()).then_some(pid)
    })
}

impl Probe {
    async fn snap(&self) -> Delta {
        let mut counters = vec![0; COUNTERS.len()];
        if let Ok(mut conn) = MySqlConnection::connect(&format!("{}/mysql", self.mysql_base)).await
        {
            if let Ok(rows) = sqlx::query("SHOW GLOBAL STATUS").fetch_all(&mut conn).await {
                for row in rows {
                    let name: String = row.get(0);
                    if let Some(i) = COUNTERS.iter().position(|c| c.eq_ignore_ascii_case(&name)) {
                        counters[i] = row.get::<String, _>(1).parse().unwrap_or(0);
                    }
                }
            }
            let _ = conn.close().await;
        }
        let (machine_busy, machine_total) = machine_cpu_secs();
        Delta {
            secs: epoch_secs(),
            counters,
            cpu: self
                .pids
                .iter()
                .map(|(_, pid)| proc_cpu_secs(*pid))
                .collect(),
            machine_busy,
            machine_total,
        }
    }
}

fn epoch_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

// ------------------------------------------------------------------------------------------ HTTP side

struct Http {
    base: String,
    client: reqwest::Client,
    tokens: Vec<String>,
    resources: Vec<i64>,
    seq: AtomicU64,
}

impl Http {
    async fn post(
        &self,
        path: &str,
        token: &str,
        key: &str,
        body: String,
    ) -> Result<(u16, Value), String> {
        let res = self
            .client
            .post(format!("{}{}", self.base, path))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        let status = res.status().as_u16();
        let bytes = res.bytes().await.map_err(|e| format!("POST {path}: {e}"))?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

impl Side for Http {
    async fn flow(&self, client: usize, rng: &mut StdRng) -> Result<(), String> {
        let token = &self.tokens[client];
        let resource = self.resources[rng.gen_range(0..self.resources.len())];
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let (status, body) = self
            .post(
                "/v1/reservations",
                token,
                &format!("bench-reserve-{n}"),
                format!(r#"{{"resource_id":{resource},"quantity":1}}"#),
            )
            .await?;
        if status != 201 {
            return Err(format!("reserve: {status} {body}"));
        }
        let id = body["id"]
            .as_i64()
            .ok_or_else(|| format!("reserve: no id in {body}"))?;
        let (status, body) = self
            .post(
                &format!("/v1/reservations/{id}/pay"),
                token,
                &format!("bench-pay-{n}"),
                r#"{"payment_method":"sandbox_ok"}"#.to_string(),
            )
            .await?;
        if status != 200 || body["state"] != "PAID" {
            return Err(format!("pay: {status} {body}"));
        }
        Ok(())
    }
}

/// The real server, killed on drop.
struct Server {
    child: Option<Child>,
    base: String,
    log: PathBuf,
}

impl Server {
    fn start(env: &[(String, String)], log: PathBuf) -> anyhow::Result<Server> {
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(COZY);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file));
        let mut child = cmd.spawn().context("spawn cozy serve")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            let mut sink = String::new();
            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let mut server = Server {
            child: Some(child),
            base: String::new(),
            log,
        };
        match line.trim().strip_prefix("cozy listening on ") {
            Some(base) => server.base = base.to_string(),
            None => {
                server.stop();
                bail!("cozy serve did not start: {line:?}\n{}", server.log_tail());
            }
        }
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM (graceful), then SIGKILL if it has not exited within 5 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cli(env: &[(String, String)], args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new(COZY);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn cozy {args:?}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "cozy {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn json_call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Value,
    expect: u16,
) -> anyhow::Result<Value> {
    let mut req = client.request(method, &url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.with_context(|| url.clone())?;
    let status = res.status().as_u16();
    let value: Value = res.json().await.unwrap_or(Value::Null);
    if status != expect {
        bail!("{url}: expected {expect}, got {status}: {value}");
    }
    Ok(value)
}

/// Starts the server, makes the admin, the resources and one logged-in user per client.
async fn setup_http(
    s: &Settings,
    env: &[(String, String)],
    log: PathBuf,
) -> anyhow::Result<(Server, Http, String)> {
    let server = Server::start(env, log)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(s.concurrency * 2)
        .tcp_nodelay(true)
        .build()?;
    let base = server.base.clone();
    cli(
        env,
        &[
            "users",
            "add",
            "admin@bench.invalid",
            "--admin",
            "--password-stdin",
        ],
        Some("bench admin password\n"),
    )?;
    let login = |email: String, password: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let v = json_call(
                &client,
                reqwest::Method::POST,
                format!("{base}/v1/sessions"),
                None,
                json!({"email": email, "password": password}),
                201,
            )
            .await?;
            v["token"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no token in {v}"))
        }
    };
    let admin = login("admin@bench.invalid".into(), "bench admin password").await?;
    let mut resources = Vec::with_capacity(s.resources);
    for i in 0..s.resources {
        let v = json_call(
            &client,
            reqwest::Method::POST,
            format!("{base}/v1/resources"),
            Some(&admin),
            json!({"name": format!("Bench {i}"), "capacity": CAPACITY, "price_cents": PRICE_CENTS,
                   "currency": CURRENCY, "hold_seconds": HOLD_SECONDS}),
            201,
        )
        .await?;
        resources.push(v["id"].as_i64().ok_or_else(|| anyhow!("no id in {v}"))?);
    }
    let users = futures::future::try_join_all((0..s.concurrency).map(|i| {
        let (client, base, login) = (client.clone(), base.clone(), &login);
        async move {
            let email = format!("client{i}@bench.invalid");
            json_call(
                &client,
                reqwest::Method::POST,
                format!("{base}/v1/users"),
                None,
                json!({"email": email, "password": "bench password"}),
                201,
            )
            .await?;
            login(email, "bench password").await
        }
    }))
    .await?;
    let http = Http {
        base,
        client,
        tokens: users,
        resources,
        seq: AtomicU64::new(0),
    };
    Ok((server, http, admin))
}

// ------------------------------------------------------------------------------------------ raw floor

const CAPACITY: i64 = 1_000_000_000;
const PRICE_CENTS: i64 = 2500;
const CURRENCY: &str = "EUR";
const HOLD_SECONDS: i64 = 3600;
/// cozy's default idempotency lease (config.rs: idempotency_lease_secs 60).
const LEASE_MS: i64 = 60_000;

// The statements, verbatim from cozy (MySQL dialect: `FOR UPDATE` appended where cozy's Dialect does).
const IDEM_BEGIN: &str = "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, status, created_at, locked_until) \
                 VALUES (?, ?, ?, 'running', ?, ?)";
const IDEM_COMPLETE: &str =
    "UPDATE idempotency_keys SET status = 'done', response_status = ?, response_body = ? \
         WHERE user_id = ? AND idem_key = ? AND status = 'running'";
const RESOURCE_LOCK: &str =
    "SELECT capacity, price_cents, currency, hold_seconds FROM resources WHERE id = ? FOR UPDATE";
const OVERDUE_LOCK: &str = "SELECT id, resource_id, user_id, quantity, state, expires_at, amount_cents, currency FROM reservations \
                 WHERE resource_id = ? AND state = 'RESERVED' AND expires_at <= ? ORDER BY id LIMIT 200 FOR UPDATE";
const TAKE_CAPACITY: &str =
    "UPDATE resources SET held = held + ? WHERE id = ? AND held + ? <= capacity";
const INSERT_RESERVATION: &str = "INSERT INTO reservations (resource_id, user_id, quantity, state, amount_cents, currency, expires_at, \
             created_at, updated_at, request_key) VALUES (?, ?, ?, 'RESERVED', ?, ?, ?, ?, ?, ?)";
const INSERT_EVENT: &str = "INSERT INTO reservation_events (reservation_id, from_state, to_state, at, cause) VALUES (?, ?, ?, ?, ?)";
const INSERT_OUTBOX: &str =
    "INSERT INTO outbox (topic, kind, payload, created_at) VALUES (?, ?, ?, ?)";
const RESERVATION_LOCK: &str = "SELECT id, resource_id, user_id, quantity, state, expires_at, amount_cents, currency FROM reservations \
             WHERE id = ? AND (user_id = ? OR ? = 0) FOR UPDATE";
const MARK_PAYMENT: &str =
    "UPDATE reservations SET payment_started_at = ? WHERE id = ? AND state = 'RESERVED'";
const LEDGER_LOOKUP: &str =
    "SELECT id, amount_cents, currency, created_at FROM sandbox_ledger WHERE idem_key = ?";
const LEDGER_INSERT: &str = "INSERT INTO sandbox_ledger (idem_key, amount_cents, currency, method, created_at) VALUES (?, ?, ?, ?, ?)";
const MARK_PAID: &str =
    "UPDATE reservations SET state = 'PAID', updated_at = ? WHERE id = ? AND state = 'RESERVED'";
const INSERT_CHARGE: &str = "INSERT INTO charges (reservation_id, provider, provider_ref, amount_cents, currency, captured_at) \
             VALUES (?, ?, ?, ?, ?, ?)";
/// repo.rs `record`: the reservation as the API shows it plus the resource's `available`, read in the
/// transition's transaction for the outbox row (the realtime frame). Binds now, id.
const RESERVATION_SNAPSHOT: &str = "SELECT r.id, r.resource_id, r.user_id, r.quantity, r.state, r.amount_cents, \
     r.currency, r.expires_at, r.created_at, r.updated_at, c.id, c.amount_cents, c.currency, c.provider_ref, \
     c.captured_at, c.refunded_at, res.capacity - (res.held - CAST(COALESCE((SELECT SUM(x.quantity) FROM reservations x \
     WHERE x.resource_id = res.id AND x.state = 'RESERVED' AND x.expires_at <= ?), 0) AS SIGNED)) \
     FROM reservations r LEFT JOIN charges c ON c.reservation_id = r.id JOIN resources res ON res.id = r.resource_id \
     WHERE r.id = ?";

/// cozy's pool: 64 connections, READ COMMITTED, the same sql_mode and time zone (src/db/mod.rs).
async fn cozy_like_pool(url: &str, size: u32) -> anyhow::Result<MySqlPool> {
    MySqlPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute(
                    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED; \
                     SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION,ERROR_FOR_DIVISION_BY_ZERO'; \
                     SET time_zone = '+00:00'",
                )
                .await?;
                Ok(())
            })
        })
        .connect(url)
        .await
        .with_context(|| format!("connect {}", redact(url)))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn request_hash(rng: &mut StdRng) -> String {
    let bytes: [u8; 32] = rng.gen();
    hex::encode(bytes)
}

fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<MySqlDatabaseError>())
        .is_some_and(|m| matches!(m.number(), 1213 | 1205))
}

/// cozy's `with_retry`: rerun a transaction on deadlock / lock wait timeout, with a short jittered pause.
async fn with_retry<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0u64;
    loop {
        match op().await {
            Err(e) if is_retryable(&e) && attempt < 20 => {
                attempt += 1;
                let jitter = rand::random::<u64>() % (5 * attempt + 1);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            other => return other,
        }
    }
}

struct Raw {
    pool: MySqlPool,
    users: Vec<i64>,
    resources: Vec<i64>,
    seq: AtomicU64,
}

/// The locked essentials of a reservation (repo.rs `Locked`).
struct Locked {
    id: i64,
    resource_id: i64,
    user_id: i64,
    quantity: i64,
    state: String,
    expires_at: i64,
    amount_cents: i64,
    currency: String,
}

fn locked_from_row(row: &sqlx::mysql::MySqlRow) -> Locked {
    Locked {
        id: row.get(0),
        resource_id: row.get(1),
        user_id: row.get(2),
        quantity: row.get(3),
        state: row.get(4),
        expires_at: row.get(5),
        amount_cents: row.get(6),
        currency: row.get(7),
    }
}

/// The reservation as cozy serialises it (model.rs `Reservation`), from `RESERVATION_BY_ID`'s row.
fn reservation_json(row: &sqlx::mysql::MySqlRow) -> String {
    let payment = row.get::<Option<i64>, _>(10).map(|id| {
        json!({
            "id": id,
            "amount_cents": row.get::<i64, _>(11),
            "currency": row.get::<String, _>(12),
            "provider_ref": row.get::<String, _>(13),
            "captured_at": rfc3339(row.get(14)),
            "refunded_at": row.get::<Option<i64>, _>(15).map(rfc3339),
        })
    });
    json!({
        "id": row.get::<i64, _>(0),
        "resource_id": row.get::<i64, _>(1),
        "user_id": row.get::<i64, _>(2),
        "quantity": row.get::<i64, _>(3),
        "state": row.get::<String, _>(4),
        "amount_cents": row.get::<i64, _>(5),
        "currency": row.get::<String, _>(6),
        "expires_at": rfc3339(row.get(7)),
        "created_at": rfc3339(row.get(8)),
        "updated_at": rfc3339(row.get(9)),
        "payment": payment,
    })
    .to_string()
}

/// repo.rs `record`: the transition log row, the snapshot read and the outbox row, in the caller's
/// transaction; returns the reservation's JSON (the response body).
async fn record(
    tx: &mut Transaction<'static, MySql>,
    l: &Locked,
    from: Option<&str>,
    to: &str,
    now: i64,
    cause: &str,
) -> Result<String, sqlx::Error> {
    sqlx::query(INSERT_EVENT)
        .bind(l.id)
        .bind(from)
        .bind(to)
        .bind(now)
        .bind(cause)
        .execute(&mut **tx)
        .await?;
    let row = sqlx::query(RESERVATION_SNAPSHOT)
        .bind(now)
        .bind(l.id)
        .fetch_one(&mut **tx)
        .await?;
    let reservation = reservation_json(&row);
    let available = row.get::<i64, _>(16).max(0);
    let payload = json!({
        "reservation_id": l.id,
        "resource_id": l.resource_id,
        "user_id": l.user_id,
        "from": from,
        "to": to,
        "quantity": l.quantity,
        "at": rfc3339(now),
        "cause": cause,
        "reservation": serde_json::from_str::<serde_json::Value>(&reservation).unwrap_or_default(),
        "available": available,
    })
    .to_string();
    sqlx::query(INSERT_OUTBOX)
        .bind(format!("user:{}", l.user_id))
        .bind("reservation")
        .bind(payload)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(reservation)
}

impl Raw {
    /// idempotency.rs `begin`: claim the key (autocommit, on the pool).
    async fn claim(&self, user: i64, key: &str, hash: &str) -> Result<(), sqlx::Error> {
        let now = now_ms();
        sqlx::query(IDEM_BEGIN)
            .bind(user)
            .bind(key)
            .bind(hash)
            .bind(now)
            .bind(now + LEASE_MS)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// repo.rs `reserve_once`, MySQL path, no overdue holds (hold_seconds is an hour).
    async fn reserve(&self, user: i64, resource: i64, key: &str) -> Result<i64, sqlx::Error> {
        let now = now_ms();
        let quantity = 1i64;
        let mut tx = self.pool.begin().await?;
        let res = sqlx::query(RESOURCE_LOCK)
            .bind(resource)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let (price, currency, hold): (i64, String, i64) = (res.get(1), res.get(2), res.get(3));
        let overdue = sqlx::query(OVERDUE_LOCK)
            .bind(resource)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        if !overdue.is_empty() {
            return Err(sqlx::Error::Protocol("unexpected overdue holds".into()));
        }
        let took = sqlx::query(TAKE_CAPACITY)
            .bind(quantity)
            .bind(resource)
            .bind(quantity)
            .execute(&mut *tx)
            .await?;
        if took.rows_affected() == 0 {
            return Err(sqlx::Error::Protocol("sold out".into()));
        }
        let expires_at = now + hold * 1000;
        let amount = price * quantity;
        let id = sqlx::query(INSERT_RESERVATION)
            .bind(resource)
            .bind(user)
            .bind(quantity)
            .bind(amount)
            .bind(&currency)
            .bind(expires_at)
            .bind(now)
            .bind(now)
            .bind(key)
            .execute(&mut *tx)
            .await?
            .last_insert_id() as i64;
        let locked = Locked {
            id,
            resource_id: resource,
            user_id: user,
            quantity,
            state: "RESERVED".into(),
            expires_at,
            amount_cents: amount,
            currency: currency.clone(),
        };
        let body = record(&mut tx, &locked, None, "RESERVED", now, "reserved").await?;
        sqlx::query(IDEM_COMPLETE)
            .bind(201i64)
            .bind(body)
            .bind(user)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// repo.rs `begin_payment`.
    async fn begin_payment(&self, user: i64, id: i64, now: i64) -> Result<Locked, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(RESERVATION_LOCK)
            .bind(id)
            .bind(user)
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let locked = locked_from_row(&row);
        if locked.state != "RESERVED" || locked.expires_at <= now {
            return Err(sqlx::Error::Protocol(format!(
                "cannot pay a {} hold",
                locked.state
            )));
        }
        sqlx::query(MARK_PAYMENT)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(locked)
    }

    /// sandbox.rs `lookup`.
    async fn ledger_lookup(
        &self,
        key: &str,
    ) -> Result<Option<(String, i64, String, i64)>, sqlx::Error> {
        let row = sqlx::query(LEDGER_LOOKUP)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| {
            (
                format!("sbx_{}", r.get::<i64, _>(0)),
                r.get(1),
                r.get(2),
                r.get(3),
            )
        }))
    }

    /// sandbox.rs `do_charge` for `sandbox_ok`: lookup, insert, lookup (autocommit, on the pool).
    async fn charge(
        &self,
        key: &str,
        amount: i64,
        currency: &str,
    ) -> Result<(String, i64, String, i64), sqlx::Error> {
        if let Some(existing) = self.ledger_lookup(key).await? {
            return Ok(existing);
        }
        sqlx::query(LEDGER_INSERT)
            .bind(key)
            .bind(amount)
            .bind(currency)
            .bind("sandbox_ok")
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        self.ledger_lookup(key)
            .await?
            .ok_or_else(|| sqlx::Error::Protocol("ledger row vanished".into()))
    }

    /// repo.rs `settle_payment`.
    async fn settle(
        &self,
        user: i64,
        id: i64,
        charge: &(String, i64, String, i64),
        key: &str,
    ) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(RESERVATION_LOCK)
            .bind(id)
            .bind(user)
            .bind(user)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let locked = locked_from_row(&row);
        if locked.state != "RESERVED" {
            return Err(sqlx::Error::Protocol(format!(
                "cannot pay a {} hold",
                locked.state
            )));
        }
        let moved = sqlx::query(MARK_PAID)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() != 1 {
            return Err(sqlx::Error::Protocol("lost the PAID transition".into()));
        }
        sqlx::query(INSERT_CHARGE)
            .bind(id)
            .bind("sandbox")
            .bind(&charge.0)
            .bind(charge.1)
            .bind(&charge.2)
            .bind(charge.3)
            .execute(&mut *tx)
            .await?;
        let body = record(&mut tx, &locked, Some("RESERVED"), "PAID", now, "paid").await?;
        sqlx::query(IDEM_COMPLETE)
            .bind(200i64)
            .bind(body)
            .bind(user)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Side for Raw {
    async fn flow(&self, client: usize, rng: &mut StdRng) -> Result<(), String> {
        let user = self.users[client];
        let resource = self.resources[rng.gen_range(0..self.resources.len())];
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let err = |what: &str| {
            let what = what.to_string();
            move |e: sqlx::Error| format!("{what}: {e}")
        };
        // POST /v1/reservations
        let key = format!("bench-reserve-{n}");
        self.claim(user, &key, &request_hash(rng))
            .await
            .map_err(err("reserve key"))?;
        let id = with_retry(|| self.reserve(user, resource, &key))
            .await
            .map_err(err("reserve"))?;
        // POST /v1/reservations/{id}/pay
        let key = format!("bench-pay-{n}");
        self.claim(user, &key, &request_hash(rng))
            .await
            .map_err(err("pay key"))?;
        let requested_at = now_ms();
        let locked = with_retry(|| self.begin_payment(user, id, requested_at))
            .await
            .map_err(err("begin payment"))?;
        let charge = self
            .charge(
                &format!("cozy-reservation-{id}"),
                locked.amount_cents,
                &locked.currency,
            )
            .await
            .map_err(err("charge"))?;
        with_retry(|| self.settle(user, id, &charge, &key))
            .await
            .map_err(err("settle payment"))?;
        Ok(())
    }
}

async fn setup_raw(s: &Settings, url: &str) -> anyhow::Result<Raw> {
    let pool = cozy_like_pool(url, 64).await?;
    let now = now_ms();
    let mut resources = Vec::with_capacity(s.resources);
    for i in 0..s.resources {
        let r = sqlx::query(
            "INSERT INTO resources (name, capacity, held, price_cents, currency, hold_seconds, created_at) \
             VALUES (?, ?, 0, ?, ?, ?, ?)",
        )
        .bind(format!("Bench {i}"))
        .bind(CAPACITY)
        .bind(PRICE_CENTS)
        .bind(CURRENCY)
        .bind(HOLD_SECONDS)
        .bind(now)
        .execute(&pool)
        .await?;
        resources.push(r.last_insert_id() as i64);
    }
    let mut users = Vec::with_capacity(s.concurrency);
    for i in 0..s.concurrency {
        let r = sqlx::query(
            "INSERT INTO users (email, password_hash, role, created_at) VALUES (?, ?, 'user', ?)",
        )
        .bind(format!("client{i}@bench.invalid"))
        .bind("not-a-hash (raw floor users never log in)")
        .bind(now)
        .execute(&pool)
        .await?;
        users.push(r.last_insert_id() as i64);
    }
    Ok(Raw {
        pool,
        users,
        resources,
        seq: AtomicU64::new(0),
    })
}

// ------------------------------------------------------------------------------------------ databases

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_string(),
    }
}

async fn admin_conn(base: &str) -> anyhow::Result<MySqlConnection> {
    MySqlConnection::connect(&format!("{base}/mysql"))
        .await
        .with_context(|| {
            format!(
                "cannot reach MySQL at {} (run: eval \"$(scripts/ensure-services)\")",
                redact(base)
            )
        })
}

async fn create_db(base: &str, name: &str) -> anyhow::Result<String> {
    let mut conn = admin_conn(base).await?;
    conn.execute(format!("CREATE DATABASE `{name}`").as_str())
        .await?;
    conn.close().await?;
    Ok(format!("{base}/{name}"))
}

async fn drop_db(base: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = admin_conn(base).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS `{name}`").as_str())
        .await?;
    conn.close().await?;
    Ok(())
}

async fn count(url: &str, sql: &str) -> anyhow::Result<i64> {
    let mut conn = MySqlConnection::connect(url).await?;
    let n: i64 = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(n)
}

// ------------------------------------------------------------------------------------------ main

/// Where the time went, per side, over all measured windows: MariaDB's counters per flow and CPU use.
fn print_probe(probe: &Probe, sides: &[(&str, &Stats)]) {
    println!(
        "per flow (MariaDB global counters, measured windows only): statements, commits, row-lock waits, row-lock ms"
    );
    for (side, st) in sides {
        let Some(d) = &st.probe else { continue };
        let per = |i: usize| d.counters[i] as f64 / st.flows.max(1) as f64;
        println!(
            "  {side:<5} {:>6.1} stmts {:>5.2} commits {:>5.2} lock waits {:>7.1} lock ms",
            per(0),
            per(1),
            per(2),
            per(3)
        );
    }
    println!("CPU (% of one core, and CPU ms per flow) during the measured windows:");
    for (side, st) in sides {
        let Some(d) = &st.probe else { continue };
        let flows = st.flows.max(1) as f64;
        let mut parts = vec![format!(
            "machine {:.0}% of {:.0} cores",
            100.0 * d.machine_busy / d.machine_total,
            (d.machine_total / d.secs).round()
        )];
        for ((label, _), cpu) in probe.pids.iter().zip(&d.cpu) {
            parts.push(format!(
                "{label} {:.0}% ({:.2} ms)",
                100.0 * cpu / d.secs,
                1000.0 * cpu / flows
            ));
        }
        println!("  {side:<5} {}", parts.join(", "));
    }
}

fn suffix() -> String {
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| char::from(b'a' + rng.gen_range(0..26)))
        .collect()
}

fn cozy_env(url: &str, s: &Settings, dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("COZY_DATABASE_URL".into(), url.into()),
        ("COZY_REDIS_URL".into(), s.redis_url.clone()),
        ("COZY_RUN_DIR".into(), dir.join("run").display().to_string()),
        (
            "COZY_DATA_DIR".into(),
            dir.join("data").display().to_string(),
        ),
        // Cheap argon2id: only setup logs in, and logins are not measured.
        ("COZY_ARGON2_MEMORY_KIB".into(), "256".into()),
        ("COZY_ARGON2_ITERATIONS".into(), "1".into()),
        // Setup signs up and logs in one user per client from 127.0.0.1: out of the login limit's way.
        ("COZY_AUTH_RATE_PER_MINUTE".into(), "600000".into()),
        ("COZY_AUTH_BURST".into(), "100000".into()),
        ("COZY_LOG_FORMAT".into(), "json".into()),
    ]
}

#[tokio::main]
async fn main() {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("reservation_flow: {e:#}");
            std::process::exit(2);
        }
    };
    let tag = suffix();
    let http_db = format!("cozy_bench_http_{tag}");
    let raw_db = format!("cozy_bench_raw_{tag}");
    let outcome = run(&settings, &http_db, &raw_db).await;
    if settings.keep_db {
        eprintln!("kept databases {http_db} and {raw_db} (BENCH_KEEP_DB)");
    } else {
        for db in [&http_db, &raw_db] {
            if let Err(e) = drop_db(&settings.mysql_base, db).await {
                eprintln!("reservation_flow: could not drop {db}: {e:#}");
            }
        }
    }
    if let Err(e) = outcome {
        eprintln!("reservation_flow: {e:#}");
        std::process::exit(1);
    }
}

async fn run(s: &Settings, http_db: &str, raw_db: &str) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let http_url = create_db(&s.mysql_base, http_db).await?;
    let raw_url = create_db(&s.mysql_base, raw_db).await?;
    let http_env = cozy_env(&http_url, s, dir.path());
    let raw_env = cozy_env(&raw_url, s, dir.path());
    cli(&http_env, &["migrate", "up"], None)?;
    cli(&raw_env, &["migrate", "up"], None)?;

    let (mut server, http, admin) = setup_http(s, &http_env, dir.path().join("server.log")).await?;
    let raw = setup_raw(s, &raw_url).await?;
    let (http, raw) = (Arc::new(http), Arc::new(raw));
    let mut pids = vec![("cozy serve", server.pid()), ("bench", std::process::id())];
    pids.extend(pid_of(&["mariadbd", "mysqld"]).map(|p| ("mariadbd", p)));
    pids.extend(pid_of(&["redis-server"]).map(|p| ("redis", p)));
    let probe = Arc::new(Probe {
        mysql_base: s.mysql_base.clone(),
        pids,
    });

    println!(
        "reservation_flow: reserve + pay on MySQL, concurrency {}, {} resources, {} rounds per side of \
         {} s measured after {} s warm-up",
        s.concurrency, s.resources, s.rounds, s.secs, s.warmup_secs
    );
    println!(
        "{:<6} {:<5} {:>8} {:>10} {:>8} {:>8} {:>7}",
        "round", "side", "flows", "flows/s", "p50 ms", "p99 ms", "errors"
    );
    let row = |round: &str, side: &str, st: &Stats| {
        println!(
            "{:<6} {:<5} {:>8} {:>10.1} {:>8.2} {:>8.2} {:>7}",
            round,
            side,
            st.flows,
            st.rate(),
            st.pct_ms(0.50),
            st.pct_ms(0.99),
            st.errors
        );
    };
    let mut http_rounds = Vec::new();
    let mut raw_rounds = Vec::new();
    for round in 0..s.rounds {
        let h = drive(http.clone(), s, 1000 + round as u64, probe.clone()).await?;
        row(&format!("{}", round + 1), "http", &h);
        let r = drive(raw.clone(), s, 2000 + round as u64, probe.clone()).await?;
        row(&format!("{}", round + 1), "raw", &r);
        http_rounds.push(h);
        raw_rounds.push(r);
    }
    let h = Stats::merge(&http_rounds.iter().collect::<Vec<_>>());
    let r = Stats::merge(&raw_rounds.iter().collect::<Vec<_>>());
    row("all", "http", &h);
    row("all", "raw", &r);
    let ratio = h.rate() / r.rate();
    let per_round: Vec<String> = http_rounds
        .iter()
        .zip(&raw_rounds)
        .map(|(h, r)| format!("{:.2}", h.rate() / r.rate()))
        .collect();
    println!(
        "ratio HTTP/raw = {:.1} / {:.1} = {:.2} (per round: {}; goal >= 0.70: {})",
        h.rate(),
        r.rate(),
        ratio,
        per_round.join(", "),
        if ratio >= 0.7 { "met" } else { "NOT met" }
    );
    for (side, st) in [("http", &h), ("raw", &r)] {
        for e in &st.first_errors {
            println!("  {side} error: {e}");
        }
    }
    print_probe(&probe, &[("http", &h), ("raw", &r)]);

    // Sanity: both databases hold one PAID reservation with one charge per completed flow (warm-up
    // included), and cozy's own audit finds no broken invariant in either.
    for (side, url, env) in [("http", &http_url, &http_env), ("raw", &raw_url, &raw_env)] {
        let paid = count(
            url,
            "SELECT COUNT(*) FROM reservations WHERE state = 'PAID'",
        )
        .await?;
        let charges = count(url, "SELECT COUNT(*) FROM charges").await?;
        let audit = cli(env, &["audit", "--json"], None)
            .map(|out| serde_json::from_str::<Value>(&out).unwrap_or(Value::Null)["ok"] == true)
            .unwrap_or(false);
        println!("  {side} database: {paid} PAID reservations, {charges} charges, cozy audit ok: {audit}");
    }

    // Revoke the sessions (they live in the shared Redis), then stop the server.
    let mut tokens = http.tokens.clone();
    tokens.push(admin);
    let revoke = tokens.iter().map(|t| {
        http.client
            .delete(format!("{}/v1/sessions/current", http.base))
            .bearer_auth(t)
            .send()
    });
    let _ = futures::future::join_all(revoke).await;
    server.stop();
    raw.pool.close().await;
    Ok(())
}
