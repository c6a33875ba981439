//! Crash recovery end to end: `kill -9` the gateway process while 50
//! devices (real SDK clients) stream, start it again on the same data
//! directory and port: every device's stored telemetry is exactly seq 1..N,
//! no gap, no duplicate, and every `flush()` returns.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use furrow_client::{Backoff, Client, Config, Disconnect, Event as ClientEvent};
use support::{assert_seqs, free_port, furrow_cmd, stored_seqs_in, within};
use tokio::sync::broadcast;
use tokio::time::Instant;

const DEVICES: usize = 50;
const N: u64 = 400;

/// A `furrow serve` child, killed on drop if still running.
struct ServeChild {
    child: Child,
    log: PathBuf,
}

impl ServeChild {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `furrow serve` on `addr` over `data`, logging to `log`; returns once
    /// it accepts connections (15 s at most).
    async fn start(addr: SocketAddr, data: &Path, log: PathBuf) -> Self {
        let child = furrow_cmd(&[
            "serve",
            "--listen",
            &addr.to_string(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("furrow serve starts");
        let mut me = Self { child, log };
        let started = Instant::now();
        loop {
            if let Some(status) = me.child.try_wait().unwrap() {
                panic!("furrow serve exited early ({status}):\n{}", me.logs());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return me;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "furrow serve never listened on {addr}:\n{}",
                me.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and reap.
    fn kill9(&mut self) {
        let pid = self.child.id().to_string();
        let st = Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill runs");
        assert!(st.success(), "kill -KILL {pid} failed");
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "killed by SIGKILL: {status}");
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A read-only connection of our own to the gateway's database.
fn open_ro(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("cannot open {} read-only: {e}", db.display()));
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

async fn count_rows(db: &Path) -> u64 {
    let db = db.to_path_buf();
    tokio::task::spawn_blocking(move || {
        open_ro(&db)
            .query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get::<_, i64>(0))
            .unwrap() as u64
    })
    .await
    .unwrap()
}

/// What a device saw.
#[derive(Debug)]
struct DeviceRun {
    id: String,
    flushed: bool,
    pending: usize,
    disconnects: u64,
    reasons: Vec<String>,
}

async fn count_disconnects(mut rx: broadcast::Receiver<ClientEvent>) -> (u64, Vec<String>) {
    let (mut n, mut reasons) = (0, Vec::new());
    loop {
        match rx.recv().await {
            Ok(ClientEvent::Disconnected { reason, .. }) if reason != Disconnect::Closed => {
                n += 1;
                if reasons.len() < 4 {
                    reasons.push(format!("{reason:?}"));
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return (n, reasons),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_stream_and_restarted_stores_everything_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = data.join("furrow.db");

    // Provision the devices before the gateway runs.
    let mut devices = Vec::new();
    {
        let store = furrow::server::open_store(&furrow::Config {
            data_dir: data.clone(),
            ..furrow::Config::default()
        })
        .unwrap();
        for i in 0..DEVICES {
            let id = format!("crash-{i:02}");
            let token = furrow::devices::add_device(&store, &id).await.unwrap();
            devices.push((id, token));
        }
    }

    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut gw = ServeChild::start(addr, &data, dir.path().join("serve1.log")).await;

    // 50 devices, each N readings at about 250 per second.
    let mut tasks = Vec::new();
    for (id, token) in devices {
        let mut cfg = Config::new(addr.to_string(), id.clone(), token);
        cfg.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        };
        cfg.connect_timeout = Duration::from_secs(5);
        tasks.push(tokio::spawn(async move {
            let client = Client::start(cfg).unwrap();
            let watcher = tokio::spawn(count_disconnects(client.events()));
            for n in 1..=N {
                let p = format!("{{\"n\":{n},\"temp_c\":21.5}}");
                assert_eq!(client.send(1, p).await.unwrap(), n);
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }
            let flushed = tokio::time::timeout(Duration::from_secs(60), client.flush())
                .await
                .is_ok();
            let pending = client.pending();
            client.close().await;
            drop(client);
            let (disconnects, reasons) = watcher.await.unwrap();
            DeviceRun {
                id,
                flushed,
                pending,
                disconnects,
                reasons,
            }
        }));
    }

    // Kill once about a quarter is stored: mid-stream for every device.
    let total = DEVICES as u64 * N;
    let started = Instant::now();
    loop {
        let stored = count_rows(&db).await;
        if stored >= total / 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {stored} of {total} stored after 30 s:\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.kill9();
    let killed_at = Instant::now();
    let first_logs = gw.logs();
    drop(gw);

    // Restart on the same directory and port.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let gw = ServeChild::start(addr, &data, dir.path().join("serve2.log")).await;
    eprintln!("restarted {:?} after the kill", killed_at.elapsed());

    let mut runs = Vec::new();
    for t in tasks {
        runs.push(
            within(Duration::from_secs(90), "device task", t)
                .await
                .unwrap(),
        );
    }
    let failed: Vec<&DeviceRun> = runs
        .iter()
        .filter(|r| !r.flushed || r.pending > 0)
        .collect();
    assert!(
        failed.is_empty(),
        "flush() did not return within 60 s for {} devices: {failed:?}\n--- first gateway ---\n{}\n\
         --- restarted gateway ---\n{}",
        failed.len(),
        first_logs,
        gw.logs()
    );

    // Every device: exactly 1..=N, read through a read-only connection.
    let ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    let db2 = db.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let conn = open_ro(&db2);
        ids.iter()
            .map(|id| (id.clone(), stored_seqs_in(&conn, id)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (id, seqs) in &stored {
        assert_seqs(seqs, 1..=N, &format!("{id} after kill -9 and restart"));
    }
    // Every device lost its connection to the kill and came back.
    for r in &runs {
        assert!(
            r.disconnects >= 1,
            "{}: no disconnect seen although the gateway was killed: {r:?}",
            r.id
        );
    }
    let disconnects: u64 = runs.iter().map(|r| r.disconnects).sum();
    eprintln!(
        "{} devices reconnected after the kill; {disconnects} disconnects in all; e.g. {:?}",
        runs.len(),
        runs[0].reasons
    );
}
