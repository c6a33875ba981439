//! The console's server side: its files at `/ui/` (public, with a strict
//! Content-Security-Policy), `GET /v1/overview`, and the device list's
//! `prefix` and `online` filters it pages with.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::{Api, TOKEN};

#[tokio::test]
async fn the_console_files_are_public_with_a_strict_policy() {
    let api = Api::with_token().await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |p: &str| api.gw.api_url(p);

    let r = plain.get(url("/ui")).send().await.unwrap();
    assert!(r.status().is_redirection(), "{}", r.status());
    assert_eq!(r.headers()["location"], "/ui/");

    let r = plain.get(url("/ui/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "no token needed for the page");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let page = r.text().await.unwrap();
    assert!(page.contains("app.js"), "the page loads its script");
    assert!(!page.contains("<script>"), "no inline script");

    let r = plain.get(url("/ui/app.js")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    // Revalidation: the same file again costs a 304 without a body.
    let tag = r.headers()["etag"].clone();
    let r = plain
        .get(url("/ui/app.js"))
        .header("if-none-match", tag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"], tag);
    assert!(r.bytes().await.unwrap().is_empty());
    let r = plain
        .get(url("/ui/app.js"))
        .header("if-none-match", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "a changed file is sent again");
    for missing in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/%2e%2e/Cargo.toml"] {
        let r = plain.get(url(missing)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{missing}");
    }
    // The API behind it still wants the token.
    let r = plain.get(url("/v1/overview")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_overview_counts_the_fleet_and_says_who_is_asking() {
    let api = Api::with_token().await;
    let mut tokens = Vec::new();
    for id in ["ov-1", "ov-2", "ov-3"] {
        let (st, v) = api.post("/v1/devices", json!({ "device_id": id })).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        tokens.push(v["token"].as_str().unwrap().to_owned());
    }
    let (_d1, _) = api.gw.connect_device("ov-1", &tokens[0]).await;
    let (_d2, _) = api.gw.connect_device("ov-2", &tokens[1]).await;
    api.gw.wait_online("ov-2").await;
    let (st, v) = api.post("/v1/devices/ov-3/revoke", json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    let (st, o) = api.get("/v1/overview").await;
    assert_eq!(st, StatusCode::OK, "{o}");
    assert_eq!(o["role"], "admin");
    assert_eq!(o["actor"], "admin");
    assert_eq!(
        o["devices"],
        json!({ "total": 2, "online": 2, "offline": 0, "revoked": 1 })
    );
    assert_eq!(o["connections"], 2);
    assert_eq!(
        o["instances"],
        json!([{ "instance": o["instance"], "devices": 2 }])
    );
    assert_eq!(o["series"]["step_ms"], 10_000);
    assert!(o["series"]["points"].is_array());
    assert_eq!(o["series"]["current"]["online"], 2);
    assert!(o["storage"]["commits_ok"].as_bool().unwrap());
    assert!(o["now_ms"].as_u64().unwrap() > 1_700_000_000_000);

    // A read token sees the same, and its role.
    let (st, t) = api
        .post(
            "/v1/api-tokens",
            json!({ "name": "wall-screen", "role": "read" }),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{t}");
    let r = api
        .http
        .get(api.gw.api_url("/v1/overview"))
        .bearer_auth(t["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let o: Value = r.json().await.unwrap();
    assert_eq!(
        (o["role"].as_str(), o["actor"].as_str()),
        (Some("read"), Some("wall-screen"))
    );
    assert_ne!(t["token"], TOKEN);
}

/// Ids of a `GET /v1/devices` page, and its `next`.
async fn page(api: &Api, query: &str) -> (Vec<String>, Value) {
    let (st, v) = api.get(&format!("/v1/devices?{query}")).await;
    assert_eq!(st, StatusCode::OK, "{query}: {v}");
    let ids = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect();
    (ids, v["next"].clone())
}

#[tokio::test]
async fn the_device_list_searches_by_prefix_and_filters_by_connection() {
    let api = Api::start().await;
    let mut tokens = std::collections::HashMap::new();
    for id in ["pump-1", "pump-10", "pump-2", "pump", "valve-1", "pumq"] {
        let (st, v) = api.post("/v1/devices", json!({ "device_id": id })).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        tokens.insert(id, v["token"].as_str().unwrap().to_owned());
    }
    let (_a, _) = api.gw.connect_device("pump-10", &tokens["pump-10"]).await;
    let (_b, _) = api.gw.connect_device("valve-1", &tokens["valve-1"]).await;
    api.gw.wait_online("valve-1").await;
    api.gw.wait_online("pump-10").await;

    let (ids, next) = page(&api, "prefix=pump-1").await;
    assert_eq!(ids, ["pump-1", "pump-10"]);
    assert!(next.is_null());
    // The id equal to the prefix is in, and the list stops past the
    // prefix ("pumq" sorts after every "pump...").
    let (ids, _) = page(&api, "prefix=pump").await;
    assert_eq!(ids, ["pump", "pump-1", "pump-10", "pump-2"]);
    // Paging within a prefix.
    let (ids, next) = page(&api, "prefix=pump&limit=3").await;
    assert_eq!(ids, ["pump", "pump-1", "pump-10"]);
    let (ids, next) = page(
        &api,
        &format!("prefix=pump&limit=3&after={}", next.as_str().unwrap()),
    )
    .await;
    assert_eq!(ids, ["pump-2"]);
    assert!(next.is_null());

    let (ids, _) = page(&api, "online=true").await;
    assert_eq!(ids, ["pump-10", "valve-1"]);
    let (ids, _) = page(&api, "online=false&prefix=pump").await;
    assert_eq!(ids, ["pump", "pump-1", "pump-2"]);
    let (ids, next) = page(&api, "online=false&limit=2").await;
    assert_eq!(ids, ["pump", "pump-1"]);
    let (ids, _) = page(
        &api,
        &format!("online=false&limit=2&after={}", next.as_str().unwrap()),
    )
    .await;
    assert_eq!(ids, ["pump-2", "pumq"]);

    // With tags.
    let (st, v) = api
        .call(
            reqwest::Method::PATCH,
            "/v1/devices/pump-1/tags",
            Some(json!({ "site": "north" })),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let (ids, _) = page(&api, "prefix=pump&tag=site:north").await;
    assert_eq!(ids, ["pump-1"]);

    let (st, v) = api.get("/v1/devices?online=maybe").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
}
