//! Prometheus exposition of the gateway's metrics.
//!
//! The gateway emits through the `metrics` facade everywhere (free until a
//! recorder is installed); this module installs the Prometheus recorder once
//! per process and renders the text format for the API's `/metrics` route.
//! Label sets are bounded by construction: reasons, outcomes, message types
//! and statuses, never a device id.

use std::sync::OnceLock;
use std::time::Duration;

use furrow_proto::MessageType;
use metrics::Counter;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, seconds: 0.25 ms to 10 s.
const SECONDS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Batch size buckets, rows.
const ROWS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];

/// How often histograms are folded (the exporter keeps raw samples until then).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's Prometheus handle, installing the recorder on first use.
/// If another recorder was installed first (a library user's), the handle
/// renders an empty page and a warning says why.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_rows".into()), ROWS));
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                // The bucket lists are constants and not empty.
                Err(e) => {
                    tracing::warn!(error = %e, "metric buckets refused; using summaries");
                    PrometheusBuilder::new().build_recorder()
                }
            };
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(error = %e, "another metrics recorder is installed: /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("furrow_connections_open", "Device connections open now.");
    describe_counter!(
        "furrow_connections_accepted_total",
        "Device connections accepted."
    );
    describe_counter!(
        "furrow_connections_closed_total",
        "Device connections closed, by reason."
    );
    describe_counter!("furrow_handshakes_total", "Handshakes, by outcome.");
    describe_counter!(
        "furrow_frames_in_total",
        "Frames received, by message type."
    );
    describe_counter!("furrow_frames_out_total", "Frames sent, by message type.");
    describe_counter!(
        "furrow_bytes_in_total",
        Unit::Bytes,
        "Bytes received from devices."
    );
    describe_counter!(
        "furrow_bytes_out_total",
        Unit::Bytes,
        "Bytes sent to devices."
    );
    describe_counter!(
        "furrow_telemetry_stored_total",
        "Telemetry committed to the store."
    );
    describe_counter!(
        "furrow_telemetry_duplicate_total",
        "Telemetry already stored (ACKed, not stored again)."
    );
    describe_counter!("furrow_telemetry_rejected_total", "Telemetry REJECTed.");
    describe_histogram!(
        "furrow_ack_latency_seconds",
        Unit::Seconds,
        "From reading a frame to sending the ACK that covers it (oldest frame of each ACK)."
    );
    describe_counter!(
        "furrow_writer_acks_total",
        "ACKs the storage writer wrote to a waiting session's socket itself (plain TCP), not waking the session."
    );
    describe_histogram!(
        "furrow_store_commit_seconds",
        Unit::Seconds,
        "Store commit time."
    );
    describe_histogram!("furrow_store_batch_rows", "Rows per store commit.");
    describe_histogram!(
        "furrow_store_handshake_batch_rows",
        "Handshakes answered by one batched PostgreSQL lookup or claim."
    );
    describe_counter!(
        "furrow_cluster_deadlock_retries_total",
        "Cluster statements run again after PostgreSQL aborted them to break a deadlock."
    );
    describe_counter!(
        "furrow_writer_paced_commits_total",
        "Commits that waited for storage.min_commit_interval_us to pass since the previous one."
    );
    describe_gauge!(
        "furrow_writer_queue_depth",
        "Jobs waiting for the storage writer."
    );
    describe_histogram!(
        "furrow_sqlite_seal_slice_seconds",
        Unit::Seconds,
        "Time of one seal slice (postings for a slice of devices), run on the writer's connection between commits."
    );
    describe_gauge!(
        "furrow_sqlite_wal_pages",
        "Pages in SQLite's WAL at the last checkpoint."
    );
    describe_counter!(
        "furrow_store_commit_errors_total",
        "Failed store commits (retried)."
    );
    describe_counter!(
        "furrow_store_duplicate_rows_total",
        "Readings a PostgreSQL batch skipped because their device's stored watermark already held them (a retried commit, a takeover race)."
    );
    describe_gauge!(
        "furrow_storage_chunks",
        "Telemetry chunks held (SQLite chunk tables, PostgreSQL partitions)."
    );
    describe_counter!(
        "furrow_retention_dropped_chunks_total",
        "Telemetry chunks dropped by storage.retention or storage.max_bytes."
    );
    describe_counter!(
        "furrow_retention_dropped_rows_total",
        "Readings in the chunks retention dropped."
    );
    describe_counter!("furrow_accept_errors_total", "accept() failures, by kind.");
    describe_counter!(
        "furrow_proxy_headers_total",
        "PROXY protocol headers, by outcome: proxied, local (the balancer's own connection), untrusted, invalid, too_long, timeout, closed, io_error, shutdown."
    );
    describe_counter!(
        "furrow_session_takeovers_total",
        "Sessions taken over by a new connection of the same device."
    );
    describe_counter!(
        "furrow_tls_handshakes_total",
        "TLS handshakes, by outcome (full, resumed, timeout, error, shutdown)."
    );
    describe_counter!(
        "furrow_tls_record_handovers_total",
        "TLS sessions whose records left rustls for the gateway's own record layer at their first idle moment, by key schedule (own, or TLS 1.2's fixed keys; rustls, when a TLS 1.3 session's traffic secrets were not captured; failed, the session then ends)."
    );
    describe_counter!(
        "furrow_quic_handshakes_total",
        "QUIC handshakes (up to the device's stream), by outcome (ok, timeout, error, no_stream)."
    );
    describe_histogram!(
        "furrow_quic_handshake_seconds",
        Unit::Seconds,
        "Time from a QUIC connection's first packet to its stream."
    );
    describe_counter!(
        "furrow_quic_0rtt_total",
        "QUIC resumptions with a session ticket: accepted (0-RTT data taken) or rejected (ticket used, evicted or unknown: full handshake)."
    );
    describe_counter!(
        "furrow_quic_migrations_total",
        "QUIC sessions whose device address changed (connection migration)."
    );
    describe_gauge!(
        "furrow_quic_socket_buffer_bytes",
        Unit::Bytes,
        "The QUIC listener's UDP socket buffers as the kernel granted them, by direction."
    );
    describe_histogram!(
        "furrow_tls_handshake_seconds",
        Unit::Seconds,
        "Time to complete a TLS handshake, from its first byte."
    );
    describe_counter!(
        "furrow_tls_reloads_total",
        "TLS certificate reloads (SIGHUP or a changed file), by outcome."
    );
    describe_counter!(
        "furrow_cluster_takeovers_total",
        "Sessions here closed because their device connected to another instance."
    );
    describe_counter!(
        "furrow_cluster_notifications_total",
        "Notifications received from other instances (PostgreSQL LISTEN)."
    );
    describe_counter!(
        "furrow_frame_bytes_in_total",
        Unit::Bytes,
        "Frame bytes received (header included), by message type."
    );
    describe_counter!(
        "furrow_frame_bytes_out_total",
        Unit::Bytes,
        "Frame bytes sent (header included), by message type."
    );
    describe_counter!(
        "furrow_commands_total",
        "Command state changes, by the state entered (queued, delivered, succeeded, failed, expired)."
    );
    describe_histogram!(
        "furrow_job_tick_seconds",
        Unit::Seconds,
        "Time one job's tick took (on SQLite it holds the writer)."
    );
    describe_counter!("furrow_firmware_offers_total", "FIRMWARE_OFFERs sent.");
    describe_counter!(
        "furrow_firmware_bytes_sent_total",
        Unit::Bytes,
        "Firmware image bytes sent in CHUNKs."
    );
    describe_counter!(
        "furrow_firmware_paced_total",
        "CHUNK_REQUESTs that waited for firmware.max_bytes_per_s."
    );
    describe_counter!(
        "furrow_firmware_requests_refused_total",
        "CHUNK_REQUESTs refused, by reason (not_offered: answered FIRMWARE_CANCEL; range: PROTOCOL_ERROR)."
    );
    describe_counter!(
        "furrow_firmware_slot_waits_total",
        "Offers held back because the job's download slots here were taken."
    );
    describe_gauge!(
        "furrow_firmware_downloads_active",
        "Download slots in use on this instance."
    );
    describe_gauge!(
        "furrow_firmware_cache_bytes",
        Unit::Bytes,
        "Firmware image bytes held in memory."
    );
    describe_counter!(
        "furrow_firmware_uploads_total",
        "Firmware uploads, by outcome (stored, too_large, bad_signature)."
    );
    describe_counter!(
        "furrow_connection_panics_total",
        "Connection tasks that panicked (the server goes on)."
    );
    describe_counter!(
        "furrow_command_results_ignored_total",
        "COMMAND_RESULTs for unknown command ids."
    );
    describe_counter!(
        "furrow_mqtt_events_published_total",
        "MQTT events written to the broker connection."
    );
    describe_gauge!(
        "furrow_mqtt_connected",
        "1 while the MQTT broker has accepted the gateway's connection, 0 while it is refused or unreachable."
    );
    describe_counter!(
        "furrow_mqtt_events_dropped_total",
        "MQTT events dropped because the queue was full."
    );
    describe_counter!(
        "furrow_connections_refused_total",
        "Connections answered ERROR BUSY and closed, by reason: max_connections, connect_rate."
    );
    describe_counter!(
        "furrow_telemetry_throttled_total",
        "Times a session stopped reading because its device exceeded limits.telemetry_rate_per_device."
    );
    describe_counter!(
        "furrow_telemetry_throttled_milliseconds_total",
        "Time sessions spent not reading because of their telemetry rate."
    );
    describe_counter!(
        "furrow_auth_failures_total",
        "Failed authentications (unknown device, wrong or revoked token)."
    );
    describe_counter!(
        "furrow_auth_delays_total",
        "Failed authentications answered after a delay (past limits.auth_failures_free)."
    );
    describe_counter!(
        "furrow_auth_previous_token_total",
        "Handshakes that authenticated with a rotated-out token in its grace period."
    );
    describe_gauge!(
        "furrow_auth_delayed",
        "Failed authentications whose answer is being delayed now (at most limits.auth_delayed_max)."
    );
    describe_counter!(
        "furrow_auth_delays_skipped_total",
        "Failed authentications answered at once because limits.auth_delayed_max answers were already waiting."
    );
    describe_gauge!(
        "furrow_limits_tracked_keys",
        "Addresses or device ids a limit remembers, by map: connect_rate, auth_address, auth_device (updated every 5 s)."
    );
    describe_counter!(
        "furrow_limits_evictions_total",
        "Times a full limit map forgot its least recently seen eighth (limits.tracked_keys_max)."
    );
}

/// Counters of the wire, looked up once: the hot path pays one atomic add
/// per frame, not a registry lookup.
pub struct Wire {
    frames_in: Vec<Counter>,
    frames_out: Vec<Counter>,
    frame_bytes_in: Vec<Counter>,
    frame_bytes_out: Vec<Counter>,
    /// Bytes read from devices.
    pub bytes_in: Counter,
    /// Bytes written to devices.
    pub bytes_out: Counter,
    /// From reading a frame to queueing the ACK that covers it.
    pub ack_latency: metrics::Histogram,
}

static WIRE: OnceLock<Wire> = OnceLock::new();

/// The wire counters (bound to the recorder installed when first called:
/// [`crate::server::Server::run`] installs it before any connection).
pub fn wire() -> &'static Wire {
    WIRE.get_or_init(|| {
        let by_type = |name: &'static str| {
            (0..=u8::MAX)
                .map(|b| match MessageType::from_u8(b) {
                    Some(t) => metrics::counter!(name, "type" => t.name()),
                    None => Counter::noop(),
                })
                .collect()
        };
        Wire {
            frames_in: by_type("furrow_frames_in_total"),
            frames_out: by_type("furrow_frames_out_total"),
            frame_bytes_in: by_type("furrow_frame_bytes_in_total"),
            frame_bytes_out: by_type("furrow_frame_bytes_out_total"),
            bytes_in: metrics::counter!("furrow_bytes_in_total"),
            bytes_out: metrics::counter!("furrow_bytes_out_total"),
            ack_latency: metrics::histogram!("furrow_ack_latency_seconds"),
        }
    })
}

impl Wire {
    /// Counts a frame of `bytes` (header included) received.
    pub fn frame_in(&self, t: MessageType, bytes: usize) {
        self.frames_in[t as u8 as usize].increment(1);
        self.frame_bytes_in[t as u8 as usize].increment(bytes as u64);
    }

    /// Counts a frame of `bytes` sent.
    pub fn frame_out(&self, t: MessageType, bytes: usize) {
        self.frames_out[t as u8 as usize].increment(1);
        self.frame_bytes_out[t as u8 as usize].increment(bytes as u64);
    }
}
