//! The PostgreSQL backend, for several gateway instances sharing one
//! database (`--database postgres://...`).
//!
//! Telemetry lives in a table partitioned by arrival time
//! (`received_ms`), one partition per `storage.chunk_span`, so retention
//! drops whole partitions (`telemetry.rs`). Each partition is indexed by
//! `(device, seq)` and `(device, timestamp_ms)` for reads by seq range and
//! by time range. No unique key spans the partitions: a
//! `(device, seq)` is stored at most once because every batch first locks
//! its devices' rows and skips readings at or below each device's stored
//! watermark (`devices.stored_seq`), which it raises in the same
//! transaction. u64 seqs are stored as the same 64 bits in a `bigint`.
//!
//! Connections come from a deadpool pool; one that broke while the
//! database was away is dropped on its next use and replaced, so the
//! writer's retries reconnect by themselves when the database returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::Row;

use super::prelude::*;
use super::sql::{CommandColumns, COMMAND_COLS};
use super::{
    ApiToken, AuditEntry, CommandOutcome, CommandRecord, CommandState, DeviceAuth, DeviceCounts,
    DeviceInfo, DeviceKey, NewAudit, NewCommand, Role, StoreError,
};
use crate::clock::now_ms;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::backend("postgres", e)
    }
}

/// Schema migrations, applied in order in one transaction each, under an
/// advisory lock so that instances starting together migrate once.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE devices (
    id           bigserial PRIMARY KEY,
    -- byte order, as SQLite compares: listings page the same way on both
    device_id    text COLLATE "C" NOT NULL UNIQUE,
    token_hash   bytea  NOT NULL,
    created_ms   bigint NOT NULL,
    revoked_ms   bigint,
    -- highest rejected seq (u64 bits): rejected seqs stay taken
    rejected_seq bigint NOT NULL DEFAULT 0
);
CREATE TABLE telemetry (
    device       bigint   NOT NULL,
    seq          bigint   NOT NULL,
    timestamp_ms bigint   NOT NULL,
    received_ms  bigint   NOT NULL,
    content_type smallint NOT NULL,
    payload      bytea    NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE commands (
    id                  bigserial PRIMARY KEY,
    device              bigint   NOT NULL REFERENCES devices(id),
    name                text     NOT NULL,
    content_type        smallint NOT NULL,
    payload             bytea    NOT NULL,
    status              text     NOT NULL,
    created_ms          bigint   NOT NULL,
    expires_ms          bigint   NOT NULL,
    updated_ms          bigint   NOT NULL,
    result_status       smallint,
    result_content_type smallint,
    result_payload      bytea
);
CREATE INDEX commands_by_device ON commands (device, status);
CREATE INDEX commands_open ON commands (status, expires_ms);
CREATE TABLE revocations (
    id        bigserial PRIMARY KEY,
    device_id text   NOT NULL,
    at_ms     bigint NOT NULL
);
-- Cluster coordination (cluster/postgres.rs): live instances and which
-- one holds each connected device.
CREATE TABLE instances (
    instance_id  text   PRIMARY KEY,
    started_ms   bigint NOT NULL,
    heartbeat_ms bigint NOT NULL
);
CREATE TABLE sessions (
    device       bigint PRIMARY KEY REFERENCES devices(id),
    instance_id  text   NOT NULL,
    generation   bigint NOT NULL,
    peer         text   NOT NULL,
    connected_ms bigint NOT NULL
);
CREATE INDEX sessions_by_instance ON sessions (instance_id);
CREATE SEQUENCE session_generation;
"#,
    MIGRATE_V2,
    // Token rotation: the token before the last rotation, accepted until
    // prev_token_until_ms or until the device first uses the new one.
    "ALTER TABLE devices ADD COLUMN prev_token_hash bytea, ADD COLUMN prev_token_until_ms bigint;",
    // Operator API tokens with roles, and the audit log of changes.
    r#"
CREATE TABLE api_tokens (
    id         bigserial PRIMARY KEY,
    name       text COLLATE "C" NOT NULL UNIQUE,
    role       text   NOT NULL,
    token_hash bytea  NOT NULL UNIQUE,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE TABLE audit (
    id     bigserial PRIMARY KEY,
    at_ms  bigint NOT NULL,
    actor  text   NOT NULL,
    source text   NOT NULL,
    action text   NOT NULL,
    target text   NOT NULL,
    detail text   NOT NULL
);
CREATE INDEX audit_by_time ON audit (at_ms);
"#,
    // Device state (devices::state): documents as compact JSON text, their
    // versions and per-member change times; reported_seq is the last
    // REPORT applied. A device without a row has empty documents at
    // version 0. Then the history of reports, and device tags.
    r#"
CREATE TABLE device_state (
    device              bigint PRIMARY KEY REFERENCES devices(id),
    desired             text   NOT NULL DEFAULT '{}',
    desired_version     bigint NOT NULL DEFAULT 0,
    desired_fields      text   NOT NULL DEFAULT '{}',
    desired_updated_ms  bigint NOT NULL DEFAULT 0,
    desired_acked       bigint NOT NULL DEFAULT 0,
    reported            text   NOT NULL DEFAULT '{}',
    reported_version    bigint NOT NULL DEFAULT 0,
    reported_fields     text   NOT NULL DEFAULT '{}',
    reported_updated_ms bigint NOT NULL DEFAULT 0,
    reported_seq        bigint NOT NULL DEFAULT 0
);
CREATE TABLE state_history (
    id          bigserial PRIMARY KEY,
    device      bigint NOT NULL,
    seq         bigint NOT NULL,
    version     bigint NOT NULL,
    at_ms       bigint NOT NULL,
    received_ms bigint NOT NULL,
    patch       text   NOT NULL
);
CREATE INDEX state_history_by_device ON state_history (device, id);
CREATE INDEX state_history_by_time ON state_history (received_ms);
CREATE TABLE device_tags (
    device bigint NOT NULL REFERENCES devices(id),
    key    text COLLATE "C" NOT NULL,
    value  text COLLATE "C" NOT NULL,
    PRIMARY KEY (device, key)
);
CREATE INDEX device_tags_by_value ON device_tags (key, value, device);
"#,
    // Fleet jobs (jobs/): one operation rolled out over fixed devices.
    r#"
CREATE TABLE jobs (
    id                  bigserial PRIMARY KEY,
    status              text    NOT NULL,
    active              boolean NOT NULL,
    target              text    NOT NULL,
    op_kind             text    NOT NULL,
    op_name             text    NOT NULL,
    op_content_type     smallint NOT NULL,
    op_payload          bytea   NOT NULL,
    rate_per_min        bigint  NOT NULL,
    abort_failed_pct    double precision,
    abort_min_completed bigint,
    device_timeout_ms   bigint  NOT NULL,
    deadline_ms         bigint  NOT NULL,
    created_by          text    NOT NULL,
    created_ms          bigint  NOT NULL,
    updated_ms          bigint  NOT NULL,
    finished_ms         bigint,
    reason              text,
    started             bigint  NOT NULL DEFAULT 0
);
CREATE INDEX jobs_active ON jobs (active);
CREATE TABLE job_devices (
    job             bigint NOT NULL REFERENCES jobs(id),
    device          bigint NOT NULL REFERENCES devices(id),
    pos             bigint NOT NULL,
    state           text   NOT NULL,
    started_ms      bigint,
    finished_ms     bigint,
    command_id      bigint,
    desired_version bigint,
    PRIMARY KEY (job, device)
);
CREATE INDEX job_devices_by_state ON job_devices (job, state, pos);
"#,
    r#"
-- Firmware images (firmware/): in the database, so that every instance
-- can serve every image; the bytes in pieces of 1 MiB.
CREATE TABLE firmware (
    id          text   PRIMARY KEY,
    name        text   NOT NULL,
    version     text   NOT NULL,
    model       text   NOT NULL,
    size        bigint NOT NULL,
    signature   text   NOT NULL,
    created_ms  bigint NOT NULL,
    created_by  text   NOT NULL
);
CREATE TABLE firmware_blobs (
    id     text  NOT NULL REFERENCES firmware(id),
    piece  int   NOT NULL,
    data   bytea NOT NULL,
    PRIMARY KEY (id, piece)
);
-- A session's look for its device's firmware job.
CREATE INDEX job_devices_by_device ON job_devices (device, state);
"#,
    // The device's reported version when its firmware job last looked at
    // it: a tick looks again only at devices that reported since.
    "ALTER TABLE job_devices ADD COLUMN reported_seen bigint NOT NULL DEFAULT 0;",
    // The watermark a batch's UPDATE found (set in the same statement that
    // raises it, and returned): the batch reads and raises its devices'
    // watermarks in one statement instead of a `SELECT ... FOR UPDATE`
    // and an `UPDATE` (PostgreSQL 15's RETURNING shows new values only).
    "ALTER TABLE devices ADD COLUMN prev_seq bigint NOT NULL DEFAULT 0;",
];

pub(crate) mod batch;
mod jobs;
mod state;
mod telemetry;
pub mod tls;
pub(crate) use telemetry::seqs_of;
use telemetry::Chunks;
pub use telemetry::{Dropped, COPY_COLUMNS, COPY_TYPES};

/// 0.2: telemetry partitioned by arrival time, so that retention drops
/// whole partitions; duplicates refused by each device's stored watermark
/// (kept on its row with the time of that reading), not by a unique key
/// over all rows. A 0.1 table becomes the first partition, bounded below
/// by nothing and above by its newest reading (attaching it scans it once
/// and builds its two indexes).
const MIGRATE_V2: &str = r#"
ALTER TABLE devices
    ADD COLUMN stored_seq   bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_seen_ms bigint;
UPDATE devices d SET stored_seq = l.seq, last_seen_ms = t.received_ms
FROM (SELECT device, COALESCE(max(seq) FILTER (WHERE seq < 0), max(seq)) AS seq
      FROM telemetry GROUP BY device) l
JOIN telemetry t ON t.device = l.device AND t.seq = l.seq
WHERE d.id = l.device;
ALTER TABLE telemetry RENAME TO telemetry_v1;
ALTER INDEX telemetry_pkey RENAME TO telemetry_v1_pkey;
CREATE TABLE telemetry (
    device       bigint   NOT NULL,
    seq          bigint   NOT NULL,
    timestamp_ms bigint   NOT NULL,
    received_ms  bigint   NOT NULL,
    content_type smallint NOT NULL,
    payload      bytea    NOT NULL
) PARTITION BY RANGE (received_ms);
CREATE INDEX telemetry_by_seq ON telemetry (device, seq);
CREATE INDEX telemetry_by_time ON telemetry (device, timestamp_ms);
-- One row per partition: its table and its received_ms bounds [from, to).
CREATE TABLE telemetry_chunks (
    name    text   PRIMARY KEY,
    from_ms bigint NOT NULL,
    to_ms   bigint NOT NULL
);
DO $$
DECLARE hi bigint;
BEGIN
    SELECT max(received_ms) + 1 INTO hi FROM telemetry_v1;
    IF hi IS NULL THEN
        DROP TABLE telemetry_v1;
    ELSE
        EXECUTE format('ALTER TABLE telemetry ATTACH PARTITION telemetry_v1 '
                       'FOR VALUES FROM (MINVALUE) TO (%s)', hi);
        INSERT INTO telemetry_chunks VALUES ('telemetry_v1', -9223372036854775808, hi);
    END IF;
END $$;
"#;

/// Any fixed number: the advisory lock migrations take.
const MIGRATION_LOCK: i64 = 0x6675_7272_6f77; // "furrow"

/// Options for the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections in the pool.
    pub pool_size: usize,
    /// How long a call waits to connect (or for a free connection) before
    /// it fails, so that an outage is noticed and retried, not waited out.
    pub connect_timeout: Duration,
    /// The connections' application_name (the cluster names each
    /// instance's connections `furrow/INSTANCE`, and reads liveness from
    /// them); a URL's own setting wins.
    pub application_name: String,
    /// Arrival-time span of one telemetry partition.
    pub chunk_span_ms: u64,
    /// Partitions wholly older than this are dropped (0: never).
    pub retention_ms: u64,
    /// Oldest partitions are dropped while telemetry takes more (0: no cap).
    pub max_bytes: u64,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            connect_timeout: Duration::from_secs(3),
            application_name: "furrow".to_owned(),
            chunk_span_ms: 86_400_000,
            retention_ms: 0,
            max_bytes: 0,
        }
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The group-commit writer's own connection. On the shared pool, a
    /// burst of handshakes (a lookup and a claim each) queued the commits
    /// behind them: 36,000 devices reconnecting held every ACK back for
    /// the whole burst.
    writer: Pool,
    /// HELLO's device lookups, batched ([`batch`]).
    lookups: batch::Batcher<String, Option<DeviceAuth>>,
    config: tokio_postgres::Config,
    /// TLS as the URL's `sslmode` says ([`tls`]).
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    opts: Arc<PostgresOptions>,
    /// The telemetry partitions this instance knows of (see [`Chunks`]).
    chunks: Arc<Mutex<Chunks>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PostgresStore")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish()
    }
}

/// A pool failure as a store error (the database's own error when there
/// is one).
pub(crate) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => StoreError::from(e),
        other => StoreError::Pool(other.to_string()),
    }
}

/// u64 bits as PostgreSQL's bigint, and back.
fn i(v: u64) -> i64 {
    v as i64
}

/// A bound that must stay a non-negative bigint (limits, times).
fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Columns of a command row joined with its device, in [`command_row`]'s order.
fn command_row(r: &Row) -> Result<CommandRecord, StoreError> {
    let small = |i: usize| -> Result<Option<i64>, StoreError> {
        Ok(r.try_get::<_, Option<i16>>(i)?.map(i64::from))
    };
    Ok(CommandColumns {
        id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        name: r.try_get(2)?,
        content_type: small(3)?.unwrap_or(0),
        payload: r.try_get(4)?,
        status: r.try_get(5)?,
        created_ms: r.try_get(6)?,
        expires_ms: r.try_get(7)?,
        updated_ms: r.try_get(8)?,
        result_status: small(9)?,
        result_content_type: small(10)?,
        result_payload: r.try_get(11)?,
    }
    .record())
}

fn device_row(r: &Row) -> Result<DeviceInfo, StoreError> {
    Ok(DeviceInfo {
        device_id: r.try_get(0)?,
        created_ms: r.try_get::<_, i64>(1)? as u64,
        revoked_ms: r.try_get::<_, Option<i64>>(2)?.map(|v| v as u64),
        last_seq: r.try_get::<_, Option<i64>>(3)?.map_or(0, |v| v as u64),
        last_seen_ms: r.try_get::<_, Option<i64>>(4)?.map(|v| v as u64),
    })
}

/// A device with its stored watermark and when that reading arrived (both
/// kept on the device's row, so they survive retention).
fn device_query(filter: &str) -> String {
    format!(
        "SELECT d.device_id, d.created_ms, d.revoked_ms, d.stored_seq, d.last_seen_ms
         FROM devices d
         {filter}"
    )
}

impl PostgresStore {
    /// Connects to `url` (a libpq-style URL or key=value string) and
    /// migrates the schema. Fails if the database cannot be reached.
    pub async fn connect(url: &str, opts: PostgresOptions) -> Result<Self, StoreError> {
        let tls::Connect {
            mut config,
            tls,
            mode,
        } = tls::connect_settings(url)?;
        tracing::debug!(sslmode = ?mode, "PostgreSQL connection settings");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(opts.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name(&opts.application_name);
        }
        let build = |config: &tokio_postgres::Config, size: usize| {
            let mgr = Manager::from_config(
                config.clone(),
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(mgr)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(opts.connect_timeout))
                .create_timeout(Some(opts.connect_timeout))
                .recycle_timeout(Some(opts.connect_timeout))
                .build()
                .map_err(|e| StoreError::Config(e.to_string()))
        };
        // The writer commits one batch at a time: one connection. Its
        // watermark UPDATE locks the batch's device rows in the order it
        // joins them; without hash joins that is key order (an index
        // nested loop over the sorted keys, or a merge join on the primary
        // key), so two instances' writers never deadlock over devices.
        // (Were one ever to, PostgreSQL would abort a batch and the writer
        // retry it: the watermarks keep that exactly once.)
        let mut writer_config = config.clone();
        let options = match config.get_options() {
            Some(o) => format!("{o} -c enable_hashjoin=off"),
            None => "-c enable_hashjoin=off".to_string(),
        };
        writer_config.options(&options);
        let (pool, writer) = (
            build(&config, opts.pool_size.max(1))?,
            build(&writer_config, 1)?,
        );
        let lookups = {
            let pool = pool.clone();
            batch::Batcher::start(2, move |ids| lookup_batch(pool.clone(), ids))
        };
        let store = Self {
            pool,
            writer,
            lookups,
            config,
            tls,
            opts: Arc::new(opts),
            chunks: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection settings (for the cluster's LISTEN connection).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The TLS connector `sslmode` asks for (for the same).
    pub fn tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        self.tls.clone()
    }

    /// The pool (for the cluster's queries).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// The writer's connection (telemetry appends and their partitions).
    async fn writer_client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.writer.get().await.map_err(pool_err)
    }

    /// Applies pending migrations; refuses a schema newer than this build.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS furrow_schema (version integer NOT NULL)")
            .await?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM furrow_schema", &[])
            .await?
        {
            Some(r) => r.try_get(0)?,
            None => {
                tx.execute("INSERT INTO furrow_schema (version) VALUES (0)", &[])
                    .await?;
                0
            }
        };
        let supported = MIGRATIONS.len() as i64;
        if i64::from(version) > supported {
            return Err(StoreError::SchemaTooNew {
                found: i64::from(version),
                supported,
            });
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).await?;
            let v = n as i32 + 1;
            tx.execute("UPDATE furrow_schema SET version = $1", &[&v])
                .await?;
            tracing::info!(version = v, "applied PostgreSQL schema migration");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn commands_by_ids(
        client: &impl deadpool_postgres::GenericClient,
        ids: &[i64],
    ) -> Result<Vec<CommandRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {COMMAND_COLS} FROM commands c JOIN devices d ON d.id = c.device
             WHERE c.id = ANY($1) ORDER BY c.id"
        );
        let stmt = client.prepare_cached(&sql).await?;
        client
            .query(&stmt, &[&ids])
            .await?
            .iter()
            .map(command_row)
            .collect()
    }
}

/// HELLO's lookups of a batch of devices, in one statement: each id's
/// key, token hash and revocation, `None` for an unknown id.
async fn lookup_batch(pool: Pool, ids: Vec<String>) -> Result<Vec<Option<DeviceAuth>>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let stmt = client
        .prepare_cached(
            "SELECT id, device_id, token_hash, revoked_ms, prev_token_hash, prev_token_until_ms
             FROM devices WHERE device_id = ANY($1)",
        )
        .await?;
    let mut found = HashMap::with_capacity(ids.len());
    for row in client.query(&stmt, &[&ids]).await? {
        let hash: Vec<u8> = row.try_get(2)?;
        // A hash of the wrong size cannot match any token.
        let Ok(token_hash) = <[u8; 32]>::try_from(hash) else {
            continue;
        };
        let device_id: String = row.try_get(1)?;
        let auth = DeviceAuth {
            key: row.try_get(0)?,
            token_hash,
            revoked: row.try_get::<_, Option<i64>>(3)?.is_some(),
            previous: crate::store::previous_token(row.try_get(4)?, row.try_get(5)?),
        };
        found.insert(device_id, auth);
    }
    Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
}

/// Several devices' queued and delivered commands, oldest first, in one
/// statement on `client` (the cluster's claims read them in the claims'
/// round trip). A device without any has no entry.
pub(crate) async fn open_commands_of(
    client: &deadpool_postgres::Client,
    devices: &[DeviceKey],
) -> Result<HashMap<DeviceKey, Vec<CommandRecord>>, StoreError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {COMMAND_COLS}, c.device FROM commands c JOIN devices d ON d.id = c.device
             WHERE c.device = ANY($1) AND c.status IN ('queued', 'delivered')
               AND c.expires_ms > $2 ORDER BY c.id"
        ))
        .await?;
    let mut out: HashMap<DeviceKey, Vec<CommandRecord>> = HashMap::new();
    for r in client.query(&stmt, &[&devices, &clamp(now_ms())]).await? {
        // The device's key follows the command's columns.
        let device: DeviceKey = r.try_get(12)?;
        out.entry(device).or_default().push(command_row(&r)?);
    }
    Ok(out)
}

#[async_trait]
impl DeviceStore for PostgresStore {
    async fn device_auth(&self, device_id: &str) -> Result<Option<DeviceAuth>, StoreError> {
        self.lookups.call(device_id.to_owned()).await
    }

    async fn create_device(&self, device_id: &str, token_hash: [u8; 32]) -> Result<(), StoreError> {
        let client = self.client().await?;
        let res = client
            .execute(
                "INSERT INTO devices (device_id, token_hash, created_ms) VALUES ($1, $2, $3)",
                &[&device_id, &&token_hash[..], &clamp(now_ms())],
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::DeviceExists(device_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT COUNT(*), COUNT(revoked_ms) FROM devices", &[])
            .await?;
        Ok(DeviceCounts {
            total: row.try_get::<_, i64>(0)?.max(0) as u64,
            revoked: row.try_get::<_, i64>(1)?.max(0) as u64,
        })
    }

    async fn list_devices(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceInfo>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&device_query(
                "WHERE d.device_id > $1 ORDER BY d.device_id LIMIT $2",
            ))
            .await?;
        client
            .query(&stmt, &[&after.unwrap_or_default(), &i64::from(limit)])
            .await?
            .iter()
            .map(device_row)
            .collect()
    }

    async fn device(&self, device_id: &str) -> Result<Option<DeviceInfo>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&device_query("WHERE d.device_id = $1"))
            .await?;
        client
            .query_opt(&stmt, &[&device_id])
            .await?
            .as_ref()
            .map(device_row)
            .transpose()
    }

    async fn rotate_token(
        &self,
        device_id: &str,
        token_hash: [u8; 32],
        previous_until_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        let until = previous_until_ms.map(clamp);
        // The right-hand sides read the row as it was: the old token
        // becomes the previous one.
        let n = client
            .execute(
                "UPDATE devices SET
                     prev_token_hash = CASE WHEN $3::bigint IS NULL THEN NULL ELSE token_hash END,
                     prev_token_until_ms = $3,
                     token_hash = $2
                 WHERE device_id = $1",
                &[&device_id, &&token_hash[..], &until],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::NoSuchDevice(device_id.to_owned()));
        }
        Ok(())
    }

    async fn forget_previous_token(
        &self,
        key: DeviceKey,
        token_hash: [u8; 32],
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let n = tx
            .execute(
                "UPDATE devices SET prev_token_hash = NULL, prev_token_until_ms = NULL
                 WHERE id = $1 AND token_hash = $2 AND prev_token_hash IS NOT NULL",
                &[&key, &&token_hash[..]],
            )
            .await?;
        if n > 0 {
            tx.execute(
                "UPDATE commands SET payload = '{}'::bytea,
                     status = CASE WHEN status IN ('queued', 'delivered') THEN 'cancelled' ELSE status END,
                     updated_ms = CASE WHEN status IN ('queued', 'delivered') THEN $2 ELSE updated_ms END
                 WHERE device = $1 AND name = 'furrow.token'",
                &[&key, &clamp(now_ms())],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revoke_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now = clamp(now_ms());
        // The row lock orders this against create_command: no command is
        // queued for a device after its revocation.
        let revoked = tx
            .query_opt(
                "SELECT revoked_ms FROM devices WHERE device_id = $1 FOR UPDATE",
                &[&device_id],
            )
            .await?;
        let changed = match revoked {
            None => return Err(StoreError::NoSuchDevice(device_id.to_owned())),
            Some(r) if r.try_get::<_, Option<i64>>(0)?.is_some() => false,
            Some(_) => {
                tx.execute(
                    "UPDATE devices SET revoked_ms = $2 WHERE device_id = $1",
                    &[&device_id, &now],
                )
                .await?;
                tx.execute(
                    "INSERT INTO revocations (device_id, at_ms) VALUES ($1, $2)",
                    &[&device_id, &now],
                )
                .await?;
                true
            }
        };
        tx.commit().await?;
        Ok(changed)
    }

    async fn revocations_since(&self, cursor: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT id, device_id FROM revocations WHERE id > $1 ORDER BY id LIMIT 1000",
            )
            .await?;
        client
            .query(&stmt, &[&cursor])
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}

#[async_trait]
impl CommandStore for PostgresStore {
    async fn create_command(
        &self,
        device_id: &str,
        cmd: NewCommand,
    ) -> Result<CommandRecord, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let dev = tx
            .query_opt(
                "SELECT id, revoked_ms FROM devices WHERE device_id = $1 FOR SHARE",
                &[&device_id],
            )
            .await?;
        let key: i64 = match dev {
            None => return Err(StoreError::NoSuchDevice(device_id.to_owned())),
            Some(r) if r.try_get::<_, Option<i64>>(1)?.is_some() => {
                return Err(StoreError::Revoked(device_id.to_owned()))
            }
            Some(r) => r.try_get(0)?,
        };
        let now = clamp(now_ms());
        let row = tx
            .query_one(
                "INSERT INTO commands (device, name, content_type, payload, status,
                    created_ms, expires_ms, updated_ms)
                 VALUES ($1, $2, $3, $4, 'queued', $5, $6, $5) RETURNING id",
                &[
                    &key,
                    &cmd.name,
                    &i16::from(cmd.content_type),
                    &cmd.payload,
                    &now,
                    &clamp(cmd.expires_ms),
                ],
            )
            .await?;
        let id: i64 = row.try_get(0)?;
        let rec = Self::commands_by_ids(&tx, &[id]).await?.pop();
        tx.commit().await?;
        rec.ok_or_else(|| StoreError::Task("the new command vanished".into()))
    }

    async fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        let client = self.client().await?;
        Ok(Self::commands_by_ids(&client, &[clamp(id)]).await?.pop())
    }

    async fn commands_of(
        &self,
        device_id: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let client = self.client().await?;
        let before = before.map_or(i64::MAX, clamp);
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {COMMAND_COLS} FROM commands c JOIN devices d ON d.id = c.device
                 WHERE d.device_id = $1 AND c.id < $2 ORDER BY c.id DESC LIMIT $3"
            ))
            .await?;
        client
            .query(&stmt, &[&device_id, &before, &i64::from(limit)])
            .await?
            .iter()
            .map(command_row)
            .collect()
    }

    async fn open_commands(&self, device: DeviceKey) -> Result<Vec<CommandRecord>, StoreError> {
        let client = self.client().await?;
        let mut open = open_commands_of(&client, &[device]).await?;
        Ok(open.remove(&device).unwrap_or_default())
    }

    async fn mark_delivered(&self, ids: Vec<u64>) -> Result<Vec<CommandRecord>, StoreError> {
        let ids: Vec<i64> = ids.into_iter().map(clamp).collect();
        let client = self.client().await?;
        let changed: Vec<i64> = client
            .query(
                "UPDATE commands SET status = 'delivered', updated_ms = $2
                 WHERE id = ANY($1) AND status = 'queued' RETURNING id",
                &[&ids, &clamp(now_ms())],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        Self::commands_by_ids(&client, &changed).await
    }

    async fn complete_command(
        &self,
        device: DeviceKey,
        id: u64,
        outcome: CommandOutcome,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let client = self.client().await?;
        let state = if outcome.status == 0 {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        let row = client
            .query_opt(
                "UPDATE commands SET status = $3, updated_ms = $4, result_status = $5,
                    result_content_type = $6, result_payload = $7
                 WHERE id = $1 AND device = $2 AND status IN ('queued', 'delivered')
                   AND expires_ms > $4
                 RETURNING id",
                &[
                    &clamp(id),
                    &device,
                    &state.as_str(),
                    &clamp(now_ms()),
                    &i16::from(outcome.status),
                    &i16::from(outcome.content_type),
                    &outcome.payload,
                ],
            )
            .await?;
        match row {
            Some(r) => Ok(Self::commands_by_ids(&client, &[r.try_get(0)?])
                .await?
                .pop()),
            None => Ok(None),
        }
    }

    async fn cancel_open_commands(
        &self,
        device_id: &str,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let client = self.client().await?;
        let ids: Vec<i64> = client
            .query(
                "UPDATE commands c SET status = 'cancelled', updated_ms = $2
                 FROM devices d
                 WHERE d.id = c.device AND d.device_id = $1
                   AND c.status IN ('queued', 'delivered')
                 RETURNING c.id",
                &[&device_id, &clamp(now_ms())],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        Self::commands_by_ids(&client, &ids).await
    }

    async fn expire_commands(&self, now: u64) -> Result<Vec<CommandRecord>, StoreError> {
        let client = self.client().await?;
        // SKIP LOCKED: instances sweeping at once each expire (and announce)
        // a command once.
        let ids: Vec<i64> = client
            .query(
                "UPDATE commands SET status = 'expired', updated_ms = $1
                 WHERE id IN (SELECT id FROM commands
                              WHERE status IN ('queued', 'delivered') AND expires_ms <= $1
                              LIMIT 1000 FOR UPDATE SKIP LOCKED)
                 RETURNING id",
                &[&clamp(now)],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        Self::commands_by_ids(&client, &ids).await
    }
}

#[async_trait]
impl AdminStore for PostgresStore {
    async fn create_api_token(
        &self,
        name: &str,
        role: Role,
        token_hash: [u8; 32],
    ) -> Result<ApiToken, StoreError> {
        let client = self.client().await?;
        let created_ms = now_ms();
        let res = client
            .execute(
                "INSERT INTO api_tokens (name, role, token_hash, created_ms) VALUES ($1, $2, $3, $4)",
                &[&name, &role.as_str(), &&token_hash[..], &clamp(created_ms)],
            )
            .await;
        match res {
            Ok(_) => Ok(ApiToken {
                name: name.to_owned(),
                role,
                created_ms,
                revoked_ms: None,
            }),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::TokenExists(name.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, role, created_ms, revoked_ms FROM api_tokens ORDER BY name",
                &[],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            if let Some(t) = api_token_row(r)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    async fn api_token_by_hash(
        &self,
        token_hash: [u8; 32],
    ) -> Result<Option<ApiToken>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT name, role, created_ms, revoked_ms FROM api_tokens
                 WHERE token_hash = $1 AND revoked_ms IS NULL",
                &[&&token_hash[..]],
            )
            .await?;
        match row {
            Some(r) => api_token_row(&r),
            None => Ok(None),
        }
    }

    async fn revoke_api_token(&self, name: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE api_tokens SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
                &[&name, &clamp(now_ms())],
            )
            .await?;
        if n > 0 {
            return Ok(true);
        }
        let exists = client
            .query_opt("SELECT 1 FROM api_tokens WHERE name = $1", &[&name])
            .await?
            .is_some();
        if exists {
            Ok(false)
        } else {
            Err(StoreError::NoSuchToken(name.to_owned()))
        }
    }

    async fn record_audit(&self, e: NewAudit) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO audit (at_ms, actor, source, action, target, detail)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &clamp(now_ms()),
                    &e.actor,
                    &e.source,
                    &e.action,
                    &e.target,
                    &e.detail,
                ],
            )
            .await?;
        Ok(())
    }

    async fn audit(&self, before: Option<u64>, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let client = self.client().await?;
        let before = before.map_or(i64::MAX, clamp);
        let rows = client
            .query(
                "SELECT id, at_ms, actor, source, action, target, detail FROM audit
                 WHERE id < $1 ORDER BY id DESC LIMIT $2",
                &[&before, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get::<_, i64>(0)? as u64,
                    at_ms: r.try_get::<_, i64>(1)? as u64,
                    actor: r.try_get(2)?,
                    source: r.try_get(3)?,
                    action: r.try_get(4)?,
                    target: r.try_get(5)?,
                    detail: r.try_get(6)?,
                })
            })
            .collect()
    }
}

/// An API token row; `None` for a role this version does not know
/// (written by a newer one): such a token opens nothing.
fn api_token_row(r: &Row) -> Result<Option<ApiToken>, StoreError> {
    let role: String = r.try_get(1)?;
    let Some(role) = Role::parse(&role) else {
        return Ok(None);
    };
    Ok(Some(ApiToken {
        name: r.try_get(0)?,
        role,
        created_ms: r.try_get::<_, i64>(2)? as u64,
        revoked_ms: r.try_get::<_, Option<i64>>(3)?.map(|v| v as u64),
    }))
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.query_one("SELECT 1", &[]).await?;
        Ok(())
    }
}
