//! Workers: the devices of one process, on threads with one single-threaded
//! runtime each. A run with more devices than one process may hold open
//! (20,000 files here) uses several worker processes; the coordinator
//! drives each over its stdin and stdout, one JSON or command line at a
//! time:
//!
//! ```text
//! coordinator -> worker: {spec}\n   the options and this worker's devices
//!                        run\n | storm\n | sample\n | stop\n
//! worker -> coordinator: {sample}\n after each `sample`; `done\n` after `stop`
//! ```
//!
//! A worker whose stdin closes stops, so none outlives its coordinator.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::args::BenchArgs;
use crate::conn::Tls;
use crate::device::{source_addr, Attacker, Device, Phase, Shared};
use crate::stats::{Recorder, Sample};
use crate::{BenchError, Cred};

/// How to start a worker process: a program and the arguments that make
/// it call [`worker_main`] (for the `furrow` binary: `furrow bench-worker`).
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The program, usually `std::env::current_exe()`.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// What a worker process is given on its first stdin line.
#[derive(Serialize, Deserialize)]
struct Spec {
    args: BenchArgs,
    devices: Vec<(usize, Cred)>,
}

/// A JSON object padded to `bytes` (at least its 26 bytes of fields).
pub fn json_payload(bytes: usize) -> Bytes {
    let base = r#"{"t":21.5,"h":40.2,"p":""}"#;
    let pad = bytes.saturating_sub(base.len());
    Bytes::from(format!(
        r#"{{"t":21.5,"h":40.2,"p":"{}"}}"#,
        "x".repeat(pad)
    ))
}

/// The devices of this process.
pub struct Engine {
    shared: Arc<Shared>,
    phase: watch::Sender<Phase>,
    threads: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts `devices` (each with its index in the whole run); they
    /// connect at once, at the ramp rate, and wait for [`Phase::Run`].
    pub fn start(args: BenchArgs, devices: Vec<(usize, Cred)>) -> Result<Self, BenchError> {
        let (phase, _) = watch::channel(Phase::Connect);
        let threads = args.threads.clamp(1, devices.len().max(1));
        let t0 = Instant::now();
        let sources = args.source_count();
        let tls = match (args.tls || args.quic, &args.tls_ca) {
            (true, Some(ca)) => Some(Tls::new(
                ca,
                &args.tls_server_name,
                !args.tls_no_resume,
                args.quic,
                args.tls12,
            )?),
            (true, None) => {
                return Err(BenchError::Invalid("--tls and --quic need --tls-ca".into()))
            }
            _ => None,
        };
        // authflood: the attackers claim the devices' own ids.
        let mut attackers: Vec<Vec<Attacker>> = (0..threads).map(|_| Vec::new()).collect();
        if args.mode == crate::Mode::Authflood {
            for i in 0..args.attackers {
                let Some((_, victim)) = devices.get(i % devices.len().max(1)) else {
                    break;
                };
                let victim = victim.id.clone();
                let addr = args.addrs[i % args.addrs.len()];
                attackers[i % threads].push(Attacker::new(i, args.attack_sources, victim, addr));
            }
        }
        let mut per_thread: Vec<Vec<Device>> = (0..threads).map(|_| Vec::new()).collect();
        for (k, (index, cred)) in devices.into_iter().enumerate() {
            let addr = args.addrs[index % args.addrs.len()];
            let start_at = match args.ramp {
                0 => t0,
                r => t0 + Duration::from_secs_f64(index as f64 / f64::from(r)),
            };
            per_thread[k % threads].push(Device {
                cred,
                index,
                addr,
                source: source_addr(index, sources, addr),
                start_at,
                tls: tls.as_ref().map(Tls::for_device),
            });
        }
        let shared = Arc::new(Shared {
            payload: json_payload(args.payload_bytes),
            rec: Recorder::default(),
            args,
        });
        let mut handles = Vec::with_capacity(threads);
        for (n, (devices, attackers)) in per_thread.into_iter().zip(attackers).enumerate() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (shared, rx) = (Arc::clone(&shared), phase.subscribe());
            let h = std::thread::Builder::new()
                .name(format!("bench-{n}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let mut set = tokio::task::JoinSet::new();
                        for d in devices {
                            set.spawn(d.run(Arc::clone(&shared), rx.clone()));
                        }
                        for a in attackers {
                            set.spawn(a.run(Arc::clone(&shared), rx.clone()));
                        }
                        while set.join_next().await.is_some() {}
                    })
                })?;
            handles.push(h);
        }
        Ok(Self {
            shared,
            phase,
            threads: handles,
        })
    }

    /// Tells every device what to do now.
    pub fn set_phase(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    /// Counters now, histograms since the last sample.
    pub fn sample(&self) -> Sample {
        self.shared.rec.sample()
    }

    /// Stops every device and waits for the threads.
    pub fn finish(self) -> Result<(), BenchError> {
        self.set_phase(Phase::Stop);
        for t in self.threads {
            t.join()
                .map_err(|_| BenchError::Worker("a device thread panicked".into()))?;
        }
        Ok(())
    }
}

/// The body of a worker process: reads its spec and commands from stdin,
/// answers on stdout.
pub fn worker_main() -> Result<(), BenchError> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let first = lines
        .next()
        .ok_or_else(|| BenchError::Worker("no spec on stdin".into()))??;
    let spec: Spec =
        serde_json::from_str(&first).map_err(|e| BenchError::Worker(format!("bad spec: {e}")))?;
    let engine = Engine::start(spec.args, spec.devices)?;
    let mut out = std::io::stdout().lock();
    for line in lines {
        match line?.trim() {
            "run" => engine.set_phase(Phase::Run),
            "storm" => engine.set_phase(Phase::Storm(Instant::now())),
            "sample" => {
                let s = serde_json::to_string(&engine.sample())
                    .map_err(|e| BenchError::Worker(e.to_string()))?;
                writeln!(out, "{s}")?;
                out.flush()?;
            }
            "stop" => break,
            other => return Err(BenchError::Worker(format!("unknown command {other:?}"))),
        }
    }
    engine.finish()?;
    writeln!(out, "done")?;
    out.flush()?;
    Ok(())
}

/// A worker process, seen from the coordinator.
pub struct ChildWorker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// `stop` was sent: the worker may have exited since.
    stopped: bool,
}

impl ChildWorker {
    /// Starts a worker process for `devices`.
    pub fn spawn(
        launcher: &Launcher,
        args: &BenchArgs,
        devices: Vec<(usize, Cred)>,
    ) -> Result<Self, BenchError> {
        let mut child = Command::new(&launcher.program)
            .args(&launcher.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                BenchError::Worker(format!("cannot start {}: {e}", launcher.program.display()))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(BenchError::Worker("worker pipes missing".into()));
        };
        let mut w = Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stopped: false,
        };
        let spec = serde_json::to_string(&Spec {
            args: args.clone(),
            devices,
        })
        .map_err(|e| BenchError::Worker(e.to_string()))?;
        w.send(&spec)?;
        Ok(w)
    }

    /// Sends one line; after `stop`, nothing more.
    pub fn send(&mut self, line: &str) -> Result<(), BenchError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = line == "stop";
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        Ok(())
    }

    fn read_line(&mut self) -> Result<String, BenchError> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(BenchError::Worker("a worker process exited early".into()));
        }
        Ok(line)
    }

    /// Asks for a sample and waits for it.
    pub fn sample(&mut self) -> Result<Sample, BenchError> {
        self.send("sample")?;
        let line = self.read_line()?;
        serde_json::from_str(&line).map_err(|e| BenchError::Worker(format!("bad sample: {e}")))
    }

    /// Stops the worker and waits for it to exit.
    pub fn finish(mut self) -> Result<(), BenchError> {
        self.send("stop")?;
        let line = self.read_line()?;
        let status = self.child.wait()?;
        if line.trim() != "done" || !status.success() {
            return Err(BenchError::Worker(format!(
                "a worker process ended with {status}"
            )));
        }
        Ok(())
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        // Only reached with the child still running on an error path.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
