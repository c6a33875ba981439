//! Which SQLite layout keeps the cost of a commit flat as a fleet grows?
//! Measures two layouts side by side on the same workload: readings from
//! D devices arriving in round-robin order (a quiet fleet: each device
//! has at most one reading in a small group commit), committed in
//! batches of B rows with `synchronous=FULL` in WAL mode.
//!
//! - `keyed`: furrow 0.1's table, `WITHOUT ROWID` keyed by (device, seq),
//!   `INSERT OR IGNORE`. Each commit dirties about one B-tree page per
//!   device it touches, and WAL writes every dirty page whole.
//! - `log`: rows appended in arrival order to a rowid table (one page per
//!   ~20 rows, always at the right edge); every S rows, a seal writes one
//!   posting per device (its rows' rowids, seq and time bounds) keyed by
//!   (device, seq_lo), plus its watermark, in slices of 2,000 devices.
//!
//! ```sh
//! cargo run --release -p furrow --example sqlite_layout -- [ROWS] [BATCH] [SEAL_ROWS]
//! ```
//!
//! Prints rows/s and bytes written per row (from /proc/self/io) for each
//! layout at 100, 1,000 and 10,000 devices, interleaved round by round.

use std::collections::HashMap;
use std::time::Instant;

use rusqlite::{params, Connection};

fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn open(path: &std::path::Path) -> Connection {
    let c = Connection::open(path).expect("open");
    let _: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .expect("wal");
    c.execute_batch("PRAGMA synchronous=FULL;")
        .expect("pragmas");
    c
}

/// Row `i` of the workload: (device, seq) in round-robin arrival order.
fn row(i: u64, devices: u64) -> (i64, i64) {
    ((i % devices) as i64 + 1, (i / devices) as i64 + 1)
}

const PAYLOAD: &[u8] = br#"{"v":21.512,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;

fn keyed(rows: u64, batch: u64, devices: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = open(&dir.path().join("k.db"));
    c.execute_batch(
        "CREATE TABLE telemetry (device INTEGER NOT NULL, seq INTEGER NOT NULL,
           timestamp_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
           content_type INTEGER NOT NULL, payload BLOB NOT NULL,
           PRIMARY KEY (device, seq)) WITHOUT ROWID;",
    )
    .expect("schema");
    let (t0, w0) = (Instant::now(), written_bytes());
    let mut i = 0;
    while i < rows {
        let tx = c.transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO telemetry VALUES (?1, ?2, ?3, ?3, 1, ?4)")
                .expect("prepare");
            for j in i..(i + batch).min(rows) {
                let (d, s) = row(j, devices);
                st.execute(params![d, s, j as i64, PAYLOAD])
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
        i += batch;
    }
    let secs = t0.elapsed().as_secs_f64();
    (
        rows as f64 / secs,
        (written_bytes() - w0) as f64 / rows as f64,
    )
}

fn log(rows: u64, batch: u64, devices: u64, seal_rows: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut c = open(&dir.path().join("l.db"));
    c.execute_batch(
        "CREATE TABLE chunk_1 (device INTEGER NOT NULL, seq INTEGER NOT NULL,
           timestamp_ms INTEGER NOT NULL, received_ms INTEGER NOT NULL,
           content_type INTEGER NOT NULL, payload BLOB NOT NULL);
         CREATE TABLE postings (device INTEGER NOT NULL, seq_lo INTEGER NOT NULL,
           seq_hi INTEGER NOT NULL, ts_lo INTEGER NOT NULL, ts_hi INTEGER NOT NULL,
           chunk INTEGER NOT NULL, rowids BLOB NOT NULL,
           PRIMARY KEY (device, seq_lo)) WITHOUT ROWID;
         CREATE INDEX postings_time ON postings (device, ts_hi);
         CREATE TABLE watermarks (device INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
           received_ms INTEGER NOT NULL);",
    )
    .expect("schema");
    // In memory, as the store would keep them: each device's unsealed rows
    // as (seq, timestamp, rowid).
    type Rows = Vec<(i64, i64, i64)>;
    let mut tail: HashMap<i64, Rows> = HashMap::new();
    let mut marks: HashMap<i64, i64> = HashMap::new();
    let mut since_seal = 0;
    let (t0, w0) = (Instant::now(), written_bytes());
    let mut i = 0;
    while i < rows {
        let tx = c.transaction().expect("tx");
        {
            let mut st = tx
                .prepare_cached("INSERT INTO chunk_1 VALUES (?1, ?2, ?3, ?3, 1, ?4)")
                .expect("prepare");
            for j in i..(i + batch).min(rows) {
                let (d, s) = row(j, devices);
                // The duplicate rule: a seq at or below the watermark.
                let m = marks.entry(d).or_insert(0);
                if s <= *m {
                    continue;
                }
                *m = s;
                st.execute(params![d, s, j as i64, PAYLOAD])
                    .expect("insert");
                tail.entry(d)
                    .or_default()
                    .push((s, j as i64, tx.last_insert_rowid()));
            }
        }
        tx.commit().expect("commit");
        since_seal += batch;
        i += batch;
        if since_seal >= seal_rows || i >= rows {
            since_seal = 0;
            let mut all: Vec<(i64, Rows)> = tail.drain().collect();
            all.sort_by_key(|(d, _)| *d);
            for slice in all.chunks(2000) {
                let tx = c.transaction().expect("tx");
                {
                    let mut p = tx
                        .prepare_cached("INSERT INTO postings VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6)")
                        .expect("prepare");
                    let mut w = tx
                        .prepare_cached(
                            "INSERT INTO watermarks VALUES (?1, ?2, ?3)
                             ON CONFLICT (device) DO UPDATE SET seq = excluded.seq,
                               received_ms = excluded.received_ms",
                        )
                        .expect("prepare");
                    for (d, rs) in slice {
                        let mut blob = Vec::with_capacity(rs.len() * 3);
                        let mut prev = 0i64;
                        for &(_, _, rowid) in rs {
                            let mut v = (rowid - prev) as u64;
                            prev = rowid;
                            loop {
                                let b = (v & 0x7f) as u8;
                                v >>= 7;
                                if v == 0 {
                                    blob.push(b);
                                    break;
                                }
                                blob.push(b | 0x80);
                            }
                        }
                        let (first, last) = (rs[0], rs[rs.len() - 1]);
                        p.execute(params![d, first.0, last.0, first.1, last.1, blob])
                            .expect("posting");
                        w.execute(params![d, last.0, last.1]).expect("mark");
                    }
                }
                tx.commit().expect("commit");
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    (
        rows as f64 / secs,
        (written_bytes() - w0) as f64 / rows as f64,
    )
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = args.first().copied().unwrap_or(400_000);
    let batch = args.get(1).copied().unwrap_or(200);
    let seal = args.get(2).copied().unwrap_or(100_000);
    println!(
        "{rows} rows of {} B, {batch} rows per commit, seal every {seal} rows, synchronous=FULL",
        PAYLOAD.len()
    );
    println!("| devices | keyed rows/s | log rows/s | log / keyed | keyed B written/row | log B written/row |");
    println!("|---|---|---|---|---|---|");
    for devices in [100, 1_000, 10_000] {
        let (kr, kw) = keyed(rows, batch, devices);
        let (lr, lw) = log(rows, batch, devices, seal);
        println!(
            "| {devices} | {kr:.0} | {lr:.0} | {:.2} | {kw:.0} | {lw:.0} |",
            lr / kr
        );
    }
}
