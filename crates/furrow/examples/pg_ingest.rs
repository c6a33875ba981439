//! How fast the PostgreSQL store writes telemetry, against the ceiling of a
//! raw binary `COPY` into the same table, measured side by side.
//!
//! ```sh
//! cargo run --release -p furrow --example pg_ingest -- \
//!     --database postgres://postgres@127.0.0.1:5432/postgres \
//!     [--rows-per-batch 8192,1024] [--devices 100] [--seconds 10] [--rounds 3] [--payload 40] [--run 32]
//! ```
//!
//! Why it exists: issue 6 asked that deduplicated batch writes reach at
//! least 70% of the rows per second of a raw `COPY`; issue 13 that the
//! layout's cost not grow with the devices a batch touches, so run it with
//! `--devices 100` and `--devices 10000`. The machine this runs on is
//! shared and noisy, so the methods run in interleaved rounds (A B C A B C
//! ...), each for the same time on freshly truncated and checkpointed
//! tables, and only ratios measured in one run are worth quoting.
//!
//! * (a) binary `COPY telemetry FROM STDIN`, one per batch, no
//!   deduplication: the reference ceiling (the partitioned table and its
//!   `(device, seq)` index, nothing else).
//! * (k) the same COPY into a table keyed by `PRIMARY KEY (device, seq)`,
//!   unpartitioned: 0.1's layout, whose unique key refused duplicates.
//! * (s) `PostgresStore::append`, the gateway's own path, one batch at a
//!   time, awaited, as the writer calls it: raise the batch's devices'
//!   watermarks in one `UPDATE` that returns the ones it found, skip seqs
//!   at or below those, COPY the rest.
//! * (s') the same with one already stored row in every batch (a retried
//!   commit, a takeover race): it is skipped, the rest stored.
//!
//! Batches are shaped like the gateway's: rows from many devices, in runs
//! of consecutive seqs per device (`--run`: 32 is one socket read's worth
//! flat out, 2 a quiet fleet's), interleaved.
//! It creates its own database on the server (`furrow_pg_ingest_<pid>`),
//! migrates it with the store, and drops it at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use furrow::store::postgres::{COPY_COLUMNS, COPY_TYPES};
use furrow::store::prelude::*;
use furrow::store::{Batch, PostgresOptions, PostgresStore, TelemetryRecord};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

#[derive(Parser, Debug)]
struct Args {
    /// A database on the server to measure (the program creates and drops
    /// its own database there).
    #[arg(long)]
    database: String,
    /// Rows per batch; several sizes separated by commas are measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "8192,1024")]
    rows_per_batch: Vec<usize>,
    /// Devices the rows of a batch are spread over.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Seconds per method per round.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds (each runs every method once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Payload bytes per row.
    #[arg(long, default_value_t = 40)]
    payload: usize,
    /// Consecutive seqs of one device in a row of the batch: 32 is about
    /// one socket read's worth of frames, as the gateway sees them flat
    /// out; 2 is a batch at 10,000 devices x 5 msgs/s.
    #[arg(long, default_value_t = 32)]
    run: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Copy,
    Keyed,
    Store,
    StoreDup,
}

impl Method {
    const ALL: [Method; 4] = [Method::Copy, Method::Keyed, Method::Store, Method::StoreDup];

    fn name(self) -> &'static str {
        match self {
            Method::Copy => "(a) raw binary COPY, no dedup",
            Method::Keyed => "(k) raw binary COPY, keyed table (0.1)",
            Method::Store => "(s) store.append (the gateway's path)",
            Method::StoreDup => "(s') store.append, 1 stored row per batch",
        }
    }
}

/// Makes gateway-shaped batches: every device in turn contributes a run of
/// consecutive seqs until the batch is full.
struct Gen {
    keys: Vec<i64>,
    next_seq: Vec<u64>,
    cursor: usize,
    payloads: Vec<Bytes>,
    run: usize,
}

impl Gen {
    fn new(keys: Vec<i64>, payload: usize, run: usize) -> Self {
        let mut x: u32 = 0x1234_5678;
        let payloads = (0..256)
            .map(|_| {
                (0..payload)
                    .map(|_| {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        b'a' + ((x >> 24) % 26) as u8
                    })
                    .collect::<Vec<u8>>()
                    .into()
            })
            .collect();
        let n = keys.len();
        Self {
            keys,
            next_seq: vec![1; n],
            cursor: 0,
            payloads,
            run: run.max(1),
        }
    }

    fn reset(&mut self) {
        self.next_seq.iter_mut().for_each(|s| *s = 1);
        self.cursor = 0;
    }

    fn batch(&mut self, rows: usize) -> Batch {
        let now = furrow::clock::now_ms();
        let mut records = Vec::with_capacity(rows);
        while records.len() < rows {
            let d = self.cursor % self.keys.len();
            self.cursor += 1;
            for _ in 0..self.run.min(rows - records.len()) {
                let seq = self.next_seq[d];
                self.next_seq[d] += 1;
                records.push(TelemetryRecord {
                    device: self.keys[d],
                    seq,
                    timestamp_ms: now,
                    received_ms: now,
                    content_type: 1,
                    payload: self.payloads[seq as usize % self.payloads.len()].clone(),
                });
            }
        }
        Batch {
            records,
            rejections: Vec::new(),
            reports: Vec::new(),
        }
    }
}

/// Writes `batch` with binary COPY into `table`, sorted by key like the
/// store does (the same work for every method).
async fn copy_into(client: &Client, table: &str, batch: &Batch) -> anyhow::Result<()> {
    let mut records: Vec<_> = batch.records.iter().collect();
    records.sort_by_key(|r| (r.device, r.seq as i64));
    let sink = client
        .copy_in(&format!("COPY {table} ({COPY_COLUMNS}) FROM STDIN BINARY"))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    let mut writer = std::pin::pin!(writer);
    for r in records {
        let row: [&(dyn ToSql + Sync); 6] = [
            &r.device,
            &(r.seq as i64),
            &(r.timestamp_ms as i64),
            &(r.received_ms as i64),
            &i16::from(r.content_type),
            &&r.payload[..],
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}

struct Conns {
    store: PostgresStore,
    copy: Client,
}

/// 0.1's telemetry table, for (k).
const KEYED: &str = "CREATE TABLE IF NOT EXISTS telemetry_keyed (
    device bigint NOT NULL, seq bigint NOT NULL, timestamp_ms bigint NOT NULL,
    received_ms bigint NOT NULL, content_type smallint NOT NULL, payload bytea NOT NULL,
    PRIMARY KEY (device, seq))";

async fn write_batch(method: Method, conns: &mut Conns, batch: Batch) -> anyhow::Result<()> {
    match method {
        Method::Copy => copy_into(&conns.copy, "telemetry", &batch).await,
        Method::Keyed => copy_into(&conns.copy, "telemetry_keyed", &batch).await,
        Method::Store | Method::StoreDup => {
            conns.store.append(Arc::new(batch)).await?;
            Ok(())
        }
    }
}

/// One measurement: new rows per second of `method` over `secs` on an
/// empty, checkpointed table.
async fn measure(
    method: Method,
    conns: &mut Conns,
    admin: &Client,
    gen: &mut Gen,
    rows: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    admin
        .batch_execute(
            "TRUNCATE telemetry, telemetry_keyed;
             UPDATE devices SET stored_seq = 0, last_seen_ms = NULL",
        )
        .await?;
    admin.batch_execute("VACUUM devices").await?;
    admin.batch_execute("CHECKPOINT").await?;
    gen.reset();
    let start = Instant::now();
    let mut written = 0usize;
    let mut last: Option<TelemetryRecord> = None;
    while start.elapsed() < secs {
        let mut batch = gen.batch(rows);
        let first = batch.records.first().cloned();
        if method == Method::StoreDup {
            // A row the previous batch stored: the whole batch conflicts
            // on one key, as after a retried commit or a takeover race.
            if let Some(dup) = last.take() {
                batch.records.push(dup);
            }
            last = first;
        }
        write_batch(method, conns, batch).await?;
        written += rows;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let table = if method == Method::Keyed {
        "telemetry_keyed"
    } else {
        "telemetry"
    };
    let stored: i64 = admin
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    if stored as usize != written {
        bail!("{method:?}: wrote {written} rows, the table holds {stored}");
    }
    Ok(written as f64 / elapsed)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `url` with its database name replaced by `db`.
fn with_dbname(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(scheme_end) = base.find("://") else {
        bail!("expected a postgres://... URL");
    };
    let authority_end = base[scheme_end + 3..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + 3 + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "cannot connect to PostgreSQL")?;
    tokio::spawn(async move {
        // Dropping the database at the end ends the connections still open.
        if let Err(e) = conn.await {
            if !e.is_closed() && e.code() != Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)
            {
                eprintln!("connection: {e}");
            }
        }
    });
    Ok(client)
}

async fn run(args: &Args, url: &str, admin: &Client) -> anyhow::Result<()> {
    let store = PostgresStore::connect(
        url,
        PostgresOptions {
            pool_size: 1,
            ..PostgresOptions::default()
        },
    )
    .await?;
    let mut keys = Vec::with_capacity(args.devices);
    for n in 0..args.devices {
        let id = format!("ingest-{n}");
        store.create_device(&id, [0; 32]).await?;
        let auth = store
            .device_auth(&id)
            .await?
            .context("a provisioned device is missing")?;
        keys.push(auth.key);
    }
    let copy = connect(url).await?;
    copy.batch_execute(KEYED).await?;
    // The partition for now, so that the raw COPYs have somewhere to go
    // (the store creates partitions as it needs them).
    store
        .append(Arc::new(Gen::new(vec![keys[0]], 8, 1).batch(1)))
        .await?;
    let mut conns = Conns { store, copy };
    let mut gen = Gen::new(keys, args.payload, args.run);
    let secs = Duration::from_secs(args.seconds);

    for &rows in &args.rows_per_batch {
        println!(
            "\n## {rows} rows per batch, {} devices, {}-byte payloads, {} s per method per round\n",
            args.devices, args.payload, args.seconds
        );
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); Method::ALL.len()];
        for round in 1..=args.rounds {
            for (i, &m) in Method::ALL.iter().enumerate() {
                let r = measure(m, &mut conns, admin, &mut gen, rows, secs).await?;
                eprintln!("round {round}: {:<45} {:>9.0} rows/s", m.name(), r);
                results[i].push(r);
            }
        }
        let head: Vec<String> = (1..=args.rounds).map(|r| format!("round {r}")).collect();
        println!("| method | {} | median | vs (a) |", head.join(" | "));
        println!("|---|{}---|---|", "---|".repeat(args.rounds));
        let base = median(&results[0]);
        for (i, m) in Method::ALL.iter().enumerate() {
            let cells: Vec<String> = results[i].iter().map(|r| format!("{r:.0}")).collect();
            let med = median(&results[i]);
            println!(
                "| {} | {} | {med:.0} | {:.2} |",
                m.name(),
                cells.join(" | "),
                med / base
            );
        }
        for (i, label) in [(1, "(k)/(a)"), (2, "(s)/(a)"), (3, "(s')/(a)")] {
            let per_round: Vec<String> = results[i]
                .iter()
                .zip(&results[0])
                .map(|(x, a)| format!("{:.2}", x / a))
                .collect();
            println!(
                "\n{label}: {:.2} (medians); per round {}",
                median(&results[i]) / base,
                per_round.join(", ")
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.devices == 0 || args.rounds == 0 || args.rows_per_batch.contains(&0) {
        bail!("--devices, --rounds and --rows-per-batch must be positive");
    }
    let admin = connect(&args.database).await?;
    let db = format!("furrow_pg_ingest_{}", std::process::id());
    let url = with_dbname(&args.database, &db)?;
    let row = admin
        .query_one(
            "SELECT version(), current_setting('synchronous_commit'),
                    current_setting('shared_buffers'), current_setting('max_wal_size')",
            &[],
        )
        .await?;
    let (version, sync, sb, wal): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    println!("# pg_ingest: {version}");
    println!(
        "synchronous_commit={sync} shared_buffers={sb} max_wal_size={wal}; database {db}; \
         one connection per method"
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    // The measurements run against the new database; the admin connection
    // truncates and checkpoints there too.
    let result = async {
        let inner = connect(&url).await?;
        run(&args, &url, &inner).await
    }
    .await;
    let dropped = admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await;
    result?;
    dropped.with_context(|| format!("cannot drop database {db}"))?;
    Ok(())
}
