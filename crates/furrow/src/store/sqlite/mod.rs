//! The embedded SQLite backend (the default).
//!
//! One writer connection serves the [`writer`](crate::writer)'s group
//! commits (and the seals of the telemetry log between them); a second
//! connection serves reads (HELLO lookups, listings), which WAL lets run
//! beside a commit; a third copies committed WAL frames into the database
//! file (checkpoints), so that commits, which release ACKs, never do it
//! themselves (measured: p50 ACK latency halved at 50,000 msgs/s, flat-out
//! rate +20%). Each connection has its own thread; none runs on an async
//! worker.
//!
//! Telemetry is an append-only log indexed per device after the fact
//! (`telemetry.rs` says why and how). Devices, commands and revocations are
//! ordinary tables.
//!
//! Seqs are u64 on the wire and i64 in SQLite: they are stored as the same
//! 64 bits, and compared as u64 in Rust (or as `telemetry::okey` where
//! SQLite orders them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod jobs;
mod state;
mod telemetry;
pub use super::Synchronous;
pub use telemetry::LogOptions;

use async_trait::async_trait;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::prelude::*;
use super::sql::{CommandColumns, COMMAND_COLS};
use super::DeviceKey as Key;
use super::{
    ApiToken, Appended, AuditEntry, Batch, CommandOutcome, CommandRecord, CommandState, DeviceAuth,
    DeviceCounts, DeviceInfo, DeviceKey, DeviceSeqs, NewAudit, NewCommand, Role, StorageInfo,
    StoreError, StoredTelemetry, TelemetryRange,
};
use crate::clock::now_ms;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::backend("sqlite", e)
    }
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "FULL",
            Self::Normal => "NORMAL",
            Self::Off => "OFF",
        }
    }
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran. Append only: never edit a migration that has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration::Sql(
        r#"
CREATE TABLE devices (
    id          INTEGER PRIMARY KEY,
    device_id   TEXT    NOT NULL UNIQUE,
    token_hash  BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER,
    -- highest rejected seq (u64 bits): rejected seqs stay taken
    rejected_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE telemetry (
    device       INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    received_ms  INTEGER NOT NULL,
    content_type INTEGER NOT NULL,
    payload      BLOB    NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE TABLE commands (
    id            INTEGER PRIMARY KEY,
    device        INTEGER NOT NULL REFERENCES devices(id),
    name          TEXT    NOT NULL,
    content_type  INTEGER NOT NULL,
    payload       BLOB    NOT NULL,
    status        TEXT    NOT NULL,
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER,
    updated_ms    INTEGER NOT NULL,
    result_status       INTEGER,
    result_content_type INTEGER,
    result_payload      BLOB
);
CREATE INDEX commands_by_device ON commands (device, status);
CREATE TABLE revocations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT    NOT NULL,
    at_ms     INTEGER NOT NULL
);
"#,
    ),
    Migration::Sql(
        r#"
-- Open commands by expiry, for the expiry sweep.
CREATE INDEX commands_open ON commands (status, expires_ms);
"#,
    ),
    // Telemetry as an append-only log with per-device postings.
    Migration::Code(telemetry::migrate_v3),
    Migration::Sql(
        r#"
-- Token rotation: the token before the last rotation, accepted until
-- prev_token_until_ms or until the device first uses the new one.
ALTER TABLE devices ADD COLUMN prev_token_hash BLOB;
ALTER TABLE devices ADD COLUMN prev_token_until_ms INTEGER;
"#,
    ),
    Migration::Sql(
        r#"
-- Operator API tokens with roles, and the audit log of changes.
CREATE TABLE api_tokens (
    id         INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    role       TEXT    NOT NULL,
    token_hash BLOB    NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    source TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
CREATE INDEX audit_by_time ON audit (at_ms);
"#,
    ),
    Migration::Sql(
        r#"
-- Device state (devices::state): documents as compact JSON text, their
-- versions and per-member change times; reported_seq is the last REPORT
-- applied. A device without a row has empty documents at version 0.
CREATE TABLE device_state (
    device              INTEGER PRIMARY KEY REFERENCES devices(id),
    desired             TEXT    NOT NULL DEFAULT '{}',
    desired_version     INTEGER NOT NULL DEFAULT 0,
    desired_fields      TEXT    NOT NULL DEFAULT '{}',
    desired_updated_ms  INTEGER NOT NULL DEFAULT 0,
    desired_acked       INTEGER NOT NULL DEFAULT 0,
    reported            TEXT    NOT NULL DEFAULT '{}',
    reported_version    INTEGER NOT NULL DEFAULT 0,
    reported_fields     TEXT    NOT NULL DEFAULT '{}',
    reported_updated_ms INTEGER NOT NULL DEFAULT 0,
    reported_seq        INTEGER NOT NULL DEFAULT 0
);
-- Every applied REPORT, kept as long as telemetry.
CREATE TABLE state_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device      INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    patch       TEXT    NOT NULL
);
CREATE INDEX state_history_by_device ON state_history (device, id);
CREATE INDEX state_history_by_time ON state_history (received_ms);
-- Key/value tags of devices, for selectors (?tag=site:north).
CREATE TABLE device_tags (
    device INTEGER NOT NULL REFERENCES devices(id),
    key    TEXT    NOT NULL,
    value  TEXT    NOT NULL,
    PRIMARY KEY (device, key)
) WITHOUT ROWID;
CREATE INDEX device_tags_by_value ON device_tags (key, value, device);
"#,
    ),
    Migration::Sql(
        r#"
-- Fleet jobs (jobs/): one operation rolled out over fixed devices.
CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY,
    status              TEXT    NOT NULL,
    -- 1 while anything is left to start or to follow
    active              INTEGER NOT NULL,
    target              TEXT    NOT NULL,
    op_kind             TEXT    NOT NULL,
    op_name             TEXT    NOT NULL,
    op_content_type     INTEGER NOT NULL,
    op_payload          BLOB    NOT NULL,
    rate_per_min        INTEGER NOT NULL,
    abort_failed_pct    REAL,
    abort_min_completed INTEGER,
    device_timeout_ms   INTEGER NOT NULL,
    deadline_ms         INTEGER NOT NULL,
    created_by          TEXT    NOT NULL,
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL,
    finished_ms         INTEGER,
    reason              TEXT,
    started             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_active ON jobs (active);
CREATE TABLE job_devices (
    job             INTEGER NOT NULL REFERENCES jobs(id),
    device          INTEGER NOT NULL REFERENCES devices(id),
    -- rollout order
    pos             INTEGER NOT NULL,
    state           TEXT    NOT NULL,
    started_ms      INTEGER,
    finished_ms     INTEGER,
    command_id      INTEGER,
    desired_version INTEGER,
    PRIMARY KEY (job, device)
);
CREATE INDEX job_devices_by_state ON job_devices (job, state, pos);
"#,
    ),
    Migration::Sql(
        r#"
-- Firmware images (firmware/): metadata here, bytes in firmware/<id>.bin
-- beside the database.
CREATE TABLE firmware (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    model       TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    signature   TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    created_by  TEXT    NOT NULL
);
-- A session's look for its device's firmware job.
CREATE INDEX job_devices_by_device ON job_devices (device, state);
"#,
    ),
    // The device's reported version when its firmware job last looked at
    // it: a tick looks again only at devices that reported since.
    Migration::Sql("ALTER TABLE job_devices ADD COLUMN reported_seen INTEGER NOT NULL DEFAULT 0;"),
    // Postings keep only their key: each index put a page of its own per
    // device into every seal (reads by time and retention walk the key;
    // telemetry.rs, "Postings").
    Migration::Sql(
        "DROP INDEX IF EXISTS postings_by_time; DROP INDEX IF EXISTS postings_by_chunk;",
    ),
];

/// Once a device uses its new token, its `furrow.token` commands are moot
/// and hold a secret: open ones are cancelled and every one's payload
/// becomes `{}`. SQLite's spelling (`?1` device key, `?2` now).
const FORGET_TOKEN_COMMANDS: &str = "UPDATE commands SET payload = CAST('{}' AS BLOB),
         status = CASE WHEN status IN ('queued', 'delivered') THEN 'cancelled' ELSE status END,
         updated_ms = CASE WHEN status IN ('queued', 'delivered') THEN ?2 ELSE updated_ms END
     WHERE device = ?1 AND name = 'furrow.token'";

/// One schema step: SQL, or code for what SQL alone cannot do.
enum Migration {
    Sql(&'static str),
    Code(fn(&rusqlite::Transaction<'_>) -> Result<(), StoreError>),
}

/// Options for opening the database.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// How long a connection waits for another process's lock (the CLI
    /// and a running gateway share the file).
    pub busy_timeout: Duration,
    /// The telemetry log.
    pub log: LogOptions,
    /// The SQLite VFS to open the database with (`None`: SQLite's
    /// default). The power-loss test plugs in one that forgets unsynced
    /// writes.
    pub vfs: Option<String>,
    /// Appends wait (fail with [`StoreError::DiskLow`], which the writer
    /// retries) while the database's filesystem has less free space (0:
    /// no floor).
    pub min_free_bytes: u64,
    /// This store ingests telemetry (the gateway): it takes the database's
    /// lock file, so that a second gateway cannot, and seals the log. A
    /// tool beside a running gateway (the CLI, provisioning) opens with
    /// `false` and appends nothing.
    pub ingest: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            log: LogOptions::default(),
            vfs: None,
            min_free_bytes: 0,
            ingest: true,
        }
    }
}

/// The SQLite store. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: DbThread,
    reader: DbThread,
    path: PathBuf,
    /// The telemetry log's memory (tail, marks), shared by both threads.
    log: Arc<telemetry::Shared>,
    log_opts: LogOptions,
    ingest: bool,
    min_free_bytes: u64,
    /// The checkpointer and sealer stop when the last clone of the store is
    /// dropped (the writer thread, which holds the lock file, right after).
    _alive: Arc<()>,
}

/// WAL pages after which a commit checkpoints by itself (about 256 MiB):
/// reached only if the checkpointer falls far behind.
const WAL_SAFETY_PAGES: i64 = 65_536;

/// Bytes the WAL file is cut back to when it starts over.
const WAL_SIZE_LIMIT: i64 = 16 << 20;

/// How soon the checkpointer looks at the WAL again while commits come.
/// Short, so that each checkpoint is small: its fsync of the database file
/// then holds the commits' WAL fsyncs up for less long. Measured side by
/// side against 100 ms (docs/performance.md): at 10,000 devices x 1 msg/s
/// ACK p50 0.72-0.79 ms and 48-50 us of CPU per message against 0.94-1.07
/// ms and 54-56 us; flat out with 100 devices 533-539k msgs/s against
/// 477-496k. Every 2 s was worse on both.
const CHECKPOINT_BUSY_EVERY: Duration = Duration::from_millis(20);

/// ...and when nothing was committed since its last look.
const CHECKPOINT_IDLE_EVERY: Duration = Duration::from_millis(100);

/// Copies committed WAL frames into the database (PASSIVE: never blocks
/// the writer or readers) until `alive` dies. Once a checkpoint has caught
/// up, the writer's next commit starts the WAL over from its beginning, so
/// the file stays small.
fn spawn_checkpointer(conn: Connection, alive: std::sync::Weak<()>) -> Result<(), StoreError> {
    std::thread::Builder::new()
        .name("furrow-db-ckpt".to_owned())
        .spawn(move || {
            let mut failing = false;
            let mut last_done = -1;
            let mut last_version = -1;
            while alive.strong_count() > 0 {
                // data_version changes when another connection commits.
                let r = conn
                    .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
                    .and_then(|version| {
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                            Ok((version, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                        })
                    });
                match r {
                    Ok((version, log, done)) => {
                        failing = false;
                        metrics::gauge!("furrow_sqlite_wal_pages").set(log as f64);
                        // Behind and making progress: go again at once, so
                        // that a busy writer's WAL is caught up (and then
                        // restarted) instead of growing. Caught up, or held
                        // back by a reader: wait.
                        if done < log && done != last_done {
                            last_done = done;
                            continue;
                        }
                        last_done = done;
                        let busy = version != last_version;
                        last_version = version;
                        std::thread::sleep(if busy {
                            CHECKPOINT_BUSY_EVERY
                        } else {
                            CHECKPOINT_IDLE_EVERY
                        });
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                            failing = true;
                        }
                        std::thread::sleep(CHECKPOINT_IDLE_EVERY);
                    }
                }
            }
        })
        .map_err(|e| StoreError::Task(format!("cannot start the checkpoint thread: {e}")))?;
    Ok(())
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A thread that owns one SQLite connection and runs jobs on it in order.
///
/// Dedicated threads rather than Tokio's blocking pool: a burst of
/// thousands of handshakes would otherwise grow the pool to hundreds of
/// threads, all queueing on the same connection, each costing a stack and
/// malloc arena (measured: 226 threads and ~2 KB of RSS per idle device).
/// Two threads bound that, keep each connection's statement cache warm,
/// and keep blocking SQLite calls off the async workers.
#[derive(Clone)]
struct DbThread {
    tx: tokio::sync::mpsc::Sender<Job>,
}

impl DbThread {
    /// `guard` (the database's lock file) is held until the thread ends,
    /// after its connection is closed: nothing it queued can write after a
    /// new owner has taken the lock.
    fn spawn(
        name: &str,
        mut conn: Connection,
        guard: Option<std::fs::File>,
    ) -> Result<Self, StoreError> {
        // Bounded: callers wait (asynchronously) when the thread is behind.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(1024);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    // A panicking job drops its reply sender (the caller gets
                    // an error); the connection and the thread go on.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
                drop(conn);
                drop(guard);
            })
            .map_err(|e| StoreError::Task(format!("cannot start {name} thread: {e}")))?;
        Ok(Self { tx })
    }

    /// Queues a job without waiting for it; false if the queue is full or
    /// the thread is gone.
    fn submit(&self, job: Job) -> bool {
        self.tx.try_send(job).is_ok()
    }

    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(f(conn));
        });
        self.tx
            .send(job)
            .await
            .map_err(|_| StoreError::Task("database thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Task("database call panicked".into()))?
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn open_conn(path: &Path, opts: &SqliteOptions) -> Result<Connection, StoreError> {
    let open_err = |source: rusqlite::Error| StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match &opts.vfs {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    }
    .map_err(open_err)?;
    conn.busy_timeout(opts.busy_timeout).map_err(open_err)?;
    // journal_mode answers with a row, so it is queried, not executed.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
    }
    // journal_size_limit: once a checkpoint has caught up and the WAL
    // starts over, its file is cut back to this size (after a burst, or a
    // full disk, it would otherwise keep its largest size for good).
    conn.execute_batch(&format!(
        "PRAGMA synchronous={}; PRAGMA foreign_keys=ON; PRAGMA journal_size_limit={};",
        opts.synchronous.pragma(),
        WAL_SIZE_LIMIT
    ))
    .map_err(open_err)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Code(f) => f(&tx)?,
        }
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "applied schema migration");
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the database at `path`.
    /// Blocking: call it before the runtime is busy, or on a blocking task.
    pub fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let lock = if opts.ingest {
            Some(take_lock(&path, opts.busy_timeout)?)
        } else {
            None
        };
        let mut writer = open_conn(&path, &opts)?;
        migrate(&mut writer)?;
        let log = Arc::new(std::sync::Mutex::new(telemetry::recover(&writer)?));
        // Checkpoints run on their own thread and connection, not inside
        // the writer's commits (SQLite's default), where they stalled the
        // commits that release ACKs. The writer keeps a far threshold as a
        // safety net should the checkpointer fall behind.
        writer.pragma_update(None, "wal_autocheckpoint", WAL_SAFETY_PAGES)?;
        let reader = open_conn(&path, &opts)?;
        let alive = Arc::new(());
        spawn_checkpointer(open_conn(&path, &opts)?, Arc::downgrade(&alive))?;
        if opts.synchronous != Synchronous::Full {
            tracing::warn!(
                synchronous = opts.synchronous.pragma(),
                "SQLite durability lowered: acknowledged telemetry may be lost on power failure"
            );
        }
        let store = Self {
            writer: DbThread::spawn("furrow-db-write", writer, lock)?,
            reader: DbThread::spawn("furrow-db-read", reader, None)?,
            path,
            log,
            log_opts: opts.log.clone(),
            ingest: opts.ingest,
            min_free_bytes: opts.min_free_bytes,
            _alive: alive,
        };
        if opts.ingest {
            store.spawn_sealer()?;
            let dir = store.firmware_dir();
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })?;
        }
        Ok(store)
    }

    /// Asks the writer for a seal slice every [`SEAL_TICK`] while the
    /// store lives (appends ask too while a seal is due), and reports the
    /// tail's size.
    fn spawn_sealer(&self) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        let (log, opts) = (Arc::clone(&self.log), self.log_opts.clone());
        let alive = Arc::downgrade(&self._alive);
        std::thread::Builder::new()
            .name("furrow-db-seal".to_owned())
            .spawn(move || {
                let mut ticks: u64 = 0;
                while alive.strong_count() > 0 {
                    std::thread::sleep(SEAL_TICK);
                    let unsealed = telemetry::unsealed(&log);
                    metrics::gauge!("furrow_sqlite_unsealed_rows").set(unsealed as f64);
                    writer.submit(seal_job(&log, &opts));
                    if ticks.is_multiple_of(RETENTION_EVERY_TICKS) {
                        writer.submit(retention_job(&opts));
                    }
                    ticks += 1;
                }
            })
            .map_err(|e| StoreError::Task(format!("cannot start the seal thread: {e}")))?;
        Ok(())
    }

    /// Free bytes on the database's filesystem, for unprivileged users.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let st = rustix::fs::statvfs(dir).map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        metrics::gauge!("furrow_storage_free_bytes").set(free as f64);
        Ok(free)
    }

    /// Where firmware images live: `firmware/` beside the database
    /// (created when the store opens).
    pub fn firmware_dir(&self) -> PathBuf {
        self.path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("firmware")
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How often the sealer looks at the telemetry log.
const SEAL_TICK: Duration = Duration::from_millis(100);

/// A job for the writer thread: one slice of a seal, if one is due.
fn seal_job(log: &Arc<telemetry::Shared>, opts: &LogOptions) -> Job {
    let (log, opts) = (Arc::clone(log), opts.clone());
    Box::new(move |conn| {
        if let Err(e) = telemetry::seal_step(conn, &log, &opts, now_ms() as i64) {
            // The rows stay in the tail; the next tick tries again.
            tracing::warn!(error = %e, "sealing the telemetry log failed; retrying");
        }
    })
}

/// Retention is looked at every this many seal ticks (5 s).
const RETENTION_EVERY_TICKS: u64 = 50;

/// A job for the writer thread: drop the chunks retention no longer wants.
fn retention_job(opts: &LogOptions) -> Job {
    let opts = opts.clone();
    Box::new(move |conn| {
        match telemetry::enforce_retention(conn, &opts, now_ms() as i64) {
            Ok(d) => {
                metrics::counter!("furrow_retention_dropped_chunks_total").increment(d.chunks);
                metrics::counter!("furrow_retention_dropped_rows_total").increment(d.rows);
            }
            Err(e) => tracing::warn!(error = %e, "retention failed; retrying"),
        }
        // The audit log is kept as long as telemetry (by age).
        if opts.retention_ms > 0 {
            let cutoff =
                (now_ms() as i64).saturating_sub(opts.retention_ms.min(i64::MAX as u64) as i64);
            if let Err(e) = conn.execute("DELETE FROM audit WHERE at_ms < ?1", [cutoff]) {
                tracing::warn!(error = %e, "audit retention failed; retrying");
            }
            // So is the history of reported state.
            if let Err(e) =
                conn.execute("DELETE FROM state_history WHERE received_ms < ?1", [cutoff])
            {
                tracing::warn!(error = %e, "state history retention failed; retrying");
            }
        }
        if let Ok((chunks, _)) = telemetry::chunk_summary(conn) {
            metrics::gauge!("furrow_storage_chunks").set(chunks as f64);
        }
    })
}

/// Takes `DB.lock` beside the database, exclusively, for as long as the
/// returned file lives: one ingesting gateway per database. Waits up to
/// `wait` for a previous owner in this process to finish closing.
fn take_lock(db: &Path, wait: Duration) -> Result<std::fs::File, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::InUse(db.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(StoreError::Io { path, source })
            }
        }
    }
}

fn command_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommandRecord> {
    Ok(CommandColumns {
        id: r.get(0)?,
        device_id: r.get(1)?,
        name: r.get(2)?,
        content_type: r.get(3)?,
        payload: r.get(4)?,
        status: r.get(5)?,
        created_ms: r.get(6)?,
        expires_ms: r.get(7)?,
        updated_ms: r.get(8)?,
        result_status: r.get(9)?,
        result_content_type: r.get(10)?,
        result_payload: r.get(11)?,
    }
    .record())
}

fn command_by_id(conn: &Connection, id: u64) -> Result<Option<CommandRecord>, StoreError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COMMAND_COLS} FROM commands c JOIN devices d ON d.id = c.device WHERE c.id = ?1"
        ))?
        .query_row([id as i64], command_row)
        .optional()?)
}

/// Moves commands `ids` to `state` at `now`; returns them as they are now.
fn close_commands(
    conn: &Connection,
    ids: &[i64],
    state: CommandState,
    now: i64,
) -> Result<Vec<CommandRecord>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        conn.execute(
            "UPDATE commands SET status = ?3, updated_ms = ?2 WHERE id = ?1",
            params![id, now, state.as_str()],
        )?;
        out.extend(command_by_id(conn, id as u64)?);
    }
    Ok(out)
}

/// A device row with its stored watermark and when that reading arrived.
fn device_info(
    conn: &Connection,
    log: &telemetry::Shared,
    key: Key,
    device_id: String,
    created: i64,
    revoked: Option<i64>,
) -> Result<DeviceInfo, StoreError> {
    let (last_seq, last_seen_ms) = telemetry::stored(conn, log, key)?;
    Ok(DeviceInfo {
        device_id,
        created_ms: created as u64,
        revoked_ms: revoked.map(|v| v as u64),
        last_seq,
        last_seen_ms,
    })
}

#[async_trait]
impl TelemetryStore for SqliteStore {
    async fn append(&self, batch: Arc<Batch>) -> Result<Appended, StoreError> {
        if !self.ingest {
            return Err(StoreError::Config(
                "this store was opened by a tool, not by the gateway: it stores no telemetry"
                    .into(),
            ));
        }
        if self.min_free_bytes > 0 {
            let free = self.free_bytes()?;
            let low = free < self.min_free_bytes;
            metrics::gauge!("furrow_storage_disk_low").set(f64::from(u8::from(low)));
            if low {
                return Err(StoreError::DiskLow {
                    free,
                    floor: self.min_free_bytes,
                });
            }
        }
        let (log, opts) = (Arc::clone(&self.log), self.log_opts.clone());
        let (rotated, appended) = self
            .writer
            .call(move |conn| telemetry::append(conn, &log, &batch, &opts, now_ms() as i64))
            .await?;
        if telemetry::seal_due(&self.log, &self.log_opts, now_ms() as i64) {
            self.writer.submit(seal_job(&self.log, &self.log_opts));
        }
        if rotated {
            self.writer.submit(retention_job(&self.log_opts));
        }
        Ok(appended)
    }

    async fn device_seqs(&self, device: DeviceKey) -> Result<DeviceSeqs, StoreError> {
        let log = Arc::clone(&self.log);
        self.reader
            .call(move |conn| {
                let rejected: i64 = conn
                    .prepare_cached("SELECT rejected_seq FROM devices WHERE id = ?1")?
                    .query_row([device], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                // A REPORT's seq is stored like a reading's.
                let reported = state::reported_seq(conn, device)?;
                Ok(DeviceSeqs {
                    stored: telemetry::stored(conn, &log, device)?.0.max(reported),
                    rejected: rejected as u64,
                })
            })
            .await
    }

    async fn telemetry(
        &self,
        device_id: &str,
        range: TelemetryRange,
        limit: u32,
    ) -> Result<Vec<StoredTelemetry>, StoreError> {
        let id = device_id.to_owned();
        let log = Arc::clone(&self.log);
        self.reader
            .call(move |conn| {
                let key: Option<Key> = conn
                    .prepare_cached("SELECT id FROM devices WHERE device_id = ?1")?
                    .query_row([&id], |r| r.get(0))
                    .optional()?;
                match key {
                    Some(key) => telemetry::read(conn, &log, key, range, limit),
                    None => Ok(Vec::new()),
                }
            })
            .await
    }

    async fn storage_info(&self) -> Result<StorageInfo, StoreError> {
        let opts = self.log_opts.clone();
        let unsealed = telemetry::unsealed(&self.log) as u64;
        let free = self.free_bytes().ok();
        let min_free = self.min_free_bytes;
        self.reader
            .call(move |conn| {
                let (chunks, oldest) = telemetry::chunk_summary(conn)?;
                Ok(StorageInfo {
                    backend: "sqlite",
                    retention_ms: opts.retention_ms,
                    max_bytes: opts.max_bytes,
                    min_free_bytes: min_free,
                    chunk_span_ms: Some(opts.chunk_span_ms),
                    chunks: Some(chunks),
                    oldest_chunk_opened_ms: oldest,
                    used_bytes: Some(telemetry::used_bytes(conn)?),
                    free_bytes: free,
                    unsealed_rows: Some(unsealed),
                })
            })
            .await
    }
}

#[async_trait]
impl DeviceStore for SqliteStore {
    async fn device_auth(&self, device_id: &str) -> Result<Option<DeviceAuth>, StoreError> {
        let id = device_id.to_owned();
        self.reader
            .call(move |conn| {
                let row = conn
                    .prepare_cached(
                        "SELECT id, token_hash, revoked_ms, prev_token_hash, prev_token_until_ms
                         FROM devices WHERE device_id = ?1",
                    )?
                    .query_row([&id], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                            r.get::<_, Option<Vec<u8>>>(3)?,
                            r.get::<_, Option<i64>>(4)?,
                        ))
                    })
                    .optional()?;
                Ok(row.and_then(|(key, hash, revoked, prev, until)| {
                    // A hash of the wrong size cannot match any token.
                    let token_hash: [u8; 32] = hash.try_into().ok()?;
                    Some(DeviceAuth {
                        key,
                        token_hash,
                        revoked: revoked.is_some(),
                        previous: super::previous_token(prev, until),
                    })
                }))
            })
            .await
    }

    async fn create_device(&self, device_id: &str, token_hash: [u8; 32]) -> Result<(), StoreError> {
        let id = device_id.to_owned();
        self.writer
            .call(move |conn| {
                let res = conn.execute(
                    "INSERT INTO devices (device_id, token_hash, created_ms) VALUES (?1, ?2, ?3)",
                    params![id, &token_hash[..], now_ms() as i64],
                );
                match res {
                    Ok(_) => Ok(()),
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        Err(StoreError::DeviceExists(id))
                    }
                    Err(e) => Err(e.into()),
                }
            })
            .await
    }

    async fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
        self.reader
            .call(|conn| {
                let (total, revoked): (i64, i64) = conn
                    .prepare_cached("SELECT COUNT(*), COUNT(revoked_ms) FROM devices")?
                    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(DeviceCounts {
                    total: total.max(0) as u64,
                    revoked: revoked.max(0) as u64,
                })
            })
            .await
    }

    async fn list_devices(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<DeviceInfo>, StoreError> {
        let log = Arc::clone(&self.log);
        self.reader
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, device_id, created_ms, revoked_ms FROM devices
                 WHERE device_id > ?1 ORDER BY device_id LIMIT ?2",
                )?;
                let rows = stmt
                    .query_map(params![after.unwrap_or_default(), limit], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                rows.into_iter()
                    .map(|(key, device_id, created, revoked)| {
                        device_info(conn, &log, key, device_id, created, revoked)
                    })
                    .collect()
            })
            .await
    }

    async fn device(&self, device_id: &str) -> Result<Option<DeviceInfo>, StoreError> {
        let id = device_id.to_owned();
        let log = Arc::clone(&self.log);
        self.reader
            .call(move |conn| {
                let row = conn
                    .prepare_cached(
                        "SELECT id, device_id, created_ms, revoked_ms FROM devices WHERE device_id = ?1",
                    )?
                    .query_row([&id], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                        ))
                    })
                    .optional()?;
                row.map(|(key, device_id, created, revoked)| {
                    device_info(conn, &log, key, device_id, created, revoked)
                })
                .transpose()
            })
            .await
    }

    async fn rotate_token(
        &self,
        device_id: &str,
        token_hash: [u8; 32],
        previous_until_ms: Option<u64>,
    ) -> Result<(), StoreError> {
        let id = device_id.to_owned();
        let until = previous_until_ms.map(|u| i64::try_from(u).unwrap_or(i64::MAX));
        self.writer
            .call(move |conn| {
                // The right-hand sides read the row as it was: the old
                // token becomes the previous one.
                let n = conn.execute(
                    "UPDATE devices SET
                         prev_token_hash = CASE WHEN ?3 IS NULL THEN NULL ELSE token_hash END,
                         prev_token_until_ms = ?3,
                         token_hash = ?2
                     WHERE device_id = ?1",
                    params![id, &token_hash[..], until],
                )?;
                if n == 0 {
                    return Err(StoreError::NoSuchDevice(id));
                }
                Ok(())
            })
            .await
    }

    async fn forget_previous_token(
        &self,
        key: DeviceKey,
        token_hash: [u8; 32],
    ) -> Result<(), StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let n = tx.execute(
                    "UPDATE devices SET prev_token_hash = NULL, prev_token_until_ms = NULL
                     WHERE id = ?1 AND token_hash = ?2 AND prev_token_hash IS NOT NULL",
                    params![key, &token_hash[..]],
                )?;
                if n > 0 {
                    tx.execute(FORGET_TOKEN_COMMANDS, params![key, now_ms() as i64])?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    async fn revoke_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let id = device_id.to_owned();
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let now = now_ms() as i64;
                let revoked: Option<Option<i64>> = tx
                    .query_row(
                        "SELECT revoked_ms FROM devices WHERE device_id = ?1",
                        [&id],
                        |r| r.get(0),
                    )
                    .optional()?;
                let changed = match revoked {
                    None => return Err(StoreError::NoSuchDevice(id)),
                    Some(Some(_)) => false,
                    Some(None) => {
                        tx.execute(
                            "UPDATE devices SET revoked_ms = ?2 WHERE device_id = ?1",
                            params![id, now],
                        )?;
                        tx.execute(
                            "INSERT INTO revocations (device_id, at_ms) VALUES (?1, ?2)",
                            params![id, now],
                        )?;
                        true
                    }
                };
                tx.commit()?;
                Ok(changed)
            })
            .await
    }

    async fn revocations_since(&self, cursor: i64) -> Result<Vec<(i64, String)>, StoreError> {
        self.reader
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, device_id FROM revocations WHERE id > ?1 ORDER BY id LIMIT 1000",
                )?;
                let rows = stmt
                    .query_map([cursor], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }
}

#[async_trait]
impl CommandStore for SqliteStore {
    async fn create_command(
        &self,
        device_id: &str,
        cmd: NewCommand,
    ) -> Result<CommandRecord, StoreError> {
        let id = device_id.to_owned();
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let dev: Option<(i64, Option<i64>)> = tx
                    .query_row(
                        "SELECT id, revoked_ms FROM devices WHERE device_id = ?1",
                        [&id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let key = match dev {
                    None => return Err(StoreError::NoSuchDevice(id)),
                    Some((_, Some(_))) => return Err(StoreError::Revoked(id)),
                    Some((key, None)) => key,
                };
                let now = now_ms() as i64;
                tx.execute(
                    "INSERT INTO commands (device, name, content_type, payload, status,
                        created_ms, expires_ms, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?5)",
                    params![
                        key,
                        cmd.name,
                        cmd.content_type,
                        cmd.payload,
                        now,
                        cmd.expires_ms.min(i64::MAX as u64) as i64
                    ],
                )?;
                let new_id = tx.last_insert_rowid() as u64;
                let rec = command_by_id(&tx, new_id)?;
                tx.commit()?;
                rec.ok_or_else(|| StoreError::Task("the new command vanished".into()))
            })
            .await
    }

    async fn command(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.reader.call(move |conn| command_by_id(conn, id)).await
    }

    async fn commands_of(
        &self,
        device_id: &str,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let id = device_id.to_owned();
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        self.reader
            .call(move |conn| {
                let rows = conn
                    .prepare_cached(&format!(
                        "SELECT {COMMAND_COLS} FROM commands c JOIN devices d ON d.id = c.device
                         WHERE d.device_id = ?1 AND c.id < ?2 ORDER BY c.id DESC LIMIT ?3"
                    ))?
                    .query_map(params![id, before, limit], command_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn open_commands(&self, device: DeviceKey) -> Result<Vec<CommandRecord>, StoreError> {
        self.reader
            .call(move |conn| {
                let rows = conn
                    .prepare_cached(&format!(
                        "SELECT {COMMAND_COLS} FROM commands c JOIN devices d ON d.id = c.device
                         WHERE c.device = ?1 AND c.status IN ('queued', 'delivered')
                           AND c.expires_ms > ?2 ORDER BY c.id"
                    ))?
                    .query_map(params![device, now_ms() as i64], command_row)?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            })
            .await
    }

    async fn mark_delivered(&self, ids: Vec<u64>) -> Result<Vec<CommandRecord>, StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let now = now_ms() as i64;
                let mut changed = Vec::new();
                for id in ids {
                    let n = tx.execute(
                        "UPDATE commands SET status = 'delivered', updated_ms = ?2
                         WHERE id = ?1 AND status = 'queued'",
                        params![id as i64, now],
                    )?;
                    if n > 0 {
                        changed.extend(command_by_id(&tx, id)?);
                    }
                }
                tx.commit()?;
                Ok(changed)
            })
            .await
    }

    async fn complete_command(
        &self,
        device: DeviceKey,
        id: u64,
        outcome: CommandOutcome,
    ) -> Result<Option<CommandRecord>, StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let now = now_ms() as i64;
                let state = if outcome.status == 0 {
                    CommandState::Succeeded
                } else {
                    CommandState::Failed
                };
                let n = tx.execute(
                    "UPDATE commands SET status = ?3, updated_ms = ?4, result_status = ?5,
                        result_content_type = ?6, result_payload = ?7
                     WHERE id = ?1 AND device = ?2 AND status IN ('queued', 'delivered')
                       AND expires_ms > ?4",
                    params![
                        id.min(i64::MAX as u64) as i64,
                        device,
                        state.as_str(),
                        now,
                        outcome.status,
                        outcome.content_type,
                        outcome.payload
                    ],
                )?;
                let rec = if n > 0 { command_by_id(&tx, id)? } else { None };
                tx.commit()?;
                Ok(rec)
            })
            .await
    }

    async fn cancel_open_commands(
        &self,
        device_id: &str,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let id = device_id.to_owned();
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let now = now_ms() as i64;
                let ids: Vec<i64> = tx
                    .prepare_cached(
                        "SELECT c.id FROM commands c JOIN devices d ON d.id = c.device
                         WHERE d.device_id = ?1 AND c.status IN ('queued', 'delivered')",
                    )?
                    .query_map([&id], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                let out = close_commands(&tx, &ids, CommandState::Cancelled, now)?;
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    async fn expire_commands(&self, now: u64) -> Result<Vec<CommandRecord>, StoreError> {
        self.writer
            .call(move |conn| {
                let tx = conn.transaction()?;
                let now = now.min(i64::MAX as u64) as i64;
                let ids: Vec<i64> = tx
                    .prepare_cached(
                        "SELECT id FROM commands WHERE status IN ('queued', 'delivered')
                         AND expires_ms <= ?1 LIMIT 1000",
                    )?
                    .query_map([now], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                let out = close_commands(&tx, &ids, CommandState::Expired, now)?;
                tx.commit()?;
                Ok(out)
            })
            .await
    }
}

#[async_trait]
impl AdminStore for SqliteStore {
    async fn create_api_token(
        &self,
        name: &str,
        role: Role,
        token_hash: [u8; 32],
    ) -> Result<ApiToken, StoreError> {
        let name = name.to_owned();
        let created_ms = now_ms();
        self.writer
            .call(move |conn| {
                let res = conn.execute(
                    "INSERT INTO api_tokens (name, role, token_hash, created_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![name, role.as_str(), &token_hash[..], created_ms as i64],
                );
                match res {
                    Ok(_) => Ok(ApiToken {
                        name,
                        role,
                        created_ms,
                        revoked_ms: None,
                    }),
                    Err(rusqlite::Error::SqliteFailure(f, _))
                        if f.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        Err(StoreError::TokenExists(name))
                    }
                    Err(e) => Err(e.into()),
                }
            })
            .await
    }

    async fn api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.reader
            .call(|conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT name, role, created_ms, revoked_ms FROM api_tokens ORDER BY name",
                )?;
                let rows = stmt.query_map([], api_token_row)?;
                Ok(rows
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .flatten()
                    .collect())
            })
            .await
    }

    async fn api_token_by_hash(
        &self,
        token_hash: [u8; 32],
    ) -> Result<Option<ApiToken>, StoreError> {
        self.reader
            .call(move |conn| {
                let row = conn
                    .prepare_cached(
                        "SELECT name, role, created_ms, revoked_ms FROM api_tokens
                         WHERE token_hash = ?1 AND revoked_ms IS NULL",
                    )?
                    .query_row([&token_hash[..]], api_token_row)
                    .optional()?;
                Ok(row.flatten())
            })
            .await
    }

    async fn revoke_api_token(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.writer
            .call(move |conn| {
                let n = conn.execute(
                    "UPDATE api_tokens SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
                    params![name, now_ms() as i64],
                )?;
                if n > 0 {
                    return Ok(true);
                }
                let exists = conn
                    .query_row("SELECT 1 FROM api_tokens WHERE name = ?1", [&name], |_| {
                        Ok(())
                    })
                    .optional()?
                    .is_some();
                if exists {
                    Ok(false)
                } else {
                    Err(StoreError::NoSuchToken(name))
                }
            })
            .await
    }

    async fn record_audit(&self, e: NewAudit) -> Result<(), StoreError> {
        self.writer
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO audit (at_ms, actor, source, action, target, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        now_ms() as i64,
                        e.actor,
                        e.source,
                        e.action,
                        e.target,
                        e.detail
                    ],
                )?;
                Ok(())
            })
            .await
    }

    async fn audit(&self, before: Option<u64>, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        self.reader
            .call(move |conn| {
                let mut stmt = conn.prepare_cached(
                    "SELECT id, at_ms, actor, source, action, target, detail FROM audit
                     WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![before, limit], |r| {
                    Ok(AuditEntry {
                        id: r.get::<_, i64>(0)? as u64,
                        at_ms: r.get::<_, i64>(1)? as u64,
                        actor: r.get(2)?,
                        source: r.get(3)?,
                        action: r.get(4)?,
                        target: r.get(5)?,
                        detail: r.get(6)?,
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }
}

/// An API token row (name, role, created, revoked); `None` for a role this
/// version does not know (written by a newer one): such a token opens
/// nothing.
fn api_token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<ApiToken>> {
    let role: String = r.get(1)?;
    let Some(role) = Role::parse(&role) else {
        return Ok(None);
    };
    Ok(Some(ApiToken {
        name: r.get(0)?,
        role,
        created_ms: r.get::<_, i64>(2)? as u64,
        revoked_ms: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
    }))
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.reader
            .call(|conn| {
                conn.query_row("SELECT 1", [], |_| Ok(()))?;
                Ok(())
            })
            .await
    }

    /// Empties both connections' page caches of what no statement holds.
    /// A connection burst fills them with the devices' rows (2 MB each at
    /// most, about 90 bytes per device at 10,000); the next commit reads
    /// the pages it needs back from the OS's cache.
    async fn release_memory(&self) -> Result<(), StoreError> {
        for thread in [&self.writer, &self.reader] {
            thread
                .call(|conn| Ok(conn.execute_batch("PRAGMA shrink_memory")?))
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TelemetryRecord;
    use bytes::Bytes;

    fn rec(device: Key, seq: u64) -> TelemetryRecord {
        TelemetryRecord {
            device,
            seq,
            timestamp_ms: 1,
            received_ms: 2,
            content_type: 1,
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn committed_frames_are_checkpointed_off_the_commit_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.create_device("d1", [7; 32]).await.unwrap();
        let key = store.device_auth("d1").await.unwrap().unwrap().key;
        let size = || std::fs::metadata(&path).unwrap().len();
        let before = size();
        // About 200 KB: far below the writer's own checkpoint threshold, so
        // only the checkpoint thread can move it into the database file.
        let payload = Bytes::from(vec![b'7'; 1000]);
        for chunk in 0..20u64 {
            let records = (1..=10)
                .map(|i| TelemetryRecord {
                    payload: payload.clone(),
                    ..rec(key, chunk * 10 + i)
                })
                .collect();
            let batch = Batch {
                records,
                rejections: vec![],
                reports: Vec::new(),
            };
            store.append(Arc::new(batch)).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() < before + 150_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file did not grow: nothing was checkpointed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(store);
    }

    /// Bytes in a connection's page cache.
    fn cache_used(conn: &Connection) -> i64 {
        let (mut cur, mut high) = (0, 0);
        // SAFETY: the handle is `conn`'s, alive for the whole call (it is
        // borrowed); the two out-pointers are locals; the last argument
        // only asks not to reset the high-water mark.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_db_status(
                conn.handle(),
                rusqlite::ffi::SQLITE_DBSTATUS_CACHE_USED,
                &mut cur,
                &mut high,
                0,
            )
        };
        assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
        i64::from(cur)
    }

    #[tokio::test]
    async fn release_memory_empties_the_page_caches() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteOptions {
            synchronous: Synchronous::Off,
            ..Default::default()
        };
        let store = SqliteStore::open(dir.path().join("f.db"), opts).unwrap();
        // As a connection burst does: every device's row read once.
        for i in 0..3000u32 {
            let id = format!("device-{i:05}");
            store.create_device(&id, [7; 32]).await.unwrap();
            assert!(store.device_auth(&id).await.unwrap().is_some());
        }
        let cached = || async {
            let mut total = 0;
            for thread in [&store.writer, &store.reader] {
                total += thread.call(|c| Ok(cache_used(c))).await.unwrap();
            }
            total
        };
        let before = cached().await;
        assert!(before > 200_000, "the lookups cached only {before} bytes");
        store.release_memory().await.unwrap();
        let after = cached().await;
        assert!(
            after < before / 4,
            "{after} of {before} cached bytes left after release_memory"
        );
        // The store still answers from disk.
        assert!(store.device_auth("device-00042").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn append_is_idempotent_and_last_seq_follows() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("f.db"), SqliteOptions::default()).unwrap();
        store.create_device("d1", [7; 32]).await.unwrap();
        let auth = store.device_auth("d1").await.unwrap().unwrap();
        assert_eq!(
            store.device_seqs(auth.key).await.unwrap(),
            DeviceSeqs::default()
        );
        let batch = Arc::new(Batch {
            records: vec![rec(auth.key, 1), rec(auth.key, 2), rec(auth.key, 2)],
            rejections: vec![(auth.key, 3)],
            reports: Vec::new(),
        });
        store.append(batch.clone()).await.unwrap();
        store.append(batch).await.unwrap();
        let rows = store
            .telemetry("d1", TelemetryRange::default(), 100)
            .await
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        let seqs = store.device_seqs(auth.key).await.unwrap();
        assert_eq!((seqs.stored, seqs.rejected), (2, 3));
        // A lower rejection does not lower the watermark.
        let low = Batch {
            records: vec![],
            rejections: vec![(auth.key, 1)],
            reports: Vec::new(),
        };
        store.append(Arc::new(low)).await.unwrap();
        assert_eq!(store.device_seqs(auth.key).await.unwrap().rejected, 3);
        // Seqs above i64::MAX are still the largest.
        let high = Batch {
            records: vec![rec(auth.key, u64::MAX - 1)],
            rejections: vec![(auth.key, u64::MAX)],
            reports: Vec::new(),
        };
        store.append(Arc::new(high)).await.unwrap();
        let seqs = store.device_seqs(auth.key).await.unwrap();
        assert_eq!((seqs.stored, seqs.rejected), (u64::MAX - 1, u64::MAX));
        let back = Batch {
            records: vec![],
            rejections: vec![(auth.key, 5)],
            reports: Vec::new(),
        };
        store.append(Arc::new(back)).await.unwrap();
        assert_eq!(
            store.device_seqs(auth.key).await.unwrap().rejected,
            u64::MAX
        );
    }

    #[tokio::test]
    async fn devices_create_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("f.db"), SqliteOptions::default()).unwrap();
        store.create_device("b", [1; 32]).await.unwrap();
        store.create_device("a", [2; 32]).await.unwrap();
        assert!(matches!(
            store.create_device("a", [3; 32]).await,
            Err(StoreError::DeviceExists(_))
        ));
        let list = store.list_devices(None, 10).await.unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].device_id, "a");
        let page = store.list_devices(Some("a".into()), 10).await.unwrap();
        assert_eq!(page.len(), 1);
        assert!(store.revoke_device("a").await.unwrap());
        assert!(!store.revoke_device("a").await.unwrap());
        assert!(matches!(
            store.revoke_device("zz").await,
            Err(StoreError::NoSuchDevice(_))
        ));
        assert!(store.device_auth("a").await.unwrap().unwrap().revoked);
        let revs = store.revocations_since(0).await.unwrap();
        assert_eq!(revs.len(), 1);
        assert_eq!(revs[0].1, "a");
        assert!(store.revocations_since(revs[0].0).await.unwrap().is_empty());
    }

    #[test]
    fn reopen_keeps_schema_and_refuses_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
        drop(SqliteStore::open(&path, SqliteOptions::default()).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            SqliteStore::open(&path, SqliteOptions::default()),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}
