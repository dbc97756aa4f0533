//! The command line (http-api.md, "Users and sessions" → `cozy users add`, "Operations" → `cozy audit`, plus
//! configuration and migrations): the real binary run with each test app's environment, checking exit
//! codes, the messages an operator sees, and the database afterwards.

use std::process::{Output, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{redis_url, Backend, TestApp, TestDb, COZY};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// Runs `cozy ARGS` with exactly `env` (plus PATH) in `dir`, killing it if it has not exited after a
/// minute (a command that should refuse to start must not hang the suite if it starts after all).
async fn run(env: &[(String, String)], dir: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(COZY);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn cozy");
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("cozy {args:?} did not exit"))
        .expect("cozy output")
}

/// The environment of a cozy process against `db` that is not a test app (no server running).
fn env_for(db: &TestDb, dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("COZY_DATABASE_URL".into(), db.url.clone()),
        ("COZY_REDIS_URL".into(), redis_url()),
        ("COZY_RUN_DIR".into(), dir.join("run").display().to_string()),
        (
            "COZY_DATA_DIR".into(),
            dir.join("data").display().to_string(),
        ),
        ("COZY_ARGON2_MEMORY_KIB".into(), "256".into()),
        ("COZY_ARGON2_ITERATIONS".into(), "1".into()),
    ]
}

/// Runs one statement directly against the app's database (to tamper with it).
async fn exec(db: &TestDb, sql: &str) {
    let pool = db.pool().await;
    sqlx::query(sql)
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pool.close().await;
}

fn backend_dir(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::MySql => "mysql",
    }
}

fn migrate_status(app: &TestApp) -> (Output, Value) {
    let out = app.cli(&["migrate", "status", "--json"], None);
    let parsed = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("status JSON: {}", describe(&out)));
    (out, parsed)
}

/// How many migration files this build embeds for `backend`.
fn migration_files(backend: Backend) -> usize {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend_dir(backend));
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count()
}

#[test]
fn help_shows_usage_examples() {
    let out = std::process::Command::new(COZY)
        .arg("--help")
        .env_clear()
        .output()
        .expect("cozy --help");
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("Examples:"), "{text}");
    assert!(text.contains("cozy serve"), "{text}");
    assert!(text.contains("--password-stdin"), "{text}");
    assert!(text.contains("cozy audit"), "{text}");
}

#[test]
fn an_unknown_subcommand_is_a_usage_error() {
    let out = std::process::Command::new(COZY)
        .arg("frobnicate")
        .env_clear()
        .output()
        .expect("cozy frobnicate");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("frobnicate"), "{}", describe(&out));
}

backend_tests! {
    async fn users_add_without_password_stdin_is_refused_naming_the_flag(backend) {
        let app = TestApp::spawn(backend).await;
        let out = app.cli(&["users", "add", "x@y.io"], Some("a fine password\n"));
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(stderr(&out).contains("--password-stdin"), "{}", describe(&out));
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 0);
    }

    async fn users_add_with_a_short_password_is_refused_naming_the_password(backend) {
        let app = TestApp::spawn(backend).await;
        let out = app.cli(&["users", "add", "x@y.io", "--password-stdin"], Some("short\n"));
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(stderr(&out).contains("password"), "{}", describe(&out));
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 0);
    }

    async fn users_add_with_a_bad_email_is_refused_naming_the_email(backend) {
        let app = TestApp::spawn(backend).await;
        let out = app.cli(&["users", "add", "not-an-email", "--password-stdin"], Some("a fine password\n"));
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(stderr(&out).contains("email"), "{}", describe(&out));
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 0);
    }

    async fn users_add_creates_a_user_and_again_with_admin_resets_password_and_role(backend) {
        let app = TestApp::spawn(backend).await;
        let out = app.cli(&["users", "add", "x@y.io", "--password-stdin"], Some("first password\n"));
        assert!(out.status.success(), "{}", describe(&out));
        assert!(stdout(&out).contains("x@y.io"), "{}", describe(&out));
        let login = |password: &'static str| {
            app.request(Method::POST, "/v1/sessions", None, None, Some(json!({"email": "x@y.io", "password": password})))
        };
        let r = login("first password").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["user"]["role"], "user");
        let token = r.body["token"].as_str().unwrap().to_string();
        let denied = app.request(Method::POST, "/v1/resources", Some(&token), None, Some(json!({"name": "Gig", "capacity": 1, "price_cents": 1, "currency": "EUR", "hold_seconds": 60}))).await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN);

        let out = app.cli(&["users", "add", "x@y.io", "--admin", "--password-stdin"], Some("second password\n"));
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users").await, 1);
        assert_eq!(login("first password").await.status, StatusCode::UNAUTHORIZED);
        let r = login("second password").await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.body["user"]["role"], "admin");
        let admin = r.body["token"].as_str().unwrap().to_string();
        app.resource(&admin, 5, 60).await;
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM users WHERE password_hash LIKE '$argon2id$%'").await, 1);
    }

    async fn audit_json_prints_the_documented_report_and_exits_0(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let user = app.user("ada@example.com").await;
        let paid = app.reserve(&user, resource, 2).await;
        app.reserve(&user, resource, 1).await;
        let cancelled = app.reserve(&user, resource, 1).await;
        assert_eq!(app.pay(&user, paid, "sandbox_ok", "pay-1").await.status, StatusCode::OK);
        assert_eq!(app.cancel(&user, cancelled, "cancel-1").await.status, StatusCode::OK);

        let out = app.cli(&["audit", "--json"], None);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)));
        for key in ["reservations", "charges", "double_charges", "orphan_charges", "oversold_resources", "ok"] {
            assert!(report.get(key).is_some(), "no {key}: {report}");
        }
        assert_eq!(report["reservations"]["RESERVED"], 1, "{report}");
        assert_eq!(report["reservations"]["PAID"], 1, "{report}");
        assert_eq!(report["reservations"]["CANCELLED"], 1, "{report}");
        assert_eq!(report["reservations"]["EXPIRED"], 0, "{report}");
        assert_eq!(report["charges"], 1, "{report}");
        assert_eq!(report["double_charges"], 0, "{report}");
        assert_eq!(report["orphan_charges"], 0, "{report}");
        assert_eq!(report["oversold_resources"], 0, "{report}");
        assert_eq!(report["ok"], true, "{report}");

        let text = app.cli(&["audit"], None);
        assert_eq!(text.status.code(), Some(0), "{}", describe(&text));
        assert!(stdout(&text).contains("ok"), "{}", describe(&text));
    }

    async fn audit_on_an_empty_database_is_ok(backend) {
        let app = TestApp::spawn(backend).await;
        let out = app.cli(&["audit", "--json"], None);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["charges"], 0);
        assert_eq!(report["ok"], true);
    }

    async fn audit_exits_non_zero_when_a_charge_is_orphaned(backend) {
        let app = TestApp::spawn(backend).await;
        let admin = app.admin().await;
        let resource = app.resource(&admin, 10, 600).await;
        let user = app.user("ada@example.com").await;
        let id = app.reserve(&user, resource, 1).await;
        assert_eq!(app.pay(&user, id, "sandbox_ok", "pay-1").await.status, StatusCode::OK);
        app.assert_audit_ok();
        // Someone "cancels" by hand, without a refund: the captured charge is now an orphan.
        exec(&app.db, &format!("UPDATE reservations SET state = 'CANCELLED' WHERE id = {id}")).await;

        let out = app.cli(&["audit", "--json"], None);
        assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)));
        assert_eq!(report["ok"], false, "{report}");
        assert!(report["orphan_charges"].as_i64().unwrap() >= 1, "{report}");
        let text = app.cli(&["audit"], None);
        assert_ne!(text.status.code(), Some(0), "{}", describe(&text));
    }

    async fn a_bad_config_file_is_reported_with_its_path_line_and_column(backend) {
        let app = TestApp::spawn(backend).await;
        let path = app.dir.path().join("bad.yaml");
        std::fs::write(&path, "log_format: json\nlisten_port: 8080\n").unwrap();
        let path = path.display().to_string();
        for args in [vec!["--config", path.as_str(), "audit"], vec!["migrate", "status", "--config", path.as_str()]] {
            let out = app.cli(&args, None);
            assert!(!out.status.success(), "{args:?}: {}", describe(&out));
            let err = stderr(&out);
            assert!(err.contains(&format!("{path}:2:1")), "{args:?}: {}", describe(&out));
            assert!(err.contains("listen_port"), "{args:?}: {}", describe(&out));
        }
    }

    async fn migrate_status_lists_the_initial_migration_as_applied(backend) {
        let app = TestApp::spawn(backend).await;
        let (out, status) = migrate_status(&app);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let items = status.as_array().expect("an array of migrations");
        assert_eq!(items.len(), migration_files(backend), "{status}");
        let first = items.iter().find(|m| m["version"] == 1).unwrap_or_else(|| panic!("no version 1: {status}"));
        assert_eq!(first["state"], "applied", "{status}");
        assert_eq!(first["name"], "init", "{status}");
        assert!(first["applied_at"].is_string(), "{status}");
        assert!(items.iter().all(|m| m["state"] == "applied"), "{status}");

        let up = app.cli(&["migrate", "up"], None);
        assert_eq!(up.status.code(), Some(0), "migrate up on a current schema is a no-op: {}", describe(&up));
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM cozy_migrations").await, migration_files(backend) as i64);
    }

    async fn a_changed_migration_checksum_stops_migrate_until_repaired(backend) {
        let app = TestApp::spawn(backend).await;
        exec(&app.db, "UPDATE cozy_migrations SET checksum = '0' WHERE version = 1").await;
        let file = format!("migrations/{}/0001_init.sql", backend_dir(backend));

        let up = app.cli(&["migrate", "up"], None);
        assert!(!up.status.success(), "{}", describe(&up));
        assert!(stderr(&up).contains(&file), "the error names {file}: {}", describe(&up));

        let (out, status) = migrate_status(&app);
        assert!(!out.status.success(), "status exits non-zero on a mismatch: {}", describe(&out));
        let first = status.as_array().unwrap().iter().find(|m| m["version"] == 1).cloned().unwrap();
        assert_eq!(first["state"], "checksum_mismatch", "{status}");
        let plain = app.cli(&["migrate", "status"], None);
        assert!(!plain.status.success(), "{}", describe(&plain));

        let repair = app.cli(&["migrate", "repair"], None);
        assert_eq!(repair.status.code(), Some(0), "{}", describe(&repair));
        let up = app.cli(&["migrate", "up"], None);
        assert_eq!(up.status.code(), Some(0), "{}", describe(&up));
        let (out, status) = migrate_status(&app);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert!(status.as_array().unwrap().iter().all(|m| m["state"] == "applied"), "{status}");
        assert_eq!(app.db.scalar("SELECT COUNT(*) FROM cozy_migrations WHERE checksum = '0'").await, 0);
    }

    async fn a_dirty_migration_record_stops_migrate_naming_the_failed_statement_until_repaired(backend) {
        let app = TestApp::spawn(backend).await;
        // What a MySQL migration that died half-way leaves behind (its DDL commits as it goes).
        exec(&app.db, "UPDATE cozy_migrations SET success = 0, failed_statement = 'CREATE TABLE half_done (x INT)', error = 'disk full' WHERE version = 1").await;

        let (out, status) = migrate_status(&app);
        assert!(!out.status.success(), "{}", describe(&out));
        let first = status.as_array().unwrap().iter().find(|m| m["version"] == 1).cloned().unwrap();
        assert_eq!(first["state"], "dirty", "{status}");

        let up = app.cli(&["migrate", "up"], None);
        assert!(!up.status.success(), "{}", describe(&up));
        let err = stderr(&up);
        assert!(err.contains("CREATE TABLE half_done"), "names the statement: {}", describe(&up));
        assert!(err.contains("disk full"), "names the error: {}", describe(&up));
        assert!(err.contains("cozy migrate repair"), "says what to do: {}", describe(&up));

        let repair = app.cli(&["migrate", "repair"], None);
        assert_eq!(repair.status.code(), Some(0), "{}", describe(&repair));
        let (out, status) = migrate_status(&app);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let first = status.as_array().unwrap().iter().find(|m| m["version"] == 1).cloned().unwrap();
        assert_eq!(first["state"], "pending", "the dirty record is gone: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_one_worker_without_redis_is_refused_naming_cozy_redis_url() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    assert!(
        !app.env.iter().any(|(k, _)| k == "COZY_REDIS_URL"),
        "this scenario needs an app without Redis"
    );
    let by_flag = run(
        &app.env,
        app.dir.path(),
        &["serve", "--listen", "127.0.0.1:0", "--workers", "2"],
    )
    .await;
    let mut env = app.env.clone();
    env.push(("COZY_WORKERS".into(), "2".into()));
    let by_env = run(&env, app.dir.path(), &["serve", "--listen", "127.0.0.1:0"]).await;
    for out in [by_flag, by_env] {
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(
            stderr(&out).contains("COZY_REDIS_URL"),
            "{}",
            describe(&out)
        );
        assert!(
            !stdout(&out).contains("cozy listening"),
            "{}",
            describe(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_unmigrated_mysql_database_and_says_to_run_migrate_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(Backend::MySql, dir.path()).await;
    let env = env_for(&db, dir.path());
    let out = run(&env, dir.path(), &["serve", "--listen", "127.0.0.1:0"]).await;
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains("cozy migrate up"),
        "{}",
        describe(&out)
    );
    assert!(
        !stdout(&out).contains("cozy listening"),
        "{}",
        describe(&out)
    );
    // Nothing of the schema was created behind the operator's back.
    let tables = "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name IN ('users', 'reservations')";
    assert_eq!(db.scalar(tables).await, 0);

    // Once migrated, the same database is accepted.
    let up = run(&env, dir.path(), &["migrate", "up"]).await;
    assert!(up.status.success(), "{}", describe(&up));
    assert_eq!(db.scalar(tables).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_simultaneous_migrate_ups_on_a_fresh_mysql_database_both_succeed_and_apply_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(Backend::MySql, dir.path()).await;
    let env = env_for(&db, dir.path());
    let (a, b) = tokio::join!(
        run(&env, dir.path(), &["migrate", "up"]),
        run(&env, dir.path(), &["migrate", "up"])
    );
    assert_eq!(a.status.code(), Some(0), "{}", describe(&a));
    assert_eq!(b.status.code(), Some(0), "{}", describe(&b));
    // Exactly one row per migration (today: one), every one clean.
    let files = migration_files(Backend::MySql) as i64;
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM cozy_migrations").await,
        files
    );
    assert_eq!(
        db.scalar("SELECT COUNT(*) FROM cozy_migrations WHERE success = 1")
            .await,
        files
    );
    // One of them applied it, the other found it done.
    let applied = [&a, &b]
        .iter()
        .filter(|o| stdout(o).contains("applied 0001"))
        .count();
    assert_eq!(applied, 1, "a: {}\nb: {}", describe(&a), describe(&b));
}
