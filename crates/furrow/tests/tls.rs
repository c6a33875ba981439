//! TLS and mutual TLS on the device listener, with certificates from
//! `furrow::certs` (what `furrow certs` makes): the SDK end to end,
//! mutual TLS accepted and refused (no certificate, another CA, expired,
//! another device), resumption, reloads without a restart that leave open
//! sessions alone, a gateway that refuses to start with files it cannot
//! use, and a quiet TLS session (1.3 and 1.2) that parks, resumes and
//! closes cleanly.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use furrow::store::TelemetryRange;
use furrow_client::{Client, Config as ClientConfig, TlsOptions};
use furrow_proto::{FrameDecoder, Message};
use rustls_pki_types::ServerName;
use support::pki::{client_config, tls_on, Pki};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig as RustlsClient;
use tokio_rustls::TlsConnector;

async fn tls_connect(
    addr: std::net::SocketAddr,
    cfg: Arc<RustlsClient>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    within(
        Duration::from_secs(10),
        "TLS handshake",
        TlsConnector::from(cfg).connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
}

/// Sends HELLO and returns the gateway's first answer, or why there was none.
async fn hello_over(
    s: &mut TlsStream<TcpStream>,
    id: &str,
    token: &str,
) -> Result<Message, String> {
    s.write_all(&encode(&hello_msg(id, token, 30)))
        .await
        .map_err(|e| e.to_string())?;
    recv_over(s).await
}

/// The next message from the gateway over TLS.
async fn recv_over(s: &mut TlsStream<TcpStream>) -> Result<Message, String> {
    let mut buf = BytesMut::new();
    let dec = FrameDecoder::new(1 << 20);
    loop {
        if let Some(f) = dec.decode(&mut buf).map_err(|e| e.to_string())? {
            return Message::from_frame(f).map_err(|e| e.to_string());
        }
        let n = within(Duration::from_secs(10), "answer", s.read_buf(&mut buf))
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
    }
}

async fn tls_handshakes(gw: &TestGateway, outcome: &str) -> u64 {
    gw.counter("furrow_tls_handshakes_total", outcome).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_streams_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let gw = TestGateway::start_with(|c| tls_on(c, &pki, false)).await;
    let token = gw.add_device("tls-1").await;
    let mut cfg = ClientConfig::new(
        format!("localhost:{}", gw.tls_addr().port()),
        "tls-1",
        token,
    );
    cfg.tls = Some(TlsOptions::new(pki.ca_file()));
    let client = Client::start(cfg).unwrap();
    for i in 1..=50u64 {
        client.send(1, json_payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    let rows = gw
        .store()
        .telemetry("tls-1", TelemetryRange::default(), 100)
        .await
        .unwrap();
    assert_eq!(rows.len(), 50);
    client.close().await;
    assert!(tls_handshakes(&gw, "full").await >= 1);

    // The SDK refuses a CA file it cannot use, at start.
    let mut bad = ClientConfig::new("localhost:1", "x", "y");
    bad.tls = Some(TlsOptions::new(dir.path().join("missing.pem")));
    assert!(matches!(
        Client::start(bad),
        Err(furrow_client::ClientError::Tls(_))
    ));
    // The plain listener still works beside it (tls.plain).
    let plain_token = gw.add_device("plain-1").await;
    let (_dev, welcome) = gw.connect_device("plain-1", &plain_token).await;
    assert_eq!(welcome.last_seq, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_names_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "m");
    let other = Pki::new(dir.path(), "other");
    let gw = TestGateway::start_with(|c| tls_on(c, &pki, true)).await;
    let token1 = gw.add_device("pump-1").await;
    gw.add_device("pump-2").await;
    let addr = gw.tls_addr();

    // Accepted: its own certificate, no token.
    let own = pki.ca.device("pump-1", 30).unwrap();
    let mut s = tls_connect(addr, client_config(&pki, Some(&own)))
        .await
        .expect("handshake");
    match hello_over(&mut s, "pump-1", "").await {
        Ok(Message::Welcome(_)) => {}
        other => panic!("expected WELCOME, got {other:?}"),
    }
    drop(s);

    // A certificate for another device, even with the right token: refused.
    let theirs = pki.ca.device("pump-2", 30).unwrap();
    let mut s = tls_connect(addr, client_config(&pki, Some(&theirs)))
        .await
        .expect("handshake");
    match hello_over(&mut s, "pump-1", &token1).await {
        Ok(Message::Error(e)) => assert_eq!(e.code, code::AUTH_FAILED),
        other => panic!("expected ERROR AUTH_FAILED, got {other:?}"),
    }

    // Refused in the TLS handshake: no certificate, another CA, expired.
    let foreign = other.ca.device("pump-1", 30).unwrap();
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = pki
        .ca
        .device_valid("pump-1", now - day * 30, now - day)
        .unwrap();
    for (what, client) in [
        ("no certificate", None),
        ("another CA", Some(&foreign)),
        ("expired", Some(&expired)),
    ] {
        // TLS 1.3: the client's handshake may complete before the gateway
        // has judged its certificate; then the refusal is the first read.
        let refused = match tls_connect(addr, client_config(&pki, client)).await {
            Err(_) => true,
            Ok(mut s) => !matches!(
                hello_over(&mut s, "pump-1", &token1).await,
                Ok(Message::Welcome(_))
            ),
        };
        assert!(refused, "{what}: let in");
    }
    assert!(tls_handshakes(&gw, "error").await >= 3);

    // The SDK with its certificate.
    let (cert, key) = pki.device_files(&own, "pump-1");
    let mut cfg = ClientConfig::new(format!("localhost:{}", addr.port()), "pump-1", "");
    cfg.tls = Some(TlsOptions::new(pki.ca_file()).with_client_cert(cert, key));
    let client = Client::start(cfg).unwrap();
    client.send(1, json_payload(1)).await.unwrap();
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "r");
    let gw = TestGateway::start_with(|c| tls_on(c, &pki, false)).await;
    let token = gw.add_device("again").await;
    let cfg = client_config(&pki, None);
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let mut s = tls_connect(gw.tls_addr(), Arc::clone(&cfg)).await.unwrap();
        // Reading WELCOME also takes the session tickets in.
        assert!(matches!(
            hello_over(&mut s, "again", &token).await,
            Ok(Message::Welcome(_))
        ));
        kinds.push(s.get_ref().1.handshake_kind());
        let _ = s.shutdown().await;
    }
    use tokio_rustls::rustls::HandshakeKind;
    assert_eq!(kinds[0], Some(HandshakeKind::Full));
    assert_eq!(kinds[2], Some(HandshakeKind::Resumed));
    assert!(tls_handshakes(&gw, "resumed").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_and_open_sessions_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let old = Pki::new(dir.path(), "old");
    let new = Pki::new(dir.path(), "new");
    // The gateway reads its files from `live`, which the test rewrites.
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |p: &Pki| {
        for f in ["server.pem", "server.key"] {
            std::fs::copy(p.dir.join(f), live.join(format!("{f}.tmp"))).unwrap();
            std::fs::rename(live.join(format!("{f}.tmp")), live.join(f)).unwrap();
        }
    };
    install(&old);
    let gw = TestGateway::start_with(|c| {
        c.tls.cert_file = live.join("server.pem");
        c.tls.key_file = live.join("server.key");
        c.tls.watch_ms = 100;
    })
    .await;
    let token = gw.add_device("long-lived").await;
    // Probes use a device of their own: a probe as "long-lived" would take
    // its session over.
    let probe = gw.add_device("probe").await;
    let mut open = tls_connect(gw.tls_addr(), client_config(&old, None))
        .await
        .unwrap();
    assert!(matches!(
        hello_over(&mut open, "long-lived", &token).await,
        Ok(Message::Welcome(_))
    ));

    // Rotate to a certificate from another CA; the watcher picks it up.
    // (mtime resolution: make sure the files look changed.)
    tokio::time::sleep(Duration::from_millis(20)).await;
    install(&new);
    within(Duration::from_secs(10), "reloaded", async {
        loop {
            if let Ok(mut s) = tls_connect(gw.tls_addr(), client_config(&new, None)).await {
                if hello_over(&mut s, "probe", &probe).await.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // New connections trusting only the old CA are refused now.
    let refused = match tls_connect(gw.tls_addr(), client_config(&old, None)).await {
        Err(_) => true,
        Ok(mut s) => hello_over(&mut s, "probe", &probe).await.is_err(),
    };
    assert!(refused);

    // The session opened before the reload goes on.
    open.write_all(&telemetry_frames(1..=3)).await.unwrap();
    match recv_over(&mut open).await {
        Ok(Message::Ack { seq }) => assert!(seq >= 1),
        other => panic!("expected an ACK on the old session, got {other:?}"),
    }

    // A broken file keeps the certificate in force.
    std::fs::write(live.join("server.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut s = tls_connect(gw.tls_addr(), client_config(&new, None))
        .await
        .expect("still serving the last good certificate");
    assert!(hello_over(&mut s, "probe", &probe).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_to_start_with_files_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "f");
    std::fs::write(
        dir.path().join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    )
    .unwrap();
    type Tweak<'a> = Box<dyn Fn(&mut furrow::Config) + 'a>;
    let cases: Vec<(&str, Tweak<'_>)> = vec![
        (
            "unreadable key",
            Box::new(|c| {
                tls_on(c, &pki, false);
                c.tls.key_file = dir.path().join("missing.key");
            }),
        ),
        (
            "client CA that does not parse",
            Box::new(|c| {
                tls_on(c, &pki, false);
                c.tls.client_ca_file = dir.path().join("garbage.pem");
            }),
        ),
        (
            "a key that is not the certificate's",
            Box::new(|c| {
                tls_on(c, &pki, false);
                let other = pki.ca.server(&["x".into()], 1).unwrap();
                let p = dir.path().join("other.key");
                std::fs::write(&p, other.key_pem).unwrap();
                c.tls.key_file = p;
            }),
        ),
    ];
    for (what, tweak) in cases {
        let data = tempfile::tempdir().unwrap();
        let mut cfg = base_config(data.path());
        tweak(&mut cfg);
        match furrow::Server::bind(cfg).await {
            Err(furrow::server::ServerError::Tls(e)) => eprintln!("{what}: {e}"),
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: started"),
        }
    }
}

/// Runs a `furrow` command to completion; returns its stdout.
fn furrow_ok(args: &[&str]) -> String {
    let out = furrow_cmd(args).output().expect("furrow runs");
    assert!(
        out.status.success(),
        "furrow {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The new user's path, with the real binary: `furrow certs` makes a CA, a
/// server and device certificates; `furrow serve` runs mutual TLS;
/// `furrow sim` streams over it with the device certificates; a new server
/// certificate is taken on SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn furrow_certs_serve_sim_and_sighup() {
    use support::process::GatewayProcess;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let c = certs.to_str().unwrap();
    furrow_ok(&["certs", "ca", "--out", c]);
    furrow_ok(&["certs", "server", "--name", "localhost", "--out", c]);
    furrow_ok(&["certs", "device", "sim-0", "sim-1", "--out", c]);
    // Provision into the data directory the gateway process will use.
    let data = dir.path().join("gw");
    let mut devices = String::new();
    for id in ["sim-0", "sim-1"] {
        let token = furrow_ok(&["device", "add", id, "--data-dir", data.to_str().unwrap()]);
        devices.push_str(&format!("{id} {}\n", token.trim()));
    }
    let devices_file = dir.path().join("devices.txt");
    std::fs::write(&devices_file, devices).unwrap();

    let tls_port = free_port();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let p = |f: &str| certs.join(f).to_str().unwrap().to_owned();
    let (cert, key, ca) = (p("server.pem"), p("server.key"), p("ca.pem"));
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut gw = GatewayProcess::spawn(
        dir.path(),
        "gw",
        listen,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca,
            "--tls-listen",
            &tls_listen,
        ],
    );
    let http = reqwest::Client::new();
    gw.ready(&http).await;

    let out = tokio::task::spawn_blocking({
        let (ca, c, devices_file) = (ca.clone(), c.to_owned(), devices_file.clone());
        move || {
            furrow_ok(&[
                "sim",
                "--addr",
                &format!("localhost:{tls_port}"),
                "--tls-ca",
                &ca,
                "--tls-certs",
                &c,
                "--devices-file",
                devices_file.to_str().unwrap(),
                "--devices",
                "2",
                "--rate",
                "20",
                "--duration",
                "2",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        out.contains("reconnects 0, errors 0"),
        "{out}\n{}",
        gw.logs()
    );
    assert!(!out.contains("acked 0 "), "{out}");

    // A new server certificate, taken on SIGHUP.
    std::fs::remove_file(certs.join("server.pem")).unwrap();
    std::fs::remove_file(certs.join("server.key")).unwrap();
    furrow_ok(&["certs", "server", "--name", "localhost", "--out", c]);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    within(Duration::from_secs(10), "reloaded", async {
        while !gw.logs().contains("TLS certificates reloaded") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(gw.child.try_wait().unwrap().is_none(), "SIGHUP stopped it");
}

/// A client that opens a TLS connection and stalls in the handshake is
/// closed at `tls.handshake_timeout_ms`, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "t");
    let gw = TestGateway::start_with(|c| {
        tls_on(c, &pki, false);
        c.tls.handshake_timeout_ms = 300;
    })
    .await;
    let before = tls_handshakes(&gw, "timeout").await;
    for partial in [&b""[..], &[0x16, 0x03, 0x01, 0x00, 0x40, 0x01][..]] {
        let mut s = TcpStream::connect(gw.tls_addr()).await.unwrap();
        s.write_all(partial).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        // Closed by the gateway (EOF or reset), well before our bound.
        let r = within(Duration::from_secs(5), "closed", s.read(&mut buf)).await;
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    assert_eq!(tls_handshakes(&gw, "timeout").await, before + 2);
}

/// A quiet TLS session parks (its ciphertext buffers freed, its records
/// handed over from rustls to the gateway's own record layer) and resumes
/// on its next record, twice; a frame larger than a TLS record arrives
/// whole; a key update the device asks for is answered and the stream
/// goes on; a device GOODBYE ends with the gateway's close_notify (a
/// clean end of stream for the device's TLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tls_session_parks_resumes_and_closes_cleanly() {
    parks_resumes_and_closes(false).await;
}

/// The same over TLS 1.2 (as devices on mbedTLS 2.x connect), whose
/// records the gateway also seals itself once the session is quiet; TLS
/// 1.2 has no key update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_tls12_session_parks_resumes_and_closes_cleanly() {
    parks_resumes_and_closes(true).await;
}

async fn parks_resumes_and_closes(tls12: bool) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "a");
    let gw = TestGateway::start_with(|c| {
        tls_on(c, &pki, false);
        c.sessions.park_after_ms = 50;
    })
    .await;
    let token = gw.add_device("tls-park").await;
    let config = if tls12 {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        roots
            .add(
                rustls_pki_types::CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes())
                    .unwrap(),
            )
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        Arc::new(
            RustlsClient::builder_with_provider(provider)
                .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    } else {
        client_config(&pki, None)
    };
    let mut s = tls_connect(gw.tls_addr(), config).await.unwrap();
    let version = s.get_ref().1.protocol_version();
    assert_eq!(
        version,
        Some(if tls12 {
            tokio_rustls::rustls::ProtocolVersion::TLSv1_2
        } else {
            tokio_rustls::rustls::ProtocolVersion::TLSv1_3
        })
    );
    assert!(matches!(
        hello_over(&mut s, "tls-park", &token).await,
        Ok(Message::Welcome(_))
    ));
    let parks = |n: f64| {
        let url = gw.api_url("/metrics");
        async move {
            within(Duration::from_secs(10), "the session to park", async {
                loop {
                    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
                    let parked = text
                        .lines()
                        .find_map(|l| l.strip_prefix("furrow_session_parks_total "))
                        .map_or(0.0, |v| v.trim().parse().unwrap());
                    if parked >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
        }
    };
    let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let sends: [(u64, u8, Vec<u8>); 3] = [
        (1, 1, json_payload(1)),
        (2, 0, big.clone()),
        (3, 1, json_payload(3)),
    ];
    for (i, (seq, ct, payload)) in sends.iter().enumerate() {
        if i > 0 {
            parks(i as f64).await;
        }
        s.write_all(&encode(&telemetry_msg(*seq, *ct, payload)))
            .await
            .unwrap();
        assert_eq!(recv_over(&mut s).await, Ok(Message::Ack { seq: *seq }));
    }
    let rows = gw
        .store()
        .telemetry("tls-park", TelemetryRange::default(), 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].payload, big);
    let text = reqwest::get(gw.api_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The recorder is the process's: other tests' sessions count too.
    let handovers = |schedule: &str| {
        let prefix = format!("furrow_tls_record_handovers_total{{schedule=\"{schedule}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    assert!(
        handovers("own") >= 1.0,
        "records handed over, with our key schedule"
    );
    assert_eq!(handovers("failed"), 0.0);

    // The device asks for fresh keys both ways (rustls sends KeyUpdate
    // with update_requested): the gateway answers with its own.
    if !tls12 {
        s.get_mut().1.refresh_traffic_keys().unwrap();
    }
    for seq in [4, 5] {
        s.write_all(&encode(&telemetry_msg(seq, 1, &json_payload(seq))))
            .await
            .unwrap();
        assert_eq!(recv_over(&mut s).await, Ok(Message::Ack { seq }));
    }

    s.write_all(&encode(&Message::Goodbye(furrow_proto::Goodbye {
        code: 0,
        retry_after_ms: 0,
    })))
    .await
    .unwrap();
    let mut rest = Vec::new();
    let end = within(
        Duration::from_secs(10),
        "the close",
        s.read_to_end(&mut rest),
    )
    .await;
    assert!(end.is_ok(), "not a clean TLS close: {end:?}");
}
