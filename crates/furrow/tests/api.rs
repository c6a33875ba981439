//! The operator's HTTP API end to end, over real HTTP against a real
//! gateway: provisioning, a device on the SDK, its telemetry read back,
//! revocation and token rotation, errors, and the OpenAPI document.

mod support;

use std::time::Duration;

use furrow_client::{Client, Config as ClientConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::{Api, TOKEN};
use support::*;

fn sdk(addr: std::net::SocketAddr, id: &str, token: &str) -> Client {
    let mut c = ClientConfig::new(addr.to_string(), id, token);
    c.backoff.initial = Duration::from_millis(20);
    c.backoff.max = Duration::from_millis(200);
    Client::start(c).expect("client starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_connect_send_and_read_back() {
    let api = Api::with_token().await;
    let (st, created) = api
        .post("/v1/devices", json!({"device_id": "pump-17"}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64, "256 bits, hex");

    let (st, d) = api.get("/v1/devices/pump-17").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        (d["online"].clone(), d["last_seq"].clone()),
        (json!(false), json!(0))
    );

    let client = sdk(api.gw.addr(), "pump-17", &token);
    for i in 0..10 {
        client
            .send(1, format!(r#"{{"flow":{i}}}"#).into_bytes())
            .await
            .unwrap();
    }
    client.send(3, b"plain text".to_vec()).await.unwrap();
    client.send(0, vec![0u8, 159, 255]).await.unwrap();
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();

    let (_, d) = api.get("/v1/devices/pump-17").await;
    assert_eq!(d["online"], true, "{d}");
    assert_eq!(d["last_seq"], 12);
    assert!(d["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{d}");
    assert!(d["connected_since_ms"].as_u64().unwrap() > 0);
    assert!(d["last_seen_ms"].as_u64().unwrap() >= d["connected_since_ms"].as_u64().unwrap());
    assert!(!d["instance"].as_str().unwrap().is_empty());

    // Everything, then a seq range, then paging.
    let (st, page) = api.get("/v1/devices/pump-17/telemetry").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let r = page["readings"].as_array().unwrap();
    assert_eq!(r.len(), 12);
    assert_eq!(
        r[3]["payload"],
        json!({"flow": 3}),
        "JSON comes back as JSON"
    );
    assert_eq!(r[3]["content_type"], "json");
    assert_eq!(r[10]["content_type"], "text");
    assert_eq!(r[10]["payload"], "cGxhaW4gdGV4dA==", "others as base64");
    assert_eq!(r[11]["payload"], "AJ//");
    assert!(page["next_from_seq"].is_null());
    let (_, page) = api
        .get("/v1/devices/pump-17/telemetry?from_seq=4&to_seq=6")
        .await;
    let seqs: Vec<u64> = page["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 5, 6]);
    let (_, page) = api.get("/v1/devices/pump-17/telemetry?limit=5").await;
    assert_eq!(page["readings"].as_array().unwrap().len(), 5);
    assert_eq!(page["next_from_seq"], 6);
    // A time range: from the fourth reading's timestamp on.
    let t3 = r[3]["timestamp_ms"].as_u64().unwrap();
    let (_, page) = api
        .get(&format!("/v1/devices/pump-17/telemetry?from_ms={t3}"))
        .await;
    let first = page["readings"][0]["seq"].as_u64().unwrap();
    assert!(first <= 4, "readings at or after {t3}: {page}");
    assert!(page["readings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["timestamp_ms"].as_u64().unwrap() >= t3));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_devices() {
    let api = Api::with_token().await;
    for i in 0..5 {
        let (st, _) = api
            .post("/v1/devices", json!({"device_id": format!("d-{i}")}))
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/devices?limit=2".to_owned();
    loop {
        let (st, page) = api.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        for d in page["devices"].as_array().unwrap() {
            seen.push(d["device_id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => path = format!("/v1/devices?limit=2&after={n}"),
            None => break,
        }
    }
    assert_eq!(seen, vec!["d-0", "d-1", "d-2", "d-3", "d-4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_is_disconnected_and_cannot_reconnect() {
    let api = Api::with_token().await;
    let (_, c) = api.post("/v1/devices", json!({"device_id": "rev-1"})).await;
    let token = c["token"].as_str().unwrap().to_owned();
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.hello("rev-1", &token, 30).await;
    let (st, body) = api.post("/v1/devices/rev-1/revoke", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["revoked"], true);
    assert_eq!(body["disconnected"], true);
    dev.expect_goodbye(goodbye::DEVICE_REVOKED).await;
    let mut again = RawDevice::connect(api.gw.addr()).await;
    again.send(&hello_msg("rev-1", &token, 30)).await;
    again.expect_error(code::AUTH_FAILED).await;
    let (_, d) = api.get("/v1/devices/rev-1").await;
    assert!(d["revoked_ms"].as_u64().is_some(), "{d}");
    let (_, body) = api.post("/v1/devices/rev-1/revoke", json!({})).await;
    assert_eq!(body["revoked"], false, "already revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_replaces_the_old_one() {
    // Without a grace period (tests/token_rotation.rs covers the default).
    let api = Api::with_token().await;
    let (_, c) = api.post("/v1/devices", json!({"device_id": "rot-1"})).await;
    let old = c["token"].as_str().unwrap().to_owned();
    let (st, r) = api
        .post("/v1/devices/rot-1/token", json!({"grace_s": 0}))
        .await;
    assert_eq!(st, StatusCode::OK, "{r}");
    let new = r["token"].as_str().unwrap().to_owned();
    assert_ne!(old, new);
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.send(&hello_msg("rot-1", &old, 30)).await;
    dev.expect_error(code::AUTH_FAILED).await;
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.hello("rot-1", &new, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_stable_codes() {
    let api = Api::with_token().await;
    // 401: no token, a wrong token.
    for auth in [None, Some("not-the-admin-token")] {
        let mut req = api.http.get(api.gw.api_url("/v1/devices"));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    // 400: bad JSON says what is wrong.
    let r = api
        .http
        .post(api.gw.api_url("/v1/devices"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"device_id": "x",,}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "bad_request");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 1 column"), "{msg}");
    let (st, v) = api.post("/v1/devices", json!({"id": "x"})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("device_id"),
        "{v}"
    );
    let (st, v) = api
        .post("/v1/devices", json!({"device_id": "no spaces"}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid device id"),
        "{v}"
    );
    let (st, v) = api.get("/v1/devices?limit=0").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = api.get("/v1/devices?limit=many").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    // 409, 404.
    api.post("/v1/devices", json!({"device_id": "dup"})).await;
    let (st, v) = api.post("/v1/devices", json!({"device_id": "dup"})).await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("conflict"))
    );
    for path in ["/v1/devices/nobody", "/v1/devices/nobody/telemetry"] {
        let (st, v) = api.get(path).await;
        assert_eq!(
            (st, v["error"]["code"].clone()),
            (StatusCode::NOT_FOUND, json!("not_found")),
            "{path}"
        );
    }
    let (st, _) = api.post("/v1/devices/nobody/revoke", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = api.post("/v1/devices/nobody/token", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_parses_and_lists_the_routes() {
    let api = Api::with_token().await;
    let (st, doc) = api.get("/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/v1/devices",
        "/v1/devices/{device_id}",
        "/v1/devices/{device_id}/revoke",
        "/v1/devices/{device_id}/token",
        "/v1/devices/{device_id}/telemetry",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["Device"].is_object());
}

/// POSTs `body` as `application/x-www-form-urlencoded` (what `curl -d`
/// sends), with the admin token or without; returns status and answer.
async fn post_form(api: &Api, token: bool, path: &str, body: &str) -> (StatusCode, Value) {
    let mut req = api.http.post(api.gw.api_url(path));
    if token {
        req = req.bearer_auth(TOKEN);
    }
    let r = req
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// `curl -d` sends `application/x-www-form-urlencoded`: a JSON body is
/// read whatever its content type when the request carries a bearer
/// token, and refused (with a message that says what to send) when it
/// carries no `Authorization` header, so that a web page cannot post a form
/// to a gateway without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_bodies_with_a_form_content_type() {
    let message = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let api = Api::with_token().await;
    let (st, v) = post_form(&api, true, "/v1/devices", r#"{"device_id":"pump-18"}"#).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(v["device_id"], "pump-18");
    // Not JSON at all: serde's words.
    let (st, v) = post_form(&api, true, "/v1/devices", "device_id=pump-19").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(message(&v).contains("not the JSON"), "{v}");

    let open = Api::start().await;
    let (st, v) = post_form(&open, false, "/v1/devices", r#"{"device_id":"pump-18"}"#).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        message(&v).contains("Content-Type: application/json"),
        "{v}"
    );
    let (st, _) = open.get("/v1/devices/pump-18").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "nothing was created");
}
