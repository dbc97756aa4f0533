//! The `nginx_site` module: the site `cozy nginx render` made is installed under the nginx folder, and
//! nginx accepts it, or nothing changes.
//!
//! A site is a tree (the site file, its `sites-enabled` link, includes, maybe certificate files), and a
//! single file of it cannot be tested alone, so `copy`'s `validate: nginx -t -c %s` does not fit. This
//! module reads the state of every file of the tree in one round trip, and when something differs it
//! writes the whole change in one script that backs up what it replaces, runs the host's `nginx -t`
//! on the real configuration, and puts the old files back if nginx refuses: a configuration nginx
//! refuses is never left enabled, and nginx keeps serving the old one (it is only reloaded, by a
//! handler, after a change that passed). Files an earlier install wrote that the new tree no longer has
//! are removed (a manifest in `cozy/<site>/.cozy-manifest` remembers them); nothing else in the nginx
//! folder is touched, including `cozy/<site>/locations.d/*.conf` and a certificate made on the host.
//!
//! Arguments: `site` (the name), `files` (a list of `{path, content_base64, mode}` or `{path, link}`,
//! paths relative to `root`: what `cozy provision` puts in the `nginx_site` variable), `root` (default
//! `/etc/nginx`) and `test` (default `nginx -t`).

use std::fmt::Write as _;

use base64::Engine as _;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::{parse_args, sha256_hex, unified_diff, Ctx, Module, ModuleError, ModuleSpec, Outcome};
use crate::ops::transport::quote;

pub static SPEC: ModuleSpec = ModuleSpec {
    name: "nginx_site",
    args: &["site", "files", "root", "test"],
    free_form: None,
    build,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    site: String,
    files: Vec<FileArg>,
    #[serde(default = "default_root")]
    root: String,
    #[serde(default = "default_test")]
    test: String,
}

fn default_root() -> String {
    "/etc/nginx".into()
}

fn default_test() -> String {
    "nginx -t".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileArg {
    path: String,
    content_base64: Option<String>,
    #[serde(default = "default_mode")]
    mode: u32,
    link: Option<String>,
}

fn default_mode() -> u32 {
    0o644
}

/// A file of the tree, decoded.
#[derive(Debug, Clone)]
struct Wanted {
    path: String,
    what: Want,
    mode: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum Want {
    Content(Vec<u8>),
    Link(String),
}

fn build(args: serde_json::Value) -> Result<Box<dyn Module>, String> {
    let args: Args = parse_args(args)?;
    let ok_name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !ok_name(&args.site) {
        return Err(format!(
            "argument `site`: `{}` is not a site name",
            args.site
        ));
    }
    if !args.root.starts_with('/') {
        return Err(format!(
            "argument `root`: `{}` must be an absolute path",
            args.root
        ));
    }
    if args.files.is_empty() {
        return Err("argument `files`: the site has no files".into());
    }
    let mut files = Vec::new();
    for (i, f) in args.files.iter().enumerate() {
        let bad = |why: &str| format!("argument `files[{i}]` ({}): {why}", f.path);
        let safe = !f.path.is_empty()
            && !f.path.starts_with('/')
            && f.path
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && !f.path.contains(['\n', '\'']);
        if !safe {
            return Err(bad("a path relative to `root`, without `..`"));
        }
        let what = match (&f.content_base64, &f.link) {
            (Some(b64), None) => Want::Content(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| bad(&format!("`content_base64`: {e}")))?,
            ),
            (None, Some(target)) if !target.is_empty() && !target.contains(['\n', '\'']) => {
                Want::Link(target.clone())
            }
            _ => return Err(bad("give `content_base64` or `link`")),
        };
        files.push(Wanted {
            path: f.path.clone(),
            what,
            mode: f.mode,
        });
    }
    Ok(Box::new(NginxSite {
        site: args.site,
        root: args.root.trim_end_matches('/').to_string(),
        test: args.test,
        files,
    }))
}

struct NginxSite {
    site: String,
    root: String,
    test: String,
    files: Vec<Wanted>,
}

/// What a path is now.
#[derive(Debug, Clone, PartialEq)]
enum Have {
    Absent,
    File { mode: u32, sha256: String },
    Link(String),
    Other,
}

impl NginxSite {
    fn manifest(&self) -> String {
        format!("cozy/{}/.cozy-manifest", self.site)
    }

    /// One round trip: the state of every file, then the old manifest after a `--` line.
    fn read_script(&self) -> String {
        let mut s = format!(
            "cd {} 2>/dev/null || {{ echo NOROOT; exit 0; }}\n",
            quote(&self.root)
        );
        s.push_str("for p in");
        for f in &self.files {
            let _ = write!(s, " {}", quote(&f.path));
        }
        s.push_str(
            "; do if [ -L \"$p\" ]; then echo \"L $(readlink -- \"$p\")\"; \
             elif [ -f \"$p\" ]; then echo \"F $(stat -c %a -- \"$p\") $(sha256sum < \"$p\" | cut -d' ' -f1)\"; \
             elif [ -e \"$p\" ]; then echo O; else echo A; fi; done\necho --\n",
        );
        let _ = writeln!(s, "cat {} 2>/dev/null || true", quote(&self.manifest()));
        s
    }

    fn parse_state(&self, out: &str) -> Result<(Vec<Have>, Vec<String>), ModuleError> {
        if out.starts_with("NOROOT") {
            return Err(ModuleError::new(format!(
                "{} does not exist: is nginx installed on this host?",
                self.root
            )));
        }
        let (states, manifest) = out.split_once("--\n").unwrap_or((out, ""));
        let have: Vec<Have> = states
            .lines()
            .map(|l| match l.split_once(' ') {
                Some(("L", target)) => Have::Link(target.to_string()),
                Some(("F", rest)) => {
                    let (mode, sha) = rest.split_once(' ').unwrap_or((rest, ""));
                    Have::File {
                        mode: u32::from_str_radix(mode, 8).unwrap_or(0),
                        sha256: sha.to_string(),
                    }
                }
                _ if l == "A" => Have::Absent,
                _ => Have::Other,
            })
            .collect();
        if have.len() != self.files.len() {
            return Err(ModuleError::new(format!(
                "cannot read the state of the site's files under {}: {out}",
                self.root
            )));
        }
        let old = manifest
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        Ok((have, old))
    }

    fn apply_script(&self, changed: &[&Wanted], stale: &[String]) -> String {
        let mut touched: Vec<&str> = changed.iter().map(|f| f.path.as_str()).collect();
        touched.extend(stale.iter().map(String::as_str));
        let manifest = self.manifest();
        touched.push(&manifest);
        let mut s = String::from("set -eu\numask 022\n");
        let _ = writeln!(s, "cd {}", quote(&self.root));
        s.push_str("bk=$(mktemp -d /tmp/cozy-nginx-site.XXXXXX)\n");
        // Back up what will change; remember what did not exist.
        s.push_str(": > \"$bk.absent\"\nfor p in");
        for p in &touched {
            let _ = write!(s, " {}", quote(p));
        }
        s.push_str(
            "; do if [ -e \"$p\" ] || [ -L \"$p\" ]; then cp -a --parents -- \"$p\" \"$bk/\"; \
             else echo \"$p\" >> \"$bk.absent\"; fi; done\n",
        );
        for f in changed {
            let p = quote(&f.path);
            let tmp = quote(&format!("{}.cozy-tmp", f.path));
            if let Some(dir) = std::path::Path::new(&f.path).parent() {
                if !dir.as_os_str().is_empty() {
                    let _ = writeln!(s, "mkdir -p {}", quote(&dir.display().to_string()));
                }
            }
            match &f.what {
                Want::Content(bytes) => {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                    let _ = writeln!(
                        s,
                        "rm -f {tmp}; (umask 077; printf %s '{b64}' | base64 -d > {tmp}); chmod {:o} {tmp}; mv -f {tmp} {p}",
                        f.mode
                    );
                }
                Want::Link(target) => {
                    let _ = writeln!(
                        s,
                        "rm -f {tmp}; ln -s {} {tmp}; mv -Tf {tmp} {p}",
                        quote(target)
                    );
                }
            }
        }
        for p in stale {
            let _ = writeln!(s, "rm -f {}", quote(p));
        }
        let list: String = self.files.iter().map(|f| format!("{}\n", f.path)).collect();
        let _ = writeln!(
            s,
            "mkdir -p {dir}; printf %s {list} > {m}.cozy-tmp; mv -f {m}.cozy-tmp {m}",
            dir = quote(&format!("cozy/{}", self.site)),
            list = quote(&list),
            m = quote(&manifest),
        );
        // The proof: the host's nginx on its real configuration. Refused: everything back as it was.
        let _ = writeln!(
            s,
            "if ! out=$({} 2>&1); then\n  \
               while IFS= read -r p; do rm -f -- \"$p\"; done < \"$bk.absent\"\n  \
               cp -a \"$bk/.\" ./\n  \
               rm -rf \"$bk\" \"$bk.absent\"\n  \
               printf '%s\\n' \"$out\" >&2\n  \
               exit 65\n\
             fi\n\
             rm -rf \"$bk\" \"$bk.absent\"",
            self.test
        );
        s
    }
}

impl Module for NginxSite {
    fn run<'a>(&'a self, ctx: &'a Ctx<'a>) -> BoxFuture<'a, Result<Outcome, ModuleError>> {
        Box::pin(async move {
            let out = ctx
                .run_ok("reading the site's files", self.read_script())
                .await?;
            let (have, old_manifest) = self.parse_state(&out.stdout_str())?;
            let mut changed = Vec::new();
            let mut summary = String::new();
            for (f, h) in self.files.iter().zip(&have) {
                let same = match (&f.what, h) {
                    (Want::Content(bytes), Have::File { mode, sha256 }) => {
                        *sha256 == sha256_hex(bytes) && *mode == f.mode
                    }
                    (Want::Link(target), Have::Link(now)) => target == now,
                    _ => false,
                };
                if !same {
                    if *h == Have::Other {
                        return Err(ModuleError::new(format!(
                            "{}/{} is neither a file nor a link: move it away first",
                            self.root, f.path
                        )));
                    }
                    let verb = if *h == Have::Absent {
                        "create"
                    } else {
                        "update"
                    };
                    let _ = writeln!(summary, "{verb} {}/{}", self.root, f.path);
                    changed.push(f);
                }
            }
            let stale: Vec<String> = old_manifest
                .into_iter()
                .filter(|p| !self.files.iter().any(|f| f.path == *p))
                .filter(|p| !p.contains("..") && !p.starts_with('/'))
                .collect();
            for p in &stale {
                let _ = writeln!(summary, "remove {}/{p}", self.root);
            }
            if changed.is_empty() && stale.is_empty() {
                return Ok(Outcome::unchanged());
            }
            let mut diff = None;
            if ctx.diff || ctx.check {
                let mut text = summary.clone();
                for f in &changed {
                    let Want::Content(bytes) = &f.what else {
                        continue;
                    };
                    // Keys are never shown; other files are small text.
                    if f.mode & 0o077 == 0 {
                        continue;
                    }
                    let path = format!("{}/{}", self.root, f.path);
                    let before = super::stat(ctx, &path, true)
                        .await?
                        .content
                        .map(|c| String::from_utf8_lossy(&c).into_owned())
                        .unwrap_or_default();
                    if let Some(d) = unified_diff(&path, &before, &String::from_utf8_lossy(bytes)) {
                        text.push_str(&d);
                    }
                }
                diff = Some(text);
            }
            if ctx.check {
                return Ok(Outcome::changed(diff));
            }
            let out = ctx.run(self.apply_script(&changed, &stale)).await?;
            if !out.success() {
                let why = out.error_text();
                return Err(ModuleError::new(if out.status == 65 {
                    format!(
                        "nginx refused the new site {}; the previous files are back in place and nginx \
                         still runs the old configuration: {why}",
                        self.site
                    )
                } else {
                    format!(
                        "installing the site {} failed (exit {}): {why}",
                        self.site, out.status
                    )
                }));
            }
            Ok(Outcome::changed(diff))
        })
    }
}

/// The `nginx_site` variable's `files`, from a rendered site.
pub fn files_var(site: &crate::ops::nginx::render::Site) -> serde_json::Value {
    use crate::ops::nginx::render::Body;
    serde_json::Value::Array(
        site.files
            .iter()
            .map(|f| match &f.body {
                Body::Link(target) => serde_json::json!({"path": f.path, "link": target}),
                _ => serde_json::json!({
                    "path": f.path,
                    "content_base64": base64::engine::general_purpose::STANDARD.encode(f.bytes()),
                    "mode": f.mode,
                }),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::modules::file::tests::{run_local, NoTemplates};
    use crate::ops::nginx::{check, render, settings::NginxSettings};
    use serde_json::json;

    /// A real nginx folder (Debian-shaped main config) in `root`, with nothing of cozy's in it yet.
    fn nginx_root() -> Option<(tempfile::TempDir, String)> {
        let nginx = check::nginx_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("log")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::create_dir_all(root.join("conf.d")).unwrap();
        std::fs::create_dir_all(root.join("sites-enabled")).unwrap();
        std::fs::write(root.join("nginx.conf"), check::main_conf(root)).unwrap();
        std::fs::write(
            root.join("mime.types"),
            "types {\n    application/json json;\n}\n",
        )
        .unwrap();
        let test = format!(
            "{} -t -q -p {}/ -e stderr -c {}/nginx.conf",
            nginx.display(),
            root.display(),
            root.display()
        );
        Some((dir, test))
    }

    fn site_files(settings: &NginxSettings, log_dir: &std::path::Path) -> serde_json::Value {
        let ups = vec![render::UpstreamServer {
            host: "app1".into(),
            address: "127.0.0.1:18080".into(),
        }];
        let opts = render::RenderOptions {
            log_dir: Some(log_dir.display().to_string()),
            ..render::RenderOptions::default()
        };
        files_var(&render::render(settings, ups, &opts).unwrap())
    }

    #[tokio::test]
    async fn a_site_is_installed_once_checked_by_nginx_and_then_unchanged() {
        let Some((dir, test)) = nginx_root() else {
            panic!("nginx is not installed: run scripts/test, which installs it");
        };
        let root = dir.path();
        let mut settings = NginxSettings::defaults("t");
        settings.ipv6 = false;
        settings.listen_addresses = vec!["127.0.0.1".parse().unwrap()];
        settings.http_port = 18999;
        let args = json!({"site": "cozy", "root": root, "test": test,
                          "files": site_files(&settings, &root.join("log"))});
        let checked = run_local(&SPEC, args.clone(), true, &NoTemplates)
            .await
            .unwrap();
        assert!(checked.changed);
        assert!(checked.diff.unwrap().contains("create"));
        assert!(
            !root.join("sites-available/cozy.conf").exists(),
            "check mode wrote"
        );

        let done = run_local(&SPEC, args.clone(), false, &NoTemplates)
            .await
            .unwrap();
        assert!(done.changed);
        assert_eq!(
            std::fs::read_link(root.join("sites-enabled/cozy.conf")).unwrap(),
            std::path::Path::new("../sites-available/cozy.conf")
        );
        assert!(
            std::fs::read_to_string(root.join("cozy/cozy/.cozy-manifest"))
                .unwrap()
                .contains("cozy/cozy/proxy.conf\n")
        );
        let again = run_local(&SPEC, args, false, &NoTemplates).await.unwrap();
        assert!(!again.changed, "{again:?}");

        // A file of one's own in locations.d survives a re-install with other settings.
        std::fs::write(
            root.join("cozy/cozy/locations.d/mine.conf"),
            "location = /mine { return 204; }\n",
        )
        .unwrap();
        settings.gzip = false;
        let args = json!({"site": "cozy", "root": root, "test": test,
                          "files": site_files(&settings, &root.join("log"))});
        assert!(
            run_local(&SPEC, args, false, &NoTemplates)
                .await
                .unwrap()
                .changed
        );
        assert!(root.join("cozy/cozy/locations.d/mine.conf").exists());
        assert!(
            !std::fs::read_to_string(root.join("sites-available/cozy.conf"))
                .unwrap()
                .contains("gzip on;")
        );
    }

    #[tokio::test]
    async fn a_site_nginx_refuses_is_rolled_back_and_stale_files_are_removed() {
        let Some((dir, test)) = nginx_root() else {
            panic!("nginx is not installed: run scripts/test, which installs it");
        };
        let root = dir.path();
        let mut settings = NginxSettings::defaults("t");
        settings.ipv6 = false;
        settings.http_port = 18998;
        let good = site_files(&settings, &root.join("log"));
        let args = json!({"site": "cozy", "root": root, "test": test, "files": good});
        run_local(&SPEC, args, false, &NoTemplates).await.unwrap();
        let before = std::fs::read_to_string(root.join("sites-available/cozy.conf")).unwrap();

        // The same tree with a directive nginx does not know, and a new file.
        let mut bad = good.clone();
        let files = bad.as_array_mut().unwrap();
        let site = files
            .iter_mut()
            .find(|f| f["path"] == "sites-available/cozy.conf")
            .unwrap();
        let text = format!("{before}\nnot_a_directive on;\n");
        site["content_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(text));
        files.push(
            json!({"path": "cozy/cozy/extra.conf", "content_base64": "IyBleHRyYQo=", "mode": 420}),
        );
        let args = json!({"site": "cozy", "root": root, "test": test, "files": bad});
        let e = run_local(&SPEC, args, false, &NoTemplates)
            .await
            .unwrap_err();
        assert!(
            e.message.contains("nginx refused the new site cozy"),
            "{}",
            e.message
        );
        assert!(e.message.contains("not_a_directive"), "{}", e.message);
        assert_eq!(
            std::fs::read_to_string(root.join("sites-available/cozy.conf")).unwrap(),
            before
        );
        assert!(
            !root.join("cozy/cozy/extra.conf").exists(),
            "a new file of the refused tree stayed"
        );
        assert!(
            !std::fs::read_to_string(root.join("cozy/cozy/.cozy-manifest"))
                .unwrap()
                .contains("extra.conf")
        );

        // A file an earlier install wrote that the new tree no longer has is removed.
        let mut plus = good.clone();
        plus.as_array_mut().unwrap().push(
            json!({"path": "cozy/cozy/extra.conf", "content_base64": "IyBleHRyYQo=", "mode": 420}),
        );
        let args = json!({"site": "cozy", "root": root, "test": test, "files": plus});
        run_local(&SPEC, args, false, &NoTemplates).await.unwrap();
        assert!(root.join("cozy/cozy/extra.conf").exists());
        let args = json!({"site": "cozy", "root": root, "test": test, "files": good});
        let out = run_local(&SPEC, args, false, &NoTemplates).await.unwrap();
        assert!(out.changed);
        assert!(!root.join("cozy/cozy/extra.conf").exists());
    }

    #[test]
    fn arguments_are_checked() {
        let ok = json!({"site": "cozy", "files": [{"path": "a.conf", "content_base64": "eA=="}]});
        assert!(build(ok).is_ok());
        let e = build(json!({"site": "cozy", "files": [{"path": "../x", "content_base64": ""}]}))
            .err()
            .unwrap();
        assert!(e.contains("without `..`"), "{e}");
        let e = build(json!({"site": "co zy", "files": [{"path": "a", "link": "b"}]}))
            .err()
            .unwrap();
        assert!(e.contains("not a site name"), "{e}");
        let e = build(json!({"site": "cozy", "files": [{"path": "a"}]}))
            .err()
            .unwrap();
        assert!(e.contains("give `content_base64` or `link`"), "{e}");
        let e = build(json!({"site": "cozy", "files": []})).err().unwrap();
        assert!(e.contains("no files"), "{e}");
    }
}
