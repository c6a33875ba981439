//! Device state on SQLite: one `device_state` row per device that has any,
//! the history of reports, and the rules of `devices::state` applied inside
//! SQLite transactions (reports inside the writer's group commit, operator
//! patches in a transaction of their own on the same writer thread).

use std::collections::HashMap;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{Map, Value};

use super::super::sql::{StateColumns, STATE_COLS};
use super::super::{
    Appended, DeviceKey as Key, Refused, ReportRecord, StateChange, StateStore, StoreError,
};
use super::SqliteStore;
use crate::clock::now_ms;
use crate::devices::state::{self, StateLimits, StateRow};

fn u(v: i64) -> u64 {
    v as u64
}

/// A device's row, or the empty state if it has none.
pub(super) fn read_row(conn: &Connection, device: Key) -> Result<StateRow, StoreError> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {STATE_COLS} FROM device_state WHERE device = ?1"
        ))?
        .query_row([device], |r| {
            Ok(StateColumns {
                desired: r.get(0)?,
                desired_version: r.get(1)?,
                desired_fields: r.get(2)?,
                desired_updated_ms: r.get(3)?,
                desired_acked: r.get(4)?,
                reported: r.get(5)?,
                reported_version: r.get(6)?,
                reported_fields: r.get(7)?,
                reported_updated_ms: r.get(8)?,
                reported_seq: r.get(9)?,
            }
            .row())
        })
        .optional()?;
    Ok(row.unwrap_or_default())
}

pub(super) fn write_row(conn: &Connection, device: Key, row: &StateRow) -> Result<(), StoreError> {
    conn.prepare_cached(&format!(
        "INSERT OR REPLACE INTO device_state (device, {STATE_COLS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
    ))?
    .execute(params![
        device,
        row.desired.document,
        row.desired.version as i64,
        row.desired.fields,
        row.desired.updated_ms as i64,
        row.desired_acked as i64,
        row.reported.document,
        row.reported.version as i64,
        row.reported.fields,
        row.reported.updated_ms as i64,
        row.reported_seq as i64,
    ])?;
    Ok(())
}

/// The seq of the last REPORT applied (0 if none): it counts as stored.
pub(super) fn reported_seq(conn: &Connection, device: Key) -> Result<u64, StoreError> {
    let seq: Option<i64> = conn
        .prepare_cached("SELECT reported_seq FROM device_state WHERE device = ?1")?
        .query_row([device], |r| r.get(0))
        .optional()?;
    Ok(seq.map_or(0, u))
}

fn device_key(conn: &Connection, device_id: &str) -> Result<Option<Key>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id FROM devices WHERE device_id = ?1")?
        .query_row([device_id], |r| r.get(0))
        .optional()?)
}

/// Applies a batch's reports in order inside the writer's transaction;
/// returns those refused.
pub(super) fn apply_reports(
    tx: &Transaction<'_>,
    reports: &[ReportRecord],
    now_ms: u64,
) -> Result<Appended, StoreError> {
    let mut rows: HashMap<Key, (StateRow, bool)> = HashMap::new();
    let mut refused = Vec::new();
    let mut history = tx.prepare_cached(
        "INSERT INTO state_history (device, seq, version, at_ms, received_ms, patch)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for r in reports {
        let (row, changed) = match rows.entry(r.device) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((read_row(tx, r.device)?, false))
            }
        };
        let before = row.reported_seq;
        match state::apply_report(row, r.seq, &r.patch, r.timestamp_ms, now_ms, r.limits) {
            Ok(true) => {
                history.execute(params![
                    r.device,
                    r.seq as i64,
                    row.reported.version as i64,
                    r.timestamp_ms as i64,
                    r.received_ms as i64,
                    String::from_utf8_lossy(&r.patch),
                ])?;
            }
            Ok(false) => {}
            Err(e) => refused.push(Refused::of(r, &e)),
        }
        *changed |= row.reported_seq != before;
    }
    for (device, (row, changed)) in &rows {
        if *changed {
            write_row(tx, *device, row)?;
        }
    }
    Ok(Appended { refused })
}

#[async_trait]
impl StateStore for SqliteStore {
    async fn device_state(&self, device_id: &str) -> Result<Option<StateRow>, StoreError> {
        let device_id = device_id.to_owned();
        self.reader
            .call(move |conn| match device_key(conn, &device_id)? {
                Some(key) => read_row(conn, key).map(Some),
                None => Ok(None),
            })
            .await
    }

    async fn state_of(&self, device: Key) -> Result<StateRow, StoreError> {
        self.reader.call(move |conn| read_row(conn, device)).await
    }

    async fn patch_desired(
        &self,
        device_id: &str,
        patch: Map<String, Value>,
        if_match: Option<u64>,
        limits: StateLimits,
    ) -> Result<StateRow, StoreError> {
        let device_id = device_id.to_owned();
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let key = device_key(&tx, &device_id)?
                    .ok_or_else(|| StoreError::NoSuchDevice(device_id.clone()))?;
                let mut row = read_row(&tx, key)?;
                state::patch_desired(&mut row, &patch, if_match, now_ms(), limits)?;
                write_row(&tx, key, &row)?;
                tx.commit()?;
                Ok(row)
            })
            .await
    }

    async fn ack_desired(&self, device: Key, version: u64) -> Result<(), StoreError> {
        self.writer
            .call(move |conn| {
                conn.prepare_cached(
                    "UPDATE device_state SET desired_acked = ?2
                     WHERE device = ?1 AND desired_acked < ?2 AND desired_version >= ?2",
                )?
                .execute(params![device, version.min(i64::MAX as u64) as i64])?;
                Ok(())
            })
            .await
    }

    async fn state_history(
        &self,
        device_id: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StateChange>, StoreError> {
        let device_id = device_id.to_owned();
        self.reader
            .call(move |conn| {
                let key = device_key(conn, &device_id)?
                    .ok_or_else(|| StoreError::NoSuchDevice(device_id.clone()))?;
                let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
                let mut stmt = conn.prepare_cached(
                    "SELECT id, seq, version, at_ms, received_ms, patch FROM state_history
                     WHERE device = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![key, before, i64::from(limit)], |r| {
                    Ok(StateChange {
                        id: u(r.get(0)?),
                        seq: u(r.get(1)?),
                        version: u(r.get(2)?),
                        at_ms: u(r.get(3)?),
                        received_ms: u(r.get(4)?),
                        patch: r.get(5)?,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }
}
