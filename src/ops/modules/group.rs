//! The `group` module: a local group present (with its gid) or absent.
//!
//! One `getent group` reads the state; `groupadd`, `groupmod -g` or `groupdel` changes it. `system`
//! matters only when the group is created (a gid from the system range).

use futures::future::BoxFuture;
use serde::Deserialize;

use super::user::{valid_account_name, Presence};
use super::{Ctx, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "group",
    args: &["name", "state", "gid", "system"],
    free_form: None,
    build,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    name: String,
    #[serde(default)]
    state: Presence,
    gid: Option<u32>,
    #[serde(default)]
    system: bool,
}

#[derive(Debug)]
struct Group {
    args: Args,
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    if !valid_account_name(&args.name) {
        return Err(format!(
            "argument `name`: {:?} is not a valid group name",
            args.name
        ));
    }
    Ok(Box::new(Group { args }))
}

/// The gid of the group from a `getent group` line (`name:x:gid:members`), `None` when absent.
fn parse_gid(line: &str) -> Result<Option<u32>, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    line.split(':')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .map(Some)
        .ok_or_else(|| format!("unexpected group entry {line:?}"))
}

/// The command to run and its summary, or `None` when the group is as wanted.
fn plan(args: &Args, gid: Option<u32>) -> Option<(String, String)> {
    let n = quote(&args.name);
    match (gid, args.state) {
        (None, Presence::Absent) => None,
        (Some(_), Presence::Absent) => Some((format!("groupdel {n}"), "remove".into())),
        (None, Presence::Present) => {
            let mut cmd = String::from("groupadd");
            let mut what = String::from("create");
            if args.system {
                cmd.push_str(" -r");
                what.push_str(" (system)");
            }
            if let Some(g) = args.gid {
                cmd.push_str(&format!(" -g {g}"));
                what.push_str(&format!(" gid {g}"));
            }
            Some((format!("{cmd} {n}"), what))
        }
        (Some(have), Presence::Present) => match args.gid {
            Some(want) if want != have => Some((
                format!("groupmod -g {want} {n}"),
                format!("gid {have} → {want}"),
            )),
            _ => None,
        },
    }
}

impl Group {
    async fn execute(&self, ctx: &Ctx<'_>) -> Result<Outcome, ModuleError> {
        let name = &self.args.name;
        // getent exits 2 for "no such group": that is a state, not an error.
        let out = ctx
            .run(format!("getent group {} || [ $? -eq 2 ]", quote(name)))
            .await?;
        if !out.success() {
            return Err(ModuleError::new(format!(
                "group {name}: cannot read the group: {}",
                out.error_text()
            )));
        }
        let gid = parse_gid(&out.stdout_str())
            .map_err(|e| ModuleError::new(format!("group {name}: {e}")))?;
        let Some((cmd, what)) = plan(&self.args, gid) else {
            return Ok(Outcome::unchanged());
        };
        if !ctx.check {
            ctx.run_ok(&format!("group {name}: {cmd}"), cmd).await?;
        }
        Ok(Outcome::changed(Some(format!("group {name}: {what}"))))
    }
}

impl Module for Group {
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

    #[test]
    fn getent_lines_give_the_gid() {
        assert_eq!(parse_gid("sudo:x:27:deploy\n"), Ok(Some(27)));
        assert_eq!(parse_gid(""), Ok(None));
        assert!(parse_gid("garbage").is_err());
    }

    #[test]
    fn the_plan_changes_only_what_differs() {
        let a = args(json!({"name": "app", "gid": 2000, "system": true}));
        assert_eq!(
            plan(&a, None),
            Some((
                "groupadd -r -g 2000 app".into(),
                "create (system) gid 2000".into()
            ))
        );
        assert_eq!(plan(&a, Some(2000)), None);
        assert_eq!(
            plan(&a, Some(1999)).unwrap().0,
            "groupmod -g 2000 app".to_string()
        );
        assert_eq!(plan(&args(json!({"name": "app"})), Some(5)), None);
        let gone = args(json!({"name": "app", "state": "absent"}));
        assert_eq!(plan(&gone, None), None);
        assert_eq!(plan(&gone, Some(5)).unwrap().0, "groupdel app");
    }

    #[test]
    fn unknown_arguments_and_states_are_refused() {
        assert!(build(json!({"name": "app", "members": []}))
            .err()
            .unwrap()
            .contains("members"));
        assert!(build(json!({"name": "app", "state": "gone"}))
            .err()
            .unwrap()
            .contains("state"));
    }
}
