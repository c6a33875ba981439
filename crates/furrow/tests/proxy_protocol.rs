//! PROXY protocol on the device listener, end to end over loopback: a
//! header (v2 as HAProxy's `send-proxy-v2` writes it, or v1) and then a
//! real furrow/1 session; the peer the API shows is the header's. Refusals:
//! an untrusted balancer, a missing header, a header that never completes.
//!
//! The addresses inside the headers (documentation ranges) are only data:
//! every socket is on 127.0.0.1.

mod support;

use std::time::Duration;

use support::http::Api;
use support::*;

/// A v2 PROXY header (command PROXY, TCP over IPv4) from `src:sport`.
fn v2_header(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&7700u16.to_be_bytes());
    h
}

/// A v2 LOCAL header: the balancer's own connection (a health check).
fn v2_local() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

/// Connects, sends `header` then HELLO (in separate writes unless
/// `together`), and returns the device after WELCOME.
async fn through_header(
    api: &Api,
    header: &[u8],
    together: bool,
    id: &str,
    token: &str,
) -> RawDevice {
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    let hello = encode(&hello_msg(id, token, 0));
    if together {
        dev.send_raw(&[header, &hello[..]].concat()).await;
    } else {
        dev.send_raw(header).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        dev.send_raw(&hello).await;
    }
    dev.expect_welcome().await;
    dev
}

/// The `peer` the API reports for a connected device.
async fn api_peer(api: &Api, id: &str) -> String {
    let (status, d) = api.get(&format!("/v1/devices/{id}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["online"], true, "{d}");
    d["peer"].as_str().expect("peer").to_owned()
}

/// The value of `furrow_proxy_headers_total{outcome="..."}` (0 if absent).
/// The recorder is per process and tests run side by side, so callers
/// compare with at least, never exactly.
fn proxy_count(metrics: &str, outcome: &str) -> u64 {
    let needle = format!("furrow_proxy_headers_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().expect("a counter value"))
}

/// Asserts that the gateway closes the connection without sending a frame.
async fn expect_refused(dev: &mut RawDevice) {
    match dev.reader.next_event(Duration::from_secs(5)).await {
        Event::Eof | Event::Reset(_) => {}
        other => panic!("expected the connection to be closed without a word, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_address_becomes_the_peer() {
    init_test_logs();
    let api = Api::start_with(|c| c.proxy_protocol.enabled = true).await;

    // v2 as HAProxy sends it, then a session that stores telemetry.
    let token = api.gw.add_device("behind-v2").await;
    let mut dev = through_header(
        &api,
        &v2_header([203, 0, 113, 7], 51234),
        false,
        "behind-v2",
        &token,
    )
    .await;
    dev.telemetry(1, r#"{"t":1}"#).await;
    dev.until_ack(1).await;
    assert_eq!(api_peer(&api, "behind-v2").await, "203.0.113.7:51234");
    assert_seqs(
        &stored_seqs_async(&api.gw.db_path(), "behind-v2").await,
        [1],
        "stored",
    );

    // Header and HELLO in one segment: the HELLO's bytes are not lost.
    let token = api.gw.add_device("behind-v2-one-write").await;
    let _dev2 = through_header(
        &api,
        &v2_header([198, 51, 100, 20], 4000),
        true,
        "behind-v2-one-write",
        &token,
    )
    .await;
    assert_eq!(
        api_peer(&api, "behind-v2-one-write").await,
        "198.51.100.20:4000"
    );

    // v1, IPv6.
    let token = api.gw.add_device("behind-v1").await;
    let v1 = b"PROXY TCP6 2001:db8::42 ::1 40000 7700\r\n";
    let _dev3 = through_header(&api, v1, false, "behind-v1", &token).await;
    assert_eq!(api_peer(&api, "behind-v1").await, "[2001:db8::42]:40000");

    // v2 LOCAL keeps the TCP peer.
    let token = api.gw.add_device("local").await;
    let _dev4 = through_header(&api, &v2_local(), true, "local", &token).await;
    let peer = api_peer(&api, "local").await;
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");

    let m = api.metrics().await;
    assert!(proxy_count(&m, "proxied") >= 3, "{m}");
    assert!(proxy_count(&m, "local") >= 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_balancer_is_refused_even_with_a_valid_header() {
    init_test_logs();
    // 127.0.0.1 is outside the trusted network.
    let api = Api::start_with(|c| {
        c.proxy_protocol.enabled = true;
        c.proxy_protocol.trusted = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    let token = api.gw.add_device("spoofed").await;
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    let bytes = [
        v2_header([203, 0, 113, 9], 1),
        encode(&hello_msg("spoofed", &token, 0)),
    ]
    .concat();
    // The gateway may have closed already: a failed write is fine.
    let _ = dev.try_send_raw(&bytes).await;
    expect_refused(&mut dev).await;
    let (status, d) = api.get("/v1/devices/spoofed").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["online"], false, "{d}");
    assert!(proxy_count(&api.metrics().await, "untrusted") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unfinished_header_is_refused() {
    init_test_logs();
    let api = Api::start_with(|c| {
        c.proxy_protocol.enabled = true;
        c.proxy_protocol.header_timeout_ms = 300;
    })
    .await;
    let token = api.gw.add_device("direct").await;

    // A device that connects straight to the gateway: HELLO, no header.
    let mut dev = RawDevice::connect(api.gw.addr()).await;
    let _ = dev
        .try_send_raw(&encode(&hello_msg("direct", &token, 0)))
        .await;
    expect_refused(&mut dev).await;

    // Half a header, then silence: closed at the header deadline, well
    // before the handshake's.
    let mut slow = RawDevice::connect(api.gw.addr()).await;
    let started = tokio::time::Instant::now();
    slow.send_raw(&v2_header([203, 0, 113, 1], 1)[..10]).await;
    expect_refused(&mut slow).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "closed after {took:?} with a 300 ms header deadline"
    );

    // Garbage of the right length.
    let mut junk = RawDevice::connect(api.gw.addr()).await;
    let _ = junk.try_send_raw(&[0x55; 64]).await;
    expect_refused(&mut junk).await;

    let m = api.metrics().await;
    assert!(proxy_count(&m, "invalid") >= 2, "{m}");
    assert!(proxy_count(&m, "timeout") >= 1, "{m}");
    let (_, d) = api.get("/v1/devices/direct").await;
    assert_eq!(d["online"], false, "{d}");

    // The same gateway still serves a device that comes through a header.
    let _ok = through_header(&api, &v2_header([192, 0, 2, 77], 9), true, "direct", &token).await;
    assert_eq!(api_peer(&api, "direct").await, "192.0.2.77:9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_deadline_bounds_the_header_too() {
    // The header may take 3 s by default; the whole handshake only 300 ms.
    let api = Api::start_with(|c| {
        c.proxy_protocol.enabled = true;
        c.limits.handshake_timeout_ms = 300;
    })
    .await;
    let mut slow = RawDevice::connect(api.gw.addr()).await;
    let started = tokio::time::Instant::now();
    slow.send_raw(b"PROXY TCP4 ").await;
    expect_refused(&mut slow).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2_000),
        "closed after {took:?} with a 300 ms handshake deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_real_haproxy_the_peer_is_the_device() {
    init_test_logs();
    let api = Api::start_with(|c| c.proxy_protocol.enabled = true).await;
    let api_port = api.gw.api_url("").rsplit(':').next().unwrap().to_owned();
    let front = free_port();
    // A real HAProxy (`send-proxy-v2`, health checks on /readyz, as in
    // deploy/haproxy/haproxy.cfg) on loopback, in front of the gateway.
    let _haproxy = support::haproxy::Haproxy::start(&format!(
        "global\n    maxconn 100\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
         frontend devices\n    bind 127.0.0.1:{front}\n    default_backend gateways\n\
         backend gateways\n    balance leastconn\n    option httpchk\n\
         \x20   http-check send meth GET uri /readyz\n    http-check expect status 200\n\
         \x20   server gw {gw} send-proxy-v2 check port {api_port} inter 200ms rise 1 fall 1\n",
        gw = api.gw.addr(),
    ));
    let front: std::net::SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let token = api.gw.add_device("via-haproxy").await;

    // Until HAProxy listens and forwards (bounded).
    let started = tokio::time::Instant::now();
    let (mut dev, local) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no WELCOME through HAProxy within 15 s"
        );
        let Ok(stream) = tokio::net::TcpStream::connect(front).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let local = stream.local_addr().unwrap();
        let mut dev = RawDevice::from_stream(stream);
        if dev
            .try_send_raw(&encode(&hello_msg("via-haproxy", &token, 0)))
            .await
            .is_err()
        {
            continue;
        }
        match dev.reader.next_event(Duration::from_secs(5)).await {
            Event::Msg(furrow_proto::Message::Welcome(_)) => break (dev, local),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    dev.telemetry(1, r#"{"t":1}"#).await;
    dev.until_ack(1).await;
    // The device's own address and port, not HAProxy's outgoing one.
    assert_eq!(api_peer(&api, "via-haproxy").await, local.to_string());
}
