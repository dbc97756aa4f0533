//! The `user` module: a local account present (with its uid, groups, shell, home, …) or absent.
//!
//! One script reads the account (`getent passwd`, `id -gn`/`id -Gn`, `getent shadow`, whether its home
//! exists, whether a group of its name exists); the plan compares only the attributes the task names, so
//! an account created elsewhere is left alone in everything else. Changes go through `useradd`,
//! `usermod` (one call for all attributes) and `userdel` (home kept, as Ansible does by default).
//! `groups` adds to the current supplementary groups unless `append: false`, which makes the list exact.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use futures::future::BoxFuture;
use serde::Deserialize;

use super::{Ctx, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "user",
    args: &[
        "name",
        "state",
        "uid",
        "group",
        "groups",
        "append",
        "shell",
        "home",
        "create_home",
        "system",
        "comment",
        "password_lock",
        "remove",
        "move_home",
    ],
    free_form: None,
    build,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Presence {
    #[default]
    Present,
    Absent,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    name: String,
    #[serde(default)]
    state: Presence,
    uid: Option<u32>,
    group: Option<String>,
    #[serde(default, deserialize_with = "de_groups")]
    groups: Option<Vec<String>>,
    #[serde(default = "yes")]
    append: bool,
    shell: Option<String>,
    home: Option<String>,
    #[serde(default = "yes")]
    create_home: bool,
    #[serde(default)]
    system: bool,
    comment: Option<String>,
    password_lock: Option<bool>,
    /// With `state: absent`: delete the home directory and mail spool too (`userdel -r`).
    #[serde(default)]
    remove: bool,
    /// With a changed `home`: move the old home's contents there (`usermod -m`).
    #[serde(default)]
    move_home: bool,
}

/// `groups`: a list, or a comma-separated string as Ansible accepts; `[]`/`""` means none.
fn de_groups<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let v: Vec<String> = super::de_string_or_list(d)?;
    Ok(Some(
        v.iter()
            .flat_map(|s| s.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    ))
}

/// Names useradd accepts on Debian (a conservative subset: no leading dash, no colon or whitespace).
pub(crate) fn valid_account_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.$".contains(&b))
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = super::parse_args(args)?;
    if !valid_account_name(&args.name) {
        return Err(format!(
            "argument `name`: {:?} is not a valid user name",
            args.name
        ));
    }
    if let Some(g) = &args.group {
        if !valid_account_name(g) {
            return Err(format!("argument `group`: {g:?} is not a valid group name"));
        }
    }
    for g in args.groups.iter().flatten() {
        if !valid_account_name(g) {
            return Err(format!(
                "argument `groups`: {g:?} is not a valid group name"
            ));
        }
    }
    for (arg, v) in [
        ("shell", &args.shell),
        ("home", &args.home),
        ("comment", &args.comment),
    ] {
        if v.as_deref().is_some_and(|s| s.contains([':', '\n'])) {
            return Err(format!(
                "argument `{arg}`: must not contain `:` or a newline"
            ));
        }
    }
    if args.home.as_deref().is_some_and(|h| !h.starts_with('/')) {
        return Err("argument `home`: must be an absolute path".into());
    }
    if args.remove && args.state != Presence::Absent {
        return Err(
            "argument `remove`: only with `state: absent` (it deletes the home directory)".into(),
        );
    }
    if args.move_home && args.home.is_none() {
        return Err("argument `move_home`: give the new `home` to move to".into());
    }
    Ok(Box::new(User { args }))
}

#[derive(Debug)]
struct User {
    args: Args,
}

/// The account as the host has it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Account {
    uid: u32,
    gid: u32,
    group: String,
    /// Supplementary groups (the primary one excluded).
    groups: BTreeSet<String>,
    comment: String,
    home: String,
    shell: String,
    /// The password field of /etc/shadow (`None` when it could not be read, e.g. without root).
    shadow: Option<String>,
    home_exists: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Observed {
    account: Option<Account>,
    /// A group named like the user exists (useradd refuses to create it again unless told `-g`).
    own_group_exists: bool,
}

fn state_script(name: &str) -> String {
    let n = quote(name);
    format!(
        "export LC_ALL=C; \
         getent group {n} >/dev/null && echo own_group=1; \
         if p=$(getent passwd {n}); then \
           echo \"passwd=$p\"; echo \"group=$(id -gn {n})\"; echo \"groups=$(id -Gn {n})\"; \
           if s=$(getent shadow {n} 2>/dev/null); then echo \"shadow=$s\"; fi; \
           h=$(printf '%s' \"$p\" | cut -d: -f6); [ -d \"$h\" ] && echo home_exists=1; \
         fi; true"
    )
}

fn parse_state(text: &str) -> Result<Observed, String> {
    let mut obs = Observed::default();
    let mut acc: Option<Account> = None;
    let mut group = String::new();
    let mut all_groups = Vec::new();
    let mut shadow = None;
    let mut home_exists = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "own_group" => obs.own_group_exists = true,
            "passwd" => {
                let f: Vec<&str> = value.split(':').collect();
                if f.len() < 7 {
                    return Err(format!("unexpected passwd entry {value:?}"));
                }
                acc = Some(Account {
                    uid: f[2].parse().map_err(|_| format!("bad uid in {value:?}"))?,
                    gid: f[3].parse().map_err(|_| format!("bad gid in {value:?}"))?,
                    comment: f[4].to_string(),
                    home: f[5].to_string(),
                    shell: f[6].to_string(),
                    ..Account::default()
                });
            }
            "group" => group = value.trim().to_string(),
            "groups" => all_groups = value.split_whitespace().map(String::from).collect(),
            "shadow" => shadow = value.split(':').nth(1).map(String::from),
            "home_exists" => home_exists = true,
            _ => {}
        }
    }
    if let Some(mut a) = acc {
        a.groups = all_groups.into_iter().filter(|g| *g != group).collect();
        a.group = group;
        a.shadow = shadow;
        a.home_exists = home_exists;
        obs.account = Some(a);
    }
    Ok(obs)
}

fn is_locked(shadow: &str) -> bool {
    shadow.starts_with('!')
}

/// What to run and how to describe it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Shell commands, run in order in one script.
    commands: Vec<String>,
    /// Human summary, e.g. `groups +sudo, shell /bin/sh → /bin/bash`.
    changes: Vec<String>,
    notes: Vec<String>,
}

fn plan(args: &Args, obs: &Observed) -> Plan {
    let mut p = Plan::default();
    let n = quote(&args.name);
    match (&obs.account, args.state) {
        (None, Presence::Absent) => {}
        (Some(a), Presence::Absent) => {
            if args.remove {
                p.commands.push(format!("userdel -r {n}"));
                p.changes.push(format!("remove, with home {}", a.home));
            } else {
                p.commands.push(format!("userdel {n}"));
                p.changes.push("remove".into());
            }
        }
        (None, Presence::Present) => {
            let mut cmd = String::from("useradd");
            let mut what = vec!["create".to_string()];
            if args.system {
                cmd.push_str(" -r");
                what.push("system".into());
            }
            if let Some(uid) = args.uid {
                let _ = write!(cmd, " -u {uid}");
                what.push(format!("uid {uid}"));
            }
            match &args.group {
                Some(g) => {
                    let _ = write!(cmd, " -g {}", quote(g));
                    what.push(format!("group {g}"));
                }
                // useradd would try to create the user's own group and fail: join it instead.
                None if obs.own_group_exists => {
                    let _ = write!(cmd, " -g {n}");
                }
                None => {}
            }
            if let Some(groups) = args.groups.as_ref().filter(|g| !g.is_empty()) {
                let _ = write!(cmd, " -G {}", quote(&groups.join(",")));
                what.push(format!("groups {}", groups.join(",")));
            }
            if let Some(s) = &args.shell {
                let _ = write!(cmd, " -s {}", quote(s));
                what.push(format!("shell {s}"));
            }
            if let Some(h) = &args.home {
                let _ = write!(cmd, " -d {}", quote(h));
                what.push(format!("home {h}"));
            }
            cmd.push_str(if args.create_home { " -m" } else { " -M" });
            if let Some(c) = &args.comment {
                let _ = write!(cmd, " -c {}", quote(c));
            }
            let _ = write!(cmd, " {n}");
            p.commands.push(cmd);
            // A new account's password is `!` (no password) on Debian, which already counts as locked;
            // lock explicitly anyway so other useradd defaults cannot surprise us.
            if args.password_lock == Some(true) {
                p.commands.push(format!(
                    "case $(getent shadow {n} | cut -d: -f2) in '!'*) ;; *) usermod -L {n};; esac"
                ));
                what.push("password locked".into());
            }
            p.changes.push(what.join(", "));
        }
        (Some(a), Presence::Present) => {
            let mut flags = String::new();
            if let Some(uid) = args.uid.filter(|u| *u != a.uid) {
                let _ = write!(flags, " -u {uid}");
                p.changes.push(format!("uid {} → {uid}", a.uid));
            }
            if let Some(g) = &args.group {
                let same = *g == a.group || g.parse::<u32>().ok() == Some(a.gid);
                if !same {
                    let _ = write!(flags, " -g {}", quote(g));
                    p.changes.push(format!("group {} → {g}", a.group));
                }
            }
            if let Some(want) = &args.groups {
                let want: BTreeSet<String> = want.iter().cloned().collect();
                let add: Vec<&String> = want.difference(&a.groups).collect();
                if args.append {
                    if !add.is_empty() {
                        let list: Vec<&str> = add.iter().map(|s| s.as_str()).collect();
                        let _ = write!(flags, " -a -G {}", quote(&list.join(",")));
                        p.changes.push(format!("groups +{}", list.join(" +")));
                    }
                } else if want != a.groups {
                    let list: Vec<&str> = want.iter().map(String::as_str).collect();
                    let _ = write!(flags, " -G {}", quote(&list.join(",")));
                    let mut d: Vec<String> = add.iter().map(|g| format!("+{g}")).collect();
                    d.extend(a.groups.difference(&want).map(|g| format!("-{g}")));
                    p.changes.push(format!("groups {}", d.join(" ")));
                }
            }
            if let Some(s) = args.shell.as_ref().filter(|s| **s != a.shell) {
                let _ = write!(flags, " -s {}", quote(s));
                p.changes.push(format!("shell {} → {s}", a.shell));
            }
            if let Some(h) = args.home.as_ref().filter(|h| **h != a.home) {
                let _ = write!(flags, " -d {}", quote(h));
                if args.move_home && a.home_exists {
                    flags.push_str(" -m");
                    p.changes.push(format!("home {} → {h} (moved)", a.home));
                } else {
                    p.changes.push(format!("home {} → {h}", a.home));
                }
            }
            if let Some(c) = args.comment.as_ref().filter(|c| **c != a.comment) {
                let _ = write!(flags, " -c {}", quote(c));
                p.changes.push(format!("comment {:?} → {c:?}", a.comment));
            }
            if !flags.is_empty() {
                p.commands.push(format!("usermod{flags} {n}"));
            }
            let home = args.home.as_deref().unwrap_or(&a.home);
            let home_moves = args.home.as_ref().is_some_and(|h| *h != a.home);
            if args.create_home && (!a.home_exists || home_moves) && home != "/nonexistent" {
                // Like `useradd -m`: the skeleton files, owned by the user; private by default.
                let h = quote(home);
                p.commands.push(format!(
                    "if [ ! -d {h} ]; then mkdir -p {h} && cp -a /etc/skel/. {h}/ && \
                     chown -R {n}: {h} && chmod 0750 {h}; fi"
                ));
                if !a.home_exists && !home_moves {
                    p.changes.push(format!("create home {home}"));
                }
            }
            match (args.password_lock, a.shadow.as_deref()) {
                (Some(_), None) => p.notes.push(
                    "cannot read /etc/shadow (become root?): password lock left as it is".into(),
                ),
                (Some(true), Some(s)) if !is_locked(s) => {
                    p.commands.push(format!("usermod -L {n}"));
                    p.changes.push("password locked".into());
                }
                (Some(false), Some(s)) if is_locked(s) => {
                    let rest = s.trim_start_matches('!');
                    if rest.is_empty() || rest == "*" {
                        p.notes.push(format!(
                            "{} has no password to unlock; password_lock: false left it locked",
                            args.name
                        ));
                    } else {
                        p.commands.push(format!("usermod -U {n}"));
                        p.changes.push("password unlocked".into());
                    }
                }
                _ => {}
            }
        }
    }
    p
}

impl User {
    async fn execute(&self, ctx: &Ctx<'_>) -> Result<Outcome, ModuleError> {
        let name = &self.args.name;
        let out = ctx.run(state_script(name)).await?;
        if !out.success() {
            return Err(ModuleError::new(format!(
                "user {name}: cannot read the account: {}",
                out.error_text()
            )));
        }
        let obs = parse_state(&out.stdout_str())
            .map_err(|e| ModuleError::new(format!("user {name}: {e}")))?;
        let p = plan(&self.args, &obs);
        if p.changes.is_empty() && p.commands.is_empty() {
            return Ok(Outcome {
                notes: p.notes,
                ..Outcome::unchanged()
            });
        }
        if !ctx.check {
            let script = format!("set -e; {}", p.commands.join("; "));
            ctx.run_ok(&format!("user {name}: {}", p.commands.join("; ")), script)
                .await?;
        }
        Ok(Outcome {
            changed: true,
            diff: Some(format!("user {name}: {}", p.changes.join(", "))),
            notes: p.notes,
            ..Outcome::default()
        })
    }
}

impl Module for User {
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

    const DEPLOY: &str = "own_group=1\n\
        passwd=deploy:x:1001:1001:Deploy user,,,:/home/deploy:/bin/sh\n\
        group=deploy\ngroups=deploy adm users\n\
        shadow=deploy:$y$j9T$abc:19700:0:99999:7:::\nhome_exists=1\n";

    #[test]
    fn the_account_is_read_with_supplementary_groups_apart_from_the_primary() {
        let obs = parse_state(DEPLOY).unwrap();
        let a = obs.account.unwrap();
        assert_eq!((a.uid, a.gid, a.group.as_str()), (1001, 1001, "deploy"));
        assert_eq!(a.groups, BTreeSet::from(["adm".into(), "users".into()]));
        assert_eq!(a.shell, "/bin/sh");
        assert_eq!(a.shadow.as_deref(), Some("$y$j9T$abc"));
        assert!(a.home_exists && obs.own_group_exists);
        assert_eq!(parse_state("").unwrap(), Observed::default());
    }

    #[test]
    fn appending_groups_adds_only_the_missing_ones() {
        let obs = parse_state(DEPLOY).unwrap();
        let p = plan(
            &args(json!({"name": "deploy", "groups": ["sudo", "adm"], "shell": "/bin/bash"})),
            &obs,
        );
        assert_eq!(p.commands, ["usermod -a -G sudo -s /bin/bash deploy"]);
        assert_eq!(p.changes, ["groups +sudo", "shell /bin/sh → /bin/bash"]);
    }

    #[test]
    fn exact_groups_replace_the_list() {
        let obs = parse_state(DEPLOY).unwrap();
        let p = plan(
            &args(json!({"name": "deploy", "groups": "sudo,adm", "append": false})),
            &obs,
        );
        assert_eq!(p.commands, ["usermod -G adm,sudo deploy"]);
        assert_eq!(p.changes, ["groups +sudo -users"]);
    }

    #[test]
    fn a_matching_account_needs_nothing() {
        let obs = parse_state(DEPLOY).unwrap();
        let p = plan(
            &args(
                json!({"name": "deploy", "uid": 1001, "group": "deploy", "groups": ["adm"],
                         "shell": "/bin/sh", "home": "/home/deploy", "comment": "Deploy user,,,",
                         "password_lock": false}),
            ),
            &obs,
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn remove_deletes_the_home_and_move_home_moves_it() {
        let obs = parse_state(DEPLOY).unwrap();
        let p = plan(
            &args(json!({"name": "deploy", "state": "absent", "remove": true})),
            &obs,
        );
        assert_eq!(p.commands, ["userdel -r deploy"]);
        assert_eq!(p.changes, ["remove, with home /home/deploy"]);
        let p = plan(
            &args(json!({"name": "deploy", "home": "/srv/deploy", "move_home": true})),
            &obs,
        );
        assert_eq!(p.commands[0], "usermod -d /srv/deploy -m deploy");
        assert_eq!(p.changes, ["home /home/deploy → /srv/deploy (moved)"]);
        for (bad, arg) in [
            (json!({"name": "deploy", "remove": true}), "remove"),
            (json!({"name": "deploy", "move_home": true}), "move_home"),
        ] {
            let err = build(bad).err().unwrap();
            assert!(err.contains(&format!("`{arg}`")), "{err}");
        }
    }

    #[test]
    fn password_lock_is_read_from_the_shadow_field() {
        let obs = parse_state(DEPLOY).unwrap();
        let p = plan(
            &args(json!({"name": "deploy", "password_lock": true})),
            &obs,
        );
        assert_eq!(p.commands, ["usermod -L deploy"]);
        let locked = parse_state(&DEPLOY.replace("$y$j9T", "!$y$j9T")).unwrap();
        let p = plan(
            &args(json!({"name": "deploy", "password_lock": true})),
            &locked,
        );
        assert!(p.commands.is_empty());
        let nopass = parse_state(&DEPLOY.replace("$y$j9T$abc", "!")).unwrap();
        let p = plan(
            &args(json!({"name": "deploy", "password_lock": false})),
            &nopass,
        );
        assert!(p.commands.is_empty());
        assert_eq!(p.notes.len(), 1);
    }

    #[test]
    fn a_new_user_joins_an_existing_group_of_its_name() {
        let obs = Observed {
            account: None,
            own_group_exists: true,
        };
        let p = plan(
            &args(
                json!({"name": "deploy", "groups": ["sudo"], "shell": "/bin/bash", "system": true}),
            ),
            &obs,
        );
        assert_eq!(
            p.commands,
            ["useradd -r -g deploy -G sudo -s /bin/bash -m deploy"]
        );
        let p = plan(&args(json!({"name": "x1", "state": "absent"})), &obs);
        assert!(p.commands.is_empty());
    }

    #[test]
    fn bad_arguments_name_the_argument() {
        assert!(build(json!({"name": "de ploy"}))
            .err()
            .unwrap()
            .contains("name"));
        assert!(build(json!({"name": "d", "groups": ["a b"]}))
            .err()
            .unwrap()
            .contains("groups"));
        assert!(build(json!({"name": "d", "home": "rel"}))
            .err()
            .unwrap()
            .contains("home"));
        assert!(build(json!({"name": "d", "password": "x"}))
            .err()
            .unwrap()
            .contains("password"));
    }
}
