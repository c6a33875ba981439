//! The durable outbox (`Config::outbox_path`, `furrow sim --outbox-dir`):
//! the device process is killed mid-stream and started again with the same
//! outbox path: nothing lost, nothing duplicated, seqs continue.

#[path = "support/faults.rs"]
mod faults;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use faults::{FaultConfig, FaultProxy};
use furrow_client::outbox::{FileOutbox, FileOutboxOptions, Outbox};
use furrow_client::{Backoff, Client, Config, Event as ClientEvent};
use support::{assert_seqs, furrow_cmd, stored_seqs_async, within, TestGateway};
use tokio::sync::broadcast;
use tokio::time::Instant;

/// A child process, killed on drop if still running.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Opens a device's outbox file (after its process is gone) and returns
/// (last_seq, pending seqs).
fn outbox_state(path: &Path) -> (u64, Vec<u64>) {
    let ob = FileOutbox::open(path, FileOutboxOptions::default())
        .unwrap_or_else(|e| panic!("cannot open outbox {}: {e}", path.display()));
    let pending = ob.after(0, usize::MAX).iter().map(|e| e.seq).collect();
    (ob.last_seq(), pending)
}

fn outbox_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.outbox"))
}

/// `furrow sim` (real binary, real SDK, durable outboxes) killed with
/// SIGKILL while streaming with many readings unacknowledged, then run
/// again on the same --outbox-dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_killed_mid_stream_and_restarted_loses_and_duplicates_nothing() {
    const K: usize = 5;
    let gw = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let devices_file = dir.path().join("devices.txt");
    let outboxes = dir.path().join("outboxes");
    let mut ids = Vec::new();
    let mut lines = String::new();
    for i in 0..K {
        let id = format!("obx-{i}");
        let token = gw.add_device(&id).await;
        lines.push_str(&format!("{id} {token}\n"));
        ids.push(id);
    }
    std::fs::write(&devices_file, lines).unwrap();
    // A transparent proxy, paused before the kill: the devices' last
    // readings pile up unacknowledged (some of them read by the gateway,
    // some not), as they would on a congested network.
    let proxy = FaultProxy::start(gw.addr(), FaultConfig::transparent()).await;
    let proxy_addr = proxy.addr().to_string();
    let gw_addr = gw.addr().to_string();
    let sim = |addr: &str, duration: &str, log: &Path| {
        furrow_cmd(&[
            "sim",
            "--addr",
            addr,
            "--devices-file",
            devices_file.to_str().unwrap(),
            "--devices",
            &K.to_string(),
            "--rate",
            "200",
            "--payload-bytes",
            "80",
            "--duration",
            duration,
            "--outbox-dir",
            outboxes.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("furrow sim starts")
    };

    // Run 1: a long run, killed once every device has stored a few hundred.
    let log1 = dir.path().join("sim1.log");
    let mut run1 = ChildGuard(sim(&proxy_addr, "60", &log1));
    let started = Instant::now();
    loop {
        if let Some(status) = run1.0.try_wait().unwrap() {
            panic!("sim exited early ({status}):\n{}", read(&log1));
        }
        let mut least = u64::MAX;
        for id in &ids {
            least = least.min(stored_seqs_async(&gw.db_path(), id).await.len() as u64);
        }
        if least >= 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sim made no progress (least stored {least}):\n{}",
            read(&log1)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // First the ACKs stop (readings stored but unacknowledged), then the
    // readings too (readings the gateway never sees).
    proxy.set_paused_dirs(false, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_paused_dirs(true, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    run1.0.kill().expect("SIGKILL the sim");
    let status = run1.0.wait().unwrap();
    assert!(!status.success(), "killed, not exited: {status}");
    // The proxy goes away with what it held (its connections are reset):
    // some readings reached the gateway unacknowledged, some never did.
    drop(proxy);

    // Between the runs: the gateway has released every session; whatever
    // it stored is at or below the outbox's seq counter, and every seq up to
    // that counter is stored or still pending (nothing lost in the crash).
    let mut before = Vec::new();
    for id in &ids {
        gw.wait_offline(id).await;
        let stored = stored_seqs_async(&gw.db_path(), id).await;
        let (last, pending) = outbox_state(&outbox_path(&outboxes, id));
        let max_stored = stored.last().copied().unwrap_or(0);
        assert!(
            max_stored <= last,
            "{id}: the gateway stored seq {max_stored} but the outbox only counts to {last}: \
             the restarted device would reuse stored seqs and its new readings would be \
             taken for duplicates"
        );
        let have: BTreeSet<u64> = stored.iter().chain(pending.iter()).copied().collect();
        let lost: Vec<u64> = (1..=last).filter(|s| !have.contains(s)).take(20).collect();
        assert!(
            lost.is_empty(),
            "{id}: seqs neither stored nor in the outbox after the kill: {lost:?} \
             (last_seq {last}, stored {}, pending {})",
            stored.len(),
            pending.len()
        );
        assert_eq!(
            stored.len(),
            stored.iter().collect::<BTreeSet<_>>().len(),
            "{id}: duplicates stored"
        );
        eprintln!(
            "{id} after kill: outbox last_seq {last}, pending {}, stored {}",
            pending.len(),
            stored.len()
        );
        before.push((last, pending.len()));
    }
    assert!(
        before.iter().any(|(_, pending)| *pending > 0),
        "the kill should leave unacknowledged readings behind: {before:?}"
    );

    // Run 2: a short run on the same outboxes; it flushes at the end.
    let log2 = dir.path().join("sim2.log");
    let mut run2 = ChildGuard(sim(&gw_addr, "2", &log2));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = run2.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the second sim run did not finish:\n{}",
            read(&log2)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "second sim run failed ({status}):\n{}\n{}",
        read(&log2),
        read(&log2.with_extension("out"))
    );

    for (id, (last_before, _)) in ids.iter().zip(&before) {
        let (last, pending) = outbox_state(&outbox_path(&outboxes, id));
        assert!(
            last > *last_before,
            "{id}: seqs continue across the restart ({last_before} then {last})"
        );
        assert!(
            pending.is_empty(),
            "{id}: {} readings still unacknowledged after the final flush (first {:?}):\n{}",
            pending.len(),
            pending.first(),
            read(&log2)
        );
        eprintln!("{id} after restart: outbox last_seq {last}");
        gw.wait_offline(id).await;
        assert_seqs(
            &stored_seqs_async(&gw.db_path(), id).await,
            1..=last,
            &format!("{id} after kill -9 and restart"),
        );
    }
}

/// Waits until the client's shared state (and so its outbox file) is gone:
/// the event channel closes when the background task has ended.
async fn wait_dropped(mut rx: broadcast::Receiver<ClientEvent>) {
    within(
        Duration::from_secs(10),
        "the dropped client's task ends",
        async {
            loop {
                match rx.recv().await {
                    Err(broadcast::error::RecvError::Closed) => return,
                    _ => continue,
                }
            }
        },
    )
    .await
}

fn payload(n: u64) -> Vec<u8> {
    format!("{{\"n\":{n}}}").into_bytes()
}

/// Every stored (seq, payload) of a device.
fn stored_payloads(db: &Path, id: &str) -> Vec<(u64, Vec<u8>)> {
    let c = support::open_db(db);
    let mut stmt = c
        .prepare(
            "SELECT t.seq, t.payload FROM telemetry t JOIN devices d ON d.id = t.device \
             WHERE d.device_id = ?1 ORDER BY t.seq",
        )
        .unwrap();
    let rows = stmt
        .query_map([id], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    rows
}

/// The SDK alone, in process: a client with an outbox file delivers some
/// readings, a second one queues more while the gateway is unreachable and
/// is dropped without flush, a third on the same file delivers everything
/// exactly once, with seqs continuing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_file_survives_client_restarts() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("obx-sdk").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev").join("obx-sdk.outbox");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = |addr: String| {
        let mut c = Config::new(addr, "obx-sdk", token.clone());
        c.outbox_path = Some(path.clone());
        c.backoff = Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            multiplier: 2.0,
        };
        c
    };
    let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut n = 0;

    // 1. Connected: 50 delivered, closed cleanly.
    let a = Client::start(cfg(gw.addr().to_string())).unwrap();
    for _ in 0..50 {
        n += 1;
        let seq = a.send(1, payload(n)).await.unwrap();
        sent.push((seq, payload(n)));
    }
    within(Duration::from_secs(10), "flush", a.flush())
        .await
        .unwrap();
    a.close().await;
    let rx = a.events();
    drop(a);
    wait_dropped(rx).await;

    // 2. Gateway unreachable: 80 queued, dropped without flush.
    let b = Client::start(cfg(format!("127.0.0.1:{closed}"))).unwrap();
    assert_eq!(b.last_seq(), 50, "the seq counter survives");
    assert_eq!(b.pending(), 0);
    for _ in 0..80 {
        n += 1;
        let seq = b.send(1, payload(n)).await.unwrap();
        sent.push((seq, payload(n)));
    }
    assert_eq!(b.pending(), 80);
    let rx = b.events();
    drop(b);
    wait_dropped(rx).await;
    assert_eq!(
        stored_seqs_async(&gw.db_path(), "obx-sdk").await.len(),
        50,
        "nothing of phase 2 reached the gateway"
    );

    // 3. A new client on the same file: the 80 come back and are delivered,
    // new readings continue the seqs.
    let c = Client::start(cfg(gw.addr().to_string())).unwrap();
    assert_eq!(c.last_seq(), 130);
    assert!(c.pending() <= 80);
    for _ in 0..20 {
        n += 1;
        let seq = c.send(1, payload(n)).await.unwrap();
        sent.push((seq, payload(n)));
    }
    within(Duration::from_secs(10), "flush", c.flush())
        .await
        .unwrap();
    assert_eq!(c.pending(), 0);
    c.close().await;
    let rx = c.events();
    drop(c);
    wait_dropped(rx).await;

    let seqs: Vec<u64> = sent.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=150).collect::<Vec<_>>(),
        "seqs assigned 1..=150 in order"
    );
    gw.wait_offline("obx-sdk").await;
    let stored = stored_payloads(&gw.db_path(), "obx-sdk");
    assert_seqs(
        &stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        1..=150,
        "stored",
    );
    for ((s, p), (ws, wp)) in stored.iter().zip(&sent) {
        assert_eq!(s, ws);
        assert_eq!(
            String::from_utf8_lossy(p),
            String::from_utf8_lossy(wp),
            "seq {s} stored with another reading's payload"
        );
    }
    let (last, pending) = outbox_state(&path);
    assert_eq!(last, 150);
    assert!(pending.is_empty());
}

/// A client whose outbox file is never opened again, sharing a device with
/// the test: the gateway's last_seq for it is `n` after this.
async fn deliver(gw: &TestGateway, id: &str, token: &str, outbox: Option<PathBuf>, n: u64) {
    let mut cfg = Config::new(gw.addr().to_string(), id, token);
    cfg.outbox_path = outbox;
    let client = Client::start(cfg).unwrap();
    for i in 1..=n {
        client.send(1, payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "flush", client.flush())
        .await
        .unwrap();
    client.close().await;
    let rx = client.events();
    drop(client);
    wait_dropped(rx).await;
}

/// A device restarts with the default in-memory outbox (its seq counter
/// starts again at 0) and queues readings while the network is down. On
/// WELCOME (last_seq 100) the SDK must renumber them after 100 (the
/// gateway would take seqs 1..10 for duplicates and drop them), and a
/// `flush()` called before the connection must not return until they are
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_outbox_restart_continues_after_welcome_last_seq() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("mem-restart").await;
    deliver(&gw, "mem-restart", &token, None, 100).await;

    // The "restarted" device reaches the gateway through a paused proxy:
    // its HELLO does not get through until the test resumes it.
    let proxy = FaultProxy::start(gw.addr(), FaultConfig::transparent()).await;
    proxy.set_paused(true);
    let mut cfg = Config::new(proxy.addr().to_string(), "mem-restart", token.clone());
    cfg.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        multiplier: 2.0,
    };
    let client = std::sync::Arc::new(Client::start(cfg).unwrap());
    let mut events = client.events();
    for i in 101..=110 {
        client.send(1, payload(i)).await.unwrap();
    }
    assert_eq!(client.last_seq(), 10, "a fresh memory outbox counts from 0");
    let flush = tokio::spawn({
        let client = std::sync::Arc::clone(&client);
        async move {
            client.flush().await.unwrap();
            // What flush's promise says: nothing sent before it is pending.
            client.pending()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !flush.is_finished(),
        "flush returned with the gateway unreachable"
    );

    proxy.set_paused(false);
    let pending_when_flush_returned = within(Duration::from_secs(10), "flush", flush)
        .await
        .unwrap();
    within(Duration::from_secs(10), "connected", async {
        loop {
            if let Ok(ClientEvent::Connected { last_seq }) = events.recv().await {
                assert_eq!(last_seq, 100);
                return;
            }
        }
    })
    .await;
    // Whatever flush did, the readings must end up stored as 101..=110.
    within(Duration::from_secs(10), "everything acknowledged", async {
        while client.pending() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        client.last_seq(),
        110,
        "renumbered after WELCOME's last_seq"
    );
    let stored = stored_payloads(&gw.db_path(), "mem-restart");
    assert_seqs(
        &stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        1..=110,
        "stored",
    );
    for (s, p) in &stored[100..] {
        assert_eq!(
            String::from_utf8_lossy(p),
            String::from_utf8_lossy(&payload(*s)),
            "seq {s}: the restarted device's reading, in order"
        );
    }
    assert_eq!(
        pending_when_flush_returned, 0,
        "flush() returned while {pending_when_flush_returned} readings sent before it were \
         still unacknowledged (the WELCOME renumbering moved them past flush's target)"
    );
    client.close().await;
}

/// The outbox file was deleted (device storage wiped): a new file starts
/// from 0, WELCOME's last_seq moves it on, and nothing new is mistaken for
/// a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_outbox_file_is_rebased_on_welcome() {
    let gw = TestGateway::start().await;
    let token = gw.add_device("wiped").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wiped.outbox");
    deliver(&gw, "wiped", &token, Some(path.clone()), 60).await;
    assert_eq!(outbox_state(&path).0, 60);
    std::fs::remove_file(&path).unwrap();

    let mut cfg = Config::new(gw.addr().to_string(), "wiped", token.clone());
    cfg.outbox_path = Some(path.clone());
    let client = Client::start(cfg).unwrap();
    for i in 61..=75 {
        client.send(1, payload(i)).await.unwrap();
    }
    within(Duration::from_secs(10), "all acknowledged", async {
        while client.pending() > 0 || client.last_seq() < 60 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    client.close().await;
    let rx = client.events();
    drop(client);
    wait_dropped(rx).await;

    let stored = stored_payloads(&gw.db_path(), "wiped");
    assert_seqs(
        &stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        1..=75,
        "stored",
    );
    for (s, p) in &stored[60..] {
        assert_eq!(
            String::from_utf8_lossy(p),
            String::from_utf8_lossy(&payload(*s))
        );
    }
    let (last, pending) = outbox_state(&path);
    assert_eq!(last, 75, "the rebased counter is durable");
    assert!(pending.is_empty());
}
