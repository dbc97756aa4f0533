//! Configuration: `cozy.yaml`, then the environment, then flags, validated once into [`Settings`].
//!
//! Precedence is flags > environment (`COZY_*`) > file > defaults. Every source is parsed into the same
//! optional [`Layer`], layers are merged, and only then validated, so an error always names where the bad
//! value came from: `cozy.yaml:3:7: unknown field ...`, or `COZY_LISTEN: invalid socket address`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::http::forwarded::TrustedProxies;

/// A configuration problem, naming the place at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}:{line}:{column}: {message}")]
    File {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{source_name}: {message}")]
    Value {
        source_name: String,
        message: String,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    Pretty,
    /// One JSON object per line (the daemon's default when not on a terminal).
    Json,
}

/// One source of settings; every field optional so sources can be layered.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub database_url: Option<String>,
    pub redis_url: Option<String>,
    pub listen: Option<String>,
    pub run_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub workers: Option<usize>,
    pub session_ttl_secs: Option<u64>,
    pub idempotency_retention_secs: Option<u64>,
    pub idempotency_lease_secs: Option<u64>,
    pub gateway_delay_ms: Option<u64>,
    pub gateway_timeout_ms: Option<u64>,
    pub argon2_memory_kib: Option<u32>,
    pub argon2_iterations: Option<u32>,
    pub request_timeout_secs: Option<u64>,
    pub db_max_connections: Option<u32>,
    pub drain_timeout_secs: Option<u64>,
    pub ready_timeout_secs: Option<u64>,
    pub crash_limit: Option<u32>,
    pub crash_window_secs: Option<u64>,
    pub healthy_after_secs: Option<u64>,
    pub max_memory: Option<String>,
    pub realtime_history_count: Option<u64>,
    pub realtime_history_secs: Option<u64>,
    pub realtime_heartbeat_ms: Option<u64>,
    pub realtime_queue_frames: Option<usize>,
    pub realtime_presence_ttl_secs: Option<u64>,
    pub realtime_rate_per_sec: Option<u32>,
    pub trusted_proxies: Option<TrustedProxies>,
    pub auth_rate_per_minute: Option<u32>,
    pub auth_burst: Option<u32>,
    /// The `nginx:` block of cozy.yaml is read by `cozy nginx render`, which validates it itself with
    /// file:line:col; the daemon accepts it here (so `deny_unknown_fields` lets the file load) and
    /// ignores it.
    pub nginx: Option<serde_yaml_ng::Value>,
}

impl Layer {
    /// Values of `other` win over `self`.
    fn overlay(self, other: Layer) -> Layer {
        Layer {
            database_url: other.database_url.or(self.database_url),
            redis_url: other.redis_url.or(self.redis_url),
            listen: other.listen.or(self.listen),
            run_dir: other.run_dir.or(self.run_dir),
            data_dir: other.data_dir.or(self.data_dir),
            log_format: other.log_format.or(self.log_format),
            workers: other.workers.or(self.workers),
            session_ttl_secs: other.session_ttl_secs.or(self.session_ttl_secs),
            idempotency_retention_secs: other
                .idempotency_retention_secs
                .or(self.idempotency_retention_secs),
            idempotency_lease_secs: other.idempotency_lease_secs.or(self.idempotency_lease_secs),
            gateway_delay_ms: other.gateway_delay_ms.or(self.gateway_delay_ms),
            gateway_timeout_ms: other.gateway_timeout_ms.or(self.gateway_timeout_ms),
            argon2_memory_kib: other.argon2_memory_kib.or(self.argon2_memory_kib),
            argon2_iterations: other.argon2_iterations.or(self.argon2_iterations),
            request_timeout_secs: other.request_timeout_secs.or(self.request_timeout_secs),
            db_max_connections: other.db_max_connections.or(self.db_max_connections),
            drain_timeout_secs: other.drain_timeout_secs.or(self.drain_timeout_secs),
            ready_timeout_secs: other.ready_timeout_secs.or(self.ready_timeout_secs),
            crash_limit: other.crash_limit.or(self.crash_limit),
            crash_window_secs: other.crash_window_secs.or(self.crash_window_secs),
            healthy_after_secs: other.healthy_after_secs.or(self.healthy_after_secs),
            max_memory: other.max_memory.or(self.max_memory),
            realtime_history_count: other.realtime_history_count.or(self.realtime_history_count),
            realtime_history_secs: other.realtime_history_secs.or(self.realtime_history_secs),
            realtime_heartbeat_ms: other.realtime_heartbeat_ms.or(self.realtime_heartbeat_ms),
            realtime_queue_frames: other.realtime_queue_frames.or(self.realtime_queue_frames),
            realtime_presence_ttl_secs: other
                .realtime_presence_ttl_secs
                .or(self.realtime_presence_ttl_secs),
            realtime_rate_per_sec: other.realtime_rate_per_sec.or(self.realtime_rate_per_sec),
            trusted_proxies: other.trusted_proxies.or(self.trusted_proxies),
            auth_rate_per_minute: other.auth_rate_per_minute.or(self.auth_rate_per_minute),
            auth_burst: other.auth_burst.or(self.auth_burst),
            nginx: other.nginx.or(self.nginx),
        }
    }

    /// Parses a YAML file; errors carry file:line:column.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Layer, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Layer::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((1, 1));
            // serde_yaml_ng appends " at line L column C" to the message; the prefix already says it.
            let message = e.to_string();
            let message = match message.find(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            ConfigError::File {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        })
    }

    /// Reads the `COZY_*` variables through `get` (the process environment in production).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
        fn num<T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<String>,
            var: &str,
        ) -> Result<Option<T>, ConfigError> {
            match get(var) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| ConfigError::Value {
                    source_name: var.into(),
                    message: format!("expected a non-negative integer, got {v:?}"),
                }),
            }
        }
        let log_format = match get("COZY_LOG_FORMAT").as_deref() {
            None => None,
            Some("json") => Some(LogFormat::Json),
            Some("pretty") => Some(LogFormat::Pretty),
            Some(other) => {
                return Err(ConfigError::Value {
                    source_name: "COZY_LOG_FORMAT".into(),
                    message: format!("expected `pretty` or `json`, got {other:?}"),
                })
            }
        };
        Ok(Layer {
            database_url: get("COZY_DATABASE_URL").filter(|s| !s.is_empty()),
            redis_url: get("COZY_REDIS_URL").filter(|s| !s.is_empty()),
            listen: get("COZY_LISTEN"),
            run_dir: get("COZY_RUN_DIR").map(PathBuf::from),
            data_dir: get("COZY_DATA_DIR").map(PathBuf::from),
            log_format,
            workers: num(&get, "COZY_WORKERS")?,
            session_ttl_secs: num(&get, "COZY_SESSION_TTL_SECS")?,
            idempotency_retention_secs: num(&get, "COZY_IDEMPOTENCY_RETENTION_SECS")?,
            idempotency_lease_secs: num(&get, "COZY_IDEMPOTENCY_LEASE_SECS")?,
            gateway_delay_ms: num(&get, "COZY_GATEWAY_DELAY_MS")?,
            gateway_timeout_ms: num(&get, "COZY_GATEWAY_TIMEOUT_MS")?,
            argon2_memory_kib: num(&get, "COZY_ARGON2_MEMORY_KIB")?,
            argon2_iterations: num(&get, "COZY_ARGON2_ITERATIONS")?,
            request_timeout_secs: num(&get, "COZY_REQUEST_TIMEOUT_SECS")?,
            db_max_connections: num(&get, "COZY_DB_MAX_CONNECTIONS")?,
            drain_timeout_secs: num(&get, "COZY_DRAIN_TIMEOUT_SECS")?,
            ready_timeout_secs: num(&get, "COZY_READY_TIMEOUT_SECS")?,
            crash_limit: num(&get, "COZY_CRASH_LIMIT")?,
            crash_window_secs: num(&get, "COZY_CRASH_WINDOW_SECS")?,
            healthy_after_secs: num(&get, "COZY_HEALTHY_AFTER_SECS")?,
            max_memory: get("COZY_MAX_MEMORY").filter(|s| !s.is_empty()),
            realtime_history_count: num(&get, "COZY_REALTIME_HISTORY_COUNT")?,
            realtime_history_secs: num(&get, "COZY_REALTIME_HISTORY_SECS")?,
            realtime_heartbeat_ms: num(&get, "COZY_REALTIME_HEARTBEAT_MS")?,
            realtime_queue_frames: num(&get, "COZY_REALTIME_QUEUE_FRAMES")?,
            realtime_presence_ttl_secs: num(&get, "COZY_REALTIME_PRESENCE_TTL_SECS")?,
            realtime_rate_per_sec: num(&get, "COZY_REALTIME_RATE_PER_SEC")?,
            trusted_proxies: get("COZY_TRUSTED_PROXIES")
                .map(|text| {
                    TrustedProxies::parse_list(&text).map_err(|e| ConfigError::Value {
                        source_name: "COZY_TRUSTED_PROXIES".into(),
                        message: e.to_string(),
                    })
                })
                .transpose()?,
            auth_rate_per_minute: num(&get, "COZY_AUTH_RATE_PER_MINUTE")?,
            auth_burst: num(&get, "COZY_AUTH_BURST")?,
            nginx: None,
        })
    }
}

/// Which database is the system of record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// The embedded default: one SQLite file.
    Sqlite(PathBuf),
    /// MySQL 8 / MariaDB 10.6+, by URL.
    MySql(String),
}

impl DatabaseTarget {
    /// The URL sqlx connects with.
    pub fn url(&self) -> String {
        match self {
            DatabaseTarget::Sqlite(path) => format!("sqlite://{}?mode=rwc", path.display()),
            DatabaseTarget::MySql(url) => url.clone(),
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, DatabaseTarget::Sqlite(_))
    }
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy)]
pub struct PasswordCost {
    pub memory_kib: u32,
    pub iterations: u32,
}

/// Validated settings: a value of this type is a configuration cozy can run with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: DatabaseTarget,
    pub redis_url: Option<String>,
    pub listen: SocketAddr,
    pub run_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_format: Option<LogFormat>,
    pub workers: usize,
    /// `workers` was configured (flag, environment or file): `cozy serve` runs the supervised cluster
    /// (a master and that many worker processes) instead of one unsupervised process.
    pub supervised: bool,
    /// How long a stopping or replaced worker may take to finish its in-flight requests.
    pub drain_timeout: Duration,
    /// How long a new worker may take to report ready before a reload gives up on it.
    pub ready_timeout: Duration,
    /// Crash loop: this many worker crashes within `crash_window` make the master give up (exit 1).
    pub crash_limit: u32,
    pub crash_window: Duration,
    /// A worker up this long has its restart backoff reset.
    pub healthy_after: Duration,
    /// A worker whose resident memory exceeds this is replaced through the rolling path.
    pub max_memory: Option<u64>,
    /// Realtime history kept per room: a message goes once it is older than `realtime_history_age`
    /// AND more than `realtime_history_count` messages behind the room's head.
    pub realtime_history_count: u64,
    pub realtime_history_age: Duration,
    /// WebSocket ping interval; a client that answers none for two intervals is dropped.
    pub realtime_heartbeat: Duration,
    /// Outbound frames queued per connection before it is closed as a slow consumer (4009).
    pub realtime_queue_frames: usize,
    /// A connection's presence entry lives this long without a refresh (bounds how long a killed
    /// worker's connections stay present).
    pub realtime_presence_ttl: Duration,
    /// Frames a connection may send per second (bursts of twice that); beyond, `rate_limited` errors,
    /// and a connection that keeps going is closed with 4008.
    pub realtime_rate_per_sec: u32,
    pub session_ttl: Duration,
    pub idempotency_retention: Duration,
    pub idempotency_lease: Duration,
    pub gateway_delay: Duration,
    pub gateway_timeout: Duration,
    pub password_cost: PasswordCost,
    pub request_timeout: Duration,
    /// Upper bound of the database connection pool of one process. Default: 8 for the embedded SQLite,
    /// 64 for MySQL. Size it so that every process (hosts, `cozy sweep`, `cozy audit`) together stays under
    /// the server's `max_connections` (151 on a stock MariaDB).
    pub db_max_connections: u32,
    /// Peers whose `X-Forwarded-For` is believed (the reverse proxy); default none, so the TCP peer is
    /// the client. See [`crate::http::forwarded`].
    pub trusted_proxies: TrustedProxies,
    /// `POST /v1/sessions` and `POST /v1/users` per client address and process: this many a minute on
    /// average (0: no limit) and `auth_burst` at once. See [`crate::http::rate_limit`].
    pub auth_rate_per_minute: u32,
    pub auth_burst: u32,
    /// Where the settings came from, for `cozy serve` to log at start (PM2 lesson: say which config runs).
    pub sources: Vec<String>,
}

pub const DEFAULT_CONFIG_FILE: &str = "cozy.yaml";

impl Settings {
    /// Loads settings: `file` (or `cozy.yaml` when present), the process environment, then `flags`.
    pub fn load(file: Option<&Path>, flags: Layer) -> Result<Settings, ConfigError> {
        Self::load_with(file, flags, |k| std::env::var(k).ok())
    }

    pub fn load_with(
        file: Option<&Path>,
        flags: Layer,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings, ConfigError> {
        let mut sources = Vec::new();
        let file_layer = match file {
            Some(path) => {
                sources.push(path.display().to_string());
                read_file(path)?
            }
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                sources.push(DEFAULT_CONFIG_FILE.into());
                read_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Layer::default(),
        };
        let env_layer = Layer::from_env(&env)?;
        sources.push("environment".into());
        let merged = file_layer.overlay(env_layer).overlay(flags);
        Self::validate(merged, &env, sources)
    }

    fn validate(
        l: Layer,
        env: &impl Fn(&str) -> Option<String>,
        sources: Vec<String>,
    ) -> Result<Settings, ConfigError> {
        let data_dir = l.data_dir.unwrap_or_else(|| default_data_dir(env));
        let database = match l.database_url {
            None => DatabaseTarget::Sqlite(data_dir.join("cozy.db")),
            Some(url) if url.starts_with("mysql://") || url.starts_with("mariadb://") => {
                DatabaseTarget::MySql(url.replacen("mariadb://", "mysql://", 1))
            }
            Some(url) if url.starts_with("sqlite://") || url.starts_with("sqlite:") => {
                let rest = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
                let path = rest.split('?').next().unwrap_or_default();
                DatabaseTarget::Sqlite(PathBuf::from(path))
            }
            Some(url) => {
                return Err(ConfigError::Value {
                    source_name: "database_url".into(),
                    message: format!(
                        "unsupported URL {:?}: expected mysql://USER:PASS@HOST:PORT/DB or sqlite://PATH",
                        redact(&url)
                    ),
                })
            }
        };
        if let Some(url) = &l.redis_url {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("unix://"))
            {
                return Err(ConfigError::Value {
                    source_name: "redis_url".into(),
                    message: format!("expected redis://HOST:PORT[/DB], got {:?}", redact(url)),
                });
            }
        }
        let listen_text = l.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = listen_text.parse().map_err(|_| ConfigError::Value {
            source_name: "listen".into(),
            message: format!(
                "invalid socket address {listen_text:?} (expected e.g. 127.0.0.1:8080)"
            ),
        })?;
        let supervised = l.workers.is_some();
        let workers = l.workers.unwrap_or(1);
        let max_memory = match &l.max_memory {
            None => None,
            Some(text) => Some(crate::cluster::size::parse_size(text).map_err(|message| {
                ConfigError::Value {
                    source_name: "max_memory".into(),
                    message,
                }
            })?),
        };
        let crash_limit = l.crash_limit.unwrap_or(10);
        if crash_limit == 0 {
            return Err(ConfigError::Value {
                source_name: "crash_limit".into(),
                message: "must be at least 1".into(),
            });
        }
        if workers == 0 {
            return Err(ConfigError::Value {
                source_name: "workers".into(),
                message: "must be at least 1".into(),
            });
        }
        let auth_burst = l.auth_burst.unwrap_or(10);
        if auth_burst == 0 {
            return Err(ConfigError::Value {
                source_name: "auth_burst".into(),
                message: "must be at least 1 (auth_rate_per_minute: 0 turns the limit off)".into(),
            });
        }
        let secs = Duration::from_secs;
        let embedded = database.is_embedded();
        Ok(Settings {
            database,
            redis_url: l.redis_url,
            listen,
            run_dir: l.run_dir.unwrap_or_else(|| default_run_dir(env)),
            data_dir,
            log_format: l.log_format,
            workers,
            supervised,
            drain_timeout: secs(l.drain_timeout_secs.unwrap_or(30).max(1)),
            ready_timeout: secs(l.ready_timeout_secs.unwrap_or(30).max(1)),
            crash_limit,
            crash_window: secs(l.crash_window_secs.unwrap_or(60).max(1)),
            healthy_after: secs(l.healthy_after_secs.unwrap_or(30)),
            max_memory,
            realtime_history_count: l.realtime_history_count.unwrap_or(1000),
            realtime_history_age: secs(l.realtime_history_secs.unwrap_or(24 * 3600)),
            realtime_heartbeat: Duration::from_millis(
                l.realtime_heartbeat_ms.unwrap_or(25_000).max(100),
            ),
            realtime_queue_frames: l.realtime_queue_frames.unwrap_or(1024).max(8),
            realtime_presence_ttl: secs(l.realtime_presence_ttl_secs.unwrap_or(15).max(2)),
            realtime_rate_per_sec: l.realtime_rate_per_sec.unwrap_or(100).max(1),
            session_ttl: secs(l.session_ttl_secs.unwrap_or(24 * 3600).max(1)),
            idempotency_retention: secs(l.idempotency_retention_secs.unwrap_or(24 * 3600)),
            idempotency_lease: secs(l.idempotency_lease_secs.unwrap_or(60).max(1)),
            gateway_delay: Duration::from_millis(l.gateway_delay_ms.unwrap_or(0)),
            gateway_timeout: Duration::from_millis(l.gateway_timeout_ms.unwrap_or(10_000).max(1)),
            password_cost: PasswordCost {
                memory_kib: l.argon2_memory_kib.unwrap_or(19 * 1024).max(8),
                iterations: l.argon2_iterations.unwrap_or(2).max(1),
            },
            request_timeout: secs(l.request_timeout_secs.unwrap_or(30).max(1)),
            db_max_connections: l
                .db_max_connections
                .unwrap_or(if embedded { 8 } else { 64 })
                .max(1),
            trusted_proxies: l.trusted_proxies.unwrap_or_default(),
            auth_rate_per_minute: l.auth_rate_per_minute.unwrap_or(30),
            auth_burst,
            sources,
        })
    }
}

fn read_file(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Layer::from_yaml(path, &text)
}

/// Hides the password of a URL before it is shown anywhere.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn is_root() -> bool {
    // SAFETY-free check: /proc/self is ours; the uid line of status is "Uid:\treal\teffective...".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn default_data_dir(env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(dir) = env("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("cozy");
    }
    if is_root() {
        return PathBuf::from("/var/lib/cozy");
    }
    match env("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/cozy"),
        None => PathBuf::from(".cozy"),
    }
}

fn default_run_dir(env: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("cozy");
    }
    if is_root() {
        return PathBuf::from("/run/cozy");
    }
    std::env::temp_dir().join(format!(
        "cozy-{}",
        env("USER").unwrap_or_else(|| "user".into())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_bad_file_is_reported_with_line_and_column() {
        let err = Layer::from_yaml(
            Path::new("cozy.yaml"),
            "listen: 127.0.0.1:1\nlisten_port: 3\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cozy.yaml:2:1: unknown field `listen_port`"),
            "{text}"
        );
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "listen: 127.0.0.1:1000\nworkers: 3\nsession_ttl_secs: 5\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "COZY_LISTEN" => Some("127.0.0.1:2000".to_string()),
            "COZY_WORKERS" => Some("2".to_string()),
            _ => None,
        };
        let flags = Layer {
            workers: Some(4),
            ..Layer::default()
        };
        let s = Settings::load_with(Some(&file), flags, env).unwrap();
        assert_eq!(s.listen.port(), 2000);
        assert_eq!(s.workers, 4);
        assert_eq!(s.session_ttl, Duration::from_secs(5));
    }

    #[test]
    fn no_configuration_means_the_embedded_sqlite_default() {
        let s = Settings::load_with(None, Layer::default(), no_env).unwrap();
        assert!(s.database.is_embedded());
        assert!(s.redis_url.is_none());
    }

    #[test]
    fn a_bad_env_value_names_the_variable() {
        let env = |k: &str| (k == "COZY_WORKERS").then(|| "many".to_string());
        let err = Settings::load_with(None, Layer::default(), env).unwrap_err();
        assert!(err.to_string().starts_with("COZY_WORKERS:"), "{err}");
    }

    #[test]
    fn a_cozy_yaml_with_an_nginx_block_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cozy.yaml");
        std::fs::write(
            &file,
            "listen: 127.0.0.1:1000\nnginx:\n  server_name: example.com\n  upstreams: [a, b]\n  tls: {cert: /x}\n",
        )
        .unwrap();
        let s = Settings::load_with(Some(&file), Layer::default(), no_env).unwrap();
        assert_eq!(s.listen.port(), 1000);
    }

    #[test]
    fn trusted_proxies_come_from_a_yaml_list_or_a_comma_separated_variable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cozy.yaml");
        std::fs::write(
            &file,
            "trusted_proxies:\n  - 10.0.0.0/8\n  - 127.0.0.1\n  - \"::1\"\n",
        )
        .unwrap();
        let s = Settings::load_with(Some(&file), Layer::default(), no_env).unwrap();
        assert_eq!(
            s.trusted_proxies.to_string(),
            "10.0.0.0/8,127.0.0.1/32,::1/128"
        );
        let env =
            |k: &str| (k == "COZY_TRUSTED_PROXIES").then(|| "192.168.0.0/16, ::1".to_string());
        let s = Settings::load_with(Some(&file), Layer::default(), env).unwrap();
        assert_eq!(s.trusted_proxies.to_string(), "192.168.0.0/16,::1/128");
        let s = Settings::load_with(None, Layer::default(), no_env).unwrap();
        assert!(s.trusted_proxies.is_empty());
    }

    #[test]
    fn a_bad_trusted_proxy_is_named_with_its_variable_or_its_line() {
        let env =
            |k: &str| (k == "COZY_TRUSTED_PROXIES").then(|| "127.0.0.1,10.0.0.0/33".to_string());
        let err = Settings::load_with(None, Layer::default(), env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("COZY_TRUSTED_PROXIES: \"10.0.0.0/33\""),
            "{err}"
        );
        let err = Layer::from_yaml(
            Path::new("cozy.yaml"),
            "listen: 127.0.0.1:1\ntrusted_proxies:\n  - 127.0.0.1\n  - 10.0.0.0/33\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("cozy.yaml:4:"), "{err}");
        assert!(err.contains("\"10.0.0.0/33\""), "{err}");
    }

    #[test]
    fn the_login_rate_limit_defaults_to_30_a_minute_with_bursts_of_10() {
        let s = Settings::load_with(None, Layer::default(), no_env).unwrap();
        assert_eq!((s.auth_rate_per_minute, s.auth_burst), (30, 10));
        let env = |k: &str| match k {
            "COZY_AUTH_RATE_PER_MINUTE" => Some("0".to_string()),
            "COZY_AUTH_BURST" => Some("3".to_string()),
            _ => None,
        };
        let s = Settings::load_with(None, Layer::default(), env).unwrap();
        assert_eq!((s.auth_rate_per_minute, s.auth_burst), (0, 3));
        let zero = |k: &str| (k == "COZY_AUTH_BURST").then(|| "0".to_string());
        let err = Settings::load_with(None, Layer::default(), zero).unwrap_err();
        assert!(err.to_string().starts_with("auth_burst:"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("mysql://u:secret@h:3306/db"),
            "mysql://u:***@h:3306/db"
        );
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
