//! The sans-I/O core of an authenticated session: events in, effects out.
//!
//! A [`Machine`] is what a device's session *is* once WELCOME is sent: the
//! ACK bookkeeping, the records staged for the writer, the commands in
//! flight, the keepalive clock and the throttle. It has no socket, no clock
//! and spawns nothing (in the manner of quinn-proto's `Connection`):
//!
//! * in: decoded frames ([`Machine::on_frame`]), the writer's progress
//!   ([`Machine::on_commit`]), the time ([`Machine::on_timer`]), a kick or
//!   shutdown ([`Machine::close`]), the device's open commands
//!   ([`Machine::commands_due`]), the peer closing ([`Machine::peer_closed`]);
//! * out: encoded frames ([`Machine::out`]), a [`WriteJob`] for the writer
//!   ([`Machine::take_job`]), store work ([`Machine::take_effects`]), when to
//!   look again ([`Machine::wake_at`]), whether to read at all
//!   ([`Machine::room`]), and why it ended ([`Machine::ended`]).
//!
//! The driver (`driver.rs`) moves bytes and waits; everything it decides
//! comes from here, so the rules can be tested and fuzzed without a
//! gateway (see the tests below and `tests/session_machine.rs`). Message
//! families are handled in `messages/`, one file each.

use std::collections::VecDeque;
use std::sync::Arc;

use furrow_proto::{DecodeError, ErrorCode, GoodbyeCode, Message, MessageType, RawFrame};
use tokio::time::{Duration, Instant};

use super::acks::AckTracker;
use super::flow::Keepalive;
use super::outbox::Outbox;
use crate::devices::registry::DeviceSlot;
use crate::devices::state::StateLimits;
use crate::ingress::limits::Throttle;
use crate::store::{CommandOutcome, DeviceKey, ReportRecord, TelemetryRecord};
use crate::writer::{AckCell, WriteJob};

/// How often a duplicate waiting on another connection's commit looks
/// again at the device's resolved watermark.
const DEVICE_POLL: Duration = Duration::from_millis(20);

/// A fatal condition: ERROR `code` with `message`, then close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fatal(pub ErrorCode, pub String);

/// Why an active session drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Say GOODBYE with this code after draining.
    Goodbye(GoodbyeCode),
    /// The device said GOODBYE: ACK what was read, then close.
    DeviceGoodbye,
    /// The device closed its side: store what was read, ACK if possible.
    PeerClosed,
}

/// How the active phase ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Stop reading, store and ACK what was read, then close.
    Drain(Drain),
    /// Send ERROR and close (what was read is still stored).
    Fatal(Fatal),
}

/// Store work the session asks for; the driver runs it in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The device confirmed a desired state version.
    AckDesired {
        /// The device.
        device: DeviceKey,
        /// The version.
        version: u64,
    },
    /// These commands were sent: mark them delivered.
    MarkDelivered(Vec<u64>),
    /// The device answered a command.
    CompleteCommand {
        /// The device.
        device: DeviceKey,
        /// Which command.
        command_id: u64,
        /// Its result.
        outcome: CommandOutcome,
    },
}

/// The limits a session reads by.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// TELEMETRY frames unacknowledged before the session stops reading.
    pub max_inflight: usize,
    /// Bytes queued for the device before the session stops reading.
    pub max_unsent: usize,
    /// Device state: document limits and the REPORT rate.
    pub state: StateCfg,
}

/// Device state settings of a session (`[state]`).
#[derive(Debug, Clone, Copy)]
pub struct StateCfg {
    /// Size and depth of documents and patches.
    pub limits: StateLimits,
    /// Time between REPORTs at the allowed rate (zero: no limit).
    pub report_interval: Duration,
    /// REPORTs allowed at once.
    pub report_burst: u32,
}

impl Default for StateCfg {
    fn default() -> Self {
        Self {
            limits: StateLimits::default(),
            report_interval: Duration::from_millis(100),
            report_burst: 20,
        }
    }
}

/// Who the session is for.
pub struct Identity {
    /// The device id.
    pub device_id: Arc<str>,
    /// Its store key.
    pub key: DeviceKey,
    /// Its watermarks, shared with its other sessions.
    pub slot: Arc<DeviceSlot>,
    /// Where the writer reports this session's commits.
    pub cell: Arc<AckCell>,
}

/// An authenticated session's state (see the module docs).
pub struct Machine {
    pub(super) id: Identity,
    pub(super) limits: Limits,
    pub(super) acks: AckTracker,
    /// Highest ticket the writer reported committed.
    committed: u64,
    /// Records read but not yet in a job.
    pub(super) staged: Vec<TelemetryRecord>,
    /// State reports read but not yet in a job.
    pub(super) staged_reports: Vec<ReportRecord>,
    /// Extensions granted in WELCOME (`furrow_proto::CAP_STATE`).
    pub(super) caps: u32,
    /// Highest desired version sent on this connection.
    pub(super) desired_sent: u64,
    /// The firmware offer standing on this connection (capability
    /// FIRMWARE).
    pub(super) firmware: Option<Box<super::messages::firmware::Transfer>>,
    /// REPORT pacing (GCRA): when the device's reports would be on time
    /// at the allowed rate; `None` when it is not ahead of it.
    pub(super) report_tat: Option<Instant>,
    /// The time of the frames being handled (from [`Self::accepts_frame`]).
    pub(super) frame_time: Instant,
    /// Highest seq rejected but not yet handed to the writer, 0 if none.
    pub(super) staged_reject: u64,
    /// Ticket of the last staged record or rejection.
    pub(super) ticket: u64,
    /// Ticket of the last rejection mark: the session holds its device until
    /// the mark is committed, so the next session reads it back.
    pub(super) mark_ticket: u64,
    /// A job the writer has not taken yet.
    pending_job: Option<WriteJob>,
    /// Commands sent on this connection and not yet answered.
    pub(super) sent_commands: Vec<u64>,
    /// `(last ticket, when read)` of each batch that staged telemetry, for
    /// the ACK latency histogram (one sample per ACK: its oldest read).
    read_marks: VecDeque<(u64, Instant)>,
    /// Ticket before the current batch of frames, if one is open.
    batch: Option<u64>,
    pub(super) out: Outbox,
    keepalive: Keepalive,
    /// `limits.telemetry_rate_per_device`; out of tokens, the session stops
    /// reading: a backpressure pause.
    throttle: Option<Throttle>,
    pub(super) effects: Vec<Effect>,
    pub(super) end: Option<End>,
    pub(super) draining: bool,
    /// The last [`Self::room`] found the throttle out of tokens.
    throttled: bool,
    /// Since when the session has been quiet: its last frame, its start,
    /// or its last resumption from the parking lot.
    quiet_since: Instant,
    /// When the device last sent a frame, if it has on this connection.
    last_frame: Option<Instant>,
    /// The time between the device's last two batches of frames: how
    /// chatty it is (see [`Self::park_after`]).
    gap: Option<Duration>,
}

/// When a session parks (`sessions.park_after_ms`, `park_chatty_ms`).
#[derive(Debug, Clone, Copy)]
pub struct ParkPolicy {
    /// Quiet time before a session parks.
    pub after: Duration,
    /// A device whose last two frames came less than this apart is chatty:
    /// it parks only after this long quiet, so that a device sending every
    /// second keeps its task instead of paying a wake-up per message.
    pub chatty: Duration,
}

/// A settled session's state while parked: only what outlives a quiet
/// spell, no queue and no buffer (see [`Machine::park`]). Who the session
/// is for stays with the driver, which holds it anyway.
pub struct Parked {
    slot: Arc<DeviceSlot>,
    /// The last ticket used, which every later job continues from.
    ticket: u64,
    /// Commands sent and not yet answered (usually none).
    sent_commands: Option<Box<[u64]>>,
    keepalive_period_ms: u32,
    /// Extensions granted in WELCOME.
    caps: u8,
    deadline: Instant,
    /// When the device last sent a frame, as ms before `deadline` plus
    /// one (0: none on this connection), so its next frame's gap is known.
    last_frame_ms: u32,
    /// A throttle that is not full again (usually none: a full one is
    /// made anew at resumption).
    throttle: Option<Box<Throttle>>,
    frames_out: u64,
}

impl Parked {
    /// When the device is judged dead if it stays silent.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Frames sent on this connection so far.
    pub fn frames_out(&self) -> u64 {
        self.frames_out
    }
}

impl Machine {
    /// A session that has just queued WELCOME into `out`.
    pub fn new(
        id: Identity,
        limits: Limits,
        keepalive: Duration,
        throttle: Option<Throttle>,
        out: Outbox,
        now: Instant,
    ) -> Self {
        Self {
            id,
            limits,
            acks: AckTracker::new(),
            committed: 0,
            staged: Vec::new(),
            staged_reports: Vec::new(),
            caps: 0,
            desired_sent: 0,
            firmware: None,
            report_tat: None,
            frame_time: now,
            staged_reject: 0,
            ticket: 0,
            mark_ticket: 0,
            pending_job: None,
            sent_commands: Vec::new(),
            read_marks: VecDeque::new(),
            batch: None,
            out,
            keepalive: Keepalive::new(keepalive, now),
            throttle,
            effects: Vec::new(),
            end: None,
            draining: false,
            throttled: false,
            quiet_since: now,
            last_frame: None,
            gap: None,
        }
    }

    /// Whether the session has nothing in flight and nothing to say, so it
    /// may be parked: everything it took is stored and ACKed and its
    /// rejection marks committed, nothing waits to be sent or stored.
    pub fn parkable(&self) -> bool {
        self.end.is_none()
            && !self.draining
            && !self.throttled
            && self.settled()
            && self.out.is_empty()
            && self.effects.is_empty()
            && self.batch.is_none()
            && self.report_tat.is_none()
            && self.firmware.is_none()
    }

    /// Since when the session has been quiet: its last frame, its start,
    /// or its resumption (so a resumed session reads before it parks
    /// again).
    pub fn quiet_since(&self) -> Instant {
        self.quiet_since
    }

    /// How long this session stays quiet before it parks: `policy.after`,
    /// or `policy.chatty` for a device that sends more often than that.
    pub fn park_after(&self, policy: ParkPolicy) -> Duration {
        match self.gap {
            Some(gap) if gap < policy.chatty => policy.chatty.max(policy.after),
            _ => policy.after,
        }
    }

    /// Shrinks a [`Self::parkable`] session to what a quiet spell keeps.
    pub fn park(self, now: Instant) -> Parked {
        let (period, deadline) = self.keepalive.park();
        let throttle = self
            .throttle
            .and_then(|mut t| (!t.is_full(now)).then(|| Box::new(t)));
        Parked {
            slot: self.id.slot,
            ticket: self.ticket,
            sent_commands: (!self.sent_commands.is_empty())
                .then(|| self.sent_commands.into_boxed_slice()),
            keepalive_period_ms: u32::try_from(period.as_millis()).unwrap_or(u32::MAX),
            caps: u8::try_from(self.caps).unwrap_or(u8::MAX),
            deadline,
            last_frame_ms: self.last_frame.map_or(0, |at| {
                let before = deadline.saturating_duration_since(at).as_millis();
                u32::try_from(before).unwrap_or(u32::MAX - 1) + 1
            }),
            throttle,
            frames_out: self.out.frames(),
        }
    }

    /// Resumes a parked session for `device_id` (`key`, woken through
    /// `cell`) at `now`; `fresh_throttle` stands in for a throttle that was
    /// full when it parked.
    pub fn unpark(
        p: Parked,
        device_id: Arc<str>,
        key: DeviceKey,
        cell: Arc<AckCell>,
        limits: Limits,
        fresh_throttle: Option<Throttle>,
        now: Instant,
    ) -> Self {
        let period = Duration::from_millis(u64::from(p.keepalive_period_ms));
        let id = Identity {
            device_id,
            key,
            slot: p.slot,
            cell,
        };
        let throttle = match p.throttle {
            Some(t) => Some(*t),
            None => fresh_throttle,
        };
        let mut m = Self::new(
            id,
            limits,
            period,
            throttle,
            Outbox::resumed(p.frames_out),
            now,
        );
        // Everything up to the last ticket was committed before parking.
        m.ticket = p.ticket;
        m.committed = p.ticket;
        m.sent_commands = p.sent_commands.map(Vec::from).unwrap_or_default();
        m.caps = u32::from(p.caps);
        m.keepalive = Keepalive::resume(period, p.deadline);
        m.last_frame = p
            .last_frame_ms
            .checked_sub(1)
            .and_then(|ms| p.deadline.checked_sub(Duration::from_millis(u64::from(ms))));
        m
    }

    /// The device id.
    pub fn device_id(&self) -> &Arc<str> {
        &self.id.device_id
    }

    /// Frames waiting for the transport.
    pub fn out(&mut self) -> &mut Outbox {
        &mut self.out
    }

    /// Why the active phase ended, once it has.
    pub fn ended(&self) -> Option<&End> {
        self.end.as_ref()
    }

    fn end_with(&mut self, end: End) {
        self.end.get_or_insert(end);
    }

    /// Ends the active phase with ERROR (the driver found the writer gone).
    pub fn fail(&mut self, fatal: Fatal) {
        self.end_with(End::Fatal(fatal));
    }

    /// The device's store key.
    pub fn key(&self) -> DeviceKey {
        self.id.key
    }

    /// Ends the active phase for a kick, a revocation or shutdown.
    pub fn close(&mut self, code: GoodbyeCode) {
        self.end_with(End::Drain(Drain::Goodbye(code)));
    }

    /// The device closed its sending side (or the socket failed).
    pub fn peer_closed(&mut self) {
        self.end_with(End::Drain(Drain::PeerClosed));
    }

    /// Whether another buffered frame may be handled now: the window, the
    /// outbox and the throttle have room (always while draining, which
    /// handles what was already read).
    pub fn accepts_frame(&mut self, now: Instant) -> bool {
        self.frame_time = now;
        if self.draining {
            return self.end.is_none();
        }
        self.end.is_none()
            && self.acks.outstanding() < self.limits.max_inflight
            && self.out.len() < self.limits.max_unsent
            && self.throttle.as_mut().is_none_or(|t| t.ready(now))
            && self.reports_ready(now)
            && self.firmware_room()
    }

    /// Extensions granted in WELCOME.
    pub fn set_capabilities(&mut self, caps: u32) {
        self.caps = caps;
    }

    /// Whether the device speaks device state.
    pub fn has_state(&self) -> bool {
        self.caps & furrow_proto::CAP_STATE != 0
    }

    /// Whether the REPORT pace lets the session read on (a burst's worth
    /// ahead of the rate at most). Forgets a debt that is paid.
    fn reports_ready(&mut self, now: Instant) -> bool {
        let Some(tat) = self.report_tat else {
            return true;
        };
        if tat <= now {
            self.report_tat = None;
            return true;
        }
        let burst = self.limits.state.report_interval * self.limits.state.report_burst;
        tat <= now + burst
    }

    /// When the REPORT pace lets the session read again.
    fn reports_due(&self) -> Option<Instant> {
        let tat = self.report_tat?;
        let burst = self.limits.state.report_interval * self.limits.state.report_burst;
        Some(tat.checked_sub(burst).unwrap_or(tat))
    }

    /// Handles one decoded frame; `now_ms` is the wall clock (the receive
    /// time of its readings).
    pub fn on_frame(&mut self, frame: RawFrame, now_ms: u64) {
        if self.batch.is_none() {
            self.batch = Some(self.ticket);
        }
        let kind = frame.kind;
        if kind == MessageType::Telemetry {
            if let Some(t) = &mut self.throttle {
                t.take();
            }
        }
        // The type is known; may it come now, from a device? Then the body.
        if !kind.sent_by_device() || kind == MessageType::Hello {
            let msg = format!("{} is not allowed from a device now", kind.name());
            return self.end_with(End::Fatal(Fatal(ErrorCode::ProtocolError, msg)));
        }
        if kind.capability().is_some_and(|bit| self.caps & bit == 0) {
            let msg = format!("{} needs a capability WELCOME did not grant", kind.name());
            return self.end_with(End::Fatal(Fatal(ErrorCode::ProtocolError, msg)));
        }
        let msg = match Message::from_frame(frame) {
            Ok(m) => m,
            Err(e) => return self.end_with(End::Fatal(Fatal(e.code(), e.to_string()))),
        };
        match msg {
            Message::Telemetry(t) => self.on_telemetry(t, now_ms),
            Message::Ping { nonce } => self.on_ping(nonce),
            Message::Pong { .. } => {}
            Message::CommandResult(r) => self.on_command_result(r),
            Message::Goodbye(_) => self.end_with(End::Drain(Drain::DeviceGoodbye)),
            Message::Report(r) => self.on_report(r, now_ms),
            Message::DesiredAck { version } => self.on_desired_ack(version),
            Message::ChunkRequest(r) => self.on_chunk_request(r),
            _ => {
                let m = format!("{} is not allowed from a device", kind.name());
                self.end_with(End::Fatal(Fatal(ErrorCode::ProtocolError, m)));
            }
        }
    }

    /// The bytes read do not frame: the ERROR they earn.
    pub fn on_decode_error(&mut self, e: DecodeError) {
        self.end_with(End::Fatal(Fatal(e.code(), e.to_string())));
    }

    /// Closes a batch of frames read together. Returns whether it held a
    /// frame (then the device was seen now).
    pub fn end_batch(&mut self, now: Instant) -> bool {
        let Some(before) = self.batch.take() else {
            return false;
        };
        self.keepalive.frame_read(now);
        self.quiet_since = now;
        if let Some(last) = self.last_frame {
            self.gap = Some(now.saturating_duration_since(last));
        }
        self.last_frame = Some(now);
        if self.ticket > before {
            self.read_marks.push_back((self.ticket, now));
        }
        true
    }

    /// Moves staged records into the job for the writer and hands it out.
    /// A job the writer has no room for goes back with [`Self::defer_job`].
    pub fn take_job(&mut self) -> Option<WriteJob> {
        if !self.staged.is_empty() || self.staged_reject > 0 || !self.staged_reports.is_empty() {
            let records = std::mem::take(&mut self.staged);
            let reports = std::mem::take(&mut self.staged_reports);
            let rejected = std::mem::take(&mut self.staged_reject);
            match &mut self.pending_job {
                Some(job) => {
                    job.records.extend(records);
                    job.reports.extend(reports);
                    job.ticket = self.ticket;
                    job.rejected_upto = job.rejected_upto.max(rejected);
                }
                None => {
                    self.pending_job = Some(WriteJob {
                        owner: Arc::clone(&self.id.cell),
                        ticket: self.ticket,
                        device: self.id.key,
                        device_id: Arc::clone(&self.id.device_id),
                        records,
                        reports,
                        rejected_upto: rejected,
                        ack: None,
                    })
                }
            }
            if let Some(job) = &mut self.pending_job {
                // Everything read so far resolves with this job's commit
                // (unless a duplicate waits on the device): its ACK.
                job.ack = self
                    .acks
                    .ack_on_commit()
                    .zip(self.read_marks.front())
                    .map(|(seq, &(_, read_at))| crate::writer::AckOnCommit { seq, read_at });
            }
        }
        self.pending_job.take()
    }

    /// The last ACK this session has queued or had written.
    pub fn acked(&self) -> u64 {
        self.acks.last_acked()
    }

    /// The storage writer wrote ACK `ack.seq` (see
    /// [`crate::writer::AckCell::arm`]): it is not sent again, and the rest
    /// of a frame it only began comes before anything else.
    pub fn on_writer_ack(&mut self, ack: crate::writer::WriterAck) {
        self.out.writer_ack(ack.seq, ack.written);
        self.acks.acked_elsewhere(ack.seq);
        // Its latency was measured where it was written.
        let committed = self.id.cell.committed();
        while self
            .read_marks
            .front()
            .is_some_and(|&(ticket, _)| ticket <= committed)
        {
            self.read_marks.pop_front();
        }
    }

    /// The writer's queue was full: the job waits here (and the session
    /// stops reading until it is taken).
    pub fn defer_job(&mut self, job: WriteJob) {
        self.pending_job = Some(job);
    }

    /// Whether a job waits for room in the writer's queue.
    pub fn has_pending_job(&self) -> bool {
        self.pending_job.is_some()
    }

    /// The writer committed this session's tickets up to `committed`.
    pub fn on_commit(&mut self, committed: u64) {
        self.committed = self.committed.max(committed);
    }

    /// Pops resolved entries; queues the ACK they allow when `ack` (not
    /// when the socket is gone); then serves firmware requests held for
    /// room in the outbox (behind the ACK: ACKs never wait for chunks).
    pub fn advance(&mut self, now: Instant, ack: bool) {
        self.advance_acks(now, ack);
        if ack && self.end.is_none() && !self.draining {
            self.serve_chunks(now);
        }
    }

    fn advance_acks(&mut self, now: Instant, ack: bool) {
        // Reports a commit refused: REJECT before the ACK that covers them.
        for r in self.id.cell.take_refused() {
            if ack {
                self.out.queue(&Message::Reject(furrow_proto::Reject {
                    seq: r.seq,
                    code: r.code as u16,
                    reason: furrow_proto::Str::from(r.reason),
                }));
            }
        }
        let adv = self.acks.advance(self.committed, self.id.slot.resolved());
        if let Some(seq) = adv.resolved {
            self.id.slot.resolve(seq);
        }
        let Some(seq) = adv.ack.filter(|_| ack) else {
            return;
        };
        self.out.queue_ack(seq);
        let mut oldest = None;
        while let Some(&(ticket, at)) = self.read_marks.front() {
            if ticket > self.committed {
                break;
            }
            oldest.get_or_insert(at);
            self.read_marks.pop_front();
        }
        if let Some(at) = oldest {
            let latency = now.saturating_duration_since(at);
            crate::metrics::wire()
                .ack_latency
                .record(latency.as_secs_f64());
            crate::live::live().ack_latency(latency);
        }
    }

    /// Everything this session took is stored or rejected, and its
    /// rejection marks committed: its device may pass to the next session.
    pub fn settled(&self) -> bool {
        self.acks.outstanding() == 0
            && self.pending_job.is_none()
            && self.staged.is_empty()
            && self.staged_reports.is_empty()
            && self.staged_reject == 0
            && self.committed >= self.mark_ticket
    }

    /// Whether the window, the writer queue, the outbox and the throttle
    /// leave room to take more frames.
    pub fn room(&mut self, now: Instant) -> bool {
        if self.end.is_some() || self.draining {
            return false;
        }
        self.throttled =
            self.throttle.as_mut().is_some_and(|t| !t.ready(now)) || !self.reports_ready(now);
        self.acks.outstanding() < self.limits.max_inflight
            && self.pending_job.is_none()
            && self.out.len() < self.limits.max_unsent
            && !self.throttled
            && self.firmware_room()
    }

    /// Whether the driver waits for the socket to be readable now (time
    /// spent not reading does not count against the keepalive).
    pub fn set_reading(&mut self, can_read: bool, now: Instant) {
        self.keepalive.reading(can_read, now);
    }

    /// Bytes arrived from the device.
    pub fn on_bytes(&mut self, now: Instant) {
        self.keepalive.bytes_read(now);
    }

    /// When the driver must call [`Self::on_timer`] at the latest (`None`:
    /// only other events matter).
    pub fn wake_at(&self, can_read: bool, now: Instant) -> Option<Instant> {
        let mut at = None;
        if can_read {
            at = Some(self.keepalive.deadline());
        }
        // A duplicate waits on another connection's commit: poll.
        if self.acks.waits_on_device(self.id.slot.resolved()) {
            at = Some(now + DEVICE_POLL);
        }
        // Throttled: look again when the next token is due.
        if let Some(t) = self.throttle.as_ref().filter(|_| self.throttled) {
            let due = t.due();
            at = Some(at.map_or(due, |a: Instant| a.min(due)));
        }
        if let Some(due) = self.reports_due().filter(|_| self.throttled) {
            at = Some(at.map_or(due, |a: Instant| a.min(due)));
        }
        // Firmware requests held for the pace.
        if let Some(due) = self.firmware_due() {
            at = Some(at.map_or(due, |a: Instant| a.min(due)));
        }
        at
    }

    /// The time has come to look: a silent device is dropped at its
    /// keepalive deadline.
    pub fn on_timer(&mut self, now: Instant) {
        if self.end.is_none() && !self.draining {
            self.serve_chunks(now);
        }
        if self.end.is_none() && !self.draining && self.keepalive.expired(now) {
            self.end_with(End::Fatal(Fatal(
                ErrorCode::KeepaliveTimeout,
                "no frame within 1.5 x keepalive".into(),
            )));
        }
    }

    /// Enters draining: frames already read are still handled (at any
    /// rate), nothing more is read. Returns why the active phase ended.
    pub fn start_drain(&mut self) -> Option<End> {
        let end = self.end.take();
        self.draining = true;
        self.throttle = None;
        end
    }

    /// Store work asked for since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Gives back memory an idle session does not need.
    pub fn release_idle(&mut self) {
        self.out.release_idle();
        if self.read_marks.is_empty() && self.read_marks.capacity() > 0 {
            self.read_marks = VecDeque::new();
        }
        if self.staged.is_empty() && self.staged.capacity() > 0 {
            self.staged = Vec::new();
        }
        if self.staged_reports.is_empty() && self.staged_reports.capacity() > 0 {
            self.staged_reports = Vec::new();
        }
    }

    /// TELEMETRY read but not yet acknowledged.
    pub fn outstanding(&self) -> usize {
        self.acks.outstanding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use furrow_proto::{FrameDecoder, Message};

    fn machine(now: Instant) -> Machine {
        Machine::new(
            Identity {
                device_id: Arc::from("d"),
                key: 1,
                slot: Arc::new(DeviceSlot::default()),
                cell: Arc::new(AckCell::default()),
            },
            Limits {
                max_inflight: 4,
                max_unsent: 1 << 16,
                state: StateCfg::default(),
            },
            Duration::from_secs(45),
            None,
            Outbox::new(),
            now,
        )
    }

    fn ping(m: &mut Machine, now: Instant) {
        let mut b = BytesMut::new();
        Message::Ping { nonce: 1 }.encode(&mut b).unwrap();
        let f = FrameDecoder::new(1024).decode(&mut b).unwrap().unwrap();
        m.on_frame(f, 0);
        m.end_batch(now);
        m.out().bytes_mut().clear();
    }

    #[test]
    fn a_chatty_device_parks_later_and_stays_chatty_across_a_park() {
        let policy = ParkPolicy {
            after: Duration::from_millis(250),
            chatty: Duration::from_secs(2),
        };
        let t0 = Instant::now();
        let mut m = machine(t0);
        // No frame yet, then one frame: quiet devices park soon.
        assert_eq!(m.park_after(policy), policy.after);
        ping(&mut m, t0 + Duration::from_secs(1));
        assert_eq!(m.park_after(policy), policy.after);
        // Frames a second apart: chatty.
        ping(&mut m, t0 + Duration::from_secs(2));
        assert_eq!(m.park_after(policy), policy.chatty);
        assert!(m.parkable());
        // Parked and resumed: the next frame's gap counts from the last.
        let p = m.park(t0 + Duration::from_millis(2500));
        let cell = Arc::new(AckCell::default());
        let limits = Limits {
            max_inflight: 4,
            max_unsent: 1 << 16,
            state: StateCfg::default(),
        };
        let resumed = t0 + Duration::from_secs(3);
        let mut m = Machine::unpark(p, Arc::from("d"), 1, cell, limits, None, resumed);
        assert_eq!(m.quiet_since(), resumed);
        ping(&mut m, t0 + Duration::from_millis(3500));
        assert_eq!(
            m.park_after(policy),
            policy.chatty,
            "1.5 s after the last frame"
        );
        // Frames 10 s apart: quiet again.
        ping(&mut m, t0 + Duration::from_secs(16));
        assert_eq!(m.park_after(policy), policy.after);
    }

    #[test]
    fn a_session_with_anything_in_flight_does_not_park() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let mut b = BytesMut::new();
        furrow_proto::message::encode_telemetry(1, 0, 1, b"{}", &mut b).unwrap();
        let f = FrameDecoder::new(1024).decode(&mut b).unwrap().unwrap();
        m.on_frame(f, 0);
        m.end_batch(t0);
        assert!(!m.parkable(), "a reading not yet stored");
        let job = m.take_job().expect("a job");
        assert!(!m.parkable(), "stored but not ACKed");
        m.on_commit(job.ticket);
        m.advance(t0, true);
        assert!(!m.parkable(), "the ACK not yet written");
        m.out().bytes_mut().clear();
        assert!(m.parkable());
    }
}
