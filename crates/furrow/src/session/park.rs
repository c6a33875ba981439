//! The parking lot: quiet sessions held without a task, a future or a
//! buffer.
//!
//! A session with nothing in flight that has been quiet for
//! `sessions.park_after_ms` leaves its task (`driver.rs`): its socket moves
//! from Tokio's reactor to the lot's own epoll (mio, the poller Tokio is
//! built on), and its state shrinks to a record held here by token. One
//! task waits on that epoll and hands a record back (to the resume
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
//!
//! The lot's epoll is itself registered in Tokio's reactor (an epoll file
//! descriptor is readable while it has events), so the lot runs as a task:
//! a parked device's frame wakes the Tokio worker that is already waiting
//! in `epoll_wait`, and the resumed session's task is spawned onto that
//! worker's own queue. A thread of its own (as the lot had before) cost
//! every wake-up a second thread hand-off: the lot's thread woke, then
//! woke a worker.
//!
//! A socket is registered in the lot's epoll once, `EPOLLONESHOT`: its
//! first event disarms it, and parking again re-arms it (one
//! `epoll_ctl(MOD)`), where registering and deregistering on every visit
//! cost two; `epoll_ctl` was 14 % of the gateway's CPU at 10,000 devices
//! sending every 5 s. The closing of the socket removes it. Tokens carry
//! the low bits of the connection id beside the slab key, so an event
//! armed for a session that was since woken otherwise (a call, its
//! deadline) and has left, or whose key now holds another session, is
//! recognised as stale and dropped.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use mio::{Events, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
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

/// An epoll token: the low bits of the connection id above the slab key
/// plus one (0 is the waker's), so that a stale event names no session.
fn token_of(key: usize, id: u64) -> u64 {
    (id << KEY_BITS) | (key as u64 + 1)
}

/// The slab key and connection-id bits of a token.
fn token_parts(token: u64) -> (usize, u64) {
    (
        ((token & (MAX_KEYS as u64 - 1)) as usize).wrapping_sub(1),
        token >> KEY_BITS,
    )
}

/// Whether connection `id` matches the id bits of a token.
fn id_matches(id: u64, bits: u64) -> bool {
    (id << KEY_BITS) >> KEY_BITS == bits
}

/// Arms `fd` in the epoll `epfd` for one event (readable, or the peer's
/// close) under `token`: re-arms it if it is registered from an earlier
/// visit, registers it otherwise.
fn arm(epfd: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
        u64: token,
    };
    for op in [libc::EPOLL_CTL_MOD, libc::EPOLL_CTL_ADD] {
        // SAFETY: `ev` is a valid epoll_event for the call's duration and
        // the kernel only reads it; both descriptors are open (the lot
        // owns `epfd`, the caller the socket).
        let rc = unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if op != libc::EPOLL_CTL_MOD || e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

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
    /// Starts a lot whose task hands woken sessions to `resume`; called
    /// within the Tokio runtime whose reactor and workers it uses.
    pub fn start(resume: Resume<S>) -> io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("the parking lot needs a runtime: {e}")))?;
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
        let poll = {
            let _entered = runtime.enter();
            // SAFETY: `Poll` owns its epoll descriptor from `Poll::new` until
            // it is dropped, and `as_raw_fd` always returns that one; the
            // `AsyncFd` owns the `Poll`, so the descriptor stays open and the
            // same for the whole registration. (Tokio's safe constructor is
            // deprecated for want of this promise, which `Poll` cannot give
            // through a trait.)
            unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)? }
        };
        runtime.spawn(Arc::clone(&lot).run(poll));
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
        stream: TcpStream,
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
        if key + 1 >= MAX_KEYS {
            return Err((stream, session));
        }
        let token = token_of(key, session.conn_id());
        if let Err(e) = arm(self.registry.as_raw_fd(), stream.as_raw_fd(), token) {
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

    /// Takes the record under `key` out of the lot if `matches` its
    /// connection id.
    fn take(
        &self,
        st: &mut State<S>,
        key: usize,
        matches: impl FnOnce(u64) -> bool,
    ) -> Option<Entry<S>> {
        let wanted = st
            .slab
            .get(key)
            .is_some_and(|e| matches(e.session.conn_id()));
        if !wanted {
            return None;
        }
        // Its socket stays registered, disarmed by the event that woke it
        // or still armed (woken otherwise): a later event for it is stale.
        let e = st.slab.remove(key);
        st.deadlines.remove(e.session.deadline(), key);
        Some(*e)
    }

    /// Waits for the lot's epoll (through Tokio's reactor) or the first
    /// deadline, then wakes whatever is due. Ends once the lot is stopping
    /// and empty.
    async fn run(self: Arc<Self>, mut poll: AsyncFd<Poll>) {
        const CAPACITY: usize = 1024;
        let mut events = Events::with_capacity(CAPACITY);
        let mut woken: Vec<(Entry<S>, Wake)> = Vec::new();
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            let due = {
                let st = self.state();
                if st.stopping && st.slab.is_empty() {
                    return;
                }
                st.deadlines.first().map(|(d, _)| d)
            };
            let ready = match due {
                Some(due) => {
                    sleep.as_mut().reset(tokio::time::Instant::from_std(due));
                    tokio::select! {
                        ready = poll.readable_mut() => Some(ready),
                        () = &mut sleep => None,
                    }
                }
                None => Some(poll.readable_mut().await),
            };
            events.clear();
            match ready {
                // Only deadlines are due.
                None => {}
                Some(Ok(mut ready)) => {
                    match ready
                        .get_inner_mut()
                        .poll(&mut events, Some(Duration::ZERO))
                    {
                        // Drained: the reactor reports the next event
                        // afresh. A full batch leaves more to read, so the
                        // readiness stays for the next turn.
                        Ok(()) if events.iter().count() < CAPACITY => ready.clear_ready(),
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            warn!(error = %e, "parking epoll failed; retrying");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "parking epoll failed in the reactor; retrying");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
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
                    let (key, bits) = token_parts(ev.token().0 as u64);
                    if let Some(e) = self.take(&mut st, key, |id| id_matches(id, bits)) {
                        woken.push((e, why));
                    }
                }
                let called = std::mem::take(&mut st.called);
                for (key, id) in called {
                    if let Some(e) = self.take(&mut st, key, |i| i == id) {
                        woken.push((e, Wake::Called));
                    }
                }
                let now = Instant::now();
                while let Some((d, key)) = st.deadlines.first() {
                    if d > now {
                        break;
                    }
                    match self.take(&mut st, key, |_| true) {
                        Some(e) => woken.push((e, Wake::Deadline)),
                        None => {
                            st.deadlines.pop_first();
                        }
                    }
                }
                if st.stopping {
                    let keys: Vec<usize> = st.slab.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        if let Some(e) = self.take(&mut st, key, |_| true) {
                            woken.push((e, Wake::Stop));
                        }
                    }
                }
            }
            let n = woken.len();
            for (e, why) in woken.drain(..) {
                metrics::gauge!("furrow_sessions_parked").decrement(1.0);
                metrics::counter!("furrow_session_unparks_total", "reason" => why.as_str())
                    .increment(1);
                (self.resume)(e.stream, e.session, why);
            }
            if n >= CAPACITY {
                // A storm's worth: let the sessions just spawned (and
                // everything else) run before the next batch.
                tokio::task::yield_now().await;
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

    /// A lot on a runtime of its own (returned: the lot's task runs on
    /// it), reporting what it wakes on a channel the test thread reads.
    fn lot() -> (
        tokio::runtime::Runtime,
        Arc<Lot<Session>>,
        mpsc::Receiver<(u64, Wake)>,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let lot = {
            let _entered = rt.enter();
            // Woken sockets stay open (as a resumed session's would), so
            // that one left armed can still report an event.
            let kept = Mutex::new(Vec::new());
            Lot::start(Box::new(move |s, v: Session, why| {
                kept.lock().unwrap().push(s);
                let _ = tx.lock().unwrap().send((v.0, why));
            }))
            .unwrap()
        };
        (rt, lot, rx)
    }

    fn pair() -> (std::net::TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, TcpStream::from_std(s))
    }

    const LATER: Duration = Duration::from_secs(3600);

    /// Parks `s` as session `id`, due `at`; returns its key.
    fn park(lot: &Lot<Session>, s: TcpStream, id: u64, at: Instant) -> usize {
        let mut key = usize::MAX;
        lot.park(s, Session(id, at), |k| key = k).ok().unwrap();
        key
    }

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
    fn a_lot_needs_a_runtime() {
        let started = Lot::<Session>::start(Box::new(|_, _, _| {}));
        assert!(started.is_err(), "outside a runtime the lot has no reactor");
    }

    /// More ready sockets than one batch of events: every one is woken,
    /// once, and the lot goes on waking after the storm.
    #[test]
    fn a_storm_larger_than_a_batch_wakes_every_session_once() {
        let (_rt, lot, rx) = lot();
        let n = 2_500u64;
        let mut clients = Vec::new();
        for id in 0..n {
            let (c, s) = pair();
            park(&lot, s, id, Instant::now() + LATER);
            clients.push(c);
        }
        for c in &mut clients {
            c.write_all(b"x").unwrap();
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..n {
            let (id, why) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(why, Wake::Readable);
            assert!(seen.insert(id), "session {id} woken twice");
        }
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert!(lot.is_empty());
        let (mut c, s) = pair();
        park(&lot, s, n, Instant::now() + LATER);
        c.write_all(b"x").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            (n, Wake::Readable)
        );
    }

    /// A socket stays registered between visits: woken by a call (still
    /// armed), then by its frame (disarmed), it is woken again by its next
    /// frame once parked again; an event left armed for a session that
    /// has gone wakes nothing, not even the next session under its key.
    #[test]
    fn sockets_are_rearmed_between_visits_and_stale_events_wake_nothing() {
        let (_rt, lot, rx) = lot();
        let wait = Duration::from_secs(5);
        let (c, s) = pair();
        let key = park(&lot, s, 1, Instant::now() + LATER);
        lot.unpark(key, 1);
        assert_eq!(rx.recv_timeout(wait).unwrap(), (1, Wake::Called));
        // Parked again (a new socket for the same id stands in for the
        // resumed session's).
        let (mut c1, s1) = pair();
        park(&lot, s1, 1, Instant::now() + LATER);
        c1.write_all(b"x").unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (1, Wake::Readable));
        // A session woken by its deadline leaves its socket armed; another
        // session parks under the same key; the first socket's bytes wake
        // nobody, the second's wake the second.
        let (mut c2, s2) = pair();
        let k2 = park(&lot, s2, 2, Instant::now() + Duration::from_millis(20));
        assert_eq!(rx.recv_timeout(wait).unwrap(), (2, Wake::Deadline));
        let (mut c3, s3) = pair();
        let k3 = park(&lot, s3, 3, Instant::now() + LATER);
        assert_eq!(k2, k3, "the slab reuses the key");
        c2.write_all(b"x").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        c3.write_all(b"x").unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (3, Wake::Readable));
        drop(c);
    }

    #[test]
    fn tokens_carry_the_key_and_the_low_bits_of_the_id() {
        for (key, id) in [(0, 0), (5, 7), (MAX_KEYS - 2, u64::MAX), (17, 1 << 45)] {
            let (k, bits) = token_parts(token_of(key, id));
            assert_eq!(k, key);
            assert!(id_matches(id, bits));
            assert!(!id_matches(id.wrapping_add(1), bits));
        }
        assert_ne!(token_of(0, 0), WAKER.0 as u64);
    }

    #[test]
    fn readiness_deadline_call_and_stop_each_wake_once() {
        let (_rt, lot, rx) = lot();
        let wait = Duration::from_secs(5);
        // Readable.
        let (mut c1, s1) = pair();
        park(&lot, s1, 1, Instant::now() + LATER);
        c1.write_all(b"x").unwrap();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (1, Wake::Readable));
        // The peer closing, with or without bytes before: a hang-up (both
        // done before parking, so that one event reports them together).
        for (id, bytes) in [(11, &b""[..]), (12, &b"x"[..])] {
            let (mut c, s) = pair();
            c.write_all(bytes).unwrap();
            drop(c);
            park(&lot, s, id, Instant::now() + LATER);
            assert_eq!(rx.recv_timeout(wait).unwrap(), (id, Wake::Hangup));
        }
        // Deadline.
        let (_c2, s2) = pair();
        let t = Instant::now();
        park(&lot, s2, 2, t + Duration::from_millis(50));
        assert_eq!(rx.recv_timeout(wait).unwrap(), (2, Wake::Deadline));
        assert!(t.elapsed() >= Duration::from_millis(50));
        // Called; a stale call (wrong id) does nothing.
        let (_c3, s3) = pair();
        let key = park(&lot, s3, 3, Instant::now() + LATER);
        lot.unpark(key, 99);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        lot.unpark(key, 3);
        assert_eq!(rx.recv_timeout(wait).unwrap(), (3, Wake::Called));
        lot.unpark(key, 3);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // Stop resumes the rest and refuses new ones.
        let (_c4, s4) = pair();
        park(&lot, s4, 4, Instant::now() + LATER);
        lot.stop();
        assert_eq!(rx.recv_timeout(wait).unwrap(), (4, Wake::Stop));
        let (_c5, s5) = pair();
        assert!(lot
            .park(s5, Session(5, Instant::now() + LATER), |_| {})
            .is_err());
        assert!(lot.is_empty());
    }
}
