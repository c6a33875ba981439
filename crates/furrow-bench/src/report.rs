//! The result of a run: a JSON report (every figure, and the timeline) and
//! a human summary of it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::args::{Mode, Protocol};
use crate::stats::Percentiles;

/// One sampling interval of the timeline.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Point {
    /// Seconds since the run started, at the end of the interval.
    pub t_s: f64,
    /// connect, warmup, measure, hold, storm.
    pub phase: String,
    /// Devices connected at the end of the interval.
    pub connected: u64,
    /// Messages acknowledged per second over the interval.
    pub acked_per_s: f64,
    /// p99 ACK latency over the interval, microseconds (none without ACKs).
    pub p99_us: Option<u64>,
    /// Errors so far.
    pub errors: u64,
}

/// The storm's outcome.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StormReport {
    /// Devices connected when the storm began.
    pub devices: u64,
    /// Devices reconnected and acknowledged again.
    pub back: u64,
    /// Time until the last one was back, ms (none if some never came back).
    pub all_back_ms: Option<f64>,
    /// Per-device time from the storm to the first acknowledgement after it.
    pub back_us: Percentiles,
}

/// The server's memory around an idle hold.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MemoryReport {
    /// Resident memory before any device connected, KiB.
    pub rss_before_kib: u64,
    /// Resident memory with every device connected, KiB.
    pub rss_after_kib: u64,
    /// The growth divided by the connections held.
    pub bytes_per_connection: f64,
    /// The growth of anonymous memory alone (`RssAnon`: the heap and
    /// stacks, private to the process) divided by the connections held.
    /// The rest of the growth is file-backed pages, mostly the server's
    /// own code faulted in on first use: shared with the page cache and
    /// paid once, not per connection. None where /proc does not say.
    #[serde(default)]
    pub anon_bytes_per_connection: Option<f64>,
}

/// What an authflood run measured over its window.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct AuthFloodReport {
    /// Attacking connections at once.
    pub attackers: usize,
    /// Addresses they sent from.
    pub attack_sources: u32,
    /// Their attempts by outcome (`ERROR 3`: AUTH_FAILED; `ERROR 8`: BUSY).
    pub attempts: BTreeMap<String, u64>,
    /// Attempts a second, all outcomes.
    pub attempts_per_s: f64,
    /// Valid devices' handshakes in the window.
    pub handshakes: u64,
    /// Their connect plus handshake latency.
    pub handshake_us: Percentiles,
    /// The server's resident memory when the window began, KiB.
    pub rss_start_kib: Option<u64>,
    /// Its largest sampled during the window, KiB.
    pub rss_max_kib: Option<u64>,
}

/// Everything a run measured.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Report {
    /// The workload.
    pub mode: Mode,
    /// The protocol.
    pub protocol: Protocol,
    /// The servers.
    pub addrs: Vec<String>,
    /// Devices asked for.
    pub devices: usize,
    /// Worker processes.
    pub workers: usize,
    /// Threads per worker.
    pub threads: usize,
    /// Loopback source addresses.
    pub sources: u32,
    /// Window per device.
    pub window: usize,
    /// Messages per second per device (steady, storm).
    pub rate: f64,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Devices connected at the end of the connect phase.
    pub connected: u64,
    /// Seconds until they were.
    pub connect_s: f64,
    /// Connect plus handshake latency, every connection of the run.
    pub connect_us: Percentiles,
    /// Seconds measured.
    pub measured_s: f64,
    /// Messages sent in the measured window.
    pub sent: u64,
    /// Messages acknowledged in the measured window.
    pub acked: u64,
    /// Acknowledged messages per second in the measured window.
    pub msgs_per_s: f64,
    /// ACK latency (send to acknowledgement) in the measured window.
    pub ack_us: Percentiles,
    /// The server's CPU time over the measured window, seconds (with
    /// `--server-pid`).
    pub server_cpu_s: Option<f64>,
    /// The server's CPU time per acknowledged message, microseconds: the
    /// cost per message, comparable across connection counts.
    pub server_cpu_us_per_msg: Option<f64>,
    /// The server's CPU time over the measured window by thread name,
    /// seconds (with `--server-pid`): Furrow's storage threads are
    /// `furrow-db-*`, its network path `tokio-rt-worker`.
    #[serde(default)]
    pub server_threads_cpu_s: BTreeMap<String, f64>,
    /// Reconnections over the run.
    pub reconnects: u64,
    /// Errors by kind over the run.
    pub errors: BTreeMap<String, u64>,
    /// Storm mode's outcome.
    pub storm: Option<StormReport>,
    /// Authflood mode's outcome.
    #[serde(default)]
    pub flood: Option<AuthFloodReport>,
    /// The server's memory (with `--server-pid`).
    pub memory: Option<MemoryReport>,
    /// Per-interval figures.
    pub timeline: Vec<Point>,
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn pct(p: &Percentiles) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max)
    )
}

impl Report {
    /// A human summary, a few lines.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:?} over {:?}: {} devices on {} ({} worker(s) x {} thread(s), {} source address(es)), {} B JSON",
            self.mode,
            self.protocol,
            self.devices,
            self.addrs.join(","),
            self.workers,
            self.threads,
            self.sources,
            self.payload_bytes
        );
        let _ = writeln!(
            s,
            "  connect    {}/{} in {:.2} s; connect+handshake {}",
            self.connected,
            self.devices,
            self.connect_s,
            pct(&self.connect_us)
        );
        if matches!(self.mode, Mode::Flat | Mode::Steady) {
            let _ = writeln!(
                s,
                "  throughput {:.0} msg/s acknowledged ({} in {:.1} s; window {}{})",
                self.msgs_per_s,
                self.acked,
                self.measured_s,
                self.window,
                if self.mode == Mode::Steady {
                    format!(", offered {:.0} msg/s", self.rate * self.devices as f64)
                } else {
                    String::new()
                }
            );
            let _ = writeln!(s, "  ack        {}", pct(&self.ack_us));
            if let (Some(cpu), Some(per)) = (self.server_cpu_s, self.server_cpu_us_per_msg) {
                let _ = writeln!(
                    s,
                    "  server     {cpu:.2} CPU-s over the window: {per:.2} us of CPU per message"
                );
                let per_msg = |cpu: f64| cpu * 1e6 / self.acked.max(1) as f64;
                let threads: Vec<String> = self
                    .server_threads_cpu_s
                    .iter()
                    .filter(|(_, cpu)| per_msg(**cpu) >= 0.05)
                    .map(|(name, cpu)| format!("{name} {:.2}", per_msg(*cpu)))
                    .collect();
                if !threads.is_empty() {
                    let _ = writeln!(s, "  by thread  us per message: {}", threads.join(", "));
                }
            }
        }
        if let Some(st) = &self.storm {
            let all = st.all_back_ms.map_or_else(
                || "NOT all back".to_owned(),
                |m| format!("all back in {m:.0} ms"),
            );
            let _ = writeln!(
                s,
                "  storm      {}/{} back, {all}; per device {}",
                st.back,
                st.devices,
                pct(&st.back_us)
            );
            if let Some(cpu) = self.server_cpu_s {
                let _ = writeln!(
                    s,
                    "  server     {cpu:.2} CPU-s until all were back: {:.0} us per reconnect",
                    cpu * 1e6 / st.back.max(1) as f64
                );
            }
        }
        if let Some(f) = &self.flood {
            let list: Vec<String> = f
                .attempts
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(
                s,
                "  flood      {} attackers from {} addresses: {:.0} attempts/s ({})",
                f.attackers,
                f.attack_sources,
                f.attempts_per_s,
                list.join(", ")
            );
            let _ = writeln!(
                s,
                "  valid      {} handshakes in {:.1} s: {}",
                f.handshakes,
                self.measured_s,
                pct(&f.handshake_us)
            );
            if let (Some(a), Some(b)) = (f.rss_start_kib, f.rss_max_kib) {
                let _ = writeln!(
                    s,
                    "  memory     server RSS {a} KiB at the start, at most {b} KiB"
                );
            }
            if let Some(cpu) = self.server_cpu_s {
                let _ = writeln!(
                    s,
                    "  server     {cpu:.2} CPU-s over the window ({:.0} % of a CPU)",
                    cpu * 100.0 / self.measured_s.max(1e-9)
                );
            }
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                s,
                "  memory     server RSS {} -> {} KiB: {:.0} bytes per connection",
                m.rss_before_kib, m.rss_after_kib, m.bytes_per_connection
            );
            if let Some(anon) = m.anon_bytes_per_connection {
                let _ = writeln!(
                    s,
                    "             of which anonymous (heap): {anon:.0} bytes per connection"
                );
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors     none; {} reconnects", self.reconnects);
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            let _ = writeln!(
                s,
                "  errors     {}; {} reconnects",
                list.join(", "),
                self.reconnects
            );
        }
        s
    }
}
