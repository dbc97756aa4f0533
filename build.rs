//! Embeds `migrations/<backend>/NNNN_name.sql` into the binary: generates a list of
//! `(version, name, include_str!(...))` per backend, so adding a file (`cozy migrate new`) is all it takes.

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
}
