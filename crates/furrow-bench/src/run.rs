//! The coordinator: starts the workers (in this process, or as worker
//! processes), moves them through the phases of the mode, samples them at
//! a fixed interval into the timeline and the progress bar, and builds
//! the report.
//!
//! Phases: connect (at the ramp rate, until every device is connected or
//! the connect deadline passes), then by mode:
//! * flat, steady: warm-up, then the measured window;
//! * idle: hold, then read the server's memory;
//! * storm: stream for the warm-up, then every device drops its connection
//!   at once and reconnects; until all are back or `--duration` passes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::{BenchArgs, Mode};
use crate::device::Phase;
use crate::report::{AuthFloodReport, MemoryReport, Point, Report, StormReport};
use crate::stats::{new_hist, Percentiles, Sample};
use crate::worker::{ChildWorker, Engine, Launcher};
use crate::{BenchError, Cred};

enum Worker {
    Local(Engine),
    Child(ChildWorker),
}

impl Worker {
    fn phase(&mut self, p: Phase) -> Result<(), BenchError> {
        match self {
            Worker::Local(e) => {
                e.set_phase(p);
                Ok(())
            }
            Worker::Child(c) => c.send(match p {
                Phase::Connect => return Ok(()),
                Phase::Run => "run",
                Phase::Storm(_) => "storm",
                Phase::Stop => "stop",
            }),
        }
    }

    fn sample(&mut self) -> Result<Sample, BenchError> {
        match self {
            Worker::Local(e) => Ok(e.sample()),
            Worker::Child(c) => c.sample(),
        }
    }

    fn finish(self) -> Result<(), BenchError> {
        match self {
            Worker::Local(e) => e.finish(),
            Worker::Child(c) => c.finish(),
        }
    }
}

/// Descriptors a worker needs besides one per device.
const FD_MARGIN: usize = 64;

/// This process's soft limit on open files, from /proc (Linux); worker
/// processes inherit it.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The server's resident memory, KiB, from /proc.
pub fn rss_kib(pid: u32) -> Result<u64, BenchError> {
    status_kib(pid, "VmRSS:")?.ok_or_else(|| BenchError::Invalid(format!("no VmRSS for pid {pid}")))
}

/// The server's resident anonymous memory (heap, stacks), KiB, from /proc;
/// None on kernels that do not split RSS (before Linux 4.5).
pub fn rss_anon_kib(pid: u32) -> Result<Option<u64>, BenchError> {
    status_kib(pid, "RssAnon:")
}

/// One `KEY: N kB` line of /proc/PID/status.
fn status_kib(pid: u32, key: &str) -> Result<Option<u64>, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok()))
}

/// The server's CPU time (user + system), seconds, from /proc. Linux
/// reports it in USER_HZ ticks, 100 per second by ABI.
pub fn cpu_s(pid: u32) -> Result<f64, BenchError> {
    stat_cpu_s(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
        .ok_or_else(|| BenchError::Invalid(format!("unreadable /proc/{pid}/stat")))
}

/// The server's CPU time by thread name (threads of one name summed),
/// seconds: which part of the cost per message is the network path and
/// which the storage threads. A thread that ends in between is left out.
pub fn thread_cpu_s(pid: u32) -> Result<BTreeMap<String, f64>, BenchError> {
    let mut by_name = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        // A thread may end between the listing and the reads: skip it.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        if let Some(cpu) = stat_cpu_s(&stat) {
            *by_name.entry(comm.trim().to_owned()).or_insert(0.0) += cpu;
        }
    }
    Ok(by_name)
}

/// The server's CPU at the start of a measured window.
struct CpuMark {
    pid: u32,
    cpu: f64,
    threads: BTreeMap<String, f64>,
}

impl CpuMark {
    /// Reads the server's CPU now (nothing without a pid).
    fn take(pid: Option<u32>) -> Result<Option<Self>, BenchError> {
        pid.map(|pid| {
            Ok(Self {
                pid,
                cpu: cpu_s(pid)?,
                threads: thread_cpu_s(pid)?,
            })
        })
        .transpose()
    }

    /// The server's CPU since the mark (seconds), in all and by thread.
    fn since(self) -> Result<(Option<f64>, BTreeMap<String, f64>), BenchError> {
        let mut by_thread = BTreeMap::new();
        for (name, cpu) in thread_cpu_s(self.pid)? {
            let spent = cpu - self.threads.get(&name).copied().unwrap_or(0.0);
            by_thread.insert(name, spent);
        }
        Ok((Some(cpu_s(self.pid)? - self.cpu), by_thread))
    }
}

/// utime + stime of one `/proc/.../stat` line, seconds.
fn stat_cpu_s(stat: &str) -> Option<f64> {
    // Fields after the command name, which may itself contain spaces.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    Some((tick(11)? + tick(12)?) as f64 / 100.0)
}

struct Coordinator {
    args: BenchArgs,
    workers: Vec<Worker>,
    t0: Instant,
    last_at: Instant,
    last: Sample,
    timeline: Vec<Point>,
    connect_us: Histogram<u64>,
    bar: ProgressBar,
}

impl Coordinator {
    /// Sleeps until `every` after the previous sample, then samples every
    /// worker at once and records the interval.
    fn tick(&mut self, every: Duration, phase: &str) -> Result<Sample, BenchError> {
        let next = self.last_at + every;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let mut s = Sample::default();
        for w in &mut self.workers {
            s.merge(w.sample()?);
        }
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-6);
        s.connect_us.add_to(&mut self.connect_us);
        let mut interval = new_hist();
        s.ack_us.add_to(&mut interval);
        let rate = s.acked.saturating_sub(self.last.acked) as f64 / dt;
        let errors: u64 = s.errors.values().sum();
        let p99 = (!interval.is_empty()).then(|| interval.value_at_quantile(0.99));
        self.timeline.push(Point {
            t_s: now.duration_since(self.t0).as_secs_f64(),
            phase: phase.to_owned(),
            connected: s.connected,
            acked_per_s: rate,
            p99_us: p99,
            errors,
        });
        self.bar.set_message(format!(
            "{phase:<8} connected {}/{}  acked {:>9.0}/s  p99 {}  errors {errors}  reconnects {}",
            s.connected,
            self.args.devices,
            rate,
            p99.map_or_else(
                || "-".to_owned(),
                |v| format!("{:.1} ms", v as f64 / 1000.0)
            ),
            s.reconnects,
        ));
        self.bar.tick();
        self.last_at = now;
        self.last = s.clone();
        Ok(s)
    }

    /// Starts the run phase and lets it settle for `--warmup` seconds.
    fn warm_up(&mut self, mut s: Sample) -> Result<Sample, BenchError> {
        self.phase(Phase::Run)?;
        for _ in 0..self.args.warmup {
            s = self.tick(Duration::from_secs(1), "warmup")?;
        }
        Ok(s)
    }

    fn phase(&mut self, p: Phase) -> Result<(), BenchError> {
        for w in &mut self.workers {
            w.phase(p)?;
        }
        Ok(())
    }
}

/// Runs a benchmark with these devices (the first `args.devices` of
/// `creds` are used). With more than one worker, `launcher` starts the
/// worker processes. Prints nothing but the progress bar; the caller
/// prints or writes the report.
pub fn run(
    args: BenchArgs,
    creds: Vec<Cred>,
    launcher: Option<&Launcher>,
) -> Result<Report, BenchError> {
    args.validate()?;
    if creds.len() < args.devices {
        return Err(BenchError::Invalid(format!(
            "{} devices asked for, {} given",
            args.devices,
            creds.len()
        )));
    }
    if let (true, Some(ca)) = (args.tls || args.quic, &args.tls_ca) {
        // Check the CA file here, before any worker process starts.
        crate::conn::Tls::new(
            ca,
            &args.tls_server_name,
            !args.tls_no_resume,
            args.quic,
            args.tls12,
        )?;
    }
    // Resident memory before any device connects: all of it, and the
    // anonymous part.
    let rss_before = match args.server_pid {
        Some(pid) => Some((rss_kib(pid)?, rss_anon_kib(pid)?)),
        None => None,
    };
    let n_workers = args.worker_count();
    let per_worker = args.devices.div_ceil(n_workers);
    if let Some(limit) = open_files_limit() {
        if per_worker + FD_MARGIN > limit {
            return Err(BenchError::Invalid(format!(
                "{per_worker} devices per process need about {} open files, above this \
                 process's limit of {limit}: raise it (ulimit -n), or use more --workers",
                per_worker + FD_MARGIN
            )));
        }
    }
    let mut slices: Vec<Vec<(usize, Cred)>> = (0..n_workers).map(|_| Vec::new()).collect();
    for (i, c) in creds.into_iter().take(args.devices).enumerate() {
        slices[i % n_workers].push((i, c));
    }
    let mut workers = Vec::with_capacity(n_workers);
    for slice in slices {
        workers.push(if n_workers == 1 {
            Worker::Local(Engine::start(args.clone(), slice)?)
        } else {
            let l = launcher.ok_or_else(|| {
                BenchError::Invalid("several worker processes need a launcher".into())
            })?;
            Worker::Child(ChildWorker::spawn(l, &args, slice)?)
        });
    }
    let bar = if args.quiet {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let t0 = Instant::now();
    let mut c = Coordinator {
        args: args.clone(),
        workers,
        t0,
        last_at: t0,
        last: Sample::default(),
        timeline: Vec::new(),
        connect_us: new_hist(),
        bar,
    };
    let result = drive(&mut c, rss_before);
    c.bar.finish_and_clear();
    let stop = c.phase(Phase::Stop);
    let mut finish = Ok(());
    for w in c.workers.drain(..) {
        if let Err(e) = w.finish() {
            finish = Err(e);
        }
    }
    let report = result?;
    stop?;
    finish?;
    Ok(report)
}

fn drive(
    c: &mut Coordinator,
    rss_before: Option<(u64, Option<u64>)>,
) -> Result<Report, BenchError> {
    let args = c.args.clone();
    let second = Duration::from_secs(1);
    let n = args.devices as u64;

    // Connect, at the ramp rate, until all are connected or the deadline.
    let ramp_s = match args.ramp {
        0 => 0.0,
        r => args.devices as f64 / f64::from(r),
    };
    let deadline = c.t0 + Duration::from_secs_f64(ramp_s + args.handshake_timeout as f64 + 5.0);
    let mut s = loop {
        let s = c.tick(Duration::from_millis(200), "connect")?;
        if s.connected >= n || Instant::now() >= deadline {
            break s;
        }
    };
    let connected = s.connected;
    let connect_s = c.last_at.duration_since(c.t0).as_secs_f64();

    let mut ack = new_hist();
    let mut storm = None;
    let mut memory = None;
    let mut server_cpu_s = None;
    let mut server_threads_cpu_s = BTreeMap::new();
    let mut flood = None;
    let (mut measured_s, mut sent, mut acked) = (0.0, 0, 0);
    match args.mode {
        Mode::Flat | Mode::Steady => {
            s = c.warm_up(s)?;
            let (start, start_at) = (s.clone(), c.last_at);
            let mark = CpuMark::take(args.server_pid)?;
            for _ in 0..args.duration {
                s = c.tick(second, "measure")?;
                s.ack_us.add_to(&mut ack);
            }
            measured_s = c.last_at.duration_since(start_at).as_secs_f64();
            if let Some(mark) = mark {
                (server_cpu_s, server_threads_cpu_s) = mark.since()?;
            }
            sent = s.sent.saturating_sub(start.sent);
            acked = s.acked.saturating_sub(start.acked);
        }
        Mode::Authflood => {
            s = c.warm_up(s)?;
            let (start, start_at) = (s.clone(), c.last_at);
            let mark = CpuMark::take(args.server_pid)?;
            let rss_start = args.server_pid.map(rss_kib).transpose()?;
            let mut handshakes = new_hist();
            let mut rss_max = rss_start.unwrap_or(0);
            for _ in 0..args.duration {
                s = c.tick(second, "flood")?;
                s.connect_us.add_to(&mut handshakes);
                if let Some(pid) = args.server_pid {
                    rss_max = rss_max.max(rss_kib(pid)?);
                }
            }
            measured_s = c.last_at.duration_since(start_at).as_secs_f64();
            if let Some(mark) = mark {
                (server_cpu_s, server_threads_cpu_s) = mark.since()?;
            }
            let attempts: BTreeMap<String, u64> = s
                .errors
                .iter()
                .filter_map(|(k, v)| {
                    let outcome = k.strip_prefix("attack: ")?;
                    let n = v.saturating_sub(start.errors.get(k).copied().unwrap_or(0));
                    Some((outcome.to_owned(), n))
                })
                .collect();
            let total: u64 = attempts.values().sum();
            flood = Some(AuthFloodReport {
                attackers: args.attackers,
                attack_sources: args.attack_sources,
                attempts_per_s: total as f64 / measured_s.max(1e-9),
                attempts,
                handshakes: handshakes.len(),
                handshake_us: Percentiles::of(&handshakes),
                rss_start_kib: rss_start,
                rss_max_kib: args.server_pid.map(|_| rss_max),
            });
        }
        Mode::Idle => {
            for _ in 0..args.duration {
                s = c.tick(second, "hold")?;
            }
            if let (Some(pid), Some((before, anon_before))) = (args.server_pid, rss_before) {
                let after = rss_kib(pid)?;
                let per_connection = |before: u64, after: u64| {
                    after.saturating_sub(before) as f64 * 1024.0 / s.connected.max(1) as f64
                };
                let anon = match (anon_before, rss_anon_kib(pid)?) {
                    (Some(b), Some(a)) => Some(per_connection(b, a)),
                    _ => None,
                };
                memory = Some(MemoryReport {
                    rss_before_kib: before,
                    rss_after_kib: after,
                    bytes_per_connection: per_connection(before, after),
                    anon_bytes_per_connection: anon,
                });
            }
        }
        Mode::Storm => {
            c.phase(Phase::Run)?;
            for _ in 0..args.warmup.max(1) {
                s = c.tick(second, "stream")?;
            }
            let devices = s.connected;
            // The server's CPU from the drop until every device is back:
            // what a reconnect costs it (streaming devices add theirs).
            let mark = CpuMark::take(args.server_pid)?;
            c.phase(Phase::Storm(Instant::now()))?;
            let until = Instant::now() + Duration::from_secs(args.duration);
            let mut back = new_hist();
            loop {
                s = c.tick(Duration::from_millis(200), "storm")?;
                s.storm_us.add_to(&mut back);
                if s.storm_back >= devices || Instant::now() >= until {
                    break;
                }
            }
            if let Some(mark) = mark {
                (server_cpu_s, server_threads_cpu_s) = mark.since()?;
            }
            storm = Some(StormReport {
                devices,
                back: s.storm_back,
                all_back_ms: (s.storm_back >= devices).then(|| back.max() as f64 / 1000.0),
                back_us: Percentiles::of(&back),
            });
        }
    }
    Ok(Report {
        mode: args.mode,
        protocol: args.protocol,
        // The transport shows as a scheme: tls://, quic://, or none (TCP).
        addrs: args
            .addrs
            .iter()
            .map(|a| match (args.quic, args.tls) {
                (true, _) => format!("quic://{a}"),
                (_, true) => format!("tls://{a}"),
                _ => a.to_string(),
            })
            .collect(),
        devices: args.devices,
        workers: c.workers.len(),
        threads: args.threads,
        sources: args.source_count(),
        window: args.window,
        rate: args.rate,
        payload_bytes: crate::worker::json_payload(args.payload_bytes).len(),
        connected,
        connect_s,
        connect_us: Percentiles::of(&c.connect_us),
        measured_s,
        sent,
        acked,
        msgs_per_s: if measured_s > 0.0 {
            acked as f64 / measured_s
        } else {
            0.0
        },
        ack_us: Percentiles::of(&ack),
        server_cpu_s,
        server_cpu_us_per_msg: server_cpu_s
            .filter(|_| acked > 0)
            .map(|cpu| cpu * 1e6 / acked as f64),
        server_threads_cpu_s,
        reconnects: s.reconnects,
        errors: s.errors.clone(),
        storm,
        flood,
        memory,
        timeline: c.timeline.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_cpu_and_memory_are_readable() {
        let pid = std::process::id();
        // Burn a little CPU so the figure is above zero at 10 ms ticks.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        assert!(cpu_s(pid).expect("cpu") > 0.0);
        assert!(rss_kib(pid).expect("rss") > 0);
        // This test process has a heap, so anonymous memory above zero.
        let anon = rss_anon_kib(pid).expect("status").expect("RssAnon");
        assert!(anon > 0 && anon <= rss_kib(pid).expect("rss"));
        assert!(cpu_s(u32::MAX).is_err());
        // The threads' split adds up to no more than the process (threads
        // that ended are in the process figure only).
        let threads = thread_cpu_s(pid).expect("threads");
        assert!(!threads.is_empty());
        assert!(threads.values().sum::<f64>() <= cpu_s(pid).expect("cpu") + 0.011);
        assert!(thread_cpu_s(u32::MAX).is_err());
    }

    #[test]
    fn a_stat_line_parses_past_a_name_with_spaces_and_parentheses() {
        let line = "42 (a (b) c) S 1 1 1 0 -1 4194560 100 0 0 0 150 25 0 0 20 0 1 0";
        assert_eq!(stat_cpu_s(line), Some(1.75));
        assert_eq!(stat_cpu_s("42 (x) S 1"), None);
        assert_eq!(stat_cpu_s("no parenthesis"), None);
    }
}
