//! Firmware rollouts with the device SDK, end to end: 200 devices update a
//! 1 MiB image through the fault-injecting proxy (cuts at random offsets,
//! stalls) and every one ends with a bit-identical image, having fetched
//! less than 1.5x of it; a byte flipped in transit is caught and its range
//! fetched again; an image signed by another key than the device's is
//! refused; a rollout with a fifth of the devices failing stops at its
//! abort rule; and SIGKILL of the gateway mid-rollout loses neither the
//! job nor the transfers.

#[path = "support/faults.rs"]
mod faults;
mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use faults::{FaultConfig, FaultProxy};
use furrow::firmware::SigningKey;
use furrow_client::{Backoff, Client, Config as ClientConfig, Event, FirmwareConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::http::Api;
use support::process::GatewayProcess;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VERSION: &str = "2.0.0";

fn keypair(dir: &Path, name: &str) -> (SigningKey, PathBuf) {
    let der = SigningKey::generate().unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &der).unwrap();
    (SigningKey::from_pkcs8(&der, name).unwrap(), path)
}

fn image(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn upload(http: &reqwest::Client, api: &str, bytes: Vec<u8>) -> String {
    let resp = http
        .post(format!("{api}/v1/firmware"))
        .query(&[("name", "pump"), ("version", VERSION), ("model", "p7")])
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> (StatusCode, Value) {
    let resp = http.post(url).json(&body).send().await.expect("POST");
    let st = resp.status();
    (st, resp.json().await.expect("JSON"))
}

/// `POST /v1/jobs` with `body` (which must be created): the job's id.
async fn start_job(http: &reqwest::Client, api: &str, body: Value) -> u64 {
    let (st, job) = post(http, format!("{api}/v1/jobs"), body).await;
    assert_eq!(st, StatusCode::CREATED, "{job}");
    job["job_id"].as_u64().unwrap()
}

/// Waits (bounded) until job `id` stops running; the job then.
async fn job_stopped(http: &reqwest::Client, api: &str, id: u64, limit: Duration) -> Value {
    within(limit, &format!("job {id}"), async {
        loop {
            let r = http.get(format!("{api}/v1/jobs/{id}")).send().await;
            if let Ok(r) = r {
                if let Ok(v) = r.json::<Value>().await {
                    if v["status"] != "running" {
                        return v;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// An SDK device taking updates into `dir`: installs what it is given
/// (after a short pause), or fails the install when `fail`.
fn device(
    addr: String,
    id: &str,
    token: String,
    key: [u8; 32],
    dir: &Path,
    tweak: impl FnOnce(&mut FirmwareConfig),
) -> Arc<Client> {
    let mut fw = FirmwareConfig::new(key, "p7", "1.0.0", dir.join(id));
    tweak(&mut fw);
    let mut cfg = ClientConfig::new(addr, id.to_owned(), token);
    cfg.firmware = Some(fw);
    cfg.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(300),
        multiplier: 2.0,
    };
    cfg.connect_timeout = Duration::from_secs(5);
    Arc::new(Client::start(cfg).unwrap())
}

/// Installs every image the device is handed (or fails it).
fn install_on_ready(client: &Arc<Client>, fail: bool, ready: Arc<std::sync::Mutex<Vec<PathBuf>>>) {
    let c = Arc::clone(client);
    let mut events = client.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(Event::FirmwareReady { version, path, .. }) => {
                    ready.lock().unwrap().push(path);
                    if fail {
                        let _ = c.firmware_failed("flash write failed (test)").await;
                    } else {
                        let _ = c.firmware_installing().await;
                        let _ = c.firmware_installed(&version).await;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_devices_update_through_a_faulty_network() {
    const DEVICES: usize = 200;
    const SIZE: usize = 1 << 20;
    support::init_test_logs();
    let keys = tempfile::tempdir().unwrap();
    let (key, path) = keypair(keys.path(), "fleet.key");
    let api = Api::start_with(|c| c.firmware.signing_key_file = path).await;
    let img = image(SIZE);
    let id = upload(&api.http, &api.gw.api_url(""), img.clone()).await;
    let proxy = FaultProxy::start(
        api.gw.addr(),
        FaultConfig {
            max_chunk: 16 * 1024,
            delay_prob: 0.02,
            delay_ms: 1..=5,
            stall_prob: 0.002,
            stall_ms: 100..=500,
            // Downstream cuts land anywhere in an image's transfer;
            // upstream ones among the requests and reports.
            cut_up_prob: 0.2,
            cut_up_after: 1..=3_000,
            cut_down_prob: 0.5,
            cut_down_after: 1..=(SIZE as u64 + 100_000),
            reset_prob: 0.5,
            log_uniform_cuts: false,
        },
    )
    .await;
    let dirs = tempfile::tempdir().unwrap();
    let mut clients = Vec::new();
    let ready = Arc::new(std::sync::Mutex::new(Vec::new()));
    for n in 0..DEVICES {
        let name = format!("pump-{n:03}");
        let token = api.gw.add_device(&name).await;
        let (st, v) = api
            .call(
                reqwest::Method::PATCH,
                &format!("/v1/devices/{name}/tags"),
                Some(json!({"fleet": "a"})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let c = device(
            proxy.addr().to_string(),
            &name,
            token,
            key.public(),
            dirs.path(),
            |_| {},
        );
        install_on_ready(&c, false, Arc::clone(&ready));
        clients.push((name, c));
    }
    let base = api.gw.api_url("");
    let job_id = start_job(
        &api.http,
        &base,
        json!({"target": {"tags": {"fleet": "a"}},
                   "operation": {"firmware": {"image": id, "max_downloads": 50}}}),
    )
    .await;
    let done = job_stopped(&api.http, &base, job_id, Duration::from_secs(240)).await;
    let counts = proxy.counts();
    eprintln!("proxy: {counts:?}");
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["succeeded"], DEVICES as u64, "{done}");
    assert!(
        counts.cuts_up + counts.cuts_down > 20,
        "the proxy cut connections: {counts:?}"
    );
    let mut worst = 0u64;
    for (name, c) in &clients {
        let got = std::fs::read(dirs.path().join(name).join(format!("{id}.bin")))
            .unwrap_or_else(|e| panic!("{name}: no image: {e}"));
        assert!(got == img, "{name}: the image is not bit-identical");
        let stats = c.firmware_stats();
        worst = worst.max(stats.bytes_received);
        assert!(
            stats.bytes_received * 2 < SIZE as u64 * 3,
            "{name} fetched {} bytes for a {SIZE}-byte image",
            stats.bytes_received
        );
        c.close().await;
    }
    eprintln!(
        "most fetched by one device: {worst} bytes ({:.2}x)",
        worst as f64 / SIZE as f64
    );
    assert_eq!(ready.lock().unwrap().len(), DEVICES);
}

/// A proxy that flips one byte in the data of the first CHUNK it sees
/// (gateway to device) and forwards everything else faithfully.
async fn corrupting_proxy(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let flipped = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&flipped);
    tokio::spawn(async move {
        while let Ok((dev, _)) = l.accept().await {
            let gw = tokio::net::TcpStream::connect(upstream).await.unwrap();
            let (mut dr, mut dw) = dev.into_split();
            let (mut gr, mut gw) = gw.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut dr, &mut gw).await;
                let _ = gw.shutdown().await;
            });
            let f = Arc::clone(&f);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = vec![0u8; 64 * 1024];
                loop {
                    let n = match gr.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    // Forward whole frames, flipping one CHUNK data byte.
                    while buf.len() >= 6 {
                        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                        if buf.len() < 4 + len {
                            break;
                        }
                        let mut frame: Vec<u8> = buf.drain(..4 + len).collect();
                        if frame[4] == 0x11
                            && frame.len() > 6 + 44 + 100
                            && !f.swap(true, Ordering::SeqCst)
                        {
                            frame[6 + 44 + 100] ^= 0x40;
                        }
                        if dw.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, flipped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_caught_and_its_range_fetched_again() {
    let keys = tempfile::tempdir().unwrap();
    let (key, path) = keypair(keys.path(), "fleet.key");
    let api = Api::start_with(|c| c.firmware.signing_key_file = path).await;
    let img = image(300_000);
    let id = upload(&api.http, &api.gw.api_url(""), img.clone()).await;
    let (addr, flipped) = corrupting_proxy(api.gw.addr()).await;
    let token = api.gw.add_device("pump-1").await;
    let dirs = tempfile::tempdir().unwrap();
    let c = device(
        addr.to_string(),
        "pump-1",
        token,
        key.public(),
        dirs.path(),
        |_| {},
    );
    let ready = Arc::new(std::sync::Mutex::new(Vec::new()));
    install_on_ready(&c, false, Arc::clone(&ready));
    let base = api.gw.api_url("");
    let job_id = start_job(
        &api.http,
        &base,
        json!({"target": {"devices": ["pump-1"]}, "operation": {"firmware": {"image": id}}}),
    )
    .await;
    let done = job_stopped(&api.http, &base, job_id, Duration::from_secs(30)).await;
    assert_eq!(done["counts"]["succeeded"], 1, "{done}");
    assert!(flipped.load(Ordering::SeqCst), "the proxy flipped a byte");
    let stats = c.firmware_stats();
    assert!(stats.chunks_retried >= 1, "{stats:?}");
    let got = std::fs::read(&ready.lock().unwrap()[0]).unwrap();
    assert!(got == img, "bit-identical after the re-fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_signed_by_another_key_is_refused_by_the_device() {
    let keys = tempfile::tempdir().unwrap();
    let (_gateway_key, path) = keypair(keys.path(), "other.key");
    let (device_key, _) = keypair(keys.path(), "fleet.key");
    let api = Api::start_with(|c| c.firmware.signing_key_file = path).await;
    let id = upload(&api.http, &api.gw.api_url(""), image(100_000)).await;
    let token = api.gw.add_device("pump-1").await;
    let dirs = tempfile::tempdir().unwrap();
    let c = device(
        api.gw.addr().to_string(),
        "pump-1",
        token,
        device_key.public(),
        dirs.path(),
        |_| {},
    );
    let mut events = c.events();
    let base = api.gw.api_url("");
    let job_id = start_job(
        &api.http,
        &base,
        json!({"target": {"devices": ["pump-1"]}, "operation": {"firmware": {"image": id}}}),
    )
    .await;
    let reason = within(Duration::from_secs(20), "refusal", async {
        loop {
            if let Ok(Event::FirmwareRefused { reason, image }) = events.recv().await {
                assert_eq!(image, id);
                return reason;
            }
        }
    })
    .await;
    assert!(reason.contains("signature"), "{reason}");
    let done = job_stopped(&api.http, &base, job_id, Duration::from_secs(20)).await;
    assert_eq!(done["counts"]["failed"], 1, "{done}");
    assert_eq!(c.firmware_stats().bytes_received, 0, "nothing fetched");
    assert_eq!(c.firmware_stats().refused, 1);
    let (_, st) = api.get("/v1/devices/pump-1/state").await;
    let fw = &st["reported"]["document"]["firmware"];
    assert_eq!(fw["version"], "1.0.0", "{st}");
    assert_eq!(fw["update"]["state"], "failed", "{st}");
    assert_eq!(fw["update"]["reason"], "bad signature", "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_a_fifth_failing_stops_at_its_abort_rule() {
    const DEVICES: usize = 200;
    let keys = tempfile::tempdir().unwrap();
    let (key, path) = keypair(keys.path(), "fleet.key");
    let api = Api::start_with(|c| c.firmware.signing_key_file = path).await;
    let id = upload(&api.http, &api.gw.api_url(""), image(20_000)).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    let mut clients = Vec::new();
    let ready = Arc::new(std::sync::Mutex::new(Vec::new()));
    for n in 0..DEVICES {
        let name = format!("pump-{n:03}");
        let token = api.gw.add_device(&name).await;
        let fail = furrow::jobs::in_share(&name, 0.2);
        let c = device(
            api.gw.addr().to_string(),
            &name,
            token,
            key.public(),
            dirs.path(),
            |_| {},
        );
        install_on_ready(&c, fail, Arc::clone(&ready));
        clients.push(c);
        names.push(name);
    }
    let failing = names
        .iter()
        .filter(|n| furrow::jobs::in_share(n, 0.2))
        .count();
    assert!((20..=60).contains(&failing), "{failing} of {DEVICES} fail");
    // 1,200 a minute: twenty a second; abort past 10 % of 20 completed.
    let base = api.gw.api_url("");
    let job_id = start_job(
        &api.http,
        &base,
        json!({"target": {"devices": names},
                   "operation": {"firmware": {"image": id}},
                   "rate_per_minute": 1200,
                   "abort": {"failed_pct": 10.0, "min_completed": 20}}),
    )
    .await;
    let done = job_stopped(&api.http, &base, job_id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "aborted", "{done}");
    let c = &done["counts"];
    let started = done["started"].as_u64().unwrap();
    assert!(started < DEVICES as u64 / 2, "stopped early: {done}");
    assert_eq!(
        c["cancelled"].as_u64().unwrap() + started,
        DEVICES as u64,
        "every device not started is cancelled: {done}"
    );
    assert!(c["failed"].as_u64().unwrap() >= 2, "{done}");
    // Nothing starts after the rule tripped: the count holds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, later) = api.get(&format!("/v1/jobs/{job_id}")).await;
    assert_eq!(later["started"], started, "{later}");
    for c in clients {
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_rollout_resumes_the_job_and_every_transfer() {
    const DEVICES: usize = 20;
    const SIZE: usize = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (key, path) = keypair(dir.path(), "fleet.key");
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = [("FURROW_FIRMWARE__SIGNING_KEY_FILE", path.to_str().unwrap())];
    let http = reqwest::Client::new();
    let mut gw = GatewayProcess::spawn_with_env(dir.path(), "gw", listen, &[], &env);
    gw.ready(&http).await;
    let api = format!("http://{}", gw.api);
    let img = image(SIZE);
    let id = upload(&http, &api, img.clone()).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut clients = Vec::new();
    let mut names = Vec::new();
    let ready = Arc::new(std::sync::Mutex::new(Vec::new()));
    for n in 0..DEVICES {
        let name = format!("pump-{n:02}");
        let (st, v) = post(
            &http,
            format!("{api}/v1/devices"),
            json!({"device_id": name}),
        )
        .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        let token = v["token"].as_str().unwrap().to_owned();
        // Small ranges one at a time: transfers take long enough to be
        // cut by the kill.
        let c = device(
            listen.to_string(),
            &name,
            token,
            key.public(),
            dirs.path(),
            |f| {
                f.window = 1;
                f.chunk_len = 2048;
            },
        );
        install_on_ready(&c, false, Arc::clone(&ready));
        clients.push(c);
        names.push(name);
    }
    let job_id = start_job(
        &http,
        &api,
        json!({"target": {"devices": names}, "operation": {"firmware": {"image": id}}}),
    )
    .await;
    // Kill once some devices are part way through.
    within(Duration::from_secs(60), "transfers under way", async {
        loop {
            let partway = clients
                .iter()
                .filter(|c| {
                    let b = c.firmware_stats().bytes_received;
                    b > 0 && b < SIZE as u64
                })
                .count();
            if partway >= 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    let at_kill: Vec<u64> = clients
        .iter()
        .map(|c| c.firmware_stats().bytes_received)
        .collect();
    let cut = at_kill
        .iter()
        .filter(|&&b| b > 0 && b < SIZE as u64)
        .count();
    assert!(cut >= 3, "transfers cut by the kill: {at_kill:?}");
    let mut gw = GatewayProcess::spawn_with_env(dir.path(), "gw", listen, &[], &env);
    gw.ready(&http).await;
    let api = format!("http://{}", gw.api);
    let done = job_stopped(&http, &api, job_id, Duration::from_secs(180)).await;
    assert_eq!(done["counts"]["succeeded"], DEVICES as u64, "{done}");
    assert_eq!(
        done["started"], DEVICES as u64,
        "each device started once: {done}"
    );
    for (n, c) in clients.iter().enumerate() {
        let got = std::fs::read(dirs.path().join(&names[n]).join(format!("{id}.bin"))).unwrap();
        assert!(got == img, "{}: bit-identical", names[n]);
        let b = c.firmware_stats().bytes_received;
        assert!(
            b * 2 < SIZE as u64 * 3,
            "{}: resumed, not restarted: {b} bytes (at the kill: {})",
            names[n],
            at_kill[n]
        );
        c.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_takes_updates_with_a_failing_share() {
    let keys = tempfile::tempdir().unwrap();
    let (key, path) = keypair(keys.path(), "fleet.key");
    let api = Api::start_with(|c| c.firmware.signing_key_file = path).await;
    let resp = api
        .http
        .post(api.gw.api_url("/v1/firmware"))
        .query(&[("name", "sim"), ("version", VERSION), ("model", "sim")])
        .body(image(50_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let data = api.gw.config().data_dir.clone();
    let dl = tempfile::tempdir().unwrap();
    let sim = furrow_cmd(&[
        "sim",
        "--addr",
        &api.gw.addr().to_string(),
        "--data-dir",
        data.to_str().unwrap(),
        "--devices",
        "20",
        "--rate",
        "1",
        "--duration",
        "10",
        "--firmware-key",
        &hex::encode(key.public()),
        "--firmware-dir",
        dl.path().to_str().unwrap(),
        "--firmware-fail-share",
        "0.3",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("furrow sim starts");
    api.gw.wait_sessions(20, Duration::from_secs(20)).await;
    let ids: Vec<String> = (0..20).map(|n| format!("sim-{n}")).collect();
    let base = api.gw.api_url("");
    let job_id = start_job(
        &api.http,
        &base,
        json!({"target": {"devices": ids}, "operation": {"firmware": {"image": id}}}),
    )
    .await;
    let done = job_stopped(&api.http, &base, job_id, Duration::from_secs(30)).await;
    let failing = ids
        .iter()
        .filter(|i| furrow::jobs::in_share(i, 0.3))
        .count() as u64;
    assert!(failing > 0 && failing < 20, "{failing}");
    assert_eq!(done["counts"]["failed"], failing, "{done}");
    assert_eq!(done["counts"]["succeeded"], 20 - failing, "{done}");
    let out = sim.wait_with_output().expect("furrow sim ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
