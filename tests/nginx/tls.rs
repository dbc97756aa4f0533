//! TLS of the rendered site (self-signed variant), seen with `openssl s_client` and `curl`: Mozilla
//! *intermediate* (TLS 1.2 and 1.3 only, its TLS 1.2 ciphers only), no certificate for a name we do not
//! serve, plain HTTP redirected, and the security headers (HSTS included) on every HTTPS answer: the
//! app's, nginx's own errors and its 429.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use crate::estate::{assert_security_headers, text, Estate, Headers, Proxy, HOST};

/// Mozilla's intermediate TLS 1.2 suites (guidelines 5.7, OpenSSL names).
const INTERMEDIATE_TLS12: &[&str] = &[
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

/// One handshake with `openssl s_client` against 127.0.0.1:`port`; the negotiated cipher when it worked.
fn handshake(port: u16, server_name: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", server_name])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl (scripts/ensure-nginx-tools installs it)");
    let stdout = text(&out.stdout);
    let cipher = stdout
        .lines()
        .find_map(|l| {
            l.split_once(", Cipher is ")
                .map(|(_, c)| c.trim().to_string())
        })
        .filter(|c| c != "(NONE)");
    match (out.status.success(), cipher) {
        (true, Some(c)) => Ok(c),
        _ => Err(format!("{stdout}{}", text(&out.stderr))),
    }
}

fn self_signed() -> Proxy {
    Proxy::start(&["tls: {self_signed: true}"])
}

#[test]
fn tls_1_0_and_1_1_are_refused_and_1_2_and_1_3_accepted() {
    let proxy = self_signed();
    let port = proxy.nginx.https;
    for old in ["-tls1", "-tls1_1"] {
        // SECLEVEL=0: OpenSSL 3 would not even offer them otherwise; the server must say no.
        let r = handshake(port, HOST, &[old, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(r.is_err(), "{old} was accepted: {r:?}");
    }
    for new in ["-tls1_2", "-tls1_3"] {
        handshake(port, HOST, &[new]).unwrap_or_else(|e| panic!("{new} was refused: {e}"));
    }
}

#[test]
fn a_tls_client_naming_another_host_gets_no_certificate() {
    let proxy = self_signed();
    let r = handshake(proxy.nginx.https, "other.test", &["-tls1_3"]);
    assert!(r.is_err(), "a handshake for other.test: {r:?}");
    handshake(proxy.nginx.https, HOST, &["-tls1_3"]).unwrap();
}

#[test]
fn only_mozilla_intermediate_ciphers_are_accepted_over_tls_1_2() {
    let proxy = self_signed();
    let port = proxy.nginx.https;
    // Every suite this OpenSSL knows below TLS 1.3, weak ones included.
    let list = Command::new("openssl")
        .args(["ciphers", "-v", "ALL:COMPLEMENTOFALL:@SECLEVEL=0"])
        .output()
        .expect("openssl ciphers");
    let suites: BTreeSet<String> = text(&list.stdout)
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            let (name, proto) = (cols.next()?, cols.next()?);
            (proto != "TLSv1.3").then(|| name.to_string())
        })
        .collect();
    assert!(suites.len() > 50, "openssl knows only {suites:?}");
    let suites: Vec<String> = suites.into_iter().collect();
    // One s_client per suite, eight at a time.
    let accepted: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = suites
            .chunks(suites.len().div_ceil(8))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter(|suite| {
                            let cipher = format!("{suite}:@SECLEVEL=0");
                            match handshake(port, HOST, &["-tls1_2", "-cipher", &cipher]) {
                                Ok(got) => {
                                    assert_eq!(&got, *suite, "asked for {suite}");
                                    true
                                }
                                Err(_) => false,
                            }
                        })
                        .cloned()
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        !accepted.is_empty(),
        "no TLS 1.2 suite accepted at all (of {})",
        suites.len()
    );
    for suite in &accepted {
        assert!(
            INTERMEDIATE_TLS12.contains(&suite.as_str()),
            "{suite} is accepted but is not in Mozilla's intermediate list (accepted: {accepted:?})"
        );
    }
    eprintln!(
        "TLS 1.2 suites accepted ({} tried): {accepted:?}",
        suites.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_redirects_permanently_to_https_with_the_same_path_and_query() {
    let proxy = self_signed();
    let client = crate::estate::client_to(proxy.nginx.http, None);
    for path in ["/", "/v1/resources/7?fields=name&x=%20y", "/v1/realtime"] {
        let r = client
            .get(format!("http://{HOST}:{}{path}", proxy.nginx.http))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 301, "{path}");
        assert_eq!(
            r.headers().get("location").and_then(|v| v.to_str().ok()),
            Some(format!("https://{HOST}:{}{path}", proxy.nginx.https).as_str()),
            "{path}"
        );
    }
}

/// One HTTPS request with curl (HTTP/2 when nginx offers it): status, headers, body.
fn curl(port: u16, args: &[&str], path: &str) -> (u16, Headers, String) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "-i", "--max-time", "20"])
        .args(["--resolve", &format!("{HOST}:{port}:127.0.0.1")])
        .args(args)
        .arg(format!("https://{HOST}:{port}{path}"))
        .output()
        .expect("curl (Debian's package; scripts/test's machines have it)");
    assert!(out.status.success(), "curl {path}: {}", text(&out.stderr));
    let all = text(&out.stdout);
    let (head, body) = all
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("curl {path}: {all}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("curl {path}: {head}"));
    let headers = Headers(
        lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect(),
    );
    (status, headers, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_https_answer_carries_hsts_and_the_security_headers_errors_and_429_included() {
    let est = Estate::builder()
        .nginx("tls: {self_signed: true}")
        .nginx("rate_limits: {login: 1r/m, login_burst: 1}")
        .start()
        .await;
    let port = est.nginx.https;
    let login = [
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        r#"{"email":"nobody@example.com","password":"wrong password"}"#,
    ];
    let answers = [
        ("the app's 200", curl(port, &[], "/healthz"), 200),
        ("the app's 401", curl(port, &[], "/v1/reservations"), 401),
        ("nginx's 404 for a dotfile", curl(port, &[], "/.env"), 404),
        (
            "the app's answer to a login",
            curl(port, &login, "/v1/sessions"),
            401,
        ),
        (
            "the app's answer to a login (the burst)",
            curl(port, &login, "/v1/sessions"),
            401,
        ),
        ("nginx's 429", curl(port, &login, "/v1/sessions"), 429),
    ];
    for (what, (status, headers, body), expected) in &answers {
        assert_eq!(status, expected, "{what}: {headers:?}\n{body}");
        assert_security_headers(headers, true, what);
        assert!(headers.get("x-request-id").is_some(), "{what}: {headers:?}");
    }
    let (_, h429, body) = &answers[5].1;
    assert_eq!(h429.get("content-type"), Some("application/problem+json"));
    assert!(body.contains(r#""code":"rate_limited""#), "{body}");
    let (_, h404, body) = &answers[2].1;
    assert_eq!(h404.get("content-type"), Some("application/problem+json"));
    assert!(body.contains(r#""code":"not_found""#), "{body}");
    // Requests went over TLS 1.2+ (nginx logs the protocol of each).
    let log = est.nginx.access_log();
    assert!(
        log.iter()
            .all(|l| ["TLSv1.2", "TLSv1.3"].contains(&l["tls"].as_str().unwrap_or(""))),
        "{log:#?}"
    );
}
