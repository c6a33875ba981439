//! The PostgreSQL store's own layout, against a throwaway cluster the test
//! starts (`support/postgres.rs`): a 0.1 database migrated forward,
//! partitions created on demand by several instances at once, retention
//! and the size cap dropping whole partitions while `last_seq` survives,
//! and a batch that fails early leaving the writer's connection usable.
//! What both backends share is in `store_conformance.rs`.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use furrow::store::prelude::*;
use furrow::store::{
    Batch, PostgresOptions, PostgresStore, Store, TelemetryRange, TelemetryRecord,
};
use support::postgres::Postgres;

const HOUR: u64 = 3_600_000;

fn rec(device: i64, seq: u64, received_ms: u64) -> TelemetryRecord {
    TelemetryRecord {
        device,
        seq,
        timestamp_ms: received_ms - 5,
        received_ms,
        content_type: 1,
        payload: Bytes::from(format!("{{\"seq\":{seq}}}")),
    }
}

async fn append(store: &PostgresStore, records: Vec<TelemetryRecord>) {
    store
        .append(Arc::new(Batch {
            records,
            rejections: vec![],
            reports: Vec::new(),
        }))
        .await
        .unwrap();
}

async fn seqs(store: &dyn Store, id: &str) -> Vec<u64> {
    let all = TelemetryRange {
        to_seq: u64::MAX,
        ..TelemetryRange::default()
    };
    store
        .telemetry(id, all, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

async fn partitions(store: &PostgresStore) -> Vec<(String, i64, i64)> {
    let client = store.pool().get().await.unwrap();
    let listed: Vec<(String, i64, i64)> = client
        .query(
            "SELECT name, from_ms, to_ms FROM telemetry_chunks ORDER BY from_ms",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // The list is the catalog's truth: every listed chunk is a partition.
    let attached: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attached as usize, listed.len(), "{listed:?}");
    listed
}

async fn device_key(store: &PostgresStore, id: &str) -> i64 {
    store.create_device(id, [1; 32]).await.unwrap();
    store.device_auth(id).await.unwrap().unwrap().key
}

fn options(chunk_span_ms: u64, retention_ms: u64, max_bytes: u64) -> PostgresOptions {
    PostgresOptions {
        chunk_span_ms,
        retention_ms,
        max_bytes,
        ..PostgresOptions::default()
    }
}

/// A database written by 0.1 (keyed table, no partitions) opens, keeps
/// every reading and watermark, refuses the old seqs again, and its old
/// table becomes a partition that retention can drop whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_furrow_0_1_migrates() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        client
            .batch_execute(include_str!("fixtures/v1_postgres.sql"))
            .await
            .unwrap();
        drop(client);
        let _ = task.await;
    }
    let store = PostgresStore::connect(&url, options(HOUR, 24 * HOUR, 0))
        .await
        .unwrap();
    let version: i32 = store
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT version FROM furrow_schema", &[])
        .await
        .unwrap()
        .get(0);
    // Every migration since 0.1 ran (0.2's partitions, token rotation,
    // API tokens and the audit log, device state and tags, jobs, firmware,
    // what a firmware job saw of each device).
    assert_eq!(version, 9);

    assert_eq!(seqs(&store, "pump-1").await, (1..=50).collect::<Vec<_>>());
    // Seqs above i64::MAX are kept but not listed by seq range
    // (docs/postgres.md).
    assert_eq!(seqs(&store, "pump-2").await, vec![1, 2, 3]);
    let p1 = store.device("pump-1").await.unwrap().unwrap();
    assert_eq!(
        (p1.last_seq, p1.last_seen_ms),
        (50, Some(1_763_683_250_005))
    );
    let p2 = store.device("pump-2").await.unwrap().unwrap();
    assert_eq!(p2.last_seq, u64::MAX - 1, "u64 order, not bigint order");
    let k2 = store.device_auth("pump-2").await.unwrap().unwrap().key;
    let s2 = store.device_seqs(k2).await.unwrap();
    assert_eq!((s2.stored, s2.rejected), (u64::MAX - 1, 7));
    let p3 = store.device("pump-3").await.unwrap().unwrap();
    assert_eq!((p3.last_seq, p3.last_seen_ms), (0, None));
    assert_eq!(
        partitions(&store).await,
        vec![("telemetry_v1".to_owned(), i64::MIN, 1_763_683_300_009)]
    );

    // Old seqs again, and new ones: only the new are stored.
    let k1 = store.device_auth("pump-1").await.unwrap().unwrap().key;
    let now = furrow::clock::now_ms();
    append(&store, (45..=55).map(|s| rec(k1, s, now)).collect()).await;
    assert_eq!(seqs(&store, "pump-1").await, (1..=55).collect::<Vec<_>>());
    assert_eq!(partitions(&store).await.len(), 2);

    // The 0.1 partition is older than a day: it goes whole, the watermarks
    // stay.
    let dropped = store.enforce_retention(now).await.unwrap();
    assert_eq!((dropped.chunks, dropped.rows), (1, 54));
    assert_eq!(seqs(&store, "pump-1").await, (51..=55).collect::<Vec<_>>());
    assert!(seqs(&store, "pump-2").await.is_empty());
    assert_eq!(
        store.device("pump-2").await.unwrap().unwrap().last_seq,
        u64::MAX - 1
    );
    assert_eq!(store.device("pump-1").await.unwrap().unwrap().last_seq, 55);
    // A retried old seq is still a duplicate after its row is gone.
    append(&store, vec![rec(k1, 30, now)]).await;
    assert_eq!(seqs(&store, "pump-1").await, (51..=55).collect::<Vec<_>>());
}

/// Partitions follow arrival time, one per span; retention drops those
/// wholly older than it, never the newest, and `last_seq` survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_old_partitions_and_keeps_last_seq() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let store = PostgresStore::connect(&url, options(HOUR, 2 * HOUR, 0))
        .await
        .unwrap();
    let (a, b) = (device_key(&store, "a").await, device_key(&store, "b").await);
    // The start of an hour, so that hour h's readings land in chunk h.
    let base = (furrow::clock::now_ms() / HOUR - 10) * HOUR;
    for h in 0..6u64 {
        let at = base + h * HOUR + 1_000;
        append(&store, vec![rec(a, h * 2 + 1, at), rec(a, h * 2 + 2, at)]).await;
    }
    append(&store, vec![rec(b, 1, base + 1_000)]).await;
    let parts = partitions(&store).await;
    assert_eq!(parts.len(), 6);
    assert_eq!(
        parts[0],
        (
            format!("telemetry_p{base}"),
            base as i64,
            (base + HOUR) as i64
        )
    );
    let info = store.storage_info().await.unwrap();
    assert_eq!(info.chunks, Some(6));
    assert_eq!(info.oldest_chunk_opened_ms, Some(base));
    assert!(info.used_bytes.unwrap() > 0);
    assert_eq!(
        (info.retention_ms, info.chunk_span_ms),
        (2 * HOUR, Some(HOUR))
    );

    // At base + 5h + 30m the cut-off is base + 3h 30m: chunks 0, 1, 2 end
    // before it and go; chunk 3 ends after it and stays.
    let now = base + 5 * HOUR + HOUR / 2;
    // The audit log is kept as long as telemetry: a change from before the
    // cut-off goes, one from now stays.
    store
        .pool()
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO audit (at_ms, actor, source, action, target, detail)
             VALUES ($1, 'admin', 'cli', 'device.create', 'old', '{}')",
            &[&(base as i64)],
        )
        .await
        .unwrap();
    store
        .record_audit(furrow::store::NewAudit {
            actor: "admin".into(),
            source: "cli".into(),
            action: "device.create".into(),
            target: "new".into(),
            detail: "{}".into(),
        })
        .await
        .unwrap();
    let dropped = store.enforce_retention(now).await.unwrap();
    let audit: Vec<String> = store
        .audit(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.target)
        .collect();
    assert_eq!(
        audit,
        ["new"],
        "the audit log follows telemetry's retention"
    );
    assert_eq!((dropped.chunks, dropped.rows), (3, 7));
    assert_eq!(seqs(&store, "a").await, (7..=12).collect::<Vec<_>>());
    assert_eq!(partitions(&store).await.len(), 3);
    assert_eq!(store.device("b").await.unwrap().unwrap().last_seq, 1);
    let sb = store.device_seqs(b).await.unwrap();
    assert_eq!(sb.stored, 1);
    // Nothing more to drop at the same time; far later, all but the newest.
    assert_eq!(store.enforce_retention(now).await.unwrap().chunks, 0);
    let later = store.enforce_retention(base + 100 * HOUR).await.unwrap();
    assert_eq!((later.chunks, later.rows), (2, 4));
    assert_eq!(seqs(&store, "a").await, vec![11, 12]);
    // Writing goes on into a new partition, and the watermark still refuses
    // dropped seqs.
    let now = furrow::clock::now_ms();
    append(&store, vec![rec(a, 3, now), rec(a, 13, now)]).await;
    assert_eq!(seqs(&store, "a").await, vec![11, 12, 13]);
}

/// The size cap drops the oldest closed partitions, never the newest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_drops_the_oldest_partitions_but_never_the_newest() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let store = PostgresStore::connect(&url, options(HOUR, 0, 1))
        .await
        .unwrap();
    let a = device_key(&store, "a").await;
    let base = (furrow::clock::now_ms() / HOUR - 5) * HOUR;
    for h in 0..4u64 {
        append(&store, vec![rec(a, h + 1, base + h * HOUR)]).await;
    }
    let dropped = store
        .enforce_retention(furrow::clock::now_ms())
        .await
        .unwrap();
    assert_eq!((dropped.chunks, dropped.rows), (3, 3));
    assert_eq!(seqs(&store, "a").await, vec![4]);
    assert_eq!(partitions(&store).await.len(), 1);
}

/// Instances that meet a new span together create its partition once;
/// one whose cache still lists a partition another dropped fails that
/// batch once and succeeds on the retry (as the writer retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_partitions() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let one = PostgresStore::connect(&url, options(HOUR, 2 * HOUR, 0))
        .await
        .unwrap();
    let two = PostgresStore::connect(&url, options(HOUR, 2 * HOUR, 0))
        .await
        .unwrap();
    let mut keys = Vec::new();
    for d in 0..8 {
        keys.push(device_key(&one, &format!("d{d}")).await);
    }
    let base = (furrow::clock::now_ms() / HOUR - 10) * HOUR;
    let mut tasks = Vec::new();
    for (n, &k) in keys.iter().enumerate() {
        let store = if n % 2 == 0 { one.clone() } else { two.clone() };
        tasks.push(tokio::spawn(async move {
            for h in 0..5u64 {
                let at = base + h * HOUR + n as u64;
                append(&store, vec![rec(k, h + 1, at)]).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(partitions(&one).await.len(), 5);
    for d in 0..8 {
        assert_eq!(seqs(&one, &format!("d{d}")).await, vec![1, 2, 3, 4, 5]);
    }
    // `one` drops the first two hours; `two` still believes in them.
    let dropped = one.enforce_retention(base + 5 * HOUR).await.unwrap();
    assert_eq!(dropped.chunks, 3);
    let late = Arc::new(Batch {
        records: vec![rec(keys[1], 6, base + 1_000)],
        rejections: vec![],
        reports: Vec::new(),
    });
    assert!(two.append(Arc::clone(&late)).await.is_err());
    two.append(late).await.unwrap();
    assert_eq!(seqs(&two, "d1").await, vec![4, 5, 6]);
}

/// Two instances writing batches over the same devices at once (a
/// takeover race, many times over): each batch's watermark `UPDATE` locks
/// its devices in key order, so neither is ever aborted as a deadlock, and
/// each reading is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_writing_the_same_devices_never_deadlock() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let one = PostgresStore::connect(&url, options(HOUR, 0, 0))
        .await
        .unwrap();
    let two = PostgresStore::connect(&url, options(HOUR, 0, 0))
        .await
        .unwrap();
    let mut keys = Vec::new();
    for d in 0..300 {
        keys.push(device_key(&one, &format!("r{d:03}")).await);
    }
    let now = furrow::clock::now_ms();
    let mut tasks = Vec::new();
    for (w, store) in [one.clone(), two.clone()].into_iter().enumerate() {
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..40u64 {
                // Both write every device's next seqs, in opposite orders
                // and from different ends of the key range.
                let mut records: Vec<TelemetryRecord> = keys
                    .iter()
                    .flat_map(|&k| (0..2).map(move |s| rec(k, round * 2 + s + 1, now + round)))
                    .collect();
                if w == 1 {
                    records.reverse();
                }
                append(&store, records).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let client = one.pool().get().await.unwrap();
    let (rows, distinct): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT count(*), count(DISTINCT (device, seq)) FROM telemetry",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((rows, distinct), (300 * 80, 300 * 80));
    for &k in &keys {
        assert_eq!(one.device_seqs(k).await.unwrap().stored, 80);
    }
}

/// A batch whose first statements fail leaves no transaction open on the
/// writer's connection: `BEGIN` goes out with the watermark `UPDATE`
/// (one round trip for both), so a failure there would otherwise hand the
/// pool a connection inside an aborted transaction, and every later batch
/// would fail on it. The failure is made by a trigger on `devices` that
/// refuses one watermark; once it is gone, the same batch is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_early_leaves_the_writer_usable() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let store = PostgresStore::connect(&url, options(HOUR, 0, 0))
        .await
        .unwrap();
    let k = device_key(&store, "early").await;
    let now = furrow::clock::now_ms();
    append(&store, vec![rec(k, 1, now)]).await;
    let admin = store.pool().get().await.unwrap();
    admin
        .batch_execute(
            "CREATE FUNCTION refuse_13() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
             CREATE TRIGGER refuse_13 BEFORE UPDATE ON devices FOR EACH ROW
               WHEN (NEW.stored_seq = 13) EXECUTE FUNCTION refuse_13();",
        )
        .await
        .unwrap();
    let batch = Arc::new(Batch {
        records: vec![rec(k, 13, now + 1)],
        rejections: vec![],
        reports: Vec::new(),
    });
    for _ in 0..3 {
        let err = store.append(Arc::clone(&batch)).await.unwrap_err();
        assert!(err.to_string().contains("refused for the test"), "{err}");
    }
    admin
        .batch_execute("DROP TRIGGER refuse_13 ON devices")
        .await
        .unwrap();
    store.append(Arc::clone(&batch)).await.unwrap();
    store.append(batch).await.unwrap();
    assert_eq!(seqs(&store, "early").await, vec![1, 13]);
    assert_eq!(store.device_seqs(k).await.unwrap().stored, 13);
}
