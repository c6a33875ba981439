//! SQLite's telemetry log (`store/sqlite/telemetry.rs`) against a model:
//! random appends (new seqs, repeats, seqs above i64::MAX, clocks that go
//! backwards) over several devices, with seals in slices, chunk changes and
//! reopenings (the tail rebuilt from disk) in between; after every step,
//! reads by seq range, by time range and with limits, and each device's
//! watermark, must equal a plain in-memory model. Also: a database written
//! by furrow 0.1 (schema 2) opens and migrates, and one database takes
//! one ingesting gateway.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use furrow::store::prelude::*;
use furrow::store::sqlite::{LogOptions, SqliteOptions, SqliteStore};
use furrow::store::{Batch, StoreError, TelemetryRange, TelemetryRecord};
use proptest::prelude::*;

/// One reading as the model keeps it: seq -> (timestamp, payload).
type Model = BTreeMap<String, BTreeMap<u64, (u64, Vec<u8>)>>;

#[derive(Debug, Clone)]
enum Step {
    /// Readings for (device index, seq delta or repeat, timestamp step).
    Append(Vec<(usize, i64, i64)>),
    /// Drop the store and open it again.
    Reopen,
    /// Let the sealer run.
    Pause,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec((0usize..5, -3i64..6, -2_000i64..5_000), 1..40)
            .prop_map(Step::Append),
        1 => Just(Step::Reopen),
        1 => Just(Step::Pause),
    ]
}

/// `by_rows`: seals take the devices with the most rows (never any by
/// age), and one chunk holds everything, so that rounds leave devices
/// behind; else every round takes every device, and each append opens a
/// chunk.
fn options(by_rows: bool) -> SqliteOptions {
    SqliteOptions {
        log: LogOptions {
            // Seal often and in chunks of every size.
            seal_rows: 13,
            seal_after_ms: if by_rows { 1 << 50 } else { 0 },
            chunk_span_ms: if by_rows { 1 << 50 } else { 0 },
            // One device per slice: a seal's round spans many slices, with
            // appends and reopens between them.
            slice_budget: Duration::ZERO,
            slice_step: 1,
            ..LogOptions::default()
        },
        ..SqliteOptions::default()
    }
}

fn device(i: usize) -> String {
    format!("d{i}")
}

async fn check(store: &SqliteStore, model: &Model, keys: &[i64], probe: u64) {
    for (i, key) in keys.iter().enumerate() {
        let id = device(i);
        let rows = model.get(&id).cloned().unwrap_or_default();
        let want_last = rows.keys().next_back().copied().unwrap_or(0);
        assert_eq!(
            store.device_seqs(*key).await.unwrap().stored,
            want_last,
            "{id}: watermark"
        );
        let info = store.device(&id).await.unwrap().unwrap();
        assert_eq!(info.last_seq, want_last, "{id}: last_seq");
        // All, a seq window, a time window, with limits.
        let seqs: Vec<u64> = rows.keys().copied().collect();
        let pick = |n: u64| {
            seqs.get((n as usize) % seqs.len().max(1))
                .copied()
                .unwrap_or(1)
        };
        let (a, b) = (pick(probe), pick(probe / 7 + 3));
        let (lo, hi) = (a.min(b), a.max(b));
        let times: Vec<u64> = rows.values().map(|v| v.0).collect();
        let tpick = |n: u64| {
            times
                .get((n as usize) % times.len().max(1))
                .copied()
                .unwrap_or(0)
        };
        let (t1, t2) = (tpick(probe / 3), tpick(probe / 11 + 1));
        let ranges = [
            TelemetryRange {
                to_seq: u64::MAX,
                ..TelemetryRange::default()
            },
            TelemetryRange {
                from_seq: lo,
                to_seq: hi,
                ..TelemetryRange::default()
            },
            TelemetryRange {
                to_seq: u64::MAX,
                from_ms: t1.min(t2),
                to_ms: t1.max(t2),
                ..TelemetryRange::default()
            },
            TelemetryRange {
                from_seq: lo,
                to_seq: u64::MAX,
                from_ms: t1.min(t2),
                to_ms: u64::MAX,
            },
        ];
        for (n, range) in ranges.iter().enumerate() {
            for limit in [1u32, 3, 10_000] {
                let want: Vec<(u64, u64, Vec<u8>)> = rows
                    .iter()
                    .filter(|(s, (t, _))| {
                        **s >= range.from_seq
                            && **s <= range.to_seq
                            && *t >= range.from_ms
                            && *t <= range.to_ms
                    })
                    .take(limit as usize)
                    .map(|(s, (t, p))| (*s, *t, p.clone()))
                    .collect();
                let got: Vec<(u64, u64, Vec<u8>)> = store
                    .telemetry(&id, *range, limit)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.seq, r.timestamp_ms, r.payload))
                    .collect();
                if got != want {
                    let c = rusqlite::Connection::open(store.path()).unwrap();
                    let mut st = c
                        .prepare("SELECT seq_lo, seq_hi, chunk, n FROM postings WHERE device = ?1")
                        .unwrap();
                    let p: Vec<(i64, i64, i64, i64)> = st
                        .query_map([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                        .unwrap()
                        .map(|r| r.unwrap())
                        .collect();
                    let w: Vec<(i64, i64)> = c
                        .prepare("SELECT device, seq FROM watermarks")
                        .unwrap()
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                        .unwrap()
                        .map(|r| r.unwrap())
                        .collect();
                    let rows: Vec<(i64, i64)> = c
                        .prepare("SELECT seq, device FROM telemetry WHERE device = ?1")
                        .unwrap()
                        .query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))
                        .unwrap()
                        .map(|r| r.unwrap())
                        .collect();
                    let ch: Vec<(i64, i64, i64)> = c
                        .prepare("SELECT id, sealed_upto, closed FROM chunks")
                        .unwrap()
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .unwrap()
                        .map(|r| r.unwrap())
                        .collect();
                    eprintln!("FAIL {id} key {key}: postings {p:?}\nwatermarks {w:?}\nrows {rows:?}\nchunks {ch:?}\ngot {:?}", got.iter().map(|g| g.0).collect::<Vec<_>>());
                }
                assert_eq!(got, want, "{id}: range {n} {range:?}, limit {limit}");
            }
        }
    }
}

async fn run(steps: Vec<Step>, by_rows: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    let mut store = SqliteStore::open(&path, options(by_rows)).unwrap();
    let mut keys = Vec::new();
    for i in 0..5 {
        store.create_device(&device(i), [1; 32]).await.unwrap();
        keys.push(store.device_auth(&device(i)).await.unwrap().unwrap().key);
    }
    let mut model: Model = BTreeMap::new();
    // Device 4 lives above i64::MAX.
    let mut next: Vec<u64> = vec![1, 1, 1, 1, (1 << 63) - 3];
    let mut clock: Vec<u64> = vec![1_000_000; 5];
    for (n, s) in steps.into_iter().enumerate() {
        match s {
            Step::Append(items) => {
                let mut records = Vec::new();
                for (d, delta, dt) in items {
                    // A positive delta is a new seq; otherwise a repeat of
                    // one at or below the newest (the store skips it).
                    let seq = if delta > 0 {
                        next[d] += delta as u64;
                        next[d]
                    } else {
                        next[d].saturating_sub((-delta) as u64).max(1)
                    };
                    clock[d] = clock[d].saturating_add_signed(dt);
                    let payload = format!("[{d},{seq}]").into_bytes();
                    let entry = model.entry(device(d)).or_default();
                    let newest = entry.keys().next_back().copied().unwrap_or(0);
                    if seq > newest {
                        entry.insert(seq, (clock[d], payload.clone()));
                    }
                    records.push(TelemetryRecord {
                        device: keys[d],
                        seq,
                        timestamp_ms: clock[d],
                        received_ms: clock[d] + 1,
                        content_type: 1,
                        payload: Bytes::from(payload),
                    });
                }
                let batch = Batch {
                    records,
                    rejections: vec![],
                    reports: Vec::new(),
                };
                store.append(Arc::new(batch)).await.unwrap();
            }
            Step::Reopen => {
                drop(store);
                // The writer thread lets go of its connection once its
                // queue closes; the lock file is released at once.
                store = SqliteStore::open(&path, options(by_rows)).unwrap();
            }
            Step::Pause => tokio::time::sleep(Duration::from_millis(250)).await,
        }
        check(&store, &model, &keys, n as u64 * 31 + 7).await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn the_log_reads_like_the_model(
        steps in prop::collection::vec(step(), 1..25),
        by_rows in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(steps, by_rows));
    }
}

/// One ingesting store per database; tools beside it are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gateway_per_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    let first = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let impatient = SqliteOptions {
        busy_timeout: Duration::from_millis(200),
        ..SqliteOptions::default()
    };
    assert!(matches!(
        SqliteStore::open(&path, impatient),
        Err(StoreError::InUse(_))
    ));
    let tool = SqliteStore::open(
        &path,
        SqliteOptions {
            ingest: false,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    tool.create_device("t1", [2; 32]).await.unwrap();
    assert!(tool.append(Arc::new(Batch::default())).await.is_err());
    drop(first);
    SqliteStore::open(&path, SqliteOptions::default()).expect("free again");
}

/// A database written by furrow 0.1 (schema version 2, made by
/// `tests/fixtures/make_v2_db.py`) opens, migrates, and reads the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_furrow_0_1_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("furrow.db");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v2.db"),
        &path,
    )
    .unwrap();
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let all = TelemetryRange {
        to_seq: u64::MAX,
        ..TelemetryRange::default()
    };
    let p1 = store.telemetry("pump-1", all, 1000).await.unwrap();
    assert_eq!(
        p1.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    assert_eq!(p1[6].payload, br#"{"flow": 7}"#.to_vec());
    assert_eq!(p1[6].timestamp_ms, 1_763_683_200_000 + 7_000);
    // By time: seconds 10 to 19 of pump-1's clock.
    let window = TelemetryRange {
        from_ms: 1_763_683_210_000,
        to_ms: 1_763_683_219_000,
        ..TelemetryRange::default()
    };
    let w = store.telemetry("pump-1", window, 1000).await.unwrap();
    assert_eq!(
        w.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (10..=19).collect::<Vec<_>>()
    );
    let p2 = store.telemetry("pump-2", all, 1000).await.unwrap();
    assert_eq!(
        p2.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 7, 9]
    );
    assert_eq!(p2[6].content_type, 0);
    let key2 = store.device_auth("pump-2").await.unwrap().unwrap().key;
    let seqs = store.device_seqs(key2).await.unwrap();
    assert_eq!((seqs.stored, seqs.rejected), (9, 6));
    let m3 = store.telemetry("meter.3", all, 1000).await.unwrap();
    assert_eq!(
        m3.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![3, (1 << 63) + 5]
    );
    let info = store.device("meter.3").await.unwrap().unwrap();
    assert_eq!(info.last_seq, (1 << 63) + 5);
    assert!(store.device_auth("gone-4").await.unwrap().unwrap().revoked);
    assert_eq!(
        store.commands_of("pump-2", None, 10).await.unwrap().len(),
        1
    );

    // It takes new readings after the old ones, and skips old seqs.
    let key1 = store.device_auth("pump-1").await.unwrap().unwrap().key;
    let rec = |seq| TelemetryRecord {
        device: key1,
        seq,
        timestamp_ms: 5,
        received_ms: 6,
        content_type: 1,
        payload: Bytes::from_static(b"0"),
    };
    let batch = Batch {
        records: vec![rec(40), rec(41)],
        rejections: vec![],
        reports: Vec::new(),
    };
    store.append(Arc::new(batch)).await.unwrap();
    let p1 = store.telemetry("pump-1", all, 1000).await.unwrap();
    assert_eq!(p1.len(), 41);
    assert_eq!(
        p1[39].payload,
        br#"{"flow": 40}"#.to_vec(),
        "40 kept its first payload"
    );
    drop(store);
    // Opened again: nothing is migrated twice.
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(
        store.telemetry("pump-1", all, 1000).await.unwrap().len(),
        41
    );
}

fn recs(key: i64, seqs: std::ops::RangeInclusive<u64>) -> Vec<TelemetryRecord> {
    seqs.map(|seq| TelemetryRecord {
        device: key,
        seq,
        timestamp_ms: seq,
        received_ms: seq,
        content_type: 1,
        payload: Bytes::from(format!("{seq}")),
    })
    .collect()
}

async fn append(store: &SqliteStore, records: Vec<TelemetryRecord>) {
    let batch = Batch {
        records,
        rejections: vec![],
        reports: Vec::new(),
    };
    store.append(Arc::new(batch)).await.unwrap();
}

/// A new chunk for every append, sealed at once, with this retention and
/// size cap.
fn chunk_per_append(retention_ms: u64, max_bytes: u64) -> SqliteOptions {
    SqliteOptions {
        log: LogOptions {
            seal_rows: 1,
            seal_after_ms: 0,
            chunk_span_ms: 0,
            retention_ms,
            max_bytes,
            ..LogOptions::default()
        },
        ..SqliteOptions::default()
    }
}

fn chunk_ids(path: &std::path::Path) -> Vec<i64> {
    let c = rusqlite::Connection::open(path).unwrap();
    let ids: Vec<i64> = c
        .prepare("SELECT id FROM chunks ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    ids
}

/// Retention drops the oldest chunk whole (its table and postings), once
/// every reading in it is older than the retention; the rest stays
/// readable, and each device's last_seq survives even when all its
/// readings are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_old_chunks_and_keeps_last_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    let store = SqliteStore::open(&path, chunk_per_append(400, 0)).unwrap();
    // The audit log is kept as long as telemetry.
    let change = |target: &str| furrow::store::NewAudit {
        actor: "admin".into(),
        source: "cli".into(),
        action: "device.create".into(),
        target: target.into(),
        detail: "{}".into(),
    };
    store.record_audit(change("old")).await.unwrap();
    let mut keys = Vec::new();
    for id in ["r1", "r2", "gone"] {
        store.create_device(id, [1; 32]).await.unwrap();
        keys.push(store.device_auth(id).await.unwrap().unwrap().key);
    }
    // Chunk 1: everything of "gone", the start of r1 and r2.
    let mut first = recs(keys[0], 1..=10);
    first.extend(recs(keys[1], 1..=5));
    first.extend(recs(keys[2], 1..=3));
    append(&store, first).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(&store, recs(keys[0], 11..=20)).await; // chunk 2
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Chunk 3: chunk 2 opened 600 ms ago, so every reading of chunk 1 is
    // older than the retention and it goes; chunk 2's successor opened
    // just now, so it stays.
    append(&store, recs(keys[1], 6..=6)).await;
    within(Duration::from_secs(10), || {
        chunk_ids(&path).first() == Some(&2)
    })
    .await;
    let audit: Vec<String> = store
        .audit(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.target)
        .collect();
    assert!(
        !audit.iter().any(|t| t == "old"),
        "the audit log follows telemetry's retention: {audit:?}"
    );
    let all = TelemetryRange::default();
    let seqs =
        |rows: Vec<furrow::store::StoredTelemetry>| rows.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(store.telemetry("r1", all, 100).await.unwrap()),
        (11..=20).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(store.telemetry("r2", all, 100).await.unwrap()),
        vec![6]
    );
    assert!(store.telemetry("gone", all, 100).await.unwrap().is_empty());
    for (i, want) in [20, 6, 3].into_iter().enumerate() {
        assert_eq!(
            store.device_seqs(keys[i]).await.unwrap().stored,
            want,
            "last_seq {i}"
        );
    }
    // A repeat of a dropped seq is still a duplicate: not stored again.
    append(&store, recs(keys[2], 2..=4)).await;
    assert_eq!(
        seqs(store.telemetry("gone", all, 100).await.unwrap()),
        vec![4]
    );
    // The dropped table is gone, and the view no longer names it.
    let c = rusqlite::Connection::open(&path).unwrap();
    let tables: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'chunk_1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0);
    // Its postings went with it (each device's first ones); the rest stay.
    let postings = |chunk: i64| -> i64 {
        c.query_row(
            "SELECT COUNT(*) FROM postings WHERE chunk = ?1",
            [chunk],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(postings(1), 0);
    assert!(postings(2) > 0);
    let rows: i64 = c
        .query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 12, "chunks 2, 3 and 4 hold 10 + 1 + 1");
    let info = store.storage_info().await.unwrap();
    assert_eq!((info.backend, info.retention_ms), ("sqlite", 400));
    assert!(info.chunks.is_some_and(|n| n >= 2), "{info:?}");
}

/// The size cap drops the oldest chunks while the database is too large,
/// never the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_drops_the_oldest_chunks_but_never_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.db");
    let store = SqliteStore::open(&path, chunk_per_append(0, 1)).unwrap();
    store.create_device("m", [1; 32]).await.unwrap();
    let key = store.device_auth("m").await.unwrap().unwrap().key;
    for part in 0..4u64 {
        append(&store, recs(key, part * 10 + 1..=part * 10 + 10)).await;
    }
    within(Duration::from_secs(10), || chunk_ids(&path).len() == 1).await;
    let rows = store
        .telemetry("m", TelemetryRange::default(), 100)
        .await
        .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (31..=40).collect::<Vec<_>>()
    );
    assert_eq!(store.device_seqs(key).await.unwrap().stored, 40);
}

/// Polls `done` until it holds, or fails after `limit`.
async fn within(limit: Duration, done: impl Fn() -> bool) {
    let end = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < end, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
