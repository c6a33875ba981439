//! `furrow bench` end to end: the real binary against a real gateway (and,
//! for the MQTT mode, a throwaway Mosquitto). The figures of a run on a
//! shared machine are not asserted; what is asserted is that the report is
//! complete and true: every device connected, what was acknowledged is
//! stored exactly once, errors are counted by kind, the storm's devices all
//! come back, and the files it writes are what they claim to be.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::mosquitto::Mosquitto;
use support::*;

/// Runs `furrow bench ARGS --json FILE --quiet` and returns the report.
async fn bench(dir: &Path, args: &[&str]) -> Value {
    let json = dir.join(format!("report-{}.json", rand::random::<u32>()));
    let mut all: Vec<&str> = vec!["bench"];
    all.extend_from_slice(args);
    let json_s = json.to_string_lossy().into_owned();
    all.extend_from_slice(&["--json", &json_s, "--quiet"]);
    let mut cmd = tokio::process::Command::from(furrow_cmd(&all));
    let out = within(Duration::from_secs(120), "furrow bench", cmd.output())
        .await
        .expect("furrow bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "furrow bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report is written");
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    assert!(stdout.contains("connect "), "a human summary: {stdout}");
    report
}

/// Runs `furrow bench MODE --addr GW --data-dir GW_DATA ARGS`.
async fn bench_gw(gw: &TestGateway, dir: &Path, mode: &str, args: &[&str]) -> Value {
    let (addr, data) = (
        gw.addr().to_string(),
        gw.config().data_dir.to_string_lossy().into_owned(),
    );
    let mut all = vec![mode, "--addr", &addr, "--data-dir", &data];
    all.extend_from_slice(args);
    bench(dir, &all).await
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_run_reports_and_what_was_acked_is_stored_once() {
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("chart.svg");
    let chart_s = chart.to_string_lossy().into_owned();
    let r = bench_gw(
        &gw,
        dir.path(),
        "flat",
        &[
            "--devices",
            "20",
            "--window",
            "16",
            "--warmup",
            "1",
            "--duration",
            "2",
            "--chart",
            &chart_s,
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 20);
    assert_eq!(u(&r, "/connect_us/count"), 20);
    assert!(u(&r, "/acked") > 0, "{r}");
    assert_eq!(u(&r, "/ack_us/count"), u(&r, "/acked"));
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
    assert!(r["timeline"].as_array().unwrap().len() >= 3, "{r}");
    // Each device's stored seqs are exactly 1..=n: nothing acked lost,
    // nothing stored twice.
    let db = gw.db_path();
    let mut total = 0;
    for i in 0..20 {
        let seqs = stored_seqs_async(&db, &format!("bench-{i}")).await;
        assert!(!seqs.is_empty());
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        total += seqs.len() as u64;
    }
    assert!(total >= u(&r, "/acked"));
    let svg = std::fs::read_to_string(&chart).expect("the chart is written");
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "an SVG with lines"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_run_sends_at_the_offered_rate_within_the_window() {
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = bench_gw(
        &gw,
        dir.path(),
        "steady",
        &[
            "--devices",
            "10",
            "--rate",
            "50",
            "--warmup",
            "1",
            "--duration",
            "2",
        ],
    )
    .await;
    let (sent, acked) = (u(&r, "/sent"), u(&r, "/acked"));
    // 10 devices x 50/s x ~2 s = ~1,000 offered; a paced sender cannot
    // send far more than that, and what it sent is acknowledged.
    assert!((500..=1_300).contains(&sent), "sent {sent}: {r}");
    assert!(acked + 10 * 64 >= sent && acked > 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_over_two_worker_processes_brings_every_device_back() {
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = bench_gw(
        &gw,
        dir.path(),
        "storm",
        &[
            "--devices",
            "300",
            "--rate",
            "5",
            "--workers",
            "2",
            "--sources",
            "3",
            "--warmup",
            "1",
            "--duration",
            "30",
        ],
    )
    .await;
    assert_eq!(u(&r, "/workers"), 2);
    assert_eq!(u(&r, "/connected"), 300);
    assert_eq!(u(&r, "/storm/devices"), 300);
    assert_eq!(u(&r, "/storm/back"), 300, "{r}");
    assert!(r["storm"]["all_back_ms"].as_f64().is_some(), "{r}");
    assert_eq!(u(&r, "/storm/back_us/count"), 300);
    assert!(u(&r, "/reconnects") >= 300, "{r}");
    // Devices on two processes and three source addresses all streamed.
    for i in [0, 1, 2, 299] {
        assert!(!stored_seqs_async(&gw.db_path(), &format!("bench-{i}"))
            .await
            .is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_run_reports_the_servers_memory_per_connection() {
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id().to_string();
    let r = bench_gw(
        &gw,
        dir.path(),
        "idle",
        &["--devices", "200", "--duration", "1", "--server-pid", &pid],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 200);
    assert!(u(&r, "/memory/rss_after_kib") > 0, "{r}");
    assert!(
        r["memory"]["bytes_per_connection"].as_f64().is_some(),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authflood_run_counts_the_attacks_and_times_the_valid_handshakes() {
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id().to_string();
    let r = bench_gw(
        &gw,
        dir.path(),
        "authflood",
        &[
            "--devices",
            "5",
            "--rate",
            "5",
            "--attackers",
            "4",
            "--warmup",
            "1",
            "--duration",
            "2",
            "--server-pid",
            &pid,
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 5);
    // Every attempt is an AUTH_FAILED (ERROR 3) or, once the default
    // limits delay the failures, a timeout: never a WELCOME.
    let attempts = r["flood"]["attempts"].as_object().expect("attempts");
    assert!(u(&r, "/errors/attack: ERROR 3") > 0, "{r}");
    assert!(
        attempts.values().filter_map(Value::as_u64).sum::<u64>() > 0,
        "{r}"
    );
    assert!(
        attempts
            .keys()
            .all(|k| k == "ERROR 3" || k.starts_with("no answer")),
        "{r}"
    );
    // Valid devices reconnected about 5 times a second each, and each time
    // got in (their errors would be counted without the `attack:` prefix).
    assert!(u(&r, "/flood/handshakes") >= 10, "{r}");
    let errors = r["errors"].as_object().expect("errors");
    assert!(errors.keys().all(|k| k.starts_with("attack: ")), "{r}");
    assert!(u(&r, "/flood/rss_max_kib") > 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_kind() {
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Devices with wrong tokens: refused at the handshake, every attempt.
    let file = dir.path().join("devices.txt");
    gw.add_device("real").await;
    std::fs::write(&file, "real not-its-token\n").unwrap();
    let (addr, file_s) = (gw.addr().to_string(), file.to_string_lossy().into_owned());
    let r = bench(
        dir.path(),
        &[
            "idle",
            "--addr",
            &addr,
            "--devices-file",
            &file_s,
            "--devices",
            "1",
            "--handshake-timeout",
            "1",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 0);
    assert!(
        u(&r, &format!("/errors/ERROR {}", code::AUTH_FAILED)) >= 1,
        "{r}"
    );

    // Nothing listening: connection refused.
    let port = free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let r = bench(
        dir.path(),
        &[
            "idle",
            "--protocol",
            "mqtt",
            "--addr",
            &addr,
            "--devices",
            "2",
            "--handshake-timeout",
            "1",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 0);
    assert!(u(&r, "/errors/connect: ConnectionRefused") >= 2, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_mode_measures_a_real_mosquitto() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let addr = broker.addr().to_string();
    let r = bench(
        dir.path(),
        &[
            "flat",
            "--protocol",
            "mqtt",
            "--addr",
            &addr,
            "--devices",
            "20",
            "--window",
            "16",
            "--warmup",
            "1",
            "--duration",
            "2",
        ],
    )
    .await;
    assert_eq!(r["protocol"], "mqtt");
    assert_eq!(u(&r, "/connected"), 20);
    assert!(u(&r, "/acked") > 0, "{r}");
    assert_eq!(u(&r, "/ack_us/count"), u(&r, "/acked"));
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_option_connects_through_a_real_tls_server_and_checks_its_certificate() {
    let (broker, ca) = Mosquitto::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let (addr, ca_s) = (broker.addr().to_string(), ca.to_string_lossy().into_owned());
    let r = bench(
        dir.path(),
        &[
            "flat",
            "--protocol",
            "mqtt",
            "--addr",
            &addr,
            "--tls",
            "--tls-ca",
            &ca_s,
            "--devices",
            "10",
            "--window",
            "16",
            "--warmup",
            "1",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 10);
    assert!(u(&r, "/acked") > 0, "{r}");
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");

    // A CA that did not sign the server's certificate: every handshake fails.
    let other = tempfile::tempdir().unwrap();
    support::mosquitto::dev_certs(other.path());
    let other_ca = other.path().join("ca.pem").to_string_lossy().into_owned();
    let r = bench(
        dir.path(),
        &[
            "idle",
            "--protocol",
            "mqtt",
            "--addr",
            &addr,
            "--tls",
            "--tls-ca",
            &other_ca,
            "--devices",
            "2",
            "--handshake-timeout",
            "1",
            "--duration",
            "1",
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 0);
    let errors = r["errors"].as_object().unwrap();
    assert!(errors.keys().any(|k| k.starts_with("tls: ")), "{r}");
}

/// More devices per process than it may open files: refused before any
/// connection, with what to do about it.
#[test]
fn more_devices_than_open_files_is_refused_before_connecting() {
    let out = std::process::Command::new("prlimit")
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_furrow"))
        .args([
            "bench",
            "idle",
            "--protocol",
            "mqtt",
            "--addr",
            "127.0.0.1:1",
            "--devices",
            "500",
            "--workers",
            "1",
            "--quiet",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("prlimit (util-linux) runs furrow bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ulimit -n") && err.contains("--workers"),
        "{err}"
    );
}

/// `--quic`: the devices reach the gateway's QUIC listener; a storm brings
/// them all back, resuming (0-RTT) with the tickets of their first
/// connection, and what was acknowledged is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_storm_brings_every_device_back_with_0rtt() {
    use support::pki::{quic_on, Pki};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "bench-quic");
    let gw = TestGateway::start_with(|c| {
        quic_on(c, &pki, false);
    })
    .await;
    let (addr, data, ca) = (
        gw.quic_addr().to_string(),
        gw.config().data_dir.to_string_lossy().into_owned(),
        pki.ca_file().to_string_lossy().into_owned(),
    );
    let r = bench(
        dir.path(),
        &[
            "storm",
            "--addr",
            &addr,
            "--data-dir",
            &data,
            "--quic",
            "--tls-ca",
            &ca,
            "--devices",
            "100",
            "--rate",
            "5",
            "--warmup",
            "1",
            "--duration",
            "30",
        ],
    )
    .await;
    assert_eq!(u(&r, "/connected"), 100, "{r}");
    assert_eq!(u(&r, "/storm/back"), 100, "{r}");
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
    assert!(
        r["addrs"][0].as_str().unwrap().starts_with("quic://"),
        "{r}"
    );
    let accepted = gw.counter("furrow_quic_0rtt_total", "accepted").await;
    assert!(
        accepted >= 100,
        "every device came back in 0-RTT: {accepted}"
    );
    for i in [0, 50, 99] {
        let seqs = stored_seqs_async(&gw.db_path(), &format!("bench-{i}")).await;
        assert!(!seqs.is_empty());
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    }
}
