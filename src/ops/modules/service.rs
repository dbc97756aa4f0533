//! The `service` module: a systemd unit started or stopped, enabled or not, masked or not.
//!
//! One `systemctl show -p LoadState,ActiveState,UnitFileState` reads the unit (after `daemon-reload`
//! when asked, in the same script), and one script makes the changes in a safe order: unmask, enable or
//! disable, start/stop, and mask last (after stopping). `restarted` and `reloaded` always act and always
//! report a change: that is what handlers ask for. `reloaded` uses `reload-or-restart`, so a unit
//! without a reload command is restarted and a stopped one is started, as Ansible does.
//! A unit systemd does not know is an error (naming it), except when the task only masks it.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{Ctx, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "service",
    args: &["name", "state", "enabled", "masked", "daemon_reload"],
    free_form: None,
    build,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Started,
    Stopped,
    Restarted,
    Reloaded,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    name: String,
    state: Option<State>,
    enabled: Option<bool>,
    masked: Option<bool>,
    #[serde(default)]
    daemon_reload: bool,
}

#[derive(Debug)]
struct Service {
    args: Args,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    let valid = !args.name.is_empty()
        && !args.name.starts_with('-')
        && args
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b));
    if !valid {
        return Err(format!(
            "argument `name`: {:?} is not a systemd unit name",
            args.name
        ));
    }
    if args.masked == Some(true)
        && (args.enabled == Some(true)
            || matches!(
                args.state,
                Some(State::Started | State::Restarted | State::Reloaded)
            ))
    {
        return Err(
            "argument `masked`: a masked unit cannot also be enabled, started, restarted or reloaded"
                .into(),
        );
    }
    if args.state.is_none()
        && args.enabled.is_none()
        && args.masked.is_none()
        && !args.daemon_reload
    {
        return Err(
            "the service module needs at least one of `state`, `enabled`, `masked`, `daemon_reload`"
                .into(),
        );
    }
    Ok(Box::new(Service { args }))
}

/// The unit as `systemctl show` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Unit {
    load: String,
    active: String,
    file: String,
}

fn parse_show(text: &str) -> Unit {
    let kv: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |k: &str| kv.get(k).copied().unwrap_or_default().to_string();
    Unit {
        load: get("LoadState"),
        active: get("ActiveState"),
        file: get("UnitFileState"),
    }
}

impl Unit {
    fn masked(&self) -> bool {
        self.load == "masked" || self.file.starts_with("masked")
    }

    /// As `systemctl is-enabled` answers 0: the unit starts at boot or cannot be enabled at all.
    fn enabled(&self) -> bool {
        matches!(
            self.file.as_str(),
            "enabled"
                | "enabled-runtime"
                | "alias"
                | "static"
                | "indirect"
                | "generated"
                | "transient"
        )
    }

    /// Enabled by a symlink that `systemctl disable` would remove.
    fn disableable(&self) -> bool {
        matches!(self.file.as_str(), "enabled" | "enabled-runtime" | "linked")
    }

    fn running(&self) -> bool {
        matches!(self.active.as_str(), "active" | "activating" | "reloading")
    }
}

/// The steps to run (`systemctl` verbs) and what they change, in order.
fn plan(args: &Args, unit: &Unit) -> Result<Vec<(&'static str, String)>, String> {
    let name = &args.name;
    if unit.load == "not-found" && args.masked != Some(true) {
        return Err(format!(
            "service {name}: no such unit (systemctl show: LoadState=not-found)"
        ));
    }
    let mut steps = Vec::new();
    let mut masked = unit.masked();
    if args.masked == Some(false) && masked {
        steps.push(("unmask", "unmasked".to_string()));
        masked = false;
    }
    if masked && args.masked != Some(true) && (args.enabled == Some(true) || args.state.is_some()) {
        return Err(format!(
            "service {name} is masked: add `masked: false` to unmask it"
        ));
    }
    match args.enabled {
        Some(true) if !unit.enabled() || unit.masked() => {
            steps.push(("enable", format!("{} → enabled", or_none(&unit.file))))
        }
        Some(false) if unit.disableable() => {
            steps.push(("disable", format!("{} → disabled", unit.file)))
        }
        _ => {}
    }
    match args.state {
        Some(State::Started) if !unit.running() => {
            steps.push(("start", format!("{} → started", unit.active)))
        }
        Some(State::Stopped) if unit.running() => {
            steps.push(("stop", format!("{} → stopped", unit.active)))
        }
        Some(State::Restarted) => steps.push(("restart", "restarted".to_string())),
        Some(State::Reloaded) => steps.push(("reload-or-restart", "reloaded".to_string())),
        _ => {}
    }
    if args.masked == Some(true) && !unit.masked() {
        steps.push(("mask", "masked".to_string()));
    }
    Ok(steps)
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "(none)"
    } else {
        s
    }
}

impl Service {
    async fn execute(&self, ctx: &Ctx<'_>) -> Result<Outcome, ModuleError> {
        let name = &self.args.name;
        let n = quote(name);
        let mut script = String::new();
        if self.args.daemon_reload && !ctx.check {
            script.push_str("systemctl daemon-reload || exit; ");
        }
        script.push_str(&format!(
            "systemctl show -p LoadState -p ActiveState -p UnitFileState -- {n}"
        ));
        let out = ctx.run(script).await?;
        if !out.success() {
            return Err(ModuleError::new(format!(
                "service {name}: cannot read the unit: {}",
                out.error_text()
            )));
        }
        let unit = parse_show(&out.stdout_str());
        // In check mode an earlier task may only have *planned* to install the unit's package: say what
        // would be done instead of failing the whole check.
        if ctx.check && unit.load == "not-found" && self.args.masked != Some(true) {
            let mut outcome = Outcome::changed(Some(format!(
                "service {name}: not installed yet; would be set up once an earlier task installs it"
            )));
            outcome.notes.push(format!(
                "service {name} does not exist yet (check mode: assuming an earlier task installs it)"
            ));
            return Ok(outcome);
        }
        let steps = plan(&self.args, &unit).map_err(ModuleError::new)?;
        if steps.is_empty() {
            return Ok(Outcome::unchanged());
        }
        if !ctx.check {
            let mut script = String::new();
            for (verb, _) in &steps {
                if matches!(*verb, "start" | "restart" | "reload-or-restart") {
                    // A unit that fails to start: show why (its status and last log lines).
                    script.push_str(&format!(
                        "if ! systemctl {verb} -- {n}; then \
                           systemctl status --no-pager -n 10 -- {n} >&2; exit 1; fi; "
                    ));
                } else {
                    script.push_str(&format!("systemctl {verb} -- {n} || exit 1; "));
                }
            }
            let verbs: Vec<&str> = steps.iter().map(|(v, _)| *v).collect();
            ctx.run_ok(
                &format!("service {name}: systemctl {}", verbs.join(", ")),
                script,
            )
            .await?;
        }
        let what: Vec<&str> = steps.iter().map(|(_, w)| w.as_str()).collect();
        Ok(Outcome::changed(Some(format!(
            "service {name}: {}",
            what.join(", ")
        ))))
    }
}

impl Module for Service {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(self.execute(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: serde_json::Value) -> Args {
        super::super::parse_args(v).unwrap()
    }

    fn unit(load: &str, active: &str, file: &str) -> Unit {
        parse_show(&format!(
            "LoadState={load}\nActiveState={active}\nUnitFileState={file}\n"
        ))
    }

    fn verbs(a: serde_json::Value, u: &Unit) -> Vec<&'static str> {
        plan(&args(a), u)
            .unwrap()
            .into_iter()
            .map(|(v, _)| v)
            .collect()
    }

    #[test]
    fn a_running_enabled_unit_needs_nothing_to_be_started_and_enabled() {
        let u = unit("loaded", "active", "enabled");
        assert!(verbs(
            json!({"name": "ssh", "state": "started", "enabled": true}),
            &u
        )
        .is_empty());
        // static units cannot be enabled: already as enabled as they get.
        let s = unit("loaded", "active", "static");
        assert!(verbs(json!({"name": "x", "enabled": true}), &s).is_empty());
        assert!(verbs(json!({"name": "x", "enabled": false}), &s).is_empty());
    }

    #[test]
    fn a_stopped_disabled_unit_is_enabled_then_started() {
        let u = unit("loaded", "inactive", "disabled");
        assert_eq!(
            verbs(
                json!({"name": "nginx", "state": "started", "enabled": true}),
                &u
            ),
            ["enable", "start"]
        );
        assert_eq!(
            verbs(
                json!({"name": "nginx", "state": "stopped", "enabled": false}),
                &u
            ),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn restarted_and_reloaded_always_act() {
        let u = unit("loaded", "active", "enabled");
        assert_eq!(
            verbs(json!({"name": "ssh", "state": "restarted"}), &u),
            ["restart"]
        );
        assert_eq!(
            verbs(json!({"name": "ssh", "state": "reloaded"}), &u),
            ["reload-or-restart"]
        );
    }

    #[test]
    fn masking_stops_first_and_unmasking_comes_before_anything_else() {
        let u = unit("loaded", "active", "enabled");
        assert_eq!(
            verbs(
                json!({"name": "x", "state": "stopped", "enabled": false, "masked": true}),
                &u
            ),
            ["disable", "stop", "mask"]
        );
        let m = unit("masked", "inactive", "masked");
        assert_eq!(
            verbs(
                json!({"name": "x", "masked": false, "enabled": true, "state": "started"}),
                &m
            ),
            ["unmask", "enable", "start"]
        );
        assert!(verbs(json!({"name": "x", "masked": true}), &m).is_empty());
        let err = plan(&args(json!({"name": "x", "state": "started"})), &m).unwrap_err();
        assert!(err.contains("masked"), "{err}");
    }

    #[test]
    fn an_unknown_unit_is_an_error_naming_it() {
        let u = unit("not-found", "inactive", "");
        let err = plan(&args(json!({"name": "nope", "state": "started"})), &u).unwrap_err();
        assert!(
            err.contains("nope") && err.contains("no such unit"),
            "{err}"
        );
        assert_eq!(verbs(json!({"name": "nope", "masked": true}), &u), ["mask"]);
    }

    #[test]
    fn contradictory_or_unknown_arguments_are_refused() {
        assert!(build(json!({"name": "x", "masked": true, "state": "started"})).is_err());
        assert!(build(json!({"name": "x", "state": "running"}))
            .err()
            .unwrap()
            .contains("state"));
        assert!(build(json!({"name": "x; reboot", "state": "started"})).is_err());
        assert!(build(json!({"name": "x"})).is_err());
        assert!(build(json!({"name": "getty@tty1.service", "enabled": true})).is_ok());
    }
}
