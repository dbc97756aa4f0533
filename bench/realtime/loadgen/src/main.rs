//! Load generator for `bench/realtime`: the same client for cozy and for Socket.IO 4.
//!
//!   loadgen users   --server ADDR --count K [--prefix P]            cozy users + tokens, one per line
//!   loadgen fanout  --system cozy|sio --server ADDR --server-pid PID --subs N --pubs P
//!                   (--rate R | --window W) [--warmup 2] [--secs 15] [--tokens FILE] [--room chat:bench] [--round 1]
//!   loadgen idle    --system cozy|sio --server ADDR --server-pid PID --conns N [--room-size 100]
//!                   [--settle 3] [--tokens FILE] [--round 1] [--then SHELL-COMMAND]
//!   loadgen summary FILE…                                           tables from the JSON lines of runs
//!
//! `fanout` and `idle` print one JSON line (the run's figures) on stdout; progress goes to stderr.
//! `bench/realtime/run` drives all of it.

#![recursion_limit = "256"]

mod fanout;
mod hist;
mod idle;
mod procstat;
mod setup;
mod summary;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::{bail, Context};

struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Flags> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(key) = a.strip_prefix("--") else {
                bail!("unexpected argument {a:?}");
            };
            let value = it.next().with_context(|| format!("--{key} needs a value"))?;
            map.insert(key.to_string(), value.clone());
        }
        Ok(Flags(map))
    }

    fn get<T: std::str::FromStr>(&self, key: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.0
            .get(key)
            .map(|v| v.parse::<T>().map_err(|e| anyhow::anyhow!("--{key} {v:?}: {e}")))
            .transpose()
    }

    fn req<T: std::str::FromStr>(&self, key: &str) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)?.with_context(|| format!("--{key} is required"))
    }

    fn tokens(&self) -> anyhow::Result<Vec<String>> {
        match self.0.get("tokens") {
            Some(path) => Ok(std::fs::read_to_string(path)
                .with_context(|| format!("reading {path}"))?
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()),
            None => Ok(Vec::new()),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first().cloned() else {
        bail!("usage: loadgen users|fanout|idle|summary … (see src/main.rs)");
    };
    if cmd == "summary" {
        let mut runs = Vec::new();
        for (file, path) in args[1..].iter().enumerate() {
            for line in std::fs::read_to_string(path)?.lines().filter(|l| l.starts_with('{')) {
                let mut run: serde_json::Value =
                    serde_json::from_str(line).with_context(|| format!("{path}: {line}"))?;
                // Rounds are paired within one invocation of `run` only.
                run["file"] = file.into();
                runs.push(run);
            }
        }
        summary::print(&runs);
        return Ok(());
    }
    let flags = Flags::parse(&args[1..])?;
    // Two worker threads: the machine has two cores, shared with the server under test.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let server: SocketAddr = flags.req("server")?;
        let out = match cmd.as_str() {
            "users" => {
                let count: usize = flags.req("count")?;
                let prefix: String = flags.get("prefix")?.unwrap_or_else(|| format!("u{}", std::process::id()));
                for token in setup::users(server, count, &prefix).await? {
                    println!("{token}");
                }
                return Ok(());
            }
            "fanout" => {
                let pace = match (flags.get::<f64>("rate")?, flags.get::<usize>("window")?) {
                    (Some(r), None) => fanout::Pace::Rate(r),
                    (None, Some(w)) => fanout::Pace::Window(w),
                    _ => bail!("give either --rate or --window"),
                };
                fanout::run(fanout::Args {
                    system: wire::System::parse(&flags.req::<String>("system")?)?,
                    server,
                    server_pid: flags.req("server-pid")?,
                    subs: flags.req("subs")?,
                    pubs: flags.get("pubs")?.unwrap_or(4),
                    pace,
                    warmup: flags.get("warmup")?.unwrap_or(2.0),
                    secs: flags.get("secs")?.unwrap_or(15.0),
                    tokens: flags.tokens()?,
                    room: flags.get("room")?.unwrap_or_else(|| "chat:bench".to_string()),
                    round: flags.get("round")?.unwrap_or(1),
                })
                .await?
            }
            "idle" => {
                idle::run(idle::Args {
                    system: wire::System::parse(&flags.req::<String>("system")?)?,
                    server,
                    server_pid: flags.req("server-pid")?,
                    conns: flags.req("conns")?,
                    room_size: flags.get("room-size")?.unwrap_or(100),
                    settle: flags.get("settle")?.unwrap_or(3.0),
                    tokens: flags.tokens()?,
                    round: flags.get("round")?.unwrap_or(1),
                    then: flags.get("then")?,
                })
                .await?
            }
            _ => bail!("unknown command {cmd:?}"),
        };
        println!("{out}");
        anyhow::Ok(())
    })?;
    // Thousands of connection tasks are still alive: leave without waiting for them.
    std::process::exit(0);
}
