//! The `nftables` module: the host's firewall is the given ruleset, and cozy can still log in.
//!
//! A firewall is the one change that can cut us off from the host, so a change goes through four gates:
//!
//! 1. **Read** (one round trip): the ruleset file `dest` and the live tables. Unchanged when the file is
//!    the same and every table it declares is loaded (after a reboot without the nftables service, the
//!    file is right but nothing is loaded: that is a change).
//! 2. **Validate and analyse** (one round trip, also in `--check`): `nft -c -f` (nft's own message, with
//!    line numbers, on failure); then the candidate is loaded into a scratch network namespace
//!    (`unshare -n`, which vanishes with the process) and listed as JSON, and [`ssh_verdict`] walks every
//!    `input` chain as a new TCP connection to `facts.ssh_port` would: a chain that certainly drops it
//!    (policy drop without an accepting rule, or an unconditional drop before one) is refused. The walk
//!    is deliberately simple — conditions it cannot decide (addresses, interfaces) neither prove nor
//!    disprove anything — because gate 4 is the real proof.
//! 3. **Apply, commit-confirmed** (one round trip): save the live ruleset, start a detached timer that
//!    restores it after [`ROLLBACK_AFTER`] unless cancelled, then `nft -f` the candidate (atomic).
//! 4. **Prove**: [`Transport::probe_new_connection`] opens a brand-new SSH connection (established ones
//!    survive a firewall change, so only a new one proves anything). Success cancels the timer and writes
//!    `dest`; failure restores the saved ruleset at once (the timer does it if even that round trip is
//!    lost) and the task fails. Enabling the nftables service is the playbook's business.
//!
//! [`Transport::probe_new_connection`]: crate::ops::transport::Transport::probe_new_connection

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::Value;

use super::{
    parse_args, put_file, unified_diff, Ctx, FileAttrs, Module, ModuleError, ModuleSpec, Outcome,
};
use crate::ops::transport::{quote, Command};

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "nftables",
    args: &["content", "src", "dest"],
    free_form: None,
    build,
};

/// The saved ruleset comes back by itself this long after applying, unless the new one is proven.
pub const ROLLBACK_AFTER: Duration = Duration::from_secs(60);
/// How long a new SSH connection may take to prove the new ruleset (well inside [`ROLLBACK_AFTER`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    content: Option<String>,
    /// A template, rendered with the task's variables.
    src: Option<String>,
    #[serde(default = "default_dest")]
    dest: String,
}

fn default_dest() -> String {
    "/etc/nftables.conf".into()
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    super::copy::check_dest(&args.dest)?;
    match (&args.content, &args.src) {
        (Some(_), Some(_)) => Err("arguments `content` and `src`: give one, not both".into()),
        (None, None) => Err("argument `content` or `src` is required".into()),
        _ => Ok(Box::new(Nftables { args })),
    }
}

struct Nftables {
    args: Args,
}

impl Nftables {
    /// How messages name the candidate ruleset (nft's line numbers refer to it).
    fn source_name(&self) -> String {
        match &self.args.src {
            Some(src) => format!("{src} (rendered)"),
            None => format!("content for {}", self.args.dest),
        }
    }
}

impl Module for Nftables {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let dest = &self.args.dest;
            let candidate = match (&self.args.content, &self.args.src) {
                (Some(text), _) => text.clone(),
                (None, Some(src)) => ctx
                    .templates
                    .render_file(src)
                    .map_err(|e| ModuleError::new(format!("template {src}: {e}")))?,
                (None, None) => unreachable!("build requires content or src"),
            };

            // Gate 1: read.
            let (old, live_tables) = read_state(ctx, dest).await?;
            let Some(live_tables) = live_tables else {
                // In --check, the task that installs nftables has not really run: say what would
                // happen rather than fail the whole check.
                if !ctx.check {
                    return Err(ModuleError::new(
                        "nft is not installed on the host (apt package nftables)",
                    ));
                }
                let diff = unified_diff(dest, old.as_deref().unwrap_or_default(), &candidate);
                let mut outcome = Outcome::changed(diff);
                outcome.notes.push(
                    "nft is not installed yet, so the ruleset was not validated or checked for the \
                     SSH port"
                        .into(),
                );
                return Ok(outcome);
            };
            let missing: Vec<String> = declared_tables(&candidate)
                .into_iter()
                .filter(|t| !live_tables.contains(t))
                .collect();
            let same_file = old.as_deref() == Some(candidate.as_str());
            if same_file && missing.is_empty() {
                return Ok(Outcome::unchanged());
            }
            let mut diff = String::new();
            if ctx.diff || ctx.check {
                diff = unified_diff(dest, old.as_deref().unwrap_or_default(), &candidate)
                    .unwrap_or_default();
            }
            if !missing.is_empty() {
                diff.push_str(&format!(
                    "live ruleset: table {} not loaded → load {dest}\n",
                    missing.join(", table ")
                ));
            }

            // Gate 2: validate and analyse.
            let mut outcome = Outcome::changed(Some(diff));
            if let Some(note) = self.validate(ctx, &candidate).await? {
                outcome.notes.push(note);
            }
            if ctx.check {
                return Ok(outcome);
            }

            // Gates 3 and 4: apply, prove, then keep or restore.
            let dir = apply_with_rollback(ctx, &candidate).await?;
            let probe = tokio::time::timeout(PROBE_TIMEOUT, ctx.host.probe_new_connection()).await;
            let failure = match probe {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "no new connection within {} s",
                    PROBE_TIMEOUT.as_secs()
                )),
            };
            if let Some(why) = failure {
                let restored = match rollback_now(ctx, &dir).await {
                    Ok(()) => "the previous ruleset was restored".to_string(),
                    Err(e) => format!(
                        "restoring the previous ruleset failed ({e}); the rollback timer restores it \
                         within {} s",
                        ROLLBACK_AFTER.as_secs()
                    ),
                };
                return Err(ModuleError::new(format!(
                    "the new nftables ruleset for {dest} cut off new SSH connections ({why}); \
                     {restored}"
                )));
            }
            confirm(ctx, &dir).await?;
            if !same_file {
                put_file(ctx, dest, candidate.as_bytes(), &FileAttrs::default(), None).await?;
            }
            Ok(outcome)
        })
    }
}

/// The content of `dest` (`None`: absent) and the live tables (`inet filter`, …; `None`: nft is not
/// installed), in one round trip.
async fn read_state(
    ctx: &Ctx<'_>,
    dest: &str,
) -> Result<(Option<String>, Option<BTreeSet<String>>), ModuleError> {
    let d = quote(dest);
    let script = format!(
        "if [ -f {d} ]; then printf b; base64 -w0 -- {d} || exit 3; fi; echo\n\
         if command -v nft >/dev/null; then nft list tables || exit 5; else echo no-nft; fi"
    );
    let out = ctx.run(script).await?;
    if !out.success() {
        return Err(ModuleError::new(format!(
            "cannot read the firewall state ({dest}, nft list tables): {}",
            out.error_text()
        )));
    }
    let text = out.stdout_str();
    let (first, tables) = text.split_once('\n').unwrap_or((&text, ""));
    let old = match first.strip_prefix('b') {
        Some(b64) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ModuleError::new(format!("cannot read {dest}: {e}")))?;
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        None => None,
    };
    if tables.trim() == "no-nft" {
        return Ok((old, None));
    }
    let live = tables
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_string)
        .collect();
    Ok((old, Some(live)))
}

/// The tables a ruleset file declares, as `nft list tables` names them (`inet filter`; the family
/// defaults to `ip`). Only top-level `table` / `add table` lines: enough to notice a ruleset that is not
/// loaded.
fn declared_tables(text: &str) -> BTreeSet<String> {
    const FAMILIES: &[&str] = &["ip", "ip6", "inet", "arp", "bridge", "netdev"];
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let mut word = words.next();
        if word == Some("add") {
            word = words.next();
        }
        if word != Some("table") {
            continue;
        }
        let (family, name) = match (words.next(), words.next()) {
            (Some(f), Some(n)) if FAMILIES.contains(&f) => (f, n),
            (Some(n), _) => ("ip", n),
            _ => continue,
        };
        let name = name.trim_end_matches('{').trim();
        if !name.is_empty() {
            out.insert(format!("{family} {name}"));
        }
    }
    out
}

impl Nftables {
    /// Gate 2. `Ok(Some(note))` when the SSH analysis could not run (then gate 4 alone protects us).
    async fn validate(
        &self,
        ctx: &Ctx<'_>,
        candidate: &str,
    ) -> Result<Option<String>, ModuleError> {
        let analyse = ctx.facts.ssh_port.is_some();
        let script = format!(
            r#"command -v nft >/dev/null || {{ echo 'nft is not installed (apt package nftables)' >&2; exit 4; }}
dir=$(mktemp -d) || exit 3
trap 'rm -rf "$dir"' EXIT
cat > "$dir/candidate.nft"
if ! out=$(nft -c -f "$dir/candidate.nft" 2>&1); then
  printf '%s\n' "$out" | sed "s|$dir/candidate.nft|@CANDIDATE@|g" >&2; exit 65
fi
{analyse} || exit 0
if ! unshare -n true 2>/dev/null; then echo 'no-scratch: unshare -n is not permitted here'; exit 0; fi
unshare -n sh -c '
  if ! err=$(nft -f "$1" 2>&1); then printf "no-scratch: %s\n" "$err"; exit 0; fi
  echo json; nft -j list ruleset; echo; echo text; nft -a list ruleset' sh "$dir/candidate.nft" |
  sed "s|$dir/candidate.nft|@CANDIDATE@|g"
"#
        );
        let out = ctx
            .host
            .run(
                Command::new(script)
                    .root(ctx.become_root)
                    .stdin(candidate.as_bytes()),
            )
            .await?;
        let name = self.source_name();
        if out.status == 65 {
            return Err(ModuleError::new(format!(
                "the nftables ruleset is invalid (nft -c):\n{}",
                out.stderr_str().trim_end().replace("@CANDIDATE@", &name)
            )));
        }
        if !out.success() {
            return Err(ModuleError::new(format!(
                "cannot check the nftables ruleset: {}",
                out.error_text()
            )));
        }
        let Some(port) = ctx.facts.ssh_port else {
            return Ok(None);
        };
        let text = out.stdout_str();
        if let Some(why) = text.strip_prefix("no-scratch: ") {
            return Ok(Some(format!(
                "could not check the ruleset for the SSH port in a scratch network namespace ({}); \
                 relying on the new-connection probe",
                why.trim().replace("@CANDIDATE@", &name)
            )));
        }
        let (json, listing) = text
            .strip_prefix("json\n")
            .and_then(|rest| rest.split_once("\ntext\n"))
            .ok_or_else(|| {
                ModuleError::new(format!(
                    "cannot check the nftables ruleset: unexpected output {text:?}"
                ))
            })?;
        let ruleset: Value = serde_json::from_str(json).map_err(|e| {
            ModuleError::new(format!("cannot check the nftables ruleset: nft -j: {e}"))
        })?;
        match ssh_verdict(&ruleset, port) {
            Ok(()) => Ok(None),
            Err(blocked) => Err(ModuleError::new(format!(
                "refusing the nftables ruleset ({name}): it would block new SSH connections to port \
                 {port}, the port cozy is connected to: {}",
                blocked.describe(&rule_texts(listing))
            ))),
        }
    }
}

/// Gate 3: saves the live ruleset, starts the rollback timer, applies the candidate. Returns the state
/// directory on the host that [`confirm`] and [`rollback_now`] need.
async fn apply_with_rollback(ctx: &Ctx<'_>, candidate: &str) -> Result<String, ModuleError> {
    // The timer runs in its own session (setsid) so that a dying SSH session does not take it along,
    // and `mkdir decided` makes "cancel" and "roll back" mutually exclusive.
    let script = format!(
        r#"set -e
dir=$(mktemp -d /run/cozy-nft.XXXXXX 2>/dev/null || mktemp -d)
cat > "$dir/candidate.nft"
{{ echo 'flush ruleset'; nft list ruleset; }} > "$dir/rollback.nft"
setsid sh -c 'echo $$ > "$1/timer.pid"; sleep "$2"; mkdir "$1/decided" 2>/dev/null && nft -f "$1/rollback.nft" && rm -rf "$1"' \
  sh "$dir" {secs} </dev/null >/dev/null 2>&1 &
i=0; while [ ! -s "$dir/timer.pid" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
if ! out=$(nft -f "$dir/candidate.nft" 2>&1); then
  mkdir "$dir/decided"; kill -- "-$(cat "$dir/timer.pid")" 2>/dev/null || true; rm -rf "$dir"
  printf '%s\n' "$out" >&2; exit 65
fi
echo "$dir""#,
        secs = ROLLBACK_AFTER.as_secs()
    );
    let out = ctx
        .host
        .run(
            Command::new(script)
                .root(ctx.become_root)
                .stdin(candidate.as_bytes()),
        )
        .await?;
    if !out.success() {
        return Err(ModuleError::new(format!(
            "applying the nftables ruleset failed (the live ruleset is unchanged): {}",
            out.error_text()
        )));
    }
    Ok(out.stdout_str().trim().to_string())
}

/// Gate 4 passed: cancel the timer. Fails when the timer was faster (the old ruleset is back).
async fn confirm(ctx: &Ctx<'_>, dir: &str) -> Result<(), ModuleError> {
    let d = quote(dir);
    let script = format!(
        "if mkdir {d}/decided 2>/dev/null; then kill -- \"-$(cat {d}/timer.pid)\" 2>/dev/null; \
         rm -rf {d}; echo kept; else echo late; fi"
    );
    let out = ctx
        .run_ok("confirming the nftables ruleset", script)
        .await?;
    if out.stdout_str().trim() == "kept" {
        Ok(())
    } else {
        Err(ModuleError::new(format!(
            "the nftables rollback timer ({} s) fired before the new ruleset was confirmed; the \
             previous ruleset is back",
            ROLLBACK_AFTER.as_secs()
        )))
    }
}

/// Gate 4 failed: restore the saved ruleset now, unless the timer already did.
async fn rollback_now(ctx: &Ctx<'_>, dir: &str) -> Result<(), ModuleError> {
    let d = quote(dir);
    let script = format!(
        "if mkdir {d}/decided 2>/dev/null; then kill -- \"-$(cat {d}/timer.pid)\" 2>/dev/null; \
         nft -f {d}/rollback.nft || exit 1; rm -rf {d}; fi"
    );
    let out = ctx
        .host
        .run(
            Command::new(script)
                .root(ctx.become_root)
                .timeout(Duration::from_secs(15)),
        )
        .await?;
    if out.success() {
        Ok(())
    } else {
        Err(ModuleError::new(out.error_text()))
    }
}

/// Why a new SSH connection would be dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct Blocked {
    /// `inet filter input`.
    pub chain: String,
    /// The rule that drops it (`family table` and its handle), or `None` for the chain's policy.
    pub rule: Option<(String, u64)>,
}

impl Blocked {
    fn describe(&self, texts: &HashMap<(String, u64), String>) -> String {
        match &self.rule {
            None => format!(
                "chain {} has policy drop and no rule accepts the port (add e.g. `tcp dport <port> \
                 accept`)",
                self.chain
            ),
            Some((table, handle)) => match texts.get(&(table.clone(), *handle)) {
                Some(text) => format!("chain {} drops it at `{text}`", self.chain),
                None => format!("chain {} drops it at rule handle {handle}", self.chain),
            },
        }
    }
}

/// Rule texts of `nft -a list ruleset` by (`family table`, handle), for messages.
fn rule_texts(listing: &str) -> HashMap<(String, u64), String> {
    let mut out = HashMap::new();
    let mut table = String::new();
    for line in listing.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("table ") {
            table = rest
                .split(" {")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            continue;
        }
        if ["chain ", "set ", "map ", "type ", "}"]
            .iter()
            .any(|p| line.starts_with(p))
        {
            continue;
        }
        if let Some((text, handle)) = line.rsplit_once(" # handle ") {
            if let Ok(h) = handle.trim().parse() {
                out.insert((table.clone(), h), text.trim().to_string());
            }
        }
    }
    out
}

/// Can a new TCP connection to `port` get through every `input` chain of `ruleset` (the JSON of
/// `nft -j list ruleset`)? See the module's documentation for how much this proves.
pub fn ssh_verdict(ruleset: &Value, port: u16) -> Result<(), Blocked> {
    let rs = Ruleset::new(ruleset);
    for (key, chain) in &rs.chains {
        let is_input = chain.get("hook").and_then(Value::as_str) == Some("input")
            && matches!(key.0.as_str(), "ip" | "ip6" | "inet");
        if !is_input {
            continue;
        }
        let name = format!("{} {} {}", key.0, key.1, key.2);
        match rs.walk(key, port, 0) {
            Flow::Accept => {}
            Flow::Drop(table, handle) => {
                return Err(Blocked {
                    chain: name,
                    rule: Some((table, handle)),
                })
            }
            Flow::Continue => {
                if chain.get("policy").and_then(Value::as_str) == Some("drop") {
                    return Err(Blocked {
                        chain: name,
                        rule: None,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Whether a condition holds for a new TCP connection to the SSH port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    Yes,
    No,
    Unknown,
}

/// Where a packet goes after a chain.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Accept,
    /// Dropped or rejected by this rule (`family table`, handle).
    Drop(String, u64),
    /// Fell off the end (or `return`).
    Continue,
}

static NULL: Value = Value::Null;

/// (family, table, name).
type Key = (String, String, String);

struct Ruleset<'a> {
    chains: Vec<(Key, &'a Value)>,
    rules: HashMap<Key, Vec<&'a Value>>,
    /// Named sets' elements, to resolve `tcp dport @ports`.
    sets: HashMap<Key, &'a Value>,
}

fn key_of(obj: &Value, name_field: &str) -> Key {
    let s = |f: &str| {
        obj.get(f)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (s("family"), s("table"), s(name_field))
}

impl<'a> Ruleset<'a> {
    fn new(json: &'a Value) -> Self {
        let mut rs = Ruleset {
            chains: Vec::new(),
            rules: HashMap::new(),
            sets: HashMap::new(),
        };
        let items = json.get("nftables").and_then(Value::as_array);
        for item in items.into_iter().flatten() {
            if let Some(chain) = item.get("chain") {
                rs.chains.push((key_of(chain, "name"), chain));
            } else if let Some(rule) = item.get("rule") {
                rs.rules
                    .entry(key_of(rule, "chain"))
                    .or_default()
                    .push(rule);
            } else if let Some(set) = item.get("set").or_else(|| item.get("map")) {
                if let Some(elem) = set.get("elem") {
                    rs.sets.insert(key_of(set, "name"), elem);
                }
            }
        }
        rs
    }

    /// Follows a new SSH connection through the chain `key`.
    fn walk(&self, key: &Key, port: u16, depth: u32) -> Flow {
        if depth > 16 {
            return Flow::Continue;
        }
        let table = format!("{} {}", key.0, key.1);
        for rule in self.rules.get(key).into_iter().flatten() {
            let handle = rule.get("handle").and_then(Value::as_u64).unwrap_or(0);
            let exprs = rule.get("expr").and_then(Value::as_array);
            let mut truth = Truth::Yes;
            // A condition that names the SSH port: an accept behind it is the rule we look for, even
            // when other conditions (source address, interface) are unknown here.
            let mut names_port = false;
            let mut verdict: Option<&Value> = None;
            for expr in exprs.into_iter().flatten() {
                let Some((kind, body)) = expr.as_object().and_then(|o| o.iter().next()) else {
                    continue;
                };
                let t = match kind.as_str() {
                    "match" => {
                        let (t, port_cond) = self.eval_match(key, body, port);
                        names_port |= port_cond && t == Truth::Yes;
                        t
                    }
                    // `limit rate N/minute` lets a lone new connection through; `limit rate over`
                    // only matches floods.
                    "limit" => {
                        if body.get("inv").and_then(Value::as_bool) == Some(true) {
                            Truth::No
                        } else {
                            Truth::Yes
                        }
                    }
                    "counter" | "log" | "mangle" | "notrack" | "dup" | "ct helper" | "secmark" => {
                        Truth::Yes
                    }
                    "accept" | "drop" | "reject" | "jump" | "goto" | "return" | "vmap" => {
                        verdict = Some(expr);
                        Truth::Yes
                    }
                    _ => Truth::Unknown,
                };
                truth = match (truth, t) {
                    (Truth::No, _) | (_, Truth::No) => Truth::No,
                    (Truth::Unknown, _) | (_, Truth::Unknown) => Truth::Unknown,
                    _ => Truth::Yes,
                };
                if truth == Truth::No {
                    break;
                }
            }
            if truth == Truth::No {
                continue;
            }
            let Some(verdict) = verdict else { continue };
            let (kind, body, via_port) = match verdict.get("vmap") {
                Some(vmap) => match self.vmap_lookup(key, vmap, port) {
                    Some((v, via_port)) => {
                        let (k, b) = v.as_object().and_then(|o| o.iter().next()).unzip();
                        (k.map(String::as_str).unwrap_or(""), b, via_port)
                    }
                    None => continue,
                },
                None => {
                    let (k, b) = verdict.as_object().and_then(|o| o.iter().next()).unzip();
                    (k.map(String::as_str).unwrap_or(""), b, false)
                }
            };
            let certain = truth == Truth::Yes;
            let aimed = certain || names_port || via_port;
            match kind {
                "accept" if aimed => return Flow::Accept,
                "drop" | "reject" if certain => return Flow::Drop(table, handle),
                "jump" | "goto" if aimed => {
                    let target = body
                        .and_then(|b| b.get("target"))
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let sub = (key.0.clone(), key.1.clone(), target.to_string());
                    match self.walk(&sub, port, depth + 1) {
                        Flow::Accept => return Flow::Accept,
                        drop @ Flow::Drop(..) if certain => return drop,
                        _ => {}
                    }
                }
                "return" if certain => return Flow::Continue,
                _ => {}
            }
        }
        Flow::Continue
    }

    /// Evaluates one `match` for a new TCP connection to `port`; the flag says whether it is a
    /// condition on the destination port.
    fn eval_match(&self, chain: &Key, m: &Value, port: u16) -> (Truth, bool) {
        let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
        let left = m.get("left").unwrap_or(&NULL);
        let right = m.get("right").unwrap_or(&NULL);
        let negated = op == "!=";
        let holds = |contained: Option<bool>| match contained {
            Some(c) if c != negated => Truth::Yes,
            Some(_) => Truth::No,
            None => Truth::Unknown,
        };
        if let Some(payload) = left.get("payload") {
            let proto = payload
                .get("protocol")
                .and_then(Value::as_str)
                .unwrap_or("");
            let field = payload.get("field").and_then(Value::as_str).unwrap_or("");
            return match (proto, field) {
                ("tcp" | "th", "dport") => {
                    let c = match op {
                        "==" | "!=" | "in" => self.contains(chain, right, &Value::from(port)),
                        _ => compare(op, port, right),
                    };
                    (holds(c), !negated)
                }
                ("ip", "protocol") | ("ip6", "nexthdr") => (
                    holds(self.contains(chain, right, &Value::from("tcp"))),
                    false,
                ),
                // Any other L4 header implies that protocol: never our TCP connection.
                ("udp" | "udplite" | "sctp" | "dccp" | "icmp" | "icmpv6" | "igmp", _) => {
                    (Truth::No, false)
                }
                _ => (Truth::Unknown, false),
            };
        }
        if let Some(meta) = left.get("meta") {
            return match meta.get("key").and_then(Value::as_str).unwrap_or("") {
                "l4proto" => (
                    holds(self.contains(chain, right, &Value::from("tcp"))),
                    false,
                ),
                // Our connection does not come in through loopback.
                "iif" | "iifname" if right.as_str() == Some("lo") => {
                    (holds(Some(true)).flip(), false)
                }
                _ => (Truth::Unknown, false),
            };
        }
        if let Some(ct) = left.get("ct") {
            if ct.get("key").and_then(Value::as_str) == Some("state") {
                return (
                    holds(self.contains(chain, right, &Value::from("new"))),
                    false,
                );
            }
        }
        (Truth::Unknown, false)
    }

    /// Whether `right` (a value, a set, a range or `@named_set`) contains `value`; `None`: cannot tell.
    fn contains(&self, chain: &Key, right: &Value, value: &Value) -> Option<bool> {
        match right {
            Value::Array(items) => any_of(items.iter().map(|i| self.contains(chain, i, value))),
            Value::String(s) if s.starts_with('@') => {
                let key = (chain.0.clone(), chain.1.clone(), s[1..].to_string());
                let elems = self.sets.get(&key)?;
                self.contains(chain, elems, value)
            }
            Value::Object(o) => {
                if let Some(set) = o.get("set") {
                    self.contains(chain, set, value)
                } else if let Some(range) = o.get("range").and_then(Value::as_array) {
                    let n = value.as_u64()?;
                    let lo = port_number(range.first()?)?;
                    let hi = port_number(range.get(1)?)?;
                    Some(lo <= n && n <= hi)
                } else if let Some(elem) = o.get("elem") {
                    self.contains(chain, elem.get("val")?, value)
                } else {
                    None
                }
            }
            scalar => match (value.as_u64(), value.as_str()) {
                (Some(n), _) => Some(port_number(scalar)? == n),
                (_, Some(name)) => match scalar {
                    Value::String(s) => Some(s == name),
                    // `ip protocol 6`, `meta l4proto 6`.
                    Value::Number(n) => Some(name == "tcp" && n.as_u64() == Some(6)),
                    _ => None,
                },
                _ => None,
            },
        }
    }

    /// The verdict a verdict map gives our connection (and whether its key was the port); `None`:
    /// no entry applies or it cannot be told.
    fn vmap_lookup<'v>(
        &self,
        chain: &Key,
        vmap: &'v Value,
        port: u16,
    ) -> Option<(&'v Value, bool)> {
        let key = vmap.get("key")?;
        let (value, via_port) = if let Some(p) = key.get("payload") {
            let proto = p.get("protocol").and_then(Value::as_str)?;
            let field = p.get("field").and_then(Value::as_str)?;
            match (proto, field) {
                ("tcp" | "th", "dport") => (Value::from(port), true),
                _ => return None,
            }
        } else if key
            .get("meta")
            .and_then(|m| m.get("key"))
            .and_then(Value::as_str)
            == Some("l4proto")
        {
            (Value::from("tcp"), false)
        } else if key
            .get("ct")
            .and_then(|c| c.get("key"))
            .and_then(Value::as_str)
            == Some("state")
        {
            (Value::from("new"), false)
        } else {
            return None;
        };
        let entries = vmap.get("data")?.get("set")?.as_array()?;
        entries.iter().find_map(|entry| {
            let pair = entry.as_array()?;
            let k = pair.first()?;
            self.contains(chain, &Value::Array(vec![k.clone()]), &value)
                .filter(|&hit| hit)
                .map(|_| (pair.get(1).unwrap_or(&NULL), via_port))
        })
    }
}

impl Truth {
    /// `iif lo` holds → our connection does not match it, and the other way round.
    fn flip(self) -> Truth {
        match self {
            Truth::Yes => Truth::No,
            Truth::No => Truth::Yes,
            Truth::Unknown => Truth::Unknown,
        }
    }
}

fn any_of(results: impl Iterator<Item = Option<bool>>) -> Option<bool> {
    let mut unknown = false;
    for r in results {
        match r {
            Some(true) => return Some(true),
            None => unknown = true,
            Some(false) => {}
        }
    }
    (!unknown).then_some(false)
}

/// A port as nft lists it: a number, or a service name we know.
fn port_number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => match s.as_str() {
            "ssh" => Some(22),
            other => other.parse().ok(),
        },
        _ => None,
    }
}

/// `tcp dport < 1024` and friends.
fn compare(op: &str, port: u16, right: &Value) -> Option<bool> {
    let r = port_number(right)?;
    let p = u64::from(port);
    match op {
        "<" | "lt" => Some(p < r),
        ">" | "gt" => Some(p > r),
        "<=" | "le" => Some(p <= r),
        ">=" | "ge" => Some(p >= r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::facts::Facts;
    use crate::ops::modules::file::tests::NoTemplates;
    use crate::ops::transport::{LocalTransport, Output, Transport, TransportError};

    /// The JSON listing of `ruleset` as the kernel accepted it, from a throwaway network namespace.
    fn listed(ruleset: &str) -> (Value, String) {
        use std::io::Write as _;
        let mut child = std::process::Command::new("unshare")
            .args([
                "-n",
                "sh",
                "-c",
                "nft -f - && nft -j list ruleset && echo @@ && nft -a list ruleset",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "nft refused the test ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (json, listing) = text.split_once("@@\n").unwrap();
        (serde_json::from_str(json).unwrap(), listing.to_string())
    }

    fn verdict(ruleset: &str) -> Result<(), String> {
        let (json, listing) = listed(ruleset);
        ssh_verdict(&json, 22).map_err(|b| b.describe(&rule_texts(&listing)))
    }

    fn input_chain(policy: &str, rules: &str) -> String {
        format!(
            "table inet filter {{\n  chain input {{\n    type filter hook input priority 0; policy {policy};\n{rules}\n  }}\n  chain admin {{ accept; }}\n  chain nothing {{ counter; }}\n}}\n"
        )
    }

    #[test]
    fn the_hardening_ruleset_passes() {
        let rules = "ct state established,related accept\n ct state invalid drop\n iif lo accept\n \
                     meta l4proto icmp accept\n tcp dport 22 ct state new limit rate 10/minute accept\n \
                     tcp dport { 80, 443 } accept";
        assert_eq!(verdict(&input_chain("drop", rules)), Ok(()));
    }

    #[test]
    fn policy_drop_without_an_ssh_rule_is_refused() {
        let rules =
            "ct state established,related accept\n iif lo accept\n tcp dport { 80, 443 } accept\n \
                     udp dport 22 accept";
        let err = verdict(&input_chain("drop", rules)).unwrap_err();
        assert!(err.contains("inet filter input has policy drop"), "{err}");
    }

    #[test]
    fn an_unconditional_drop_before_the_ssh_rule_is_refused_and_quoted() {
        let rules = "iif lo accept\n ip protocol tcp drop\n tcp dport 22 accept";
        let err = verdict(&input_chain("accept", rules)).unwrap_err();
        assert!(err.contains("`ip protocol tcp drop`"), "{err}");
        let rules = "tcp dport 22 reject with tcp reset";
        assert!(verdict(&input_chain("accept", rules)).is_err());
        let rules = "counter drop";
        assert!(verdict(&input_chain("accept", rules)).is_err());
    }

    #[test]
    fn ssh_accepted_through_sets_ranges_maps_and_jumps_passes() {
        for rules in [
            "tcp dport { 80, 22 } accept",
            "tcp dport 1-1024 accept",
            "th dport 22 accept",
            "tcp dport vmap { 22 : accept, 23 : drop }",
            "ct state vmap { new : accept }",
            "tcp dport 22 jump admin",
            "tcp dport != 80 accept",
            "tcp dport < 1024 accept",
            // A source restriction cannot be judged here; the new-connection probe judges it.
            "ip saddr 10.0.0.0/8 tcp dport 22 accept",
            "udp dport 53 drop\n tcp dport 22 accept",
            "tcp dport 80 drop\n meta l4proto tcp accept",
            "tcp dport 22 jump nothing\n tcp dport 22 accept",
        ] {
            assert_eq!(verdict(&input_chain("drop", rules)), Ok(()), "{rules}");
        }
        let named = "table inet f {\n set ssh { type inet_service; elements = { 22, 2222 } }\n \
                     chain input { type filter hook input priority 0; policy drop; tcp dport @ssh accept; }\n}\n";
        assert_eq!(verdict(named), Ok(()));
    }

    #[test]
    fn rules_that_never_see_a_new_ssh_connection_prove_nothing() {
        for rules in [
            "ct state established,related accept",
            "iif lo accept",
            "iifname \"lo\" accept",
            "tcp dport 80 accept",
            "meta l4proto udp accept",
            "tcp dport vmap { 80 : accept }",
            "ip saddr 10.0.0.1 accept",
            "tcp dport 22 limit rate over 1/second accept",
        ] {
            assert!(verdict(&input_chain("drop", rules)).is_err(), "{rules}");
        }
    }

    #[test]
    fn every_input_chain_must_let_it_through() {
        let text = "table ip a { chain input { type filter hook input priority 0; policy drop; tcp dport 22 accept; }; }\n\
                    table ip b { chain in2 { type filter hook input priority 10; policy drop; }; }\n";
        let err = verdict(text).unwrap_err();
        assert!(err.contains("ip b in2"), "{err}");
        // Other hooks are not our business.
        let text =
            "table inet f { chain output { type filter hook output priority 0; policy drop; }; }\n";
        assert_eq!(verdict(text), Ok(()));
    }

    #[test]
    fn declared_tables_are_found_with_their_family() {
        let text = "flush ruleset\ntable inet filter {\n}\nadd table ip6 nat\ntable raw {\n}\n# table x y\n";
        let got: Vec<String> = declared_tables(text).into_iter().collect();
        assert_eq!(got, ["inet filter", "ip raw", "ip6 nat"]);
    }

    /// A network namespace of its own for one test; this machine's ruleset is never touched.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Netns {
            let name = format!("cozy-t-{}-{tag}", std::process::id());
            let st = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("ip (iproute2) runs");
            assert!(st.success(), "ip netns add {name} failed (root needed)");
            Netns(name)
        }

        fn host(&self) -> LocalTransport {
            LocalTransport::new(&self.0).with_wrapper(vec![
                "ip".into(),
                "netns".into(),
                "exec".into(),
                self.0.clone(),
            ])
        }

        fn ruleset(&self) -> String {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &self.0, "nft", "list", "ruleset"])
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        }

        fn nft(&self, args: &[&str]) {
            let st = std::process::Command::new("ip")
                .args(["netns", "exec", &self.0, "nft"])
                .args(args)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    /// The network between us and the host, failing: every new connection is refused.
    struct CutOff(LocalTransport);

    impl Transport for CutOff {
        fn host(&self) -> &str {
            self.0.host()
        }
        fn login_user(&self) -> &str {
            self.0.login_user()
        }
        fn run<'a>(&'a self, cmd: Command) -> BoxFuture<'a, Result<Output, TransportError>> {
            self.0.run(cmd)
        }
        fn probe_new_connection<'a>(&'a self) -> BoxFuture<'a, Result<(), TransportError>> {
            Box::pin(async {
                Err(TransportError::Other {
                    host: "test".into(),
                    message: "connection timed out".into(),
                })
            })
        }
    }

    async fn apply(host: &dyn Transport, args: Value, check: bool) -> Result<Outcome, ModuleError> {
        let module = (SPEC.build)(args).map_err(ModuleError::new)?;
        let facts = Facts {
            ssh_port: Some(22),
            ..Facts::default()
        };
        let ctx = Ctx {
            host,
            check,
            diff: true,
            become_root: false,
            facts: &facts,
            templates: &NoTemplates,
        };
        module.run(&ctx).await
    }

    const GOOD: &str = "flush ruleset\ntable inet filter {\n  chain input {\n    type filter hook input priority 0; policy drop;\n    ct state established,related accept\n    iif lo accept\n    tcp dport 22 accept\n  }\n}\n";

    #[tokio::test]
    async fn a_good_ruleset_is_checked_applied_persisted_and_then_left_alone() {
        let ns = Netns::new("good");
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("nftables.conf");
        let args = serde_json::json!({"content": GOOD, "dest": dest});

        let checked = apply(&ns.host(), args.clone(), true).await.unwrap();
        assert!(checked.changed);
        assert!(checked.diff.unwrap().contains("+    tcp dport 22 accept"));
        assert!(!dest.exists());
        assert!(!ns.ruleset().contains("table"), "check mode applied");

        let first = apply(&ns.host(), args.clone(), false).await.unwrap();
        assert!(first.changed);
        assert!(first.notes.is_empty(), "{:?}", first.notes);
        assert!(ns.ruleset().contains("tcp dport 22 accept"));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), GOOD);
        let second = apply(&ns.host(), args.clone(), false).await.unwrap();
        assert!(!second.changed, "{second:?}");

        // A reboot without the nftables service: the file is right, nothing is loaded.
        ns.nft(&["flush", "ruleset"]);
        let again = apply(&ns.host(), args, false).await.unwrap();
        assert!(again.changed);
        assert!(again.diff.unwrap().contains("table inet filter not loaded"));
        assert!(ns.ruleset().contains("tcp dport 22 accept"));
    }

    #[tokio::test]
    async fn an_invalid_ruleset_shows_nfts_message_with_its_line() {
        let ns = Netns::new("bad");
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("nftables.conf");
        let bad = "table inet filter {\n  chain input {\n    tcp dport 22 acept\n  }\n}\n";
        let err = apply(
            &ns.host(),
            serde_json::json!({"content": bad, "dest": dest}),
            false,
        )
        .await
        .unwrap_err();
        let msg = err.message;
        assert!(msg.contains("invalid (nft -c)"), "{msg}");
        assert!(
            msg.contains(&format!("content for {}:3:", dest.display())),
            "{msg}"
        );
        assert!(msg.contains("Error:"), "{msg}");
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn a_ruleset_that_drops_the_ssh_port_is_refused_before_anything_changes() {
        let ns = Netns::new("lock");
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("nftables.conf");
        let lockout = GOOD.replace("tcp dport 22 accept", "tcp dport 2222 accept");
        let err = apply(
            &ns.host(),
            serde_json::json!({"content": lockout, "dest": dest}),
            false,
        )
        .await
        .unwrap_err();
        assert!(err.message.contains("port 22"), "{err}");
        assert!(
            err.message.contains("inet filter input has policy drop"),
            "{err}"
        );
        assert!(!ns.ruleset().contains("table"));
        assert!(!dest.exists());

        // --check says so too.
        let checked = apply(&ns.host(), serde_json::json!({"content": GOOD.replace("tcp dport 22 accept", "tcp dport 22 drop"), "dest": dest}), true).await;
        assert!(checked.unwrap_err().message.contains("`tcp dport 22 drop`"));
    }

    #[tokio::test]
    async fn when_no_new_connection_gets_through_the_previous_ruleset_comes_back() {
        let ns = Netns::new("rollback");
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("nftables.conf");
        apply(
            &ns.host(),
            serde_json::json!({"content": GOOD, "dest": dest}),
            false,
        )
        .await
        .unwrap();
        let before = ns.ruleset();

        // Passes the static check (the source restriction is not judged) but the network says no.
        let newer = GOOD.replace(
            "tcp dport 22 accept",
            "ip saddr 192.0.2.1 tcp dport 22 accept",
        );
        let err = apply(
            &CutOff(ns.host()),
            serde_json::json!({"content": newer, "dest": dest}),
            false,
        )
        .await
        .unwrap_err();
        assert!(err.message.contains("cut off new SSH connections"), "{err}");
        assert!(
            err.message.contains("previous ruleset was restored"),
            "{err}"
        );
        assert_eq!(ns.ruleset(), before);
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), GOOD);
        let leftovers = std::fs::read_dir("/run")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("cozy-nft."))
            .count();
        assert_eq!(leftovers, 0, "state directory or timer left behind");
    }

    #[tokio::test]
    async fn without_nft_check_mode_reports_the_change_and_a_real_run_fails() {
        // A host where nftables is not installed yet (an earlier task of the play installs it).
        let host = LocalTransport::new("no-nft")
            .with_wrapper(vec!["env".into(), "PATH=/usr/bin:/bin".into()]);
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("nftables.conf");
        let args = serde_json::json!({"content": GOOD, "dest": dest});

        let checked = apply(&host, args.clone(), true).await.unwrap();
        assert!(checked.changed);
        assert!(checked.notes[0].contains("not installed"), "{checked:?}");
        let err = apply(&host, args, false).await.unwrap_err();
        assert!(err.message.contains("apt package nftables"), "{err}");
        assert!(!dest.exists());
    }
}
