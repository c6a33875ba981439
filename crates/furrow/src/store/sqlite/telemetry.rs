//! Telemetry in SQLite: rows appended in arrival order, indexed per device
//! after the fact.
//!
//! A quiet fleet's group commit holds one reading from each of hundreds of
//! devices. In a table keyed by (device, seq) each of those readings lands
//! on its own B-tree page, and WAL writes every dirty page whole: furrow
//! 0.1 wrote 5 to 14 KB per 121-byte reading and fell behind at 10,000
//! devices x 5 msgs/s (62 % of its CPU in SQLite's page I/O, by `perf`).
//! Here a commit only appends rows, so its cost does not depend on how many
//! devices it touches (`examples/sqlite_layout.rs`: 4 to 12 times the rows
//! per second, ~400 bytes written per row at 100, 1,000 and 10,000
//! devices).
//!
//! ```text
//!  append (every group commit)              seal (in slices of devices, between commits)
//!  chunk_N: rows in arrival order    ──▶    postings: (device, seq_lo) -> rowids in chunk_N
//!  tail (memory): device -> unsealed rows    watermarks: device -> highest sealed seq
//! ```
//!
//! - **chunk_N** tables hold the rows (rowid order = arrival order). The
//!   active chunk changes every `chunk_span_ms`, so that old data can
//!   later be dropped a whole table at a time (`chunks` lists them).
//! - The **tail**, in memory, lists each device's rows not yet indexed.
//!   It is bounded: a *seal* starts when it holds `seal_rows` rows or a
//!   device's oldest row is `seal_after_ms` old, and takes the devices that
//!   are due ([`Log::choose`]), not the whole tail.
//! - A seal writes, per device, a **posting** (its rows' rowids, seq and
//!   time bounds) and raises its **watermark**, in slices of at most
//!   [`LogOptions::slice_budget`] of work (and [`SLICE_DEVICES`] devices)
//!   per transaction, so that appends go on in between. Its cost is per
//!   device and seal, not per reading: about one page of the postings
//!   B-tree per device, written whole to the WAL and again at the
//!   checkpoint. So a device waits for a posting's worth of readings (a
//!   minute of a quiet fleet's) rather than being sealed with every other.
//! - **Reads** by seq or time walk the device's postings in seq order
//!   (one seek to the first by seq; by time, a binary search over the key,
//!   as a device's running maximum timestamp only grows with it), fetch
//!   rows by rowid, then add the tail. Postings have no other index: each
//!   would put one more page per device into every seal.
//! - **Duplicates**: a device's stored seqs only grow (furrow/1's rule: a
//!   seq at or below the highest taken one is a duplicate), so the store
//!   skips a record at or below the device's highest stored seq; no unique
//!   index over all rows is needed.
//! - **After a crash** the tail is rebuilt at open from the rows above each
//!   chunk's `sealed_upto` whose seq is above their device's watermark
//!   (postings and watermarks commit together). `sealed_upto` stays below
//!   the oldest row left in the tail, and a device whose oldest row lags
//!   `seal_rows` rows behind the newest is due, so that scan stays short.
//!
//! Seqs and timestamps are u64 on the wire and i64 in SQLite. Rows and
//! watermarks keep the same 64 bits; posting keys use [`okey`], which
//! keeps u64 order, so that seqs above `i64::MAX` still sort last.

use std::collections::HashMap;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::super::{
    Appended, Batch, DeviceKey as Key, StoreError, StoredTelemetry, TelemetryRange,
};

/// Devices sealed per transaction at most (see also
/// [`LogOptions::slice_budget`]).
pub(super) const SLICE_DEVICES: usize = 2_000;

/// Rows per posting at most (its rowid list stays a few KB).
const POSTING_MAX_ROWS: usize = 4_096;

/// A device is due for a seal once its tail holds this many rows: its
/// posting's index page (written whole, twice) is then a few percent of
/// its rows' bytes, and a chatty fleet's tail stays small.
const FULL_ROWS: usize = 512;

/// Tables added by schema version 3.
pub(super) const SCHEMA_V3: &str = r#"
CREATE TABLE chunks (
    id          INTEGER PRIMARY KEY,
    opened_ms   INTEGER NOT NULL,
    -- every row with a rowid at or below this has its posting
    sealed_upto INTEGER NOT NULL DEFAULT 0,
    -- no more rows go here
    closed      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE postings (
    device  INTEGER NOT NULL,
    seq_lo  INTEGER NOT NULL,   -- okey(first seq)
    seq_hi  INTEGER NOT NULL,   -- okey(last seq)
    ts_lo   INTEGER NOT NULL,
    ts_hi   INTEGER NOT NULL,
    -- highest timestamp of this and every earlier posting of the device
    ts_max  INTEGER NOT NULL,
    chunk   INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    rowids  BLOB    NOT NULL,   -- LEB128 deltas
    PRIMARY KEY (device, seq_lo)
) WITHOUT ROWID;
CREATE INDEX postings_by_time ON postings (device, ts_max);
CREATE INDEX postings_by_chunk ON postings (chunk);
CREATE TABLE watermarks (
    device      INTEGER PRIMARY KEY,
    seq         INTEGER NOT NULL,  -- highest sealed seq (u64 bits)
    received_ms INTEGER NOT NULL,  -- when that reading arrived
    ts_max      INTEGER NOT NULL,
    -- okey(seq_lo) of the newest posting whose timestamps went backwards
    regression  INTEGER
);
"#;

/// A u64 as an i64 that sorts the same way (the sign bit flipped).
pub(super) fn okey(v: u64) -> i64 {
    (v ^ (1 << 63)) as i64
}

/// The inverse of [`okey`].
pub(super) fn from_okey(k: i64) -> u64 {
    (k as u64) ^ (1 << 63)
}

/// How the log behaves.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Start a seal once this many rows wait in the tail.
    pub seal_rows: usize,
    /// ...or once the oldest has waited this long.
    pub seal_after_ms: u64,
    /// Appends move to a new chunk table after this long.
    pub chunk_span_ms: u64,
    /// Drop a chunk once every row in it is older than this (0: never).
    pub retention_ms: u64,
    /// Drop the oldest chunks while the database uses more bytes (0: no cap).
    pub max_bytes: u64,
    /// A seal slice commits once it has worked this long, or as long as
    /// the last append took if that is longer (commits wait behind it on
    /// the writer's connection; zero: every slice is one step)...
    pub slice_budget: std::time::Duration,
    /// ...looking at the clock after every this many devices (a slice
    /// takes at least this many, and at most [`SLICE_DEVICES`]).
    pub slice_step: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            seal_rows: 1_000_000,
            seal_after_ms: 60_000,
            chunk_span_ms: 86_400_000,
            retention_ms: 0,
            max_bytes: 0,
            slice_budget: std::time::Duration::from_millis(1),
            slice_step: 8,
        }
    }
}

/// A row stored but not yet in a posting. Its chunk and receive time are
/// kept per device ([`DeviceTail`]): 24 bytes a row rather than 40, as a
/// quiet fleet's tail holds up to a minute of its readings.
#[derive(Debug, Clone, Copy)]
pub(super) struct TailRow {
    seq: u64,
    ts: i64,
    rowid: i64,
}

/// A row as a seal or a read takes it out of the tail: its chunk beside it.
type Placed = (i64, TailRow);

/// One device's rows not yet in a posting, in seq (and arrival) order.
#[derive(Debug, Default)]
pub(super) struct DeviceTail {
    rows: Vec<TailRow>,
    /// The chunk of `rows[0]`...
    chunk: i64,
    /// ...and where later chunks begin (index into `rows`, chunk): empty
    /// but across a chunk's turn.
    turns: Vec<(usize, i64)>,
    /// When the first row arrived; after a seal took the rows before it,
    /// when that seal began (at most a commit's time later).
    first_ms: i64,
    /// When the last row arrived (the WELCOME's `last_seen`).
    last_ms: i64,
}

impl DeviceTail {
    fn push(&mut self, chunk: i64, row: TailRow, received: i64) {
        if self.rows.is_empty() {
            self.chunk = chunk;
            self.turns.clear();
            self.first_ms = received;
        } else if chunk != self.turns.last().map_or(self.chunk, |t| t.1) {
            self.turns.push((self.rows.len(), chunk));
        }
        self.rows.push(row);
        self.last_ms = received;
    }

    fn chunk_at(&self, i: usize) -> i64 {
        self.turns
            .iter()
            .rev()
            .find(|t| t.0 <= i)
            .map_or(self.chunk, |t| t.1)
    }

    /// Where row `i` is: (chunk, rowid), which orders rows by arrival.
    fn at(&self, i: usize) -> (i64, i64) {
        (self.chunk_at(i), self.rows[i].rowid)
    }

    /// The first `n` rows with their chunks.
    fn placed(&self, n: usize) -> Vec<Placed> {
        (0..n.min(self.rows.len()))
            .map(|i| (self.chunk_at(i), self.rows[i]))
            .collect()
    }

    /// How many leading rows are at or before `upto`.
    fn upto(&self, upto: (i64, i64)) -> usize {
        let mut i = 0;
        while i < self.rows.len() && self.at(i) <= upto {
            i += 1;
        }
        i
    }

    /// Forgets the first `n` rows (sealed by a round that began at
    /// `round_ms`).
    fn drain(&mut self, n: usize, round_ms: i64) {
        let n = n.min(self.rows.len());
        if n == 0 {
            return;
        }
        self.chunk = self.chunk_at(n);
        self.rows.drain(..n);
        self.turns.retain(|t| t.0 > n);
        for t in &mut self.turns {
            t.0 -= n;
        }
        self.first_ms = self.first_ms.max(round_ms);
    }
}

/// What the store keeps in memory about telemetry. The writer thread is
/// the only one that changes it, and only after a commit.
#[derive(Debug, Default)]
pub(super) struct Log {
    tail: HashMap<Key, DeviceTail>,
    tail_rows: usize,
    /// When the oldest tail row arrived...
    oldest_ms: Option<i64>,
    /// ...and where the oldest tail row is (recovery reads from there).
    oldest_at: Option<(i64, i64)>,
    /// Where the newest row is.
    newest_at: (i64, i64),
    /// Devices whose tail holds [`FULL_ROWS`] rows or more.
    full: usize,
    /// Highest stored seq per device, for the duplicate rule (writer only).
    marks: HashMap<Key, u64>,
    active: Option<Chunk>,
    round: Option<Round>,
    /// How long the last append took: a seal slice may take as long (see
    /// [`seal_step`]).
    last_append: std::time::Duration,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    id: i64,
    opened_ms: i64,
}

/// A seal in progress: the devices it chose when it began, sealed up to
/// the newest row then.
#[derive(Debug)]
struct Round {
    upto: (i64, i64),
    started_ms: i64,
    devices: Vec<Key>,
    next: usize,
}

/// The log behind a mutex (the writer changes it, the reader looks).
pub(super) type Shared = Mutex<Log>;

fn lock(log: &Shared) -> std::sync::MutexGuard<'_, Log> {
    // A panic while holding it leaves consistent data (every change is a
    // few plain assignments): go on with it.
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rows waiting in the tail.
pub(super) fn unsealed(log: &Shared) -> usize {
    lock(log).tail_rows
}

/// Whether a seal is under way or due (the writer should run a slice).
pub(super) fn seal_due(log: &Shared, opts: &LogOptions, now_ms: i64) -> bool {
    let g = lock(log);
    g.round.is_some() || g.due(opts, now_ms)
}

/// Whether a row at `at` is so far behind the newest row at `newest` that
/// recovery, which reads from the oldest unsealed row on, would read more
/// than about `rows` rows: an earlier chunk, or `rows` rowids back.
fn lagging(at: (i64, i64), newest: (i64, i64), rows: usize) -> bool {
    at.0 != newest.0 || newest.1.saturating_sub(at.1) >= rows as i64
}

impl Log {
    fn due(&self, opts: &LogOptions, now_ms: i64) -> bool {
        self.tail_rows > 0
            && (self.tail_rows >= opts.seal_rows
                || self
                    .oldest_ms
                    .is_some_and(|o| now_ms.saturating_sub(o) >= opts.seal_after_ms as i64)
                || self.full > 0
                || self
                    .oldest_at
                    .is_some_and(|a| lagging(a, self.newest_at, opts.seal_rows)))
    }

    fn push(&mut self, key: Key, chunk: i64, row: TailRow, received: i64) {
        let t = self.tail.entry(key).or_default();
        t.push(chunk, row, received);
        if t.rows.len() == FULL_ROWS {
            self.full += 1;
        }
        self.tail_rows += 1;
        self.oldest_ms = Some(self.oldest_ms.map_or(received, |o| o.min(received)));
        let at = (chunk, row.rowid);
        self.oldest_at = Some(self.oldest_at.map_or(at, |o| o.min(at)));
        self.newest_at = self.newest_at.max(at);
    }

    /// The devices a seal round takes: each whose oldest row has waited
    /// three quarters of `seal_after_ms`, or that holds three quarters of
    /// [`FULL_ROWS`] (so that a fleet's devices, which fill their tails
    /// together, go in one round rather than one round each), or whose
    /// oldest row lags far behind the newest; and, when the tail holds
    /// `seal_rows`, the devices with the most rows, until half of the
    /// tail's rows go. A quiet device thus waits out its time while chatty
    /// ones fill their postings: it is the rows per posting that set a
    /// seal's cost (one index page per device and round), so a reading
    /// every ten seconds is indexed in postings of six rather than one.
    fn choose(&self, opts: &LogOptions, now_ms: i64) -> Vec<Key> {
        let ripe = (opts.seal_after_ms as i64).saturating_mul(3) / 4;
        let mut chosen = Vec::new();
        let mut rest = Vec::new();
        for (key, t) in &self.tail {
            if now_ms.saturating_sub(t.first_ms) >= ripe
                || t.rows.len() >= FULL_ROWS * 3 / 4
                || lagging(t.at(0), self.newest_at, opts.seal_rows)
            {
                chosen.push(*key);
            } else {
                rest.push((t.rows.len(), *key));
            }
        }
        if self.tail_rows >= opts.seal_rows {
            let mut left = self.tail_rows
                - chosen
                    .iter()
                    .map(|k| self.tail.get(k).map_or(0, |t| t.rows.len()))
                    .sum::<usize>();
            rest.sort_unstable_by(|a, b| b.cmp(a));
            for (n, key) in rest {
                if left <= self.tail_rows / 2 {
                    break;
                }
                chosen.push(key);
                left -= n;
            }
        }
        chosen.sort_unstable();
        chosen
    }

    /// Recomputes what [`Log::due`] looks at after a round: the oldest
    /// tail row's time and place, and the full devices.
    fn refresh(&mut self) {
        self.oldest_ms = self.tail.values().map(|t| t.first_ms).min();
        self.oldest_at = self.tail.values().map(|t| t.at(0)).min();
        self.full = self
            .tail
            .values()
            .filter(|t| t.rows.len() >= FULL_ROWS)
            .count();
    }
}

fn chunk_table(id: i64) -> String {
    format!("chunk_{id}")
}

fn create_chunk(tx: &Transaction<'_>, id: i64, opened_ms: i64) -> Result<(), StoreError> {
    tx.execute_batch(&format!(
        "CREATE TABLE {} (
            device       INTEGER NOT NULL,
            seq          INTEGER NOT NULL,
            timestamp_ms INTEGER NOT NULL,
            received_ms  INTEGER NOT NULL,
            content_type INTEGER NOT NULL,
            payload      BLOB    NOT NULL
        )",
        chunk_table(id)
    ))?;
    tx.execute(
        "INSERT INTO chunks (id, opened_ms) VALUES (?1, ?2)",
        params![id, opened_ms],
    )?;
    rebuild_view(tx)
}

/// Columns of a chunk table, as the `telemetry` view shows them.
const ROW_COLUMNS: &str = "device, seq, timestamp_ms, received_ms, content_type, payload";

/// Recreates the `telemetry` view over every chunk, in chunk order: for
/// people with the sqlite3 shell, and for tests. (SQLite allows 500 terms
/// in one compound SELECT: the chunks are grouped 400 to a subquery.)
fn rebuild_view(tx: &Transaction<'_>) -> Result<(), StoreError> {
    let ids: Vec<i64> = tx
        .prepare("SELECT id FROM chunks ORDER BY id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let body = if ids.is_empty() {
        "SELECT NULL, NULL, NULL, NULL, NULL, NULL WHERE 0".to_owned()
    } else {
        ids.chunks(400)
            .map(|group| {
                let terms: Vec<String> = group
                    .iter()
                    .map(|id| format!("SELECT {ROW_COLUMNS} FROM {}", chunk_table(*id)))
                    .collect();
                format!("SELECT * FROM ({})", terms.join(" UNION ALL "))
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    };
    tx.execute_batch(&format!(
        "DROP VIEW IF EXISTS telemetry; CREATE VIEW telemetry ({ROW_COLUMNS}) AS {body};"
    ))?;
    Ok(())
}

/// The device's sealed watermark: (seq, received_ms).
fn sealed_mark(conn: &Connection, key: Key) -> Result<Option<(u64, i64)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT seq, received_ms FROM watermarks WHERE device = ?1")?
        .query_row([key], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .optional()?)
}

/// Schema version 3: furrow 0.1's `telemetry` table becomes chunk 1, fully
/// indexed, and is dropped.
pub(super) fn migrate_v3(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute_batch(SCHEMA_V3)?;
    tx.execute_batch("ALTER TABLE telemetry RENAME TO telemetry_v2;")?;
    let rows: i64 = tx.query_row("SELECT COUNT(*) FROM telemetry_v2", [], |r| r.get(0))?;
    if rows > 0 {
        let opened: i64 = tx.query_row("SELECT MIN(received_ms) FROM telemetry_v2", [], |r| {
            r.get(0)
        })?;
        create_chunk(tx, 1, opened)?;
        // Device by device, seqs in u64 order (negative i64s are the top).
        tx.execute_batch(
            "INSERT INTO chunk_1 (device, seq, timestamp_ms, received_ms, content_type, payload)
             SELECT device, seq, timestamp_ms, received_ms, content_type, payload
             FROM telemetry_v2 ORDER BY device, seq < 0, seq;
             UPDATE chunks SET sealed_upto = 9223372036854775807, closed = 1 WHERE id = 1;",
        )?;
        let mut stmt = tx.prepare(
            "SELECT rowid, device, seq, timestamp_ms, received_ms FROM chunk_1 ORDER BY rowid",
        )?;
        let mut it = stmt.query([])?;
        let mut run: Vec<Placed> = Vec::new();
        let mut run_key = None;
        let mut received = 0;
        while let Some(r) = it.next()? {
            let key: Key = r.get(1)?;
            if run_key != Some(key) {
                if let Some(k) = run_key {
                    write_postings(tx, k, &run, received)?;
                }
                run.clear();
                run_key = Some(key);
            }
            run.push((
                1,
                TailRow {
                    rowid: r.get(0)?,
                    seq: r.get::<_, i64>(2)? as u64,
                    ts: r.get(3)?,
                },
            ));
            received = r.get(4)?;
        }
        if let Some(k) = run_key {
            write_postings(tx, k, &run, received)?;
        }
        tracing::info!(rows, "telemetry moved to the append-only layout");
    }
    tx.execute_batch("DROP TABLE telemetry_v2;")?;
    rebuild_view(tx)
}

/// Rebuilds the in-memory state at open: the active chunk, and the tail
/// from rows above each chunk's `sealed_upto` that no posting covers.
pub(super) fn recover(conn: &Connection) -> Result<Log, StoreError> {
    let mut log = Log::default();
    let chunks: Vec<(i64, i64, i64, bool)> = conn
        .prepare("SELECT id, opened_ms, sealed_upto, closed FROM chunks ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let mut marks: HashMap<Key, u64> = HashMap::new();
    for (id, opened_ms, sealed_upto, closed) in chunks {
        if !closed {
            log.active = Some(Chunk { id, opened_ms });
        }
        let mut stmt = conn.prepare(&format!(
            "SELECT rowid, device, seq, timestamp_ms, received_ms FROM {} WHERE rowid > ?1
             ORDER BY rowid",
            chunk_table(id)
        ))?;
        let mut it = stmt.query([sealed_upto])?;
        while let Some(r) = it.next()? {
            let key: Key = r.get(1)?;
            let seq = r.get::<_, i64>(2)? as u64;
            let mark = match marks.get(&key) {
                Some(m) => *m,
                None => sealed_mark(conn, key)?.map_or(0, |m| m.0),
            };
            if seq <= mark {
                continue; // sealed by a seal round that did not finish
            }
            marks.insert(key, seq);
            log.push(
                key,
                id,
                TailRow {
                    rowid: r.get(0)?,
                    seq,
                    ts: r.get(3)?,
                },
                r.get(4)?,
            );
        }
    }
    Ok(log)
}

/// Appends a batch in one transaction: records at or below their device's
/// highest stored seq are skipped; rejection watermarks are raised; state
/// reports are applied. Returns true when it opened a new chunk (a moment
/// to look at retention), and the reports refused.
pub(super) fn append(
    conn: &mut Connection,
    log: &Shared,
    batch: &Batch,
    opts: &LogOptions,
    now_ms: i64,
) -> Result<(bool, Appended), StoreError> {
    let started = std::time::Instant::now();
    // The marks of this batch's devices (a cache, filled from the tail and
    // the watermarks table on first sight).
    // Devices first seen here: the highest seq of their tail, if any.
    let mut marks: HashMap<Key, u64> = HashMap::new();
    let mut missing: HashMap<Key, u64> = HashMap::new();
    let active = {
        let g = lock(log);
        for r in &batch.records {
            if marks.contains_key(&r.device) || missing.contains_key(&r.device) {
                continue;
            }
            match g.marks.get(&r.device) {
                Some(m) => {
                    marks.insert(r.device, *m);
                }
                None => {
                    let tail = g.tail.get(&r.device).and_then(|t| t.rows.last());
                    missing.insert(r.device, tail.map_or(0, |t| t.seq));
                }
            }
        }
        g.active
    };
    for (key, tail) in missing {
        let sealed = sealed_mark(conn, key)?.map_or(0, |m| m.0);
        marks.insert(key, sealed.max(tail));
    }

    let tx = conn.transaction()?;
    let mut rotated = false;
    let chunk = match active {
        Some(c) if now_ms.saturating_sub(c.opened_ms) < opts.chunk_span_ms as i64 => c,
        previous => {
            let id = previous.map_or_else(
                || {
                    tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM chunks", [], |r| {
                        r.get(0)
                    })
                },
                |c| Ok(c.id + 1),
            )?;
            if let Some(p) = previous {
                tx.execute("UPDATE chunks SET closed = 1 WHERE id = ?1", [p.id])?;
            }
            create_chunk(&tx, id, now_ms)?;
            rotated = true;
            tracing::debug!(chunk = id, "telemetry chunk opened");
            Chunk {
                id,
                opened_ms: now_ms,
            }
        }
    };
    let mut added = Vec::with_capacity(batch.records.len());
    {
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT INTO {} (device, seq, timestamp_ms, received_ms, content_type, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            chunk_table(chunk.id)
        ))?;
        for r in &batch.records {
            let mark = marks.entry(r.device).or_insert(0);
            if r.seq <= *mark {
                continue;
            }
            *mark = r.seq;
            stmt.execute(params![
                r.device,
                r.seq as i64,
                r.timestamp_ms as i64,
                r.received_ms as i64,
                r.content_type,
                &r.payload[..],
            ])?;
            added.push((
                r.device,
                TailRow {
                    seq: r.seq,
                    ts: r.timestamp_ms as i64,
                    rowid: tx.last_insert_rowid(),
                },
                r.received_ms as i64,
            ));
        }
        // Raise the rejection watermark, comparing as u64: same sign
        // compares as signed; negative (>= 2^63) is larger.
        let mut mark = tx.prepare_cached(
            "UPDATE devices SET rejected_seq = CASE
                WHEN (rejected_seq < 0) = (?2 < 0) THEN max(rejected_seq, ?2)
                WHEN ?2 < 0 THEN ?2
                ELSE rejected_seq END
             WHERE id = ?1",
        )?;
        for (device, seq) in &batch.rejections {
            mark.execute(params![device, *seq as i64])?;
        }
    }
    let appended = if batch.reports.is_empty() {
        Appended::default()
    } else {
        super::state::apply_reports(&tx, &batch.reports, now_ms as u64)?
    };
    tx.commit()?;

    let mut g = lock(log);
    g.last_append = started.elapsed();
    g.active = Some(chunk);
    g.marks.extend(marks);
    for (key, row, received) in added {
        g.push(key, chunk.id, row, received);
    }
    Ok((rotated, appended))
}

/// Runs one slice of a seal if one is due or under way. Returns whether
/// more remains (call again soon).
///
/// A slice ends after [`SLICE_DEVICES`] devices or its budget of work,
/// whichever comes first: commits wait behind it on the writer's
/// connection, so its length is their latency tail (a 1,000-device slice
/// took 16-30 ms and set the ACK p99 at 1,000 devices x 50 msgs/s;
/// docs/performance.md, "Seal slices"). The budget is
/// [`LogOptions::slice_budget`] or the last append's time, whichever is
/// longer: slices and appends alternate, so the seal gets at least half
/// of the writer's time when commits are long (flat out, where 1 ms
/// slices fell behind the appends at 10,000 devices) and quiet fleets'
/// short commits wait for short slices.
pub(super) fn seal_step(
    conn: &mut Connection,
    log: &Shared,
    opts: &LogOptions,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let at = {
        let mut g = lock(log);
        if g.round.is_none() {
            if !g.due(opts, now_ms) {
                return Ok(false);
            }
            let upto = g.newest_at;
            let devices = g.choose(opts, now_ms);
            g.round = Some(Round {
                upto,
                started_ms: now_ms,
                devices,
                next: 0,
            });
        }
        let Some(round) = g.round.as_ref() else {
            return Ok(false);
        };
        let budget = if opts.slice_budget.is_zero() {
            opts.slice_budget
        } else {
            opts.slice_budget.max(g.last_append)
        };
        SliceAt {
            upto: round.upto,
            started_ms: round.started_ms,
            next: round.next,
            total: round.devices.len(),
            budget,
        }
    };

    // A seal's commit need not reach the disk by itself: lost in a crash,
    // its rows are still in their chunk above `sealed_upto` and are sealed
    // again. So it does not wait for an fsync of its own (the next
    // telemetry commit's fsync covers it, the WAL being written in order).
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if sync > 1 {
        conn.pragma_update(None, "synchronous", 1)?;
    }
    let sealed = seal_slice(conn, log, opts, &at);
    if sync > 1 {
        conn.pragma_update(None, "synchronous", sync)?;
    }
    let (rows, end) = sealed?;
    let last = end == at.total;

    let mut g = lock(log);
    for (key, rs, _) in &rows {
        if let Some(t) = g.tail.get_mut(key) {
            t.drain(rs.len(), at.started_ms);
            if t.rows.is_empty() {
                g.tail.remove(key);
            }
        }
        g.tail_rows = g.tail_rows.saturating_sub(rs.len());
    }
    if last {
        g.round = None;
        g.refresh();
        return Ok(false);
    }
    if let Some(r) = g.round.as_mut() {
        r.next = end;
    }
    Ok(true)
}

/// Tail rows by device, as a slice takes them, with when the last arrived.
type DeviceRows = Vec<(Key, Vec<Placed>, i64)>;

/// Where a slice of the round starts, and what bounds it.
#[derive(Clone, Copy)]
struct SliceAt {
    /// The round's newest row: rows after it wait for the next round.
    upto: (i64, i64),
    /// When the round began.
    started_ms: i64,
    /// The round's first device not sealed yet...
    next: usize,
    /// ...of this many.
    total: usize,
    /// Work before the slice commits.
    budget: std::time::Duration,
}

/// Writes the postings of the round's devices from `at.next` on, within
/// the slice's bounds, in one transaction; returns the rows sealed and
/// where the next slice starts.
fn seal_slice(
    conn: &mut Connection,
    log: &Shared,
    opts: &LogOptions,
    at: &SliceAt,
) -> Result<(DeviceRows, usize), StoreError> {
    let SliceAt {
        upto,
        next,
        total,
        budget,
        ..
    } = *at;
    let started = std::time::Instant::now();
    let limit = (next + SLICE_DEVICES).min(total);
    let mut end = next;
    let mut rows: DeviceRows = Vec::new();
    let tx = conn.transaction()?;
    while end < limit && (end == next || started.elapsed() < budget) {
        // A few devices at a time out of the tail: reads on the other
        // thread take the same lock, so it is not held for the whole slice.
        let step = (end + opts.slice_step.max(1)).min(limit);
        let batch: DeviceRows = {
            let g = lock(log);
            let Some(round) = g.round.as_ref() else {
                break;
            };
            round.devices[end..step]
                .iter()
                .filter_map(|k| {
                    let t = g.tail.get(k)?;
                    let n = t.upto(upto);
                    // The last row's arrival: exact when the seal takes
                    // the whole tail, else the seal's start (rows after
                    // `upto` came later).
                    let last = if n == t.rows.len() {
                        t.last_ms
                    } else {
                        at.started_ms.min(t.last_ms)
                    };
                    (n > 0).then(|| (*k, t.placed(n), last))
                })
                .collect()
        };
        for (key, rs, last_ms) in &batch {
            write_postings(&tx, *key, rs, *last_ms)?;
        }
        rows.extend(batch);
        end = step;
    }
    if end == total {
        // Every row before the oldest one left in the tail has its posting
        // now (or the round's newest, when it took the whole tail): the
        // chunks before that row's are closed and wholly sealed.
        let left: Option<(i64, i64)> = {
            let g = lock(log);
            let taken: HashMap<Key, usize> = rows.iter().map(|(k, rs, _)| (*k, rs.len())).collect();
            g.tail
                .iter()
                .filter_map(|(k, t)| {
                    let skip = taken.get(k).copied().unwrap_or(0);
                    (skip < t.rows.len()).then(|| t.at(skip))
                })
                .min()
        };
        let (chunk, below) = left.map_or(upto, |(c, r)| (c, r - 1));
        tx.execute(
            "UPDATE chunks SET sealed_upto = 9223372036854775807 WHERE id < ?1 AND closed = 1",
            [chunk],
        )?;
        tx.execute(
            "UPDATE chunks SET sealed_upto = max(sealed_upto, ?2) WHERE id = ?1",
            params![chunk, below],
        )?;
    }
    tx.commit()?;
    metrics::histogram!("furrow_sqlite_seal_slice_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("furrow_sqlite_sealed_rows_total")
        .increment(rows.iter().map(|r| r.1.len() as u64).sum());
    Ok((rows, end))
}

/// What retention dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Dropped {
    pub chunks: u64,
    pub rows: u64,
}

/// Bytes the database's pages hold (free pages inside the file excluded:
/// SQLite reuses them before it grows the file).
pub(super) fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let (pages, free, size): (i64, i64, i64) = conn.query_row(
        "SELECT (SELECT page_count FROM pragma_page_count()),
                (SELECT freelist_count FROM pragma_freelist_count()),
                (SELECT page_size FROM pragma_page_size())",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok((pages - free).max(0) as u64 * size.max(0) as u64)
}

/// Drops the oldest chunks that retention or the size cap no longer wants,
/// a whole table at a time (never row by row), with their postings. Only
/// closed, wholly sealed chunks go, never the newest; watermarks stay, so
/// `last_seq` survives. A chunk is older than the retention once the
/// chunk after it opened before the cut-off.
pub(super) fn enforce_retention(
    conn: &mut Connection,
    opts: &LogOptions,
    now_ms: i64,
) -> Result<Dropped, StoreError> {
    let mut dropped = Dropped::default();
    if opts.retention_ms == 0 && opts.max_bytes == 0 {
        return Ok(dropped);
    }
    let cutoff = now_ms.saturating_sub(opts.retention_ms.min(i64::MAX as u64) as i64);
    loop {
        let chunks: Vec<(i64, i64, i64, bool)> = conn
            .prepare_cached(
                "SELECT id, opened_ms, sealed_upto, closed FROM chunks ORDER BY id LIMIT 2",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        let [(id, _, sealed, closed), (_, next_opened, _, _)] = chunks[..] else {
            return Ok(dropped); // one chunk or none: the newest stays
        };
        if !closed || sealed != i64::MAX {
            return Ok(dropped); // the next seal round finishes it first
        }
        let old = opts.retention_ms > 0 && next_opened <= cutoff;
        let big = opts.max_bytes > 0 && used_bytes(conn)? > opts.max_bytes;
        if !old && !big {
            return Ok(dropped);
        }
        let tx = conn.transaction()?;
        let rows: i64 = tx.query_row(
            &format!("SELECT COALESCE(MAX(rowid), 0) FROM {}", chunk_table(id)),
            [],
            |r| r.get(0),
        )?;
        drop_postings(&tx, id)?;
        tx.execute_batch(&format!("DROP TABLE {};", chunk_table(id)))?;
        tx.execute("DELETE FROM chunks WHERE id = ?1", [id])?;
        rebuild_view(&tx)?;
        tx.commit()?;
        tracing::info!(
            chunk = id,
            rows,
            reason = if old { "retention" } else { "max_bytes" },
            "telemetry chunk dropped"
        );
        dropped.chunks += 1;
        dropped.rows += rows as u64;
    }
}

/// Deletes the postings of chunk `id`, the oldest: each device's first
/// ones (a device's seqs only grow and chunks follow arrival, so its rows
/// in the oldest chunk have its lowest seqs), found by its key: one seek
/// per device with postings, and no index by chunk, which would put a
/// page of its own per device into every seal.
fn drop_postings(tx: &Transaction<'_>, id: i64) -> Result<(), StoreError> {
    let devices: Vec<Key> = tx
        .prepare("SELECT device FROM watermarks ORDER BY device")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut walk =
        tx.prepare_cached("SELECT seq_lo, chunk FROM postings WHERE device = ?1 ORDER BY seq_lo")?;
    let mut delete =
        tx.prepare_cached("DELETE FROM postings WHERE device = ?1 AND seq_lo <= ?2")?;
    for key in devices {
        let mut upto = None;
        let mut it = walk.query([key])?;
        while let Some(r) = it.next()? {
            if r.get::<_, i64>(1)? > id {
                break;
            }
            upto = Some(r.get::<_, i64>(0)?);
        }
        drop(it);
        if let Some(upto) = upto {
            delete.execute(params![key, upto])?;
        }
    }
    Ok(())
}

/// Chunks in the database: how many, and when the oldest opened.
pub(super) fn chunk_summary(conn: &Connection) -> Result<(u64, Option<u64>), StoreError> {
    Ok(
        conn.query_row("SELECT COUNT(*), MIN(opened_ms) FROM chunks", [], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
            ))
        })?,
    )
}

/// Writes the postings of one device's rows (in seq order) and raises its
/// watermark; the last row arrived at `last_ms`.
fn write_postings(
    tx: &Transaction<'_>,
    key: Key,
    rows: &[Placed],
    last_ms: i64,
) -> Result<(), StoreError> {
    let (mut ts_max, mut regression): (Option<i64>, Option<i64>) = tx
        .prepare_cached("SELECT ts_max, regression FROM watermarks WHERE device = ?1")?
        .query_row([key], |r| Ok((Some(r.get(0)?), r.get(1)?)))
        .optional()?
        .unwrap_or((None, None));
    let mut insert = tx.prepare_cached(
        "INSERT INTO postings (device, seq_lo, seq_hi, ts_lo, ts_hi, ts_max, chunk, n, rowids)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    let mut start = 0;
    while start < rows.len() {
        // One chunk per posting, at most POSTING_MAX_ROWS rows.
        let chunk = rows[start].0;
        let len = rows[start..]
            .iter()
            .take(POSTING_MAX_ROWS)
            .take_while(|r| r.0 == chunk)
            .count();
        let part = &rows[start..start + len];
        let (first, last) = (part[0].1, part[len - 1].1);
        let (mut lo, mut hi) = (first.ts, first.ts);
        let mut monotonic = ts_max.is_none_or(|m| first.ts >= m);
        let mut prev = first.ts;
        let mut blob = Vec::with_capacity(len * 2);
        let mut prev_rowid = 0;
        for (_, r) in part {
            lo = lo.min(r.ts);
            hi = hi.max(r.ts);
            monotonic &= r.ts >= prev;
            prev = r.ts;
            put_varint(&mut blob, r.rowid.wrapping_sub(prev_rowid) as u64);
            prev_rowid = r.rowid;
        }
        let seq_lo = okey(first.seq);
        if !monotonic {
            regression = Some(seq_lo);
        }
        let max = ts_max.map_or(hi, |m| m.max(hi));
        ts_max = Some(max);
        insert.execute(params![
            key,
            seq_lo,
            okey(last.seq),
            lo,
            hi,
            max,
            chunk,
            len as i64,
            blob
        ])?;
        start += len;
    }
    let Some(&(_, last)) = rows.last() else {
        return Ok(());
    };
    tx.prepare_cached(
        "INSERT INTO watermarks (device, seq, received_ms, ts_max, regression)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (device) DO UPDATE SET seq = excluded.seq,
           received_ms = excluded.received_ms, ts_max = excluded.ts_max,
           regression = excluded.regression",
    )?
    .execute(params![
        key,
        last.seq as i64,
        last_ms,
        ts_max.unwrap_or(last.ts),
        regression
    ])?;
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The rowids of a posting; an error if the blob is damaged.
fn rowids(blob: &[u8]) -> Result<Vec<i64>, StoreError> {
    let bad = || StoreError::Corrupt("a posting's rowid list is damaged".into());
    let mut out = Vec::new();
    let (mut v, mut shift, mut prev) = (0u64, 0u32, 0i64);
    for &b in blob {
        if shift > 63 {
            return Err(bad());
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            prev = prev.wrapping_add(v as i64);
            out.push(prev);
            (v, shift) = (0, 0);
        } else {
            shift += 7;
        }
    }
    if shift != 0 {
        return Err(bad());
    }
    Ok(out)
}

/// The device's highest stored seq and when that reading arrived.
pub(super) fn stored(
    conn: &Connection,
    log: &Shared,
    key: Key,
) -> Result<(u64, Option<u64>), StoreError> {
    // The tail first: a seal that commits in between moves rows into the
    // watermark, never out of both.
    let tail = lock(log)
        .tail
        .get(&key)
        .and_then(|t| t.rows.last().map(|r| (r.seq, t.last_ms)));
    let sealed = sealed_mark(conn, key)?;
    let best = match (tail, sealed) {
        (Some(t), Some(s)) => Some(if t.0 >= s.0 { t } else { s }),
        (t, s) => t.or(s),
    };
    Ok(best.map_or((0, None), |(seq, at)| (seq, Some(at as u64))))
}

/// One stored row by its place.
fn fetch(conn: &Connection, chunk: i64, rowid: i64) -> Result<Option<StoredTelemetry>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT seq, timestamp_ms, received_ms, content_type, payload FROM {}
             WHERE rowid = ?1",
            chunk_table(chunk)
        ))?
        .query_row([rowid], |r| {
            Ok(StoredTelemetry {
                seq: r.get::<_, i64>(0)? as u64,
                timestamp_ms: r.get::<_, i64>(1)? as u64,
                received_ms: r.get::<_, i64>(2)? as u64,
                content_type: r.get(3)?,
                payload: r.get(4)?,
            })
        })
        .optional()?)
}

/// The key (`seq_lo`) of the device's first posting whose running maximum
/// timestamp reaches `from_ms`, if any. That maximum only grows along the
/// key, so a binary search over the key finds it with one seek a step
/// (about 30 for a device's billion readings) and no index by time: an
/// index put one more page per device into every seal.
fn first_reaching(conn: &Connection, key: Key, from_ms: i64) -> Result<Option<i64>, StoreError> {
    let mut probe = conn.prepare_cached(
        "SELECT seq_lo, ts_max FROM postings WHERE device = ?1 AND seq_lo >= ?2
         ORDER BY seq_lo LIMIT 1",
    )?;
    let mut at = |from: i64| -> Result<Option<(i64, i64)>, StoreError> {
        Ok(probe
            .query_row(params![key, from], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    };
    let Some(first) = at(i64::MIN)? else {
        return Ok(None);
    };
    if first.1 >= from_ms {
        return Ok(Some(first.0));
    }
    let last: (i64, i64) = conn
        .prepare_cached(
            "SELECT seq_lo, ts_max FROM postings WHERE device = ?1 ORDER BY seq_lo DESC LIMIT 1",
        )?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))?;
    if last.1 < from_ms {
        return Ok(None);
    }
    // The first posting at or after `lo` falls short; the first at or
    // after `hi` reaches. Narrow until they are neighbours.
    let (mut lo, mut hi) = (first.0, last.0);
    while i128::from(hi) - i128::from(lo) > 1 {
        let mid = ((i128::from(lo) + i128::from(hi)) / 2) as i64;
        match at(mid)? {
            Some((k, ts)) if ts < from_ms => lo = k.min(hi - 1),
            _ => hi = mid,
        }
    }
    Ok(at(hi)?.map(|p| p.0))
}

/// A device's readings within `range`, in seq order, at most `limit`.
pub(super) fn read(
    conn: &Connection,
    log: &Shared,
    key: Key,
    range: TelemetryRange,
    limit: u32,
) -> Result<Vec<StoredTelemetry>, StoreError> {
    let limit = limit as usize;
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let in_range = |seq: u64, ts: u64| {
        seq >= range.from_seq && seq <= range.to_seq && ts >= range.from_ms && ts <= range.to_ms
    };
    // The tail first (see `stored`), then one snapshot for the watermark
    // and the postings: a row a seal moved in between is in both the tail
    // and that snapshot's postings, below its watermark, and taken once.
    let tail: Vec<Placed> = lock(log)
        .tail
        .get(&key)
        .map_or_else(Vec::new, |t| t.placed(t.rows.len()));
    let conn = conn.unchecked_transaction()?;
    let conn = &*conn;
    let (sealed_hi, regression): (Option<u64>, Option<i64>) = conn
        .prepare_cached("SELECT seq, regression FROM watermarks WHERE device = ?1")?
        .query_row([key], |r| Ok((Some(r.get::<_, i64>(0)? as u64), r.get(1)?)))
        .optional()?
        .unwrap_or((None, None));

    if sealed_hi.is_some() {
        // The first posting that can hold from_seq, and the first whose
        // running maximum timestamp reaches from_ms.
        let mut start: i64 = conn
            .prepare_cached(
                "SELECT seq_lo FROM postings WHERE device = ?1 AND seq_lo <= ?2
                 ORDER BY seq_lo DESC LIMIT 1",
            )?
            .query_row(params![key, okey(range.from_seq)], |r| r.get(0))
            .optional()?
            .unwrap_or(i64::MIN);
        let mut none_late_enough = false;
        if range.from_ms > 0 {
            match first_reaching(conn, key, range.from_ms.min(i64::MAX as u64) as i64)? {
                Some(k) => start = start.max(k),
                None => none_late_enough = true,
            }
        }
        if !none_late_enough {
            let mut stmt = conn.prepare_cached(
                "SELECT seq_lo, seq_hi, ts_lo, ts_hi, chunk, rowids FROM postings
                 WHERE device = ?1 AND seq_lo >= ?2 AND seq_lo <= ?3 ORDER BY seq_lo",
            )?;
            let mut it = stmt.query(params![key, start, okey(range.to_seq)])?;
            'postings: while let Some(p) = it.next()? {
                let seq_lo: i64 = p.get(0)?;
                let seq_hi = from_okey(p.get(1)?);
                let (ts_lo, ts_hi): (i64, i64) = (p.get(2)?, p.get(3)?);
                if ts_lo as u64 > range.to_ms && regression.is_none_or(|r| seq_lo > r) {
                    // Timestamps only grow from here on.
                    break;
                }
                if seq_hi < range.from_seq
                    || (ts_hi as u64) < range.from_ms
                    || ts_lo as u64 > range.to_ms
                {
                    continue;
                }
                let chunk: i64 = p.get(4)?;
                let blob: Vec<u8> = p.get(5)?;
                for rowid in rowids(&blob)? {
                    let Some(row) = fetch(conn, chunk, rowid)? else {
                        continue;
                    };
                    if in_range(row.seq, row.timestamp_ms) {
                        out.push(row);
                        if out.len() == limit {
                            break 'postings;
                        }
                    }
                }
            }
        }
    }
    let sealed_hi = sealed_hi.unwrap_or(0);
    for (chunk, t) in tail {
        if out.len() == limit {
            break;
        }
        if (sealed_hi > 0 && t.seq <= sealed_hi) || !in_range(t.seq, t.ts as u64) {
            continue;
        }
        if let Some(row) = fetch(conn, chunk, t.rowid)? {
            out.push(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn okey_keeps_u64_order() {
        let vals = [0, 1, 41, i64::MAX as u64, 1 << 63, u64::MAX - 1, u64::MAX];
        for w in vals.windows(2) {
            assert!(okey(w[0]) < okey(w[1]), "{w:?}");
            assert_eq!(from_okey(okey(w[0])), w[0]);
        }
    }

    fn row(seq: u64, rowid: i64) -> TailRow {
        TailRow {
            seq,
            ts: seq as i64 * 10,
            rowid,
        }
    }

    #[test]
    fn a_device_tail_keeps_its_chunks_across_a_turn_and_a_drain() {
        let mut t = DeviceTail::default();
        t.push(3, row(1, 90), 1_000);
        t.push(3, row(2, 95), 1_001);
        t.push(4, row(3, 1), 1_002);
        t.push(4, row(4, 2), 1_003);
        t.push(5, row(5, 1), 1_004);
        let at: Vec<(i64, i64)> = (0..5).map(|i| t.at(i)).collect();
        assert_eq!(at, [(3, 90), (3, 95), (4, 1), (4, 2), (5, 1)]);
        assert_eq!(t.upto((4, 1)), 3);
        assert_eq!(t.upto((3, 1_000)), 2, "rowids compare within a chunk");
        assert_eq!(t.placed(3).last().map(|p| (p.0, p.1.seq)), Some((4, 3)));
        t.drain(3, 2_000);
        assert_eq!(t.at(0), (4, 2));
        assert_eq!(t.at(1), (5, 1));
        assert_eq!((t.first_ms, t.last_ms), (2_000, 1_004));
        t.drain(2, 3_000);
        assert!(t.rows.is_empty());
        t.push(9, row(6, 7), 4_000);
        assert_eq!((t.at(0), t.first_ms), ((9, 7), 4_000));
    }

    fn log_with(devices: &[(Key, usize, i64)]) -> Log {
        let mut log = Log::default();
        let mut rowid = 0;
        for &(key, rows, received) in devices {
            for s in 0..rows {
                rowid += 1;
                log.push(key, 1, row(s as u64 + 1, rowid), received);
            }
        }
        log
    }

    #[test]
    fn a_round_takes_ripe_devices_and_leaves_the_young() {
        let opts = LogOptions {
            seal_after_ms: 60_000,
            ..LogOptions::default()
        };
        let log = log_with(&[(1, 2, 10_000), (2, 3, 50_000), (3, 1, 54_000)]);
        assert!(!log.due(&opts, 69_999));
        assert!(log.due(&opts, 70_000));
        // Three quarters of a minute: device 2 goes with device 1, 3 waits.
        assert_eq!(log.choose(&opts, 96_000), vec![1, 2]);
    }

    #[test]
    fn a_device_with_a_full_posting_is_due() {
        let opts = LogOptions::default();
        let mut log = log_with(&[
            (1, FULL_ROWS - 1, 1_000),
            (2, FULL_ROWS * 3 / 4, 1_000),
            (3, 2, 1_000),
        ]);
        assert!(!log.due(&opts, 1_000));
        log.push(1, 1, row(FULL_ROWS as u64, 2_000), 1_000);
        assert!(log.due(&opts, 1_000));
        assert_eq!(log.choose(&opts, 1_000), vec![1, 2]);
    }

    #[test]
    fn a_full_tail_seals_its_largest_devices_first() {
        let opts = LogOptions {
            seal_rows: 100,
            seal_after_ms: 60_000,
            ..LogOptions::default()
        };
        let log = log_with(&[(1, 5, 1_000), (2, 60, 1_000), (3, 30, 1_000), (4, 5, 1_000)]);
        assert!(log.due(&opts, 1_000));
        // 60 of 100 rows is more than half.
        assert_eq!(log.choose(&opts, 1_000), vec![2]);
    }

    #[test]
    fn a_device_far_behind_the_newest_row_is_due() {
        let opts = LogOptions {
            seal_rows: 10,
            seal_after_ms: 60_000,
            ..LogOptions::default()
        };
        // Device 1's row at rowid 1, then device 2's (the rows between
        // were sealed): 9 rowids behind, then 10.
        let mut log = log_with(&[(1, 1, 1_000)]);
        log.push(2, 1, row(1, 10), 1_000);
        assert!(!log.due(&opts, 1_000));
        log.push(2, 1, row(2, 11), 1_000);
        assert!(log.due(&opts, 1_000));
        assert_eq!(log.choose(&opts, 1_000), vec![1]);
        // A newer chunk makes every row in an older one lag.
        let mut log = log_with(&[(1, 1, 1_000)]);
        log.push(2, 2, row(1, 1), 1_000);
        assert_eq!(log.choose(&opts, 1_000), vec![1]);
    }

    #[test]
    fn rowid_lists_round_trip_and_refuse_damage() {
        let ids = [1i64, 2, 3, 200, 70_000, 70_001, i64::MAX / 3];
        let mut blob = Vec::new();
        let mut prev = 0;
        for id in ids {
            put_varint(&mut blob, id.wrapping_sub(prev) as u64);
            prev = id;
        }
        assert_eq!(rowids(&blob).unwrap(), ids);
        let cut = &blob[..blob.len() - 1];
        assert!(matches!(rowids(cut), Err(StoreError::Corrupt(_))));
        assert!(matches!(rowids(&[0xff; 11]), Err(StoreError::Corrupt(_))));
    }
}
