//! A full disk under a streaming fleet, on a small filesystem this test
//! mounts (tmpfs, 48 MiB; needs root, which CI has: there it fails when it
//! cannot mount, elsewhere it says so and stops).
//!
//! Twice: once below `storage.min_free_bytes` (the gateway stops taking
//! telemetry before the disk is full), once with no floor until SQLite's
//! writes fail. Each time `/readyz` answers 503 while commits cannot be
//! made, no ACK moves, no device is disconnected; when space returns,
//! ingest resumes by itself and every device's readings are stored
//! completely and exactly once.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_client::{Client, Config as ClientConfig, Event};
use support::http::{status_of, until_status};
use support::*;

const DEVICES: usize = 8;
const FS_BYTES: u64 = 48 << 20;

/// A tmpfs mounted for the test, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_BYTES}")])
            .arg("furrow-test")
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(self.path()).expect("statvfs");
        st.f_bavail * st.f_frsize
    }

    /// Writes a ballast file leaving about `leave` bytes free.
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path().join("ballast");
        let size = self.free().saturating_sub(leave);
        let mut f = std::fs::File::create(&path).expect("ballast");
        let block = vec![0u8; 1 << 20];
        let mut left = size;
        use std::io::Write;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if f.write_all(&block[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn small_fs() -> Option<SmallFs> {
    match SmallFs::mount() {
        Some(fs) => Some(fs),
        None if std::env::var_os("CI").is_some() => {
            panic!("cannot mount a tmpfs for the full-disk test (CI runs as root and must)")
        }
        None => {
            eprintln!("SKIPPED: mounting a tmpfs needs root; the full-disk test did not run");
            None
        }
    }
}

/// Streams a fleet into a gateway on `fs`, takes the space away with
/// `leave` bytes left, checks that nothing moves and `/readyz` says so,
/// gives the space back, and checks that everything is stored once.
async fn full_disk_round(fs: &SmallFs, min_free_bytes: u64, leave: u64) {
    let data = fs.path().join(format!("data-{min_free_bytes}"));
    let gw = TestGateway::start_with(|c| {
        c.data_dir = data.clone();
        c.storage.min_free_bytes = min_free_bytes;
    })
    .await;
    let http = reqwest::Client::new();
    let ready_url = gw.api_url("/readyz");
    assert_eq!(status_of(&http, &ready_url).await, 200);

    let disconnects = Arc::new(AtomicUsize::new(0));
    let streaming = Arc::new(AtomicBool::new(true));
    let (mut clients, mut senders) = (Vec::new(), Vec::new());
    for i in 0..DEVICES {
        let id = format!("meter-{i}");
        let token = gw.add_device(&id).await;
        let client = Arc::new(
            Client::start(ClientConfig::new(gw.addr().to_string(), id.clone(), token))
                .expect("client"),
        );
        let mut events = client.events();
        let d = Arc::clone(&disconnects);
        tokio::spawn(async move {
            while let Ok(e) = events.recv().await {
                if let Event::Disconnected { reason, .. } = e {
                    eprintln!("disconnect: {reason:?}");
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        senders.push(stream_while(
            Arc::clone(&client),
            Arc::clone(&streaming),
            Duration::from_millis(10),
        ));
        clients.push((id, client));
    }
    let acked = |clients: &Vec<(String, Arc<Client>)>| -> u64 {
        clients.iter().map(|(_, c)| *c.acked().borrow()).sum()
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(acked(&clients) > 0, "nothing ACKed before the disk filled");

    let ballast = fs.fill(leave);
    let (secs, url) = (Duration::from_secs(15), &ready_url);
    until_status(&http, url, 503, secs, "/readyz 503 while full").await;
    // What was in flight settles; then nothing moves.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = acked(&clients);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(acked(&clients), held, "ACKs moved while the disk was full");
    assert_eq!(gw.registry().len(), DEVICES, "every device still connected");
    let storage: serde_json::Value = http
        .get(gw.api_url("/v1/storage"))
        .send()
        .await
        .expect("GET /v1/storage")
        .json()
        .await
        .expect("JSON");
    assert_eq!(storage["commits_ok"], false, "{storage}");

    std::fs::remove_file(&ballast).expect("free the space");
    until_status(&http, url, 200, Duration::from_secs(20), "ready again").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = stop_and_flush(&streaming, senders, &clients).await;
    assert!(acked(&clients) > held, "ingest did not resume");
    assert_eq!(
        disconnects.load(Ordering::Relaxed),
        0,
        "devices were disconnected"
    );
    for ((id, _), n) in clients.iter().zip(&sent) {
        assert_stored_exactly(&*gw.store(), id, *n, "after the disk filled").await;
    }
    for (_, c) in &clients {
        c.close().await;
    }
    // The WAL does not keep the size it grew to.
    let wal = data.join("furrow.db-wal");
    within(Duration::from_secs(10), "the WAL cut back", async {
        loop {
            let size = std::fs::metadata(&wal).map_or(0, |m| m.len());
            if size <= 17 << 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_free_space_floor_ingest_waits_and_loses_nothing() {
    let Some(fs) = small_fs() else { return };
    full_disk_round(&fs, 8 << 20, 4 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_acks_and_ingest_resumes_when_space_returns() {
    let Some(fs) = small_fs() else { return };
    full_disk_round(&fs, 0, 0).await;
}
