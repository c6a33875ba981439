//! Events for real-time consumers, published to an MQTT broker (off unless
//! configured). The store stays the source of truth: publishing never
//! blocks ingest. Events wait in a bounded queue (rumqttc's request
//! channel); when it is full, as while the broker is away, an event is
//! counted (`furrow_mqtt_events_dropped_total`) and dropped.
//!
//! Topics, under `mqtt.topic_prefix`:
//! * `devices/{id}/telemetry`: each reading, after its commit;
//! * `devices/{id}/status`: retained `{online, instance, at}`;
//! * `devices/{id}/commands/{command_id}`: each state change of a command;
//! * `devices/{id}/state/desired`: each change of the desired state
//!   (version, document, patch, delta);
//! * `devices/{id}/state/reported`: each stored REPORT (seq, patch);
//! * `jobs/{job_id}`: a job's progress and status, on each change;
//! * `jobs/{job_id}/devices/{id}`: each change of a device's part of a job;
//! * `instances/{instance}/status`: retained `{online, at}`, and the
//!   instance's MQTT will sets it to offline: a device status naming an
//!   offline instance is stale.

pub mod mqtt;

use std::sync::Arc;

use crate::devices::state::StateView;
use crate::store::{CommandRecord, ReportRecord, TelemetryRecord};

/// Where events go. Cheap to clone; does nothing when MQTT is off.
#[derive(Clone, Default)]
pub struct Events {
    mqtt: Option<Arc<mqtt::Publisher>>,
}

impl Events {
    /// No events.
    pub fn off() -> Self {
        Self::default()
    }

    /// Events through `publisher`.
    pub fn mqtt(publisher: Arc<mqtt::Publisher>) -> Self {
        Self {
            mqtt: Some(publisher),
        }
    }

    /// Whether events are published at all.
    pub fn enabled(&self) -> bool {
        self.mqtt.is_some()
    }

    /// A reading was committed.
    pub fn telemetry(&self, device_id: &str, r: &TelemetryRecord) {
        if let Some(m) = &self.mqtt {
            m.telemetry(device_id, r);
        }
    }

    /// A device's reported state changed (committed).
    pub fn reported(&self, device_id: &str, r: &ReportRecord) {
        if let Some(m) = &self.mqtt {
            m.reported(device_id, r);
        }
    }

    /// A device's desired state changed (committed).
    pub fn desired(&self, view: &StateView, patch: &serde_json::Value) {
        if let Some(m) = &self.mqtt {
            m.desired(view, patch);
        }
    }

    /// A job changed (progress or status).
    pub fn job(&self, view: &crate::api::jobs::JobView) {
        if let Some(m) = &self.mqtt {
            m.json(&format!("jobs/{}", view.job_id), view);
        }
    }

    /// A device's part of a job changed.
    pub fn job_device(&self, job_id: u64, d: &crate::jobs::JobDevice) {
        if let Some(m) = &self.mqtt {
            m.json(&format!("jobs/{job_id}/devices/{}", d.device_id), d);
        }
    }

    /// A command changed state.
    pub fn command(&self, c: &CommandRecord) {
        metrics::counter!("furrow_commands_total", "state" => c.state.as_str()).increment(1);
        if let Some(m) = &self.mqtt {
            m.command(c);
        }
    }

    /// A device connected or disconnected on this instance.
    pub fn status(&self, device_id: &str, online: bool) {
        if let Some(m) = &self.mqtt {
            m.status(device_id, online);
        }
    }
}
