//! Store conformance: the same cases run against every backend, the
//! embedded SQLite and a real PostgreSQL cluster the test starts itself
//! (`support/postgres.rs`). A backend is right when it passes all of them;
//! the gateway above relies on nothing else.
//!
//! Each case gets a fresh store (a new SQLite file, a new PostgreSQL
//! database in one throwaway cluster).

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use furrow::devices::state::{StateError, StateLimits};
use furrow::jobs::{AbortRule, DeviceState, JobStatus, NewJob, Operation, Tags, Target};
use furrow::store::sqlite::SqliteOptions;
use furrow::store::{
    Batch, CommandOutcome, CommandState, DeviceSeqs, JobTick, NewCommand, PostgresOptions,
    PostgresStore, ReportRecord, SqliteStore, Store, StoreError, TelemetryRange, TelemetryRecord,
    TickScope,
};
use support::postgres::Postgres;

type Fresh<'a> = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + 'a>> + 'a>;

fn rec(device: i64, seq: u64, ts: u64) -> TelemetryRecord {
    TelemetryRecord {
        device,
        seq,
        timestamp_ms: ts,
        received_ms: ts + 1,
        content_type: 1,
        payload: Bytes::from(format!("{{\"seq\":{seq}}}")),
    }
}

async fn key_of(store: &dyn Store, id: &str) -> i64 {
    store.device_auth(id).await.unwrap().unwrap().key
}

async fn seqs(store: &dyn Store, id: &str) -> Vec<u64> {
    store
        .telemetry(id, TelemetryRange::default(), 10_000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

/// Appends are idempotent; watermarks compare as u64.
async fn append_and_watermarks(store: Arc<dyn Store>) {
    store.create_device("d1", [7; 32]).await.unwrap();
    let k = key_of(&*store, "d1").await;
    assert_eq!(store.device_seqs(k).await.unwrap(), DeviceSeqs::default());
    let batch = Arc::new(Batch {
        records: vec![rec(k, 1, 10), rec(k, 2, 20), rec(k, 2, 20)],
        rejections: vec![(k, 3)],
        reports: Vec::new(),
    });
    store.append(batch.clone()).await.unwrap();
    store.append(batch).await.unwrap();
    assert_eq!(seqs(&*store, "d1").await, vec![1, 2]);
    let s = store.device_seqs(k).await.unwrap();
    assert_eq!((s.stored, s.rejected), (2, 3));
    // A lower rejection does not lower the watermark; two of one device
    // in one batch keep the higher.
    let low = Batch {
        records: vec![],
        rejections: vec![(k, 1), (k, 2)],
        reports: Vec::new(),
    };
    store.append(Arc::new(low)).await.unwrap();
    assert_eq!(store.device_seqs(k).await.unwrap().rejected, 3);
    // Seqs above i64::MAX are still the largest.
    let high = Batch {
        records: vec![rec(k, u64::MAX - 1, 30)],
        rejections: vec![(k, u64::MAX), (k, 9)],
        reports: Vec::new(),
    };
    store.append(Arc::new(high)).await.unwrap();
    let s = store.device_seqs(k).await.unwrap();
    assert_eq!((s.stored, s.rejected), (u64::MAX - 1, u64::MAX));
    let back = Batch {
        records: vec![rec(k, 4, 40)],
        rejections: vec![(k, 5)],
        reports: Vec::new(),
    };
    store.append(Arc::new(back)).await.unwrap();
    let s = store.device_seqs(k).await.unwrap();
    assert_eq!((s.stored, s.rejected), (u64::MAX - 1, u64::MAX));
    let info = store.device("d1").await.unwrap().unwrap();
    assert_eq!(info.last_seq, u64::MAX - 1);
    assert_eq!(info.last_seen_ms, Some(31));
    // An empty batch is fine.
    store.append(Arc::new(Batch::default())).await.unwrap();
}

/// Many writers, overlapping batches over several devices: each pair once.
async fn concurrent_overlapping_appends(store: Arc<dyn Store>) {
    let mut keys = Vec::new();
    for d in 0..4 {
        let id = format!("c{d}");
        store.create_device(&id, [1; 32]).await.unwrap();
        keys.push(key_of(&*store, &id).await);
    }
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let store = Arc::clone(&store);
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..10u64 {
                // Writers cover the same seqs in different orders.
                let mut records = Vec::new();
                for &k in keys.iter().rev() {
                    for s in 1..=20u64 {
                        let seq = (round * 20 + s + w * 7) % 200 + 1;
                        records.push(rec(k, seq, seq));
                    }
                }
                if w % 2 == 1 {
                    records.reverse();
                }
                let batch = Batch {
                    records,
                    rejections: vec![],
                    reports: Vec::new(),
                };
                store.append(Arc::new(batch)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for d in 0..4 {
        let got = seqs(&*store, &format!("c{d}")).await;
        let mut unique = got.clone();
        unique.dedup();
        assert_eq!(got, unique, "a seq stored twice");
        // At least the first batch (20 new seqs); a backend may skip any
        // record at or below the device's highest stored seq.
        assert!(got.len() >= 20, "{} rows", got.len());
        assert!(got.iter().all(|s| (1..=200).contains(s)), "{got:?}");
    }
}

/// In order, as sessions send them: new seqs are stored, repeats are not.
async fn appends_in_seq_order(store: Arc<dyn Store>) {
    store.create_device("o1", [1; 32]).await.unwrap();
    let k = key_of(&*store, "o1").await;
    let batch = |seqs: std::ops::RangeInclusive<u64>| {
        Arc::new(Batch {
            records: seqs.map(|s| rec(k, s, s * 10)).collect(),
            rejections: vec![],
            reports: Vec::new(),
        })
    };
    store.append(batch(1..=10)).await.unwrap();
    store.append(batch(5..=15)).await.unwrap();
    store.append(batch(16..=16)).await.unwrap();
    assert_eq!(seqs(&*store, "o1").await, (1..=16).collect::<Vec<_>>());
    assert_eq!(store.device_seqs(k).await.unwrap().stored, 16);
    // A large batch (PostgreSQL writes it by COPY, small ones by one
    // pipelined statement pair): the same rule.
    store.append(batch(1..=600)).await.unwrap();
    assert_eq!(seqs(&*store, "o1").await, (1..=600).collect::<Vec<_>>());
    assert_eq!(store.device_seqs(k).await.unwrap().stored, 600);
}

/// Create, list (pages in byte order), get, rotate, revoke, revocation log.
async fn devices(store: Arc<dyn Store>) {
    for id in ["b", "a", "B", "a-1", "a_1"] {
        store.create_device(id, [2; 32]).await.unwrap();
    }
    assert!(matches!(
        store.create_device("a", [3; 32]).await,
        Err(StoreError::DeviceExists(_))
    ));
    let all: Vec<String> = store
        .list_devices(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(all, vec!["B", "a", "a-1", "a_1", "b"], "byte order");
    let page = store.list_devices(Some("a-1".into()), 2).await.unwrap();
    assert_eq!(
        page.iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        vec!["a_1", "b"]
    );
    let a = store.device("a").await.unwrap().unwrap();
    assert_eq!((a.last_seq, a.last_seen_ms, a.revoked_ms), (0, None, None));
    assert!(a.created_ms > 0);
    assert!(store.device("zz").await.unwrap().is_none());
    assert!(store.device_auth("zz").await.unwrap().is_none());

    store.rotate_token("a", [9; 32], None).await.unwrap();
    let auth = store.device_auth("a").await.unwrap().unwrap();
    assert_eq!(auth.token_hash, [9; 32]);
    assert!(auth.previous.is_none(), "no grace: the old token is gone");
    assert!(matches!(
        store.rotate_token("zz", [9; 32], None).await,
        Err(StoreError::NoSuchDevice(_))
    ));

    let cursor0 = store
        .revocations_since(0)
        .await
        .unwrap()
        .last()
        .map_or(0, |r| r.0);
    let counts = store.count_devices().await.unwrap();
    assert_eq!((counts.total, counts.revoked), (5, 0));
    assert!(store.revoke_device("a").await.unwrap());
    assert!(!store.revoke_device("a").await.unwrap());
    let counts = store.count_devices().await.unwrap();
    assert_eq!(
        (counts.total, counts.revoked),
        (5, 1),
        "revoked still count"
    );
    assert!(matches!(
        store.revoke_device("zz").await,
        Err(StoreError::NoSuchDevice(_))
    ));
    assert!(store.device_auth("a").await.unwrap().unwrap().revoked);
    assert!(store
        .device("a")
        .await
        .unwrap()
        .unwrap()
        .revoked_ms
        .is_some());
    let revs = store.revocations_since(cursor0).await.unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].1, "a");
    assert!(store.revocations_since(revs[0].0).await.unwrap().is_empty());
    store.ping().await.unwrap();
}

/// Reading back by seq range, time range and page.
async fn telemetry_ranges(store: Arc<dyn Store>) {
    store.create_device("t", [1; 32]).await.unwrap();
    store.create_device("other", [1; 32]).await.unwrap();
    let k = key_of(&*store, "t").await;
    let o = key_of(&*store, "other").await;
    let mut records: Vec<_> = (1..=50).map(|s| rec(k, s, 1000 + s * 10)).collect();
    records.push(rec(o, 1, 5));
    let mut binary = rec(k, 51, 2000);
    binary.content_type = 3;
    binary.payload = Bytes::from_static(&[0, 255, 1]);
    records.push(binary);
    store
        .append(Arc::new(Batch {
            records,
            rejections: vec![],
            reports: Vec::new(),
        }))
        .await
        .unwrap();
    let range = |from_seq, to_seq, from_ms, to_ms| TelemetryRange {
        from_seq,
        to_seq,
        from_ms,
        to_ms,
    };
    let got = store
        .telemetry("t", range(10, 12, 0, u64::MAX), 100)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![10, 11, 12]
    );
    assert_eq!(got[0].timestamp_ms, 1100);
    assert_eq!(got[0].received_ms, 1101);
    assert_eq!(got[0].content_type, 1);
    assert_eq!(got[0].payload, b"{\"seq\":10}");
    let by_time = store
        .telemetry("t", range(0, u64::MAX, 1200, 1230), 100)
        .await
        .unwrap();
    assert_eq!(
        by_time.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![20, 21, 22, 23]
    );
    let page = store
        .telemetry("t", TelemetryRange::default(), 5)
        .await
        .unwrap();
    assert_eq!(page.len(), 5);
    assert_eq!(page[4].seq, 5);
    let last = store
        .telemetry("t", range(51, 51, 0, u64::MAX), 5)
        .await
        .unwrap();
    assert_eq!(
        (last[0].content_type, &last[0].payload[..]),
        (3, &[0, 255, 1][..])
    );
    assert_eq!(seqs(&*store, "other").await, vec![1]);
    assert!(seqs(&*store, "nobody").await.is_empty());
}

fn cmd(name: &str, expires_ms: u64) -> NewCommand {
    NewCommand {
        name: name.into(),
        content_type: 1,
        payload: b"{\"x\":1}".to_vec(),
        expires_ms,
    }
}

fn now() -> u64 {
    support::now_ms()
}

/// The command lifecycle and every refusal.
async fn commands(store: Arc<dyn Store>) {
    store.create_device("p", [1; 32]).await.unwrap();
    store.create_device("q", [1; 32]).await.unwrap();
    let p = key_of(&*store, "p").await;
    let q = key_of(&*store, "q").await;
    let later = now() + 60_000;
    assert!(matches!(
        store.create_command("zz", cmd("x", later)).await,
        Err(StoreError::NoSuchDevice(_))
    ));
    let c1 = store.create_command("p", cmd("open", later)).await.unwrap();
    assert_eq!(c1.state, CommandState::Queued);
    assert_eq!((c1.device_id.as_str(), c1.name.as_str()), ("p", "open"));
    assert_eq!(c1.payload, b"{\"x\":1}");
    assert!(c1.outcome.is_none());
    let c2 = store
        .create_command("p", cmd("close", later))
        .await
        .unwrap();
    assert!(c2.id > c1.id);
    let gone = store
        .create_command("p", cmd("old", now() - 1))
        .await
        .unwrap();
    assert_eq!(store.command(c1.id).await.unwrap().unwrap(), c1);
    assert!(store.command(999_999).await.unwrap().is_none());

    // Open: unexpired, oldest first.
    let open = store.open_commands(p).await.unwrap();
    assert_eq!(
        open.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![c1.id, c2.id]
    );
    assert!(store.open_commands(q).await.unwrap().is_empty());

    // Delivered once.
    let changed = store.mark_delivered(vec![c1.id, c2.id]).await.unwrap();
    assert_eq!(changed.len(), 2);
    assert!(changed.iter().all(|c| c.state == CommandState::Delivered));
    assert!(store.mark_delivered(vec![c1.id]).await.unwrap().is_empty());

    // Answers: foreign device, then the owner, then again.
    let ok = CommandOutcome {
        status: 0,
        content_type: 1,
        payload: b"{\"ok\":true}".to_vec(),
    };
    assert!(store
        .complete_command(q, c1.id, ok.clone())
        .await
        .unwrap()
        .is_none());
    let done = store
        .complete_command(p, c1.id, ok.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, CommandState::Succeeded);
    assert_eq!(done.outcome.as_ref(), Some(&ok));
    assert!(store
        .complete_command(p, c1.id, ok.clone())
        .await
        .unwrap()
        .is_none());
    let failed = CommandOutcome {
        status: 2,
        content_type: 0,
        payload: vec![],
    };
    assert!(store
        .complete_command(p, gone.id, failed.clone())
        .await
        .unwrap()
        .is_none());

    // Newest first, paged by id.
    let list = store.commands_of("p", None, 10).await.unwrap();
    assert_eq!(
        list.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![gone.id, c2.id, c1.id]
    );
    let older = store.commands_of("p", Some(c2.id), 10).await.unwrap();
    assert_eq!(older.iter().map(|c| c.id).collect::<Vec<_>>(), vec![c1.id]);

    // Expiry takes the expired open one only, once.
    let expired = store.expire_commands(now()).await.unwrap();
    assert_eq!(
        expired.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![gone.id]
    );
    assert_eq!(expired[0].state, CommandState::Expired);
    assert!(store.expire_commands(now()).await.unwrap().is_empty());

    // Revocation: open commands cancelled, new ones refused.
    let c3 = store
        .create_command("p", cmd("again", later))
        .await
        .unwrap();
    assert!(store.revoke_device("p").await.unwrap());
    let cancelled = store.cancel_open_commands("p").await.unwrap();
    assert_eq!(
        cancelled.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![c2.id, c3.id]
    );
    assert!(cancelled.iter().all(|c| c.state == CommandState::Cancelled));
    assert!(store.cancel_open_commands("p").await.unwrap().is_empty());
    assert!(matches!(
        store.create_command("p", cmd("x", later)).await,
        Err(StoreError::Revoked(_))
    ));
    let c2_now = store.command(c2.id).await.unwrap().unwrap();
    assert_eq!(c2_now.state, CommandState::Cancelled);
    assert_eq!(
        store.command(c1.id).await.unwrap().unwrap().state,
        CommandState::Succeeded
    );
    assert!(store
        .complete_command(p, c2.id, failed)
        .await
        .unwrap()
        .is_none());
}

async fn suite(backend: &str, fresh: Fresh<'_>) {
    macro_rules! case {
        ($name:ident) => {
            eprintln!("{backend}: {}", stringify!($name));
            $name(fresh().await).await;
        };
    }
    case!(append_and_watermarks);
    case!(concurrent_overlapping_appends);
    case!(appends_in_seq_order);
    case!(devices);
    case!(telemetry_ranges);
    case!(commands);
    case!(token_rotation);
    case!(api_tokens_and_audit);
    case!(device_state);
    case!(tags_and_jobs);
    case!(firmware_images_and_jobs);
    case!(jobs_tick_in_slices);
}

fn tags(pairs: &[(&str, Option<&str>)]) -> std::collections::BTreeMap<String, Option<String>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
        .collect()
}

fn command_job(target: Target, rate: u32, abort: Option<AbortRule>, deadline_ms: u64) -> NewJob {
    NewJob {
        target,
        operation: Operation::Command {
            name: "reboot".into(),
            content_type: 1,
            payload: b"{}".to_vec(),
        },
        rate_per_min: rate,
        abort,
        device_timeout_ms: 60_000,
        deadline_ms,
        created_by: "test".into(),
    }
}

/// Answers the open command of each device with `status`.
async fn answer(store: &dyn Store, ids: &[&str], status: u8) {
    for id in ids {
        let k = key_of(store, id).await;
        for c in store.open_commands(k).await.unwrap() {
            store
                .complete_command(
                    k,
                    c.id,
                    CommandOutcome {
                        status,
                        content_type: 0,
                        payload: vec![],
                    },
                )
                .await
                .unwrap();
        }
    }
}

/// Tags and selectors; jobs: rate, start exactly once (also under
/// concurrent ticks), outcomes from commands and desired state, abort,
/// cancel, deadline.
async fn tags_and_jobs(store: Arc<dyn Store>) {
    let limits = StateLimits::default();
    for n in 0..5 {
        store
            .create_device(&format!("j{n}"), [n; 32])
            .await
            .unwrap();
    }
    for n in 0..3 {
        let t = store
            .set_tags(
                &format!("j{n}"),
                tags(&[("site", Some("north")), ("old", Some("x"))]),
            )
            .await
            .unwrap();
        assert_eq!(t.len(), 2);
    }
    let t = store
        .set_tags("j0", tags(&[("old", None), ("model", Some("p7"))]))
        .await
        .unwrap();
    assert_eq!(
        t.into_iter().collect::<Vec<_>>(),
        vec![
            ("model".into(), "p7".into()),
            ("site".into(), "north".into())
        ]
    );
    store
        .set_tags("j3", tags(&[("site", Some("south"))]))
        .await
        .unwrap();
    assert!(matches!(
        store.set_tags("j4", tags(&[("bad:key", Some("v"))])).await,
        Err(StoreError::Tag(_))
    ));
    assert!(matches!(
        store.set_tags("nope", tags(&[("a", Some("b"))])).await,
        Err(StoreError::NoSuchDevice(_))
    ));
    let many: Vec<(String, Option<String>)> = (0..40)
        .map(|n| (format!("k{n}"), Some("v".to_owned())))
        .collect();
    assert!(matches!(
        store.set_tags("j4", many.into_iter().collect()).await,
        Err(StoreError::Tag(_))
    ));
    assert!(store.tags_of(&["j4".into()]).await.unwrap().is_empty());
    let sel = |pairs: &[(&str, &str)]| -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let ids =
        |v: Vec<furrow::store::DeviceInfo>| v.into_iter().map(|d| d.device_id).collect::<Vec<_>>();
    assert_eq!(
        ids(store
            .select_devices(&sel(&[("site", "north")]), None, 10)
            .await
            .unwrap()),
        vec!["j0", "j1", "j2"]
    );
    assert_eq!(
        ids(store
            .select_devices(&sel(&[("site", "north"), ("model", "p7")]), None, 10)
            .await
            .unwrap()),
        vec!["j0"]
    );
    assert_eq!(
        ids(store
            .select_devices(&sel(&[("site", "north")]), Some("j0".into()), 1)
            .await
            .unwrap()),
        vec!["j1"]
    );

    // A command job at 60 a minute over the north site.
    let far = now() + 3_600_000;
    let job = store
        .create_job(command_job(
            Target::Tags(sel(&[("site", "north")])),
            60,
            None,
            far,
        ))
        .await
        .unwrap();
    assert_eq!(job.counts.queued, 3);
    assert_eq!(job.status, JobStatus::Running);
    let t0 = job.created_ms;
    let tick = |at: u64| {
        let store = Arc::clone(&store);
        async move {
            store
                .tick_job(job.id, at, limits, TickScope::all())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let t = tick(t0).await;
    assert_eq!(t.started, vec!["j0".to_owned()]);
    assert!(tick(t0 + 10).await.started.is_empty(), "the rate holds");
    let t = tick(t0 + 1000).await;
    assert_eq!(t.started, vec!["j1".to_owned()]);
    assert_eq!(
        store
            .open_commands(key_of(&*store, "j0").await)
            .await
            .unwrap()
            .len(),
        1
    );
    answer(&*store, &["j0"], 0).await;
    let t = tick(t0 + 1100).await;
    assert_eq!(t.job.counts.succeeded, 1);
    assert_eq!(t.job.counts.in_progress, 1);
    // Cancel: j2 never starts; j1's undelivered command is cancelled.
    let j = store.cancel_job(job.id, t0 + 1200).await.unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    assert_eq!((j.counts.succeeded, j.counts.cancelled), (1, 2));
    assert!(store
        .open_commands(key_of(&*store, "j1").await)
        .await
        .unwrap()
        .is_empty());
    assert!(
        store
            .tick_job(job.id, t0 + 5000, limits, TickScope::all())
            .await
            .unwrap()
            .is_none(),
        "inactive"
    );
    let devs = store.job_devices(job.id, None, None, 10).await.unwrap();
    assert_eq!(
        devs.iter()
            .map(|d| (d.device_id.as_str(), d.state))
            .collect::<Vec<_>>(),
        vec![
            ("j0", DeviceState::Succeeded),
            ("j1", DeviceState::Cancelled),
            ("j2", DeviceState::Cancelled)
        ]
    );
    assert!(devs[2].started_ms.is_none(), "j2 was never touched");
    let page = store
        .job_devices(job.id, None, Some("j0".into()), 1)
        .await
        .unwrap();
    assert_eq!(page[0].device_id, "j1");
    let only = store
        .job_devices(job.id, Some(DeviceState::Succeeded), None, 10)
        .await
        .unwrap();
    assert_eq!(only.len(), 1);

    // Abort: all five at once; two failures of the first three trip 50 %.
    let rule = AbortRule {
        failed_pct: 50.0,
        min_completed: 3,
    };
    let all: Vec<String> = (0..5).map(|n| format!("j{n}")).collect();
    let job = store
        .create_job(command_job(
            Target::Devices(all.clone()),
            0,
            Some(rule),
            far,
        ))
        .await
        .unwrap();
    let t0 = job.created_ms;
    let t = store
        .tick_job(job.id, t0, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.started.len(), 5);
    answer(&*store, &["j0", "j1"], 1).await;
    answer(&*store, &["j2"], 0).await;
    let t = store
        .tick_job(job.id, t0 + 10, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.job.status, JobStatus::Aborted, "{:?}", t.job);
    assert!(t.status_changed);
    assert!(t.job.reason.as_deref().unwrap_or("").contains("abort rule"));
    assert_eq!(
        (
            t.job.counts.failed,
            t.job.counts.succeeded,
            t.job.counts.cancelled
        ),
        (2, 1, 2)
    );

    // A desired-state job: succeeded once confirmed and reported.
    let job = store
        .create_job(NewJob {
            operation: Operation::Desired {
                patch: r#"{"mode":"eco"}"#.into(),
            },
            ..command_job(Target::Devices(vec!["j3".into()]), 0, None, far)
        })
        .await
        .unwrap();
    let t0 = job.created_ms;
    let t = store
        .tick_job(job.id, t0, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.started, vec!["j3".to_owned()]);
    let k3 = key_of(&*store, "j3").await;
    let row = store.state_of(k3).await.unwrap();
    assert_eq!(doc(&row.desired.document), doc(r#"{"mode":"eco"}"#));
    let t = store
        .tick_job(job.id, t0 + 10, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.job.counts.in_progress, 1, "not confirmed yet");
    store.ack_desired(k3, row.desired.version).await.unwrap();
    store
        .append(Arc::new(Batch {
            records: vec![],
            rejections: vec![],
            reports: vec![report(k3, 1, r#"{"mode":"eco"}"#)],
        }))
        .await
        .unwrap();
    let t = store
        .tick_job(job.id, t0 + 20, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.job.status, JobStatus::Completed);
    assert_eq!(t.job.counts.succeeded, 1);

    // The deadline: what was not started is cancelled, the job completes.
    let job = store
        .create_job(command_job(
            Target::Devices(all.clone()),
            1,
            None,
            now() + 50,
        ))
        .await
        .unwrap();
    let t = store
        .tick_job(job.id, job.created_ms + 100, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.job.status, JobStatus::Completed);
    assert_eq!(t.job.reason.as_deref(), Some("the deadline passed"));
    assert_eq!(t.job.counts.cancelled, 5);

    // Concurrent ticks start each device once.
    let job = store
        .create_job(command_job(Target::Devices(all.clone()), 0, None, far))
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        store.tick_job(job.id, job.created_ms, limits, TickScope::all()),
        store.tick_job(job.id, job.created_ms, limits, TickScope::all()),
    );
    let started = |r: Result<Option<furrow::store::JobTick>, StoreError>| {
        r.unwrap().map_or(0, |t| t.started.len())
    };
    assert_eq!(started(a) + started(b), 5);
    for id in &all {
        let open = store
            .open_commands(key_of(&*store, id).await)
            .await
            .unwrap();
        assert_eq!(open.len(), 1, "{id}: one command");
    }
    // Errors: unknown devices, an empty match.
    assert!(matches!(
        store
            .create_job(command_job(
                Target::Devices(vec!["nope".into()]),
                0,
                None,
                far
            ))
            .await,
        Err(StoreError::NoSuchDevice(_))
    ));
    assert!(matches!(
        store
            .create_job(command_job(
                Target::Tags(sel(&[("site", "mars")])),
                0,
                None,
                far
            ))
            .await,
        Err(StoreError::Job(_))
    ));
    assert_eq!(store.jobs(None, 100).await.unwrap().len(), 5);
    assert!(store.active_jobs().await.unwrap().contains(&job.id));
}

/// Firmware images (stored from a staged file, read back, refused twice,
/// kept while a job uses them) and a firmware job's devices: assigned
/// while in progress, succeeded once they report the version, and looked
/// at only when their state changed since the caller's last look.
async fn firmware_images_and_jobs(store: Arc<dyn Store>) {
    use furrow::firmware::FirmwareRecord;
    use sha2::Digest;
    let limits = StateLimits::default();
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let id = hex::encode(sha2::Sha256::digest(&bytes));
    let stage = |name: &str| {
        let p = std::env::temp_dir().join(format!("furrow-conf-{}-{name}", std::process::id()));
        std::fs::write(&p, &bytes).unwrap();
        p
    };
    let rec = FirmwareRecord {
        id: id.clone(),
        name: "pump".into(),
        version: "2.0.0".into(),
        model: "p7".into(),
        size: bytes.len() as u64,
        signature: "00".repeat(64),
        created_ms: now(),
        created_by: "test".into(),
    };
    let staged = stage("a");
    assert_eq!(
        store
            .put_firmware(rec.clone(), staged.clone())
            .await
            .unwrap(),
        rec
    );
    assert!(!staged.exists(), "the staged file is consumed");
    assert!(matches!(
        store.put_firmware(rec.clone(), stage("b")).await,
        Err(StoreError::FirmwareExists(_))
    ));
    assert_eq!(store.firmware(&id).await.unwrap(), Some(rec.clone()));
    assert_eq!(store.list_firmware().await.unwrap(), vec![rec.clone()]);
    let back = store.firmware_bytes(&id).await.unwrap().unwrap();
    assert!(
        back[..] == bytes[..],
        "bytes read back whole (over several pieces)"
    );
    assert!(store
        .firmware_bytes(&"0".repeat(64))
        .await
        .unwrap()
        .is_none());

    store.create_device("f1", [1; 32]).await.unwrap();
    let k = key_of(&*store, "f1").await;
    assert!(store.firmware_assignment(k).await.unwrap().is_none());
    let job = store
        .create_job(NewJob {
            operation: Operation::Firmware {
                image: id.clone(),
                version: "2.0.0".into(),
                max_downloads: 7,
            },
            ..command_job(
                Target::Devices(vec!["f1".into()]),
                0,
                None,
                now() + 3_600_000,
            )
        })
        .await
        .unwrap();
    assert_eq!(
        store.job(job.id).await.unwrap().unwrap().operation,
        job.operation,
        "the operation reads back"
    );
    let t0 = job.created_ms;
    let t = store
        .tick_job(job.id, t0, limits, TickScope::all())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.started, vec!["f1".to_owned()]);
    let a = store.firmware_assignment(k).await.unwrap().unwrap();
    assert_eq!(
        (a.job, a.image.as_str(), a.version.as_str(), a.max_downloads),
        (job.id, id.as_str(), "2.0.0", 7)
    );
    assert!(matches!(
        store.delete_firmware(&id).await,
        Err(StoreError::FirmwareInUse(_))
    ));
    // Nothing reported yet: a look at changed devices finds none.
    let t = store
        .tick_job(job.id, t0 + 10, limits, TickScope::changed())
        .await
        .unwrap()
        .unwrap();
    assert!(t.changed.is_empty());
    assert_eq!(t.job.counts.in_progress, 1);
    // Progress is looked at (the device is not done), and then the new
    // version: a look at changed devices misses no report.
    // (Patches under the 64 bytes of `report`'s limits.)
    let progress = r#"{"firmware":{"update":{"percent":40}}}"#;
    let done = r#"{"firmware":{"version":"2.0.0"}}"#;
    let mut counts = Vec::new();
    let mut last = None;
    for (seq, patch) in [(1, progress), (2, done)] {
        store
            .append(Arc::new(Batch {
                records: vec![],
                rejections: vec![],
                reports: vec![report(k, seq, patch)],
            }))
            .await
            .unwrap();
        let t = store
            .tick_job(job.id, t0 + 10 + seq, limits, TickScope::changed())
            .await
            .unwrap()
            .unwrap();
        counts.push((t.job.counts.in_progress, t.job.counts.succeeded));
        last = Some(t);
    }
    assert_eq!(counts, vec![(1, 0), (0, 1)]);
    let t = last.unwrap();
    assert_eq!(t.job.counts.succeeded, 1, "{:?}", t.job);
    assert_eq!(t.job.status, JobStatus::Completed);
    assert!(store.firmware_assignment(k).await.unwrap().is_none());
    assert!(store.delete_firmware(&id).await.unwrap());
    assert!(!store.delete_firmware(&id).await.unwrap());
    assert!(store.firmware(&id).await.unwrap().is_none());
    assert!(store.firmware_bytes(&id).await.unwrap().is_none());
}

/// A tick cut into slices of at most `max_devices` starts and looks at no
/// more than that per call, goes on where the slice before stopped, and
/// decides the job's next step only once every device has been looked at.
async fn jobs_tick_in_slices(store: Arc<dyn Store>) {
    let ids: Vec<String> = (0..7).map(|n| format!("s{n}")).collect();
    for id in &ids {
        store.create_device(id, [3; 32]).await.unwrap();
    }
    let job = store
        .create_job(command_job(
            Target::Devices(ids.clone()),
            0,
            None,
            now() + 3_600_000,
        ))
        .await
        .unwrap();
    let t0 = job.created_ms;

    // Slices of 3 start 3, 3 and 1, in order.
    let slices = tick_in_slices(&*store, job.id, t0, 3).await;
    assert_eq!(slices.len(), 3);
    assert!(slices.iter().all(|t| t.started.len() <= 3));
    let started: Vec<String> = slices.into_iter().flat_map(|t| t.started).collect();
    assert_eq!(started, ids, "each started once, in order");

    // Once all answered: 3, 3 and 1 change, and only the last slice, past
    // every device, decides that the job is done.
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    answer(&*store, &all, 0).await;
    let slices = tick_in_slices(&*store, job.id, t0 + 10, 3).await;
    assert_eq!(slices.len(), 3);
    assert!(slices.iter().all(|t| t.changed.len() <= 3));
    assert_eq!(slices.iter().map(|t| t.changed.len()).sum::<usize>(), 7);
    let (last, before) = slices.split_last().unwrap();
    for t in before {
        assert_eq!(t.job.status, JobStatus::Running, "not decided mid-way");
    }
    assert_eq!(last.job.status, JobStatus::Completed, "{:?}", last.job);
    assert!(last.status_changed);
    assert_eq!(
        store.job(job.id).await.unwrap().unwrap().counts.succeeded,
        7
    );
}

/// Ticks job `id` at `at` in slices of `max` devices, each going on where
/// the one before stopped, until one says there is no more.
async fn tick_in_slices(store: &dyn Store, id: u64, at: u64, max: usize) -> Vec<JobTick> {
    let mut slices: Vec<JobTick> = Vec::new();
    loop {
        let scope = TickScope {
            changed_only: false,
            after: slices.last().and_then(|t| t.more),
            max_devices: max,
        };
        let t = store
            .tick_job(id, at, StateLimits::default(), scope)
            .await
            .unwrap()
            .unwrap();
        let more = t.more.is_some();
        slices.push(t);
        if !more {
            return slices;
        }
        assert!(slices.len() < 10, "slices end");
    }
}

fn report(device: i64, seq: u64, patch: &str) -> ReportRecord {
    ReportRecord {
        device,
        seq,
        timestamp_ms: 1000 + seq,
        received_ms: 2000 + seq,
        patch: Bytes::from(patch.to_owned()),
        limits: StateLimits {
            max_bytes: 64,
            max_depth: 4,
        },
    }
}

fn doc(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().unwrap()
}

/// Device state: desired patches with If-Match, reports applied once and
/// in order inside appends (with telemetry), refusals, confirmations, the
/// history, and REPORT seqs counted as stored.
async fn device_state(store: Arc<dyn Store>) {
    let limits = StateLimits::default();
    store.create_device("s1", [1; 32]).await.unwrap();
    let k = key_of(&*store, "s1").await;
    // A device without state has empty documents; an unknown one none.
    let row = store.device_state("s1").await.unwrap().unwrap();
    assert_eq!((row.desired.version, row.reported.version), (0, 0));
    assert_eq!(row.desired.document, "{}");
    assert!(store.device_state("nope").await.unwrap().is_none());
    assert!(matches!(
        store
            .patch_desired("nope", obj(doc(r#"{"a":1}"#)), None, limits)
            .await,
        Err(StoreError::NoSuchDevice(_))
    ));

    // Desired: versions, If-Match.
    let row = store
        .patch_desired("s1", obj(doc(r#"{"led":"on","rate":5}"#)), Some(0), limits)
        .await
        .unwrap();
    assert_eq!(row.desired.version, 1);
    assert!(matches!(
        store
            .patch_desired("s1", obj(doc(r#"{"led":"off"}"#)), Some(0), limits)
            .await,
        Err(StoreError::State(StateError::VersionMismatch {
            expected: 0,
            current: 1
        }))
    ));
    let row = store
        .patch_desired("s1", obj(doc(r#"{"rate":null}"#)), Some(1), limits)
        .await
        .unwrap();
    assert_eq!(row.desired.version, 2);
    assert_eq!(doc(&row.desired.document), doc(r#"{"led":"on"}"#));
    // Concurrent writers with the same If-Match: exactly one wins.
    let (a, b) = tokio::join!(
        store.patch_desired("s1", obj(doc(r#"{"x":1}"#)), Some(2), limits),
        store.patch_desired("s1", obj(doc(r#"{"x":2}"#)), Some(2), limits),
    );
    assert_eq!(
        usize::from(a.is_ok()) + usize::from(b.is_ok()),
        1,
        "{a:?} {b:?}"
    );
    assert_eq!(store.state_of(k).await.unwrap().desired.version, 3);

    // Confirmations: never beyond the current version, never backwards.
    store.ack_desired(k, 9).await.unwrap();
    assert_eq!(store.state_of(k).await.unwrap().desired_acked, 0);
    store.ack_desired(k, 3).await.unwrap();
    store.ack_desired(k, 2).await.unwrap();
    assert_eq!(store.state_of(k).await.unwrap().desired_acked, 3);

    // Reports with telemetry in one append; a repeat changes nothing.
    let append = |records: Vec<TelemetryRecord>, reports: Vec<ReportRecord>| {
        let store = Arc::clone(&store);
        async move {
            store
                .append(Arc::new(Batch {
                    records,
                    rejections: Vec::new(),
                    reports,
                }))
                .await
                .unwrap()
        }
    };
    let out = append(
        vec![rec(k, 1, 10), rec(k, 3, 30)],
        vec![
            report(k, 2, r#"{"led":"on","t":{"a":1}}"#),
            report(k, 4, r#"{"t":{"b":2}}"#),
        ],
    )
    .await;
    assert!(out.refused.is_empty());
    let row = store.state_of(k).await.unwrap();
    assert_eq!(
        doc(&row.reported.document),
        doc(r#"{"led":"on","t":{"a":1,"b":2}}"#)
    );
    assert_eq!((row.reported.version, row.reported_seq), (2, 4));
    assert_eq!(doc(&row.reported.fields), doc(r#"{"led":1002,"t":1004}"#));
    // The last seq stored is a report's.
    assert_eq!(store.device_seqs(k).await.unwrap().stored, 4);
    assert_eq!(seqs(&*store, "s1").await, vec![1, 3]);
    let out = append(vec![], vec![report(k, 2, r#"{"led":"off"}"#)]).await;
    assert!(out.refused.is_empty());
    assert_eq!(store.state_of(k).await.unwrap().reported.version, 2);

    // A report that would make the document too large is refused, the
    // document unchanged, its seq taken; the next one applies.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(40));
    let out = append(
        vec![],
        vec![report(k, 5, &big), report(k, 6, r#"{"led":null}"#)],
    )
    .await;
    assert_eq!(out.refused.len(), 1);
    assert_eq!(out.refused[0].seq, 5);
    assert_eq!(out.refused[0].code, furrow_proto::ErrorCode::StateTooLarge);
    let row = store.state_of(k).await.unwrap();
    assert_eq!(doc(&row.reported.document), doc(r#"{"t":{"a":1,"b":2}}"#));
    assert_eq!((row.reported.version, row.reported_seq), (3, 6));
    assert_eq!(store.device_seqs(k).await.unwrap().stored, 6);

    // History: applied reports, newest first, paged.
    let h = store.state_history("s1", None, 10).await.unwrap();
    assert_eq!(
        h.iter().map(|c| (c.seq, c.version)).collect::<Vec<_>>(),
        vec![(6, 3), (4, 2), (2, 1)]
    );
    assert_eq!((h[2].at_ms, h[2].received_ms), (1002, 2002));
    let older = store.state_history("s1", Some(h[0].id), 1).await.unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].seq, 4);
    assert!(matches!(
        store.state_history("nope", None, 10).await,
        Err(StoreError::NoSuchDevice(_))
    ));
}

/// API tokens (by name, by hash, revoked) and the audit log (newest first,
/// paged).
async fn api_tokens_and_audit(store: Arc<dyn Store>) {
    use furrow::store::{NewAudit, Role};
    let t = store
        .create_api_token("dash", Role::Read, [1; 32])
        .await
        .unwrap();
    assert_eq!(
        (t.name.as_str(), t.role, t.revoked_ms),
        ("dash", Role::Read, None)
    );
    store
        .create_api_token("ops", Role::Operate, [2; 32])
        .await
        .unwrap();
    assert!(matches!(
        store.create_api_token("dash", Role::Admin, [3; 32]).await,
        Err(StoreError::TokenExists(_))
    ));
    let found = store.api_token_by_hash([2; 32]).await.unwrap().unwrap();
    assert_eq!((found.name.as_str(), found.role), ("ops", Role::Operate));
    assert!(store.api_token_by_hash([9; 32]).await.unwrap().is_none());
    assert!(store.revoke_api_token("ops").await.unwrap());
    assert!(!store.revoke_api_token("ops").await.unwrap());
    assert!(matches!(
        store.revoke_api_token("nobody").await,
        Err(StoreError::NoSuchToken(_))
    ));
    assert!(
        store.api_token_by_hash([2; 32]).await.unwrap().is_none(),
        "revoked"
    );
    let all = store.api_tokens().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all[1].revoked_ms.is_some() && all[0].revoked_ms.is_none());

    for i in 0..5 {
        store
            .record_audit(NewAudit {
                actor: "admin".into(),
                source: "127.0.0.1".into(),
                action: "device.create".into(),
                target: format!("d{i}"),
                detail: "{}".into(),
            })
            .await
            .unwrap();
    }
    let page = store.audit(None, 3).await.unwrap();
    let targets: Vec<&str> = page.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["d4", "d3", "d2"], "newest first");
    let rest = store.audit(Some(page[2].id), 10).await.unwrap();
    let targets: Vec<&str> = rest.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["d1", "d0"]);
    assert!(rest[0].at_ms > 0 && rest[0].actor == "admin" && rest[0].source == "127.0.0.1");
}

/// A rotation with a grace period keeps the old token beside the new one
/// until the device uses the new one; then its `furrow.token` commands are
/// cancelled (if open) and their payloads become `{}`.
async fn token_rotation(store: Arc<dyn Store>) {
    store.create_device("r", [1; 32]).await.unwrap();
    let r = key_of(&*store, "r").await;
    let until = now() + 60_000;
    store.rotate_token("r", [2; 32], Some(until)).await.unwrap();
    let auth = store.device_auth("r").await.unwrap().unwrap();
    assert_eq!(auth.token_hash, [2; 32]);
    let previous = auth.previous.expect("the old token in its grace period");
    assert_eq!((previous.hash, previous.until_ms), ([1; 32], until));
    // A second rotation: the token it replaces is now the previous one.
    store
        .rotate_token("r", [3; 32], Some(until + 1))
        .await
        .unwrap();
    let auth = store.device_auth("r").await.unwrap().unwrap();
    assert_eq!(auth.previous.map(|p| p.hash), Some([2; 32]));

    let carrier = NewCommand {
        name: furrow::store::TOKEN_COMMAND.into(),
        ..cmd("", until)
    };
    let open = store.create_command("r", carrier.clone()).await.unwrap();
    let other = store.create_command("r", cmd("keep", until)).await.unwrap();
    // Forgetting with a hash that is not current changes nothing.
    store.forget_previous_token(r, [2; 32]).await.unwrap();
    assert!(store
        .device_auth("r")
        .await
        .unwrap()
        .unwrap()
        .previous
        .is_some());
    assert_eq!(
        store.command(open.id).await.unwrap().unwrap().state,
        CommandState::Queued
    );
    // The device authenticated with [3; 32]: the previous token goes, and
    // the command that carried the new one is cancelled and blanked.
    store.forget_previous_token(r, [3; 32]).await.unwrap();
    let auth = store.device_auth("r").await.unwrap().unwrap();
    assert_eq!((auth.token_hash, auth.previous), ([3; 32], None));
    let c = store.command(open.id).await.unwrap().unwrap();
    assert_eq!(c.state, CommandState::Cancelled);
    assert_eq!(c.payload, b"{}", "the token is not kept");
    let o = store.command(other.id).await.unwrap().unwrap();
    assert_eq!(
        (o.state, o.payload.as_slice()),
        (CommandState::Queued, &b"{\"x\":1}"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU32::new(0);
    let fresh: Fresh<'_> = Box::new(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.path().join(format!("f{i}.db"));
        Box::pin(async move {
            Arc::new(SqliteStore::open(path, SqliteOptions::default()).unwrap()) as Arc<dyn Store>
        })
    });
    suite("sqlite", fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conformance() {
    let pg = Postgres::start();
    let fresh: Fresh<'_> = Box::new(|| {
        let pg = &pg;
        Box::pin(async move {
            let url = pg.fresh_db().await;
            Arc::new(
                PostgresStore::connect(&url, PostgresOptions::default())
                    .await
                    .unwrap(),
            ) as Arc<dyn Store>
        })
    });
    suite("postgres", fresh).await;
}

/// Migrations run once however many instances start together, again
/// harmlessly, and a newer schema is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_shared_and_versioned() {
    let pg = Postgres::start();
    let url = pg.fresh_db().await;
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { PostgresStore::connect(&url, PostgresOptions::default()).await },
            )
        })
        .collect();
    for s in starts {
        s.await.unwrap().expect("concurrent start");
    }
    let store = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let client = store.pool().get().await.unwrap();
    client
        .execute("UPDATE furrow_schema SET version = 99", &[])
        .await
        .unwrap();
    assert!(matches!(
        PostgresStore::connect(&url, PostgresOptions::default()).await,
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
    // An unreachable database is a clear error, not a hang.
    let mut dead = pg.url_of("nosuchdb");
    dead.push_str("?connect_timeout=2");
    assert!(PostgresStore::connect(&dead, PostgresOptions::default())
        .await
        .is_err());
}
