//! The MQTT publisher (rumqttc). One client per instance; its event loop
//! runs in its own task and reconnects by itself, logging each change of
//! state once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::Mqtt as MqttConfig;
use crate::devices::state::StateView;
use crate::envelope;
use crate::store::{CommandRecord, ReportRecord, TelemetryRecord};

/// Why the MQTT settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The URL is not `mqtt://host[:port]` or `mqtts://host[:port]`.
    #[error("mqtt.url {0:?}: expected mqtt://host[:port] or mqtts://host[:port]")]
    Url(String),
    /// mqtts:// without a CA to check the broker's certificate against.
    #[error("mqtt.url is mqtts://: set mqtt.ca_file to the CA (PEM) that signed the broker's certificate")]
    NoCa,
    /// The CA file cannot be read.
    #[error("mqtt.ca_file {path}: {source}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A client certificate without its key, or the other way round, or
    /// either without TLS.
    #[error("mqtt.cert_file and mqtt.key_file go together, with an mqtts:// url")]
    ClientAuth,
    /// The client certificate or key cannot be read.
    #[error("{key} {path}: {source}")]
    ClientFile {
        /// The setting.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl MqttError {
    /// The setting at fault.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Url(_) => "mqtt.url",
            Self::NoCa | Self::Ca { .. } => "mqtt.ca_file",
            Self::ClientAuth => "mqtt.cert_file",
            Self::ClientFile { key, .. } => key,
        }
    }
}

/// Where the broker is.
struct Broker {
    host: String,
    port: u16,
    tls: bool,
}

/// Publishes events; see the module docs of [`crate::publish`].
pub struct Publisher {
    client: AsyncClient,
    prefix: String,
    qos: QoS,
    instance: String,
    dropped: Counter,
}

#[derive(Serialize)]
struct TelemetryEvent<'a> {
    device_id: &'a str,
    seq: u64,
    timestamp_ms: u64,
    received_ms: u64,
    content_type: String,
    payload: serde_json::Value,
}

#[derive(Serialize)]
struct DeviceStatus<'a> {
    online: bool,
    instance: &'a str,
    at: u64,
}

#[derive(Serialize)]
struct InstanceStatus {
    online: bool,
    at: u64,
}

fn parse_url(url: &str) -> Result<Broker, MqttError> {
    let bad = || MqttError::Url(url.to_owned());
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false, 1883)
    } else {
        return Err(bad());
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => (h.to_owned(), p.parse().map_err(|_| bad())?),
        None if !rest.is_empty() => (rest.to_owned(), default_port),
        _ => return Err(bad()),
    };
    Ok(Broker { host, port, tls })
}

#[cfg(test)]
fn host_port(url: &str) -> Result<(String, u16), MqttError> {
    parse_url(url).map(|b| (b.host, b.port))
}

/// Checks the settings without connecting: the URL, and for mqtts:// a
/// readable CA file (the gateway fails closed on either).
pub fn check(cfg: &MqttConfig) -> Result<(), MqttError> {
    let tls = parse_url(&cfg.url)?.tls;
    if tls {
        read_ca(&cfg.ca_file)?;
    }
    client_auth(cfg, tls)?;
    Ok(())
}

/// A certificate chain and its private key, PEM.
type CertAndKey = (Vec<u8>, Vec<u8>);

/// The client certificate and key (PEM) to present to the broker, if set:
/// brokers that require client certificates (Mosquitto's
/// `require_certificate true`) identify the gateway by it.
fn client_auth(cfg: &MqttConfig, tls: bool) -> Result<Option<CertAndKey>, MqttError> {
    match (cfg.cert_file.is_empty(), cfg.key_file.is_empty()) {
        (true, true) => Ok(None),
        (false, false) if tls => {
            let read = |key: &'static str, path: &str| {
                std::fs::read(path).map_err(|source| MqttError::ClientFile {
                    key,
                    path: path.to_owned(),
                    source,
                })
            };
            Ok(Some((
                read("mqtt.cert_file", &cfg.cert_file)?,
                read("mqtt.key_file", &cfg.key_file)?,
            )))
        }
        _ => Err(MqttError::ClientAuth),
    }
}

fn read_ca(path: &str) -> Result<Vec<u8>, MqttError> {
    if path.is_empty() {
        return Err(MqttError::NoCa);
    }
    std::fs::read(path).map_err(|source| MqttError::Ca {
        path: path.to_owned(),
        source,
    })
}

impl Publisher {
    /// Connects (in the background) and returns the publisher; the event
    /// loop stops when `stop` is cancelled.
    pub fn start(
        cfg: &MqttConfig,
        instance: &str,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, MqttError> {
        let broker = parse_url(&cfg.url)?;
        let client_id = if cfg.client_id.is_empty() {
            format!("furrow-{instance}")
        } else {
            cfg.client_id.clone()
        };
        let prefix = cfg.topic_prefix.trim_end_matches('/').to_owned();
        let qos = if cfg.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let instance_topic = format!("{prefix}/instances/{instance}/status");
        let mut opts = MqttOptions::new(client_id, broker.host, broker.port);
        if broker.tls {
            let auth = client_auth(cfg, true)?;
            opts.set_transport(Transport::tls(read_ca(&cfg.ca_file)?, auth, None));
        }
        opts.set_keep_alive(Duration::from_secs(30));
        if !cfg.username.is_empty() {
            opts.set_credentials(cfg.username.clone(), cfg.password.clone());
        }
        let gone = serde_json::to_vec(&InstanceStatus {
            online: false,
            at: 0,
        })
        .unwrap_or_default();
        opts.set_last_will(LastWill::new(&instance_topic, gone, QoS::AtLeastOnce, true));
        let (client, eventloop) = AsyncClient::new(opts, cfg.queue_capacity.max(1));
        let me = Arc::new(Self {
            client,
            prefix,
            qos,
            instance: instance.to_owned(),
            dropped: metrics::counter!("furrow_mqtt_events_dropped_total"),
        });
        tokio::spawn(run(eventloop, Arc::clone(&me), instance_topic, stop));
        Ok(me)
    }

    fn publish(&self, topic: String, retain: bool, payload: Vec<u8>) {
        if self
            .client
            .try_publish(topic, self.qos, retain, payload)
            .is_err()
        {
            self.dropped.increment(1);
        }
    }

    /// Publishes a committed reading.
    pub fn telemetry(&self, device_id: &str, r: &TelemetryRecord) {
        let ev = TelemetryEvent {
            device_id,
            seq: r.seq,
            timestamp_ms: r.timestamp_ms,
            received_ms: r.received_ms,
            content_type: envelope::content_type_name(r.content_type),
            payload: envelope::payload_value(r.content_type, &r.payload),
        };
        if let Ok(body) = serde_json::to_vec(&ev) {
            self.publish(
                format!("{}/devices/{device_id}/telemetry", self.prefix),
                false,
                body,
            );
        }
    }

    /// Publishes `value` as JSON on `prefix/topic` (not retained).
    pub fn json(&self, topic: &str, value: &impl Serialize) {
        if let Ok(body) = serde_json::to_vec(value) {
            self.publish(format!("{}/{topic}", self.prefix), false, body);
        }
    }

    /// Publishes a stored change of a device's reported state.
    pub fn reported(&self, device_id: &str, r: &ReportRecord) {
        let ev = serde_json::json!({
            "device_id": device_id,
            "seq": r.seq,
            "timestamp_ms": r.timestamp_ms,
            "received_ms": r.received_ms,
            "patch": serde_json::from_slice::<serde_json::Value>(&r.patch).unwrap_or_default(),
        });
        self.publish(
            format!("{}/devices/{device_id}/state/reported", self.prefix),
            false,
            ev.to_string().into_bytes(),
        );
    }

    /// Publishes a change of a device's desired state (after its commit).
    pub fn desired(&self, view: &StateView, patch: &serde_json::Value) {
        let ev = serde_json::json!({
            "device_id": view.device_id,
            "version": view.desired.version,
            "document": view.desired.document,
            "patch": patch,
            "delta": view.delta,
        });
        self.publish(
            format!("{}/devices/{}/state/desired", self.prefix, view.device_id),
            false,
            ev.to_string().into_bytes(),
        );
    }

    /// Publishes a command's state change.
    pub fn command(&self, c: &CommandRecord) {
        let view = crate::api::commands::CommandView::of(c);
        if let Ok(body) = serde_json::to_vec(&view) {
            let topic = format!("{}/devices/{}/commands/{}", self.prefix, c.device_id, c.id);
            self.publish(topic, false, body);
        }
    }

    /// Publishes a device's retained status.
    pub fn status(&self, device_id: &str, online: bool) {
        let st = DeviceStatus {
            online,
            instance: &self.instance,
            at: now_ms(),
        };
        if let Ok(body) = serde_json::to_vec(&st) {
            self.publish(
                format!("{}/devices/{device_id}/status", self.prefix),
                true,
                body,
            );
        }
    }
}

/// Drives the connection: reconnects with backoff after a failure, logs
/// each change of state once, counts what reaches the network, and says
/// the instance is online after each connection.
async fn run(
    mut eventloop: rumqttc::EventLoop,
    me: Arc<Publisher>,
    instance_topic: String,
    stop: CancellationToken,
) {
    let published = metrics::counter!("furrow_mqtt_events_published_total");
    let up = metrics::gauge!("furrow_mqtt_connected");
    let connected = AtomicBool::new(false);
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                up.set(1.0);
                if !connected.swap(true, Ordering::Relaxed) {
                    tracing::info!("MQTT broker connected");
                }
                let online = serde_json::to_vec(&InstanceStatus {
                    online: true,
                    at: now_ms(),
                })
                .unwrap_or_default();
                // Through the same queue; if it is full, the will's
                // offline stays until the next connection.
                me.publish(instance_topic.clone(), true, online);
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => published.increment(1),
            Ok(_) => {}
            Err(e) => {
                up.set(0.0);
                if connected.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "MQTT broker connection lost; events queue, then drop, until it returns");
                } else if backoff == Duration::from_millis(100) {
                    tracing::warn!(error = %e, "MQTT broker unreachable; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let _ = me.client.try_disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(host_port("mqtt://broker").unwrap(), ("broker".into(), 1883));
        assert_eq!(host_port("tcp://b:1/").unwrap(), ("b".into(), 1));
        assert_eq!(host_port("mqtts://b").unwrap(), ("b".into(), 8883));
        for bad in ["", "http://x", "mqtt://", "mqtt://:1", "mqtt://h:port"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }
}
