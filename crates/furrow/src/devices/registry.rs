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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use furrow_proto::GoodbyeCode;
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

/// How a registry asks a session to end. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    id: u64,
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    kick: AtomicU16,
    /// The session's one wakeup, shared with the writer's commit reports,
    /// so an idle session waits on a single Notify.
    wake: Arc<AckCell>,
    // A flag rather than a CancellationToken: this lives once per
    // connected device, and the token's tree node is several times larger.
    // Waiters wait on FINISHED.
    done: AtomicBool,
    /// For operators (the API's device view).
    /// Changes only when a QUIC device migrates (rare: a lock is fine).
    peer: std::sync::Mutex<std::net::SocketAddr>,
    connected_ms: u64,
    last_seen_ms: AtomicU64,
    /// Set when the device may have commands to (re)send; the session
    /// looks them up in the store.
    commands: AtomicBool,
    /// The session's cluster-wide generation (see `cluster`), 0 until the
    /// claim is recorded: a takeover elsewhere kicks only older sessions.
    generation: AtomicU64,
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
    /// A handle for connection `id` from `peer`, established at
    /// `connected_ms`, waking the session through `wake`.
    pub fn new(id: u64, wake: Arc<AckCell>, peer: std::net::SocketAddr, connected_ms: u64) -> Self {
        Self {
            id,
            inner: Arc::new(HandleInner {
                kick: AtomicU16::new(NO_KICK),
                wake,
                done: AtomicBool::new(false),
                peer: std::sync::Mutex::new(peer),
                connected_ms,
                last_seen_ms: AtomicU64::new(connected_ms),
                // A new session first looks for open commands (delivery
                // after a reconnect).
                commands: AtomicBool::new(true),
                generation: AtomicU64::new(0),
            }),
        }
    }

    /// The session's wake-up (and commit reports).
    pub fn cell(&self) -> &Arc<AckCell> {
        &self.inner.wake
    }

    /// Tells the session it has commands to send.
    pub fn notify_commands(&self) {
        self.inner.commands.store(true, Ordering::Release);
        self.inner.wake.wake();
    }

    /// Whether commands are announced and not yet taken.
    pub fn commands_pending(&self) -> bool {
        self.inner.commands.load(Ordering::Acquire)
    }

    /// Whether commands were announced since the last call.
    pub fn take_commands(&self) -> bool {
        self.inner.commands.swap(false, Ordering::AcqRel)
    }

    /// Records the cluster-wide generation of this session's claim.
    pub fn set_generation(&self, generation: u64) {
        self.inner.generation.store(generation, Ordering::Release);
    }

    /// The cluster-wide generation, 0 if not recorded (single instance, or
    /// not yet).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Records that the device sent something at `ms`.
    pub fn seen(&self, ms: u64) {
        self.inner.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// The session as operators see it.
    pub fn info(&self) -> LiveInfo {
        LiveInfo {
            peer: *self.inner.peer.lock().unwrap_or_else(|p| p.into_inner()),
            connected_ms: self.inner.connected_ms,
            last_seen_ms: self.inner.last_seen_ms.load(Ordering::Relaxed),
        }
    }

    /// Records the device's new address (a QUIC connection migrated).
    pub fn set_peer(&self, peer: std::net::SocketAddr) {
        *self.inner.peer.lock().unwrap_or_else(|p| p.into_inner()) = peer;
    }

    /// The connection id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Asks the session to say GOODBYE `code` and close. The first kick wins.
    pub fn kick(&self, code: GoodbyeCode) {
        let _ = self.inner.kick.compare_exchange(
            NO_KICK,
            code as u16,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.inner.wake.wake();
    }

    /// The kick received, if any.
    pub fn kicked(&self) -> Option<GoodbyeCode> {
        GoodbyeCode::from_u16(self.inner.kick.load(Ordering::Acquire))
    }

    /// Resolves when a kick arrives (cancel-safe; a kick before the call
    /// is not lost, Notify keeps a permit).
    pub async fn wait_kick(&self) -> GoodbyeCode {
        loop {
            if let Some(code) = self.kicked() {
                return code;
            }
            self.inner.wake.changed().await;
        }
    }

    /// Marks the session finished (called from its drop guard).
    pub fn finish(&self) {
        self.inner.done.store(true, Ordering::Release);
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
            if self.inner.done.load(Ordering::Acquire) {
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
    /// Keyed by the session's own `Arc<str>` id: no second copy per device.
    map: Mutex<HashMap<Arc<str>, Entry>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        // Every critical section below is a plain map update that cannot
        // leave the map inconsistent, so a poisoned lock is still sound.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `session` the device's live session. Returns the session it
    /// replaces (to be kicked) and the device's slot (inherited from the
    /// old session, or new).
    pub fn claim(
        &self,
        device_id: &Arc<str>,
        session: SessionHandle,
    ) -> (Option<SessionHandle>, Arc<DeviceSlot>) {
        let mut map = self.lock();
        match map.get_mut(&**device_id) {
            Some(e) => {
                let old = std::mem::replace(&mut e.session, session);
                (Some(old), Arc::clone(&e.slot))
            }
            None => {
                let slot = Arc::new(DeviceSlot::default());
                map.insert(
                    Arc::clone(device_id),
                    Entry {
                        session,
                        slot: Arc::clone(&slot),
                    },
                );
                (None, slot)
            }
        }
    }

    /// Removes the device's entry if `session_id` still holds it; returns
    /// whether it did (false: a newer session took the device over).
    pub fn release(&self, device_id: &str, session_id: u64) -> bool {
        let mut map = self.lock();
        if map
            .get(device_id)
            .is_some_and(|e| e.session.id == session_id)
        {
            map.remove(device_id);
            return true;
        }
        false
    }

    /// Kicks the device's live session, if any. Returns whether one was found.
    pub fn kick(&self, device_id: &str, code: GoodbyeCode) -> bool {
        let handle = self.lock().get(device_id).map(|e| e.session.clone());
        match handle {
            Some(h) => {
                h.kick(code);
                true
            }
            None => false,
        }
    }

    /// Kicks every live session.
    pub fn kick_all(&self, code: GoodbyeCode) {
        let handles: Vec<_> = self.lock().values().map(|e| e.session.clone()).collect();
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
        self.lock().contains_key(device_id)
    }

    /// The device's live session, if any.
    pub fn handle(&self, device_id: &str) -> Option<SessionHandle> {
        self.lock().get(device_id).map(|e| e.session.clone())
    }

    /// Every online device with its session (for the cluster's
    /// reconciliation after a lost database connection).
    pub fn sessions(&self) -> Vec<(String, SessionHandle)> {
        self.lock()
            .iter()
            .map(|(id, e)| (id.to_string(), e.session.clone()))
            .collect()
    }

    /// Tells the device's live session, if any, to send its open commands.
    /// Returns whether the device is online here.
    pub fn notify_commands(&self, device_id: &str) -> bool {
        let handle = self.lock().get(device_id).map(|e| e.session.clone());
        handle.map(|h| h.notify_commands()).is_some()
    }

    /// The device's live session, if it is online here.
    pub fn info(&self, device_id: &str) -> Option<LiveInfo> {
        self.lock().get(device_id).map(|e| e.session.info())
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
        let a = SessionHandle::new(1, Default::default(), "127.0.0.1:1".parse().unwrap(), 0);
        let d: Arc<str> = Arc::from("d");
        let (old, slot_a) = r.claim(&d, a.clone());
        assert!(old.is_none());
        slot_a.take(7);
        let (old, slot_b) = r.claim(
            &d,
            SessionHandle::new(2, Default::default(), "127.0.0.1:1".parse().unwrap(), 0),
        );
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
        let h = SessionHandle::new(1, Default::default(), "127.0.0.1:1".parse().unwrap(), 0);
        h.kick(GoodbyeCode::SessionTakenOver);
        h.kick(GoodbyeCode::DeviceRevoked);
        assert_eq!(h.wait_kick().await, GoodbyeCode::SessionTakenOver);
        let h2 = h.clone();
        let t = tokio::spawn(async move { h2.finished().await });
        h.finish();
        t.await.unwrap();
    }
}
