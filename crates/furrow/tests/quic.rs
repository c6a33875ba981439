//! furrow/1 over QUIC (`quic.listen`): a device on a quinn client opens
//! one bidirectional stream and speaks furrow/1 on it unchanged. Telemetry
//! is stored once and acknowledged; the ALPN and mutual TLS are enforced;
//! a device whose UDP address changes mid-stream keeps its session (no new
//! HELLO, nothing lost or stored twice); shutdown says GOODBYE.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use furrow::certs::Issued;
use furrow_proto::{FrameDecoder, Message};
use support::pki::{client_config, tls_on, Pki};
use support::*;

/// A quinn client configuration trusting `pki`, offering `alpn`.
fn quic_client(pki: &Pki, cert: Option<&Issued>, alpn: &[u8]) -> quinn::ClientConfig {
    let mut tls = (*client_config(pki, cert)).clone();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a TLS 1.3 client");
    quinn::ClientConfig::new(Arc::new(crypto))
}

/// A gateway with TLS and QUIC on loopback.
async fn gateway(pki: &Pki, mutual: bool) -> TestGateway {
    TestGateway::start_with(|c| {
        tls_on(c, pki, mutual);
        c.tls.listen = "127.0.0.1:0".parse().unwrap();
        c.quic.listen = Some("127.0.0.1:0".parse().unwrap());
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
    use furrow_client::{Client, Config as ClientConfig, TlsOptions};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "sdk");
    let gw = gateway(&pki, false).await;
    let token = gw.add_device("sdk-q").await;
    let mut cfg = ClientConfig::new(
        format!("quic://localhost:{}", gw.quic_addr().port()),
        "sdk-q",
        token,
    );
    cfg.tls = Some(TlsOptions::new(pki.ca_file()));
    cfg.backoff.initial = Duration::from_millis(50);
    let client = Client::start(cfg.clone()).unwrap();
    for i in 1..=150u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    // The gateway drops the session: the SDK reconnects over QUIC and
    // resends what was not acknowledged.
    let first = gw.registry().handle("sdk-q").expect("online").id();
    gw.registry()
        .kick("sdk-q", furrow_proto::GoodbyeCode::SessionTakenOver);
    for i in 151..=300u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(20), "flush", client.flush())
        .await
        .unwrap();
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
