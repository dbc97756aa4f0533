//! The runner: every host in parallel (up to `forks`), each through its plays in order.
//!
//! Per host: connect (bootstrapping the login user when the host is fresh), gather facts in one round
//! trip, then for each play that targets the host run its tasks in order — tags filter, `loop`, `when`,
//! render the arguments, run the module — and, after the tasks, the handlers that were notified, once
//! each, in the order they are defined. The first failed task (without `ignore_errors`) ends that host's
//! run, as in Ansible; other hosts never wait for or stop because of it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use minijinja::value::Serde;
use minijinja::Value;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use tokio::sync::Semaphore;

use super::render::{Renderer, TaskTemplates, TemplateDirs};
use super::report::{Reporter, TaskEvent, TaskStatus};
use super::{Loop, Play, Playbook, Task};
use crate::ops::facts::Facts;
use crate::ops::inventory::{HostSpec, Inventory};
use crate::ops::modules::{Ctx, Outcome};
use crate::ops::transport::{quote, Command, Transport};

/// Why a connection failed; `AuthRefused` lets the runner fall back to the bootstrap user.
#[derive(Debug, Clone)]
pub enum ConnectError {
    AuthRefused(String),
    Failed(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::AuthRefused(m) | ConnectError::Failed(m) => f.write_str(m),
        }
    }
}

/// Opens connections to hosts (SSH in production; see [`crate::ops::ssh`]).
pub trait Connector: Send + Sync {
    /// Logs in to `host` as `user`.
    fn connect<'a>(
        &'a self,
        host: &'a HostSpec,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Arc<dyn Transport>, ConnectError>>;

    /// The public key (an OpenSSH `authorized_keys` line) that [`Connector::connect`] authenticates
    /// with, installed for the login user during bootstrap.
    fn public_key<'a>(&'a self, host: &'a HostSpec) -> BoxFuture<'a, Result<String, String>>;
}

/// What to run and how.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub check: bool,
    pub diff: bool,
    /// Only tasks with one of these tags (and tasks tagged `always`); empty: every task.
    pub tags: Vec<String>,
    /// The inventory: its `vars` for every host, its groups for the plays' `hosts:` patterns.
    pub inventory: Arc<Inventory>,
    /// `-e KEY=VALUE`: the highest precedence.
    pub extra_vars: Map<String, Json>,
    /// At most this many hosts at once (0: all).
    pub forks: usize,
    /// The folder of the inventory file (its `templates/` is searched after the playbook's).
    pub inventory_dir: Option<PathBuf>,
}

/// One host's result, as `--json` prints it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct HostRecap {
    /// Tasks that succeeded, changed or not (as Ansible counts).
    pub ok: usize,
    pub changed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub unreachable: bool,
    pub error: Option<String>,
}

impl HostRecap {
    pub fn success(&self) -> bool {
        !self.unreachable && self.failed == 0 && self.error.is_none()
    }
}

/// The result of a whole run, hosts in inventory order.
#[derive(Debug, Clone, Default)]
pub struct Recap {
    pub hosts: Vec<(String, HostRecap)>,
}

impl Recap {
    pub fn success(&self) -> bool {
        self.hosts.iter().all(|(_, r)| r.success())
    }

    /// `{"ok": bool, "hosts": {"NAME": {...}}}`.
    pub fn to_json(&self) -> Json {
        let hosts: Map<String, Json> = self
            .hosts
            .iter()
            .map(|(n, r)| (n.clone(), serde_json::to_value(r).expect("plain struct")))
            .collect();
        serde_json::json!({"ok": self.success(), "hosts": hosts})
    }
}

struct Shared {
    playbooks: Vec<(Playbook, Renderer)>,
    opts: RunOptions,
    connector: Arc<dyn Connector>,
    reporter: Arc<dyn Reporter>,
}

/// Runs `playbooks` on `hosts`; never fails as a whole: each host's outcome is in the recap.
pub async fn run(
    hosts: Vec<HostSpec>,
    playbooks: Vec<Playbook>,
    opts: RunOptions,
    connector: Arc<dyn Connector>,
    reporter: Arc<dyn Reporter>,
) -> Recap {
    let playbooks = playbooks
        .into_iter()
        .map(|pb| {
            let mut dirs = Vec::new();
            if let Some(d) = &pb.dir {
                dirs.push(d.join("templates"));
            }
            if let Some(d) = &opts.inventory_dir {
                let t = d.join("templates");
                if !dirs.contains(&t) {
                    dirs.push(t);
                }
            }
            let renderer = Renderer::new(TemplateDirs { dirs });
            (pb, renderer)
        })
        .collect();
    let forks = if opts.forks == 0 {
        hosts.len().max(1)
    } else {
        opts.forks
    };
    let shared = Arc::new(Shared {
        playbooks,
        opts,
        connector,
        reporter,
    });
    let limit = Arc::new(Semaphore::new(forks));
    let mut handles = Vec::new();
    for host in hosts {
        let shared = shared.clone();
        let limit = limit.clone();
        let name = host.name.clone();
        handles.push((
            name,
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await.expect("never closed");
                let recap = run_host(&host, &shared).await;
                shared.reporter.host_finished(&host.name, &recap);
                recap
            }),
        ));
    }
    let mut recap = Recap::default();
    for (name, handle) in handles {
        let r = handle.await.unwrap_or_else(|e| HostRecap {
            error: Some(format!("internal error: {e}")),
            failed: 1,
            ..HostRecap::default()
        });
        recap.hosts.push((name, r));
    }
    recap
}

async fn run_host(host: &HostSpec, shared: &Shared) -> HostRecap {
    let reporter = &shared.reporter;
    reporter.host_connecting(&host.name);
    let mut recap = HostRecap::default();
    let (transport, bootstrap_note) = match connect(host, shared).await {
        Ok(t) => t,
        Err(e) => {
            recap.unreachable = true;
            recap.error = Some(e);
            return recap;
        }
    };
    let facts = match Facts::gather(&*transport).await {
        Ok(f) => f,
        Err(e) => {
            recap.unreachable = true;
            recap.error = Some(e.to_string());
            return recap;
        }
    };
    if let Some(note) = bootstrap_note {
        reporter.note(&host.name, &note);
    }
    let plays: Vec<(&Renderer, &Play)> = shared
        .playbooks
        .iter()
        .flat_map(|(pb, r)| pb.plays.iter().map(move |p| (r, p)))
        .filter(|(_, p)| shared.opts.inventory.pattern_matches(&p.hosts, &host.name))
        .collect();
    let total: usize = plays
        .iter()
        .map(|(_, p)| {
            p.tasks
                .iter()
                .filter(|t| tags_match(t, &shared.opts.tags))
                .count()
        })
        .sum();
    reporter.host_started(&host.name, total);
    let mut run = HostRun {
        host,
        shared,
        transport: &*transport,
        facts_json: serde_json::to_value(&facts).expect("plain struct"),
        facts,
        recap,
        registered: Map::new(),
        index: 0,
    };
    for (renderer, play) in plays {
        let mut notified: HashSet<&str> = HashSet::new();
        for task in play
            .tasks
            .iter()
            .filter(|t| tags_match(t, &shared.opts.tags))
        {
            match run.step(task, play, renderer).await {
                Some(true) => notified.extend(task.notify.iter().map(String::as_str)),
                Some(false) => {}
                None => return run.recap,
            }
        }
        let handlers: Vec<&Task> = play
            .handlers
            .iter()
            .filter(|h| notified.contains(h.name.as_str()))
            .collect();
        if !handlers.is_empty() {
            reporter.add_tasks(&host.name, handlers.len());
        }
        for handler in handlers {
            if run.step(handler, play, renderer).await.is_none() {
                return run.recap;
            }
        }
    }
    run.recap
}

/// One host's run in progress: its connection, facts, results so far and registered variables.
struct HostRun<'a> {
    host: &'a HostSpec,
    shared: &'a Shared,
    transport: &'a dyn Transport,
    facts: Facts,
    facts_json: Json,
    recap: HostRecap,
    registered: Map<String, Json>,
    /// The number of the task being run (for the progress bar).
    index: usize,
}

impl HostRun<'_> {
    /// Runs one task (all its loop items) and books the result. `Some(changed)`, or `None` when the
    /// host must stop.
    async fn step(&mut self, task: &Task, play: &Play, renderer: &Renderer) -> Option<bool> {
        self.index += 1;
        let (host, shared) = (self.host, self.shared);
        let vars = variables(play, host, &shared.opts, &self.registered, &self.facts_json);
        let reporter = &shared.reporter;
        let display = task_name(task, renderer, &vars);
        reporter.task_started(&host.name, self.index, &display);
        let started = std::time::Instant::now();
        let result = run_task(
            task,
            play,
            renderer,
            &vars,
            self.transport,
            &self.facts,
            &shared.opts,
        )
        .await;
        let status = match (&result.error, result.skipped, result.outcome.changed) {
            (Some(_), _, _) if task.ignore_errors => TaskStatus::Ignored,
            (Some(_), _, _) => TaskStatus::Failed,
            (None, true, _) => TaskStatus::Skipped,
            (None, false, true) => TaskStatus::Changed,
            (None, false, false) => TaskStatus::Ok,
        };
        let recap = &mut self.recap;
        match status {
            TaskStatus::Ok | TaskStatus::Ignored => recap.ok += 1,
            TaskStatus::Changed => {
                recap.ok += 1;
                recap.changed += 1;
            }
            TaskStatus::Skipped => recap.skipped += 1,
            TaskStatus::Failed => recap.failed += 1,
        }
        let error = result
            .error
            .as_ref()
            .map(|e| format!("task `{display}` ({}): {e}", task.location));
        reporter.task_finished(
            &host.name,
            &TaskEvent {
                index: self.index,
                name: &display,
                status,
                diff: result.outcome.diff.as_deref(),
                notes: &result.outcome.notes,
                error: error.as_deref(),
                elapsed: started.elapsed(),
            },
        );
        if let Some(reg) = &task.register {
            let mut data = result.outcome.data.clone();
            data.insert("changed".into(), Json::Bool(result.outcome.changed));
            data.insert("failed".into(), Json::Bool(result.error.is_some()));
            data.insert("skipped".into(), Json::Bool(result.skipped));
            self.registered.insert(reg.clone(), Json::Object(data));
        }
        if status == TaskStatus::Failed {
            self.recap.error = error;
            return None;
        }
        Some(status == TaskStatus::Changed)
    }
}

struct TaskResult {
    outcome: Outcome,
    skipped: bool,
    error: Option<String>,
}

async fn run_task(
    task: &Task,
    play: &Play,
    renderer: &Renderer,
    vars: &Map<String, Json>,
    transport: &dyn Transport,
    facts: &Facts,
    opts: &RunOptions,
) -> TaskResult {
    let mut result = TaskResult {
        outcome: Outcome::default(),
        skipped: true,
        error: None,
    };
    let base = Value::from(Serde(vars));
    let items: Vec<Option<Json>> = match &task.loop_items {
        None => vec![None],
        Some(Loop::Items(items)) => {
            match items
                .iter()
                .map(|i| renderer.render_value(i, &base).map(Some))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(v) => v,
                Err(e) => {
                    result.error = Some(format!("loop: {e}"));
                    return result;
                }
            }
        }
        Some(Loop::Expr(expr)) => match renderer.render_value(&Json::String(expr.clone()), &base) {
            Ok(Json::Array(items)) => items.into_iter().map(Some).collect(),
            Ok(other) => {
                result.error = Some(format!("loop: `{expr}` is not a list but {other}"));
                return result;
            }
            Err(e) => {
                result.error = Some(format!("loop: {e}"));
                return result;
            }
        },
    };
    let mut item_results = Vec::new();
    for item in items {
        let vars_i = match &item {
            None => base.clone(),
            Some(item) => {
                let mut v = vars.clone();
                v.insert("item".into(), item.clone());
                Value::from(Serde(&v))
            }
        };
        match renderer.when(&task.when, &vars_i) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                result.error = Some(format!("when: {e}"));
                return result;
            }
        }
        result.skipped = false;
        let args = match renderer.render_value(&task.args, &vars_i) {
            Ok(a) => a,
            Err(e) => {
                result.error = Some(e);
                return result;
            }
        };
        let module = match (task.module.build)(args) {
            Ok(m) => m,
            Err(e) => {
                result.error = Some(format!("{}: {e}", task.module.name));
                return result;
            }
        };
        let templates = TaskTemplates {
            renderer,
            vars: vars_i,
        };
        let ctx = Ctx {
            host: transport,
            check: opts.check,
            diff: opts.diff || opts.check,
            become_root: task.become_root.unwrap_or(play.become_root),
            facts,
            templates: &templates,
        };
        match module.run(&ctx).await {
            Ok(outcome) => {
                result.outcome.changed |= outcome.changed;
                if let Some(d) = outcome.diff {
                    let diff = result.outcome.diff.get_or_insert_with(String::new);
                    diff.push_str(&d);
                    if !d.ends_with('\n') {
                        diff.push('\n');
                    }
                }
                result.outcome.notes.extend(outcome.notes);
                if item.is_some() {
                    let mut data = outcome.data.clone();
                    data.insert("changed".into(), Json::Bool(outcome.changed));
                    data.insert("item".into(), item.clone().unwrap_or_default());
                    item_results.push(Json::Object(data));
                }
                result.outcome.data.extend(outcome.data);
            }
            Err(e) => {
                result.outcome.data.extend(e.data.clone());
                result.error = Some(match &item {
                    Some(i) => format!("item {i}: {e}"),
                    None => e.to_string(),
                });
                return result;
            }
        }
    }
    if task.loop_items.is_some() {
        result
            .outcome
            .data
            .insert("results".into(), Json::Array(item_results));
    }
    result
}

/// The variables of a task, lowest precedence first: play vars, inventory vars, host vars, registered
/// results, `-e`; plus `facts` and `inventory_hostname`.
fn variables(
    play: &Play,
    host: &HostSpec,
    opts: &RunOptions,
    registered: &Map<String, Json>,
    facts: &Json,
) -> Map<String, Json> {
    let mut vars = play.vars.clone();
    for layer in [
        &opts.inventory.vars,
        &host.vars,
        registered,
        &opts.extra_vars,
    ] {
        vars.extend(layer.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    vars.insert("facts".into(), facts.clone());
    vars.insert("inventory_hostname".into(), Json::String(host.name.clone()));
    vars
}

/// The task's name with its templates rendered (the raw name when that fails: the task will report it).
fn task_name(task: &Task, renderer: &Renderer, vars: &Map<String, Json>) -> String {
    if !task.name.contains("{{") {
        return task.name.clone();
    }
    renderer
        .render_str(&task.name, &Value::from(Serde(vars)))
        .unwrap_or_else(|_| task.name.clone())
}

fn tags_match(task: &Task, tags: &[String]) -> bool {
    tags.is_empty()
        || task
            .tags
            .iter()
            .any(|t| t == "always" || tags.iter().any(|w| w == t))
}

/// Connects as the host's user; on a fresh host (that login refused, a `bootstrap_user` set) logs in as
/// the bootstrap user, creates the login user with the key and passwordless sudo, and logs in again. In
/// check mode nothing is created: the run goes on as the bootstrap user and says so.
async fn connect(
    host: &HostSpec,
    shared: &Shared,
) -> Result<(Arc<dyn Transport>, Option<String>), String> {
    let connector = &shared.connector;
    let refusal = match connector.connect(host, &host.user).await {
        Ok(t) => return Ok((t, None)),
        Err(ConnectError::AuthRefused(m)) => m,
        Err(ConnectError::Failed(m)) => return Err(m),
    };
    let Some(boot_user) = host.bootstrap_user.as_deref().filter(|b| *b != host.user) else {
        return Err(refusal);
    };
    let boot = connector
        .connect(host, boot_user)
        .await
        .map_err(|e| format!("{refusal}; bootstrap as `{boot_user}` failed too: {e}"))?;
    if shared.opts.check {
        return Ok((
            boot,
            Some(format!(
                "check mode: `{}` cannot log in yet; bootstrap would create it (running the check as `{boot_user}`)",
                host.user
            )),
        ));
    }
    let key = connector
        .public_key(host)
        .await
        .map_err(|e| format!("bootstrap: {e}"))?;
    let out = boot
        .run(Command::new(bootstrap_script(&host.user, &key)).root(true))
        .await
        .map_err(|e| format!("bootstrap as `{boot_user}`: {e}"))?;
    if !out.success() {
        return Err(format!(
            "bootstrap as `{boot_user}` could not create `{}`: {}",
            host.user,
            out.error_text()
        ));
    }
    drop(boot);
    let t = connector.connect(host, &host.user).await.map_err(|e| {
        format!(
            "bootstrap as `{boot_user}` created `{}`, but logging in as it still fails: {e}",
            host.user
        )
    })?;
    Ok((
        t,
        Some(format!(
            "bootstrapped: created `{}` with its key and sudo, as `{boot_user}`",
            host.user
        )),
    ))
}

/// Creates `user` with `key` in authorized_keys and passwordless sudo (validated by visudo). Idempotent.
fn bootstrap_script(user: &str, key: &str) -> String {
    let u = quote(user);
    let k = quote(key.trim());
    let sudoers = quote(&format!("/etc/sudoers.d/90-cozy-{user}"));
    format!(
        "set -e
command -v sudo >/dev/null || {{ echo 'sudo is not installed' >&2; exit 1; }}
id -u {u} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash {u}
home=$(getent passwd {u} | cut -d: -f6)
grp=$(id -gn {u})
install -d -m 700 -o {u} -g \"$grp\" \"$home/.ssh\"
touch \"$home/.ssh/authorized_keys\"
grep -qxF {k} \"$home/.ssh/authorized_keys\" || printf '%s\\n' {k} >> \"$home/.ssh/authorized_keys\"
chown {u}:\"$grp\" \"$home/.ssh/authorized_keys\"; chmod 600 \"$home/.ssh/authorized_keys\"
tmp=$(mktemp)
printf '%s ALL=(ALL) NOPASSWD:ALL\\n' {u} > \"$tmp\"
visudo -cqf \"$tmp\"
install -m 440 \"$tmp\" {sudoers}; rm -f \"$tmp\"
"
    )
}
