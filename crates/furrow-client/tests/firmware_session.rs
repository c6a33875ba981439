//! The client's firmware download over real sockets, against a scripted
//! gateway (no furrow gateway needed): capability negotiation, the offer,
//! CHUNK_REQUESTs, a dropped connection in the middle, the resume on the
//! next one, the verified image on disk, and the reports that tell the
//! gateway how it went.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use furrow_client::{Backoff, Client, Config, Event, FirmwareConfig};
use furrow_proto::{Chunk, FirmwareOffer, FrameDecoder, Message, Welcome};
use ring::signature::{Ed25519KeyPair, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn next(&mut self) -> Option<Message> {
        let dec = FrameDecoder::default();
        loop {
            if let Some(f) = dec.decode(&mut self.buf).unwrap() {
                return Some(Message::from_frame(f).unwrap());
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, m: Message) {
        self.stream.write_all(&m.to_bytes().unwrap()).await.unwrap();
    }

    /// Accepts a device asking for STATE and FIRMWARE, grants both, offers.
    async fn open(listener: &TcpListener, offer: &FirmwareOffer) -> Self {
        let (stream, _) = listener.accept().await.unwrap();
        let mut c = Self {
            stream,
            buf: BytesMut::new(),
        };
        match c.next().await {
            Some(Message::Hello(h)) => assert_eq!(h.capabilities, Some(3), "STATE | FIRMWARE"),
            other => panic!("expected HELLO, got {other:?}"),
        }
        c.send(Message::Welcome(Welcome {
            version: 1,
            keepalive_s: 30,
            max_frame: 65_536,
            max_inflight: 64,
            last_seq: 0,
            server_time_ms: 0,
            capabilities: Some(3),
        }))
        .await;
        c.send(Message::FirmwareOffer(offer.clone())).await;
        c
    }

    /// Answers requests and ACKs reports; returns after `limit` chunks (or
    /// when the device hangs up). Reports go to `reports`, the offset of
    /// each request to `requests`.
    async fn serve(
        &mut self,
        data: &[u8],
        limit: usize,
        reports: &mpsc::UnboundedSender<serde_json::Value>,
        requests: &mpsc::UnboundedSender<u64>,
    ) {
        let mut answered = 0;
        while answered < limit {
            let Some(m) = self.next().await else { return };
            match m {
                Message::ChunkRequest(r) => {
                    let _ = requests.send(r.offset);
                    let range = r.offset as usize..r.offset as usize + r.length as usize;
                    let bytes = Bytes::copy_from_slice(&data[range]);
                    self.send(Message::Chunk(Chunk {
                        image: r.image,
                        offset: r.offset,
                        crc32: crc32fast::hash(&bytes),
                        data: bytes,
                    }))
                    .await;
                    answered += 1;
                }
                Message::Report(r) => {
                    let _ = reports.send(serde_json::from_slice(&r.patch).unwrap());
                    self.send(Message::Ack { seq: r.seq }).await;
                }
                Message::Ping { nonce } => self.send(Message::Pong { nonce }).await,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firmware_download_survives_a_dropped_connection_and_is_installed() {
    let rng = ring::rand::SystemRandom::new();
    let key =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let id: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &data)
        .as_ref()
        .try_into()
        .unwrap();
    let size = data.len() as u64;
    let msg = furrow_proto::firmware_signed_message(&id, size, "p7", "1.1.0");
    let offer = FirmwareOffer {
        image: id,
        size,
        chunk_max: 8192,
        window: 8,
        signature: key.sign(&msg).as_ref().try_into().unwrap(),
        model: "p7".into(),
        version: "1.1.0".into(),
    };

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(listener.local_addr().unwrap().to_string(), "p-1", "t0ken");
    cfg.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        multiplier: 2.0,
    };
    cfg.firmware = Some(FirmwareConfig::new(
        key.public_key().as_ref().try_into().unwrap(),
        "p7",
        "1.0.0",
        dir.path(),
    ));
    let client = Client::start(cfg).unwrap();
    let mut events = client.events();

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (first_tx, mut first) = mpsc::unbounded_channel();
    let (second_tx, mut second) = mpsc::unbounded_channel();
    let gateway = tokio::spawn({
        let data = data.clone();
        async move {
            let mut c = Conn::open(&listener, &offer).await;
            c.serve(&data, 10, &reports_tx, &first_tx).await;
            // The connection ends after ten chunks (FIN, then drain: a
            // close with unread data would reset it, and the reset could
            // destroy the last chunks before the device read them).
            let _ = c.stream.shutdown().await;
            while c.next().await.is_some() {}
            drop(c);
            let mut c = Conn::open(&listener, &offer).await;
            c.serve(&data, usize::MAX, &reports_tx, &second_tx).await;
        }
    });

    let path = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::FirmwareReady {
                version,
                path,
                image,
                ..
            } = events.recv().await.unwrap()
            {
                assert_eq!(version, "1.1.0");
                assert_eq!(image.len(), 64);
                return path;
            }
        }
    })
    .await
    .expect("firmware ready in time");
    assert_eq!(std::fs::read(&path).unwrap(), data, "bit-identical image");
    // Four requests of 8 KiB in flight (the device's window, below the
    // offer's), and the next connection resumes after the ten answered.
    assert_eq!(first.recv().await, Some(0));
    assert_eq!(second.recv().await, Some(10 * 8192));
    let mut asked = 1;
    while second.try_recv().is_ok() {
        asked += 1;
    }
    assert_eq!(asked, (size - 10 * 8192).div_ceil(8192));
    assert_eq!(path.extension().unwrap(), "bin");

    client.firmware_installing().await.unwrap();
    client.firmware_installed("1.1.0").await.unwrap();
    client.flush().await.unwrap();

    // What the gateway was told, in order, ends with the new version.
    let mut seen = Vec::new();
    while let Ok(r) = reports.try_recv() {
        seen.push(r);
    }
    assert!(!seen.is_empty());
    let states: Vec<&str> = seen
        .iter()
        .filter_map(|r| r["firmware"]["update"]["state"].as_str())
        .collect();
    assert_eq!(states.first(), Some(&"downloading"));
    assert_eq!(states.last(), Some(&"installed"));
    for r in &seen[..seen.len() - 1] {
        assert_eq!(r["firmware"]["version"], "1.0.0", "{r}");
    }
    assert_eq!(
        seen.last().unwrap(),
        &serde_json::json!({"firmware": {"version": "1.1.0", "update": {
            "image": path.file_stem().unwrap().to_str().unwrap(),
            "version": "1.1.0", "state": "installed", "percent": null, "reason": null}}})
    );

    let stats = client.firmware_stats();
    assert!(stats.bytes_received >= size);
    assert!(stats.bytes_received < size * 3 / 2, "{stats:?}");
    assert_eq!(stats.refused, 0);
    client.close().await;
    gateway.abort();
    let _ = gateway.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_calls_need_a_configuration_and_a_ready_image() {
    let mut cfg = Config::new("127.0.0.1:1", "p-1", "t0ken");
    let client = Client::start(cfg.clone()).unwrap();
    assert!(matches!(
        client.firmware_installing().await,
        Err(furrow_client::ClientError::Firmware(
            furrow_client::FirmwareError::NotConfigured
        ))
    ));
    client.close().await;
    let dir = tempfile::tempdir().unwrap();
    cfg.firmware = Some(FirmwareConfig::new([0; 32], "p7", "1.0.0", dir.path()));
    let client = Client::start(cfg).unwrap();
    assert!(matches!(
        client.firmware_failed("x").await,
        Err(furrow_client::ClientError::Firmware(
            furrow_client::FirmwareError::NothingReady
        ))
    ));
    assert_eq!(client.firmware_stats(), Default::default());
    client.close().await;
}
