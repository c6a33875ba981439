//! Device state end to end, over real HTTP and real device connections
//! (docs/protocol.md, "Capabilities" and "Device state"): a device that
//! does not ask for it sees none of it; desired state set while a device is
//! offline reaches it at its next connection and is resent until
//! confirmed; concurrent `If-Match` writers (one wins, one gets 412);
//! reports acknowledged after commit, applied once, refused over limits
//! before the ACK that covers them; the SDK's handler and `report`; and
//! reported state surviving SIGKILL of the gateway like telemetry.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use furrow_client::{Client, Config as ClientConfig, Desired, DesiredHandler};
use furrow_proto::{ErrorCode, Hello, Message, Report, Str, CAP_STATE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::Api;
use support::process::GatewayProcess;
use support::*;

fn hello_state(id: &str, token: &str) -> Message {
    Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s: 30,
        device_id: Str::from(id),
        token: Str::from(token),
        capabilities: Some(CAP_STATE),
    })
}

fn report_msg(seq: u64, patch: &str) -> Message {
    Message::Report(Report {
        seq,
        timestamp_ms: 0,
        patch: Bytes::from(patch.to_owned()),
    })
}

/// `PATCH /v1/devices/{id}/state/desired`, with `If-Match` if given:
/// (status, ETag, body).
async fn patch_desired(
    api: &Api,
    id: &str,
    if_match: Option<&str>,
    patch: Value,
) -> (StatusCode, Option<String>, Value) {
    let mut req = api
        .http
        .patch(api.gw.api_url(&format!("/v1/devices/{id}/state/desired")))
        .header("content-type", "application/merge-patch+json")
        .body(patch.to_string());
    if let Some(v) = if_match {
        req = req.header("if-match", v);
    }
    let resp = req.send().await.expect("PATCH");
    let status = resp.status();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = resp.json().await.expect("JSON");
    (status, etag, body)
}

async fn state(api: &Api, id: &str) -> Value {
    let (st, v) = api.get(&format!("/v1/devices/{id}/state")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    v
}

async fn connect_state(gw: &TestGateway, id: &str, token: &str) -> RawDevice {
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send(&hello_state(id, token)).await;
    let w = dev.expect_welcome().await;
    assert_eq!(w.capabilities, Some(CAP_STATE), "the gateway grants STATE");
    dev
}

#[tokio::test]
async fn a_device_that_does_not_ask_sees_no_state_message() {
    let api = Api::start().await;
    let token = api.gw.add_device("old-1").await;
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.send(&hello_msg("old-1", &token, 30)).await;
    // Its WELCOME is the one it always had: 0x1b bytes of length, no
    // capabilities.
    let raw = dev.recv_raw().await;
    assert_eq!(&raw[..5], &[0, 0, 0, 0x1b, 0x02]);
    let (st, _, _) = patch_desired(&api, "old-1", None, json!({"led": "on"})).await;
    assert_eq!(st, StatusCode::OK);
    // Nothing arrives: no DESIRED for a device that did not ask.
    dev.send(&Message::Ping { nonce: 7 }).await;
    assert_eq!(dev.recv().await, Some(Message::Pong { nonce: 7 }));
    dev.reader.expect_silence(Duration::from_millis(400)).await;
    // And it may not send state messages itself.
    dev.send(&report_msg(1, r#"{"a":1}"#)).await;
    let e = dev.expect_error(ErrorCode::ProtocolError as u16).await;
    assert!(e.message.as_str().contains("capability"), "{e:?}");
}

#[tokio::test]
async fn desired_state_set_offline_arrives_at_the_next_connection_until_confirmed() {
    let api = Api::start().await;
    let token = api.gw.add_device("pump-1").await;
    let (st, etag, v) = patch_desired(
        &api,
        "pump-1",
        Some("\"0\""),
        json!({"led": "on", "rate": 5}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(etag.as_deref(), Some("\"1\""));
    assert_eq!(v["delta"], json!({"led": "on", "rate": 5}));

    // First connection: DESIRED version 1, not confirmed.
    let mut dev = connect_state(&api.gw, "pump-1", &token).await;
    let Some(Message::Desired(d)) = dev.recv().await else {
        panic!("expected DESIRED");
    };
    assert_eq!(d.version, 1);
    let doc: Value = serde_json::from_slice(&d.document).unwrap();
    assert_eq!(doc, json!({"led": "on", "rate": 5}));
    drop(dev);
    api.gw.wait_offline("pump-1").await;

    // Second connection: sent again (never confirmed); now confirmed.
    let mut dev = connect_state(&api.gw, "pump-1", &token).await;
    let Some(Message::Desired(d)) = dev.recv().await else {
        panic!("expected DESIRED again");
    };
    assert_eq!(d.version, 1);
    dev.send(&Message::DesiredAck { version: 1 }).await;
    within(Duration::from_secs(5), "confirmation stored", async {
        while state(&api, "pump-1").await["desired_acked_version"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // A change while online arrives at once.
    let (st, _, _) = patch_desired(&api, "pump-1", None, json!({"rate": null})).await;
    assert_eq!(st, StatusCode::OK);
    let Some(Message::Desired(d)) = dev.recv().await else {
        panic!("expected DESIRED version 2");
    };
    assert_eq!(d.version, 2);
    assert_eq!(
        serde_json::from_slice::<Value>(&d.document).unwrap(),
        json!({"led": "on"})
    );
    dev.send(&Message::DesiredAck { version: 2 }).await;
    within(Duration::from_secs(5), "second confirmation", async {
        while state(&api, "pump-1").await["desired_acked_version"] != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(dev);
    api.gw.wait_offline("pump-1").await;

    // Confirmed: the next connection gets no DESIRED.
    let mut dev = connect_state(&api.gw, "pump-1", &token).await;
    dev.send(&Message::Ping { nonce: 1 }).await;
    assert_eq!(dev.recv().await, Some(Message::Pong { nonce: 1 }));
}

#[tokio::test]
async fn concurrent_if_match_writers_one_wins_one_gets_412() {
    let api = Api::start().await;
    api.gw.add_device("valve-1").await;
    for round in 0..5u64 {
        let tag = format!("\"{round}\"");
        let (a, b) = tokio::join!(
            patch_desired(
                &api,
                "valve-1",
                Some(&tag),
                json!({"w": "a", "round": round})
            ),
            patch_desired(
                &api,
                "valve-1",
                Some(&tag),
                json!({"w": "b", "round": round})
            ),
        );
        let mut codes = [a.0, b.0];
        codes.sort();
        assert_eq!(
            codes,
            [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
            "round {round}: {a:?} {b:?}"
        );
        let loser = if a.0 == StatusCode::OK { &b.2 } else { &a.2 };
        assert_eq!(loser["error"]["code"], "precondition_failed");
    }
    let v = state(&api, "valve-1").await;
    assert_eq!(v["desired"]["version"], 5);
    // Bad If-Match, a non-object patch, and limits: clear errors.
    let (st, _, _) = patch_desired(&api, "valve-1", Some("abc"), json!({"a": 1})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _, v) = patch_desired(&api, "valve-1", None, json!([1, 2])).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let big = "x".repeat(9000);
    let (st, _, v) = patch_desired(&api, "valve-1", None, json!({ "pad": big })).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let deep = json!({"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{}}}}}}}}});
    let (st, _, v) = patch_desired(&api, "valve-1", None, deep).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (st, _, _) = patch_desired(&api, "nobody", None, json!({"a": 1})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(api
        .metrics()
        .await
        .contains("furrow_state_desired_refused_total"));
}

#[tokio::test]
async fn reports_are_acked_after_commit_applied_once_and_refused_over_limits() {
    let api = Api::start_with(|c| c.state.max_bytes = 64).await;
    let token = api.gw.add_device("meter-1").await;
    let mut dev = connect_state(&api.gw, "meter-1", &token).await;
    // Reports share the telemetry sequence and its ACKs.
    dev.telemetry(1, r#"{"t":1}"#).await;
    dev.send(&report_msg(2, r#"{"fw":"1.0","cfg":{"a":1}}"#))
        .await;
    dev.send(&report_msg(3, r#"{"cfg":{"b":2}}"#)).await;
    dev.until_ack(3).await;
    // A repeat after the fact changes nothing (its ACK is covered by the
    // ACKs that follow).
    dev.send(&report_msg(2, r#"{"fw":"0.9"}"#)).await;
    // Not an object: INVALID_PAYLOAD; a patch over the limit, or one that
    // would make the document too large: STATE_TOO_LARGE, each before the
    // ACK that covers it.
    dev.send(&report_msg(4, "[1,2]")).await;
    let pad = "x".repeat(70);
    dev.send(&report_msg(5, &format!(r#"{{"pad":"{pad}"}}"#)))
        .await;
    let grow = "y".repeat(30);
    dev.send(&report_msg(6, &format!(r#"{{"more":"{grow}"}}"#)))
        .await;
    dev.send(&report_msg(7, r#"{"fw":"1.1"}"#)).await;
    let seen = dev.until_ack(7).await;
    let rejects: Vec<(u64, u16)> = seen
        .iter()
        .filter_map(|m| match m {
            Message::Reject(r) => Some((r.seq, r.code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejects,
        vec![
            (4, ErrorCode::InvalidPayload as u16),
            (5, ErrorCode::StateTooLarge as u16),
            (6, ErrorCode::StateTooLarge as u16),
        ],
        "{seen:?}"
    );
    let v = state(&api, "meter-1").await;
    assert_eq!(
        v["reported"]["document"],
        json!({"fw": "1.1", "cfg": {"a": 1, "b": 2}})
    );
    assert_eq!(v["reported"]["version"], 3);
    assert!(v["reported"]["fields"]["fw"].as_u64().unwrap() > 0);
    // The history holds the applied reports, newest first.
    let (st, h) = api.get("/v1/devices/meter-1/state/history").await;
    assert_eq!(st, StatusCode::OK);
    let seqs: Vec<u64> = h["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![7, 3, 2]);
    // The reconnecting device learns every seq is stored.
    drop(dev);
    api.gw.wait_offline("meter-1").await;
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    dev.send(&hello_state("meter-1", &token)).await;
    assert_eq!(dev.expect_welcome().await.last_seq, 7);
    let m = api.metrics().await;
    assert!(m.contains("furrow_state_reports_stored_total"), "{m}");
    assert!(m.contains("furrow_state_reports_rejected_total"), "{m}");
}

#[tokio::test]
async fn reports_past_the_rate_are_slowed_not_refused() {
    let api = Api::start_with(|c| {
        c.state.report_rate_per_s = 20;
        c.state.report_burst = 2;
    })
    .await;
    let token = api.gw.add_device("chatty-1").await;
    let mut dev = connect_state(&api.gw, "chatty-1", &token).await;
    let started = std::time::Instant::now();
    let mut frames = Vec::new();
    for seq in 1..=12u64 {
        frames.extend(encode(&report_msg(seq, &format!(r#"{{"n":{seq}}}"#))));
    }
    dev.send_raw(&frames).await;
    let seen = dev.until_ack(12).await;
    assert!(
        !seen.iter().any(|m| matches!(m, Message::Reject(_))),
        "{seen:?}"
    );
    // 12 reports at 20/s after a burst of 2: at least ~0.45 s.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        state(&api, "chatty-1").await["reported"]["document"]["n"],
        12
    );
}

#[tokio::test]
async fn the_sdk_applies_desired_state_and_reports_it() {
    let api = Api::start().await;
    let token = api.gw.add_device("sdk-1").await;
    let (st, _, _) = patch_desired(&api, "sdk-1", None, json!({"mode": "eco"})).await;
    assert_eq!(st, StatusCode::OK);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Desired>();
    let handler: DesiredHandler = Arc::new(move |d| {
        let _ = tx.send(d);
    });
    let client = Arc::new(
        Client::start_with_handlers(
            ClientConfig::new(api.gw.addr().to_string(), "sdk-1", token),
            None,
            Some(handler),
        )
        .unwrap(),
    );
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    // The application: apply (echo) each desired document as reported.
    let app = {
        let (client, seen) = (Arc::clone(&client), Arc::clone(&seen));
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                seen.lock().unwrap().push(d.version);
                client.report(d.document).await.unwrap();
            }
        })
    };
    let until_reported = |want: Value| {
        let api = &api;
        async move {
            within(Duration::from_secs(10), "reported state", async {
                loop {
                    let v = state(api, "sdk-1").await;
                    if v["reported"]["document"] == want && v["delta"] == json!({}) {
                        return v;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        }
    };
    until_reported(json!({"mode": "eco"})).await;
    let (st, _, _) = patch_desired(&api, "sdk-1", None, json!({"mode": "max", "led": 1})).await;
    assert_eq!(st, StatusCode::OK);
    let v = until_reported(json!({"mode": "max", "led": 1})).await;
    assert_eq!(v["desired_acked_version"], 2);
    assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    assert_eq!(client.desired().map(|d| d.version), Some(2));
    // A plain client cannot report.
    let plain = Client::start(ClientConfig::new(api.gw.addr().to_string(), "sdk-1", "x")).unwrap();
    assert!(plain.report(json!({"a": 1})).await.is_err());
    plain.close().await;
    client.close().await;
    app.abort();
}

/// `GET /v1/devices/{id}/state` of a gateway process.
async fn state_of(http: &reqwest::Client, api: std::net::SocketAddr, id: &str) -> Value {
    http.get(format!("http://{api}/v1/devices/{id}/state"))
        .send()
        .await
        .expect("GET state")
        .json()
        .await
        .expect("JSON")
}

/// Reported state is stored like telemetry: what was ACKed survives a
/// SIGKILL of the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_state_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http = reqwest::Client::new();
    let mut gw = GatewayProcess::spawn(dir.path(), "gw", listen, &[]);
    gw.ready(&http).await;
    let (st, v) = {
        let r = http
            .post(format!("http://{}/v1/devices", gw.api))
            .json(&json!({"device_id": "tracker-1"}))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    let mut dev = RawDevice::connect(listen).await;
    dev.send(&hello_state("tracker-1", &token)).await;
    dev.expect_welcome().await;
    for seq in 1..=20u64 {
        dev.send(&report_msg(
            seq,
            &format!(r#"{{"pos":{seq},"k{seq}":true}}"#),
        ))
        .await;
    }
    dev.until_ack(20).await;
    gw.child.kill().expect("SIGKILL");
    let _ = gw.child.wait();
    let mut gw = GatewayProcess::spawn(dir.path(), "gw", listen, &[]);
    gw.ready(&http).await;
    let v = state_of(&http, gw.api, "tracker-1").await;
    assert_eq!(v["reported"]["version"], 20, "{v}");
    assert_eq!(v["reported"]["document"]["pos"], 20);
    assert_eq!(
        v["reported"]["document"].as_object().unwrap().len(),
        21,
        "{v}"
    );
    // The device resends what it has not seen ACKed: nothing is applied
    // twice (the version stays).
    let mut dev = RawDevice::connect(listen).await;
    dev.send(&hello_state("tracker-1", &token)).await;
    assert_eq!(dev.expect_welcome().await.last_seq, 20);
    dev.send(&report_msg(20, r#"{"pos":0}"#)).await;
    dev.until_ack(20).await;
    let v = state_of(&http, gw.api, "tracker-1").await;
    assert_eq!(v["reported"]["document"]["pos"], 20);
    assert_eq!(v["reported"]["version"], 20);
}
