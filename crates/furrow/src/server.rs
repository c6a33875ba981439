//! The gateway assembled: store, writer, registry, listener, and the
//! phased shutdown that ties them together.
//!
//! Shutdown runs in this order (see `tests/shutdown.rs`):
//! 1. stop accepting and drop the listener;
//! 2. signal every session: each stops reading, stores and ACKs every
//!    TELEMETRY it has read, sends GOODBYE SERVER_SHUTDOWN (sessions still
//!    in their handshake get it too) and closes;
//! 3. wait for sessions, at most `shutdown.drain_timeout_ms`;
//! 4. close the writer's queue and wait for its last commit;
//! 5. stop the HTTP API (which reports not ready from step 1 on);
//! 6. leave the cluster (PostgreSQL): this instance's records are removed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_proto::GoodbyeCode;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::ApiState;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::devices::registry::Registry;
use crate::ingress::limits::Limiter;
use crate::ingress::listener::accept_loop;
use crate::ingress::tls::TlsState;
use crate::publish::mqtt::Publisher;
use crate::publish::Events;
use crate::session::{self, Shared};
use crate::store::prelude::*;
#[cfg(feature = "sqlite")]
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::StoreError;
#[cfg(feature = "postgres")]
use crate::store::{PostgresOptions, PostgresStore};
use crate::writer::{self, WriterConfig};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory cannot be created or used.
    #[error("cannot use data directory {path}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store failed to open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another process holds the device port and this one may not share it.
    #[error("cannot listen on {addr}: the address is in use (gateways share a port only when every one of them sets reuse_port / --reuse-port)")]
    AddrInUse {
        /// The address.
        addr: SocketAddr,
    },
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::ingress::tls::TlsError),
    /// The firmware signing key or a trusted key cannot be used.
    #[error(transparent)]
    Firmware(#[from] crate::firmware::FirmwareError),
    /// The device listener could not bind.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration asks for a storage backend this build leaves out.
    #[error("this furrow was built without the {0} backend (cargo feature \"{0}\"); {1}")]
    NotBuiltIn(&'static str, &'static str),
}

/// Opens the SQLite store in `cfg.data_dir`, creating the directory, for
/// a tool beside the gateway (the CLI, provisioning, tests): it reads and
/// manages devices but stores no telemetry.
#[cfg(feature = "sqlite")]
pub fn open_store(cfg: &Config) -> Result<SqliteStore, ServerError> {
    open_sqlite(cfg, false)
}

/// Opens SQLite in the data directory (created if missing); `ingest` for
/// the gateway itself, which takes the database's lock file and stores
/// telemetry.
#[cfg(feature = "sqlite")]
fn open_sqlite(cfg: &Config, ingest: bool) -> Result<SqliteStore, ServerError> {
    let dir = &cfg.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| ServerError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let meta = std::fs::metadata(dir).map_err(|source| ServerError::DataDir {
        path: dir.clone(),
        source,
    })?;
    if meta.permissions().readonly() {
        return Err(ServerError::DataDir {
            path: dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "read-only"),
        });
    }
    let opts = SqliteOptions {
        synchronous: cfg.storage.synchronous,
        ingest,
        log: crate::store::sqlite::LogOptions {
            seal_rows: cfg.storage.seal_rows,
            seal_after_ms: cfg.storage.seal_after_ms,
            chunk_span_ms: cfg.storage.chunk_span.ms(),
            retention_ms: cfg.storage.retention.ms(),
            max_bytes: cfg.storage.max_bytes,
            ..Default::default()
        },
        min_free_bytes: cfg.storage.min_free_bytes,
        ..SqliteOptions::default()
    };
    Ok(SqliteStore::open(cfg.database_path(), opts)?)
}

#[cfg(feature = "postgres")]
fn postgres_options(cfg: &Config) -> PostgresOptions {
    PostgresOptions {
        pool_size: cfg.storage.pool_size,
        connect_timeout: Duration::from_millis(cfg.storage.connect_timeout_ms),
        application_name: crate::cluster::application_name(&cfg.instance()),
        chunk_span_ms: cfg.storage.chunk_span.ms(),
        retention_ms: cfg.storage.retention.ms(),
        max_bytes: cfg.storage.max_bytes,
    }
}

/// Opens the configured store for a tool: PostgreSQL when `database_url`
/// is set (migrated, reachable), else SQLite in `data_dir` (see
/// [`open_store`]).
pub async fn connect_store(cfg: &Config) -> Result<Arc<dyn Store>, ServerError> {
    connect(cfg, false).await
}

#[cfg_attr(not(feature = "sqlite"), allow(unused_variables))]
async fn connect(cfg: &Config, ingest: bool) -> Result<Arc<dyn Store>, ServerError> {
    if cfg.uses_postgres() {
        #[cfg(feature = "postgres")]
        {
            let store = PostgresStore::connect(&cfg.database_url, postgres_options(cfg)).await?;
            return Ok(Arc::new(store));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(ServerError::NotBuiltIn(
            "postgres",
            "leave database_url empty to store into SQLite",
        ));
    }
    #[cfg(feature = "sqlite")]
    {
        let cfg = cfg.clone();
        let store = tokio::task::spawn_blocking(move || open_sqlite(&cfg, ingest))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Arc::new(store))
    }
    #[cfg(not(feature = "sqlite"))]
    Err(ServerError::NotBuiltIn(
        "sqlite",
        "set database_url to a PostgreSQL database",
    ))
}

/// A bound, not yet running gateway.
pub struct Server {
    cfg: Config,
    /// Plain TCP devices (unless `tls.plain` is off).
    listener: Option<TcpListener>,
    /// TLS devices (when a certificate is configured).
    tls_listener: Option<TcpListener>,
    tls: Option<Arc<TlsState>>,
    /// QUIC devices (when `quic.listen` is set).
    quic: Option<quinn::Endpoint>,
    api_listener: Option<TcpListener>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    /// The abuse limits and what they track (ingress/limits.rs).
    limits: Arc<Limiter>,
    cluster: Cluster,
    /// Firmware upload settings (the signing key, loaded at bind).
    uploads: Arc<crate::firmware::Uploads>,
    /// The PostgreSQL store, whose retention the gateway runs.
    #[cfg(feature = "postgres")]
    postgres: Option<PostgresStore>,
}

/// How often a PostgreSQL gateway looks for partitions to drop.
#[cfg(feature = "postgres")]
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Binds the device listener with our backlog (Tokio's `bind` would use
/// its own) and SO_REUSEADDR, so a restarted gateway binds while its old
/// connections linger in TIME_WAIT. With `reuse_port`, also SO_REUSEPORT:
/// processes of the same user that all set it share the port, each with
/// its own accept queue, and the kernel spreads connections among them.
fn listen(addr: SocketAddr, backlog: u32, reuse_port: bool) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    if reuse_port {
        sock.set_reuseport(true)?;
    }
    sock.bind(addr)?;
    sock.listen(backlog)
}

impl Server {
    /// Opens the store and binds the device listener.
    pub async fn bind(cfg: Config) -> Result<Self, ServerError> {
        #[cfg(feature = "postgres")]
        if cfg.uses_postgres() {
            let pg = PostgresStore::connect(&cfg.database_url, postgres_options(&cfg)).await?;
            let mut server = Self::with_store(cfg, Arc::new(pg.clone())).await?;
            server.postgres = Some(pg.clone());
            server.cluster = Cluster::join(pg, &server.cfg, server.registry()).await?;
            return Ok(server);
        }
        let store = connect(&cfg, true).await?;
        Self::with_store(cfg, store).await
    }

    /// Binds the device listener over an already open store.
    pub async fn with_store(cfg: Config, store: Arc<dyn Store>) -> Result<Self, ServerError> {
        let bind = |addr: SocketAddr| {
            listen(addr, cfg.limits.listen_backlog, cfg.reuse_port).map_err(|source| {
                match source.kind() {
                    std::io::ErrorKind::AddrInUse => ServerError::AddrInUse { addr },
                    _ => ServerError::Bind { addr, source },
                }
            })
        };
        // Fail closed: unreadable or unparsable TLS files stop the start.
        let tls = if cfg.tls.enabled() {
            Some(TlsState::load(&cfg.tls, cfg.quic.session_cache)?)
        } else {
            None
        };
        let listener = if cfg.tls.plain {
            Some(bind(cfg.listen)?)
        } else {
            None
        };
        let tls_listener = match tls {
            Some(_) => Some(bind(cfg.tls.listen)?),
            None => None,
        };
        let quic = match (cfg.quic.listen, &tls) {
            (Some(addr), Some(state)) => {
                let config = crate::ingress::quic::server_config(
                    state.quic_current(),
                    crate::ingress::quic::Transport::from_config(&cfg),
                )?;
                // The recorder first: the socket's buffer sizes are gauges.
                let _ = crate::metrics::handle();
                let bound = crate::ingress::quic::bind_socket(addr, cfg.quic.socket_buffer_bytes)
                    .and_then(|socket| {
                        quinn::Endpoint::new(
                            quinn::EndpointConfig::default(),
                            Some(config),
                            socket,
                            Arc::new(quinn::TokioRuntime),
                        )
                    });
                Some(bound.map_err(|source| ServerError::Bind { addr, source })?)
            }
            // Config::validate refuses QUIC without TLS files.
            _ => None,
        };
        let api_listener = if cfg.api.enabled {
            let addr = cfg.api.listen;
            Some(
                crate::api::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            )
        } else {
            None
        };
        let limits = Arc::new(Limiter::new(&cfg.limits));
        let uploads = Arc::new(crate::firmware::Uploads::from_config(&cfg)?);
        std::fs::create_dir_all(&uploads.staging).map_err(|source| ServerError::DataDir {
            path: uploads.staging.clone(),
            source,
        })?;
        Ok(Self {
            cfg,
            listener,
            tls_listener,
            tls,
            quic,
            api_listener,
            store,
            registry: Arc::new(Registry::new()),
            limits,
            cluster: Cluster::single(),
            uploads,
            #[cfg(feature = "postgres")]
            postgres: None,
        })
    }

    /// The HTTP API's address, if it is enabled (useful with port 0).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The plain device listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .unwrap_or(self.cfg.listen)
    }

    /// The TLS device listener's address, if TLS is on.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The QUIC listener's (UDP) address, if QUIC is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// The store.
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// The registry of live sessions.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// The abuse limits: what they track now (connections, failed
    /// authentications, delayed answers).
    pub fn limits(&self) -> Arc<Limiter> {
        Arc::clone(&self.limits)
    }

    /// Serves until `signal` resolves, then shuts down in phases.
    pub async fn run(self, signal: impl std::future::Future<Output = ()>) {
        let Server {
            cfg,
            listener,
            tls_listener,
            tls,
            quic,
            api_listener,
            store,
            registry,
            limits,
            cluster,
            uploads,
            #[cfg(feature = "postgres")]
            postgres,
        } = self;
        #[cfg(feature = "postgres")]
        let retention = postgres.map(|pg| pg.spawn_retention(RETENTION_EVERY));
        let shutdown = CancellationToken::new();
        // The listeners are bound (the kernel queues devices already): ready
        // from the first /readyz on, until phase 1 of shutdown.
        let accepting = Arc::new(AtomicBool::new(true));
        let commits_ok = Arc::new(AtomicBool::new(true));
        let api_stop = CancellationToken::new();
        let metrics = crate::metrics::handle();
        let upkeep = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                loop {
                    tokio::time::sleep(crate::metrics::UPKEEP_EVERY).await;
                    metrics.run_upkeep();
                }
            }
        });
        let mqtt_stop = CancellationToken::new();
        let events = if cfg.mqtt.url.is_empty() {
            Events::off()
        } else {
            match Publisher::start(&cfg.mqtt, &cfg.instance(), mqtt_stop.clone()) {
                Ok(p) => Events::mqtt(p),
                // validate() checked the URL; should it fail anyway, ingest
                // goes on without events.
                Err(e) => {
                    warn!(error = %e, "MQTT events off");
                    Events::off()
                }
            }
        };
        let api_addr = api_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "-".to_owned(), |a| a.to_string());
        let firmware =
            crate::firmware::serve::Service::new(&cfg, Arc::clone(&store), Arc::clone(&registry));
        // The last hour of traffic, for the console's overview.
        let series = crate::live::Series::new();
        let series_task = tokio::spawn(Arc::clone(&series).sample(
            crate::live::STEP,
            {
                let registry = Arc::clone(&registry);
                move || registry.len() as u64
            },
            api_stop.clone(),
        ));
        let api_task = api_listener.map(|l| {
            let state = ApiState {
                series: Arc::clone(&series),
                firmware: Arc::clone(&firmware),
                uploads: Arc::clone(&uploads),
                store: Arc::clone(&store),
                registry: Arc::clone(&registry),
                metrics,
                accepting: Arc::clone(&accepting),
                commits_ok: Arc::clone(&commits_ok),
                token_digest: crate::api::auth::digest(&cfg.api.token),
                instance: cfg.instance(),
                events: events.clone(),
                max_frame: cfg.limits.max_frame,
                token_grace: Duration::from_secs(cfg.devices.token_grace_s),
                cluster: cluster.clone(),
                state_limits: cfg.state_limits(),
            };
            tokio::spawn(crate::api::serve(
                l,
                crate::api::app(state),
                api_stop.clone(),
            ))
        });
        let (writer_tx, writer_task) = writer::spawn(
            Arc::clone(&store) as Arc<dyn crate::store::TelemetryStore>,
            WriterConfig {
                batch_max_rows: cfg.storage.batch_max_rows,
                batch_delay: Duration::from_micros(cfg.storage.batch_delay_us),
                min_commit_interval: Duration::from_micros(cfg.storage.min_commit_interval_us),
                pace_timer: writer::PaceTimer::Precise,
                queue_capacity: cfg.storage.queue_capacity,
                healthy: Arc::clone(&commits_ok),
            },
            events.clone(),
        );
        let drain = Duration::from_millis(cfg.shutdown.drain_timeout_ms);
        if cfg.limits.auth_ban_after.is_some() || cfg.limits.auth_ban_ms.is_some() {
            warn!(
                "limits.auth_ban_after and limits.auth_ban_ms are no longer used and are ignored: \
                   nothing is banned, failed attempts are delayed (docs/security.md)"
            );
        }
        let limits_upkeep = tokio::spawn(Arc::clone(&limits).run_upkeep());
        let tracker = TaskTracker::new();
        let park = if cfg.sessions.park_after_ms > 0 {
            match session::start_lot(tracker.clone()) {
                Ok(lot) => Some(lot),
                Err(e) => {
                    warn!(error = %e, "cannot start the parking lot; quiet sessions keep their tasks");
                    None
                }
            }
        } else {
            None
        };
        let shared = Arc::new(Shared {
            park: park.clone(),
            tracker: tracker.clone(),
            limits,
            cfg,
            store: Arc::clone(&store),
            registry: Arc::clone(&registry),
            writer: writer_tx,
            shutdown: shutdown.clone(),
            events,
            cluster: cluster.clone(),
            tls: tls.clone(),
            firmware,
        });
        let reloader = tls.clone().map(|t| {
            tokio::spawn(reload_tls(
                t,
                shared.cfg.tls.watch_ms,
                quic.clone()
                    .map(|e| (e, crate::ingress::quic::Transport::from_config(&shared.cfg))),
            ))
        });
        let revocations = tokio::spawn(watch_revocations(Arc::clone(&shared)));
        let trim_stop = CancellationToken::new();
        let caches = Arc::clone(&store);
        let trim = tokio::spawn(crate::memory::run(
            shared.cfg.sessions.trim_after,
            trim_stop.clone(),
            move || {
                let store = Arc::clone(&caches);
                async move {
                    if let Err(e) = store.release_memory().await {
                        tracing::debug!(error = %e, "the store kept its caches");
                    }
                }
            },
        ));
        let expiry = tokio::spawn(expire_commands(Arc::clone(&shared)));
        // Fleet jobs: every instance ticks them; the store's locks decide
        // who does each tick.
        let jobs_stop = CancellationToken::new();
        let jobs = tokio::spawn(
            crate::jobs::runner::Runner {
                store: Arc::clone(&store),
                registry: Arc::clone(&registry),
                cluster: cluster.clone(),
                events: shared.events.clone(),
                limits: shared.cfg.state_limits(),
            }
            .run(jobs_stop.clone()),
        );
        let addr_of = |l: &Option<TcpListener>| {
            l.as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into())
        };
        info!(
            addr = %addr_of(&listener),
            tls_addr = %addr_of(&tls_listener),
            quic_addr = %quic.as_ref().and_then(|e| e.local_addr().ok()).map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            api = %api_addr,
            database = %shared.cfg.storage_location(),
            mutual_tls = tls.as_ref().is_some_and(|t| t.mutual()),
            reuse_port = shared.cfg.reuse_port,
            proxy_protocol = shared.cfg.proxy_protocol.enabled,
            "furrow listening"
        );

        let plain_shared = Arc::clone(&shared);
        let plain = async {
            match &listener {
                Some(l) => {
                    accept_loop(l, &tracker, &shutdown, move |stream, peer, at, id| {
                        // At max_connections: ERROR BUSY, no session.
                        let shared = Arc::clone(&plain_shared);
                        plain_shared.limits.admit(stream, move |stream, permit| {
                            let arrival = session::Arrival {
                                peer,
                                at,
                                conn_id: id,
                                permit,
                            };
                            session::run(stream, arrival, shared, None)
                        })
                    })
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let tls_shared = Arc::clone(&shared);
        let secure = async {
            match (&tls_listener, &tls) {
                (Some(l), Some(state)) => {
                    accept_loop(l, &tracker, &shutdown, move |stream, peer, at, id| {
                        // The configuration current at accept: a reload
                        // affects new connections only.
                        let config = state.current();
                        let shared = Arc::clone(&tls_shared);
                        // At max_connections: closed (no plaintext ERROR
                        // before TLS), no session.
                        tls_shared
                            .limits
                            .admit_silent(stream, move |stream, permit| {
                                let arrival = session::Arrival {
                                    peer,
                                    at,
                                    conn_id: id,
                                    permit,
                                };
                                session::run(stream, arrival, shared, Some(config))
                            })
                    })
                    .await
                }
                _ => std::future::pending().await,
            }
        };
        let quic_shared = Arc::clone(&shared);
        let quic_devices = async {
            // Moved in: dropped with this future at the end of the select
            // below, not held to the end of `run` (the writer finishes only
            // once the last `Shared` is gone).
            let quic_shared = quic_shared;
            match &quic {
                Some(endpoint) => {
                    let timeout = Duration::from_millis(quic_shared.cfg.tls.handshake_timeout_ms)
                        .min(quic_shared.cfg.handshake_timeout());
                    let limits = Arc::clone(&quic_shared.limits);
                    let shared = Arc::clone(&quic_shared);
                    crate::ingress::quic::accept_loop(
                        endpoint,
                        &tracker,
                        &shutdown,
                        &limits,
                        timeout,
                        move |stream, at, id, permit| {
                            session::run_quic(stream, at, id, Arc::clone(&shared), permit)
                        },
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signal => {}
            _ = plain => {}
            _ = secure => {}
            _ = quic_devices => {}
        }

        // Phase 1: stop accepting (and say so on /readyz, which stays up
        // through the drain).
        accepting.store(false, Ordering::Release);
        drop(listener);
        drop(tls_listener);
        if let Some(r) = reloader {
            r.abort();
        }
        if let Some(endpoint) = &quic {
            // New QUIC connections are refused from now on; open ones drain.
            endpoint.set_server_config(None);
        }
        info!(sessions = tracker.len(), "shutting down: listener closed");
        // Phase 2: signal sessions to drain. Handshaking sessions watch the
        // token; active ones are woken through the registry (they check the
        // token whenever they wake, so one that registers after kick_all
        // still sees it).
        shutdown.cancel();
        registry.kick_all(GoodbyeCode::ServerShutdown);
        // Parked sessions were woken by the kick; the lot resumes any
        // left and takes no more.
        if let Some(lot) = &park {
            lot.stop();
        }
        revocations.abort();
        trim_stop.cancel();
        let _ = trim.await;
        expiry.abort();
        series_task.abort();
        // A tick is one transaction: stopping between ticks loses nothing.
        jobs_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), jobs).await;
        limits_upkeep.abort();
        #[cfg(feature = "postgres")]
        if let Some(r) = retention {
            r.abort();
        }
        // Phase 3: wait for them, bounded.
        tracker.close();
        if tokio::time::timeout(drain + Duration::from_secs(1), tracker.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = tracker.len(),
                "drain time passed; exiting without the sessions still open (their devices resend what is unacknowledged)"
            );
        }
        // Phase 4: the writer finishes once every queue sender is gone.
        drop(shared);
        if tokio::time::timeout(Duration::from_secs(5), writer_task)
            .await
            .is_err()
        {
            warn!("storage writer did not finish in time");
        }
        // Phase 5: the API finishes its requests in flight.
        api_stop.cancel();
        if let Some(t) = api_task {
            if tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .is_err()
            {
                warn!("HTTP API did not finish in time");
            }
        }
        // Phase 6: leave the cluster (session records cleared).
        cluster.leave().await;
        upkeep.abort();
        mqtt_stop.cancel();
        if let Some(endpoint) = quic {
            // Lets the last CONNECTION_CLOSE frames out.
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        info!("shutdown complete");
    }
}

/// Reloads the TLS files on SIGHUP and, every `watch_ms` (0: never), when
/// one of them changed. A failed reload keeps the certificates in force.
/// The QUIC endpoint, if any, takes each new configuration too.
async fn reload_tls(
    tls: Arc<TlsState>,
    watch_ms: u64,
    quic: Option<(quinn::Endpoint, crate::ingress::quic::Transport)>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; TLS reloads by file watch only");
            None
        }
    };
    let watch = (watch_ms > 0).then(|| Duration::from_millis(watch_ms));
    let mut last_quic = quic.as_ref().map(|_| tls.quic_current());
    loop {
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let tick = async {
            match watch {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = hup_recv => {
                if r.is_none() {
                    hup = None;
                    continue;
                }
                info!("SIGHUP: reloading TLS certificates");
                let tls = Arc::clone(&tls);
                let _ = tokio::task::spawn_blocking(move || tls.reload_logged()).await;
            }
            _ = tick => {
                let tls = Arc::clone(&tls);
                let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed()).await;
            }
        }
        if let Some((endpoint, settings)) = &quic {
            // Cheap: an Arc of the current configuration; a reload swapped it.
            let current = tls.quic_current();
            if last_quic.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &current)) {
                match crate::ingress::quic::server_config(Arc::clone(&current), *settings) {
                    Ok(c) => endpoint.set_server_config(Some(c)),
                    Err(e) => {
                        warn!(error = %e, "cannot give the QUIC listener the reloaded certificates")
                    }
                }
                last_quic = Some(current);
            }
        }
    }
}

/// Expires commands whose time to live ran out, every second, and says so
/// (metrics, MQTT). Sessions never send an expired command: the store
/// leaves them out of a device's open commands.
async fn expire_commands(shared: Arc<Shared>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match shared.store.expire_commands(crate::clock::now_ms()).await {
            Ok(expired) => {
                failing = false;
                for c in &expired {
                    shared.events.command(c);
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot expire commands");
                    failing = true;
                }
            }
        }
    }
}

/// Kicks devices revoked by another process (`furrow device revoke`, or
/// another instance) by polling the store's revocation log.
async fn watch_revocations(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.cfg.sessions.revocation_poll_ms);
    // Start after what is already recorded: those devices cannot log in.
    let mut cursor = 0;
    loop {
        match shared.store.revocations_since(cursor).await {
            Ok(rows) if rows.is_empty() => break,
            Ok(rows) => cursor = rows.last().map_or(cursor, |r| r.0),
            Err(e) => {
                warn!(error = %e, "cannot read revocations");
                break;
            }
        }
    }
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        match shared.store.revocations_since(cursor).await {
            Ok(rows) => {
                failing = false;
                for (id, device) in rows {
                    cursor = id;
                    if shared.registry.kick(&device, GoodbyeCode::DeviceRevoked) {
                        info!(device = %device, "revoked device disconnected");
                    }
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot read revocations");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Connections that complete against a listener nobody accepts from:
    /// the kernel completes handshakes until the backlog is full, then
    /// drops SYNs (retried only after a second, far past the timeout).
    fn queued(backlog: u32, attempts: usize) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(async { listen("127.0.0.1:0".parse().unwrap(), backlog, false) })
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..attempts {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        held.len()
    }

    #[tokio::test]
    async fn reuse_port_shares_the_port_only_when_all_set_it() {
        let first = listen("127.0.0.1:0".parse().unwrap(), 16, true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = listen(addr, 16, true).expect("a second reuse_port listener binds");
        assert_eq!(second.local_addr().unwrap(), addr);
        let e = listen(addr, 16, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    }

    #[test]
    fn the_listen_backlog_is_the_configured_one() {
        // A small backlog fills (the kernel allows backlog + 1)...
        assert!(queued(8, 100) < 20);
        // ...the default one holds a storm's worth.
        assert_eq!(
            queued(crate::config::Limits::default().listen_backlog, 600),
            600
        );
    }
}
