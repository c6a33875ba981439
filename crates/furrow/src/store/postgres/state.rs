//! Device state on PostgreSQL: the same rows and rules as SQLite's
//! (`devices::state`), made safe for several instances by row locks: a
//! report or an operator's patch reads its device's row `FOR UPDATE`
//! inside its transaction, so concurrent writers on any instance apply one
//! after the other and `If-Match` sees the version it is compared with.

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use serde_json::{Map, Value};
use tokio_postgres::Row;

use super::{clamp, i, PostgresStore};
use crate::clock::now_ms;
use crate::devices::state::{self, StateLimits, StateRow};
use crate::store::sql::{StateColumns, STATE_COLS};
use crate::store::{
    Appended, DeviceKey, Refused, ReportRecord, StateChange, StateStore, StoreError,
};

fn u(v: i64) -> u64 {
    v as u64
}

fn row_of(r: &Row) -> Result<StateRow, StoreError> {
    Ok(StateColumns {
        desired: r.try_get(0)?,
        desired_version: r.try_get(1)?,
        desired_fields: r.try_get(2)?,
        desired_updated_ms: r.try_get(3)?,
        desired_acked: r.try_get(4)?,
        reported: r.try_get(5)?,
        reported_version: r.try_get(6)?,
        reported_fields: r.try_get(7)?,
        reported_updated_ms: r.try_get(8)?,
        reported_seq: r.try_get(9)?,
    }
    .row())
}

/// Reads a device's row (locked with `lock`), or the empty state.
pub(super) async fn read_row(
    c: &impl GenericClient,
    device: DeviceKey,
    lock: bool,
) -> Result<StateRow, StoreError> {
    let sql = format!(
        "SELECT {STATE_COLS} FROM device_state WHERE device = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let stmt = c.prepare_cached(&sql).await?;
    match c.query_opt(&stmt, &[&device]).await? {
        Some(r) => row_of(&r),
        None => Ok(StateRow::default()),
    }
}

pub(super) async fn write_row(
    c: &impl GenericClient,
    device: DeviceKey,
    row: &StateRow,
) -> Result<(), StoreError> {
    let stmt = c
        .prepare_cached(&format!(
            "INSERT INTO device_state (device, {STATE_COLS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (device) DO UPDATE SET
                desired = EXCLUDED.desired, desired_version = EXCLUDED.desired_version,
                desired_fields = EXCLUDED.desired_fields,
                desired_updated_ms = EXCLUDED.desired_updated_ms,
                desired_acked = EXCLUDED.desired_acked, reported = EXCLUDED.reported,
                reported_version = EXCLUDED.reported_version,
                reported_fields = EXCLUDED.reported_fields,
                reported_updated_ms = EXCLUDED.reported_updated_ms,
                reported_seq = EXCLUDED.reported_seq"
        ))
        .await?;
    c.execute(
        &stmt,
        &[
            &device,
            &row.desired.document,
            &i(row.desired.version),
            &row.desired.fields,
            &i(row.desired.updated_ms),
            &i(row.desired_acked),
            &row.reported.document,
            &i(row.reported.version),
            &row.reported.fields,
            &i(row.reported.updated_ms),
            &i(row.reported_seq),
        ],
    )
    .await?;
    Ok(())
}

/// Locks a device's state row, creating an empty one first if needed (a
/// row that does not exist yet cannot be locked).
pub(super) async fn lock_row(
    c: &impl GenericClient,
    device: DeviceKey,
) -> Result<StateRow, StoreError> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO device_state (device) VALUES ($1) ON CONFLICT (device) DO NOTHING",
        )
        .await?;
    c.execute(&stmt, &[&device]).await?;
    read_row(c, device, true).await
}

async fn device_key(
    c: &impl GenericClient,
    device_id: &str,
) -> Result<Option<DeviceKey>, StoreError> {
    let stmt = c
        .prepare_cached("SELECT id FROM devices WHERE device_id = $1")
        .await?;
    Ok(c.query_opt(&stmt, &[&device_id])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?)
}

/// Applies a batch's reports in order inside the writer's transaction
/// (which holds its devices' rows locked); returns those refused.
pub(super) async fn apply_reports(
    tx: &impl GenericClient,
    reports: &[ReportRecord],
    now_ms: u64,
) -> Result<Appended, StoreError> {
    let mut rows: HashMap<DeviceKey, (StateRow, bool)> = HashMap::new();
    let mut refused = Vec::new();
    let history = tx
        .prepare_cached(
            "INSERT INTO state_history (device, seq, version, at_ms, received_ms, patch)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    for r in reports {
        if let std::collections::hash_map::Entry::Vacant(e) = rows.entry(r.device) {
            e.insert((lock_row(tx, r.device).await?, false));
        }
        let Some((row, changed)) = rows.get_mut(&r.device) else {
            continue;
        };
        let before = row.reported_seq;
        match state::apply_report(row, r.seq, &r.patch, r.timestamp_ms, now_ms, r.limits) {
            Ok(true) => {
                let patch = String::from_utf8_lossy(&r.patch).into_owned();
                tx.execute(
                    &history,
                    &[
                        &r.device,
                        &i(r.seq),
                        &i(row.reported.version),
                        &clamp(r.timestamp_ms),
                        &clamp(r.received_ms),
                        &patch,
                    ],
                )
                .await?;
            }
            Ok(false) => {}
            Err(e) => refused.push(Refused::of(r, &e)),
        }
        *changed |= row.reported_seq != before;
    }
    for (device, (row, changed)) in &rows {
        if *changed {
            write_row(tx, *device, row).await?;
        }
    }
    Ok(Appended { refused })
}

#[async_trait]
impl StateStore for PostgresStore {
    async fn device_state(&self, device_id: &str) -> Result<Option<StateRow>, StoreError> {
        let client = self.client().await?;
        match device_key(&client, device_id).await? {
            Some(key) => read_row(&client, key, false).await.map(Some),
            None => Ok(None),
        }
    }

    async fn state_of(&self, device: DeviceKey) -> Result<StateRow, StoreError> {
        let client = self.client().await?;
        read_row(&client, device, false).await
    }

    async fn patch_desired(
        &self,
        device_id: &str,
        patch: Map<String, Value>,
        if_match: Option<u64>,
        limits: StateLimits,
    ) -> Result<StateRow, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let key = device_key(&tx, device_id)
            .await?
            .ok_or_else(|| StoreError::NoSuchDevice(device_id.to_owned()))?;
        let mut row = lock_row(&tx, key).await?;
        state::patch_desired(&mut row, &patch, if_match, now_ms(), limits)?;
        write_row(&tx, key, &row).await?;
        tx.commit().await?;
        Ok(row)
    }

    async fn ack_desired(&self, device: DeviceKey, version: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "UPDATE device_state SET desired_acked = $2
                 WHERE device = $1 AND desired_acked < $2 AND desired_version >= $2",
            )
            .await?;
        client.execute(&stmt, &[&device, &clamp(version)]).await?;
        Ok(())
    }

    async fn state_history(
        &self,
        device_id: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<StateChange>, StoreError> {
        let client = self.client().await?;
        let key = device_key(&client, device_id)
            .await?
            .ok_or_else(|| StoreError::NoSuchDevice(device_id.to_owned()))?;
        let before = before.map_or(i64::MAX, clamp);
        let stmt = client
            .prepare_cached(
                "SELECT id, seq, version, at_ms, received_ms, patch FROM state_history
                 WHERE device = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            )
            .await?;
        client
            .query(&stmt, &[&key, &before, &i64::from(limit)])
            .await?
            .iter()
            .map(|r| {
                Ok(StateChange {
                    id: u(r.try_get(0)?),
                    seq: u(r.try_get(1)?),
                    version: u(r.try_get(2)?),
                    at_ms: u(r.try_get(3)?),
                    received_ms: u(r.try_get(4)?),
                    patch: r.try_get(5)?,
                })
            })
            .collect()
    }
}
