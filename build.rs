//! Embeds files into the binary, so that adding one is all it takes:
//! - `migrations/<backend>/NNNN_name.sql`: a list of `(name, include_str!(...))` per backend;
//! - `playbooks/*.yml` and `templates/provision/**`: the built-in playbooks and their templates
//!   (`ops::playbook::builtin`), as `(relative path, include_str!(...))`;
//! - `templates/nginx/**`: the templates of `cozy nginx render` (`ops::nginx::render`).

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    // Read when the script runs (not baked in when it was compiled): a build script binary compiled for
    // another checkout sharing this target dir must not read that checkout's migrations.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = Path::new(&manifest_dir).join("migrations");
    let mut out = String::new();
    for backend in ["mysql", "sqlite"] {
        let dir = root.join(backend);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read the migrations folder {}: {e}", dir.display()))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "sql"));
        files.sort();
        writeln!(
            out,
            "pub static {}: &[(&str, &str)] = &[",
            backend.to_uppercase()
        )
        .unwrap();
        for f in files {
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            writeln!(
                out,
                "    ({name:?}, include_str!({:?})),",
                f.display().to_string()
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(dest, out).unwrap();

    let mut out = String::new();
    for (name, dir) in [
        ("PLAYBOOKS", "playbooks"),
        ("TEMPLATES", "templates/provision"),
        ("NGINX_TEMPLATES", "templates/nginx"),
    ] {
        let dir = Path::new(&manifest_dir).join(dir);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files = Vec::new();
        collect_files(&dir, &mut files);
        files.sort();
        writeln!(out, "pub static {name}: &[(&str, &str)] = &[").unwrap();
        for f in files {
            let rel = f.strip_prefix(&dir).unwrap().to_string_lossy().to_string();
            writeln!(
                out,
                "    ({rel:?}, include_str!({:?})),",
                f.display().to_string()
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("builtin_files.rs");
    std::fs::write(dest, out).unwrap();
}

/// Every file under `dir`, recursively (a missing folder is empty); directories are watched too.
fn collect_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect_files(&path, files);
        } else if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            files.push(path);
        }
    }
}
