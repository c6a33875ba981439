//! Limits (`ingress/limits.rs`): connections per instance, connect rate per
//! address (the PROXY header's behind a balancer), telemetry rate per
//! device (flow control, nothing dropped), and growing delays after failed
//! authentications that never keep out a device with valid credentials. Real sockets to a gateway in the test's
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

/// Failure delays long enough to tell a delayed answer from a prompt one,
/// and for a test to see its failures waiting at once: one free failure,
/// then 2 s doubling to 4 s.
fn auth_limits(c: &mut furrow::Config) {
    c.limits.auth_failures_free = 1;
    c.limits.auth_delay_base_ms = 2_000;
    c.limits.auth_delay_max_ms = 4_000;
}

/// Any answer slower than this was delayed (the base delay is 2 s).
const PROMPT: Duration = Duration::from_secs(1);

/// HELLO with a wrong token from `127.0.0.{last}`; the answer, raw, and
/// how long it took.
async fn timed_answer(to: SocketAddr, last: u8, id: String) -> (bytes::Bytes, Duration) {
    let mut dev = connect_from(last, to).await;
    let started = Instant::now();
    let raw = answer_to_hello(&mut dev, &id, &"0".repeat(64)).await;
    (raw, started.elapsed())
}

/// HELLO with valid credentials from `127.0.0.{last}`: WELCOME, promptly.
async fn welcomed_at_once(to: SocketAddr, last: u8, id: &str, token: &str) {
    let mut dev = connect_from(last, to).await;
    let started = Instant::now();
    dev.send(&hello_msg(id, token, 0)).await;
    match dev.recv().await {
        Some(Message::Welcome(_)) => {}
        other => panic!("{id} with its token from 127.0.0.{last}: {other:?}"),
    }
    let took = started.elapsed();
    assert!(took < PROMPT, "{id} was welcomed only after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_for_a_device_from_many_addresses_do_not_keep_it_out() {
    let api = Api::start_with(auth_limits).await;
    let gw = &api.gw;
    let token = gw.add_device("pump-1").await;
    let addr = gw.addr();
    // Forty wrong tokens for pump-1, each from its own address, all at
    // once: past the first, each answer is held for its delay.
    let attackers: Vec<_> = (2..42u8)
        .map(|last| tokio::spawn(timed_answer(addr, last, "pump-1".into())))
        .collect();
    wait_delayed(gw, 39).await;
    // The real pump-1, from another address and from one of theirs, is
    // welcomed at once, while the guesses are still waiting.
    welcomed_at_once(addr, 60, "pump-1", &token).await;
    welcomed_at_once(addr, 7, "pump-1", &token).await;
    let mut delayed = 0;
    for a in attackers {
        let (raw, took) = a.await.unwrap();
        assert_eq!(error_code(&raw), support::code::AUTH_FAILED);
        delayed += usize::from(took >= PROMPT);
    }
    assert!(delayed >= 30, "only {delayed} of 40 failures were delayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_failing_from_a_shared_address_does_not_keep_the_others_out() {
    let api = Api::start_with(auth_limits).await;
    let gw = &api.gw;
    let token = gw.add_device("pump").await;
    let addr = gw.addr();
    // Thirty HELLOs for unknown device ids from 127.0.0.2 (a site's router,
    // a carrier NAT), all at once.
    let neighbour: Vec<_> = (0..30)
        .map(|i| tokio::spawn(timed_answer(addr, 2, format!("gone-{i}"))))
        .collect();
    wait_delayed(gw, 29).await;
    // A real device behind the same address gets in at once.
    welcomed_at_once(addr, 2, "pump", &token).await;
    for n in neighbour {
        let (raw, _) = n.await.unwrap();
        assert_eq!(error_code(&raw), support::code::AUTH_FAILED);
    }
    // The failing side still pays: its next failure waits.
    let (raw, took) = timed_answer(addr, 2, "gone-again".into()).await;
    assert_eq!(error_code(&raw), support::code::AUTH_FAILED);
    assert!(
        took >= PROMPT,
        "a failure after 30 was answered in {took:?}"
    );
    let m = api.metrics().await;
    assert!(counter(&m, "furrow_auth_delays_total") >= 29.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_tokens_holds_at_most_auth_delayed_max_answers() {
    let api = Api::start_with(|c| {
        auth_limits(c);
        c.limits.auth_delayed_max = 4;
    })
    .await;
    let gw = &api.gw;
    let token = gw.add_device("pump").await;
    let addr = gw.addr();
    let flood: Vec<_> = (0..60u8)
        .map(|i| tokio::spawn(timed_answer(addr, 2 + i % 20, "pump".into())))
        .collect();
    // While it lasts, never more than 4 answers wait.
    let limits = gw.limits();
    let sample = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(limits.delayed_now());
            if peak > 4 {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    welcomed_at_once(addr, 3, "pump", &token).await;
    let mut prompt = 0;
    for f in flood {
        let (raw, took) = f.await.unwrap();
        assert_eq!(error_code(&raw), support::code::AUTH_FAILED);
        prompt += usize::from(took < PROMPT);
    }
    assert!(!sample.is_finished(), "more than 4 answers waited at once");
    sample.abort();
    assert!(prompt >= 50, "only {prompt} of 60 were answered at once");
    let m = api.metrics().await;
    assert!(
        counter(&m, "furrow_auth_delays_skipped_total") >= 50.0,
        "{m}"
    );
    wait_delayed(gw, 0).await;
}

/// Waits (at most 10 s) until `n` failed answers wait out their delay in
/// this gateway (at least `n`; exactly none for 0).
async fn wait_delayed(gw: &TestGateway, n: usize) {
    let limits = gw.limits();
    let until = Instant::now() + Duration::from_secs(10);
    while (n == 0 && limits.delayed_now() > 0) || limits.delayed_now() < n {
        assert!(
            Instant::now() < until,
            "{} answers wait, not {n}",
            limits.delayed_now()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_device_and_wrong_token_get_the_same_answer_after_the_same_delay() {
    // Every failure is delayed 300 ms.
    let api = Api::start_with(|c| {
        c.limits.auth_failures_free = 0;
        c.limits.auth_delay_base_ms = 300;
        c.limits.auth_delay_max_ms = 300;
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
    // The right token still opens the device.
    gw.connect_device("pump", &token).await.0.ping(1).await;
}
