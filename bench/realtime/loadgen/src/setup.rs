//! cozy users and session tokens for the benchmark, through the HTTP API (`POST /v1/users`,
//! `POST /v1/sessions`), written one token per line. Run the server with cheap argon2
//! (`COZY_ARGON2_MEMORY_KIB=256 COZY_ARGON2_ITERATIONS=1`): logins are setup, not what is measured.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// One HTTP/1.1 POST on a fresh connection; returns (status, body).
async fn post(server: SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(server).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    s.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

pub async fn users(server: SocketAddr, count: usize, prefix: &str) -> anyhow::Result<Vec<String>> {
    let gate = Arc::new(Semaphore::new(8));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = gate.clone().acquire_owned().await?;
        let email = format!("{prefix}-{i}@bench.example");
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let credentials = format!(r#"{{"email":"{email}","password":"bench-password"}}"#);
            let (status, body) = post(server, "/v1/users", &credentials).await?;
            if status != 201 {
                bail!("POST /v1/users: {status} {body}");
            }
            let (status, body) = post(server, "/v1/sessions", &credentials).await?;
            if status != 201 {
                bail!("POST /v1/sessions: {status} {body}");
            }
            let v: serde_json::Value = serde_json::from_str(&body)?;
            Ok(v["token"].as_str().context("no token in the session")?.to_string())
        }));
    }
    let mut tokens = Vec::with_capacity(count);
    for t in tasks {
        tokens.push(t.await??);
    }
    Ok(tokens)
}
