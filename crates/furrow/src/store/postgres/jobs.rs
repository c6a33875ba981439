//! Tags and jobs on PostgreSQL. A job's tick locks the job's row with
//! `FOR UPDATE SKIP LOCKED`: instances take turns, one waits for nobody,
//! and a killed instance's transaction rolls back whole, so a device is
//! started (its command created, or its desired state patched) exactly
//! once whichever instance does it. The rules are `jobs`'s.

use std::collections::BTreeMap;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{clamp, device_query, device_row, i, PostgresStore};
use crate::devices::state::{self, StateLimits};
use crate::firmware::{Assignment, FirmwareRecord};
use crate::jobs::{
    self, Counts, Decision, DeviceState, JobDevice, JobRecord, JobStatus, NewJob, Operation, Tags,
    Target, MAX_TAGS,
};
use crate::store::sql::{JobColumns, JobDeviceColumns, JOB_COLS, JOB_DEVICE_COLS};
use crate::store::{
    CommandState, DeviceInfo, FirmwareStore, FleetStore, JobTick, StoreError, TickScope, Ticked,
};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

fn u(v: i64) -> u64 {
    v as u64
}

fn job_row(r: &Row) -> Result<JobRecord, StoreError> {
    Ok(JobColumns {
        id: r.try_get(0)?,
        status: r.try_get(1)?,
        target: r.try_get(2)?,
        op_kind: r.try_get(3)?,
        op_name: r.try_get(4)?,
        op_content_type: i64::from(r.try_get::<_, i16>(5)?),
        op_payload: r.try_get(6)?,
        rate_per_min: r.try_get(7)?,
        abort_failed_pct: r.try_get(8)?,
        abort_min_completed: r.try_get(9)?,
        device_timeout_ms: r.try_get(10)?,
        deadline_ms: r.try_get(11)?,
        created_by: r.try_get(12)?,
        created_ms: r.try_get(13)?,
        updated_ms: r.try_get(14)?,
        finished_ms: r.try_get(15)?,
        reason: r.try_get(16)?,
        started: r.try_get(17)?,
    }
    .record())
}

async fn counts(c: &impl GenericClient, id: u64) -> Result<Counts, StoreError> {
    let mut out = Counts::default();
    let stmt = c
        .prepare_cached("SELECT state, count(*) FROM job_devices WHERE job = $1 GROUP BY state")
        .await?;
    for r in c.query(&stmt, &[&i(id)]).await? {
        if let Some(s) = DeviceState::parse(&r.try_get::<_, String>(0)?) {
            out.add(s, u(r.try_get(1)?));
        }
    }
    Ok(out)
}

async fn load_job(c: &impl GenericClient, id: u64) -> Result<Option<JobRecord>, StoreError> {
    let stmt = c
        .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1"))
        .await?;
    match c.query_opt(&stmt, &[&i(id)]).await? {
        Some(r) => {
            let mut j = job_row(&r)?;
            j.counts = counts(c, id).await?;
            Ok(Some(j))
        }
        None => Ok(None),
    }
}

async fn key_of(
    c: &impl GenericClient,
    device_id: &str,
) -> Result<Option<(i64, bool)>, StoreError> {
    let stmt = c
        .prepare_cached("SELECT id, revoked_ms IS NOT NULL FROM devices WHERE device_id = $1")
        .await?;
    Ok(match c.query_opt(&stmt, &[&device_id]).await? {
        Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
        None => None,
    })
}

async fn tags_of_key(c: &impl GenericClient, key: i64) -> Result<Tags, StoreError> {
    let stmt = c
        .prepare_cached("SELECT key, value FROM device_tags WHERE device = $1")
        .await?;
    let mut out = Tags::new();
    for r in c.query(&stmt, &[&key]).await? {
        out.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok(out)
}

/// The WHERE clause of a selector (`$1` is `after`; pairs follow).
fn selector_sql(selector: &Tags) -> (String, Vec<String>) {
    let mut sql = String::from("WHERE d.device_id > $1");
    let mut args = Vec::new();
    for (k, v) in selector {
        let n = args.len() + 1;
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM device_tags t WHERE t.device = d.id AND t.key = ${} AND t.value = ${})",
            n + 1,
            n + 2
        ));
        args.push(k.clone());
        args.push(v.clone());
    }
    (sql, args)
}

async fn create(tx: &Tx<'_>, job: &NewJob, now: u64) -> Result<u64, StoreError> {
    let mut keys: Vec<i64> = Vec::new();
    match &job.target {
        Target::Tags(sel) => {
            if sel.is_empty() {
                return Err(StoreError::Job(
                    "a tag selector needs at least one tag".into(),
                ));
            }
            let (filter, args) = selector_sql(sel);
            let sql = format!(
                "SELECT d.id FROM devices d {filter} AND d.revoked_ms IS NULL ORDER BY d.device_id"
            );
            let after = String::new();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after];
            params.extend(args.iter().map(|a| a as &(dyn ToSql + Sync)));
            for r in tx.query(sql.as_str(), &params).await? {
                keys.push(r.try_get(0)?);
            }
        }
        Target::Devices(ids) => {
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            for id in ids {
                match key_of(tx, &id).await? {
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
    let row = tx
        .query_one(
            "INSERT INTO jobs (status, active, target, op_kind, op_name, op_content_type,
                op_payload, rate_per_min, abort_failed_pct, abort_min_completed,
                device_timeout_ms, deadline_ms, created_by, created_ms, updated_ms)
             VALUES ('running', true, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)
             RETURNING id",
            &[
                &target,
                &kind,
                &name,
                &i16::from(ct),
                &payload,
                &i64::from(job.rate_per_min),
                &job.abort.map(|a| a.failed_pct),
                &job.abort.map(|a| clamp(a.min_completed)),
                &clamp(job.device_timeout_ms),
                &clamp(job.deadline_ms),
                &job.created_by,
                &clamp(now),
            ],
        )
        .await?;
    let id: i64 = row.try_get(0)?;
    let pos: Vec<i64> = (0..keys.len() as i64).collect();
    tx.execute(
        "INSERT INTO job_devices (job, device, pos, state)
         SELECT $1, k, p, 'queued' FROM unnest($2::int8[], $3::int8[]) AS x(k, p)",
        &[&id, &keys, &pos],
    )
    .await?;
    Ok(u(id))
}

fn device_of(r: &Row) -> Result<JobDevice, StoreError> {
    Ok(JobDeviceColumns {
        device_id: r.try_get(0)?,
        state: r.try_get(1)?,
        started_ms: r.try_get(2)?,
        finished_ms: r.try_get(3)?,
        command_id: r.try_get(4)?,
        desired_version: r.try_get(5)?,
    }
    .record())
}

async fn set_state(
    tx: &Tx<'_>,
    job: u64,
    key: i64,
    state: DeviceState,
    now: u64,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(), StoreError> {
    let stmt = tx
        .prepare_cached(
            "UPDATE job_devices SET state = $3,
                finished_ms = CASE WHEN $4 THEN $5 ELSE finished_ms END
             WHERE job = $1 AND device = $2",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &i(job),
            &key,
            &state.as_str(),
            &state.is_final(),
            &clamp(now),
        ],
    )
    .await?;
    changed.push((key, state));
    Ok(())
}

/// Brings in-progress devices up to date, those after `scope.after` in
/// key order and at most `scope.max_devices` of them; returns how many it
/// looked at and the last one's key.
async fn sync(
    tx: &Tx<'_>,
    job: &JobRecord,
    now: u64,
    scope: TickScope,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(usize, Option<i64>), StoreError> {
    let after = scope.after.unwrap_or(i64::MIN);
    // LIMIT NULL is no limit.
    let limit = match scope.max_devices {
        0 => None,
        n => Some(i64::try_from(n).unwrap_or(i64::MAX)),
    };
    let mut looked = (0, None);
    let mut saw = |key: i64| {
        looked.0 += 1;
        looked.1 = Some(key);
    };
    match &job.operation {
        Operation::Command { .. } => {
            let rows = tx
                .query(
                    "SELECT jd.device, c.id, c.status, c.updated_ms FROM job_devices jd
                     JOIN commands c ON c.id = jd.command_id
                     WHERE jd.job = $1 AND jd.state = 'in_progress' AND jd.device > $2
                     ORDER BY jd.device LIMIT $3",
                    &[&i(job.id), &after, &limit],
                )
                .await?;
            for r in rows {
                let (key, cmd): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                saw(key);
                let Some(cs) = CommandState::parse(&r.try_get::<_, String>(2)?) else {
                    continue;
                };
                let updated: i64 = r.try_get(3)?;
                if let Some((st, cancel)) =
                    jobs::command_outcome(cs, u(updated), job.device_timeout_ms, now)
                {
                    if cancel {
                        tx.execute(
                            "UPDATE commands SET status = 'cancelled', updated_ms = $2
                             WHERE id = $1 AND status IN ('queued', 'delivered')",
                            &[&cmd, &clamp(now)],
                        )
                        .await?;
                    }
                    set_state(tx, job.id, key, st, now, changed).await?;
                }
            }
        }
        Operation::Desired { patch } => {
            let rows = tx
                .query(
                    "SELECT device, desired_version, started_ms FROM job_devices
                     WHERE job = $1 AND state = 'in_progress' AND device > $2
                     ORDER BY device LIMIT $3",
                    &[&i(job.id), &after, &limit],
                )
                .await?;
            for r in rows {
                let (key, version, started): (i64, i64, i64) =
                    (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
                saw(key);
                let row = super::state::read_row(tx, key, false).await?;
                if let Some(st) =
                    jobs::desired_outcome(&row, patch, u(version), u(started), job, now)
                {
                    set_state(tx, job.id, key, st, now, changed).await?;
                }
            }
        }
        Operation::Firmware { image, version, .. } => {
            // Only devices that reported since the last look (their
            // reported version is past the one seen then), or that may
            // have run out of time.
            let rows = tx
                .query(
                    "SELECT jd.device, jd.started_ms FROM job_devices jd
                     WHERE jd.job = $1 AND jd.state = 'in_progress' AND jd.device > $6
                       AND (NOT $2::bool OR $4::int8 >= $5::int8
                            OR jd.started_ms + $3::int8 <= $4::int8
                            OR EXISTS (SELECT 1 FROM device_state s WHERE s.device = jd.device
                                       AND s.reported_version > jd.reported_seen))
                     ORDER BY jd.device LIMIT $7",
                    &[
                        &i(job.id),
                        &scope.changed_only,
                        &clamp(job.device_timeout_ms),
                        &clamp(now),
                        &clamp(job.deadline_ms),
                        &after,
                        &limit,
                    ],
                )
                .await?;
            for r in rows {
                let (key, started): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
                saw(key);
                let row = super::state::read_row(tx, key, false).await?;
                let reported: serde_json::Value =
                    serde_json::from_str(&row.reported.document).unwrap_or_default();
                match crate::firmware::outcome(&reported, image, version, u(started), job, now) {
                    Some(st) => set_state(tx, job.id, key, st, now, changed).await?,
                    None => {
                        tx.execute(
                            "UPDATE job_devices SET reported_seen = $3 WHERE job = $1 AND device = $2",
                            &[&i(job.id), &key, &clamp(row.reported.version)],
                        )
                        .await?;
                    }
                }
            }
        }
    }
    Ok(looked)
}

#[allow(clippy::too_many_arguments)]
async fn start(
    tx: &Tx<'_>,
    job: &JobRecord,
    n: u64,
    now: u64,
    limits: StateLimits,
    started: &mut Vec<i64>,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(), StoreError> {
    let picked = tx
        .query(
            "SELECT jd.device, d.revoked_ms IS NOT NULL FROM job_devices jd
             JOIN devices d ON d.id = jd.device
             WHERE jd.job = $1 AND jd.state = 'queued' ORDER BY jd.pos LIMIT $2",
            &[&i(job.id), &clamp(n)],
        )
        .await?;
    for r in picked {
        let (key, revoked): (i64, bool) = (r.try_get(0)?, r.try_get(1)?);
        tx.execute(
            "UPDATE jobs SET started = started + 1 WHERE id = $1",
            &[&i(job.id)],
        )
        .await?;
        tx.execute(
            "UPDATE job_devices SET started_ms = $3 WHERE job = $1 AND device = $2",
            &[&i(job.id), &key, &clamp(now)],
        )
        .await?;
        if revoked {
            set_state(tx, job.id, key, DeviceState::Cancelled, now, changed).await?;
            continue;
        }
        match &job.operation {
            Operation::Command {
                name,
                content_type,
                payload,
            } => {
                let row = tx
                    .query_one(
                        "INSERT INTO commands (device, name, content_type, payload, status,
                            created_ms, expires_ms, updated_ms)
                         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $5) RETURNING id",
                        &[
                            &key,
                            name,
                            &i16::from(*content_type),
                            payload,
                            &clamp(now),
                            &clamp(job.deadline_ms),
                        ],
                    )
                    .await?;
                let cmd: i64 = row.try_get(0)?;
                tx.execute(
                    "UPDATE job_devices SET state = 'in_progress', command_id = $3
                     WHERE job = $1 AND device = $2",
                    &[&i(job.id), &key, &cmd],
                )
                .await?;
                changed.push((key, DeviceState::InProgress));
            }
            Operation::Desired { patch } => {
                let mut row = super::state::lock_row(tx, key).await?;
                let parsed = state::parse_patch(patch.as_bytes(), limits);
                match parsed.and_then(|p| state::patch_desired(&mut row, &p, None, now, limits)) {
                    Ok(()) => {
                        super::state::write_row(tx, key, &row).await?;
                        tx.execute(
                            "UPDATE job_devices SET state = 'in_progress', desired_version = $3
                             WHERE job = $1 AND device = $2",
                            &[&i(job.id), &key, &i(row.desired.version)],
                        )
                        .await?;
                        changed.push((key, DeviceState::InProgress));
                    }
                    Err(_) => set_state(tx, job.id, key, DeviceState::Failed, now, changed).await?,
                }
            }
            Operation::Firmware { .. } => {
                // Its session offers the image when it looks next.
                tx.execute(
                    "UPDATE job_devices SET state = 'in_progress' WHERE job = $1 AND device = $2",
                    &[&i(job.id), &key],
                )
                .await?;
                changed.push((key, DeviceState::InProgress));
            }
        }
        started.push(key);
    }
    Ok(())
}

async fn stop(
    tx: &Tx<'_>,
    job: &JobRecord,
    status: JobStatus,
    reason: &str,
    now: u64,
    changed: &mut Vec<(i64, DeviceState)>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE jobs SET status = $2, finished_ms = $3, reason = $4 WHERE id = $1",
        &[&i(job.id), &status.as_str(), &clamp(now), &reason],
    )
    .await?;
    let queued = tx
        .query(
            "SELECT device FROM job_devices WHERE job = $1 AND state = 'queued'",
            &[&i(job.id)],
        )
        .await?;
    for r in queued {
        set_state(
            tx,
            job.id,
            r.try_get(0)?,
            DeviceState::Cancelled,
            now,
            changed,
        )
        .await?;
    }
    if let Operation::Command { .. } = job.operation {
        let unsent = tx
            .query(
                "SELECT jd.device, c.id FROM job_devices jd JOIN commands c ON c.id = jd.command_id
                 WHERE jd.job = $1 AND jd.state = 'in_progress' AND c.status = 'queued'",
                &[&i(job.id)],
            )
            .await?;
        for r in unsent {
            let (key, cmd): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            tx.execute(
                "UPDATE commands SET status = 'cancelled', updated_ms = $2 WHERE id = $1",
                &[&cmd, &clamp(now)],
            )
            .await?;
            set_state(tx, job.id, key, DeviceState::Cancelled, now, changed).await?;
        }
    }
    Ok(())
}

async fn tick(
    tx: &Tx<'_>,
    id: u64,
    now: u64,
    limits: StateLimits,
    scope: TickScope,
) -> Result<Option<Ticked>, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1 AND active FOR UPDATE SKIP LOCKED"),
            &[&i(id)],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut job = job_row(&row)?;
    let before = job.status;
    let (mut started, mut changed) = (Vec::new(), Vec::new());
    let (looked, last) = sync(tx, &job, now, scope, &mut changed).await?;
    if scope.full(looked) {
        // The slice is full: the next one goes on after `last`; the job's
        // next step waits until every device has been looked at.
        if !changed.is_empty() {
            tx.execute(
                "UPDATE jobs SET updated_ms = $2 WHERE id = $1",
                &[&i(id), &clamp(now)],
            )
            .await?;
        }
        let job = load_job(tx, id)
            .await?
            .ok_or_else(|| StoreError::Job("the job vanished".into()))?;
        return Ok(Some((job, false, started, changed, last)));
    }
    let mut more = None;
    let mut c = counts(tx, id).await?;
    if job.status == JobStatus::Running {
        match jobs::decide(&job, &c, now) {
            Decision::Stop(status, reason) => {
                stop(tx, &job, status, &reason, now, &mut changed).await?;
                job.status = status;
            }
            Decision::Start(n) => {
                let room;
                (room, more) = scope.room(n, looked);
                start(tx, &job, room, now, limits, &mut started, &mut changed).await?
            }
            Decision::Wait => {}
        }
        c = counts(tx, id).await?;
        if job.status == JobStatus::Running && c.queued == 0 && c.in_progress == 0 {
            tx.execute(
                "UPDATE jobs SET status = 'completed', finished_ms = $2 WHERE id = $1",
                &[&i(id), &clamp(now)],
            )
            .await?;
        }
    }
    tx.execute(
        "UPDATE jobs SET active = $2, updated_ms = CASE WHEN $3 THEN $4 ELSE updated_ms END
         WHERE id = $1",
        &[
            &i(id),
            &(c.queued + c.in_progress > 0),
            &!changed.is_empty(),
            &clamp(now),
        ],
    )
    .await?;
    let job = load_job(tx, id)
        .await?
        .ok_or_else(|| StoreError::Job("the job vanished".into()))?;
    let status_changed = job.status != before;
    Ok(Some((job, status_changed, started, changed, more)))
}

#[async_trait]
impl FleetStore for PostgresStore {
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let stmt = tx
            .prepare_cached("SELECT id FROM devices WHERE device_id = $1 FOR UPDATE")
            .await?;
        let key: i64 = tx
            .query_opt(&stmt, &[&device_id])
            .await?
            .ok_or_else(|| StoreError::NoSuchDevice(device_id.to_owned()))?
            .try_get(0)?;
        for (k, v) in &changes {
            match v {
                Some(v) => {
                    tx.execute(
                        "INSERT INTO device_tags (device, key, value) VALUES ($1, $2, $3)
                         ON CONFLICT (device, key) DO UPDATE SET value = EXCLUDED.value",
                        &[&key, k, v],
                    )
                    .await?
                }
                None => {
                    tx.execute(
                        "DELETE FROM device_tags WHERE device = $1 AND key = $2",
                        &[&key, k],
                    )
                    .await?
                }
            };
        }
        let tags = tags_of_key(&tx, key).await?;
        if tags.len() > MAX_TAGS {
            return Err(jobs::TagError::TooMany { max: MAX_TAGS }.into());
        }
        tx.commit().await?;
        Ok(tags)
    }

    async fn tags_of(&self, device_ids: &[String]) -> Result<BTreeMap<String, Tags>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT d.device_id, t.key, t.value FROM device_tags t
                 JOIN devices d ON d.id = t.device WHERE d.device_id = ANY($1)",
                &[&device_ids],
            )
            .await?;
        let mut out: BTreeMap<String, Tags> = BTreeMap::new();
        for r in rows {
            out.entry(r.try_get(0)?)
                .or_default()
                .insert(r.try_get(1)?, r.try_get(2)?);
        }
        Ok(out)
    }

    async fn select_devices(
        &self,
        selector: &Tags,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceInfo>, StoreError> {
        let client = self.client().await?;
        let (filter, args) = selector_sql(selector);
        let sql = format!(
            "{} ORDER BY d.device_id LIMIT {}",
            device_query(&filter),
            limit
        );
        let after = after.unwrap_or_default();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&after];
        params.extend(args.iter().map(|a| a as &(dyn ToSql + Sync)));
        client
            .query(sql.as_str(), &params)
            .await?
            .iter()
            .map(device_row)
            .collect()
    }

    async fn create_job(&self, job: NewJob) -> Result<JobRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let id = create(&tx, &job, crate::clock::now_ms()).await?;
        let rec = load_job(&tx, id).await?;
        tx.commit().await?;
        rec.ok_or_else(|| StoreError::Job("the new job vanished".into()))
    }

    async fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        let client = self.client().await?;
        load_job(&client, id).await
    }

    async fn jobs(&self, before: Option<u64>, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        let client = self.client().await?;
        let ids = client
            .query(
                "SELECT id FROM jobs WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before.map_or(i64::MAX, clamp), &i64::from(limit)],
            )
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for r in ids {
            out.extend(load_job(&client, u(r.try_get(0)?)).await?);
        }
        Ok(out)
    }

    async fn job_devices(
        &self,
        id: u64,
        state: Option<DeviceState>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<JobDevice>, StoreError> {
        let client = self.client().await?;
        let pos: i64 = match &after {
            None => -1,
            Some(a) => client
                .query_opt(
                    "SELECT jd.pos FROM job_devices jd JOIN devices d ON d.id = jd.device
                     WHERE jd.job = $1 AND d.device_id = $2",
                    &[&i(id), a],
                )
                .await?
                .map(|r| r.try_get(0))
                .transpose()?
                .unwrap_or(i64::MAX),
        };
        let state = state.map(DeviceState::as_str);
        client
            .query(
                &format!(
                    "SELECT {JOB_DEVICE_COLS} FROM job_devices jd JOIN devices d ON d.id = jd.device
                     WHERE jd.job = $1 AND jd.pos > $2 AND ($3::text IS NULL OR jd.state = $3)
                     ORDER BY jd.pos LIMIT $4"
                ),
                &[&i(id), &pos, &state, &i64::from(limit)],
            )
            .await?
            .iter()
            .map(device_of)
            .collect()
    }

    async fn cancel_job(&self, id: u64, now_ms: u64) -> Result<Option<JobRecord>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = $1 FOR UPDATE"),
                &[&i(id)],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let job = job_row(&row)?;
        if job.status == JobStatus::Running {
            let mut changed = Vec::new();
            stop(
                &tx,
                &job,
                JobStatus::Cancelled,
                "cancelled by an operator",
                now_ms,
                &mut changed,
            )
            .await?;
            let c = counts(&tx, id).await?;
            tx.execute(
                "UPDATE jobs SET active = $2, updated_ms = $3 WHERE id = $1",
                &[&i(id), &(c.in_progress > 0), &clamp(now_ms)],
            )
            .await?;
        }
        let job = load_job(&tx, id).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn active_jobs(&self) -> Result<Vec<u64>, StoreError> {
        let client = self.client().await?;
        client
            .query("SELECT id FROM jobs WHERE active ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| Ok(u(r.try_get(0)?)))
            .collect()
    }

    async fn tick_job(
        &self,
        id: u64,
        now_ms: u64,
        limits: StateLimits,
        scope: TickScope,
    ) -> Result<Option<JobTick>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some((job, status_changed, started, changed, more)) =
            tick(&tx, id, now_ms, limits, scope).await?
        else {
            return Ok(None);
        };
        let keys: Vec<i64> = started.clone();
        let names: BTreeMap<i64, String> = tx
            .query(
                "SELECT id, device_id FROM devices WHERE id = ANY($1)",
                &[&keys],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, StoreError>>()?;
        let changed_keys: Vec<i64> = changed.iter().map(|c| c.0).collect();
        let changed_devices = tx
            .query(
                &format!(
                    "SELECT {JOB_DEVICE_COLS} FROM job_devices jd JOIN devices d ON d.id = jd.device
                     WHERE jd.job = $1 AND jd.device = ANY($2)"
                ),
                &[&i(id), &changed_keys],
            )
            .await?
            .iter()
            .map(device_of)
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
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
    }
}

/// Bytes of one stored piece of an image (`firmware_blobs` rows).
const BLOB_PIECE: usize = 1 << 20;

const FIRMWARE_COLS: &str = "id, name, version, model, size, signature, created_ms, created_by";

fn firmware_row(r: &Row) -> Result<FirmwareRecord, StoreError> {
    Ok(FirmwareRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        version: r.try_get(2)?,
        model: r.try_get(3)?,
        size: u(r.try_get(4)?),
        signature: r.try_get(5)?,
        created_ms: u(r.try_get(6)?),
        created_by: r.try_get(7)?,
    })
}

#[async_trait]
impl FirmwareStore for PostgresStore {
    async fn put_firmware(
        &self,
        record: FirmwareRecord,
        staged: std::path::PathBuf,
    ) -> Result<FirmwareRecord, StoreError> {
        let result = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO firmware ({FIRMWARE_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (id) DO NOTHING"
                    ),
                    &[
                        &record.id,
                        &record.name,
                        &record.version,
                        &record.model,
                        &clamp(record.size),
                        &record.signature,
                        &clamp(record.created_ms),
                        &record.created_by,
                    ],
                )
                .await?;
            if inserted == 0 {
                return Err(StoreError::FirmwareExists(record.id.clone()));
            }
            // Piece by piece: never the whole image in memory at once.
            let mut file = tokio::fs::File::open(&staged).await.map_err(|source| StoreError::Io {
                path: staged.clone(),
                source,
            })?;
            let stmt = tx
                .prepare_cached("INSERT INTO firmware_blobs (id, piece, data) VALUES ($1, $2, $3)")
                .await?;
            let mut piece: i32 = 0;
            loop {
                // A whole piece (a short read is not the end), or the rest.
                let mut buf = Vec::with_capacity(BLOB_PIECE);
                tokio::io::AsyncReadExt::read_to_end(
                    &mut tokio::io::AsyncReadExt::take(&mut file, BLOB_PIECE as u64),
                    &mut buf,
                )
                .await
                .map_err(|source| StoreError::Io {
                    path: staged.clone(),
                    source,
                })?;
                if buf.is_empty() {
                    break;
                }
                tx.execute(&stmt, &[&record.id, &piece, &buf]).await?;
                piece += 1;
            }
            tx.commit().await?;
            Ok(record)
        }
        .await;
        let _ = tokio::fs::remove_file(&staged).await;
        result
    }

    async fn firmware(&self, id: &str) -> Result<Option<FirmwareRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {FIRMWARE_COLS} FROM firmware WHERE id = $1"),
                &[&id],
            )
            .await?;
        row.as_ref().map(firmware_row).transpose()
    }

    async fn list_firmware(&self) -> Result<Vec<FirmwareRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {FIRMWARE_COLS} FROM firmware ORDER BY created_ms DESC, id"),
                &[],
            )
            .await?;
        rows.iter().map(firmware_row).collect()
    }

    async fn delete_firmware(&self, id: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Serialises with job creation, which reads the image FOR SHARE.
        let exists = tx
            .query_opt("SELECT 1 FROM firmware WHERE id = $1 FOR UPDATE", &[&id])
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        let used = tx
            .query_opt(
                "SELECT 1 FROM jobs WHERE op_kind = 'firmware' AND op_name = $1 AND active LIMIT 1",
                &[&id],
            )
            .await?
            .is_some();
        if used {
            return Err(StoreError::FirmwareInUse(id.to_owned()));
        }
        tx.execute("DELETE FROM firmware_blobs WHERE id = $1", &[&id])
            .await?;
        tx.execute("DELETE FROM firmware WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn firmware_bytes(&self, id: &str) -> Result<Option<bytes::Bytes>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT data FROM firmware_blobs WHERE id = $1 ORDER BY piece",
                &[&id],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut out = bytes::BytesMut::new();
        for r in rows {
            let piece: &[u8] = r.try_get(0)?;
            out.extend_from_slice(piece);
        }
        Ok(Some(out.freeze()))
    }

    async fn firmware_assignment(
        &self,
        device: crate::store::DeviceKey,
    ) -> Result<Option<Assignment>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT j.id, j.op_name, j.op_payload FROM job_devices jd
                 JOIN jobs j ON j.id = jd.job
                 WHERE jd.device = $1 AND jd.state = 'in_progress'
                   AND j.op_kind = 'firmware' AND j.status = 'running'
                 ORDER BY j.id DESC LIMIT 1",
            )
            .await?;
        let Some(r) = client.query_opt(&stmt, &[&device]).await? else {
            return Ok(None);
        };
        let (job, image, payload): (i64, String, Vec<u8>) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        let p: jobs::FirmwareParams = serde_json::from_slice(&payload).unwrap_or_default();
        Ok(Some(Assignment {
            job: u(job),
            image,
            version: p.version,
            max_downloads: p.max_downloads,
        }))
    }
}
