//! `/metrics` scraped over real HTTP during traffic: the page parses as
//! Prometheus text, and its counters move as the traffic says. The only
//! test in its binary, because the metrics recorder is per process.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

const TOKEN: &str = "an-admin-token-for-tests";

/// Parses the Prometheus text format: `name{labels} value` per sample line,
/// `# HELP` / `# TYPE` comments. Panics on a line that is neither.
fn parse(page: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in page.lines() {
        if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in {line:?}");
        }
        out.insert(series.to_owned(), value);
    }
    out
}

async fn scrape(gw: &TestGateway) -> HashMap<String, f64> {
    let resp = reqwest::Client::new()
        .get(gw.api_url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    parse(&resp.text().await.unwrap())
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_during_traffic_and_move_as_they_should() {
    let gw = TestGateway::start_with(|c| c.api.token = TOKEN.into()).await;
    let token = gw.add_device("m-1").await;
    let before = scrape(&gw).await;

    // 102 stored, 5 duplicates, 1 rejected, over one connection.
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.hello("m-1", &token, 30).await;
    dev.telemetry_batch(1..=100).await;
    dev.until_ack(100).await;
    let during = scrape(&gw).await;
    dev.telemetry_batch((96..=100).chain(101..=102)).await;
    dev.until_ack(102).await;
    dev.telemetry(103, "not json").await;
    assert!(matches!(
        dev.recv().await,
        Some(furrow_proto::Message::Reject(_))
    ));
    drop(dev);
    gw.wait_offline("m-1").await;
    // Bad credentials: one failed handshake.
    let mut bad = RawDevice::connect(gw.addr()).await;
    bad.send(&hello_msg("m-1", "wrong", 30)).await;
    bad.expect_error(code::AUTH_FAILED).await;

    let after = within(Duration::from_secs(10), "counters settle", async {
        loop {
            let m = scrape(&gw).await;
            if get(&m, "furrow_handshakes_total{outcome=\"auth_failed\"}")
                > get(&before, "furrow_handshakes_total{outcome=\"auth_failed\"}")
                && get(&m, "furrow_connections_open") == 0.0
            {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let delta = |s: &str| get(&after, s) - get(&before, s);
    assert_eq!(delta("furrow_telemetry_stored_total"), 102.0);
    assert_eq!(delta("furrow_telemetry_duplicate_total"), 5.0);
    assert_eq!(delta("furrow_telemetry_rejected_total"), 1.0);
    assert_eq!(delta("furrow_connections_accepted_total"), 2.0);
    assert_eq!(delta("furrow_handshakes_total{outcome=\"ok\"}"), 1.0);
    assert!(get(&during, "furrow_connections_open") >= 1.0);
    assert!(delta("furrow_store_commit_seconds_count") >= 1.0);
    assert_eq!(delta("furrow_frames_in_total{type=\"TELEMETRY\"}"), 108.0);
    assert_eq!(delta("furrow_frames_in_total{type=\"HELLO\"}"), 2.0);
    assert_eq!(delta("furrow_frames_out_total{type=\"WELCOME\"}"), 1.0);
    assert_eq!(delta("furrow_frames_out_total{type=\"REJECT\"}"), 1.0);
    assert_eq!(delta("furrow_frames_out_total{type=\"ERROR\"}"), 1.0);
    assert!(delta("furrow_frames_out_total{type=\"ACK\"}") >= 2.0);
    assert!(delta("furrow_frame_bytes_in_total{type=\"TELEMETRY\"}") >= 108.0 * 23.0);
    assert_eq!(
        delta("furrow_frame_bytes_out_total{type=\"ACK\"}"),
        delta("furrow_frames_out_total{type=\"ACK\"}") * 14.0,
        "an ACK is 6 + 8 bytes"
    );
    // 108 TELEMETRY frames of at least 6 + 17 bytes each.
    assert!(delta("furrow_bytes_in_total") >= 108.0 * 23.0);
    assert!(delta("furrow_bytes_out_total") > 0.0);
    assert!(delta("furrow_ack_latency_seconds_count") >= 2.0);
    assert!(after.contains_key("furrow_store_commit_seconds_bucket{le=\"0.001\"}"));
    // Label sets stay bounded: no series names a device.
    assert!(after.keys().all(|k| !k.contains("m-1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_open_and_everything_else_needs_the_token() {
    let gw = TestGateway::start_with(|c| c.api.token = TOKEN.into()).await;
    let http = reqwest::Client::new();
    let r = http.get(gw.api_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(gw.api_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["ready"], true);
    for auth in [None, Some("wrong-token-wrong-token"), Some("")] {
        let mut req = http.get(gw.api_url("/metrics"));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
}
