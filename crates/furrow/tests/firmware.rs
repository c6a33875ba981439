//! Firmware over the air end to end (docs/protocol.md, "Firmware
//! updates"): uploads over real HTTP (signed by the gateway's key, or with
//! a detached signature a trusted key must verify; over the size limit:
//! 413 and nothing left behind), a raw furrow/1 device pulling an image by
//! ranges with CRC-32s, the protocol's refusals, download slots capping a
//! job's concurrent downloads, and a job succeeding once the device reports
//! the new version.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use furrow::firmware::SigningKey;
use furrow_proto::{ChunkRequest, ErrorCode, Hello, Message, Report, Str, CAP_FIRMWARE, CAP_STATE};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::Api;
use support::*;

/// A new key pair, its PKCS#8 file written to `dir/name`.
fn keypair(dir: &Path, name: &str) -> (SigningKey, std::path::PathBuf) {
    let der = SigningKey::generate().unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &der).unwrap();
    (SigningKey::from_pkcs8(&der, name).unwrap(), path)
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// `POST /v1/firmware` with `bytes`: (status, body).
async fn upload(
    api: &Api,
    bytes: Vec<u8>,
    version: &str,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut q = vec![
        ("name", "pump firmware".to_owned()),
        ("version", version.to_owned()),
        ("model", "p7".to_owned()),
    ];
    if let Some(s) = signature {
        q.push(("signature", s));
    }
    let resp = api
        .http
        .post(api.gw.api_url("/v1/firmware"))
        .query(&q)
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .expect("upload");
    let status = resp.status();
    (status, resp.json().await.expect("JSON"))
}

fn hello_fw(id: &str, token: &str) -> Message {
    Message::Hello(Hello {
        version: furrow_proto::VERSION,
        keepalive_s: 30,
        device_id: Str::from(id),
        token: Str::from(token),
        capabilities: Some(CAP_STATE | CAP_FIRMWARE),
    })
}

async fn connect_fw(gw: &TestGateway, id: &str, token: &str) -> RawDevice {
    let mut dev = RawDevice::connect(gw.addr()).await;
    dev.send(&hello_fw(id, token)).await;
    let w = dev.expect_welcome().await;
    assert_eq!(w.capabilities, Some(CAP_STATE | CAP_FIRMWARE));
    dev
}

/// The next FIRMWARE_OFFER (other frames skipped), if one comes in `wait`.
async fn offer_within(dev: &mut RawDevice, wait: Duration) -> Option<furrow_proto::FirmwareOffer> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match dev.next_event(left).await {
            Event::Msg(Message::FirmwareOffer(o)) => return Some(o),
            Event::Msg(_) => continue,
            _ => return None,
        }
    }
}

/// CHUNK_REQUEST for `length` bytes at `offset` of `image`.
fn ask(image: [u8; 32], offset: u64, length: u32) -> Message {
    Message::ChunkRequest(ChunkRequest {
        image,
        offset,
        length,
    })
}

async fn firmware_job(api: &Api, devices: &[&str], image: &str, max_downloads: u32) -> u64 {
    let (st, job) = api
        .post(
            "/v1/jobs",
            json!({"target": {"devices": devices},
                   "operation": {"firmware": {"image": image, "max_downloads": max_downloads}}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    assert_eq!(job["operation"]["firmware"]["version"], "2.0.0");
    job["job_id"].as_u64().unwrap()
}

async fn gateway_with_key(
    tweak: impl FnOnce(&mut furrow::Config),
) -> (Api, SigningKey, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let (key, path) = keypair(keys.path(), "fleet.key");
    let api = Api::start_with(|c| {
        c.firmware.signing_key_file = path;
        tweak(c);
    })
    .await;
    (api, key, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_signed_checked_limited_and_deleted() {
    let keys = tempfile::tempdir().unwrap();
    let (other, _) = keypair(keys.path(), "other.key");
    let (api, key, _k) = gateway_with_key(|c| {
        c.firmware.max_image_bytes = 300_000;
        c.firmware.cache_bytes = 300_000;
        c.firmware.trusted_keys = vec![];
    })
    .await;
    // Signed by the gateway's key.
    let img = image(200_000, 1);
    let id = hex::encode(sha256(&img));
    let (st, rec) = upload(&api, img.clone(), "2.0.0", None).await;
    assert_eq!(st, StatusCode::CREATED, "{rec}");
    assert_eq!(rec["id"], id);
    assert_eq!(rec["size"], 200_000);
    let sig: [u8; 64] = hex::decode(rec["signature"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let raw_id = sha256(&img);
    assert!(furrow::firmware::verify(
        &key.public(),
        &sig,
        &raw_id,
        200_000,
        "p7",
        "2.0.0"
    ));
    // The same bytes again: 409.
    let (st, v) = upload(&api, img.clone(), "2.0.1", None).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // A detached signature by an untrusted key: 400; by the fleet key: 201.
    let img2 = image(1000, 2);
    let bad = hex::encode(other.sign(&sha256(&img2), 1000, "p7", "2.1.0"));
    let (st, v) = upload(&api, img2.clone(), "2.1.0", Some(bad)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("trusted"),
        "{v}"
    );
    // Signed for another version: the signature covers the version.
    let wrong_version = hex::encode(key.sign(&sha256(&img2), 1000, "p7", "9.9.9"));
    let (st, _) = upload(&api, img2.clone(), "2.1.0", Some(wrong_version)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let good = hex::encode(key.sign(&sha256(&img2), 1000, "p7", "2.1.0"));
    let (st, v) = upload(&api, img2.clone(), "2.1.0", Some(good.clone())).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["signature"], good);
    // Over the limit: 413, and no staged file stays behind.
    let (st, v) = upload(&api, image(300_001, 3), "3.0.0", None).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (st, _) = upload(&api, Vec::new(), "3.0.0", None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "empty");
    let staged: Vec<_> = std::fs::read_dir(api.gw.config().data_dir.join("firmware"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    // Bad metadata.
    let resp = api
        .http
        .post(api.gw.api_url("/v1/firmware?name=x&version=&model=p7"))
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // List, get, delete (refused while a job uses it).
    let (st, list) = api.get("/v1/firmware").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (st, v) = api.get(&format!("/v1/firmware/{id}")).await;
    assert_eq!((st, v["version"].as_str()), (StatusCode::OK, Some("2.0.0")));
    let token = api.gw.add_device("pump-1").await;
    let _ = token;
    let job = firmware_job(&api, &["pump-1"], &id, 10).await;
    let (st, v) = api
        .call(reqwest::Method::DELETE, &format!("/v1/firmware/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    let (st, _) = api.post(&format!("/v1/jobs/{job}/cancel"), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    let id2 = hex::encode(sha256(&img2));
    let resp = api
        .http
        .delete(api.gw.api_url(&format!("/v1/firmware/{id2}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (st, _) = api.get(&format!("/v1/firmware/{id2}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(!api
        .gw
        .config()
        .data_dir
        .join("firmware")
        .join(format!("{id2}.bin"))
        .exists());
    // A job over an unknown image: 404.
    let (st, v) = api
        .post(
            "/v1/jobs",
            json!({"target": {"devices": ["pump-1"]}, "operation": {"firmware": {"image": id2}}}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_pulls_an_image_by_ranges_and_the_job_succeeds() {
    let (api, key, _k) = gateway_with_key(|_| {}).await;
    let img = image(100_000, 7);
    let (st, rec) = upload(&api, img.clone(), "2.0.0", None).await;
    assert_eq!(st, StatusCode::CREATED, "{rec}");
    let id = rec["id"].as_str().unwrap().to_owned();
    let token = api.gw.add_device("pump-1").await;
    let plain_token = api.gw.add_device("pump-old").await;

    // A device without the capability is never offered anything.
    let (mut old, _) = api.gw.connect_device("pump-old", &plain_token).await;
    let mut dev = connect_fw(&api.gw, "pump-1", &token).await;
    let job = firmware_job(&api, &["pump-1", "pump-old"], &id, 10).await;
    let offer = offer_within(&mut dev, Duration::from_secs(10))
        .await
        .expect("an offer");
    assert_eq!(offer.image, sha256(&img));
    assert_eq!(offer.size, 100_000);
    assert_eq!(offer.chunk_max, 65_536 - 46, "64 KiB, capped by the frame");
    assert_eq!(offer.window, 4);
    assert_eq!(
        (offer.model.as_str(), offer.version.as_str()),
        ("p7", "2.0.0")
    );
    assert!(furrow::firmware::verify(
        &key.public(),
        &offer.signature,
        &offer.image,
        offer.size,
        "p7",
        "2.0.0"
    ));
    old.expect_silence(Duration::from_millis(300)).await;

    // Pull it in ranges of 10,000 bytes, two at a time, out of order.
    let mut got = vec![0u8; 100_000];
    let offsets: Vec<u64> = (0..10u64).rev().map(|n| n * 10_000).collect();
    for pair in offsets.chunks(2) {
        for &o in pair {
            dev.send(&ask(offer.image, o, 10_000)).await;
        }
        for &o in pair {
            match dev.recv().await {
                Some(Message::Chunk(c)) => {
                    assert_eq!(c.offset, o, "answers come in request order");
                    assert_eq!(c.image, offer.image);
                    assert_eq!(crc32fast::hash(&c.data), c.crc32);
                    got[o as usize..o as usize + c.data.len()].copy_from_slice(&c.data);
                }
                other => panic!("expected CHUNK, got {other:?}"),
            }
        }
    }
    assert_eq!(got, img, "bit-identical");
    // A request for an image not on offer here: FIRMWARE_CANCEL.
    dev.send(&ask([9; 32], 0, 10)).await;
    match dev.recv().await {
        Some(Message::FirmwareCancel { image }) => assert_eq!(image, [9; 32]),
        other => panic!("expected FIRMWARE_CANCEL, got {other:?}"),
    }
    // Installed: the device reports the new version and the job succeeds.
    let patch = json!({"firmware": {"version": "2.0.0",
        "update": {"image": id, "version": "2.0.0", "state": "installed"}}});
    dev.send(&Message::Report(Report {
        seq: 1,
        timestamp_ms: 0,
        patch: Bytes::from(patch.to_string()),
    }))
    .await;
    dev.until_ack(1).await;
    let v = within(Duration::from_secs(10), "job device succeeded", async {
        loop {
            let (_, v) = api.get(&format!("/v1/jobs/{job}")).await;
            if v["counts"]["succeeded"] == 1 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(v["counts"]["in_progress"], 1, "pump-old waits: {v}");
    // The session is woken and withdraws the finished offer.
    match dev.recv_within(Duration::from_secs(5)).await {
        Some(Message::FirmwareCancel { image }) => assert_eq!(image, offer.image),
        other => panic!("expected FIRMWARE_CANCEL, got {other:?}"),
    }
    let m = api.metrics().await;
    assert!(m.contains("furrow_firmware_bytes_sent_total 100000"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_outside_the_image_is_a_protocol_error() {
    let (api, _key, _k) = gateway_with_key(|c| c.firmware.chunk_max = 1024).await;
    let (_, rec) = upload(&api, image(5000, 3), "2.0.0", None).await;
    let id = rec["id"].as_str().unwrap().to_owned();
    let token = api.gw.add_device("pump-1").await;
    let mut dev = connect_fw(&api.gw, "pump-1", &token).await;
    firmware_job(&api, &["pump-1"], &id, 10).await;
    let offer = offer_within(&mut dev, Duration::from_secs(10))
        .await
        .unwrap();
    dev.send(&ask(offer.image, 4000, 1001)).await;
    dev.expect_error(ErrorCode::ProtocolError as u16).await;
    // Longer than chunk_max, inside the image: also refused.
    let mut dev = connect_fw(&api.gw, "pump-1", &token).await;
    let offer = offer_within(&mut dev, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(offer.chunk_max, 1024, "capped by the configured chunk_max");
    dev.send(&ask(offer.image, 0, 1025)).await;
    dev.expect_error(ErrorCode::ProtocolError as u16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_slots_cap_a_jobs_concurrent_downloads() {
    let (api, _key, _k) = gateway_with_key(|_| {}).await;
    let img = image(50_000, 5);
    let (_, rec) = upload(&api, img.clone(), "2.0.0", None).await;
    let id = rec["id"].as_str().unwrap().to_owned();
    let mut devs = Vec::new();
    let mut ids = Vec::new();
    for n in 0..5 {
        let name = format!("pump-{n}");
        let token = api.gw.add_device(&name).await;
        devs.push(connect_fw(&api.gw, &name, &token).await);
        ids.push(name);
    }
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    firmware_job(&api, &names, &id, 2).await;
    // Two offers, no more.
    let mut offered = Vec::new();
    let mut waiting = Vec::new();
    for (n, d) in devs.iter_mut().enumerate() {
        match offer_within(d, Duration::from_secs(3)).await {
            Some(o) => offered.push((n, o)),
            None => waiting.push(n),
        }
    }
    assert_eq!(offered.len(), 2, "max_downloads 2");
    // The first downloads the whole image: its slot goes to a waiting one.
    let (first, offer) = offered[0].clone();
    let mut off = 0u64;
    while off < 50_000 {
        let len = (50_000 - off).min(u64::from(offer.chunk_max)) as u32;
        devs[first].send(&ask(offer.image, off, len)).await;
        match devs[first].recv().await {
            Some(Message::Chunk(c)) => assert_eq!(c.offset, off),
            other => panic!("expected CHUNK, got {other:?}"),
        }
        off += u64::from(len);
    }
    let mut next = 0;
    for &n in &waiting {
        if offer_within(&mut devs[n], Duration::from_secs(3))
            .await
            .is_some()
        {
            next += 1;
        }
    }
    assert_eq!(next, 1, "one freed slot, one more offer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_is_paced_at_the_instances_rate() {
    // 200 kB/s with bursts of 10 kB (a twentieth of a second): 100 kB
    // take at least 0.45 s, whatever the device asks for.
    let (api, _key, _k) = gateway_with_key(|c| {
        c.firmware.chunk_max = 1024;
        c.firmware.max_bytes_per_s = 200_000;
    })
    .await;
    let img = image(100_000, 9);
    let (_, rec) = upload(&api, img.clone(), "2.0.0", None).await;
    let id = rec["id"].as_str().unwrap().to_owned();
    let token = api.gw.add_device("pump-1").await;
    let mut dev = connect_fw(&api.gw, "pump-1", &token).await;
    firmware_job(&api, &["pump-1"], &id, 10).await;
    let offer = offer_within(&mut dev, Duration::from_secs(10))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut asked = 0u64;
    // Ask for everything at once: past the window the gateway stops
    // reading, and serves at its pace.
    let (mut rd, mut wr) = dev.split();
    let writer = tokio::spawn(async move {
        while asked < 100_000 {
            let length = (100_000 - asked).min(1024) as u32;
            wr.send(&ask(offer.image, asked, length)).await.unwrap();
            asked += u64::from(length);
        }
        wr
    });
    while got.len() < 100_000 {
        match rd.recv_within(Duration::from_secs(10)).await {
            Some(Message::Chunk(c)) => {
                assert_eq!(c.offset, got.len() as u64);
                got.extend_from_slice(&c.data);
            }
            other => panic!("expected CHUNK, got {other:?}"),
        }
    }
    let took = started.elapsed();
    let _wr = writer.await.unwrap();
    assert_eq!(got, img);
    assert!(took >= Duration::from_millis(400), "took {took:?}");
    let m = api.metrics().await;
    let paced: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("furrow_firmware_paced_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(paced > 0.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_paced_downloads_all_complete() {
    // Sessions contend for the pace, and two chunks fill a session's
    // outbox: every held request is served in the end, none waits forever
    // (a request held for room in the outbox once was, when the socket
    // took the outbox before the session looked again).
    const DEVICES: usize = 60;
    const SIZE: usize = 40_000;
    let (api, _key, _k) = gateway_with_key(|c| {
        c.firmware.chunk_max = 2048;
        c.firmware.max_bytes_per_s = 2_000_000;
        c.limits.max_unsent_bytes = 3000;
    })
    .await;
    let img = image(SIZE, 4);
    let (_, rec) = upload(&api, img.clone(), "2.0.0", None).await;
    let id = rec["id"].as_str().unwrap().to_owned();
    let mut names = Vec::new();
    let mut tasks = Vec::new();
    for n in 0..DEVICES {
        let name = format!("pump-{n}");
        let token = api.gw.add_device(&name).await;
        let mut dev = connect_fw(&api.gw, &name, &token).await;
        names.push(name);
        tasks.push(tokio::spawn(async move {
            let offer = offer_within(&mut dev, Duration::from_secs(20))
                .await
                .unwrap();
            // The window's worth at once, then one more per CHUNK.
            let chunk = u64::from(offer.chunk_max);
            let mut next = 0u64;
            let mut held = 0usize;
            let mut asks = u64::from(offer.window);
            while held < SIZE {
                while asks > 0 && next < SIZE as u64 {
                    let length = (SIZE as u64 - next).min(chunk) as u32;
                    dev.send(&ask(offer.image, next, length)).await;
                    next += u64::from(length);
                    asks -= 1;
                }
                match dev.recv_within(Duration::from_secs(20)).await {
                    Some(Message::Chunk(c)) => held += c.data.len(),
                    other => panic!("expected CHUNK, got {other:?} at {held}"),
                }
                asks += 1;
            }
        }));
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    firmware_job(&api, &refs, &id, 100).await;
    for t in tasks {
        within(Duration::from_secs(30), "a paced download", t)
            .await
            .unwrap();
    }
}
