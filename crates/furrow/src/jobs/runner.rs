//! The job runner: every instance ticks every active job a few times a
//! second (`FleetStore::tick_job`; on PostgreSQL the instances take turns
//! through a row lock), then wakes the sessions of the devices a tick
//! started, here or on the instance that holds each one, and publishes
//! what changed.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::jobs::JobView;
use crate::cluster::Cluster;
use crate::devices::registry::Registry;
use crate::devices::state::StateLimits;
use crate::publish::Events;
use crate::store::prelude::*;
use crate::store::{JobTick, TickScope};

/// How often active jobs are looked at.
pub const TICK: Duration = Duration::from_millis(200);

/// Devices a tick looks at or starts per slice (each slice its own
/// transaction: on SQLite the writer's telemetry commits queued behind a
/// tick wait for one slice, a couple of milliseconds, not for a thousand
/// devices that finish a rollout at once).
const TICK_SLICE: usize = 64;

/// What the runner needs.
pub struct Runner {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Local sessions, to wake.
    pub registry: Arc<Registry>,
    /// Other instances, to wake theirs.
    pub cluster: Cluster,
    /// Events.
    pub events: Events,
    /// Limits of desired-state patches.
    pub limits: StateLimits,
}

impl Runner {
    /// Runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
            match self.tick_all().await {
                Ok(active) => {
                    metrics::gauge!("furrow_jobs_active").set(active as f64);
                    if failing {
                        tracing::info!("jobs advance again");
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot advance jobs; retrying");
                        failing = true;
                    }
                }
            }
        }
    }

    /// One pass over the active jobs; returns how many there are.
    pub async fn tick_all(&self) -> Result<usize, crate::store::StoreError> {
        let ids = self.store.active_jobs().await?;
        for &id in &ids {
            let now = crate::clock::now_ms();
            // A firmware job looks only at devices that reported since its
            // last look (or may have timed out), in slices.
            let mut scope = TickScope {
                changed_only: true,
                after: None,
                max_devices: TICK_SLICE,
            };
            loop {
                let started = std::time::Instant::now();
                let ticked = self.store.tick_job(id, now, self.limits, scope).await?;
                // On SQLite a slice holds the writer (telemetry commits
                // wait): this is how long.
                metrics::histogram!("furrow_job_tick_seconds")
                    .record(started.elapsed().as_secs_f64());
                let Some(t) = ticked else { break };
                let more = t.more;
                self.after(t).await;
                match more {
                    Some(key) => scope.after = Some(key),
                    None => break,
                }
            }
        }
        Ok(ids.len())
    }

    async fn after(&self, t: JobTick) {
        // A firmware device that finished (or whose job stopped) is woken
        // too: its session withdraws the offer and frees its slot.
        let firmware = matches!(t.job.operation, crate::jobs::Operation::Firmware { .. });
        let finished = t
            .changed
            .iter()
            .filter(|d| firmware && d.state.is_final())
            .map(|d| &d.device_id);
        for device_id in t.started.iter().chain(finished) {
            if !self.registry.notify_commands(device_id) {
                self.cluster.command_created(device_id).await;
            }
        }
        for d in &t.changed {
            metrics::counter!("furrow_job_devices_total", "state" => d.state.as_str()).increment(1);
            self.events.job_device(t.job.id, d);
        }
        if t.status_changed {
            metrics::counter!("furrow_jobs_finished_total", "status" => t.job.status.as_str())
                .increment(1);
            tracing::info!(
                job = t.job.id,
                status = t.job.status.as_str(),
                reason = t.job.reason.as_deref().unwrap_or(""),
                "job stopped starting devices"
            );
        }
        if t.status_changed || !t.changed.is_empty() {
            self.events.job(&JobView::of(&t.job));
        }
    }
}
