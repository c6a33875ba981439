//! The registry of live sessions: device id to the connection that holds it.
//!
//! One place decides takeover: [`Registry::claim`] installs the new session
//! and hands back the old one, which the caller kicks and waits for. It also
//! owns each connected device's [`DeviceSlot`], the per-device watermarks
//! that make the duplicate rule hold across connections: the slot outlives
//! a takeover (the new session inherits it) and is dropped when the last
//! session of the device ends, by which time everything it took is stored.
//!
//! Later layers route commands and revocations through [`Registry::kick`]
//! and the handles found here.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use furrow_proto::GoodbyeCode;
use hashbrown::hash_table::{self, HashTable};
use tokio::sync::Notify;

use crate::writer::AckCell;

/// Per-device sequence watermarks, shared by successive sessions.
#[derive(Debug, Default)]
pub struct DeviceSlot {
    /// Highest seq *taken* (stored, being stored, or rejected).
    taken: AtomicU64,
    /// Every taken seq up to this one is durably stored or rejected.
    resolved: AtomicU64,
}

impl DeviceSlot {
    /// Takes `seq` if it is above every seq taken so far; false means the
    /// frame is a duplicate.
    pub fn take(&self, seq: u64) -> bool {
        self.taken.fetch_max(seq, Ordering::AcqRel) < seq
    }

    /// Raises both watermarks to what the store holds (on session start).
    pub fn observe_stored(&self, last_seq: u64) {
        self.taken.fetch_max(last_seq, Ordering::AcqRel);
        self.resolved.fetch_max(last_seq, Ordering::AcqRel);
    }

    /// Records that every taken seq up to `seq` is resolved.
    pub fn resolve(&self, seq: u64) {
        self.resolved.fetch_max(seq, Ordering::AcqRel);
    }

    /// The resolved watermark.
    pub fn resolved(&self) -> u64 {
        self.resolved.load(Ordering::Acquire)
    }
}

/// How a registry asks a session to end. Cheap to clone: a pointer to the
/// session's [`AckCell`], which holds the [`HandleState`] too, so that a
/// connected device costs one allocation for both.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    inner: Arc<AckCell>,
}

/// What the registry and the gateway know of a live session, kept in its
/// [`AckCell`] (see [`SessionHandle`]).
#[derive(Debug)]
pub struct HandleState {
    /// The device's id (also the registry's key).
    device: Arc<str>,
    /// The connection id.
    id: u64,
    kick: AtomicU16,
    // A flag rather than a CancellationToken: this lives once per
    // connected device, and the token's tree node is several times larger.
    // Waiters wait on FINISHED.
    done: AtomicBool,
    /// Set when the device may have commands to (re)send; the session
    /// looks them up in the store.
    commands: AtomicBool,
    connected_ms: u64,
    last_seen_ms: AtomicU64,
    /// The session's cluster-wide generation (see `cluster`), 0 until the
    /// claim is recorded: a takeover elsewhere kicks only older sessions.
    generation: AtomicU64,
}

impl HandleState {
    /// The connection id.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn new(id: u64, device: Arc<str>, connected_ms: u64) -> Self {
        Self {
            device,
            id,
            kick: AtomicU16::new(NO_KICK),
            done: AtomicBool::new(false),
            // A new session first looks for open commands (delivery
            // after a reconnect).
            commands: AtomicBool::new(true),
            connected_ms,
            last_seen_ms: AtomicU64::new(connected_ms),
            generation: AtomicU64::new(0),
        }
    }
}

impl Default for HandleState {
    /// A session of no device (writer tests that only need commit
    /// reports).
    fn default() -> Self {
        Self::new(0, Arc::from(""), 0)
    }
}

/// What the registry knows of a live session, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveInfo {
    /// The device's address (as the gateway sees it).
    pub peer: std::net::SocketAddr,
    /// When the session was established, Unix ms.
    pub connected_ms: u64,
    /// When the device last sent a frame, Unix ms.
    pub last_seen_ms: u64,
}

const NO_KICK: u16 = u16::MAX;

/// Wakes whoever waits for a session to finish (a takeover, rare). One for
/// all sessions rather than one per handle: a Notify is 32 bytes per
/// connected device; a waiter woken for another session checks its own
/// flag and waits again.
static FINISHED: Notify = Notify::const_new();

impl SessionHandle {
    /// A handle for connection `id` of `device` from `peer`, established
    /// at `connected_ms`, with a fresh [`AckCell`].
    pub fn new(id: u64, device: Arc<str>, peer: std::net::SocketAddr, connected_ms: u64) -> Self {
        let state = HandleState::new(id, device, connected_ms);
        Self {
            inner: Arc::new(AckCell::with_session(state, peer)),
        }
    }

    fn st(&self) -> &HandleState {
        self.inner.session()
    }

    /// The session's wake-up (and commit reports).
    pub fn cell(&self) -> &Arc<AckCell> {
        &self.inner
    }

    /// The device's id.
    pub fn device(&self) -> &Arc<str> {
        &self.st().device
    }

    /// Tells the session it has commands to send.
    pub fn notify_commands(&self) {
        self.st().commands.store(true, Ordering::Release);
        self.inner.wake();
    }

    /// Whether commands are announced and not yet taken.
    pub fn commands_pending(&self) -> bool {
        self.st().commands.load(Ordering::Acquire)
    }

    /// Whether commands were announced since the last call.
    pub fn take_commands(&self) -> bool {
        self.st().commands.swap(false, Ordering::AcqRel)
    }

    /// Records the cluster-wide generation of this session's claim.
    pub fn set_generation(&self, generation: u64) {
        self.st().generation.store(generation, Ordering::Release);
    }

    /// The cluster-wide generation, 0 if not recorded (single instance, or
    /// not yet).
    pub fn generation(&self) -> u64 {
        self.st().generation.load(Ordering::Acquire)
    }

    /// Records that the device sent something at `ms`.
    pub fn seen(&self, ms: u64) {
        self.st().last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// When the session was established, Unix ms.
    pub fn connected_ms(&self) -> u64 {
        self.st().connected_ms
    }

    /// The session as operators see it.
    pub fn info(&self) -> LiveInfo {
        LiveInfo {
            peer: self.inner.peer(),
            connected_ms: self.st().connected_ms,
            last_seen_ms: self.st().last_seen_ms.load(Ordering::Relaxed),
        }
    }

    /// Records the device's new address (a QUIC connection migrated).
    pub fn set_peer(&self, peer: std::net::SocketAddr) {
        self.inner.set_peer(peer);
    }

    /// The connection id.
    pub fn id(&self) -> u64 {
        self.st().id
    }

    /// Asks the session to say GOODBYE `code` and close. The first kick wins.
    pub fn kick(&self, code: GoodbyeCode) {
        let _ = self.st().kick.compare_exchange(
            NO_KICK,
            code as u16,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.inner.wake();
    }

    /// The kick received, if any.
    pub fn kicked(&self) -> Option<GoodbyeCode> {
        GoodbyeCode::from_u16(self.st().kick.load(Ordering::Acquire))
    }

    /// Resolves when a kick arrives (cancel-safe; a kick before the call
    /// is not lost, Notify keeps a permit).
    pub async fn wait_kick(&self) -> GoodbyeCode {
        loop {
            if let Some(code) = self.kicked() {
                return code;
            }
            self.inner.changed().await;
        }
    }

    /// Marks the session finished (called from its drop guard).
    pub fn finish(&self) {
        self.st().done.store(true, Ordering::Release);
        FINISHED.notify_waiters();
    }

    /// Resolves when the session has finished.
    pub async fn finished(&self) {
        loop {
            let notified = FINISHED.notified();
            tokio::pin!(notified);
            // Register before checking the flag, so a finish in between is
            // not missed.
            notified.as_mut().enable();
            if self.st().done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

struct Entry {
    session: SessionHandle,
    slot: Arc<DeviceSlot>,
}

/// Device id to live session.
#[derive(Default)]
pub struct Registry {
    /// Hashed by the device id the session holds: 16 bytes per device in
    /// the table, where a map keyed by the id (`Arc<str>`, 16 more) would
    /// hold a second pointer to it.
    map: Mutex<HashTable<Entry>>,
    hasher: RandomState,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashTable<Entry>> {
        // Every critical section below is a plain map update that cannot
        // leave the map inconsistent, so a poisoned lock is still sound.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hash(&self, device_id: &str) -> u64 {
        self.hasher.hash_one(device_id)
    }

    fn get(&self, device_id: &str) -> Option<SessionHandle> {
        self.lock()
            .find(self.hash(device_id), |e| &**e.session.device() == device_id)
            .map(|e| e.session.clone())
    }

    /// Makes `session` its device's live session. Returns the session it
    /// replaces (to be kicked) and the device's slot (inherited from the
    /// old session, or new).
    pub fn claim(&self, session: SessionHandle) -> (Option<SessionHandle>, Arc<DeviceSlot>) {
        let hash = self.hash(session.device());
        let mut map = self.lock();
        match map.entry(
            hash,
            |e| e.session.device() == session.device(),
            |e| self.hash(e.session.device()),
        ) {
            hash_table::Entry::Occupied(mut e) => {
                let e = e.get_mut();
                let old = std::mem::replace(&mut e.session, session);
                (Some(old), Arc::clone(&e.slot))
            }
            hash_table::Entry::Vacant(v) => {
                let slot = Arc::new(DeviceSlot::default());
                v.insert(Entry {
                    session,
                    slot: Arc::clone(&slot),
                });
                (None, slot)
            }
        }
    }

    /// Removes the device's entry if `session_id` still holds it; returns
    /// whether it did (false: a newer session took the device over).
    pub fn release(&self, device_id: &str, session_id: u64) -> bool {
        let hash = self.hash(device_id);
        let mut map = self.lock();
        match map.find_entry(hash, |e| &**e.session.device() == device_id) {
            Ok(e) if e.get().session.id() == session_id => {
                e.remove();
                true
            }
            _ => false,
        }
    }

    /// Kicks the device's live session, if any. Returns whether one was found.
    pub fn kick(&self, device_id: &str, code: GoodbyeCode) -> bool {
        match self.get(device_id) {
            Some(h) => {
                h.kick(code);
                true
            }
            None => false,
        }
    }

    /// Kicks every live session.
    pub fn kick_all(&self, code: GoodbyeCode) {
        let handles: Vec<_> = self.lock().iter().map(|e| e.session.clone()).collect();
        for h in handles {
            h.kick(code);
        }
    }

    /// Number of devices online.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no device is online.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a device is online.
    pub fn is_online(&self, device_id: &str) -> bool {
        self.get(device_id).is_some()
    }

    /// The device's live session, if any.
    pub fn handle(&self, device_id: &str) -> Option<SessionHandle> {
        self.get(device_id)
    }

    /// Every online device with its session (for the cluster's
    /// reconciliation after a lost database connection).
    pub fn sessions(&self) -> Vec<(String, SessionHandle)> {
        self.lock()
            .iter()
            .map(|e| (e.session.device().to_string(), e.session.clone()))
            .collect()
    }

    /// Tells the device's live session, if any, to send its open commands.
    /// Returns whether the device is online here.
    pub fn notify_commands(&self, device_id: &str) -> bool {
        self.get(device_id).map(|h| h.notify_commands()).is_some()
    }

    /// The device's live session, if it is online here.
    pub fn info(&self, device_id: &str) -> Option<LiveInfo> {
        self.get(device_id).map(|h| h.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_takes_each_seq_once() {
        let s = DeviceSlot::default();
        assert!(s.take(1));
        assert!(!s.take(1));
        assert!(s.take(5));
        assert!(!s.take(3), "below the watermark is a duplicate, gap or not");
        s.observe_stored(10);
        assert!(!s.take(10));
        assert!(s.take(11));
        assert_eq!(s.resolved(), 10);
    }

    #[tokio::test]
    async fn takeover_hands_back_old_and_shares_slot() {
        let r = Registry::new();
        let d: Arc<str> = Arc::from("d");
        let a = SessionHandle::new(1, Arc::clone(&d), "127.0.0.1:1".parse().unwrap(), 0);
        let (old, slot_a) = r.claim(a.clone());
        assert!(old.is_none());
        slot_a.take(7);
        let (old, slot_b) = r.claim(SessionHandle::new(
            2,
            Arc::from("d"),
            "127.0.0.1:1".parse().unwrap(),
            0,
        ));
        assert_eq!(old.unwrap().id(), 1);
        assert!(!slot_b.take(7), "the new session inherits the watermark");
        // The old session's release does not remove the new one.
        r.release("d", 1);
        assert!(r.is_online("d"));
        r.release("d", 2);
        assert!(!r.is_online("d"));
    }

    #[tokio::test]
    async fn kick_first_wins_and_is_not_lost() {
        let h = SessionHandle::new(1, Arc::from("d"), "127.0.0.1:1".parse().unwrap(), 0);
        h.kick(GoodbyeCode::SessionTakenOver);
        h.kick(GoodbyeCode::DeviceRevoked);
        assert_eq!(h.wait_kick().await, GoodbyeCode::SessionTakenOver);
        let h2 = h.clone();
        let t = tokio::spawn(async move { h2.finished().await });
        h.finish();
        t.await.unwrap();
    }
}
