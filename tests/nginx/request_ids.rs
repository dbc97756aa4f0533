//! One request followed from nginx's JSON access log into cozy's JSON request log by its id, and the
//! forwarded headers nginx sets from its own variables: a client cannot choose its address as cozy sees
//! it (cozy believes X-Forwarded-For from nginx only, and nginx replaces the client's).

use std::net::IpAddr;

use reqwest::StatusCode;
use serde_json::Value;

use crate::estate::Estate;

/// nginx's `$request_id`: 32 hex digits.
fn made_by_nginx(id: &str) -> bool {
    id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit())
}

/// GET `path` through nginx with `headers`; the answer's status and X-Request-Id.
async fn get(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = client.get(url).bearer_auth(token);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let ids: Vec<String> = r
        .headers()
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "one X-Request-Id: {ids:?}");
    (r.status(), ids[0].clone())
}

/// The request's line in nginx's log and its one line in cozy's log (on the host nginx names).
fn both_lines(est: &Estate, id: &str) -> (Value, Value) {
    let nginx = est
        .nginx
        .access_line(&format!("request {id}"), |l| l["request_id"] == id);
    let cozy = est.cozy_lines(id);
    assert_eq!(cozy.len(), 1, "request {id} in cozy's logs once: {cozy:?}");
    let (host, line) = cozy.into_iter().next().unwrap();
    let daemon = est.daemons.iter().find(|d| d.name == host).unwrap();
    assert_eq!(
        nginx["upstream_addr"],
        daemon.addr.to_string(),
        "nginx names the host that logged it: {nginx}"
    );
    (nginx, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_request_id_in_nginx_log_is_the_one_cozy_logs_and_returns() {
    let est = Estate::builder().start().await;
    let admin = est.app.admin().await;
    let resource = est.app.resource(&admin, 5, 600).await;
    let path = format!("/v1/resources/{resource}");
    let url = format!("{}{path}", est.base());
    let client = &est.app.client;

    // No id from the client: nginx makes one, cozy logs it, the client gets it.
    let (status, id) = get(client, &url, &admin, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(made_by_nginx(&id), "{id}");
    let (nginx, cozy) = both_lines(&est, &id);
    assert_eq!(nginx["uri"], path.as_str(), "{nginx}");
    assert_eq!(nginx["status"], 200, "{nginx}");
    assert_eq!(cozy["method"], "GET", "{cozy}");
    assert_eq!(cozy["path"], path.as_str(), "{cozy}");
    assert_eq!(cozy["status"], 200, "{cozy}");

    // Ids from the client (another proxy, a tracing system) pass through unchanged, each time.
    for theirs in ["trace-7f3a.b:c_d-0001", "0af7651916cd43dd8448eb211c80319c"] {
        let (status, id) = get(client, &url, &admin, &[("x-request-id", theirs)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(id, theirs, "the client's id is kept");
        let (nginx, cozy) = both_lines(&est, theirs);
        assert_eq!(nginx["request_id"], theirs);
        assert_eq!(cozy["request_id"], theirs);
    }

    // An id that does not look like one (it would end up in headers and logs) is replaced.
    let long = "x".repeat(129);
    for bad in ["two words", "semi;colon", long.as_str()] {
        let (_, id) = get(client, &url, &admin, &[("x-request-id", bad)]).await;
        assert!(
            made_by_nginx(&id),
            "{bad:?} was replaced by nginx's own, not {id}"
        );
        let (_, cozy) = both_lines(&est, &id);
        assert_eq!(cozy["path"], path.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spoofed_x_forwarded_for_from_a_client_does_not_reach_cozy() {
    let est = Estate::builder().start().await;
    let admin = est.app.admin().await;
    let resource = est.app.resource(&admin, 5, 600).await;
    let url = format!("{}/v1/resources/{resource}", est.base());

    // A client of its own address (127.0.0.3, not nginx's 127.0.0.1) makes up where it comes from.
    let me: IpAddr = "127.0.0.3".parse().unwrap();
    let client = est.client_from(Some(me));
    let (status, id) = get(
        &client,
        &url,
        &admin,
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-real-ip", "203.0.113.8"),
            ("forwarded", "for=203.0.113.9"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (nginx, cozy) = both_lines(&est, &id);
    assert_eq!(nginx["remote_addr"], "127.0.0.3", "{nginx}");
    // cozy trusts nginx's X-Forwarded-For (COZY_TRUSTED_PROXIES): the address it names is the one nginx
    // saw, not the client's invention.
    assert_eq!(cozy["client"], "127.0.0.3", "{cozy}");
    let peer = cozy["peer"].as_str().unwrap_or("");
    assert!(
        peer.starts_with("127.0.0.1:") || peer.starts_with("127.0.0.2:"),
        "the TCP peer is nginx: {cozy}"
    );
}
