//! How fast one device's history reads back from a large store: 1,000 rows
//! by seq range and by time range, out of ROWS rows written the way a
//! quiet fleet writes them (every device's readings interleaved in arrival
//! order; on SQLite then sealed into postings by the store itself, on
//! PostgreSQL spread over about 16 partitions).
//!
//! ```sh
//! cargo run --release -p furrow --example history_reads -- [ROWS] [DEVICES] [DIR | postgres://...]
//! ```
//!
//! Defaults: 10,000,000 rows over 1,000 devices into SQLite in a temporary
//! directory (about 2.5 GB; loading takes a few minutes), loaded with
//! `synchronous=off` (this measures reads, not durability). Given a
//! PostgreSQL URL instead, it fills that database (use a scratch one:
//! `createdb furrow_history`, and drop it afterwards). Prints p50, p99 and
//! max of 200 reads of each kind at random places.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use furrow::store::sqlite::{SqliteOptions, SqliteStore, Synchronous};
use furrow::store::{
    Batch, PostgresOptions, PostgresStore, Store, TelemetryRange, TelemetryRecord,
};

const T0: u64 = 1_763_683_200_000;

fn pct(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let devices: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let per_device = rows / devices;
    let tmp = tempfile::tempdir()?;
    let target = args.get(2).cloned().unwrap_or_default();
    let postgres = target.starts_with("postgres");
    let store: Arc<dyn Store> = if postgres {
        // About 16 partitions over the history (device clocks tick a second
        // per reading, and arrival follows them).
        let opts = PostgresOptions {
            chunk_span_ms: (per_device * 1_000 / 16).max(60_000),
            ..PostgresOptions::default()
        };
        Arc::new(PostgresStore::connect(&target, opts).await?)
    } else {
        let dir = match target.as_str() {
            "" => tmp.path().to_path_buf(),
            d => std::path::PathBuf::from(d),
        };
        std::fs::create_dir_all(&dir)?;
        let opts = SqliteOptions {
            synchronous: Synchronous::Off,
            ..SqliteOptions::default()
        };
        Arc::new(SqliteStore::open(dir.join("furrow.db"), opts)?)
    };
    let mut keys = Vec::new();
    for d in 0..devices {
        let id = format!("h{d}");
        if store.device_auth(&id).await?.is_none() {
            store.create_device(&id, [0; 32]).await?;
        }
        keys.push(store.device_auth(&id).await?.map(|a| a.key).unwrap_or(0));
    }
    let have = store.device("h0").await?.map_or(0, |d| d.last_seq);
    if have < per_device {
        let started = Instant::now();
        let payload = Bytes::from(vec![b'7'; 120]);
        // Seq s of every device, then s + 1: arrival order of a quiet fleet;
        // device clocks tick one second per reading.
        let mut batch = Vec::with_capacity(10_000);
        for seq in have + 1..=per_device {
            for &key in &keys {
                batch.push(TelemetryRecord {
                    device: key,
                    seq,
                    timestamp_ms: T0 + seq * 1_000,
                    received_ms: T0 + seq * 1_000,
                    content_type: 0,
                    payload: payload.clone(),
                });
                if batch.len() == 10_000 {
                    let records = std::mem::replace(&mut batch, Vec::with_capacity(10_000));
                    store
                        .append(Arc::new(Batch {
                            records,
                            rejections: vec![],
                            reports: Vec::new(),
                        }))
                        .await?;
                }
            }
        }
        store
            .append(Arc::new(Batch {
                records: batch,
                rejections: vec![],
                reports: Vec::new(),
            }))
            .await?;
        println!(
            "loaded {} rows over {devices} devices in {:.0} s",
            per_device * devices,
            started.elapsed().as_secs_f64()
        );
    }
    if !postgres {
        // Let the seals catch up (they run between commits and on a timer).
        tokio::time::sleep(Duration::from_secs(12)).await;
    }

    let (mut by_seq, mut by_time) = (Vec::new(), Vec::new());
    for i in 0..200u64 {
        let d = format!("h{}", (i * 7919) % devices);
        let from = 1 + (i * 104_729) % per_device.saturating_sub(1_000).max(1);
        let t = Instant::now();
        let r = store
            .telemetry(
                &d,
                TelemetryRange {
                    from_seq: from,
                    ..TelemetryRange::default()
                },
                1_000,
            )
            .await?;
        by_seq.push(t.elapsed());
        assert_eq!(r.first().map(|r| r.seq), Some(from));
        let t = Instant::now();
        let r = store
            .telemetry(
                &d,
                TelemetryRange {
                    from_ms: T0 + from * 1_000,
                    to_ms: T0 + (from + 999) * 1_000,
                    ..TelemetryRange::default()
                },
                1_000,
            )
            .await?;
        by_time.push(t.elapsed());
        assert_eq!(r.len(), 1_000.min(per_device as usize));
    }
    println!(
        "{} rows, {devices} devices, {per_device} each: 1,000 rows of one device",
        per_device * devices
    );
    println!("  by seq range:  {}", pct(by_seq));
    println!("  by time range: {}", pct(by_time));
    Ok(())
}
