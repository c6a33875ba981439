//! Limits (`ingress/limits.rs`): connections per instance, connect rate per
//! address (the PROXY header's behind a balancer), telemetry rate per
//! device (flow control, nothing dropped), and growing delays then bans
//! after failed authentications. Real sockets to a gateway in the test's
//! process; loopback source addresses 127.0.0.x stand for distinct peers.
//! The metrics recorder is per process and tests run side by side, so
//! counters are compared with "at least".

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use furrow_proto::Message;
use support::http::Api;
use support::*;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const BUSY: u16 = 8;

/// A connection from the loopback address `127.0.0.{last}`.
async fn connect_from(last: u8, to: SocketAddr) -> RawDevice {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::from([127, 0, 0, last]), 0))
        .unwrap();
    let stream: TcpStream = within(Duration::from_secs(10), "connect", sock.connect(to))
        .await
        .expect("connected");
    RawDevice::from_stream(stream)
}

/// The first frame the gateway sends after HELLO, raw, and that it then
/// closes (FIN or reset: a refusal may close before reading the HELLO).
async fn answer_to_hello(dev: &mut RawDevice, id: &str, token: &str) -> bytes::Bytes {
    // The gateway may already have closed: a failed write is fine.
    let _ = dev.try_send_raw(&encode(&hello_msg(id, token, 0))).await;
    let raw = dev.recv_raw().await;
    dev.reader.expect_closed().await;
    raw
}

fn error_code(raw: &bytes::Bytes) -> u16 {
    match parse(raw.clone()) {
        Message::Error(e) => e.code,
        other => panic!("expected ERROR, got {other:?}"),
    }
}

/// A counter's value in a /metrics page (0 if absent).
fn counter(page: &str, series: &str) -> f64 {
    let needle = format!("{series} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Tries to handshake from `127.0.0.{last}` until WELCOME, for at most `wait`.
async fn welcome_within(api: &Api, last: u8, id: &str, token: &str, wait: Duration) {
    let until = Instant::now() + wait;
    loop {
        let mut dev = connect_from(last, api.gw.addr()).await;
        let _ = dev.try_send_raw(&encode(&hello_msg(id, token, 0))).await;
        match dev.recv().await {
            Some(Message::Welcome(_)) => return,
            other if Instant::now() < until => {
                drop(other);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("no WELCOME within {wait:?}; last answer {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_a_new_connection_gets_busy() {
    let api = Api::start_with(|c| c.limits.max_connections = 3).await;
    let gw = &api.gw;
    let token = gw.add_device("d").await;
    let mut held = Vec::new();
    for i in 0..3 {
        let id = format!("held-{i}");
        let t = gw.add_device(&id).await;
        held.push(gw.connect_device(&id, &t).await.0);
    }
    // The fourth: ERROR BUSY at once, then closed; no session was built.
    let mut dev = RawDevice::connect(gw.addr()).await;
    let raw = answer_to_hello(&mut dev, "d", &token).await;
    assert_eq!(error_code(&raw), BUSY);
    assert!(!gw.registry().is_online("d"));
    // A place frees when a connection ends.
    drop(held.pop());
    welcome_within(&api, 1, "d", &token, Duration::from_secs(5)).await;
    let m = api.metrics().await;
    assert!(
        counter(
            &m,
            "furrow_connections_refused_total{reason=\"max_connections\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_is_per_source_address() {
    let api = Api::start_with(|c| {
        c.limits.connect_rate_per_ip = 1;
        c.limits.connect_burst_per_ip = 3;
    })
    .await;
    let gw = &api.gw;
    let token = gw.add_device("d").await;
    // The burst from 127.0.0.2 is welcomed...
    for _ in 0..3 {
        let mut dev = connect_from(2, gw.addr()).await;
        dev.hello("d", &token, 0).await;
    }
    // ...the next connection from it is BUSY...
    let mut dev = connect_from(2, gw.addr()).await;
    assert_eq!(
        error_code(&answer_to_hello(&mut dev, "d", &token).await),
        BUSY
    );
    // ...while another address is not limited by it.
    let mut other = connect_from(3, gw.addr()).await;
    other.hello("d", &token, 0).await;
    // A second later the address has a token again.
    welcome_within(&api, 2, "d", &token, Duration::from_secs(5)).await;
    let m = api.metrics().await;
    assert!(
        counter(
            &m,
            "furrow_connections_refused_total{reason=\"connect_rate\"}"
        ) >= 1.0,
        "{m}"
    );
}

/// A PROXY protocol v1 header claiming `src` as the device's address.
fn proxy_v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 40000 7700\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_balancer_the_connect_rate_is_per_proxied_address() {
    // Every connection comes from the balancer (127.0.0.1); the limit
    // applies to the address each PROXY header names.
    let api = Api::start_with(|c| {
        c.proxy_protocol.enabled = true;
        c.limits.connect_rate_per_ip = 1;
        c.limits.connect_burst_per_ip = 2;
    })
    .await;
    let gw = &api.gw;
    let token = gw.add_device("d").await;
    let hello = encode(&hello_msg("d", &token, 0));
    let via_balancer = |src: &'static str| {
        let mut bytes = proxy_v1(src);
        bytes.extend_from_slice(&hello);
        async move {
            let mut dev = RawDevice::connect(gw.addr()).await;
            let _ = dev.try_send_raw(&bytes).await;
            dev.recv().await
        }
    };
    for _ in 0..2 {
        let m = via_balancer("203.0.113.7").await;
        assert!(matches!(m, Some(Message::Welcome(_))), "{m:?}");
    }
    match via_balancer("203.0.113.7").await {
        Some(Message::Error(e)) => assert_eq!(e.code, BUSY),
        other => panic!("expected ERROR BUSY, got {other:?}"),
    }
    // Same balancer, another device address: welcomed.
    let m = via_balancer("203.0.113.8").await;
    assert!(matches!(m, Some(Message::Welcome(_))), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_beyond_the_rate_is_slowed_not_dropped() {
    // 50 frames a second, 50 at once. The device writes 300 frames at once
    // (more than its window would allow at this rate) with a keepalive of
    // 1 s: it is slowed by flow control, never cut off, and everything is
    // stored once in the end.
    let api = Api::start_with(|c| {
        c.limits.telemetry_rate_per_device = 50;
        c.limits.telemetry_burst_per_device = 50;
        c.limits.max_inflight = 1000;
        c.keepalive.min_s = 1;
        c.keepalive.default_s = 1;
        c.storage.synchronous = furrow::store::Synchronous::Normal;
    })
    .await;
    let gw = &api.gw;
    let token = gw.add_device("fast").await;
    let (mut dev, w) = gw.connect_device("fast", &token).await;
    assert_eq!(w.keepalive_s, 1);
    let started = Instant::now();
    dev.telemetry_batch(1..=300).await;
    tokio::time::sleep_until(started + Duration::from_secs(2)).await;
    let stored = stored_seqs_async(&gw.db_path(), "fast").await.len();
    // About 50 + 2 x 50 = 150 by now; 200 leaves room for a slow clock.
    assert!(
        stored < 200,
        "{stored} stored within 2 s at 50 a second (burst 50)"
    );
    // Everything is ACKed in the end: only ACKs on the way (no REJECT,
    // no ERROR, no close).
    let seen = within(Duration::from_secs(30), "all ACKed", dev.until_ack(300)).await;
    assert!(
        seen.iter().all(|m| matches!(m, Message::Ack { .. })),
        "{seen:?}"
    );
    let seqs = stored_seqs_async(&gw.db_path(), "fast").await;
    assert_seqs(&seqs, 1..=300, "throttled device");
    dev.ping(7).await;
    let m = api.metrics().await;
    assert!(
        counter(&m, "furrow_telemetry_throttled_total") >= 1.0,
        "{m}"
    );
    assert!(
        counter(&m, "furrow_telemetry_throttled_milliseconds_total") >= 1.0,
        "{m}"
    );
}

/// Failure thresholds small enough for a test: one free failure, then
/// 50 ms doubling to 100 ms; banned for 2 s at the fourth.
fn auth_limits(c: &mut furrow::Config) {
    c.limits.auth_failures_free = 1;
    c.limits.auth_delay_base_ms = 50;
    c.limits.auth_delay_max_ms = 100;
    c.limits.auth_ban_after = 4;
    c.limits.auth_ban_ms = 2_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_an_address_ban_it() {
    let api = Api::start_with(auth_limits).await;
    let gw = &api.gw;
    let token = gw.add_device("pump").await;
    // Four guesses at unknown ids from 127.0.0.2: the address is banned
    // (no one device id failed more than once).
    let mut answers = Vec::new();
    for i in 0..4 {
        let mut dev = connect_from(2, gw.addr()).await;
        answers.push(answer_to_hello(&mut dev, &format!("guess-{i}"), &"0".repeat(64)).await);
    }
    // Now even the right token is refused from there, with the same bytes.
    let mut dev = connect_from(2, gw.addr()).await;
    let banned = answer_to_hello(&mut dev, "pump", &token).await;
    assert_eq!(error_code(&banned), support::code::AUTH_FAILED);
    assert!(answers.iter().all(|a| *a == banned), "identical answers");
    // Another address is not affected.
    connect_from(3, gw.addr())
        .await
        .hello("pump", &token, 0)
        .await;
    // The ban expires (2 s).
    welcome_within(&api, 2, "pump", &token, Duration::from_secs(6)).await;
    let m = api.metrics().await;
    assert!(
        counter(&m, "furrow_auth_bans_total{scope=\"address\"}") >= 1.0,
        "{m}"
    );
    assert!(counter(&m, "furrow_auth_failures_total") >= 4.0, "{m}");
    assert!(counter(&m, "furrow_auth_delays_total") >= 3.0, "{m}");
    assert!(
        counter(&m, "furrow_auth_refused_banned_total") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_for_a_device_ban_it_from_everywhere() {
    let api = Api::start_with(auth_limits).await;
    let gw = &api.gw;
    let token = gw.add_device("pump").await;
    // Wrong tokens for one device, each from another address.
    for last in 2..6 {
        let mut dev = connect_from(last, gw.addr()).await;
        let raw = answer_to_hello(&mut dev, "pump", &"0".repeat(64)).await;
        assert_eq!(error_code(&raw), support::code::AUTH_FAILED);
    }
    // The right token, from a fresh address, is refused until the ban ends.
    let mut dev = connect_from(9, gw.addr()).await;
    let raw = answer_to_hello(&mut dev, "pump", &token).await;
    assert_eq!(error_code(&raw), support::code::AUTH_FAILED);
    // Other devices are not affected.
    let other = gw.add_device("other").await;
    connect_from(9, gw.addr())
        .await
        .hello("other", &other, 0)
        .await;
    welcome_within(&api, 9, "pump", &token, Duration::from_secs(6)).await;
    let m = api.metrics().await;
    assert!(
        counter(&m, "furrow_auth_bans_total{scope=\"device\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_device_and_wrong_token_get_the_same_answer_after_the_same_delay() {
    // Every failure is delayed 300 ms; no bans.
    let api = Api::start_with(|c| {
        c.limits.auth_failures_free = 0;
        c.limits.auth_delay_base_ms = 300;
        c.limits.auth_delay_max_ms = 300;
        c.limits.auth_ban_after = 0;
    })
    .await;
    let gw = &api.gw;
    let token = gw.add_device("pump").await;
    let timed = |id: &'static str, token: String| async move {
        let mut dev = RawDevice::connect(gw.addr()).await;
        let started = Instant::now();
        dev.send(&hello_msg(id, &token, 0)).await;
        let raw = dev.recv_raw().await;
        let took = started.elapsed();
        dev.expect_eof().await;
        (raw, took)
    };
    let (unknown, t_unknown) = timed("nobody", token.clone()).await;
    let (wrong, t_wrong) = timed("pump", "0".repeat(64)).await;
    assert_eq!(unknown, wrong, "byte-identical answers");
    assert_eq!(error_code(&unknown), support::code::AUTH_FAILED);
    let delay = Duration::from_millis(300);
    assert!(
        t_unknown >= delay,
        "unknown device answered after {t_unknown:?}"
    );
    assert!(t_wrong >= delay, "wrong token answered after {t_wrong:?}");
    // The right token still opens the device (no bans here).
    gw.connect_device("pump", &token).await.0.ping(1).await;
}
