//! The API's main flow through the rendered nginx: sign-up and sign-in, an admin's resource, a
//! reservation and its payment with Idempotency-Keys, and their replays, spread by nginx over both
//! upstreams (least_conn) on one database.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::estate::{assert_security_headers, Estate, Headers};
use crate::helpers::Resp;

/// Every answer through nginx carries the security headers and nginx's request id.
fn assert_proxied(r: &Resp, what: &str) {
    let h = Headers::from_reqwest(&r.headers);
    assert_security_headers(&h, false, what);
    let ids = h.all("x-request-id");
    assert_eq!(ids.len(), 1, "{what}: one X-Request-Id: {h:?}");
    assert!(
        ids[0].len() == 32 && ids[0].chars().all(|c| c.is_ascii_hexdigit()),
        "{what}: nginx's $request_id (32 hex digits): {}",
        ids[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_and_pay_with_idempotent_replays_work_through_nginx_over_both_upstreams() {
    let est = Estate::builder().start().await;
    let app = &est.app;

    let admin = app.admin().await;
    let resource = app.resource(&admin, 10, 600).await;
    let ada = app.user("ada@example.com").await;

    let got = app.get(&format!("/v1/resources/{resource}"), &ada).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_proxied(&got, "GET /v1/resources/{id}");

    let body = json!({"resource_id": resource, "quantity": 2});
    let reserved = app
        .post("/v1/reservations", &ada, "reserve-1", body.clone())
        .await;
    assert_eq!(reserved.status, StatusCode::CREATED, "{}", reserved.body);
    assert_eq!(reserved.body["state"], "RESERVED");
    assert_eq!(reserved.header("idempotent-replayed"), None);
    assert_proxied(&reserved, "POST /v1/reservations");
    let id = reserved.id();

    let replayed = app.post("/v1/reservations", &ada, "reserve-1", body).await;
    assert_eq!(replayed.status, StatusCode::CREATED, "{}", replayed.body);
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        replayed.body, reserved.body,
        "the replay is the saved answer"
    );
    assert_proxied(&replayed, "a replayed POST /v1/reservations");

    let paid = app.pay(&ada, id, "sandbox_ok", "pay-1").await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    assert_eq!(paid.body["state"], "PAID", "{}", paid.body);
    assert_eq!(paid.body["amount_cents"], 5000);
    assert_eq!(paid.header("idempotent-replayed"), None);
    assert_proxied(&paid, "POST /v1/reservations/{id}/pay");

    let again = app.pay(&ada, id, "sandbox_ok", "pay-1").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, paid.body, "the replay is the saved answer");
    assert_proxied(&again, "a replayed pay");
    assert_eq!(app.gateway_charges().await, 1, "one charge for two pays");

    let now = app
        .request(
            Method::GET,
            &format!("/v1/reservations/{id}"),
            Some(&ada),
            None,
            None,
        )
        .await;
    assert_eq!(now.status, StatusCode::OK, "{}", now.body);
    assert_eq!(now.body["state"], "PAID");

    // Both app hosts answered: nginx balanced the calls (its log names the upstream of each).
    let served: Vec<String> = est
        .nginx
        .access_log()
        .iter()
        .filter_map(|l| l["upstream_addr"].as_str().map(str::to_string))
        .collect();
    for i in 0..2 {
        assert!(
            served.contains(&est.upstream(i)),
            "no request went to {}: {served:?}",
            est.upstream(i)
        );
    }
}
