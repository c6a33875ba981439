//! Telemetry on PostgreSQL: partitions by arrival time, the watermark
//! that refuses duplicates, batch writes, reads and retention.
//!
//! Layout: `telemetry` is partitioned by range of `received_ms`, one
//! partition (a *chunk*) per `chunk_span`, aligned to multiples of the span
//! since the Unix epoch, and listed with its bounds in `telemetry_chunks`.
//! Chunks are created on demand by whichever instance first needs one,
//! under an advisory lock; a chunk never overlaps another, so a span changed
//! between runs only shortens the new chunk that meets an old one.
//!
//! A batch is one transaction: raise the watermarks of the devices it
//! touches in one `UPDATE` that locks their rows and returns the
//! watermarks it found (two instances racing over a device during a
//! takeover wait for each other), drop readings at or below those, and
//! binary-`COPY` the rest. Nothing is ever stored twice, and `last_seq`
//! is one row read that survives retention.
//!
//! Retention drops whole partitions, never rows: a chunk whose upper bound
//! is older than `retention`, or the oldest closed chunks while telemetry
//! is larger than `max_bytes`. The newest chunk always stays.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use super::{clamp, i, PostgresStore};
use crate::clock::now_ms;
use crate::store::prelude::*;
use crate::store::{
    Appended, Batch, DeviceKey, DeviceSeqs, ReportRecord, StorageInfo, StoreError, StoredTelemetry,
    TelemetryRange, TelemetryRecord,
};

/// The advisory lock chunk creation and retention take ("furrow" + 1).
const CHUNK_LOCK: i64 = 0x6675_7272_6f78;

/// One partition: rows with `from <= received_ms < to`; `to == i64::MAX`
/// stands for no upper bound, `from == i64::MIN` for no lower bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chunk {
    name: String,
    from: i64,
    to: i64,
}

impl Chunk {
    fn holds(&self, t: i64) -> bool {
        self.from <= t && (t < self.to || self.to == i64::MAX)
    }
}

/// The chunks an instance knows of, in `from` order. A cache: another
/// instance may have created more (found on a miss, under the lock) or
/// dropped old ones (a write into one fails and empties the cache).
#[derive(Debug, Default)]
pub(super) struct Chunks {
    list: Vec<Chunk>,
}

impl Chunks {
    fn holds(&self, t: i64) -> bool {
        self.list.iter().any(|c| c.holds(t))
    }
}

/// The bounds of a new chunk for time `t`: its span, shortened where it
/// meets a chunk that exists.
fn chunk_for(list: &[Chunk], t: i64, span: i64) -> (i64, i64) {
    let start = t.div_euclid(span).saturating_mul(span);
    let end = start.checked_add(span).unwrap_or(i64::MAX);
    let from = list
        .iter()
        .filter(|c| c.to <= t)
        .map(|c| c.to)
        .fold(start, i64::max);
    let to = list
        .iter()
        .filter(|c| c.from > t)
        .map(|c| c.from)
        .fold(end, i64::min);
    (from, to)
}

fn bound(v: i64, edge: &str) -> String {
    match v {
        i64::MAX | i64::MIN => edge.to_owned(),
        v => v.to_string(),
    }
}

/// The columns a telemetry COPY writes (examples/pg_ingest.rs writes the
/// same rows to compare against).
pub const COPY_COLUMNS: &str = "device, seq, timestamp_ms, received_ms, content_type, payload";

/// Their types, in that order.
pub const COPY_TYPES: [Type; 6] = [
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT2,
    Type::BYTEA,
];

/// What retention dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Partitions dropped.
    pub chunks: u64,
    /// Readings they held.
    pub rows: u64,
}

/// What a batch raises a device's watermarks to, if they are lower: its
/// highest seq and when that reading arrived, its highest rejected seq.
#[derive(Debug, Default, Clone, Copy)]
struct Raise {
    stored: Option<u64>,
    seen: Option<i64>,
    rejected: Option<u64>,
}

impl PostgresStore {
    /// Makes sure a partition holds every `received_ms` of `records`.
    async fn ensure_chunks(&self, records: &[&TelemetryRecord]) -> Result<(), StoreError> {
        let Some((lo, hi)) = records
            .iter()
            .map(|r| clamp(r.received_ms))
            .fold(None, |b, t| {
                Some(b.map_or((t, t), |(lo, hi)| (t.min(lo), t.max(hi))))
            })
        else {
            return Ok(());
        };
        let missing: Vec<i64> = {
            let known = self.chunks.lock().map_err(|_| poisoned())?;
            // The usual batch: received within milliseconds, one chunk.
            if known.list.iter().any(|c| c.holds(lo) && c.holds(hi)) {
                return Ok(());
            }
            let mut m: Vec<i64> = records
                .iter()
                .map(|r| clamp(r.received_ms))
                .filter(|&t| !known.holds(t))
                .collect();
            m.sort_unstable();
            m.dedup();
            m
        };
        if missing.is_empty() {
            return Ok(());
        }
        let span = clamp(self.opts.chunk_span_ms).max(1);
        let mut client = self.writer_client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHUNK_LOCK])
            .await?;
        let mut list = load_chunks(&tx).await?;
        for t in missing {
            if list.iter().any(|c| c.holds(t)) {
                continue;
            }
            let (from, to) = chunk_for(&list, t, span);
            let name = format!("telemetry_p{}", from.max(0));
            tx.batch_execute(&format!(
                "CREATE TABLE {name} PARTITION OF telemetry FOR VALUES FROM ({}) TO ({})",
                bound(from, "MINVALUE"),
                bound(to, "MAXVALUE")
            ))
            .await?;
            tx.execute(
                "INSERT INTO telemetry_chunks (name, from_ms, to_ms) VALUES ($1, $2, $3)",
                &[&name, &from, &to],
            )
            .await?;
            tracing::info!(chunk = %name, from_ms = from, to_ms = to, "telemetry partition created");
            list.push(Chunk { name, from, to });
            list.sort_by_key(|c| c.from);
        }
        tx.commit().await?;
        metrics::gauge!("furrow_storage_chunks").set(list.len() as f64);
        self.chunks.lock().map_err(|_| poisoned())?.list = list;
        Ok(())
    }

    /// Drops the partitions that retention or the size cap no longer
    /// wants, oldest first; never the newest, never one still open (its
    /// upper bound in the future). Instances may all call it: the advisory
    /// lock makes one do the work.
    pub async fn enforce_retention(&self, now_ms: u64) -> Result<Dropped, StoreError> {
        let mut dropped = Dropped::default();
        let (retention, cap) = (self.opts.retention_ms, self.opts.max_bytes);
        if retention == 0 && cap == 0 {
            return Ok(dropped);
        }
        let now = clamp(now_ms);
        let cutoff = now.saturating_sub(clamp(retention));
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHUNK_LOCK])
            .await?;
        // The audit log is kept as long as telemetry (by age).
        if retention > 0 {
            tx.execute("DELETE FROM audit WHERE at_ms < $1", &[&cutoff])
                .await?;
            // So is the history of reported state.
            tx.execute(
                "DELETE FROM state_history WHERE received_ms < $1",
                &[&cutoff],
            )
            .await?;
        }
        let mut list = Vec::new();
        let mut sizes = Vec::new();
        for r in tx
            .query(
                "SELECT name, from_ms, to_ms,
                        COALESCE(pg_total_relation_size(to_regclass(name)), 0)
                 FROM telemetry_chunks ORDER BY from_ms",
                &[],
            )
            .await?
        {
            list.push(Chunk {
                name: r.try_get(0)?,
                from: r.try_get(1)?,
                to: r.try_get(2)?,
            });
            sizes.push(r.try_get::<_, i64>(3)?);
        }
        let mut total: i64 = sizes.iter().sum();
        for (c, size) in list.iter().zip(&sizes).take(list.len().saturating_sub(1)) {
            if c.to == i64::MAX || c.to > now {
                break; // still open
            }
            let old = retention > 0 && c.to <= cutoff;
            let big = cap > 0 && total > clamp(cap);
            if !old && !big {
                break;
            }
            let rows: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {}", c.name), &[])
                .await?
                .try_get(0)?;
            tx.batch_execute(&format!("DROP TABLE {}", c.name)).await?;
            tx.execute("DELETE FROM telemetry_chunks WHERE name = $1", &[&c.name])
                .await?;
            tracing::info!(
                chunk = %c.name,
                rows,
                reason = if old { "retention" } else { "max_bytes" },
                "telemetry partition dropped"
            );
            total -= size;
            dropped.chunks += 1;
            dropped.rows += rows.max(0) as u64;
        }
        tx.commit().await?;
        if dropped.chunks > 0 {
            metrics::counter!("furrow_retention_dropped_chunks_total").increment(dropped.chunks);
            metrics::counter!("furrow_retention_dropped_rows_total").increment(dropped.rows);
            // Rebuilt from the table on the next miss.
            self.chunks.lock().map_err(|_| poisoned())?.list.clear();
        }
        metrics::gauge!("furrow_storage_chunks").set((list.len() as u64 - dropped.chunks) as f64);
        Ok(dropped)
    }

    /// Runs [`Self::enforce_retention`] now and then every `every`, while
    /// the returned task lives (the gateway aborts it at shutdown). A
    /// failure is logged and tried again next time.
    pub fn spawn_retention(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = store.enforce_retention(crate::clock::now_ms()).await {
                    tracing::warn!(error = %e, "telemetry retention failed; trying again later");
                }
            }
        })
    }
}

fn poisoned() -> StoreError {
    StoreError::Task("the partition cache lock is poisoned".into())
}

async fn load_chunks(tx: &deadpool_postgres::Transaction<'_>) -> Result<Vec<Chunk>, StoreError> {
    tx.query(
        "SELECT name, from_ms, to_ms FROM telemetry_chunks ORDER BY from_ms",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Chunk {
            name: r.try_get(0)?,
            from: r.try_get(1)?,
            to: r.try_get(2)?,
        })
    })
    .collect()
}

/// One transaction: raise the devices' watermarks, skip what they already
/// held, COPY the rest.
///
/// The `UPDATE` comes first and does three jobs in one statement: it
/// locks the batch's device rows (two instances writing for one device,
/// in a takeover race or a commit retried after its answer was lost,
/// wait for each other here), raises each watermark to the batch's
/// highest seq, and returns the watermark it found (`prev_seq`, set from
/// the locked row's own value in the same statement). The readings above
/// that are new; the rest are duplicates. One statement where a
/// `SELECT ... FOR UPDATE` and an `UPDATE` took two: the row locks were
/// a tenth to a fifth of a batch's time (docs/postgres.md).
///
/// Two round trips, not five: `BEGIN`, the `UPDATE` and the start of the
/// `COPY` go out together (tokio-postgres sends requests made at once
/// without waiting for the answers before them, and PostgreSQL runs them
/// in order), and so do the rows, the end of the `COPY` and `COMMIT`. A
/// small batch's time is mostly its round trips, each a wake-up of the
/// writer and of PostgreSQL's backend (docs/postgres.md, "Round trips").
/// Nothing is decided before its answer: the rows are filtered by the
/// watermarks the `UPDATE` returned, and a `COMMIT` after a failed
/// statement only ends the aborted transaction (PostgreSQL answers it with
/// `ROLLBACK`), while the batch reports the error it saw. On any error the
/// caller closes the connection instead of returning it to the pool.
async fn write_batch(
    client: &deadpool_postgres::Object,
    records: &[&TelemetryRecord],
    rejections: &[(DeviceKey, u64)],
    reports: &[ReportRecord],
) -> Result<(u64, Appended), StoreError> {
    // Per device, in key order: `records` are sorted by (device, seq), so
    // a device's highest seq is its run's last, and of equal seqs the
    // first is the one stored.
    let mut raise: BTreeMap<DeviceKey, Raise> = BTreeMap::new();
    for r in records {
        let m = raise.entry(r.device).or_default();
        if m.stored.is_none_or(|s| r.seq > s) {
            m.stored = Some(r.seq);
            m.seen = Some(clamp(r.received_ms));
        }
    }
    for &(d, seq) in rejections {
        let m = raise.entry(d).or_default();
        m.rejected = Some(m.rejected.map_or(seq, |r| r.max(seq)));
    }
    let n = raise.len();
    let (mut id, mut stored, mut seen, mut rejected) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (d, m) in &raise {
        id.push(*d);
        stored.push(m.stored.map(i));
        seen.push(m.seen);
        rejected.push(m.rejected.map(i));
    }

    // Prepared once per connection (cached after that: no round trip).
    // Seqs compare as u64: flipping the sign bit (`#` is XOR) maps u64
    // order onto bigint order. A NULL raises nothing.
    let update = client
        .prepare_cached(
            "UPDATE devices d SET prev_seq = d.stored_seq,
                stored_seq = CASE WHEN (u.stored # $5) > (d.stored_seq # $5)
                    THEN u.stored ELSE d.stored_seq END,
                last_seen_ms = CASE WHEN (u.stored # $5) > (d.stored_seq # $5)
                    THEN u.seen ELSE d.last_seen_ms END,
                rejected_seq = CASE WHEN (u.rejected # $5) > (d.rejected_seq # $5)
                    THEN u.rejected ELSE d.rejected_seq END
             FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[])
                  AS u(id, stored, seen, rejected)
             WHERE d.id = u.id
             RETURNING d.id, d.prev_seq",
        )
        .await?;
    let copy = if records.is_empty() {
        None
    } else {
        Some(
            client
                .prepare_cached(&format!(
                    "COPY telemetry ({COPY_COLUMNS}) FROM STDIN BINARY"
                ))
                .await?,
        )
    };

    // The first round trip: BEGIN, the watermarks, the COPY's start.
    // tokio-postgres queues a request when its future is first polled, so
    // the order of the first polls is the order PostgreSQL runs them in:
    // `biased` makes it top to bottom (the UPDATE must never run before
    // BEGIN, in a transaction of its own). `instances_share_partitions`
    // in tests/postgres_store.rs fails if a failed COPY keeps its raised
    // watermarks.
    let (begun, watermarks, sink) = tokio::join!(
        biased;
        client.batch_execute("BEGIN"),
        async {
            if id.is_empty() {
                Ok(Vec::new())
            } else {
                client
                    .query(&update, &[&id, &stored, &seen, &rejected, &i64::MIN])
                    .await
            }
        },
        async {
            match &copy {
                Some(stmt) => client.copy_in::<_, bytes::Bytes>(stmt).await.map(Some),
                None => Ok(None),
            }
        },
    );
    begun?;
    let mut found: HashMap<DeviceKey, u64> = HashMap::with_capacity(n);
    for r in watermarks? {
        found.insert(r.try_get(0)?, r.try_get::<_, i64>(1)? as u64);
    }
    let sink = sink?;

    // A device without a row (deleted while its readings queued) has no
    // watermark: its readings are stored, as they were before.
    let mut duplicates = 0u64;
    let mut kept: Vec<&TelemetryRecord> = Vec::with_capacity(records.len());
    let mut last: Option<(DeviceKey, u64)> = None;
    for &r in records {
        let mark = match last {
            Some((d, m)) if d == r.device => m,
            _ => found.get(&r.device).copied().unwrap_or(0),
        };
        if r.seq <= mark {
            duplicates += 1;
            last = Some((r.device, mark));
            continue;
        }
        last = Some((r.device, r.seq));
        kept.push(r);
    }

    // The second: the rows, the COPY's end and (without reports) COMMIT.
    let copied = async {
        let Some(sink) = sink else {
            return Ok(());
        };
        let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
        let mut writer = std::pin::pin!(writer);
        for r in &kept {
            let row: [&(dyn ToSql + Sync); 6] = [
                &r.device,
                &i(r.seq),
                &clamp(r.timestamp_ms),
                &clamp(r.received_ms),
                &i16::from(r.content_type),
                &&r.payload[..],
            ];
            writer.as_mut().write(&row).await?;
        }
        writer.finish().await.map(|_| ())
    };
    if reports.is_empty() {
        let (copied, committed) = tokio::join!(copied, client.batch_execute("COMMIT"));
        copied?;
        committed?;
        return Ok((duplicates, Appended::default()));
    }
    copied.await?;
    let appended = super::state::apply_reports(client, reports, now_ms()).await?;
    client.batch_execute("COMMIT").await?;
    Ok((duplicates, appended))
}

/// The writer's connection while a batch's transaction may be open. It
/// goes back to the pool only once `COMMIT` succeeded; in any other case
/// (an error, or the batch's future dropped midway) it is closed instead,
/// and PostgreSQL rolls the transaction back. (`BEGIN` goes out with the
/// batch's first statements, so there is no tokio-postgres `Transaction`
/// to roll back on drop.)
struct Held(Option<deadpool_postgres::Object>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Several devices' watermarks in one statement, on `client` (the
/// cluster's claims read them in the claims' round trip). A device not
/// found has none.
pub(crate) async fn seqs_of(
    client: &deadpool_postgres::Client,
    devices: &[DeviceKey],
) -> Result<HashMap<DeviceKey, DeviceSeqs>, StoreError> {
    // A REPORT's seq is stored like a reading's; seqs compare as u64 (a
    // negative bigint is above every positive one).
    let stmt = client
        .prepare_cached(
            "SELECT d.id, d.rejected_seq, CASE
                WHEN s.reported_seq IS NULL THEN d.stored_seq
                WHEN (d.stored_seq < 0) = (s.reported_seq < 0)
                    THEN GREATEST(d.stored_seq, s.reported_seq)
                WHEN d.stored_seq < 0 THEN d.stored_seq
                ELSE s.reported_seq END
             FROM devices d LEFT JOIN device_state s ON s.device = d.id
             WHERE d.id = ANY($1)",
        )
        .await?;
    let mut out = HashMap::with_capacity(devices.len());
    for r in client.query(&stmt, &[&devices]).await? {
        let seqs = DeviceSeqs {
            rejected: r.try_get::<_, i64>(1)? as u64,
            stored: r.try_get::<_, i64>(2)? as u64,
        };
        out.insert(r.try_get(0)?, seqs);
    }
    Ok(out)
}

#[async_trait]
impl TelemetryStore for PostgresStore {
    async fn append(&self, batch: Arc<Batch>) -> Result<Appended, StoreError> {
        // Each device's readings in seq order (u64), so the watermark
        // filter keeps exactly the new ones.
        let mut records: Vec<&TelemetryRecord> = batch.records.iter().collect();
        records.sort_by_key(|r| (r.device, r.seq));
        self.ensure_chunks(&records).await?;
        let client = self.writer_client().await?;
        let mut held = Held(None);
        let client = held.0.insert(client);
        let written = write_batch(client, &records, &batch.rejections, &batch.reports).await;
        if written.is_ok() {
            // Committed: back to the pool.
            held.0 = None;
        }
        match written {
            Ok((duplicates, appended)) => {
                if duplicates > 0 {
                    metrics::counter!("furrow_store_duplicate_rows_total").increment(duplicates);
                }
                Ok(appended)
            }
            Err(e) => {
                // No partition for a row: another instance dropped one this
                // instance still knew of. Forget them all; the writer's
                // retry finds or creates the right ones.
                if let StoreError::Backend { error, .. } = &e {
                    if error
                        .downcast_ref::<tokio_postgres::Error>()
                        .and_then(|e| e.code())
                        == Some(&SqlState::CHECK_VIOLATION)
                    {
                        self.chunks.lock().map_err(|_| poisoned())?.list.clear();
                    }
                }
                Err(e)
            }
        }
    }

    async fn device_seqs(&self, device: DeviceKey) -> Result<DeviceSeqs, StoreError> {
        let client = self.client().await?;
        let mut seqs = seqs_of(&client, &[device]).await?;
        Ok(seqs.remove(&device).unwrap_or_default())
    }

    async fn telemetry(
        &self,
        device_id: &str,
        range: TelemetryRange,
        limit: u32,
    ) -> Result<Vec<StoredTelemetry>, StoreError> {
        let client = self.client().await?;
        // Two indexes per partition, (device, seq) and (device,
        // timestamp_ms): a seq range merges the partitions' seq scans in
        // order and stops at the limit; a narrow time window probes the
        // time index and sorts what it finds. Which is cheaper depends on
        // the bounds, so the statement is planned for each call's values
        // (an unnamed statement), never from a cached generic plan. The
        // device key is a scalar subquery, not a join: joined, the planner
        // read every matching row and sorted them (examples/history_reads.rs
        // and docs/performance.md).
        let sql = "SELECT t.seq, t.timestamp_ms, t.received_ms, t.content_type, t.payload
                   FROM telemetry t
                   WHERE t.device = (SELECT id FROM devices WHERE device_id = $1)
                     AND t.seq >= $2 AND t.seq <= $3
                     AND t.timestamp_ms >= $4 AND t.timestamp_ms <= $5
                   ORDER BY t.seq LIMIT $6";
        let args: [&(dyn ToSql + Sync); 6] = [
            &device_id,
            &clamp(range.from_seq),
            &clamp(range.to_seq),
            &clamp(range.from_ms),
            &clamp(range.to_ms),
            &i64::from(limit),
        ];
        client
            .query(sql, &args)
            .await?
            .iter()
            .map(|r| {
                Ok(StoredTelemetry {
                    seq: r.try_get::<_, i64>(0)? as u64,
                    timestamp_ms: r.try_get::<_, i64>(1)? as u64,
                    received_ms: r.try_get::<_, i64>(2)? as u64,
                    content_type: u8::try_from(r.try_get::<_, i16>(3)?).unwrap_or(0),
                    payload: r.try_get(4)?,
                })
            })
            .collect()
    }

    async fn storage_info(&self) -> Result<StorageInfo, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), min(from_ms) FILTER (WHERE from_ms > -9223372036854775808),
                        COALESCE(sum(pg_total_relation_size(to_regclass(name))), 0)::int8
                 FROM telemetry_chunks",
                &[],
            )
            .await?;
        Ok(StorageInfo {
            backend: "postgresql",
            retention_ms: self.opts.retention_ms,
            max_bytes: self.opts.max_bytes,
            // The database's disk is not the gateway's to watch.
            min_free_bytes: 0,
            chunk_span_ms: Some(self.opts.chunk_span_ms),
            chunks: Some(row.try_get::<_, i64>(0)?.max(0) as u64),
            oldest_chunk_opened_ms: row.try_get::<_, Option<i64>>(1)?.map(|v| v.max(0) as u64),
            used_bytes: Some(row.try_get::<_, i64>(2)?.max(0) as u64),
            free_bytes: None,
            unsealed_rows: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(from: i64, to: i64) -> Chunk {
        Chunk {
            name: String::new(),
            from,
            to,
        }
    }

    #[test]
    fn new_chunks_align_to_the_span_and_never_overlap() {
        assert_eq!(chunk_for(&[], 1_050, 100), (1_000, 1_100));
        assert_eq!(chunk_for(&[], 0, 100), (0, 100));
        // An old chunk with another span shortens the new one.
        let list = [c(900, 1_030), c(1_080, 1_200)];
        assert_eq!(chunk_for(&list, 1_050, 100), (1_030, 1_080));
        // The legacy partition has no lower bound.
        let list = [c(i64::MIN, 1_030)];
        assert_eq!(chunk_for(&list, 1_050, 100), (1_030, 1_100));
        assert!(list[0].holds(-5));
        // The span's end past i64::MAX becomes no upper bound.
        let (from, to) = chunk_for(&[], i64::MAX - 1, 1_000);
        assert_eq!(to, i64::MAX);
        assert!(c(from, to).holds(i64::MAX));
        assert_eq!(bound(to, "MAXVALUE"), "MAXVALUE");
    }
}
