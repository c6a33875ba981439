//! The storage writer: one task that group-commits telemetry and then
//! releases the sessions' ACKs.
//!
//! Sessions send a [`WriteJob`] per read chunk (not per frame) over one
//! bounded queue. The writer takes the first job, then whatever else is
//! queued, waiting at most `batch_delay` for more until `batch_max_rows`;
//! commits the batch through [`TelemetryStore::append`]; and only then publishes each
//! session's committed ticket through its [`AckCell`]. Nothing is ACKed
//! before its commit because the ticket is the only way a session learns of
//! one. A session waiting on plain TCP with nothing else to say lends the
//! writer its socket ([`AckCell::arm`]): the writer then writes the ACK the
//! commit allows itself, and the session sleeps on.
//!
//! Pacing: a commit starts at most once per `min_commit_interval`. A job
//! that arrives sooner after the previous commit started waits out the
//! rest of the interval with the jobs that follow it, so that a quiet
//! fleet (many devices, a message or two each per commit) pays one fsync
//! for many devices instead of one for each, while a job arriving after a
//! pause is committed at once: the wait is only ever paid when commits
//! would otherwise follow each other closer than the interval
//! (docs/performance.md, "Commit pacing"). The wait ends on a timerfd,
//! not Tokio's millisecond timer ([`pause`]).
//!
//! Backpressure: the queue holds at most `queue_capacity` jobs. A full queue
//! makes sessions stop reading their sockets (see `session`), so a slow disk
//! slows devices down through TCP instead of growing memory.
//!
//! A failed commit is retried with capped exponential backoff, forever: an
//! ACK is a promise, so the writer would rather stall ingest than drop a
//! batch. Each change between healthy and failing is logged once.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::devices::registry::HandleState;
use crate::publish::Events;
use crate::store::prelude::*;
use crate::store::{Batch, DeviceKey, ReportRecord, TelemetryRecord};

mod pause;
pub use pause::PaceTimer;

/// Where the writer reports a session's progress; also the session's one
/// wakeup for other events (see [`crate::devices::registry::SessionHandle::kick`]),
/// and what the registry knows of it: one allocation per connected device.
#[derive(Default)]
pub struct AckCell {
    committed: AtomicU64,
    /// Set while `slow` holds refused reports (read without the lock).
    refused: AtomicBool,
    /// Bytes of the writer's last ACK that reached the socket, 0 if it
    /// wrote none since the session last looked ([`Armed::disarm`]).
    /// Read and written with `slow` locked (here, not there, to fill the
    /// padding after `refused`: 16 bytes less per connection).
    written: AtomicU8,
    /// The plain TCP socket the writer may write this session's ACKs to
    /// while the session waits ([`AckCell::arm`]); -1 when not armed.
    /// With `slow` locked, as `written`.
    wire: AtomicI32,
    notify: Notify,
    /// Where the session waits while parked (see `session::park`), and
    /// the rare news a commit brings besides its ticket.
    slow: std::sync::Mutex<Slow>,
    /// The registry's view of the session (`SessionHandle` points here).
    session: HandleState,
}

/// The parts of an [`AckCell`] behind its lock.
struct Slow {
    parked: Option<Parking>,
    /// The device's address, for operators. Changes only when a QUIC
    /// device migrates, so it shares the lock (no mutex of its own).
    peer: std::net::SocketAddr,
    /// Reports a commit refused, `(seq, code, reason)`: REJECTed by the
    /// session before the ACK that covers them. Boxed (8 bytes in every
    /// connection's cell): almost always none.
    #[allow(
        clippy::box_collection,
        reason = "a thin pointer: 8 bytes per connection where a Vec takes 24"
    )]
    refused: Option<Box<Vec<Refusal>>>,
    /// The last ACK written to the lent socket (the session's, then the
    /// writer's; see [`AckCell::arm`]).
    sent: u64,
}

impl Default for Slow {
    fn default() -> Self {
        Self {
            parked: None,
            peer: ([0, 0, 0, 0], 0).into(),
            refused: None,
            sent: 0,
        }
    }
}

/// An ACK the writer wrote to the device itself ([`AckCell::arm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterAck {
    /// Its seq.
    pub seq: u64,
    /// Bytes of its frame that reached the socket: all of them
    /// ([`furrow_proto::message::ACK_FRAME_LEN`]), or fewer, and then the
    /// session writes the rest before anything else.
    pub written: usize,
}

/// A session's socket lent to the writer; dropping it (or
/// [`Armed::disarm`]) takes it back.
#[must_use]
pub struct Armed<'a> {
    cell: &'a AckCell,
}

impl Armed<'_> {
    /// Takes the socket back; returns the ACK the writer wrote meanwhile,
    /// if it wrote one.
    pub fn disarm(self) -> Option<WriterAck> {
        let ack = self.cell.take_wire();
        std::mem::forget(self);
        ack
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // A session dropped while it waits (the runtime shuts down): the
        // socket closes after this, so the writer must not hold it.
        let _ = self.cell.take_wire();
    }
}

/// An ACK the writer may send itself once a job commits
/// ([`AckCell::arm`]).
#[derive(Debug, Clone, Copy)]
pub struct AckOnCommit {
    /// The ACK's seq: the job's commit resolves everything the session
    /// read up to and including it.
    pub seq: u64,
    /// When the session read the oldest frame this ACK is the first to
    /// cover (for `furrow_ack_latency_seconds`).
    pub read_at: tokio::time::Instant,
}

/// A REPORT a commit refused, for the session's REJECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Its seq.
    pub seq: u64,
    /// REJECT code.
    pub code: furrow_proto::ErrorCode,
    /// Why.
    pub reason: String,
}

impl std::fmt::Debug for AckCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckCell")
            .field("committed", &self.committed())
            .finish_non_exhaustive()
    }
}

/// A parked session's place in its lot.
pub struct Parking {
    /// The lot.
    pub lot: Arc<dyn crate::session::park::Unpark>,
    /// The session's key there.
    pub key: usize,
}

impl AckCell {
    /// A cell for the session that `session` describes, of a device at
    /// `peer`.
    pub fn with_session(session: HandleState, peer: std::net::SocketAddr) -> Self {
        Self {
            committed: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            written: AtomicU8::new(0),
            wire: AtomicI32::new(0),
            notify: Notify::new(),
            slow: std::sync::Mutex::new(Slow {
                peer,
                ..Slow::default()
            }),
            session,
        }
    }

    /// The device's address.
    pub fn peer(&self) -> std::net::SocketAddr {
        self.lock_slow().peer
    }

    /// Records the device's new address (a QUIC connection migrated).
    pub fn set_peer(&self, peer: std::net::SocketAddr) {
        self.lock_slow().peer = peer;
    }

    /// The registry's view of the session.
    pub fn session(&self) -> &HandleState {
        &self.session
    }

    /// Highest committed ticket of this session.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Resolves after the next commit that covers this session (cancel-safe;
    /// a notification before the call is kept as a permit).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Wakes the session without a commit (a kick, say), resuming it
    /// first if it is parked.
    pub fn wake(&self) {
        self.notify.notify_one();
        let parked = self.lock_slow().parked.take();
        if let Some(p) = parked {
            p.lot.unpark(p.key, self.session.id());
        }
    }

    /// Records where the session is parked (`None`: it runs again).
    pub fn set_parked(&self, parking: Option<Parking>) {
        self.lock_slow().parked = parking;
    }

    fn lock_slow(&self) -> std::sync::MutexGuard<'_, Slow> {
        self.slow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a refused report; visible to the session once the ticket that
    /// covers it is published.
    fn refuse(&self, refusal: Refusal) {
        let mut slow = self.lock_slow();
        slow.refused.get_or_insert_with(Box::default).push(refusal);
        self.refused.store(true, Ordering::Release);
    }

    /// Takes the refused reports noted so far (cheap when none).
    pub fn take_refused(&self) -> Vec<Refusal> {
        if !self.refused.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut slow = self.lock_slow();
        self.refused.store(false, Ordering::Release);
        slow.refused.take().map(|all| *all).unwrap_or_default()
    }

    /// Lends the writer the session's plain TCP socket `fd` while the
    /// session waits: a commit that [`AckOnCommit`] says resolves all the
    /// session has read then writes its ACK to the socket and leaves the
    /// session asleep, instead of waking it to write the same 14 bytes. A
    /// quiet device's message then costs the gateway one wake-up (its
    /// read) instead of two (docs/performance.md, "ACKs from the writer").
    ///
    /// The caller writes nothing to the socket, and keeps it open, until
    /// it takes it back through the guard: the writer writes to it
    /// meanwhile. `acked` is the last ACK the session wrote: the writer
    /// writes only ACKs above it.
    pub fn arm(&self, fd: std::os::fd::RawFd, acked: u64) -> Armed<'_> {
        let mut slow = self.lock_slow();
        // Stored plus one: zero (a new cell's) means not armed.
        self.wire
            .store(fd.checked_add(1).unwrap_or(0), Ordering::Relaxed);
        self.written.store(0, Ordering::Relaxed);
        slow.sent = acked;
        Armed { cell: self }
    }

    fn take_wire(&self) -> Option<WriterAck> {
        let slow = self.lock_slow();
        self.wire.store(0, Ordering::Relaxed);
        let written = self.written.swap(0, Ordering::Relaxed);
        (written > 0).then_some(WriterAck {
            seq: slow.sent,
            written: written.into(),
        })
    }

    /// Writes `ack` to the armed socket; true when the whole frame went.
    fn write_ack(&self, ack: &AckOnCommit) -> bool {
        use furrow_proto::message::{ack_frame, ACK_FRAME_LEN};
        if self.refused.load(Ordering::Acquire) {
            // REJECTs go first, and the session writes them.
            return false;
        }
        let mut slow = self.lock_slow();
        let fd = self.wire.load(Ordering::Relaxed) - 1;
        if fd < 0 {
            return false;
        }
        if ack.seq <= slow.sent {
            // Written already (a REJECT resolved it before its commit, or
            // an earlier commit's ACK covered it): nothing to say.
            return true;
        }
        let frame = ack_frame(ack.seq);
        // SAFETY: `fd` is an open socket: the session that armed it keeps
        // it open and writes nothing to it until it takes it back, which
        // it does under this lock (`take_wire`, also when its guard
        // drops), so it cannot close (and the number cannot be reused)
        // while this call holds the lock. `frame` is valid for its length.
        // MSG_DONTWAIT: a full socket buffer returns at once (the session
        // is woken to write the ACK then); MSG_NOSIGNAL: a closed peer is
        // an error, not SIGPIPE. Measured: this saves the session's second
        // wake-up per quiet message (docs/performance.md).
        let n = unsafe {
            libc::send(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return false;
        }
        // n <= ACK_FRAME_LEN, which fits a u8.
        self.written.store(n as u8, Ordering::Relaxed);
        slow.sent = ack.seq;
        let wire = crate::metrics::wire();
        wire.bytes_out.increment(n as u64);
        if n as usize != ACK_FRAME_LEN {
            // The session writes the rest, and everything after it (and
            // counts the frame).
            self.wire.store(0, Ordering::Relaxed);
            return false;
        }
        drop(slow);
        wire.frame_out(furrow_proto::MessageType::Ack, ACK_FRAME_LEN);
        let latency = ack.read_at.elapsed();
        wire.ack_latency.record(latency.as_secs_f64());
        crate::live::live().ack_latency(latency);
        metrics::counter!("furrow_writer_acks_total").increment(1);
        true
    }

    /// Publishes a commit of the session's tickets up to `ticket`: writes
    /// the ACK it allows when the session lent its socket, else wakes the
    /// session to.
    fn publish(&self, ticket: u64, ack: Option<&AckOnCommit>) {
        self.committed.fetch_max(ticket, Ordering::AcqRel);
        if ack.is_some_and(|a| self.write_ack(a)) {
            return;
        }
        self.notify.notify_one();
    }
}

/// Records of one session, up to and including ticket `ticket`.
#[derive(Debug)]
pub struct WriteJob {
    /// Where to report the commit.
    pub owner: Arc<AckCell>,
    /// The session's last ticket covered by this job.
    pub ticket: u64,
    /// The device.
    pub device: DeviceKey,
    /// Its id, for the events published after the commit.
    pub device_id: Arc<str>,
    /// The records, in the session's read order.
    pub records: Vec<TelemetryRecord>,
    /// State reports, in the session's read order (usually none).
    pub reports: Vec<ReportRecord>,
    /// Highest seq rejected since the last job, 0 if none.
    pub rejected_upto: u64,
    /// The ACK this job's commit allows, when nothing else holds it back.
    pub ack: Option<AckOnCommit>,
}

/// One session's jobs in a batch: what its commit publishes.
struct Owner {
    cell: Arc<AckCell>,
    ticket: u64,
    device: DeviceKey,
    ack: Option<AckOnCommit>,
}

/// Writer tuning.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// A batch closes at this many rows.
    pub batch_max_rows: usize,
    /// ...or this long after its first job arrived.
    pub batch_delay: Duration,
    /// Commits start at least this far apart (zero: back to back).
    pub min_commit_interval: Duration,
    /// What times the wait: a timerfd, or Tokio's timer where the clock is
    /// paused (tests, simulation).
    pub pace_timer: PaceTimer,
    /// Queue capacity, in jobs.
    pub queue_capacity: usize,
    /// Set while commits succeed, cleared while they fail (for `/readyz`).
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
}

/// The sending side, cloned into every session.
pub type WriterTx = mpsc::Sender<WriteJob>;

/// Starts the writer. It runs until every [`WriterTx`] is dropped and the
/// queue is drained, then the returned task completes. It needs only the
/// telemetry side of a store (tests/simulation.rs gives it a model).
pub fn spawn(
    store: Arc<dyn TelemetryStore>,
    cfg: WriterConfig,
    events: Events,
) -> (WriterTx, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    let task = tokio::spawn(run(store, cfg, events, rx));
    (tx, task)
}

async fn run(
    store: Arc<dyn TelemetryStore>,
    cfg: WriterConfig,
    events: Events,
    mut rx: mpsc::Receiver<WriteJob>,
) {
    let mut healthy = true;
    // When the previous commit started, for pacing.
    let mut last_start: Option<tokio::time::Instant> = None;
    // One timer for every batch's wait, reset per batch rather than made
    // per job: a timer made afresh for each job that arrives while the
    // batch waits registers and deregisters under the timer wheel's lock
    // each time (half a registration per message at 10,000 quiet devices).
    let mut pause = pause::Pause::new(cfg.pace_timer);
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut rows = jobs[0].records.len() + jobs[0].reports.len();
        let arrived = tokio::time::Instant::now();
        let paced = last_start
            .map(|t| t + cfg.min_commit_interval)
            .filter(|&t| t > arrived);
        let deadline = match paced {
            Some(t) => t.max(arrived + cfg.batch_delay),
            None => arrived + cfg.batch_delay,
        };
        let waits = deadline > arrived;
        if waits && pause.deadline() != deadline {
            pause.reset(deadline);
        }
        while rows < cfg.batch_max_rows {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !waits {
                        break;
                    }
                    tokio::select! {
                        job = rx.recv() => match job {
                            Some(job) => job,
                            None => break,
                        },
                        () = pause.wait() => break,
                    }
                }
            };
            rows += job.records.len() + job.reports.len();
            jobs.push(job);
        }
        if paced.is_some() {
            metrics::counter!("furrow_writer_paced_commits_total").increment(1);
        }
        last_start = Some(tokio::time::Instant::now());
        metrics::gauge!("furrow_writer_queue_depth").set(rx.len() as f64);

        let mut batch = Batch {
            records: Vec::with_capacity(rows),
            rejections: Vec::new(),
            reports: Vec::new(),
        };
        let mut owners: Vec<Owner> = Vec::with_capacity(jobs.len());
        // (device id, its records in the batch), for events after the commit.
        let mut names: Vec<(Arc<str>, usize)> = Vec::new();
        // (device id, its reports in the batch), likewise.
        let mut reporters: Vec<(Arc<str>, usize)> = Vec::new();
        for job in jobs {
            if events.enabled() {
                names.push((Arc::clone(&job.device_id), job.records.len()));
            }
            batch.records.extend(job.records);
            if !job.reports.is_empty() {
                reporters.push((Arc::clone(&job.device_id), job.reports.len()));
                batch.reports.extend(job.reports);
            }
            if job.rejected_upto > 0 {
                batch.rejections.push((job.device, job.rejected_upto));
            }
            match owners.last_mut() {
                Some(o) if Arc::ptr_eq(&o.cell, &job.owner) => {
                    o.ticket = job.ticket;
                    o.ack = job.ack;
                }
                _ => owners.push(Owner {
                    cell: job.owner,
                    ticket: job.ticket,
                    device: job.device,
                    ack: job.ack,
                }),
            }
        }
        let batch = Arc::new(batch);

        let mut backoff = Duration::from_millis(10);
        let appended = loop {
            let started = Instant::now();
            match store.append(Arc::clone(&batch)).await {
                Ok(appended) => {
                    metrics::histogram!("furrow_store_commit_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("furrow_store_batch_rows")
                        .record(batch.records.len() as f64);
                    metrics::counter!("furrow_telemetry_stored_total")
                        .increment(batch.records.len() as u64);
                    crate::live::live().acked(batch.records.len() as u64);
                    if !healthy {
                        tracing::info!("storage commits succeed again");
                        healthy = true;
                        cfg.healthy.store(true, Ordering::Release);
                    }
                    break appended;
                }
                Err(e) => {
                    metrics::counter!("furrow_store_commit_errors_total").increment(1);
                    if healthy {
                        tracing::error!(error = %e, rows = batch.records.len(), "storage commit failed; retrying, ACKs are held");
                        healthy = false;
                        cfg.healthy.store(false, Ordering::Release);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        // Refusals reach their session before the ticket that covers them.
        for r in &appended.refused {
            metrics::counter!("furrow_state_reports_rejected_total", "reason" => "document")
                .increment(1);
            if let Some(Owner { cell, .. }) = owners.iter().find(|o| o.device == r.device) {
                cell.refuse(Refusal {
                    seq: r.seq,
                    code: r.code,
                    reason: r.reason.clone(),
                });
            }
        }
        if !batch.reports.is_empty() {
            metrics::counter!("furrow_state_reports_stored_total")
                .increment((batch.reports.len() - appended.refused.len()) as u64);
        }
        for o in owners {
            o.cell.publish(o.ticket, o.ack.as_ref());
        }
        // After the ACKs are released: events never delay them.
        let mut records = batch.records.iter();
        for (device_id, n) in &names {
            for r in records.by_ref().take(*n) {
                events.telemetry(device_id, r);
            }
        }
        let mut reports = batch.reports.iter();
        for (device_id, n) in &reporters {
            for r in reports.by_ref().take(*n) {
                let refused = appended
                    .refused
                    .iter()
                    .any(|x| x.device == r.device && x.seq == r.seq);
                if !refused {
                    events.reported(device_id, r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        Appended, DeviceSeqs, StorageInfo, StoreError, StoredTelemetry, TelemetryRange,
    };
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::sync::Mutex;

    /// Records when each commit started and how many rows it held.
    #[derive(Default)]
    struct Commits(Mutex<Vec<(tokio::time::Instant, usize)>>);

    #[async_trait]
    impl TelemetryStore for Commits {
        async fn append(&self, batch: Arc<Batch>) -> Result<Appended, StoreError> {
            let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
            c.push((tokio::time::Instant::now(), batch.records.len()));
            Ok(Appended::default())
        }
        async fn device_seqs(&self, _: DeviceKey) -> Result<DeviceSeqs, StoreError> {
            Err(StoreError::Config("not in this test".into()))
        }
        async fn telemetry(
            &self,
            _: &str,
            _: TelemetryRange,
            _: u32,
        ) -> Result<Vec<StoredTelemetry>, StoreError> {
            Err(StoreError::Config("not in this test".into()))
        }
        async fn storage_info(&self) -> Result<StorageInfo, StoreError> {
            Err(StoreError::Config("not in this test".into()))
        }
    }

    fn job(owner: &Arc<AckCell>, device: DeviceKey, seq: u64) -> WriteJob {
        WriteJob {
            owner: Arc::clone(owner),
            ticket: seq,
            device,
            device_id: Arc::from(format!("d{device}")),
            records: vec![TelemetryRecord {
                device,
                seq,
                timestamp_ms: 0,
                received_ms: 0,
                content_type: 0,
                payload: Bytes::from_static(b"{}"),
            }],
            rejected_upto: 0,
            ack: None,
            reports: Vec::new(),
        }
    }

    fn start(interval_ms: u64, max_rows: usize) -> (Arc<Commits>, WriterTx) {
        start_with(interval_ms, max_rows, PaceTimer::Runtime)
    }

    fn start_with(
        interval_ms: u64,
        max_rows: usize,
        pace_timer: PaceTimer,
    ) -> (Arc<Commits>, WriterTx) {
        let store = Arc::new(Commits::default());
        let (tx, _task) = spawn(
            Arc::clone(&store) as Arc<dyn TelemetryStore>,
            WriterConfig {
                batch_max_rows: max_rows,
                batch_delay: Duration::ZERO,
                min_commit_interval: Duration::from_millis(interval_ms),
                pace_timer,
                queue_capacity: 64,
                healthy: Arc::default(),
            },
            Events::off(),
        );
        (store, tx)
    }

    /// A loopback connection: (the gateway's end, the device's end).
    fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let device = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (gateway, _) = l.accept().unwrap();
        (gateway, device)
    }

    fn ack(seq: u64) -> AckOnCommit {
        AckOnCommit {
            seq,
            read_at: tokio::time::Instant::now(),
        }
    }

    /// The next `n` bytes the device receives.
    fn receive(device: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
        use std::io::Read;
        device.set_nonblocking(false).unwrap();
        device
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = vec![0u8; n];
        device.read_exact(&mut got).unwrap();
        got
    }

    /// Whether the device has received nothing (more).
    fn nothing_received(device: &mut std::net::TcpStream) -> bool {
        use std::io::Read;
        device.set_nonblocking(true).unwrap();
        matches!(device.read(&mut [0u8; 64]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    fn woken(cell: &AckCell) -> bool {
        futures_util::FutureExt::now_or_never(cell.changed()).is_some()
    }

    /// While the session lends its socket, a commit's ACK goes straight to
    /// the device and the session sleeps on; once it takes the socket
    /// back, commits wake it again and nothing more is written.
    #[test]
    fn an_armed_session_gets_its_acks_written_without_waking() {
        use furrow_proto::message::{ack_frame, ACK_FRAME_LEN};
        use std::os::fd::AsRawFd;
        let (gateway, mut device) = socket_pair();
        let cell = AckCell::default();
        let armed = cell.arm(gateway.as_raw_fd(), 0);
        cell.publish(3, Some(&ack(7)));
        cell.publish(4, Some(&ack(9)));
        assert_eq!(cell.committed(), 4);
        assert!(!woken(&cell), "the session sleeps on");
        assert_eq!(
            armed.disarm(),
            Some(WriterAck {
                seq: 9,
                written: ACK_FRAME_LEN
            })
        );
        assert_eq!(
            receive(&mut device, 2 * ACK_FRAME_LEN),
            [ack_frame(7), ack_frame(9)].concat()
        );

        cell.publish(5, Some(&ack(11)));
        assert!(woken(&cell), "taken back: the session writes its ACK");
        // A commit without an ACK of its own (a duplicate waits) wakes the
        // session even while armed.
        let armed = cell.arm(gateway.as_raw_fd(), 0);
        cell.publish(6, None);
        assert!(woken(&cell));
        drop(armed);
        cell.publish(7, Some(&ack(12)));
        assert!(woken(&cell), "a dropped guard takes the socket back too");
        assert!(nothing_received(&mut device));
    }

    /// A refused report's REJECT comes before the ACK that covers it, and
    /// only the session writes REJECTs: the writer leaves that ACK to it.
    #[test]
    fn a_refusal_leaves_the_ack_to_the_session() {
        use std::os::fd::AsRawFd;
        let (gateway, mut device) = socket_pair();
        let cell = AckCell::default();
        let armed = cell.arm(gateway.as_raw_fd(), 0);
        cell.refuse(Refusal {
            seq: 2,
            code: furrow_proto::ErrorCode::InvalidPayload,
            reason: "no".into(),
        });
        cell.publish(1, Some(&ack(2)));
        assert!(woken(&cell));
        assert_eq!(armed.disarm(), None);
        assert!(nothing_received(&mut device));
    }

    /// Every connected device holds one cell (with its registry handle):
    /// this notices a field that grows it into the next allocation size
    /// class (glibc: the Arc's two counts, the cell, 8 bytes of header,
    /// rounded up to 16).
    #[test]
    fn a_cell_stays_small() {
        let size = std::mem::size_of::<AckCell>();
        assert!(size <= 184, "an AckCell grew to {size} bytes");
    }

    /// Jobs from many devices that arrive within one interval of a commit
    /// share the next one, which starts one interval after the first.
    #[tokio::test(start_paused = true)]
    async fn commits_closer_than_the_interval_wait_and_gather() {
        let (store, tx) = start(10, 1_000);
        let cells: Vec<Arc<AckCell>> = (0..5).map(|_| Arc::default()).collect();
        let t0 = tokio::time::Instant::now();
        tx.send(job(&cells[0], 0, 1)).await.ok();
        tokio::time::sleep(Duration::from_millis(1)).await;
        for (i, cell) in cells.iter().enumerate().skip(1) {
            tx.send(job(cell, i as DeviceKey, 1)).await.ok();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let c = store.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(
            (c[0].0 - t0, c[0].1),
            (Duration::ZERO, 1),
            "the first is at once"
        );
        assert_eq!((c[1].0 - t0, c[1].1), (Duration::from_millis(10), 4));
        assert!(cells.iter().all(|c| c.committed() == 1));
    }

    /// The gateway's own timer (a timerfd, on the real clock) paces the
    /// same way: the jobs behind a commit wait for the interval and go
    /// together.
    #[tokio::test]
    async fn the_precise_timer_paces_and_gathers_too() {
        let (store, tx) = start_with(200, 1_000, PaceTimer::Precise);
        let commits = || store.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cells: Vec<Arc<AckCell>> = (0..5).map(|_| Arc::default()).collect();
        tx.send(job(&cells[0], 0, 1)).await.ok();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while commits().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for (i, cell) in cells.iter().enumerate().skip(1) {
            tx.send(job(cell, i as DeviceKey, 1)).await.ok();
        }
        while commits().len() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let c = commits();
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(
            (c[0].1, c[1].1),
            (1, 4),
            "the four behind the first go together"
        );
        assert!(
            c[1].0 - c[0].0 >= Duration::from_millis(200),
            "the second waited out the interval: {:?}",
            c[1].0 - c[0].0
        );
        assert!(cells.iter().all(|c| c.committed() == 1));
    }

    /// After a pause longer than the interval nothing waits; a full batch
    /// never waits either.
    #[tokio::test(start_paused = true)]
    async fn pacing_costs_nothing_after_a_pause_or_for_a_full_batch() {
        let (store, tx) = start(10, 3);
        let cell: Arc<AckCell> = Arc::default();
        tx.send(job(&cell, 0, 1)).await.ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t1 = tokio::time::Instant::now();
        tx.send(job(&cell, 0, 2)).await.ok();
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Within the interval, but three rows fill the batch.
        for seq in 3..6 {
            tx.send(job(&cell, 0, seq)).await.ok();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let c = store.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(
            (c[1].0 - t1, c[1].1),
            (Duration::ZERO, 1),
            "after a pause: at once"
        );
        assert_eq!(c[2].1, 3);
        assert!(
            c[2].0 - t1 < Duration::from_millis(10),
            "a full batch does not wait"
        );
        assert_eq!(cell.committed(), 5);
    }

    /// With the interval at zero, commits follow each other back to back.
    #[tokio::test(start_paused = true)]
    async fn zero_interval_commits_at_once() {
        let (store, tx) = start(0, 1_000);
        let cell: Arc<AckCell> = Arc::default();
        for seq in 1..4 {
            tx.send(job(&cell, 0, seq)).await.ok();
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let c = store.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert_eq!(c.len(), 3, "{c:?}");
    }
}
