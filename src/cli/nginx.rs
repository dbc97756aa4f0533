//! `cozy nginx render`: the estate's reverse proxy, rendered from the inventory and checked by nginx.
//!
//! Everything is rendered (and, with `--check`, tested by `nginx -t`) in memory and in a scratch
//! folder before anything is written, so bad input leaves `--out` untouched. Exit codes: 0 rendered
//! (and accepted); 1 bad input or nginx refused the result.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::ops::nginx::check::{self, CheckError};
use crate::ops::nginx::render::{self, Body, RenderOptions};

const EXAMPLES: &str = "\
Examples:
  cozy nginx render -i inventory.yml                     # print the files, each headed by its path
  cozy nginx render -i inventory.yml --check             # and prove them with this machine's nginx -t
  cozy nginx render -i staging.yml --env staging --out rendered/   # a tree that mirrors /etc/nginx
  diff -r /etc/nginx/cozy rendered/cozy                  # what an install would change
  cozy provision lb -i inventory.yml -p nginx            # install it on the lb hosts

The app hosts are the inventory group `app` (nginx.app_group); each is reached at its `app_listen`
variable (the app playbook's), else at its address on nginx.upstream.port (8080). The settings are the
`nginx:` block of the inventory's vars or of cozy.yaml (docs/nginx.md lists them all).";

#[derive(Debug, Subcommand)]
pub enum NginxCommand {
    /// Render the reverse proxy of the estate (upstreams, TLS, rate limits, headers) from the inventory.
    #[command(after_help = EXAMPLES)]
    Render(RenderArgs),
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The inventory (YAML): its app hosts, and the `nginx:` block of its vars.
    #[arg(short = 'i', long, value_name = "FILE")]
    pub inventory: PathBuf,
    /// The environment (`staging`, `production`…): the site is called cozy-ENV, with its own zones and logs.
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// Write the files into DIR, laid out like /etc/nginx, instead of printing them.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Run this machine's `nginx -t` on the result first (in a scratch folder); refuse it if nginx does.
    #[arg(long)]
    pub check: bool,
    /// A folder of templates that override the built-in ones by name (default: templates/nginx/ next
    /// to the inventory, when it exists).
    #[arg(long, value_name = "DIR")]
    pub templates: Option<PathBuf>,
}

pub fn run(cmd: NginxCommand, config: Option<&Path>) -> anyhow::Result<u8> {
    match cmd {
        NginxCommand::Render(args) => render_cmd(args, config),
    }
}

fn render_cmd(args: RenderArgs, config: Option<&Path>) -> anyhow::Result<u8> {
    let (inventory, settings) = crate::ops::nginx::load(&args.inventory, config)?;
    let upstreams = render::upstreams(&inventory, &settings)?;
    let template_dirs = match &args.templates {
        Some(dir) if !dir.is_dir() => anyhow::bail!("--templates {}: not a folder", dir.display()),
        Some(dir) => vec![dir.clone()],
        None => crate::ops::nginx::template_dirs_beside(&args.inventory),
    };
    let opts = RenderOptions {
        env: args.env.clone(),
        template_dirs,
        log_dir: None,
        estate: inventory.source.clone(),
    };
    let site = render::render(&settings, upstreams.clone(), &opts)?;
    let env_tag = args
        .env
        .as_deref()
        .map(|e| format!("[{e}] "))
        .unwrap_or_default();
    if args.check {
        match check::nginx_binary() {
            None => eprintln!(
                "{env_tag}warning: nginx is not installed here, so the rendered files were not checked \
                 (the nginx playbook checks them on the host)"
            ),
            Some(nginx) => match check::check(&nginx, &settings, upstreams, &opts) {
                Ok(warnings) => {
                    for w in warnings {
                        eprintln!("{env_tag}nginx -t: {w}");
                    }
                    eprintln!("{env_tag}nginx -t: the rendered configuration of {} is valid", site.name);
                }
                Err(CheckError::Refused { place, message, output }) => {
                    eprintln!("{env_tag}error: nginx -t refused {place}: {message}");
                    eprintln!("{output}");
                    return Ok(1);
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
    match &args.out {
        Some(dir) => {
            check::write_tree(dir, &site.files).with_context(|| {
                format!("cannot write the rendered tree into {}", dir.display())
            })?;
            // write_tree's scratch `tmp/` is for nginx -t only.
            let _ = std::fs::remove_dir(dir.join("tmp"));
            eprintln!(
                "{env_tag}wrote {} files of site {} into {} ({} upstream servers)",
                site.files.len(),
                site.name,
                dir.display(),
                site.upstreams.len()
            );
        }
        None => {
            let mut out = std::io::stdout().lock();
            for f in &site.files {
                match &f.body {
                    Body::Text(t) => write!(out, "# ==> {} <==\n{t}\n", f.path)?,
                    Body::Link(target) => writeln!(out, "# ==> {} -> {target} <==\n", f.path)?,
                    Body::Secret(b) => writeln!(
                        out,
                        "# ==> {} <== private key from {} ({} bytes, mode 0600): written with --out only\n",
                        f.path,
                        f.origin,
                        b.len()
                    )?,
                }
            }
        }
    }
    Ok(0)
}
