//! Commands to devices through the API, end to end over real HTTP and real
//! device connections: the round trip to an online device, delivery to an
//! offline one when it connects, expiry, redelivery after a reconnect
//! while unanswered, and cancellation by revocation.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_client::{handler, Client, CommandReply, Config as ClientConfig};
use furrow_proto::{CommandStatus, Message};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::Api;
use support::*;

/// Test helpers on the API client.
trait Commands {
    async fn device(&self, id: &str) -> String;
    async fn command(&self, device: &str, body: Value) -> u64;
    async fn until_state(&self, id: u64, state: &str) -> Value;
}

impl Commands for Api {
    async fn device(&self, id: &str) -> String {
        let (st, v) = self.post("/v1/devices", json!({"device_id": id})).await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["token"].as_str().unwrap().to_owned()
    }

    async fn command(&self, device: &str, body: Value) -> u64 {
        let (st, v) = self
            .post(&format!("/v1/devices/{device}/commands"), body)
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        assert_eq!(v["state"], "queued");
        v["command_id"].as_u64().unwrap()
    }

    /// Polls until the command reaches `state`; returns it.
    async fn until_state(&self, id: u64, state: &str) -> Value {
        within(
            Duration::from_secs(10),
            &format!("command {id} {state}"),
            async {
                loop {
                    let (_, v) = self.get(&format!("/v1/commands/{id}")).await;
                    if v["state"] == state {
                        return v;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        )
        .await
    }
}

/// An SDK device that answers `set_interval` with `{"ok": N}` and counts
/// how often its handler ran.
fn answering_device(
    addr: std::net::SocketAddr,
    id: &str,
    token: &str,
    runs: Arc<AtomicUsize>,
) -> Client {
    let mut c = ClientConfig::new(addr.to_string(), id, token);
    c.backoff.initial = Duration::from_millis(20);
    c.backoff.max = Duration::from_millis(200);
    Client::start_with_handler(
        c,
        handler(move |cmd| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if cmd.name == "set_interval" {
                    let v: Value = serde_json::from_slice(&cmd.payload).unwrap();
                    CommandReply::ok(1, format!(r#"{{"ok":{}}}"#, v["s"]).into_bytes())
                } else {
                    CommandReply::unknown()
                }
            }
        }),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_online_device_makes_the_round_trip() {
    let api = Api::start().await;
    let token = api.device("c-1").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let client = answering_device(api.gw.addr(), "c-1", &token, Arc::clone(&runs));
    api.gw.wait_online("c-1").await;
    let id = api
        .command("c-1", json!({"name": "set_interval", "payload": {"s": 30}}))
        .await;
    let done = api.until_state(id, "succeeded").await;
    assert_eq!(done["result"]["status"], "succeeded");
    assert_eq!(done["result"]["payload"], json!({"ok": 30}));
    assert_eq!(done["payload"], json!({"s": 30}));
    // An unknown command fails, with the device's word for it.
    let id = api.command("c-1", json!({"name": "reboot_now"})).await;
    let v = api.until_state(id, "failed").await;
    assert_eq!(v["result"]["status"], "unknown_command");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // Both appear in the device's list, newest first.
    let (_, page) = api.get("/v1/devices/c-1/commands").await;
    let ids: Vec<u64> = page["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![id, id - 1]);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_to_an_offline_device_is_delivered_when_it_connects() {
    let api = Api::start().await;
    let token = api.device("c-2").await;
    let id = api
        .command("c-2", json!({"name": "set_interval", "payload": {"s": 5}}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, v) = api.get(&format!("/v1/commands/{id}")).await;
    assert_eq!(v["state"], "queued", "nobody to deliver to yet");
    let runs = Arc::new(AtomicUsize::new(0));
    let client = answering_device(api.gw.addr(), "c-2", &token, runs);
    let v = api.until_state(id, "succeeded").await;
    assert_eq!(v["result"]["payload"], json!({"ok": 5}));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_never_delivered() {
    let api = Api::start().await;
    let token = api.device("c-3").await;
    let id = api
        .command(
            "c-3",
            json!({"name": "set_interval", "payload": {"s": 1}, "ttl_s": 1}),
        )
        .await;
    let v = api.until_state(id, "expired").await;
    assert!(v["result"].is_null());
    let runs = Arc::new(AtomicUsize::new(0));
    let client = answering_device(api.gw.addr(), "c-3", &token, Arc::clone(&runs));
    api.gw.wait_online("c-3").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler never ran");
    let (_, v) = api.get(&format!("/v1/commands/{id}")).await;
    assert_eq!(v["state"], "expired");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_command_is_sent_again_after_a_reconnect() {
    let api = Api::start().await;
    let token = api.device("c-4").await;
    let id = api.command("c-4", json!({"name": "ping_me"})).await;
    // A raw device receives it and does not answer.
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.hello("c-4", &token, 30).await;
    match dev.recv().await {
        Some(Message::Command(c)) => assert_eq!((c.command_id, c.name.as_str()), (id, "ping_me")),
        other => panic!("expected COMMAND, got {other:?}"),
    }
    api.until_state(id, "delivered").await;
    drop(dev);
    api.gw.wait_offline("c-4").await;
    // Reconnected: the same command again; answered this time.
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.hello("c-4", &token, 30).await;
    match dev.recv().await {
        Some(Message::Command(c)) => assert_eq!(c.command_id, id),
        other => panic!("expected the COMMAND again, got {other:?}"),
    }
    dev.send(&command_result_msg(id, CommandStatus::Succeeded))
        .await;
    api.until_state(id, "succeeded").await;
    // A repeated answer changes nothing.
    dev.send(&command_result_msg(id, CommandStatus::Failed))
        .await;
    dev.ping(7).await;
    let (_, v) = api.get(&format!("/v1/commands/{id}")).await;
    assert_eq!(v["state"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_device_cancels_its_open_commands() {
    let api = Api::start().await;
    api.device("c-5").await;
    let id = api.command("c-5", json!({"name": "x"})).await;
    let (st, _) = api.post("/v1/devices/c-5/revoke", json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let (_, v) = api.get(&format!("/v1/commands/{id}")).await;
    assert_eq!(v["state"], "cancelled");
    let (st, v) = api
        .post("/v1/devices/c-5/commands", json!({"name": "y"}))
        .await;
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("conflict"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_refused_with_reasons() {
    let api = Api::start().await;
    api.device("c-6").await;
    for (body, needle) in [
        (json!({"name": ""}), "name"),
        (json!({"name": "x", "ttl_s": 0}), "ttl_s"),
        (json!({"name": "x", "content_type": "xml"}), "content_type"),
        (
            json!({"name": "x", "content_type": "octets", "payload": "not base64!"}),
            "base64",
        ),
        (
            json!({"name": "x", "content_type": "text", "payload": 5}),
            "string",
        ),
        (
            json!({"name": "x", "content_type": "cbor", "payload": "/w=="}),
            "payload",
        ),
        (
            json!({"name": "x", "payload": "a".repeat(70_000)}),
            "max_frame",
        ),
    ] {
        let (st, v) = api.post("/v1/devices/c-6/commands", body.clone()).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let (st, _) = api
        .post("/v1/devices/nobody/commands", json!({"name": "x"}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = api.get("/v1/commands/999999").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}
