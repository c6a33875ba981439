//! Operator roles and the audit log (`api/auth.rs`, `api/admin.rs`): API
//! tokens with the `read`, `operate` and `admin` roles, checked route by
//! route as the OpenAPI document lists them, and every change recorded with
//! who, what, when and from where. Real gateway, real HTTP.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::http::Api;

/// A request with `token` as the bearer; the status and the JSON answer
/// (null when the answer is not JSON, as for /metrics).
async fn call(
    api: &Api,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = api
        .http
        .request(method, api.gw.api_url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates an API token with `role` (as the admin); its secret.
async fn token(api: &Api, name: &str, role: &str) -> String {
    let (st, body) = api
        .post("/v1/api-tokens", json!({ "name": name, "role": role }))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["role"], role);
    body["token"].as_str().expect("a secret").to_owned()
}

/// Every (method, path) of the OpenAPI document, path parameters filled in.
async fn routes(api: &Api, command_id: u64, job_id: u64, image_id: &str) -> Vec<(Method, String)> {
    let (st, doc) = api.get("/v1/openapi.json").await;
    assert_eq!(st, StatusCode::OK);
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        let path = path
            .replace("{device_id}", "d1")
            .replace("{command_id}", &command_id.to_string())
            .replace("{job_id}", &job_id.to_string())
            .replace("{image_id}", image_id)
            .replace("{name}", "victim");
        for method in ops.as_object().expect("operations").keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
            out.push((m, path.clone()));
        }
    }
    assert!(out.len() >= 14, "{out:?}");
    out
}

/// A body that passes validation for each write route.
fn body_for(path: &str) -> Option<Value> {
    Some(match path {
        "/v1/devices" => json!({ "device_id": "new-by-role" }),
        "/v1/devices/d1/commands" => json!({ "name": "reboot" }),
        "/v1/api-tokens" => json!({ "name": "made-by-role", "role": "read" }),
        "/v1/jobs" => json!({ "target": {"devices": ["d1"]},
                              "operation": {"desired": {"by": "role"}} }),
        _ => json!({}),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_gets_exactly_its_routes_listed_from_the_openapi_document() {
    // A signing key, so that the admin can upload the image the firmware
    // routes name.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("fleet.key");
    std::fs::write(&key, furrow::firmware::SigningKey::generate().unwrap()).unwrap();
    let api = Api::with_token_and(|c| c.firmware.signing_key_file = key).await;
    let resp = api
        .http
        .post(api.gw.api_url("/v1/firmware?name=fw&version=1.0.0&model=m"))
        .bearer_auth(support::http::TOKEN)
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let image: Value = resp.json().await.unwrap();
    let image_id = image["id"].as_str().unwrap().to_owned();
    api.post("/v1/devices", json!({ "device_id": "d1" })).await;
    let (_, c) = api
        .post("/v1/devices/d1/commands", json!({ "name": "ping" }))
        .await;
    let command_id = c["command_id"].as_u64().expect("a command");
    let (_, j) = api.post("/v1/jobs", body_for("/v1/jobs").unwrap()).await;
    let job_id = j["job_id"].as_u64().expect("a job");
    let read = token(&api, "dashboard", "read").await;
    let operate = token(&api, "ops-bot", "operate").await;
    token(&api, "victim", "read").await;
    let routes = routes(&api, command_id, job_id, &image_id).await;

    // read: every GET but the admin ones, and 403 on every write route.
    let mut writes = 0;
    for (m, path) in &routes {
        let (st, body) = call(&api, &read, m.clone(), path, body_for(path)).await;
        if *m == Method::GET && !matches!(path.as_str(), "/v1/audit" | "/v1/api-tokens") {
            assert!(st.is_success(), "read {m} {path}: {st} {body}");
        } else {
            writes += usize::from(*m != Method::GET);
            assert_eq!(st, StatusCode::FORBIDDEN, "read {m} {path}: {body}");
            assert_eq!(body["error"]["code"], "forbidden", "{body}");
        }
    }
    assert!(writes >= 6, "{writes} write routes");
    let (st, _) = call(&api, &read, Method::GET, "/metrics", None).await;
    assert_eq!(st, StatusCode::OK, "dashboards read the metrics");

    // operate: commands, desired state and jobs, and nothing else that
    // writes.
    for (m, path) in routes.iter().filter(|(m, _)| *m != Method::GET) {
        let (st, body) = call(&api, &operate, m.clone(), path, body_for(path)).await;
        if matches!(path.as_str(), "/v1/devices/d1/commands" | "/v1/jobs") {
            assert_eq!(st, StatusCode::CREATED, "operate {m} {path}: {body}");
        } else if path == "/v1/devices/d1/state/desired"
            || *path == format!("/v1/jobs/{job_id}/cancel")
        {
            assert_eq!(st, StatusCode::OK, "operate {m} {path}: {body}");
        } else {
            assert_eq!(st, StatusCode::FORBIDDEN, "operate {m} {path}: {body}");
        }
    }

    // A revoked token opens nothing; an unknown one neither.
    let (st, _) = api.post("/v1/api-tokens/dashboard/revoke", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = call(&api, &read, Method::GET, "/v1/devices", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _) = call(&api, &"0".repeat(64), Method::GET, "/v1/devices", None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Listed without secrets, the revoked one marked.
    let (_, list) = api.get("/v1/api-tokens").await;
    let names: Vec<&str> = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dashboard", "ops-bot", "victim"]);
    assert!(list["tokens"][0]["revoked_ms"].is_u64(), "{list}");
    assert!(
        !list.to_string().contains(&operate),
        "no secret in the list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_in_the_audit_log_with_who_what_and_from_where() {
    let api = Api::with_token().await;
    let operate = token(&api, "ops-bot", "operate").await;
    api.post("/v1/devices", json!({ "device_id": "pump" }))
        .await;
    let (st, _) = call(
        &api,
        &operate,
        Method::POST,
        "/v1/devices/pump/commands",
        Some(json!({ "name": "open-valve", "payload": { "secret": "s3" } })),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    api.post("/v1/devices/pump/token", json!({ "grace_s": 60 }))
        .await;
    api.post("/v1/devices/pump/revoke", json!({})).await;
    api.post("/v1/api-tokens/ops-bot/revoke", json!({})).await;
    // A refused request changes nothing and is not a change.
    let (st, _) = call(
        &api,
        &operate,
        Method::POST,
        "/v1/devices",
        Some(json!({ "device_id": "x" })),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "revoked");

    let (st, page) = api.get("/v1/audit").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let entries = page["entries"].as_array().expect("entries");
    let seen: Vec<(String, String, String)> = entries
        .iter()
        .rev()
        .map(|e| {
            assert_eq!(e["source"], "127.0.0.1", "{e}");
            assert!(e["at_ms"].as_u64().unwrap() > 0);
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String, String)> = [
        ("admin", "api_token.create", "ops-bot"),
        ("admin", "device.create", "pump"),
        ("ops-bot", "command.create", "pump"),
        ("admin", "device.rotate_token", "pump"),
        ("admin", "device.revoke", "pump"),
        ("admin", "api_token.revoke", "ops-bot"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(seen, want, "{page}");
    // Details, never secrets: the rotation's grace, the command's name.
    let text = page.to_string();
    assert!(
        !text.contains("s3"),
        "a command payload in the audit log: {text}"
    );
    assert!(
        text.contains("open-valve") && text.contains("\"grace_s\":60"),
        "{text}"
    );
    // Paged, newest first.
    let (_, p1) = api.get("/v1/audit?limit=2").await;
    let before = p1["next_before"].as_u64().expect("more");
    let (_, p2) = api.get(&format!("/v1/audit?limit=2&before={before}")).await;
    assert!(p2["entries"][0]["id"].as_u64().unwrap() < before);
}
