//! Token rotation without downtime (`POST /v1/devices/{id}/token`): the old
//! token keeps working for a grace period, or until the device first
//! authenticates with the new one; with `deliver`, the device is handed the
//! new token as a `furrow.token` command, which the device SDK takes by
//! itself. Real gateway, real HTTP API, the real SDK.

mod support;

use std::time::Duration;

use furrow_client::{Backoff, Client, Config, Event as ClientEvent};
use furrow_proto::Message;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::http::Api;
use support::*;
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(15);

/// The first answer to HELLO with `token`: WELCOME (true) or ERROR
/// AUTH_FAILED (false).
async fn opens(gw: &TestGateway, id: &str, token: &str) -> bool {
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send(&hello_msg(id, token, 0)).await;
    match dev.recv().await {
        Some(Message::Welcome(_)) => true,
        Some(Message::Error(e)) if e.code == code::AUTH_FAILED => false,
        other => panic!("HELLO as {id}: {other:?}"),
    }
}

fn s(v: &Value) -> String {
    v.as_str().expect("a string").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_token_works_until_the_device_uses_the_new_one() {
    let api = Api::start().await;
    let gw = &api.gw;
    let old = gw.add_device("pump").await;
    // No body: the default grace period (devices.token_grace_s, 7 days).
    let (st, body) = api.call(Method::POST, "/v1/devices/pump/token", None).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let new = s(&body["token"]);
    assert_ne!(new, old);
    let until = body["previous_valid_until_ms"]
        .as_u64()
        .expect("a grace period");
    let week = 7 * 24 * 3600 * 1000;
    assert!(
        until > now_ms() + week - 60_000 && until <= now_ms() + week,
        "{body}"
    );
    assert!(body["command_id"].is_null(), "{body}");
    // Both open the device while it has not used the new one...
    assert!(
        opens(gw, "pump", &old).await,
        "the old token in its grace period"
    );
    assert!(opens(gw, "pump", &old).await, "and again");
    assert!(opens(gw, "pump", &new).await, "the new token");
    // ...and once it has, only the new one.
    assert!(
        !opens(gw, "pump", &old).await,
        "the old token after the new one was used"
    );
    assert!(opens(gw, "pump", &new).await);
    let m = api.metrics().await;
    assert!(m.contains("furrow_auth_previous_token_total"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_grace_the_old_token_stops_at_once_and_a_grace_period_ends() {
    let api = Api::start().await;
    let gw = &api.gw;
    let old = gw.add_device("pump").await;
    let (st, body) = api
        .post("/v1/devices/pump/token", json!({ "grace_s": 0 }))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body["previous_valid_until_ms"].is_null(), "{body}");
    assert!(!opens(gw, "pump", &old).await);
    assert!(opens(gw, "pump", &s(&body["token"])).await);

    // One second of grace, never used: then the old token stops.
    let before = s(&body["token"]);
    let (st, body) = api
        .post("/v1/devices/pump/token", json!({ "grace_s": 1 }))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(opens(gw, "pump", &before).await, "within the second");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(!opens(gw, "pump", &before).await, "after it");
    assert!(opens(gw, "pump", &s(&body["token"])).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rotation_requests_are_refused() {
    let api = Api::start().await;
    api.gw.add_device("pump").await;
    let (st, body) = api
        .post(
            "/v1/devices/pump/token",
            json!({ "grace_s": 400 * 24 * 3600 }),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    let (st, body) = api
        .post("/v1/devices/pump/token", json!({ "grace": 5 }))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "an unknown field: {body}");
    let (st, _) = api.post("/v1/devices/nobody/token", json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

/// Waits for a client event matching `f`.
async fn event(
    rx: &mut broadcast::Receiver<ClientEvent>,
    what: &str,
    f: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    within(WAIT, what, async {
        loop {
            match rx.recv().await {
                Ok(e) if f(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("client closed"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_the_sdk_keeps_streaming_and_switches_tokens_by_command() {
    const N: u64 = 300;
    let api = Api::start().await;
    let gw = &api.gw;
    let old = gw.add_device("pump").await;
    let mut cfg = Config::new(gw.addr().to_string(), "pump", old.as_str());
    cfg.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        multiplier: 2.0,
    };
    let client = std::sync::Arc::new(Client::start(cfg).unwrap());
    let mut events = client.events();
    event(&mut events, "connected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    // Readings flow before, during and after the rotation.
    let sender = {
        let client = std::sync::Arc::clone(&client);
        tokio::spawn(async move {
            for i in 1..=N {
                client
                    .send(1, format!(r#"{{"i":{i}}}"#).into_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, body) = api
        .post("/v1/devices/pump/token", json!({ "deliver": true }))
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let new = s(&body["token"]);
    let command_id = body["command_id"].as_u64().expect("a command");
    // The live session gets the command; the SDK takes the token and says so.
    // Readers of commands (and MQTT events, the same view) never see it.
    let (_, c) = api.get(&format!("/v1/commands/{command_id}")).await;
    assert_eq!(c["payload"], json!({ "token": "(hidden)" }), "{c}");
    assert!(!c.to_string().contains(&new), "{c}");
    let e = event(&mut events, "TokenRotated", |e| {
        matches!(e, ClientEvent::TokenRotated { .. })
    })
    .await;
    assert_eq!(e, ClientEvent::TokenRotated { token: new.clone() });
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, c) = api.get(&format!("/v1/commands/{command_id}")).await;
        if c["state"] == "succeeded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the command was not answered: {c}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another connection with the new token takes the session over: the
    // old token is retired, so the SDK gets back in only with the new one.
    let mut other = RawDevice::connect(gw.addr()).await;
    other.hello("pump", &new, 0).await;
    event(&mut events, "reconnected", |e| {
        matches!(e, ClientEvent::Connected { .. })
    })
    .await;
    drop(other);
    assert!(!opens(gw, "pump", &old).await, "the old token is retired");
    within(WAIT, "sender", sender).await.unwrap();
    within(Duration::from_secs(30), "flush", client.flush())
        .await
        .unwrap();
    // Nothing lost, nothing twice, across the rotation and the takeovers.
    support::assert_seqs(
        &support::stored_seqs_async(&gw.db_path(), "pump").await,
        1..=N,
        "stored",
    );
    let (_, c) = api.get(&format!("/v1/commands/{command_id}")).await;
    assert_eq!(c["state"], "succeeded", "{c}");
    client.close().await;
}
