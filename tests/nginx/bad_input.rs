//! Bad input is refused before anything is written: an error at the exact `file:line:col` of the
//! inventory, in words an operator can act on, exit code 1, and `--out` not created (or left empty when
//! it existed).

use crate::estate::{cozy_in, text};

/// The inventory's first seven lines; the `nginx:` block's keys follow at line 8, column 5.
const HEAD: &str = "\
hosts:
  app1: {address: 127.0.0.1, vars: {app_listen: \"127.0.0.1:8081\"}}
  app2: {address: 127.0.0.2, vars: {app_listen: \"127.0.0.2:8082\"}}
groups:
  app: [app1, app2]
vars:
  nginx:
";

/// Renders `nginx_block` (appended to [`HEAD`]) with `--out`, once into a folder that does not exist
/// and once into an empty one; both must fail the same way, writing nothing. cozy's stderr.
fn refused(nginx_block: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("inv.yml"), format!("{HEAD}{nginx_block}")).unwrap();
    let out = cozy_in(
        dir.path(),
        &["nginx", "render", "-i", "inv.yml", "--out", "out"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code 1: {stderr}");
    assert!(
        !dir.path().join("out").exists(),
        "--out was created for a refused inventory"
    );
    assert!(text(&out.stdout).is_empty(), "nothing printed on stdout");

    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let again = cozy_in(
        dir.path(),
        &[
            "nginx", "render", "-i", "inv.yml", "--out", "empty", "--check",
        ],
    );
    assert_eq!(again.status.code(), Some(1), "{}", text(&again.stderr));
    assert_eq!(
        text(&again.stderr),
        stderr,
        "--check changes nothing to the error"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("empty")).unwrap().count(),
        0,
        "an existing --out folder stays empty"
    );
    stderr
}

#[test]
fn an_unknown_nginx_key_is_refused_at_its_place_with_a_did_you_mean() {
    let stderr = refused("    server_name: [cozy.test]\n");
    assert!(
        stderr.starts_with(
            "error: inv.yml:8:5: unknown `nginx` key `server_name` (did you mean `server_names`?)"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("valid: `app_group`, `server_names`"),
        "{stderr}"
    );
}

#[test]
fn a_server_name_that_is_not_a_host_name_is_refused_at_its_place() {
    let stderr = refused("    server_names:\n      - cozy.test\n      - bad_name.test\n");
    assert!(
        stderr.starts_with(
            "error: inv.yml:10:9: server name `bad_name.test` is not a host name: \
             only letters, digits, `-` and dots are allowed"
        ),
        "{stderr}"
    );
}

#[test]
fn a_certificate_path_that_does_not_exist_is_refused_at_its_place() {
    let stderr = refused(
        "    server_names: [cozy.test]\n    tls:\n      certificate: certs/missing.pem\n      key: certs/missing.key\n",
    );
    assert!(
        stderr.starts_with("error: inv.yml:10:20: `certificate`: cannot read "),
        "{stderr}"
    );
    assert!(
        stderr.contains("certs/missing.pem: No such file or directory"),
        "{stderr}"
    );
}
