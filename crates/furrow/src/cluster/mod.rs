//! Coordination between gateway instances that share a PostgreSQL
//! database: who holds which device, cross-instance takeover, and command
//! wakeups. With SQLite (one instance) every call here is a no-op.
//!
//! The database is the source of truth; notifications only make it fast:
//! - `sessions` records which instance holds each connected device, with a
//!   cluster-wide `generation` from a sequence. A handshake records its
//!   claim; a session that ends deletes its own row (only if it still
//!   holds it).
//! - A claim that displaces another instance's session sends NOTIFY
//!   `takeover` on channel `furrow`; that instance kicks its session if it
//!   is older (lower generation) with GOODBYE SESSION_TAKEN_OVER. When it
//!   has stored what it read and closed, its release sends `released`,
//!   which the new session waits for (bounded) before WELCOME so that
//!   `last_seq` is exact.
//! - A command created on any instance sends `command`; the instance
//!   holding the device wakes its session, which reads the store. A
//!   revocation sends `revoked` (the polled revocation log stays the
//!   fallback).
//! - `instances` holds a heartbeat per instance. An instance silent for
//!   `sessions.instance_timeout_ms` is gone (crashed): any instance deletes
//!   its row and its devices' session rows.
//!
//! A notification is lost when the listening connection breaks (during a
//! database outage, say). After reconnecting, the listener reconciles from
//! the tables: local sessions that another instance has since claimed are
//! kicked, and local devices with queued commands are woken.

use std::net::SocketAddr;
#[cfg(feature = "postgres")]
use std::sync::Arc;

#[cfg(feature = "postgres")]
mod postgres;

use crate::devices::registry::SessionHandle;
use crate::store::{CommandRecord, DeviceKey, DeviceSeqs, StoreError};

/// What [`application_name`] puts before the instance.
const APP_PREFIX: &str = "furrow/";

/// The application_name of an instance's database connections. A killed
/// instance's connections close with it, so their absence from
/// `pg_stat_activity` tells at once that it is gone, long before its
/// heartbeat times out.
pub fn application_name(instance: &str) -> String {
    // PostgreSQL keeps 63 bytes of it.
    let mut name = format!("{APP_PREFIX}{instance}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Another instance's session that a claim displaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Displaced {
    /// Its instance.
    pub instance: String,
    /// Its generation.
    pub generation: u64,
}

/// What recording a claim found, and what it read in the same round trip.
#[derive(Debug, Default)]
pub struct Claim {
    /// The session on another instance that this claim displaced, if it
    /// is still alive there.
    pub displaced: Option<Displaced>,
    /// The device's watermarks and open commands as they stood once the
    /// claim was committed; `None` when the store is to be asked (one
    /// instance alone, where the store is in-process).
    pub reads: Option<ClaimReads>,
}

/// The reads a handshake needs after its claim, pipelined behind it on
/// PostgreSQL: a handshake is then two round trips (the device lookup;
/// the claim with these), not four.
#[derive(Debug)]
pub struct ClaimReads {
    /// The device's stored and rejected watermarks.
    pub seqs: DeviceSeqs,
    /// Its queued and delivered commands, oldest first.
    pub commands: Vec<CommandRecord>,
}

/// Where a device is connected, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The instance.
    pub instance: String,
    /// The device's address (from the PROXY header behind a balancer).
    pub peer: String,
    /// When the session was established, Unix ms.
    pub connected_ms: u64,
}

/// This instance's view of the cluster. Cheap to clone.
/// Without the `postgres` feature there is only ever one instance, and
/// every call is a no-op.
#[derive(Clone, Default)]
pub struct Cluster {
    #[cfg(feature = "postgres")]
    inner: Option<Arc<postgres::Inner>>,
}

impl Cluster {
    /// One instance alone (SQLite): nothing to coordinate.
    pub fn single() -> Self {
        Self::default()
    }

    /// Joins the cluster recorded in `store`: registers this instance,
    /// clears session records left by its previous life, and starts the
    /// heartbeat and the notification listener (until [`Cluster::leave`]).
    #[cfg(feature = "postgres")]
    pub async fn join(
        store: crate::store::PostgresStore,
        cfg: &crate::config::Config,
        registry: Arc<crate::devices::registry::Registry>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            inner: Some(postgres::Inner::join(store, cfg, registry).await?),
        })
    }

    /// Whether other instances may exist.
    pub fn is_shared(&self) -> bool {
        #[cfg(feature = "postgres")]
        return self.inner.is_some();
        #[cfg(not(feature = "postgres"))]
        false
    }

    /// Records that `handle` (this instance) now holds device `key`, and
    /// sets the handle's generation. Returns the session on another
    /// instance that this displaced, if it is still alive there, and (on
    /// PostgreSQL) the device's watermarks and open commands read just
    /// after the claim committed.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn claim(
        &self,
        key: DeviceKey,
        handle: &SessionHandle,
        peer: SocketAddr,
        connected_ms: u64,
    ) -> Result<Claim, StoreError> {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            return inner.claim(key, handle, peer, connected_ms).await;
        }
        Ok(Claim::default())
    }

    /// Tells the displaced session's instance to close it, and waits
    /// (at most `sessions.remote_takeover_wait_ms`) until it has released
    /// the device. Returns whether it did in time.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn take_over(&self, device_id: &str, generation: u64, displaced: &Displaced) -> bool {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            return inner.take_over(device_id, generation, displaced).await;
        }
        true
    }

    /// After a takeover of a session on another instance: the device's
    /// watermarks and open commands as they stand now (batched with other
    /// handshakes'), or `None` when this instance is alone (the store is
    /// to be asked).
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn reread(&self, key: DeviceKey) -> Result<Option<ClaimReads>, StoreError> {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            return inner.reread(key).await.map(Some);
        }
        Ok(None)
    }

    /// Records that the session `handle` of device `key` has ended (in the
    /// background: called from a drop guard). If another instance holds
    /// the device now, tells it this session is gone.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub fn release(&self, key: DeviceKey, device_id: &str, handle: &SessionHandle) {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            inner.release_handle(key, device_id, handle);
        }
    }

    /// Wakes the session of `device_id` on whichever instance holds it.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn command_created(&self, device_id: &str) {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            inner.command_created(device_id).await;
        }
    }

    /// Disconnects a revoked device on whichever instance holds it (the
    /// revocation log, polled by every instance, is the fallback).
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn revoked(&self, device_id: &str) {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            inner.revoked(device_id).await;
        }
    }

    /// Where the device is connected, if on a live instance.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub async fn holder(&self, device_id: &str) -> Result<Option<Holder>, StoreError> {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            return inner.holder(device_id).await;
        }
        Ok(None)
    }

    /// Live instances and how many devices each holds, by name; `None`
    /// when this instance is alone (its registry has the count).
    pub async fn instances(&self) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            return inner.instances().await.map(Some);
        }
        Ok(None)
    }

    /// Leaves the cluster after the sessions have drained: waits (bounded)
    /// for their releases, then removes this instance and any session rows
    /// still recorded for it.
    pub async fn leave(&self) {
        #[cfg(feature = "postgres")]
        if let Some(inner) = &self.inner {
            inner.leave().await;
        }
    }
}
