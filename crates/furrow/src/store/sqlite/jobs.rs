//! Tags and jobs on SQLite. A job's tick runs on the writer thread in one
//! transaction (one process owns the database, so the thread is the lock);
//! the rules are `jobs`'s.

use std::collections::BTreeMap;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::super::sql::{JobColumns, JobDeviceColumns, JOB_COLS, JOB_DEVICE_COLS};
use super::super::{
    CommandState, DeviceInfo, FirmwareStore, FleetStore, JobTick, StoreError, TickScope, Ticked,
};
use super::{device_info, SqliteStore};
use crate::devices::state::{self, StateLimits};
use crate::firmware::{Assignment, FirmwareRecord};
use crate::jobs::{
    self, Counts, Decision, DeviceState, JobDevice, JobRecord, JobStatus, NewJob, Operation, Tags,
    Target, MAX_TAGS,
};

fn u(v: i64) -> u64 {
    v as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobColumns {
        id: r.get(0)?,
        status: r.get(1)?,
        target: r.get(2)?,
        op_kind: r.get(3)?,
        op_name: r.get(4)?,
        op_content_type: r.get(5)?,
        op_payload: r.get(6)?,
        rate_per_min: r.get(7)?,
        abort_failed_pct: r.get(8)?,
        abort_min_completed: r.get(9)?,
        device_timeout_ms: r.get(10)?,
        deadline_ms: r.get(11)?,
        created_by: r.get(12)?,
        created_ms: r.get(13)?,
        updated_ms: r.get(14)?,
        finished_ms: r.get(15)?,
        reason: r.get(16)?,
        started: r.get(17)?,
    }
    .record())
}

fn counts(conn: &Connection, id: u64) -> Result<Counts, StoreError> {
    let mut c = Counts::default();
    let mut stmt = conn
        .prepare_cached("SELECT state, count(*) FROM job_devices WHERE job = ?1 GROUP BY state")?;
    let rows = stmt.query_map([i(id)], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (s, n) = row?;
        if let Some(s) = DeviceState::parse(&s) {
            c.add(s, u(n));
        }
    }
    Ok(c)
}

fn load_job(conn: &Connection, id: u64) -> Result<Option<JobRecord>, StoreError> {
    let job = conn
        .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"))?
        .query_row([i(id)], job_row)
        .optional()?;
    match job {
        Some(mut j) => {
            j.counts = counts(conn, id)?;
            Ok(Some(j))
        }
        None => Ok(None),
    }
}

fn key_of(conn: &Connection, device_id: &str) -> Result<Option<(i64, bool)>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT id, revoked_ms IS NOT NULL FROM devices WHERE device_id = ?1")?
        .query_row([device_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

fn tags_of_key(conn: &Connection, key: i64) -> Result<Tags, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT key, value FROM device_tags WHERE device = ?1")?;
    let rows = stmt.query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A selected device: key, id, created, revoked.
type Selected = (i64, String, i64, Option<i64>);

/// Keys and ids of live devices carrying every tag of `selector`, in id
/// order, after `after`, at most `limit`.
fn select(
    conn: &Connection,
    selector: &Tags,
    after: &str,
    limit: i64,
) -> Result<Vec<Selected>, StoreError> {
    let mut sql = String::from(
        "SELECT d.id, d.device_id, d.created_ms, d.revoked_ms FROM devices d WHERE d.device_id > ?1",
    );
    let mut args: Vec<String> = vec![after.to_owned()];
    for (k, v) in selector {
        let n = args.len();
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.key = ?{} AND t.value = ?{})",
            n + 1,
            n + 2
        ));
        args.push(k.clone());
        args.push(v.clone());
    }
    sql.push_str(&format!(" ORDER BY d.device_id LIMIT {limit}"));
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn create(tx: &Transaction<'_>, job: &NewJob, now: u64) -> Result<u64, StoreError> {
    // The devices, resolved now, in id order.
    let mut keys: Vec<i64> = Vec::new();
    match &job.target {
        Target::Tags(sel) => {
            if sel.is_empty() {
                return Err(StoreError::Job(
                    "a tag selector needs at least one tag".into(),
                ));
            }
            for (key, _, _, revoked) in select(tx, sel, "", i64::MAX)? {
                if revoked.is_none() {
                    keys.push(key);
                }
            }
        }
        Target::Devices(ids) => {
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            for id in ids {
                match key_of(tx, &id)? {
                    None => return Err(StoreError::NoSuchDevice(id)),
                    Some((_, true)) => return Err(StoreError::Revoked(id)),
                    Some((key, false)) => keys.push(key),
                }
            }
        }
    }
    if keys.is_empty() {
        return Err(StoreError::Job("the target matches no device".into()));
    }
    let kind = job.operation.kind();
    let (name, ct, payload) = job.operation.columns();
    let target = serde_json::to_string(&job.target).map_err(|e| StoreError::Job(e.to_string()))?;
    tx.execute(
        "INSERT INTO jobs (status, active, target, op_kind, op_name, op_content_type,
            op_payload, rate_per_min, abort_failed_pct, abort_min_completed,
            device_timeout_ms, deadline_ms, created_by, created_ms, updated_ms)
         VALUES ('running', 1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)",
        params![
            target,
            kind,
            name,
            ct,
            payload,
            job.rate_per_min,
            job.abort.map(|a| a.failed_pct),
            job.abort.map(|a| i(a.min_completed)),
            i(job.device_timeout_ms),
            i(job.deadline_ms),
            job.created_by,
            i(now),
        ],
    )?;
    let id = tx.last_insert_rowid();
    let mut ins = tx.prepare_cached(
        "INSERT INTO job_devices (job, device, pos, state) VALUES (?1, ?2, ?3, 'queued')",
    )?;
    for (pos, key) in keys.iter().enumerate() {
        ins.execute(params![id, key, pos as i64])?;
    }
    Ok(u(id))
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobDevice> {
    Ok(JobDeviceColumns {
        device_id: r.get(0)?,
        state: r.get(1)?,
        started_ms: r.get(2)?,
        finished_ms: r.get(3)?,
        command_id: r.get(4)?,
        desired_version: r.get(5)?,
    }
    .record())
}

/// Sets a device's state (final states get `finished_ms`) and notes it.
fn set_state(
    tx: &Transaction<'_>,
    job: u64,
    key: i64,
    state: DeviceState,
    now: u64,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE job_devices SET state = ?3, finished_ms = CASE WHEN ?4 THEN ?5 ELSE finished_ms END
         WHERE job = ?1 AND device = ?2",
    )?
    .execute(params![
        i(job),
        key,
        state.as_str(),
        state.is_final(),
        i(now)
    ])?;
    changed.push((key, state));
    Ok(())
}

/// Brings in-progress devices up to date, those after `scope.after` in
/// key order and at most `scope.max_devices` of them; returns how many it
/// looked at and the last one's key.
fn sync(
    tx: &Transaction<'_>,
    job: &JobRecord,
    now: u64,
    scope: TickScope,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(usize, Option<i64>), StoreError> {
    let after = scope.after.unwrap_or(i64::MIN);
    let limit = slice_limit(scope);
    let mut looked = (0, None);
    let mut saw = |key: i64| {
        looked.0 += 1;
        looked.1 = Some(key);
    };
    match &job.operation {
        Operation::Command { .. } => {
            let rows: Vec<(i64, i64, String, i64)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT jd.device, c.id, c.status, c.updated_ms FROM job_devices jd
                     JOIN commands c ON c.id = jd.command_id
                     WHERE jd.job = ?1 AND jd.state = 'in_progress' AND jd.device > ?2
                     ORDER BY jd.device LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![i(job.id), after, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?;
                rows.collect::<Result<_, _>>()?
            };
            for (key, cmd, status, updated) in rows {
                saw(key);
                let Some(cs) = CommandState::parse(&status) else {
                    continue;
                };
                if let Some((st, cancel)) =
                    jobs::command_outcome(cs, u(updated), job.device_timeout_ms, now)
                {
                    if cancel {
                        tx.execute(
                            "UPDATE commands SET status = 'cancelled', updated_ms = ?2
                             WHERE id = ?1 AND status IN ('queued', 'delivered')",
                            params![cmd, i(now)],
                        )?;
                    }
                    set_state(tx, job.id, key, st, now, changed)?;
                }
            }
        }
        Operation::Desired { patch } => {
            let rows: Vec<(i64, i64, i64)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT device, desired_version, started_ms FROM job_devices
                     WHERE job = ?1 AND state = 'in_progress' AND device > ?2
                     ORDER BY device LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![i(job.id), after, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
                rows.collect::<Result<_, _>>()?
            };
            for (key, version, started) in rows {
                saw(key);
                let row = super::state::read_row(tx, key)?;
                if let Some(st) =
                    jobs::desired_outcome(&row, patch, u(version), u(started), job, now)
                {
                    set_state(tx, job.id, key, st, now, changed)?;
                }
            }
        }
        Operation::Firmware { image, version, .. } => {
            // Only devices that reported since the last look (their
            // reported version is past the one seen then), or that may
            // have run out of time: a tick on SQLite holds the writer, and
            // reading every row each time would delay telemetry commits by
            // the size of the rollout.
            let rows: Vec<(i64, i64)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT jd.device, jd.started_ms FROM job_devices jd
                     WHERE jd.job = ?1 AND jd.state = 'in_progress' AND jd.device > ?6
                       AND (NOT ?2 OR ?4 >= ?5 OR jd.started_ms + ?3 <= ?4
                            OR EXISTS (SELECT 1 FROM device_state s WHERE s.device = jd.device
                                       AND s.reported_version > jd.reported_seen))
                     ORDER BY jd.device LIMIT ?7",
                )?;
                let rows = stmt.query_map(
                    params![
                        i(job.id),
                        scope.changed_only,
                        i(job.device_timeout_ms),
                        i(now),
                        i(job.deadline_ms),
                        after,
                        limit
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                rows.collect::<Result<_, _>>()?
            };
            for (key, started) in rows {
                saw(key);
                let row = super::state::read_row(tx, key)?;
                let reported: serde_json::Value =
                    serde_json::from_str(&row.reported.document).unwrap_or_default();
                match crate::firmware::outcome(&reported, image, version, u(started), job, now) {
                    Some(st) => set_state(tx, job.id, key, st, now, changed)?,
                    None => {
                        tx.prepare_cached(
                            "UPDATE job_devices SET reported_seen = ?3 WHERE job = ?1 AND device = ?2",
                        )?
                        .execute(params![i(job.id), key, i(row.reported.version)])?;
                    }
                }
            }
        }
    }
    Ok(looked)
}

/// `LIMIT` for a slice of `scope` (SQLite: -1 is none).
fn slice_limit(scope: TickScope) -> i64 {
    match scope.max_devices {
        0 => -1,
        n => i64::try_from(n).unwrap_or(i64::MAX),
    }
}

/// Starts up to `n` queued devices.
fn start(
    tx: &Transaction<'_>,
    job: &JobRecord,
    n: u64,
    now: u64,
    limits: StateLimits,
    started: &mut Vec<i64>,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(), StoreError> {
    let picked: Vec<(i64, bool)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT jd.device, d.revoked_ms IS NOT NULL FROM job_devices jd
             JOIN devices d ON d.id = jd.device
             WHERE jd.job = ?1 AND jd.state = 'queued' ORDER BY jd.pos LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![i(job.id), i(n)], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    tx.prepare_cached("UPDATE jobs SET started = started + ?2 WHERE id = ?1")?
        .execute(params![i(job.id), picked.len() as i64])?;
    for (key, revoked) in picked {
        tx.prepare_cached("UPDATE job_devices SET started_ms = ?3 WHERE job = ?1 AND device = ?2")?
            .execute(params![i(job.id), key, i(now)])?;
        if revoked {
            set_state(tx, job.id, key, DeviceState::Cancelled, now, changed)?;
            continue;
        }
        match &job.operation {
            Operation::Command {
                name,
                content_type,
                payload,
            } => {
                // Delivered until the job's deadline, to a device offline now.
                tx.execute(
                    "INSERT INTO commands (device, name, content_type, payload, status,
                        created_ms, expires_ms, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?5)",
                    params![key, name, content_type, payload, i(now), i(job.deadline_ms)],
                )?;
                let cmd = tx.last_insert_rowid();
                tx.execute(
                    "UPDATE job_devices SET state = 'in_progress', command_id = ?3
                     WHERE job = ?1 AND device = ?2",
                    params![i(job.id), key, cmd],
                )?;
                changed.push((key, DeviceState::InProgress));
            }
            Operation::Desired { patch } => {
                let mut row = super::state::read_row(tx, key)?;
                let parsed = state::parse_patch(patch.as_bytes(), limits);
                match parsed.and_then(|p| state::patch_desired(&mut row, &p, None, now, limits)) {
                    Ok(()) => {
                        super::state::write_row(tx, key, &row)?;
                        tx.execute(
                            "UPDATE job_devices SET state = 'in_progress', desired_version = ?3
                             WHERE job = ?1 AND device = ?2",
                            params![i(job.id), key, i(row.desired.version)],
                        )?;
                        changed.push((key, DeviceState::InProgress));
                    }
                    Err(_) => set_state(tx, job.id, key, DeviceState::Failed, now, changed)?,
                }
            }
            Operation::Firmware { .. } => {
                // Its session offers the image when it looks next (the
                // runner wakes it): nothing to write but the state.
                tx.prepare_cached(
                    "UPDATE job_devices SET state = 'in_progress' WHERE job = ?1 AND device = ?2",
                )?
                .execute(params![i(job.id), key])?;
                changed.push((key, DeviceState::InProgress));
            }
        }
        started.push(key);
    }
    Ok(())
}

/// Stops starting devices: queued ones are cancelled, and so are those
/// whose command has not reached them (it is cancelled too).
fn stop(
    tx: &Transaction<'_>,
    job: &JobRecord,
    status: JobStatus,
    reason: &str,
    now: u64,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE jobs SET status = ?2, finished_ms = ?3, reason = ?4 WHERE id = ?1",
        params![i(job.id), status.as_str(), i(now), reason],
    )?;
    let queued: Vec<i64> = {
        let mut stmt = tx
            .prepare_cached("SELECT device FROM job_devices WHERE job = ?1 AND state = 'queued'")?;
        let rows = stmt.query_map([i(job.id)], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for key in queued {
        set_state(tx, job.id, key, DeviceState::Cancelled, now, changed)?;
    }
    if let Operation::Command { .. } = job.operation {
        let unsent: Vec<(i64, i64)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT jd.device, c.id FROM job_devices jd JOIN commands c ON c.id = jd.command_id
                 WHERE jd.job = ?1 AND jd.state = 'in_progress' AND c.status = 'queued'",
            )?;
            let rows = stmt.query_map([i(job.id)], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        for (key, cmd) in unsent {
            tx.execute(
                "UPDATE commands SET status = 'cancelled', updated_ms = ?2 WHERE id = ?1",
                params![cmd, i(now)],
            )?;
            set_state(tx, job.id, key, DeviceState::Cancelled, now, changed)?;
        }
    }
    Ok(())
}

fn tick(
    tx: &Transaction<'_>,
    id: u64,
    now: u64,
    limits: StateLimits,
    scope: TickScope,
) -> Result<Option<Ticked>, StoreError> {
    let Some(mut job) = tx
        .prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE id = ?1 AND active = 1"
        ))?
        .query_row([i(id)], job_row)
        .optional()?
    else {
        return Ok(None);
    };
    let before = job.status;
    let (mut started, mut changed) = (Vec::new(), Vec::new());
    let (looked, last) = sync(tx, &job, now, scope, &mut changed)?;
    if scope.full(looked) {
        // The slice is full: the next one goes on after `last`; the job's
        // next step waits until every device has been looked at.
        if !changed.is_empty() {
            tx.execute(
                "UPDATE jobs SET updated_ms = ?2 WHERE id = ?1",
                params![i(id), i(now)],
            )?;
        }
        let job = load_job(tx, id)?.ok_or_else(|| StoreError::Job("the job vanished".into()))?;
        return Ok(Some((job, false, started, changed, last)));
    }
    let mut more = None;
    let mut c = counts(tx, id)?;
    if job.status == JobStatus::Running {
        match jobs::decide(&job, &c, now) {
            Decision::Stop(status, reason) => {
                stop(tx, &job, status, &reason, now, &mut changed)?;
                job.status = status;
            }
            Decision::Start(n) => {
                let room;
                (room, more) = scope.room(n, looked);
                start(tx, &job, room, now, limits, &mut started, &mut changed)?
            }
            Decision::Wait => {}
        }
        c = counts(tx, id)?;
        if job.status == JobStatus::Running && c.queued == 0 && c.in_progress == 0 {
            tx.execute(
                "UPDATE jobs SET status = 'completed', finished_ms = ?2 WHERE id = ?1",
                params![i(id), i(now)],
            )?;
        }
    }
    tx.execute(
        "UPDATE jobs SET active = ?2, updated_ms = CASE WHEN ?3 THEN ?4 ELSE updated_ms END
         WHERE id = ?1",
        params![
            i(id),
            c.queued + c.in_progress > 0,
            !changed.is_empty(),
            i(now)
        ],
    )?;
    let job = load_job(tx, id)?.ok_or_else(|| StoreError::Job("the job vanished".into()))?;
    Ok(Some((
        job.clone(),
        job.status != before,
        started,
        changed,
        more,
    )))
}

fn device_ids(conn: &Connection, keys: &[i64]) -> Result<BTreeMap<i64, String>, StoreError> {
    let mut out = BTreeMap::new();
    let mut stmt = conn.prepare_cached("SELECT device_id FROM devices WHERE id = ?1")?;
    for k in keys {
        if !out.contains_key(k) {
            out.insert(*k, stmt.query_row([k], |r| r.get(0))?);
        }
    }
    Ok(out)
}

#[async_trait]
impl FleetStore for SqliteStore {
    async fn set_tags(
        &self,
        device_id: &str,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<Tags, StoreError> {
        for (k, v) in &changes {
            jobs::check_key(k)?;
            if let Some(v) = v {
                jobs::check_value(k, v)?;
            }
        }
        let id = device_id.to_owned();
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let (key, _) = key_of(&tx, &id)?.ok_or_else(|| StoreError::NoSuchDevice(id.clone()))?;
                for (k, v) in &changes {
                    match v {
                        Some(v) => tx.execute(
                            "INSERT OR REPLACE INTO device_tags (device, key, value) VALUES (?1, ?2, ?3)",
                            params![key, k, v],
                        )?,
                        None => tx.execute(
                            "DELETE FROM device_tags WHERE device = ?1 AND key = ?2",
                            params![key, k],
                        )?,
                    };
                }
                let tags = tags_of_key(&tx, key)?;
                if tags.len() > MAX_TAGS {
                    return Err(jobs::TagError::TooMany { max: MAX_TAGS }.into());
                }
                tx.commit()?;
                Ok(tags)
            })
            .await
    }

    async fn tags_of(&self, device_ids: &[String]) -> Result<BTreeMap<String, Tags>, StoreError> {
        let ids = device_ids.to_vec();
        self.reader
            .call(move |conn| {
                let mut out = BTreeMap::new();
                for id in ids {
                    if let Some((key, _)) = key_of(conn, &id)? {
                        let tags = tags_of_key(conn, key)?;
                        if !tags.is_empty() {
                            out.insert(id, tags);
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn select_devices(
        &self,
        selector: &Tags,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceInfo>, StoreError> {
        let (selector, log) = (selector.clone(), std::sync::Arc::clone(&self.log));
        self.reader
            .call(move |conn| {
                select(
                    conn,
                    &selector,
                    &after.unwrap_or_default(),
                    i64::from(limit),
                )?
                .into_iter()
                .map(|(key, id, created, revoked)| {
                    device_info(conn, &log, key, id, created, revoked)
                })
                .collect()
            })
            .await
    }

    async fn create_job(&self, job: NewJob) -> Result<JobRecord, StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let id = create(&tx, &job, crate::clock::now_ms())?;
                let rec = load_job(&tx, id)?;
                tx.commit()?;
                rec.ok_or_else(|| StoreError::Job("the new job vanished".into()))
            })
            .await
    }

    async fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        self.reader.call(move |conn| load_job(conn, id)).await
    }

    async fn jobs(&self, before: Option<u64>, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        self.reader
            .call(move |conn| {
                let ids: Vec<i64> = {
                    let mut stmt = conn.prepare_cached(
                        "SELECT id FROM jobs WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
                    )?;
                    let rows = stmt
                        .query_map(params![before.map_or(i64::MAX, i), i64::from(limit)], |r| {
                            r.get(0)
                        })?;
                    rows.collect::<Result<_, _>>()?
                };
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    out.extend(load_job(conn, u(id))?);
                }
                Ok(out)
            })
            .await
    }

    async fn job_devices(
        &self,
        id: u64,
        state: Option<DeviceState>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<JobDevice>, StoreError> {
        self.reader
            .call(move |conn| {
                // `after` is a device id: continue after its position.
                let pos: i64 = match &after {
                    None => -1,
                    Some(a) => conn
                        .prepare_cached(
                            "SELECT jd.pos FROM job_devices jd JOIN devices d ON d.id = jd.device
                             WHERE jd.job = ?1 AND d.device_id = ?2",
                        )?
                        .query_row(params![i(id), a], |r| r.get(0))
                        .optional()?
                        .unwrap_or(i64::MAX),
                };
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {JOB_DEVICE_COLS} FROM job_devices jd JOIN devices d ON d.id = jd.device
                     WHERE jd.job = ?1 AND jd.pos > ?2 AND (?3 IS NULL OR jd.state = ?3)
                     ORDER BY jd.pos LIMIT ?4"
                ))?;
                let rows = stmt.query_map(
                    params![i(id), pos, state.map(DeviceState::as_str), i64::from(limit)],
                    device_row,
                )?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
    }

    async fn cancel_job(&self, id: u64, now_ms: u64) -> Result<Option<JobRecord>, StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let Some(job) = load_job(&tx, id)? else {
                    return Ok(None);
                };
                if job.status == JobStatus::Running {
                    let mut changed = Vec::new();
                    stop(
                        &tx,
                        &job,
                        JobStatus::Cancelled,
                        "cancelled by an operator",
                        now_ms,
                        &mut changed,
                    )?;
                    let c = counts(&tx, id)?;
                    tx.execute(
                        "UPDATE jobs SET active = ?2, updated_ms = ?3 WHERE id = ?1",
                        params![i(id), c.in_progress > 0, i(now_ms)],
                    )?;
                }
                let job = load_job(&tx, id)?;
                tx.commit()?;
                Ok(job)
            })
            .await
    }

    async fn active_jobs(&self) -> Result<Vec<u64>, StoreError> {
        self.reader
            .call(|conn| {
                let mut stmt =
                    conn.prepare_cached("SELECT id FROM jobs WHERE active = 1 ORDER BY id")?;
                let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
                Ok(rows.map(|r| r.map(u)).collect::<Result<_, _>>()?)
            })
            .await
    }

    async fn tick_job(
        &self,
        id: u64,
        now_ms: u64,
        limits: StateLimits,
        scope: TickScope,
    ) -> Result<Option<JobTick>, StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let Some((job, status_changed, started, changed, more)) =
                    tick(&tx, id, now_ms, limits, scope)?
                else {
                    return Ok(None);
                };
                let keys: Vec<i64> = changed
                    .iter()
                    .map(|c| c.0)
                    .chain(started.iter().copied())
                    .collect();
                let names = device_ids(&tx, &keys)?;
                let mut changed_devices = Vec::with_capacity(changed.len());
                {
                    let mut stmt = tx.prepare_cached(&format!(
                        "SELECT {JOB_DEVICE_COLS} FROM job_devices jd JOIN devices d ON d.id = jd.device
                         WHERE jd.job = ?1 AND jd.device = ?2"
                    ))?;
                    for (key, _) in &changed {
                        changed_devices.push(stmt.query_row(params![i(id), key], device_row)?);
                    }
                }
                tx.commit()?;
                Ok(Some(JobTick {
                    job,
                    status_changed,
                    started: started
                        .iter()
                        .filter_map(|k| names.get(k).cloned())
                        .collect(),
                    changed: changed_devices,
                    more,
                }))
            })
            .await
    }
}

fn firmware_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FirmwareRecord> {
    Ok(FirmwareRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        version: r.get(2)?,
        model: r.get(3)?,
        size: u(r.get(4)?),
        signature: r.get(5)?,
        created_ms: u(r.get(6)?),
        created_by: r.get(7)?,
    })
}

const FIRMWARE_COLS: &str = "id, name, version, model, size, signature, created_ms, created_by";

/// Where an image's bytes live: `firmware/<id>.bin` beside the database.
fn image_path(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    dir.join(format!("{id}.bin"))
}

/// Ids are hex SHA-256s; anything else is never a file name.
fn is_image_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[async_trait]
impl FirmwareStore for SqliteStore {
    async fn put_firmware(
        &self,
        record: FirmwareRecord,
        staged: std::path::PathBuf,
    ) -> Result<FirmwareRecord, StoreError> {
        if !is_image_id(&record.id) {
            return Err(StoreError::Job(format!("bad image id {:?}", record.id)));
        }
        let dir = self.firmware_dir();
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let exists = tx
                    .prepare_cached("SELECT 1 FROM firmware WHERE id = ?1")?
                    .exists([&record.id])?;
                if exists {
                    let _ = std::fs::remove_file(&staged);
                    return Err(StoreError::FirmwareExists(record.id));
                }
                tx.execute(
                    &format!("INSERT INTO firmware ({FIRMWARE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                    params![
                        record.id,
                        record.name,
                        record.version,
                        record.model,
                        i(record.size),
                        record.signature,
                        i(record.created_ms),
                        record.created_by
                    ],
                )?;
                // The bytes are in place (and synced) before the row that
                // names them commits.
                let path = image_path(&dir, &record.id);
                // A rename when the staged file is beside the images (the
                // API stages there), a copy from anywhere else.
                let placed = std::fs::rename(&staged, &path)
                    .or_else(|_| std::fs::copy(&staged, &path).map(|_| ()))
                    .and_then(|()| std::fs::File::open(&path)?.sync_all())
                    .and_then(|()| std::fs::File::open(&dir)?.sync_all());
                let _ = std::fs::remove_file(&staged);
                if let Err(source) = placed {
                    let _ = std::fs::remove_file(&staged);
                    return Err(StoreError::Io { path, source });
                }
                tx.commit()?;
                Ok(record)
            })
            .await
    }

    async fn firmware(&self, id: &str) -> Result<Option<FirmwareRecord>, StoreError> {
        let id = id.to_owned();
        self.reader
            .call(move |conn| {
                Ok(conn
                    .prepare_cached(&format!(
                        "SELECT {FIRMWARE_COLS} FROM firmware WHERE id = ?1"
                    ))?
                    .query_row([id], firmware_row)
                    .optional()?)
            })
            .await
    }

    async fn list_firmware(&self) -> Result<Vec<FirmwareRecord>, StoreError> {
        self.reader
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {FIRMWARE_COLS} FROM firmware ORDER BY created_ms DESC, id"
                ))?;
                let rows = stmt.query_map([], firmware_row)?;
                Ok(rows.collect::<Result<_, _>>()?)
            })
            .await
    }

    async fn delete_firmware(&self, id: &str) -> Result<bool, StoreError> {
        let (id, dir) = (id.to_owned(), self.firmware_dir());
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let used = tx
                    .prepare_cached(
                        "SELECT 1 FROM jobs WHERE op_kind = 'firmware' AND op_name = ?1 AND active = 1",
                    )?
                    .exists([&id])?;
                if used {
                    return Err(StoreError::FirmwareInUse(id));
                }
                let n = tx.execute("DELETE FROM firmware WHERE id = ?1", [&id])?;
                tx.commit()?;
                if n > 0 && is_image_id(&id) {
                    let _ = std::fs::remove_file(image_path(&dir, &id));
                }
                Ok(n > 0)
            })
            .await
    }

    async fn firmware_bytes(&self, id: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        if !is_image_id(id) {
            return Ok(None);
        }
        let path = image_path(&self.firmware_dir(), id);
        let read = tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        match read {
            Ok(b) => Ok(Some(bytes::Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io {
                path: image_path(&self.firmware_dir(), id),
                source,
            }),
        }
    }

    async fn firmware_assignment(
        &self,
        device: crate::store::DeviceKey,
    ) -> Result<Option<Assignment>, StoreError> {
        self.reader
            .call(move |conn| {
                let row: Option<(i64, String, Vec<u8>)> = conn
                    .prepare_cached(
                        "SELECT j.id, j.op_name, j.op_payload FROM job_devices jd
                         JOIN jobs j ON j.id = jd.job
                         WHERE jd.device = ?1 AND jd.state = 'in_progress'
                           AND j.op_kind = 'firmware' AND j.status = 'running'
                         ORDER BY j.id DESC LIMIT 1",
                    )?
                    .query_row([device], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()?;
                Ok(row.map(|(job, image, payload)| {
                    let p: jobs::FirmwareParams =
                        serde_json::from_slice(&payload).unwrap_or_default();
                    Assignment {
                        job: u(job),
                        image,
                        version: p.version,
                        max_downloads: p.max_downloads,
                    }
                }))
            })
            .await
    }
}
