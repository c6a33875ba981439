//! The PostgreSQL side of the cluster (see the module above for the
//! protocol between instances): the instance's record, its heartbeat, the
//! notification listener, claims and releases of devices.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use furrow_proto::GoodbyeCode;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_postgres::types::ToSql;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Claim, ClaimReads, Displaced, Holder, APP_PREFIX};
use crate::clock::now_ms;
use crate::config::Config;
use crate::devices::registry::{Registry, SessionHandle};
use crate::store::postgres::batch::Batcher;
use crate::store::postgres::{open_commands_of, pool_err, seqs_of};
use crate::store::{DeviceKey, PostgresStore, StoreError};

/// The notification channel.
const CHANNEL: &str = "furrow";

/// A notification between instances (JSON, well under NOTIFY's 8000 bytes:
/// device ids are at most 128 bytes).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
enum Note {
    /// Instance `by` now holds device `d` with generation `g`.
    Takeover { d: String, g: u64, by: String },
    /// The session of `d` with generation `g` has closed.
    Released { d: String, g: u64 },
    /// Device `d` has a new command.
    Command { d: String },
    /// Device `d` was revoked.
    Revoked { d: String },
}

pub(super) struct Inner {
    store: PostgresStore,
    instance: String,
    registry: Arc<Registry>,
    heartbeat: Duration,
    instance_timeout: Duration,
    remote_wait: Duration,
    /// Handshakes' claims, batched.
    claims: Batcher<ClaimRequest, Claimed>,
    /// The reads of handshakes that displaced a session elsewhere, made
    /// again once it released, batched like the claims.
    rereads: Batcher<DeviceKey, ClaimReads>,
    /// Sessions' ends, batched.
    ends: Batcher<SessionEnd, ()>,
    /// Notifications, batched: a storm of reconnections sends two per
    /// device, and PostgreSQL serializes the commits of transactions
    /// that notify.
    notes: Batcher<String, ()>,
    /// New sessions waiting for a displaced one elsewhere to release.
    waiters: Mutex<HashMap<(String, u64), oneshot::Sender<()>>>,
    /// Release tasks in flight (waited for at shutdown).
    releases: TaskTracker,
    stop: CancellationToken,
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl Inner {
    /// Registers this instance and starts its heartbeat and listener.
    pub(super) async fn join(
        store: PostgresStore,
        cfg: &Config,
        registry: Arc<Registry>,
    ) -> Result<Arc<Self>, StoreError> {
        let instance_timeout = Duration::from_millis(cfg.sessions.instance_timeout_ms);
        let claims = {
            let (pool, instance) = (store.pool().clone(), Arc::<str>::from(cfg.instance()));
            Batcher::start(2, move |reqs| {
                claim_batch(pool.clone(), Arc::clone(&instance), instance_timeout, reqs)
            })
        };
        let rereads = {
            let pool = store.pool().clone();
            Batcher::start(2, move |keys| read_batch(pool.clone(), keys))
        };
        let ends = {
            let pool = store.pool().clone();
            Batcher::start(2, move |ends| end_batch(pool.clone(), ends))
        };
        let notes = {
            let pool = store.pool().clone();
            Batcher::start(1, move |notes| notify_batch(pool.clone(), notes))
        };
        let inner = Arc::new(Inner {
            claims,
            rereads,
            ends,
            notes,
            store,
            instance: cfg.instance(),
            registry,
            heartbeat: Duration::from_millis(cfg.sessions.heartbeat_ms),
            instance_timeout: Duration::from_millis(cfg.sessions.instance_timeout_ms),
            remote_wait: Duration::from_millis(cfg.sessions.remote_takeover_wait_ms),
            waiters: Mutex::new(HashMap::new()),
            releases: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        inner.register().await?;
        tokio::spawn(Arc::clone(&inner).heartbeat_loop());
        tokio::spawn(Arc::clone(&inner).listen_loop());
        Ok(inner)
    }

    /// Records that `handle` (this instance) now holds device `key`, and
    /// sets the handle's generation. Returns the session on another
    /// instance that this displaced, if it is still alive there, and the
    /// device's watermarks and open commands as they stood once the claim
    /// was committed. Claims that arrive together share statements
    /// ([`claim_batch`]).
    pub(super) async fn claim(
        &self,
        key: DeviceKey,
        handle: &SessionHandle,
        peer: SocketAddr,
        connected_ms: u64,
    ) -> Result<Claim, StoreError> {
        let c = self
            .claims
            .call(ClaimRequest {
                key,
                peer: peer.to_string(),
                connected_ms,
            })
            .await?;
        handle.set_generation(c.generation);
        Ok(Claim {
            displaced: c.displaced,
            reads: Some(c.reads),
        })
    }

    /// The device's watermarks and open commands, read again after a
    /// takeover: what the claim read predates the displaced session's
    /// last commit. In a reconnect storm most devices land on another
    /// instance than the one still closing their old session, so these
    /// share statements as the claims do ([`read_batch`]).
    pub(super) async fn reread(&self, key: DeviceKey) -> Result<ClaimReads, StoreError> {
        self.rereads.call(key).await
    }

    /// Tells the displaced session's instance to close it, and waits
    /// (at most `sessions.remote_takeover_wait_ms`) until it has released
    /// the device. Returns whether it did in time.
    pub(super) async fn take_over(
        &self,
        device_id: &str,
        generation: u64,
        displaced: &Displaced,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        let key = (device_id.to_owned(), displaced.generation);
        self.lock_waiters().insert(key.clone(), tx);
        let note = Note::Takeover {
            d: device_id.to_owned(),
            g: generation,
            by: self.instance.clone(),
        };
        let sent = self.notify(&note).await;
        let done = match sent {
            Ok(()) => tokio::time::timeout(self.remote_wait, rx).await.is_ok(),
            Err(e) => {
                warn!(device = %device_id, error = %e, "cannot announce a takeover");
                false
            }
        };
        self.lock_waiters().remove(&key);
        done
    }

    /// Records that the session `handle` of device `key` has ended (in the
    /// background: called from a drop guard). If another instance holds
    /// the device now, tells it this session is gone.
    pub(super) fn release_handle(
        self: &Arc<Self>,
        key: DeviceKey,
        device_id: &str,
        handle: &SessionHandle,
    ) {
        let generation = handle.generation();
        if generation == 0 {
            return;
        }
        let inner2 = Arc::clone(self);
        let device_id = device_id.to_owned();
        self.releases.spawn(async move {
            if let Err(e) = inner2.release(key, &device_id, generation).await {
                debug!(device = %device_id, error = %e, "cannot record a session's end");
            }
        });
    }

    /// Wakes the session of `device_id` on whichever instance holds it.
    pub(super) async fn command_created(&self, device_id: &str) {
        let note = Note::Command {
            d: device_id.to_owned(),
        };
        if let Err(e) = self.notify(&note).await {
            // The device still gets it at its next connection, or after
            // the holder's reconciliation.
            warn!(device = %device_id, error = %e, "cannot announce a command");
        }
    }

    /// Disconnects a revoked device on whichever instance holds it (the
    /// revocation log, polled by every instance, is the fallback).
    pub(super) async fn revoked(&self, device_id: &str) {
        let note = Note::Revoked {
            d: device_id.to_owned(),
        };
        if let Err(e) = self.notify(&note).await {
            warn!(device = %device_id, error = %e, "cannot announce a revocation");
        }
    }

    /// Where the device is connected, if on a live instance.
    pub(super) async fn holder(&self, device_id: &str) -> Result<Option<Holder>, StoreError> {
        let client = self.store.pool().get().await.map_err(pool_err)?;
        let alive_after = now_ms().saturating_sub(self.instance_timeout.as_millis() as u64);
        let row = client
            .query_opt(
                "SELECT s.instance_id, s.peer, s.connected_ms
                 FROM sessions s JOIN devices d ON d.id = s.device
                 JOIN instances i ON i.instance_id = s.instance_id
                 WHERE d.device_id = $1 AND i.heartbeat_ms >= $2",
                &[&device_id, &i(alive_after)],
            )
            .await?;
        row.map(|r| {
            Ok(Holder {
                instance: r.try_get(0)?,
                peer: r.try_get(1)?,
                connected_ms: r.try_get::<_, i64>(2)? as u64,
            })
        })
        .transpose()
    }

    /// Live instances and the devices each holds, by name.
    pub(super) async fn instances(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let client = self.store.pool().get().await.map_err(pool_err)?;
        let alive_after = now_ms().saturating_sub(self.instance_timeout.as_millis() as u64);
        let rows = client
            .query(
                "SELECT i.instance_id, COUNT(s.device) FROM instances i
                 LEFT JOIN sessions s ON s.instance_id = i.instance_id
                 WHERE i.heartbeat_ms >= $1
                 GROUP BY i.instance_id ORDER BY i.instance_id",
                &[&i(alive_after)],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)?.max(0) as u64)))
            .collect()
    }

    /// Leaves the cluster after the sessions have drained: waits (bounded)
    /// for their releases, then removes this instance and any session rows
    /// still recorded for it.
    pub(super) async fn leave(&self) {
        self.stop.cancel();
        self.releases.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.releases.wait()).await;
        let r = async {
            let client = self.store.pool().get().await.map_err(pool_err)?;
            client
                .execute(
                    "DELETE FROM sessions WHERE instance_id = $1",
                    &[&self.instance],
                )
                .await?;
            client
                .execute(
                    "DELETE FROM instances WHERE instance_id = $1",
                    &[&self.instance],
                )
                .await?;
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = r {
            warn!(error = %e, "cannot deregister the instance; others clear it when its heartbeat times out");
        }
    }
}

impl Inner {
    fn lock_waiters(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, u64), oneshot::Sender<()>>> {
        // Plain map updates: a poisoned lock is still consistent.
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `note` to every instance (batched, [`notify_batch`]).
    async fn notify(&self, note: &Note) -> Result<(), StoreError> {
        let payload = serde_json::to_string(note).map_err(|e| StoreError::Task(e.to_string()))?;
        self.notes.call(payload).await
    }

    /// Registers this instance (at start) and clears session rows its
    /// previous life left behind.
    async fn register(&self) -> Result<(), StoreError> {
        let client = self.store.pool().get().await.map_err(pool_err)?;
        let now = i(now_ms());
        let alive_after = i(now_ms().saturating_sub(self.instance_timeout.as_millis() as u64));
        let live = client
            .query_opt(
                "SELECT heartbeat_ms FROM instances WHERE instance_id = $1 AND heartbeat_ms >= $2",
                &[&self.instance, &alive_after],
            )
            .await?;
        if live.is_some() {
            warn!(instance = %self.instance,
                "another live instance may use this instance_id (or this one restarted within sessions.instance_timeout_ms): give every instance its own instance_id");
        }
        client
            .execute(
                "INSERT INTO instances (instance_id, started_ms, heartbeat_ms) VALUES ($1, $2, $2)
                 ON CONFLICT (instance_id) DO UPDATE SET started_ms = $2, heartbeat_ms = $2",
                &[&self.instance, &now],
            )
            .await?;
        let n = client
            .execute(
                "DELETE FROM sessions WHERE instance_id = $1",
                &[&self.instance],
            )
            .await?;
        if n > 0 {
            info!(
                sessions = n,
                "cleared session records of this instance's previous run"
            );
        }
        info!(instance = %self.instance, "joined the cluster");
        Ok(())
    }

    /// Records that the session of generation `generation` has ended
    /// (batched with other sessions' ends, [`end_batch`]).
    async fn release(
        &self,
        key: DeviceKey,
        device_id: &str,
        generation: u64,
    ) -> Result<(), StoreError> {
        let note = serde_json::to_string(&Note::Released {
            d: device_id.to_owned(),
            g: generation,
        })
        .map_err(|e| StoreError::Task(e.to_string()))?;
        self.ends
            .call(SessionEnd {
                key,
                generation,
                note,
            })
            .await
    }

    /// Records this instance's heartbeat; clears instances that stopped
    /// beating, and their session rows. After its own row was cleared (a
    /// long outage), records its live sessions again.
    async fn heartbeat_loop(self: Arc<Self>) {
        let mut failing = false;
        let mut beats: u64 = 0;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(self.heartbeat) => {}
            }
            beats += 1;
            match self.beat(beats.is_multiple_of(5)).await {
                Ok(()) => {
                    if failing {
                        info!("cluster heartbeat recorded again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "cannot record the cluster heartbeat; retrying");
                        failing = true;
                    }
                }
            }
        }
    }

    async fn beat(&self, sweep: bool) -> Result<(), StoreError> {
        let client = self.store.pool().get().await.map_err(pool_err)?;
        let now = i(now_ms());
        let row = client
            .query_one(
                "INSERT INTO instances (instance_id, started_ms, heartbeat_ms) VALUES ($1, $2, $2)
                 ON CONFLICT (instance_id) DO UPDATE SET heartbeat_ms = $2
                 RETURNING (xmax = 0)",
                &[&self.instance, &now],
            )
            .await?;
        let reinserted: bool = row.try_get(0)?;
        if reinserted {
            self.record_live_sessions(&client).await?;
        }
        if sweep {
            let alive_after = i(now_ms().saturating_sub(self.instance_timeout.as_millis() as u64));
            let gone: Vec<String> = client
                .query(
                    "DELETE FROM instances WHERE heartbeat_ms < $1 AND instance_id <> $2
                     RETURNING instance_id",
                    &[&alive_after, &self.instance],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if !gone.is_empty() {
                let n = client
                    .execute("DELETE FROM sessions WHERE instance_id = ANY($1)", &[&gone])
                    .await?;
                warn!(instances = ?gone, sessions = n, "instances stopped beating; their session records are cleared");
            }
        }
        Ok(())
    }

    /// Records every live local session that has no row (others cleared
    /// them while this instance could not beat); never displaces a newer
    /// claim.
    async fn record_live_sessions(
        &self,
        client: &deadpool_postgres::Object,
    ) -> Result<(), StoreError> {
        let live = self.registry.sessions();
        if live.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(live.len());
        let mut gens = Vec::with_capacity(live.len());
        let mut peers = Vec::with_capacity(live.len());
        let mut since = Vec::with_capacity(live.len());
        for (id, h) in &live {
            if h.generation() == 0 {
                continue;
            }
            let info = h.info();
            ids.push(id.clone());
            gens.push(i(h.generation()));
            peers.push(info.peer.to_string());
            since.push(i(info.connected_ms));
        }
        let n = client
            .execute(
                "INSERT INTO sessions (device, instance_id, generation, peer, connected_ms)
                 SELECT d.id, $1, x.g, x.p, x.c
                 FROM unnest($2::text[], $3::int8[], $4::text[], $5::int8[]) AS x(id, g, p, c)
                 JOIN devices d ON d.device_id = x.id
                 ORDER BY d.id
                 ON CONFLICT (device) DO NOTHING",
                &[&self.instance, &ids, &gens, &peers, &since],
            )
            .await?;
        info!(sessions = n, "recorded this instance's sessions again");
        Ok(())
    }

    /// Listens for notifications, reconnecting with backoff; reconciles
    /// after each reconnection.
    async fn listen_loop(self: Arc<Self>) {
        let mut first = true;
        let mut backoff = Duration::from_millis(100);
        let mut failing = false;
        loop {
            let started = tokio::time::Instant::now();
            match self.listen_once(&mut first, &mut failing).await {
                Ok(()) => return,
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "cluster notifications lost; reconnecting");
                        failing = true;
                    }
                }
            }
            // A connection that lasted starts the backoff over.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One LISTEN connection, until it breaks (Err) or the instance stops
    /// (Ok).
    async fn listen_once(&self, first: &mut bool, failing: &mut bool) -> Result<(), StoreError> {
        let (client, mut conn) = self.store.config().connect(self.store.tls()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        // The connection yields notifications only while polled; this
        // task drives it and forwards them.
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            return Ok(());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        });
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        *failing = false;
        if !*first {
            info!("cluster notifications restored; reconciling");
            if let Err(e) = self.reconcile(&client).await {
                warn!(error = %e, "cluster reconciliation failed");
            }
        }
        *first = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    driver.abort();
                    return Ok(());
                }
                msg = rx.recv() => match msg {
                    Some(payload) => self.on_note(&payload),
                    None => {
                        let why = match driver.await {
                            Ok(Err(e)) => StoreError::from(e),
                            _ => StoreError::Task("the LISTEN connection closed".into()),
                        };
                        return Err(why);
                    }
                }
            }
        }
    }

    fn on_note(&self, payload: &str) {
        metrics::counter!("furrow_cluster_notifications_total").increment(1);
        let note: Note = match serde_json::from_str(payload) {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "ignoring a foreign notification");
                return;
            }
        };
        match note {
            Note::Takeover { d, g, by } => {
                if by == self.instance {
                    return;
                }
                if let Some(h) = self.registry.handle(&d) {
                    // Older sessions only; 0: this instance has not
                    // recorded its own claim yet, which will be newer.
                    let mine = h.generation();
                    if mine != 0 && mine < g {
                        metrics::counter!("furrow_cluster_takeovers_total").increment(1);
                        h.kick(GoodbyeCode::SessionTakenOver);
                    }
                }
            }
            Note::Released { d, g } => {
                if let Some(tx) = self.lock_waiters().remove(&(d, g)) {
                    let _ = tx.send(());
                }
            }
            Note::Command { d } => {
                self.registry.notify_commands(&d);
            }
            Note::Revoked { d } => {
                if self.registry.kick(&d, GoodbyeCode::DeviceRevoked) {
                    info!(device = %d, "revoked device disconnected");
                }
            }
        }
    }

    /// After lost notifications: kicks local sessions that another
    /// instance has since claimed, and wakes local devices with queued
    /// commands.
    async fn reconcile(&self, client: &tokio_postgres::Client) -> Result<(), StoreError> {
        let live = self.registry.sessions();
        if live.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = live.iter().map(|(id, _)| id.clone()).collect();
        let mine: HashMap<&str, &SessionHandle> =
            live.iter().map(|(id, h)| (id.as_str(), h)).collect();
        let claimed = client
            .query(
                "SELECT d.device_id, s.generation FROM sessions s JOIN devices d ON d.id = s.device
                 WHERE s.instance_id <> $1 AND d.device_id = ANY($2)",
                &[&self.instance, &ids],
            )
            .await?;
        for r in claimed {
            let id: String = r.try_get(0)?;
            let g = r.try_get::<_, i64>(1)? as u64;
            if let Some(h) = mine.get(id.as_str()) {
                if h.generation() != 0 && h.generation() < g {
                    h.kick(GoodbyeCode::SessionTakenOver);
                }
            }
        }
        let queued = client
            .query(
                "SELECT DISTINCT d.device_id FROM commands c JOIN devices d ON d.id = c.device
                 WHERE c.status = 'queued' AND d.device_id = ANY($1)",
                &[&ids],
            )
            .await?;
        for r in queued {
            let id: String = r.try_get(0)?;
            self.registry.notify_commands(&id);
        }
        Ok(())
    }
}

/// One handshake's claim, as the batch takes it.
struct ClaimRequest {
    key: DeviceKey,
    peer: String,
    connected_ms: u64,
}

/// One claim's outcome.
struct Claimed {
    generation: u64,
    displaced: Option<Displaced>,
    reads: ClaimReads,
}

/// Records a batch of claims for `instance` in one statement, then reads
/// the devices' watermarks and open commands in two more, all three in one
/// round trip: tokio-postgres sends each query when its future is first
/// polled, and `try_join!` polls them in order. Each statement is its own
/// implicit transaction, so the reads run after the claims have committed:
/// a command created from then on finds this instance as the holder and
/// wakes the session. A device claimed twice in one batch (a device
/// reconnecting at once) is claimed in a second round, after the first.
async fn claim_batch(
    pool: Pool,
    instance: Arc<str>,
    instance_timeout: Duration,
    reqs: Vec<ClaimRequest>,
) -> Result<Vec<Claimed>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    // The old rows are read in the same statement that replaces them (the
    // CTE sees them as they were when the statement began; FOR UPDATE
    // there would skip them, as this statement updates them). An old
    // holder counts as alive while its heartbeat is fresh and it has a
    // connection to the database (a killed instance has none within
    // milliseconds). Two instances claiming one device in the same
    // instant may both see the same predecessor; the generations still
    // order them.
    let stmt = client
        .prepare_cached(
            "WITH req AS (
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[])
                     AS r(device, peer, connected_ms)),
             prev AS (
                 SELECT s.device, s.instance_id, s.generation, i.heartbeat_ms >= $4
                     AND s.instance_id <> $5
                     AND EXISTS (SELECT 1 FROM pg_stat_activity a
                                 WHERE a.application_name = $6 || s.instance_id) AS alive
                 FROM sessions s LEFT JOIN instances i ON i.instance_id = s.instance_id
                 WHERE s.device IN (SELECT device FROM req)),
             ins AS (
                 INSERT INTO sessions (device, instance_id, generation, peer, connected_ms)
                 SELECT device, $5, nextval('session_generation'), peer, connected_ms FROM req
                 ORDER BY device
                 ON CONFLICT (device) DO UPDATE SET instance_id = EXCLUDED.instance_id,
                     generation = EXCLUDED.generation, peer = EXCLUDED.peer,
                     connected_ms = EXCLUDED.connected_ms
                 RETURNING device, generation)
             SELECT ins.device, ins.generation, prev.instance_id, prev.generation, prev.alive
             FROM ins LEFT JOIN prev ON prev.device = ins.device",
        )
        .await?;
    let alive_after = i(now_ms().saturating_sub(instance_timeout.as_millis() as u64));
    let instance: &str = &instance;
    // Rounds of distinct devices: one statement may not claim a row twice.
    let mut round_of = Vec::with_capacity(reqs.len());
    let mut seen: HashMap<DeviceKey, usize> = HashMap::with_capacity(reqs.len());
    for r in &reqs {
        let n = seen.entry(r.key).or_insert(0);
        round_of.push(*n);
        *n += 1;
    }
    let rounds = seen.values().copied().max().unwrap_or(0);
    let mut out: Vec<Option<Claimed>> = (0..reqs.len()).map(|_| None).collect();
    for round in 0..rounds {
        let mut idx: Vec<usize> = (0..reqs.len()).filter(|&k| round_of[k] == round).collect();
        // Rows locked in device order, as every batch here does: batches
        // of two instances, or a claim and an end, never wait on each
        // other in a cycle (PostgreSQL would abort one: a deadlock).
        idx.sort_by_key(|&k| reqs[k].key);
        let keys: Vec<DeviceKey> = idx.iter().map(|&k| reqs[k].key).collect();
        let peers: Vec<&str> = idx.iter().map(|&k| reqs[k].peer.as_str()).collect();
        let at: Vec<i64> = idx.iter().map(|&k| i(reqs[k].connected_ms)).collect();
        let (rows, mut seqs, mut commands) = tokio::try_join!(
            async {
                let params: [&(dyn ToSql + Sync); 6] =
                    [&keys, &peers, &at, &alive_after, &instance, &APP_PREFIX];
                Ok::<_, StoreError>(retry_deadlock(|| client.query(&stmt, &params)).await?)
            },
            seqs_of(&client, &keys),
            open_commands_of(&client, &keys),
        )?;
        let mut claimed: HashMap<DeviceKey, (u64, Option<Displaced>)> =
            HashMap::with_capacity(rows.len());
        for row in rows {
            let prev_instance: Option<String> = row.try_get(2)?;
            let prev_gen: Option<i64> = row.try_get(3)?;
            let alive: Option<bool> = row.try_get(4)?;
            let displaced = match (prev_instance, prev_gen, alive) {
                (Some(instance), Some(g), Some(true)) => Some(Displaced {
                    instance,
                    generation: g as u64,
                }),
                _ => None,
            };
            claimed.insert(
                row.try_get(0)?,
                (row.try_get::<_, i64>(1)? as u64, displaced),
            );
        }
        for (&k, key) in idx.iter().zip(&keys) {
            let (generation, displaced) = claimed
                .remove(key)
                .ok_or_else(|| StoreError::Task(format!("no claim recorded for device {key}")))?;
            out[k] = Some(Claimed {
                generation,
                displaced,
                reads: ClaimReads {
                    seqs: seqs.remove(key).unwrap_or_default(),
                    commands: commands.remove(key).unwrap_or_default(),
                },
            });
        }
    }
    out.into_iter()
        .map(|c| c.ok_or_else(|| StoreError::Task("a claim was left unanswered".into())))
        .collect()
}

/// Reads the watermarks and open commands of a batch of devices, the two
/// statements in one round trip (as [`claim_batch`] does after its claims).
async fn read_batch(pool: Pool, keys: Vec<DeviceKey>) -> Result<Vec<ClaimReads>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let (seqs, commands) =
        tokio::try_join!(seqs_of(&client, &keys), open_commands_of(&client, &keys))?;
    // A device may be asked for twice in one batch (it reconnected again).
    Ok(keys
        .iter()
        .map(|k| ClaimReads {
            seqs: seqs.get(k).copied().unwrap_or_default(),
            commands: commands.get(k).cloned().unwrap_or_default(),
        })
        .collect())
}

/// A session's end, as the batch takes it.
struct SessionEnd {
    key: DeviceKey,
    generation: u64,
    /// The `released` note, sent if another session holds the device now.
    note: String,
}

/// Deletes the session rows that the ending sessions still hold, and
/// tells the sessions that took the others over, in one statement: a
/// session that no longer holds its device was displaced, and its
/// successor may be waiting to hear it is gone.
async fn end_batch(pool: Pool, mut ends: Vec<SessionEnd>) -> Result<Vec<()>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    // In device order, like claims (see `claim_batch`); the answers carry
    // nothing, so their order does not matter.
    ends.sort_by_key(|e| e.key);
    let stmt = client
        .prepare_cached(
            "WITH req AS (
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[])
                     AS r(device, generation, note)),
             lk AS (
                 SELECT s.device FROM sessions s JOIN req
                     ON s.device = req.device AND s.generation = req.generation
                 ORDER BY s.device FOR UPDATE OF s),
             del AS (
                 DELETE FROM sessions s USING lk WHERE s.device = lk.device
                 RETURNING s.device, s.generation)
             SELECT pg_notify($4, req.note) FROM req
             WHERE NOT EXISTS (SELECT 1 FROM del
                               WHERE del.device = req.device AND del.generation = req.generation)",
        )
        .await?;
    let keys: Vec<DeviceKey> = ends.iter().map(|e| e.key).collect();
    let generations: Vec<i64> = ends.iter().map(|e| i(e.generation)).collect();
    let notes: Vec<&str> = ends.iter().map(|e| e.note.as_str()).collect();
    let params: [&(dyn ToSql + Sync); 4] = [&keys, &generations, &notes, &CHANNEL];
    retry_deadlock(|| client.query(&stmt, &params)).await?;
    Ok(vec![(); ends.len()])
}

/// Runs a statement again when PostgreSQL aborted it to break a deadlock
/// (it rolled back whole, so running it again is safe), up to three times.
/// Batches lock in device order and so never deadlock with each other;
/// this covers the rare statement that locks in another order (an
/// instance's sessions cleared at once).
async fn retry_deadlock<T, F, Fut>(mut run: F) -> Result<T, tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut retries = 0;
    loop {
        match run().await {
            Err(e)
                if retries < 3
                    && e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                retries += 1;
                metrics::counter!("furrow_cluster_deadlock_retries_total").increment(1);
            }
            r => return r,
        }
    }
}

/// Sends a batch of notifications in one statement (one transaction).
async fn notify_batch(pool: Pool, notes: Vec<String>) -> Result<Vec<()>, StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    let stmt = client
        .prepare_cached("SELECT pg_notify($1, n) FROM unnest($2::text[]) AS n")
        .await?;
    client.query(&stmt, &[&CHANNEL, &notes]).await?;
    Ok(vec![(); notes.len()])
}
