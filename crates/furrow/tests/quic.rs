//! furrow/1 over QUIC (`quic.listen`): a device on a quinn client opens
//! one bidirectional stream and speaks furrow/1 on it unchanged. Telemetry
//! is stored once and acknowledged; the ALPN and mutual TLS are enforced;
//! a device whose UDP address changes mid-stream keeps its session (no new
//! HELLO, nothing lost or stored twice); shutdown says GOODBYE; commands
//! make the round trip. 0-RTT: a resumed device's first TELEMETRY is ACKed
//! one round trip after it began, and a replayed 0-RTT flight is refused.
//! Through a UDP proxy that drops and reorders datagrams, the SDK's
//! readings are stored exactly once.

mod support;
#[path = "support/udp_proxy.rs"]
mod udp_proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use furrow::certs::Issued;
use furrow_proto::{FrameDecoder, Message};
use support::pki::{client_config, quic_on, Pki};
use support::*;
use udp_proxy::{UdpFaults, UdpProxy};

/// A quinn client configuration trusting `pki`, offering `alpn`.
fn quic_client(pki: &Pki, cert: Option<&Issued>, alpn: &[u8]) -> quinn::ClientConfig {
    quic_client_with(pki, cert, alpn, false)
}

/// Like [`quic_client`], with 0-RTT on (rustls keeps the tickets in the
/// configuration, so every connection made with a clone of it may resume).
fn quic_client_0rtt(pki: &Pki) -> quinn::ClientConfig {
    quic_client_with(pki, None, b"furrow/1", true)
}

fn quic_client_with(
    pki: &Pki,
    cert: Option<&Issued>,
    alpn: &[u8],
    early_data: bool,
) -> quinn::ClientConfig {
    let mut tls = (*client_config(pki, cert)).clone();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.enable_early_data = early_data;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a TLS 1.3 client");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// An SDK configuration for `id` over QUIC to `port` on localhost,
/// trusting `pki`, reconnecting after 50 ms.
fn sdk_config(port: u16, id: &str, token: String, pki: &Pki) -> furrow_client::Config {
    let mut cfg = furrow_client::Config::new(format!("quic://localhost:{port}"), id, token);
    cfg.tls = Some(furrow_client::TlsOptions::new(pki.ca_file()));
    cfg.backoff.initial = Duration::from_millis(50);
    cfg
}

/// A gateway with TLS and QUIC on loopback.
async fn gateway(pki: &Pki, mutual: bool) -> TestGateway {
    TestGateway::start_with(|c| {
        quic_on(c, pki, mutual);
    })
    .await
}

/// A device on a QUIC connection's one stream.
struct QuicDevice {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl QuicDevice {
    /// Connects from `bind` (a local UDP address).
    async fn connect(
        to: SocketAddr,
        cfg: quinn::ClientConfig,
        bind: &str,
    ) -> Result<Self, quinn::ConnectionError> {
        let mut endpoint = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
        endpoint.set_default_client_config(cfg);
        let connecting = endpoint.connect(to, "localhost").unwrap();
        let conn = within(Duration::from_secs(10), "QUIC handshake", connecting).await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            endpoint,
            conn,
            send,
            recv,
            buf: BytesMut::new(),
        })
    }

    /// Connects with 0-RTT: Err if the configuration holds no ticket for
    /// the gateway. The future says, once the handshake is over, whether
    /// the gateway took the early data.
    async fn connect_0rtt(
        to: SocketAddr,
        cfg: quinn::ClientConfig,
    ) -> Result<(Self, quinn::ZeroRttAccepted), &'static str> {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(cfg);
        let connecting = endpoint.connect(to, "localhost").unwrap();
        let (conn, accepted) = connecting.into_0rtt().map_err(|_| "no 0-RTT ticket")?;
        let (send, recv) = conn.open_bi().await.map_err(|_| "open_bi")?;
        Ok((
            Self {
                endpoint,
                conn,
                send,
                recv,
                buf: BytesMut::new(),
            },
            accepted,
        ))
    }

    /// Ends the stream and the connection, and waits until the gateway
    /// has seen the close.
    async fn close(self) {
        let mut send = self.send;
        let _ = send.finish();
        self.conn.close(0u8.into(), b"");
        within(
            Duration::from_secs(5),
            "QUIC close",
            self.endpoint.wait_idle(),
        )
        .await;
    }

    /// A device on `gw`, trusting `pki`, offering ALPN `furrow/1`.
    async fn open(gw: &TestGateway, pki: &Pki) -> Self {
        let cfg = quic_client(pki, None, b"furrow/1");
        Self::connect(gw.quic_addr(), cfg, "127.0.0.1:0")
            .await
            .expect("a QUIC connection")
    }

    async fn send(&mut self, m: &Message) {
        self.send.write_all(&encode(m)).await.expect("stream write");
    }

    /// The next message, or None when the gateway ended the stream.
    async fn recv(&mut self) -> Option<Message> {
        let dec = FrameDecoder::new(1 << 20);
        loop {
            if let Some(f) = dec.decode(&mut self.buf).expect("a valid frame") {
                return Some(Message::from_frame(f).expect("a valid message"));
            }
            let chunk = within(
                RECV_TIMEOUT,
                "a message over QUIC",
                self.recv.read_chunk(64 * 1024, true),
            )
            .await
            .ok()??;
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }

    async fn hello(&mut self, id: &str, token: &str) -> Message {
        self.send(&hello_msg(id, token, 30)).await;
        self.recv().await.expect("an answer to HELLO")
    }

    /// Reads until ACK `seq`; every message on the way is an ACK.
    async fn until_ack(&mut self, seq: u64) {
        loop {
            match self.recv().await {
                Some(Message::Ack { seq: n }) if n >= seq => return,
                Some(Message::Ack { .. }) => {}
                other => panic!("waiting for ACK {seq}, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn telemetry_over_quic_is_stored_once_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "quic");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("pump-q").await;

    let mut d = QuicDevice::open(&gw, &pki).await;
    match d.hello("pump-q", &token).await {
        Message::Welcome(w) => assert_eq!(w.last_seq, 0),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    gw.wait_online("pump-q").await;
    for seq in 1..=200 {
        d.send(&telemetry_msg(seq, 1, &json_payload(seq))).await;
    }
    d.until_ack(200).await;
    assert_seqs(
        &stored_seqs_async(&gw.db_path(), "pump-q").await,
        1..=200,
        "over QUIC",
    );

    // The session is the same as over TCP: a second connection takes over,
    // told by WELCOME where to resume.
    let mut again = QuicDevice::open(&gw, &pki).await;
    match again.hello("pump-q", &token).await {
        Message::Welcome(w) => assert_eq!(w.last_seq, 200),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    match d.recv().await {
        Some(Message::Goodbye(g)) => assert_eq!(g.code, goodbye::SESSION_TAKEN_OVER),
        other => panic!("the first session is taken over, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_without_the_furrow_alpn_or_a_wrong_token_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "alpn");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("pump-a").await;

    let r = QuicDevice::connect(
        gw.quic_addr(),
        quic_client(&pki, None, b"h3"),
        "127.0.0.1:0",
    )
    .await;
    assert!(r.is_err(), "another ALPN is refused in the handshake");

    let mut d = QuicDevice::open(&gw, &pki).await;
    match d.hello("pump-a", &format!("{token}x")).await {
        Message::Error(e) => assert_eq!(e.code, code::AUTH_FAILED),
        other => panic!("expected ERROR AUTH_FAILED, got {other:?}"),
    }
    assert!(d.recv().await.is_none(), "then the stream ends");
}

#[tokio::test]
async fn mutual_tls_over_quic_names_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "mtls");
    let gw = gateway(&pki, true).await;
    gw.add_device("meter-1").await;
    gw.add_device("meter-2").await;
    let cert = pki.ca.device("meter-1", 30).unwrap();

    // Its certificate, an empty token: in.
    let mut d = QuicDevice::connect(
        gw.quic_addr(),
        quic_client(&pki, Some(&cert), b"furrow/1"),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    assert!(matches!(d.hello("meter-1", "").await, Message::Welcome(_)));
    // The same certificate for another device: refused.
    let mut other = QuicDevice::connect(
        gw.quic_addr(),
        quic_client(&pki, Some(&cert), b"furrow/1"),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    match other.hello("meter-2", "").await {
        Message::Error(e) => assert_eq!(e.code, code::AUTH_FAILED),
        other => panic!("expected ERROR AUTH_FAILED, got {other:?}"),
    }
    // No certificate at all: the handshake fails.
    let none = QuicDevice::connect(
        gw.quic_addr(),
        quic_client(&pki, None, b"furrow/1"),
        "127.0.0.1:0",
    )
    .await;
    match none {
        Err(_) => {}
        // TLS 1.3: the client may finish before the server's verdict;
        // then the stream gets nothing.
        Ok(mut d) => {
            d.send(&hello_msg("meter-2", "", 30)).await;
            assert!(d.recv().await.is_none(), "no session without a certificate");
        }
    }
}

#[tokio::test]
async fn a_device_whose_address_changes_keeps_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "migrate");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("tracker-1").await;
    let mut d = QuicDevice::open(&gw, &pki).await;
    assert!(matches!(
        d.hello("tracker-1", &token).await,
        Message::Welcome(_)
    ));
    for seq in 1..=100 {
        d.send(&telemetry_msg(seq, 1, &json_payload(seq))).await;
    }
    d.until_ack(100).await;
    let before = gw.registry().handle("tracker-1").expect("online").id();

    // The modem moves: a new local address (127.0.0.2), same connection.
    let old = d.endpoint.local_addr().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    d.endpoint.rebind(socket).unwrap();
    assert_ne!(d.endpoint.local_addr().unwrap(), old);
    for seq in 101..=200 {
        d.send(&telemetry_msg(seq, 1, &json_payload(seq))).await;
    }
    d.until_ack(200).await;
    assert_seqs(
        &stored_seqs_async(&gw.db_path(), "tracker-1").await,
        1..=200,
        "across the address change",
    );
    let after = gw.registry().handle("tracker-1").expect("still online");
    assert_eq!(after.id(), before, "the same session: no new HELLO");
    let peer = gw.registry().info("tracker-1").expect("online").peer;
    assert_eq!(
        peer.ip().to_string(),
        "127.0.0.2",
        "the registry shows the new address"
    );
    assert_eq!(d.conn.remote_address(), gw.quic_addr());
}

#[tokio::test]
async fn shutdown_says_goodbye_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "bye");
    let mut gw = gateway(&pki, false).await;
    let token = gw.add_device("valve-q").await;
    let mut d = QuicDevice::open(&gw, &pki).await;
    assert!(matches!(
        d.hello("valve-q", &token).await,
        Message::Welcome(_)
    ));
    d.send(&telemetry_msg(1, 1, &json_payload(1))).await;
    d.until_ack(1).await;
    let (stop, reader) = tokio::join!(gw.shutdown(), d.recv());
    // As quick as over TCP (tests/shutdown.rs): nothing holds the drain.
    assert!(stop < Duration::from_secs(3), "shutdown took {stop:?}");
    match reader {
        Some(Message::Goodbye(g)) => assert_eq!(g.code, goodbye::SERVER_SHUTDOWN),
        other => panic!("expected GOODBYE SERVER_SHUTDOWN, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_streams_over_quic_and_loses_nothing_across_a_reconnect() {
    use furrow::store::TelemetryRange;
    use furrow_client::Client;

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "sdk");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("sdk-q").await;
    let cfg = sdk_config(gw.quic_addr().port(), "sdk-q", token, &pki);
    let client = Client::start(cfg.clone()).unwrap();
    let mut events = client.events();
    for i in 1..=150u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    // The gateway drops the session: the SDK reconnects over QUIC and
    // resends what was not acknowledged. (The gateway stores and
    // acknowledges what reaches it before its GOODBYE, so how much of
    // 151..=300 travels again depends on timing; the reconnect does not.)
    let first = gw.registry().handle("sdk-q").expect("online").id();
    assert!(gw
        .registry()
        .kick("sdk-q", furrow_proto::GoodbyeCode::SessionTakenOver));
    for i in 151..=300u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(20), "flush", client.flush())
        .await
        .unwrap();
    within(
        Duration::from_secs(10),
        "the SDK's reconnect",
        until_reconnected(&mut events),
    )
    .await;
    let rows = gw
        .store()
        .telemetry("sdk-q", TelemetryRange::default(), 1000)
        .await
        .unwrap();
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    assert_seqs(&seqs, 1..=300, "the SDK over QUIC");
    let second = gw.registry().handle("sdk-q").expect("online again").id();
    assert_ne!(first, second, "the SDK reconnected");
    client.close().await;

    // quic:// needs the gateway's CA.
    let mut bare = cfg;
    bare.tls = None;
    assert!(matches!(
        Client::start(bare),
        Err(furrow_client::ClientError::Tls(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_make_the_round_trip_over_quic() {
    use support::http::Api;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cmd");
    let api = Api::start_with(|c| {
        quic_on(c, &pki, false);
    })
    .await;
    let token = api.gw.add_device("pump-cmd").await;
    let mut d = QuicDevice::open(&api.gw, &pki).await;
    assert!(matches!(
        d.hello("pump-cmd", &token).await,
        Message::Welcome(_)
    ));
    api.gw.wait_online("pump-cmd").await;
    let (st, v) = api
        .post(
            "/v1/devices/pump-cmd/commands",
            serde_json::json!({"name": "open_valve", "payload": {"pct": 40}}),
        )
        .await;
    assert_eq!(st, reqwest::StatusCode::CREATED, "{v}");
    let id = v["command_id"].as_u64().unwrap();
    let cmd = match d.recv().await {
        Some(Message::Command(c)) => c,
        other => panic!("expected COMMAND, got {other:?}"),
    };
    assert_eq!(cmd.command_id, id);
    assert_eq!(cmd.name.as_str(), "open_valve");
    d.send(&command_result_msg(
        id,
        furrow_proto::CommandStatus::Succeeded,
    ))
    .await;
    within(Duration::from_secs(10), "the command succeeds", async {
        loop {
            let (_, v) = api.get(&format!("/v1/commands/{id}")).await;
            if v["state"] == "succeeded" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Until the SDK's events show a session end and then a new session.
async fn until_reconnected(events: &mut tokio::sync::broadcast::Receiver<furrow_client::Event>) {
    use furrow_client::Event;
    let mut ended = false;
    loop {
        match events.recv().await.expect("the client's events") {
            Event::Disconnected { .. } => ended = true,
            Event::Connected { .. } if ended => return,
            _ => {}
        }
    }
}

/// One round trip through the proxy in the 0-RTT tests: long beside what
/// the gateway spends on a frame, so the count of round trips shows.
const RTT: Duration = Duration::from_millis(300);

/// A device connects once in full (and is given a ticket), then comes back
/// through a proxy that delays each way by RTT/2 and holds its later
/// flights back for seconds: with 0-RTT its HELLO and first TELEMETRY
/// travel in its first flight, and the WELCOME and the ACK come back
/// before any later flight reached the gateway, one round trip after it
/// began. Without a ticket the same
/// takes at least two (the handshake, then the data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_device_has_its_first_ack_within_one_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "zrtt");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("cell-1").await;
    let cfg = quic_client_0rtt(&pki);

    let mut d = QuicDevice::connect(gw.quic_addr(), cfg.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    assert!(matches!(
        d.hello("cell-1", &token).await,
        Message::Welcome(_)
    ));
    d.send(&telemetry_msg(1, 1, &json_payload(1))).await;
    d.until_ack(1).await;
    d.close().await;
    gw.wait_offline("cell-1").await;

    // The device's later flights (its handshake's completion among them)
    // reach the gateway only after LATER: the WELCOME and the ACK that
    // arrive before were sent on the first flight alone, one round trip
    // (a bound of 1.5 round trips on the elapsed time failed a loaded CI
    // run: 925 ms; LATER leaves the gateway seconds to commit).
    const LATER: Duration = Duration::from_secs(5);
    let proxy = UdpProxy::start(
        gw.quic_addr(),
        UdpFaults {
            one_way: RTT / 2,
            later_flights: LATER,
            ..UdpFaults::default()
        },
    )
    .await;
    let accepted_before = gw.counter("furrow_quic_0rtt_total", "accepted").await;
    let began = tokio::time::Instant::now();
    let (mut d, accepted) = QuicDevice::connect_0rtt(proxy.addr, cfg.clone())
        .await
        .expect("the first connection left a ticket");
    d.send(&hello_msg("cell-1", &token, 30)).await;
    d.send(&telemetry_msg(2, 1, &json_payload(2))).await;
    match d.recv().await {
        Some(Message::Welcome(w)) => assert_eq!(w.last_seq, 1),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    d.until_ack(2).await;
    let first_ack = began.elapsed();
    println!(
        "0-RTT: first ACK after {first_ack:?} (one round trip: {RTT:?}); {} later datagrams held",
        proxy.held()
    );
    assert!(
        gw.counter("furrow_quic_0rtt_total", "accepted").await > accepted_before,
        "the gateway took the 0-RTT data"
    );
    assert!(
        first_ack < RTT / 2 + LATER,
        "first ACK after {first_ack:?}: only once the device's later flights arrived"
    );
    assert!(accepted.await, "the device saw its early data taken");
    drop(d);
    drop(proxy);

    // Without a ticket: a round trip for the handshake, one for the data.
    let proxy = UdpProxy::start(
        gw.quic_addr(),
        UdpFaults {
            one_way: RTT / 2,
            ..UdpFaults::default()
        },
    )
    .await;
    let began = tokio::time::Instant::now();
    let mut d = QuicDevice::connect(
        proxy.addr,
        quic_client(&pki, None, b"furrow/1"),
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    d.send(&hello_msg("cell-1", &token, 30)).await;
    d.send(&telemetry_msg(3, 1, &json_payload(3))).await;
    assert!(matches!(d.recv().await, Some(Message::Welcome(_))));
    d.until_ack(3).await;
    let full = began.elapsed();
    assert!(
        full >= RTT * 2,
        "a full handshake's first ACK after {full:?}"
    );
    assert_seqs(
        &stored_seqs_async(&gw.db_path(), "cell-1").await,
        1..=3,
        "with and without 0-RTT",
    );
}

/// An attacker who captured a device's 0-RTT flight sends it again, from
/// another address, after the device is done: the ticket was used, the
/// gateway refuses the early data, and nothing happens (no session, no
/// row). Had the gateway taken it, the seqs in it are stored already and
/// would not be stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_0rtt_flight_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "replay");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("cell-2").await;
    let cfg = quic_client_0rtt(&pki);

    let mut d = QuicDevice::connect(gw.quic_addr(), cfg.clone(), "127.0.0.1:0")
        .await
        .unwrap();
    assert!(matches!(
        d.hello("cell-2", &token).await,
        Message::Welcome(_)
    ));
    d.close().await;
    gw.wait_offline("cell-2").await;

    // A delay, so that the whole first flight (the 0-RTT data too) is out
    // before the gateway's first answer and the proxy records all of it.
    let faults = UdpFaults {
        one_way: Duration::from_millis(50),
        ..UdpFaults::default()
    };
    let proxy = UdpProxy::start(gw.quic_addr(), faults).await;
    let (mut d, accepted) = QuicDevice::connect_0rtt(proxy.addr, cfg.clone())
        .await
        .expect("a ticket");
    d.send(&hello_msg("cell-2", &token, 30)).await;
    for seq in 1..=5 {
        d.send(&telemetry_msg(seq, 1, &json_payload(seq))).await;
    }
    assert!(matches!(d.recv().await, Some(Message::Welcome(_))));
    d.until_ack(5).await;
    assert!(accepted.await, "the 0-RTT data was taken");
    d.close().await;
    gw.wait_offline("cell-2").await;

    let rejected = gw.counter("furrow_quic_0rtt_total", "rejected").await;
    let sent = proxy
        .replay_first_flight(0, Duration::from_millis(500))
        .await;
    assert!(sent >= 1, "the proxy recorded the first flight");
    within(Duration::from_secs(10), "the replay refused", async {
        while gw.counter("furrow_quic_0rtt_total", "rejected").await == rejected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Give a (wrongly) accepted replay time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gw.registry().handle("cell-2").is_none(),
        "the replayed HELLO opened no session"
    );
    assert_seqs(
        &stored_seqs_async(&gw.db_path(), "cell-2").await,
        1..=5,
        "after the replay",
    );
}

/// The SDK streams through a proxy that drops 10% of the datagrams each
/// way and holds back another 10% (so later ones overtake them): QUIC
/// recovers, and every reading is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_reordering_lose_nothing_and_store_nothing_twice() {
    use furrow::store::TelemetryRange;
    use furrow_client::Client;

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "lossy");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("sat-1").await;
    let proxy = UdpProxy::start(
        gw.quic_addr(),
        UdpFaults {
            one_way: Duration::from_millis(2),
            loss: 0.1,
            reorder: 0.1,
            hold: Duration::from_millis(8),
            seed: 7,
            ..UdpFaults::default()
        },
    )
    .await;
    let cfg = sdk_config(proxy.addr.port(), "sat-1", token, &pki);
    let client = Client::start(cfg).unwrap();
    // In rounds, so that many datagrams cross the proxy.
    for round in 0..25u64 {
        for i in 1..=20u64 {
            client.send(1, json_payload(round * 20 + i)).await.unwrap();
        }
        within(Duration::from_secs(30), "flush", client.flush())
            .await
            .unwrap();
    }
    client.close().await;
    let rows = gw
        .store()
        .telemetry("sat-1", TelemetryRange::default(), 1000)
        .await
        .unwrap();
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    assert_seqs(&seqs, 1..=500, "through loss and reordering");
    let (dropped, reordered) = (proxy.dropped(), proxy.reordered());
    assert!(
        dropped >= 5 && reordered >= 5,
        "the proxy dropped {dropped} and reordered {reordered} datagrams"
    );
}

/// The SDK resumes in 0-RTT; when the gateway no longer holds its ticket
/// (here: evicted from a cache of one by another device's) the early data
/// is refused, and the SDK writes it again on the established connection:
/// no second disconnect, nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_resends_what_a_refused_0rtt_flight_carried() {
    use furrow::store::TelemetryRange;
    use furrow_client::{Client, Event};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "refused");
    let gw = TestGateway::start_with(|c| {
        quic_on(c, &pki, false);
        c.quic.session_cache = 1;
    })
    .await;
    let sdk = |id: &str, token: String| {
        Client::start(sdk_config(gw.quic_addr().port(), id, token, &pki)).unwrap()
    };
    let token = gw.add_device("sdk-r").await;
    let client = sdk("sdk-r", token);
    let mut events = client.events();
    for i in 1..=50u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    // Another device's ticket evicts ours.
    let other_token = gw.add_device("sdk-o").await;
    let other = sdk("sdk-o", other_token);
    gw.wait_online("sdk-o").await;
    other.close().await;

    let rejected = gw.counter("furrow_quic_0rtt_total", "rejected").await;
    let accepted = gw.counter("furrow_quic_0rtt_total", "accepted").await;
    assert!(gw
        .registry()
        .kick("sdk-r", furrow_proto::GoodbyeCode::SessionTakenOver));
    // Readings sent once the session is gone wait in the outbox and go
    // in the reconnect's first flight (or in its early writes), which the
    // gateway refuses. (Sent before, they may still reach the old session,
    // which stores and acknowledges what it read before its GOODBYE.)
    let mut seen = within(Duration::from_secs(10), "the kick's disconnect", async {
        let mut seen = Vec::new();
        loop {
            let e = events.recv().await.expect("the client's events");
            let done = matches!(e, Event::Disconnected { .. });
            seen.push(e);
            if done {
                return seen;
            }
        }
    })
    .await;
    for i in 51..=100u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    // (The counters are the test process's: other tests' gateways count
    // too, so only "went up" says something.)
    let (rejected_now, accepted_now) = (
        gw.counter("furrow_quic_0rtt_total", "rejected").await,
        gw.counter("furrow_quic_0rtt_total", "accepted").await,
    );
    assert!(
        rejected_now > rejected,
        "no refused 0-RTT flight: rejected {rejected} -> {rejected_now}, \
         accepted {accepted} -> {accepted_now}; the device's events: {seen:?}"
    );
    let disconnects = seen
        .iter()
        .filter(|e| matches!(e, Event::Disconnected { .. }))
        .count();
    assert_eq!(disconnects, 1, "only the kick ended a session: {seen:?}");
    let rows = gw
        .store()
        .telemetry("sdk-r", TelemetryRange::default(), 1000)
        .await
        .unwrap();
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    assert_seqs(&seqs, 1..=100, "across a refused 0-RTT flight");
    client.close().await;
}

/// `furrow sim --addr quic://...`: the simulator's devices (the SDK)
/// stream over QUIC; every reading it counts as acknowledged is stored,
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn furrow_sim_streams_a_fleet_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "sim");
    let gw = gateway(&pki, false).await;
    let ids = ["simq-0", "simq-1", "simq-2"];
    let mut devices = String::new();
    for id in ids {
        let token = gw.add_device(id).await;
        devices.push_str(&format!("{id} {token}\n"));
    }
    let devices_file = dir.path().join("devices.txt");
    std::fs::write(&devices_file, devices).unwrap();
    let args = [
        "sim".to_owned(),
        "--addr".to_owned(),
        format!("quic://localhost:{}", gw.quic_addr().port()),
        "--tls-ca".to_owned(),
        pki.ca_file().display().to_string(),
        "--devices-file".to_owned(),
        devices_file.display().to_string(),
        "--devices".to_owned(),
        "3".to_owned(),
        "--rate".to_owned(),
        "20".to_owned(),
        "--duration".to_owned(),
        "2".to_owned(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_furrow"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("unacknowledged 0, reconnects 0, errors 0"),
        "{stdout}"
    );
    let acked: usize = stdout
        .split("acked ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no acked count in {stdout}"));
    let mut stored = 0;
    for id in ids {
        let seqs = stored_seqs_async(&gw.db_path(), id).await;
        assert!(!seqs.is_empty(), "{id} stored nothing");
        assert_seqs(&seqs, 1..=seqs.len() as u64, id);
        stored += seqs.len();
    }
    assert_eq!(stored, acked, "{stdout}");
    assert!(gw.counter("furrow_quic_handshakes_total", "ok").await >= 3);
}
