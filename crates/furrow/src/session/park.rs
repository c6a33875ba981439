//! The parking lot: quiet sessions held without a task, a future or a
//! buffer.
//!
//! A session with nothing in flight that has been quiet for
//! `sessions.park_after_ms` leaves its task (`driver.rs`): its socket moves
//! from Tokio's reactor to the lot's own epoll (mio, the poller Tokio is
//! built on), and its state shrinks to a record held here by token. One
//! thread waits on that epoll and hands a record back (to the resume
//! callback, which spawns a task again) when
//!
//! * its socket is readable: a frame, or the device closing (told apart
//!   as [`Wake::Hangup`], so that the resume callback can end a session
//!   whose device is gone without giving it a task);
//! * its deadline passes: the keepalive, so a silent device is still
//!   closed at 1.5 x keepalive;
//! * someone calls [`Unpark::unpark`]: the registry wakes a session for a
//!   command, a kick or takeover, a revocation, or shutdown (through the
//!   session's `AckCell`).
//!
//! Each record is woken once: whichever comes first takes it out of the
//! lot, and the others find nothing (tokens carry the connection id, so a
//! reused slot is never woken by a stale call).

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tracing::warn;

/// The waker's token (slab keys are offset past it).
const WAKER: Token = Token(0);

/// Why a parked session was resumed (the `reason` label of
/// `furrow_session_unparks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The socket became readable.
    Readable,
    /// The peer closed its side or the socket failed (there may still be
    /// bytes to read before the close).
    Hangup,
    /// The deadline passed.
    Deadline,
    /// The gateway has something for the session.
    Called,
    /// The lot is stopping.
    Stop,
}

impl Wake {
    fn as_str(self) -> &'static str {
        match self {
            Self::Readable => "readable",
            Self::Hangup => "hangup",
            Self::Deadline => "deadline",
            Self::Called => "called",
            Self::Stop => "stop",
        }
    }
}

/// Wakes one parked session; implemented by the lot and held (type-erased)
/// by whatever may need to wake the session.
pub trait Unpark: Send + Sync {
    /// Resumes the record under `key` if it is still connection `id`'s.
    fn unpark(&self, key: usize, id: u64);
}

/// What the lot needs to know of a parked session. Asked of the session
/// rather than kept beside it: the entry is held once per parked device,
/// and the session has both already (24 bytes less each).
pub trait Parked: Send + 'static {
    /// Its connection id: a call naming another one is stale.
    fn conn_id(&self) -> u64;
    /// When it is woken if nothing else comes first; fixed while parked.
    fn deadline(&self) -> Instant;
}

struct Entry<S> {
    stream: TcpStream,
    session: S,
}

/// Slab keys the deadline index can hold (16.7 million parked sessions
/// in one process); past it a session stays in its task.
const MAX_KEYS: usize = 1 << KEY_BITS;
const KEY_BITS: u32 = 24;
/// Milliseconds since the lot started: 40 bits, 34 years.
const MAX_MS: u64 = (1 << (64 - KEY_BITS)) - 1;

/// The parked sessions' deadlines in order, each packed in a `u64`:
/// milliseconds since the lot started (rounded up, so nobody is woken
/// early) above the slab key. An `(Instant, usize)` pair is 24 bytes and
/// the B-tree's nodes are about half full as deadlines arrive in order:
/// 40 bytes per parked device against 15 packed.
struct Deadlines {
    epoch: Instant,
    set: BTreeSet<u64>,
}

impl Deadlines {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            set: BTreeSet::new(),
        }
    }

    fn pack(&self, at: Instant, key: usize) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        let ms = since.as_millis() + u128::from(!since.subsec_nanos().is_multiple_of(1_000_000));
        (ms.min(u128::from(MAX_MS)) as u64) << KEY_BITS | key as u64
    }

    /// Adds `key` due `at` (`key` below [`MAX_KEYS`]); true if it is now
    /// the first due.
    fn insert(&mut self, at: Instant, key: usize) -> bool {
        let packed = self.pack(at, key);
        self.set.insert(packed);
        self.set.first() == Some(&packed)
    }

    fn remove(&mut self, at: Instant, key: usize) {
        let packed = self.pack(at, key);
        self.set.remove(&packed);
    }

    /// The first due: when, and its key.
    fn first(&self) -> Option<(Instant, usize)> {
        self.set.first().map(|&p| {
            let at = self.epoch + Duration::from_millis(p >> KEY_BITS);
            (at, (p & (MAX_KEYS as u64 - 1)) as usize)
        })
    }

    fn pop_first(&mut self) {
        self.set.pop_first();
    }
}

struct State<S> {
    /// Boxed: a slab doubles its capacity as it grows, so inline records
    /// would leave up to half their bytes unused; a box leaves a pointer.
    slab: Slab<Box<Entry<S>>>,
    deadlines: Deadlines,
    called: Vec<(usize, u64)>,
    stopping: bool,
}

/// What to do with a session taken out of the lot.
pub type Resume<S> = Box<dyn Fn(TcpStream, S, Wake) + Send + Sync>;

/// The parked sessions and the thread that wakes them.
pub struct Lot<S> {
    registry: mio::Registry,
    waker: mio::Waker,
    state: Mutex<State<S>>,
    resume: Resume<S>,
}

impl<S: Parked> Lot<S> {
    /// Starts a lot whose thread hands woken sessions to `resume`.
    pub fn start(resume: Resume<S>) -> io::Result<Arc<Self>> {
        let poll = Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        let lot = Arc::new(Self {
            registry: poll.registry().try_clone()?,
            waker,
            state: Mutex::new(State {
                slab: Slab::new(),
                deadlines: Deadlines::new(),
                called: Vec::new(),
                stopping: false,
            }),
            resume,
        });
        let run = Arc::clone(&lot);
        std::thread::Builder::new()
            .name("furrow-park".into())
            .spawn(move || run.run(poll))?;
        Ok(lot)
    }

    fn state(&self) -> MutexGuard<'_, State<S>> {
        // A panic while holding the lock leaves plain data behind: go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks `session` until its socket is readable, its deadline passes,
    /// or it is unparked. `parked` gets its key for
    /// [`Unpark::unpark`] before the session can be woken (the lot's lock
    /// is held), so no wake-up can overtake it. Gives everything back if
    /// the lot cannot take it (stopping, or the epoll refused the socket).
    pub fn park(
        &self,
        mut stream: TcpStream,
        session: S,
        parked: impl FnOnce(usize),
    ) -> Result<(), (TcpStream, S)> {
        let deadline = session.deadline();
        let mut st = self.state();
        if st.stopping {
            return Err((stream, session));
        }
        let entry = st.slab.vacant_entry();
        let key = entry.key();
        if key >= MAX_KEYS {
            return Err((stream, session));
        }
        if let Err(e) = self
            .registry
            .register(&mut stream, Token(key + 1), Interest::READABLE)
        {
            warn!(error = %e, "cannot park a session; it stays in its task");
            return Err((stream, session));
        }
        entry.insert(Box::new(Entry { stream, session }));
        let first = st.deadlines.insert(deadline, key);
        parked(key);
        drop(st);
        metrics::gauge!("furrow_sessions_parked").increment(1.0);
        metrics::counter!("furrow_session_parks_total").increment(1);
        if first {
            // The thread may be sleeping until a later deadline.
            let _ = self.waker.wake();
        }
        Ok(())
    }

    /// Resumes every parked session (shutdown) and refuses new ones; the
    /// thread ends once the lot is empty.
    pub fn stop(&self) {
        self.state().stopping = true;
        let _ = self.waker.wake();
    }

    /// Parked sessions now.
    pub fn len(&self) -> usize {
        self.state().slab.len()
    }

    /// Whether no session is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, st: &mut State<S>, key: usize, id: Option<u64>) -> Option<Entry<S>> {
        let wanted = st
            .slab
            .get(key)
            .is_some_and(|e| id.is_none_or(|id| e.session.conn_id() == id));
        if !wanted {
            return None;
        }
        let mut e = st.slab.remove(key);
        st.deadlines.remove(e.session.deadline(), key);
        let _ = self.registry.deregister(&mut e.stream);
        Some(*e)
    }

    fn run(self: Arc<Self>, mut poll: Poll) {
        let mut events = Events::with_capacity(1024);
        let mut woken: Vec<(Entry<S>, Wake)> = Vec::new();
        loop {
            let timeout = {
                let st = self.state();
                if st.stopping && st.slab.is_empty() {
                    return;
                }
                st.deadlines
                    .first()
                    .map(|(d, _)| d.saturating_duration_since(Instant::now()))
            };
            // Round up: waking a millisecond early would only sleep again.
            let timeout = timeout.map(|t| t + Duration::from_micros(500));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "parking epoll failed; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            {
                let mut st = self.state();
                for ev in events.iter() {
                    if ev.token() == WAKER {
                        continue;
                    }
                    let why = if ev.is_read_closed() || ev.is_error() {
                        Wake::Hangup
                    } else {
                        Wake::Readable
                    };
                    if let Some(e) = self.take(&mut st, ev.token().0 - 1, None) {
                        woken.push((e, why));
                    }
                }
                let called = std::mem::take(&mut st.called);
                for (key, id) in called {
                    if let Some(e) = self.take(&mut st, key, Some(id)) {
                        woken.push((e, Wake::Called));
                    }
                }
                let now = Instant::now();
                while let Some((d, key)) = st.deadlines.first() {
                    if d > now {
                        break;
                    }
                    match self.take(&mut st, key, None) {
                        Some(e) => woken.push((e, Wake::Deadline)),
                        None => {
                            st.deadlines.pop_first();
                        }
                    }
                }
                if st.stopping {
                    let keys: Vec<usize> = st.slab.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        if let Some(e) = self.take(&mut st, key, None) {
                            woken.push((e, Wake::Stop));
                        }
                    }
                }
            }
            for (e, why) in woken.drain(..) {
                metrics::gauge!("furrow_sessions_parked").decrement(1.0);
                metrics::counter!("furrow_session_unparks_total", "reason" => why.as_str())
                    .increment(1);
                (self.resume)(e.stream, e.session, why);
            }
        }
    }
}

impl<S: Parked> Unpark for Lot<S> {
    fn unpark(&self, key: usize, id: u64) {
        let mut st = self.state();
        if st.slab.get(key).is_some_and(|e| e.session.conn_id() == id) {
            st.called.push((key, id));
            drop(st);
            let _ = self.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    /// A session that is only its id and deadline.
    struct Session(u64, Instant);

    impl Parked for Session {
        fn conn_id(&self) -> u64 {
            self.0
        }
        fn deadline(&self) -> Instant {
            self.1
        }
    }

    fn lot() -> (Arc<Lot<Session>>, mpsc::Receiver<(u64, Wake)>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let lot = Lot::start(Box::new(move |_s, v: Session, why| {
            let _ = tx.lock().unwrap().send((v.0, why));
        }))
        .unwrap();
        (lot, rx)
    }

    fn pair() -> (std::net::TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, TcpStream::from_std(s))
    }

    const LATER: Duration = Duration::from_secs(3600);

    proptest::proptest! {
        /// Against a model: (deadline rounded up to the millisecond, key)
        /// pairs in a sorted set, keys unique as the slab's are.
        #[test]
        fn deadlines_match_a_sorted_model(
            ops in proptest::collection::vec((0u64..5_000_000, 0usize..32, proptest::bool::ANY), 1..300)
        ) {
            let mut d = Deadlines::new();
            let mut model = std::collections::BTreeSet::new();
            let mut live: std::collections::HashMap<usize, Instant> = Default::default();
            for (micros, key, insert) in ops {
                let at = d.epoch + Duration::from_micros(micros);
                if insert && !live.contains_key(&key) {
                    let first = d.insert(at, key);
                    model.insert((micros.div_ceil(1000), key));
                    live.insert(key, at);
                    proptest::prop_assert_eq!(first, model.first() == Some(&(micros.div_ceil(1000), key)));
                } else if let Some(at) = live.remove(&key) {
                    d.remove(at, key);
                    let micros = at.duration_since(d.epoch).as_micros() as u64;
                    model.remove(&(micros.div_ceil(1000), key));
                }
                let want = model.first().map(|&(ms, k)| (d.epoch + Duration::from_millis(ms), k));
                proptest::prop_assert_eq!(d.first(), want);
                proptest::prop_assert_eq!(d.set.len(), model.len());
            }
        }
    }

    #[test]
    fn deadlines_keep_order_round_up_and_remove_exactly() {
        let mut d = Deadlines::new();
        let t = d.epoch + Duration::from_millis(10);
        assert!(d.insert(t + Duration::from_micros(1), 7));
        assert!(!d.insert(t + Duration::from_secs(90), 3));
        assert!(d.insert(t, MAX_KEYS - 1), "earlier: now the first");
        assert_eq!(d.first(), Some((t, MAX_KEYS - 1)));
        d.pop_first();
        // 10.001 ms is due at 11 ms: a millisecond late, never early.
        assert_eq!(d.first(), Some((t + Duration::from_millis(1), 7)));
        d.remove(t + Duration::from_micros(1), 7);
        assert_eq!(d.first(), Some((t + Duration::from_secs(90), 3)));
        d.remove(t + Duration::from_secs(90), 3);
        assert_eq!(d.first(), None);
        // Before the lot started, and past 34 years: clamped, still found.
        let long = d.epoch + Duration::from_secs(40 * 366 * 86_400);
        d.insert(long, 1);
        d.insert(
            d.epoch
                .checked_sub(Duration::from_millis(5))
                .unwrap_or(d.epoch),
            2,
        );
        assert_eq!(d.first().map(|f| f.1), Some(2));
        d.remove(long, 1);
        d.pop_first();
        assert!(d.set.is_empty());
    }

    #[test]
    fn readiness_deadline_call_and_stop_each_wake_once() {
        let (lot, rx) = lot();
        let wait = Duration::from_secs(5);
        // Readable.
        let (mut c1, s1) = pair();
        lot.park(s1, Session(1, Instant::now() + LATER), |_| {})
            .ok()
            .unwrap();
        c1.write_all(b"x").unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (1, Wake::Readable));
        // The peer closing, with or without bytes before: a hang-up (both
        // done before parking, so that one event reports them together).
        for (id, bytes) in [(11, &b""[..]), (12, &b"x"[..])] {
            let (mut c, s) = pair();
            c.write_all(bytes).unwrap();
            drop(c);
            lot.park(s, Session(id, Instant::now() + LATER), |_| {})
                .ok()
                .unwrap();
            assert_eq!(rx.recv_timeout(wait).unwrap(), (id, Wake::Hangup));
        }
        // Deadline.
        let (_c2, s2) = pair();
        let t = Instant::now();
        lot.park(s2, Session(2, t + Duration::from_millis(50)), |_| {})
            .ok()
            .unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (2, Wake::Deadline));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // Called; a stale call (wrong id) does nothing.
        let (_c3, s3) = pair();
        let mut key = usize::MAX;
        lot.park(s3, Session(3, Instant::now() + LATER), |k| key = k)
            .ok()
            .unwrap();
        lot.unpark(key, 99);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        lot.unpark(key, 3);
        assert_eq!(rx.recv_timeout(wait).unwrap(), (3, Wake::Called));
        lot.unpark(key, 3);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // Stop resumes the rest and refuses new ones.
        let (_c4, s4) = pair();
        lot.park(s4, Session(4, Instant::now() + LATER), |_| {})
            .ok()
            .unwrap();
        lot.stop();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (4, Wake::Stop));
        let (_c5, s5) = pair();
        assert!(lot
            .park(s5, Session(5, Instant::now() + LATER), |_| {})
            .is_err());
        assert!(lot.is_empty());
    }
}
