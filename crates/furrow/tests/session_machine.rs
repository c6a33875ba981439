//! The sans-I/O session core against the spec, without a socket or a
//! runtime: the handshake decisions (`session::handshake`) and the
//! [`Machine`] are driven the way `session/driver.rs` drives them, beside
//! a model writer and a model store, by a seeded schedule.
//!
//! Each case plays the connections of one device in turn, from the fuzz
//! harness's step sequences (`harness/session.rs`: the committed corpus
//! replays here too). The schedule decides how many jobs the writer queue
//! takes, when the writer commits (and whether it writes the ACK itself),
//! whether the device reads its answers (a slow reader fills the outbox)
//! and whether the gateway crashes (the queue and the device's watermarks
//! are lost, the store is not).
//!
//! Checked:
//! * every answer of a connection that closes is what the spec says for
//!   the bytes sent (the fuzz harness's own check: WELCOME first, the ERROR
//!   the first bad frame earns, PONG per PING, ACKs that never go back and
//!   name seqs sent, the last ACK the highest seq sent);
//! * no ACK before commit: when ACK n leaves, every seq <= n this
//!   connection took is in the model store or was REJECTed;
//! * stored exactly once: the model store refuses a seq twice, across
//!   connections and crashes;
//! * the answer frames, and ACKs only go forward, each sent once, also
//!   when the writer writes a commit's ACK itself (whole, or its first
//!   bytes, the session writing the rest) while the session waits with
//!   nothing unsent (`AckCell::arm`);
//! * only invalid payloads are REJECTed, and only valid ones stored;
//! * WELCOME's `last_seq` is the highest stored seq;
//! * no session is stuck: each one settles within a bounded number of
//!   steps.
//!
//! A failing case prints its seed; `MACHINE_SEED=<n>` replays it alone.

#[path = "harness/drive.rs"]
mod drive;
#[path = "harness/session.rs"]
mod harness;
#[path = "../../../fuzz/replay.rs"]
mod replay;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::BytesMut;
use furrow::devices::registry::DeviceSlot;
use furrow::session::handshake::{self, Certificate};
use furrow::session::machine::{Drain, End, Fatal, Identity, Limits, Machine};
use furrow::session::outbox::Outbox;
use furrow::store::DeviceAuth;
use furrow::writer::{AckCell, WriteJob, WriterAck};
use furrow::Config;
use furrow_proto::message::{ack_frame, ACK_FRAME_LEN};
use furrow_proto::{content, FrameDecoder, Goodbye, Message, MessageType};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::time::Instant;

use drive::{complete_frame, feed, queue_error, Dice};

/// Steps after which a session that has not settled counts as stuck.
const MAX_STEPS: usize = 10_000;

/// The schedule's knobs, drawn once per case.
struct Schedule {
    dice: Dice,
    /// Jobs the writer queue holds.
    queue_capacity: usize,
    /// Percent chance that the writer commits at a step.
    commit_pct: u64,
    /// Percent chance that the device reads what was sent at a step.
    read_pct: u64,
    /// Percent chance, per step, that the gateway crashes.
    crash_pct: u64,
    /// Percent chance that a commit's ACK is written by the writer while
    /// the session waits with nothing unsent (`AckCell::arm`).
    writer_ack_pct: u64,
}

impl Schedule {
    fn new(seed: u64) -> Self {
        let mut dice = Dice::new(seed);
        let queue_capacity = 1 + (dice.next() % 3) as usize;
        let commit_pct = [0, 10, 50, 100][(dice.next() % 4) as usize];
        let read_pct = [10, 50, 100, 100][(dice.next() % 4) as usize];
        let crash_pct = [0, 0, 0, 2][(dice.next() % 4) as usize];
        let writer_ack_pct = [0, 50, 100][(dice.next() % 3) as usize];
        Self {
            dice,
            queue_capacity,
            commit_pct,
            read_pct,
            crash_pct,
            writer_ack_pct,
        }
    }
}

/// One device, one gateway (that may crash), one durable store.
struct World {
    cfg: Config,
    dev: harness::Device,
    auth: DeviceAuth,
    /// The model store: committed seqs of the device.
    stored: BTreeSet<u64>,
    /// The committed rejection mark.
    rejected_mark: u64,
    /// Seqs REJECTed, ever.
    rejected: BTreeSet<u64>,
    /// The registry's slot for the device (lost in a crash).
    slot: Arc<DeviceSlot>,
    /// The writer's queue (lost in a crash).
    queue: VecDeque<WriteJob>,
    sched: Schedule,
    t0: Instant,
}

/// What the model expects of one connection's TELEMETRY.
#[derive(Default)]
struct ConnModel {
    /// Seqs the connection takes (above the device's taken watermark when
    /// read), in order.
    taken: Vec<u64>,
    /// Seqs whose payload fails validation.
    invalid: BTreeSet<u64>,
    /// The answer so far.
    reply: Vec<u8>,
    /// The answer's frames, decoded as they leave.
    dec: Option<FrameDecoder>,
    pending: BytesMut,
    last_ack: u64,
}

impl World {
    fn new(seed: u64) -> Self {
        let dev = harness::Device {
            id: "pump-1".into(),
            token: "0123456789abcdef0123456789abcdef".into(),
        };
        let auth = DeviceAuth {
            key: 1,
            token_hash: furrow::devices::auth::hash_token(dev.token.as_bytes()),
            revoked: false,
            previous: None,
        };
        Self {
            cfg: harness::config("/nonexistent".into()),
            dev,
            auth,
            stored: BTreeSet::new(),
            rejected_mark: 0,
            rejected: BTreeSet::new(),
            slot: Arc::new(DeviceSlot::default()),
            queue: VecDeque::new(),
            sched: Schedule::new(seed),
            t0: Instant::now(),
        }
    }

    fn stored_max(&self) -> u64 {
        self.stored.last().copied().unwrap_or(0)
    }

    /// The gateway process dies: what was not committed is gone, and the
    /// next process builds the device's watermarks from the store.
    fn crash(&mut self) {
        self.queue.clear();
        self.slot = Arc::new(DeviceSlot::default());
    }

    /// The writer commits the oldest job (or all of them); with `armed`,
    /// the session waits with nothing unsent and lent the writer its
    /// socket, so the writer may write the job's ACK itself (all of its
    /// bytes or some, the session then writing the rest).
    fn commit(&mut self, all: bool, m: &mut Machine, mut armed: Option<&mut ConnModel>) {
        while let Some(job) = self.queue.pop_front() {
            for r in &job.records {
                assert!(
                    content::validate(r.content_type, &r.payload).is_ok(),
                    "seq {} stored with an invalid payload",
                    r.seq
                );
                assert!(self.stored.insert(r.seq), "seq {} stored twice", r.seq);
            }
            self.rejected_mark = self.rejected_mark.max(job.rejected_upto);
            m.on_commit(job.ticket);
            let lent = m.out().is_empty() && self.sched.dice.chance(self.sched.writer_ack_pct);
            // As `AckCell::arm` lends it: the writer writes only an ACK
            // above the session's last.
            let due = job.ack.filter(|a| a.seq > m.acked());
            if let (Some(ack), Some(model), true) = (due, armed.as_deref_mut(), lent) {
                let frame = ack_frame(ack.seq);
                let written = if self.sched.dice.chance(50) {
                    1 + (self.sched.dice.next() as usize) % (ACK_FRAME_LEN - 1)
                } else {
                    ACK_FRAME_LEN
                };
                self.received(model, &frame[..written]);
                m.on_writer_ack(WriterAck {
                    seq: ack.seq,
                    written,
                });
                if written < ACK_FRAME_LEN {
                    // The session writes the rest before anything else.
                    armed = None;
                }
            }
            if !all {
                break;
            }
        }
    }

    /// Hands the machine's job to the writer queue if it has room.
    fn submit(&mut self, m: &mut Machine) {
        if let Some(job) = m.take_job() {
            if self.queue.len() < self.sched.queue_capacity {
                self.queue.push_back(job);
            } else {
                m.defer_job(job);
            }
        }
    }

    /// Plays one connection: `wire` is everything the device writes before
    /// it closes its sending side. Returns the answer, or `None` if the
    /// gateway crashed meanwhile.
    fn play(&mut self, wire: &[u8]) -> Option<Vec<u8>> {
        let dec = FrameDecoder::new(harness::MAX_FRAME);
        let mut buf = BytesMut::from(wire);
        let mut out = Outbox::new();
        let first = match dec.decode(&mut buf) {
            Err(e) => return Some(error_reply(out, Fatal(e.code(), e.to_string()))),
            Ok(None) => return Some(Vec::new()),
            Ok(Some(f)) => f,
        };
        let hello = match handshake::hello(first) {
            Ok(h) => h,
            Err((f, _)) => return Some(error_reply(out, f)),
        };
        let found = (hello.device_id.as_str() == self.dev.id).then(|| self.auth.clone());
        if !handshake::authenticated(
            found.as_ref(),
            hello.token.as_bytes(),
            Certificate::Absent,
            0,
        )
        .ok()
        {
            let f = Fatal(
                furrow_proto::ErrorCode::AuthFailed,
                "authentication failed".into(),
            );
            return Some(error_reply(out, f));
        }
        let stored = self.stored_max();
        self.slot.observe_stored(stored.max(self.rejected_mark));
        let mut model = self.model(&buf, stored.max(self.rejected_mark));
        let (welcome, keepalive) =
            handshake::welcome(&self.cfg, hello.keepalive_s, hello.capabilities, stored, 1);
        out.queue(&Message::Welcome(welcome));
        let cell = Arc::new(AckCell::default());
        let mut m = Machine::new(
            Identity {
                device_id: Arc::from(self.dev.id.as_str()),
                key: self.auth.key,
                slot: Arc::clone(&self.slot),
                cell,
            },
            Limits {
                max_inflight: usize::from(self.cfg.limits.max_inflight),
                max_unsent: self.cfg.limits.max_unsent_bytes,
                state: Default::default(),
            },
            keepalive,
            None,
            out,
            self.t0,
        );
        let now = self.t0;

        // Active, as `driver.rs` runs it.
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < MAX_STEPS, "the session is stuck");
            m.advance(now, true);
            feed(&mut m, &dec, &mut buf, now);
            let _ = m.take_effects();
            if m.ended().is_some() {
                break;
            }
            self.submit(&mut m);
            m.advance(now, true);
            if self.sched.dice.chance(self.sched.read_pct) {
                self.collect(&mut m, &mut model);
            }
            if self.sched.dice.chance(self.sched.crash_pct) {
                self.collect(&mut m, &mut model);
                self.crash();
                return None;
            }
            if self.sched.dice.chance(self.sched.commit_pct) {
                self.commit(false, &mut m, Some(&mut model));
            }
            let room = m.room(now);
            let buffered = complete_frame(&dec, &buf);
            if room && buffered {
                continue;
            }
            if room {
                // Everything written is read: the device's EOF.
                m.peer_closed();
                break;
            }
            // No room: the writer or the device's reading must move.
            if !self.queue.is_empty() {
                self.commit(false, &mut m, Some(&mut model));
            } else {
                self.collect(&mut m, &mut model);
            }
        }

        // Draining, as `driver.rs` runs it.
        match m.start_drain() {
            Some(End::Drain(drain)) => {
                if drain != Drain::DeviceGoodbye {
                    feed(&mut m, &dec, &mut buf, now);
                    if let Some(End::Fatal(f)) = m.start_drain() {
                        queue_error(m.out(), f);
                        self.collect(&mut m, &mut model);
                        self.settle(&mut m, &mut model, false);
                        return Some(self.finish(model));
                    }
                }
                self.settle(&mut m, &mut model, true);
                if let Drain::Goodbye(code) = drain {
                    m.out().queue(&Message::Goodbye(Goodbye {
                        code: code as u16,
                        retry_after_ms: 0,
                    }));
                }
            }
            Some(End::Fatal(f)) => {
                queue_error(m.out(), f);
                self.collect(&mut m, &mut model);
                self.settle(&mut m, &mut model, false);
            }
            None => panic!("the active phase ended without a cause"),
        }
        self.collect(&mut m, &mut model);
        Some(self.finish(model))
    }

    /// Stores and ACKs everything taken (ACKs only if `ack`).
    fn settle(&mut self, m: &mut Machine, model: &mut ConnModel, ack: bool) {
        for _ in 0..MAX_STEPS {
            self.submit(m);
            self.commit(true, m, None);
            m.advance(self.t0, ack);
            if ack {
                self.collect(m, model);
            }
            if m.settled() {
                return;
            }
        }
        panic!("the session never settled");
    }

    /// The connection's end: everything it took is resolved.
    fn finish(&self, model: ConnModel) -> Vec<u8> {
        assert!(
            model.dec.is_none() || model.pending.is_empty(),
            "the answer ends inside a frame"
        );
        for s in &model.taken {
            assert!(
                self.stored.contains(s) || self.rejected.contains(s),
                "seq {s} taken but neither stored nor rejected"
            );
        }
        model.reply
    }

    /// What the model expects of the frames after HELLO, read in order up
    /// to the first that ends the session.
    fn model(&self, rest: &BytesMut, mut taken_mark: u64) -> ConnModel {
        let dec = FrameDecoder::new(harness::MAX_FRAME);
        let mut buf = rest.clone();
        let mut model = ConnModel {
            dec: Some(FrameDecoder::new(u32::MAX)),
            ..ConnModel::default()
        };
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            if !f.kind.sent_by_device() || f.kind == MessageType::Hello {
                break;
            }
            match Message::from_frame(f) {
                Ok(Message::Telemetry(t)) => {
                    if t.seq > taken_mark {
                        taken_mark = t.seq;
                        model.taken.push(t.seq);
                        if content::validate(t.content_type, &t.payload).is_err() {
                            model.invalid.insert(t.seq);
                        }
                    }
                }
                Ok(Message::Goodbye(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        model
    }

    /// The device reads what the gateway sent; each ACK and REJECT is
    /// checked as it leaves.
    fn collect(&mut self, m: &mut Machine, model: &mut ConnModel) {
        let bytes = m.out().bytes_mut().split();
        self.received(model, &bytes);
    }

    /// The device receives `bytes`.
    fn received(&mut self, model: &mut ConnModel, bytes: &[u8]) {
        model.reply.extend_from_slice(bytes);
        model.pending.extend_from_slice(bytes);
        let Some(dec) = model.dec.as_ref() else {
            return;
        };
        loop {
            let f = match dec.decode(&mut model.pending) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => panic!("the answer does not frame: {e}"),
            };
            match Message::from_frame(f) {
                Ok(Message::Ack { seq }) => {
                    assert!(
                        seq > model.last_ack,
                        "ACK {seq} after ACK {}: ACKs only go forward, each once",
                        model.last_ack
                    );
                    for s in model.taken.iter().filter(|s| **s <= seq) {
                        assert!(
                            self.stored.contains(s) || self.rejected.contains(s),
                            "ACK {seq} left before seq {s} was committed"
                        );
                    }
                    model.last_ack = seq;
                }
                Ok(Message::Reject(r)) => {
                    assert!(
                        model.invalid.contains(&r.seq),
                        "seq {} REJECTed with a valid payload",
                        r.seq
                    );
                    self.rejected.insert(r.seq);
                }
                Ok(_) => {}
                Err(e) => panic!("the gateway sent a message that does not decode: {e}"),
            }
        }
    }
}

fn error_reply(mut out: Outbox, f: Fatal) -> Vec<u8> {
    queue_error(&mut out, f);
    out.bytes_mut().to_vec()
}

/// Plays every connection of `input` under the schedule `seed`.
fn run_case(input: &harness::Input, seed: u64) {
    let mut world = World::new(seed);
    let mut hi = 0u64;
    for conn in input.conns.iter().take(3) {
        let wire = harness::encode_steps(&conn.steps, &world.dev, &mut hi);
        let expect = harness::expect(&wire, &world.dev);
        let stored_before = world.stored_max();
        let Some(reply) = world.play(&wire) else {
            continue;
        };
        // WELCOME's last_seq is exact.
        let mut b = BytesMut::from(&reply[..]);
        if let Ok(Some(f)) = FrameDecoder::new(u32::MAX).decode(&mut b) {
            if let Ok(Message::Welcome(w)) = Message::from_frame(f) {
                assert_eq!(w.last_seq, stored_before, "WELCOME's last_seq");
            }
        }
        harness::check_reply(&expect, &reply, &world.cfg);
    }
}

fn run_seeded(input: &harness::Input, seed: u64) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(input, seed)));
    if let Err(e) = r {
        eprintln!("failing schedule seed: {seed} (MACHINE_SEED={seed} replays it)");
        std::panic::resume_unwind(e);
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("MACHINE_SEED") {
        Ok(s) => vec![s.parse().expect("MACHINE_SEED is a number")],
        Err(_) => (0..4).collect(),
    }
}

#[test]
fn corpus_replays_through_the_machine() {
    let corpus = replay::inputs("corpus", "session");
    assert!(
        !corpus.is_empty(),
        "the committed corpus fuzz/corpus/session is missing"
    );
    let mut sessions = 0;
    for (path, data) in corpus
        .iter()
        .chain(&replay::inputs("regressions", "session"))
    {
        let Some(input) = harness::input_from_bytes(data) else {
            continue;
        };
        if input
            .conns
            .iter()
            .any(|c| matches!(c.steps.first(), Some(harness::Step::Hello { .. })))
        {
            sessions += 1;
        }
        for seed in seeds() {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seeded(&input, seed)));
            assert!(r.is_ok(), "{} fails under seed {seed}", path.display());
        }
    }
    // The corpus reaches the active session, not only the handshake.
    assert!(
        sessions > 50,
        "only {sessions} corpus inputs start with a good HELLO"
    );
}

/// A session that reads frames, commits, and ends cleanly, by hand: the
/// model itself must be able to fail.
#[test]
fn the_model_catches_an_early_ack() {
    let mut world = World::new(7);
    let mut m = Machine::new(
        Identity {
            device_id: Arc::from("pump-1"),
            key: 1,
            slot: Arc::clone(&world.slot),
            cell: Arc::new(AckCell::default()),
        },
        Limits {
            max_inflight: 4,
            max_unsent: 1024,
            state: Default::default(),
        },
        std::time::Duration::from_secs(45),
        None,
        Outbox::new(),
        world.t0,
    );
    let mut model = ConnModel {
        taken: vec![1],
        dec: Some(FrameDecoder::new(u32::MAX)),
        ..ConnModel::default()
    };
    // An ACK the machine did not send, for a seq not committed.
    m.out().queue_ack(1);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        world.collect(&mut m, &mut model)
    }));
    assert!(r.is_err(), "the model let an ACK before commit pass");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary step sequences under arbitrary schedules.
    #[test]
    fn random_sessions_under_random_schedules(
        hello_first in vec(prop_oneof![4 => Just(true), 1 => Just(false)], 1..=3),
        data in vec(any::<u8>(), 0..2048),
        seed in any::<u64>(),
    ) {
        let Some(input) = harness::input_with_hellos(&data, &hello_first) else {
            return Ok(());
        };
        run_seeded(&input, seed);
    }
}
