//! `furrow sim`: a fleet simulator on the device SDK.
//!
//! Each simulated device is a real `furrow_client::Client`: it reconnects,
//! resends and deduplicates exactly as a field device would. Devices are
//! provisioned into the gateway's data directory (`--data-dir`, ids
//! `sim-0..` by default; a second run reuses them with new tokens) or read from a file of `device_id token` lines
//! (`--devices-file`). A live line shows devices connected, messages per
//! second sent and acknowledged, and reconnects; a summary follows at the
//! end. With `--firmware-key` each device also takes the firmware updates
//! the gateway offers and "installs" them (or fails, for a chosen share),
//! so a firmware job can be tried at fleet scale.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use furrow_client::{Client, Config, Disconnect, Event};

/// `furrow sim` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Gateway device address: HOST:PORT, or quic://HOST:PORT for the
    /// QUIC listener (with --tls-ca).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Readings per second per device.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Size of each JSON reading, in bytes.
    #[arg(long, default_value_t = 120)]
    pub payload_bytes: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Provision devices PREFIX0.. into this gateway data directory (a
    /// device that exists from an earlier run is reused with a new token).
    #[arg(long, conflicts_with = "devices_file")]
    pub data_dir: Option<PathBuf>,
    /// Read devices from this file: one `device_id token` per line.
    #[arg(long)]
    pub devices_file: Option<PathBuf>,
    /// Device id prefix for provisioned devices: PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Write the provisioned devices (`device_id token` lines) here, for
    /// another run with --devices-file.
    #[arg(long)]
    pub save_devices: Option<PathBuf>,
    /// Keep each device's outbox durable in DIR/<device_id>.outbox: kill the
    /// simulator and start it again, and every unacknowledged reading (and
    /// the seq counter) comes back.
    #[arg(long)]
    pub outbox_dir: Option<PathBuf>,
    /// Connect over TLS, trusting this PEM CA (the gateway's TLS listener,
    /// --addr HOST:7701; HOST must match its certificate).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Mutual TLS: each device presents DIR/devices/ID.pem and .key (the
    /// layout `furrow certs device` writes).
    #[arg(long, value_name = "DIR", requires = "tls_ca")]
    pub tls_certs: Option<PathBuf>,
    /// Speak device state: each device applies the desired state it is
    /// sent by reporting it back as its reported state.
    #[arg(long)]
    pub state: bool,
    /// Share of devices (0 to 1, chosen by a hash of the id, so the same
    /// ones in every run) that answer every command "failed" (the others
    /// answer "succeeded"): try a job's abort rule at scale.
    #[arg(long, default_value_t = 0.0)]
    pub fail_share: f64,
    /// Take firmware updates signed by this key: the fleet's Ed25519
    /// public key, 64 hex digits. Each device downloads what it is offered,
    /// checks it, and reports it installed (as the version the offer names).
    #[arg(long, value_name = "HEX")]
    pub firmware_key: Option<String>,
    /// The model the simulated devices are (offers for another are refused).
    #[arg(long, default_value = "sim", requires = "firmware_key")]
    pub firmware_model: String,
    /// The firmware version the simulated devices run at start.
    #[arg(long, default_value = "1.0.0", requires = "firmware_key")]
    pub firmware_version: String,
    /// Download firmware into DIR/<device_id>/ (kept: a later run with the
    /// same DIR resumes unfinished downloads). Default: a directory under
    /// the OS temp dir for this run, removed at its end.
    #[arg(long, value_name = "DIR", requires = "firmware_key")]
    pub firmware_dir: Option<PathBuf>,
    /// Share of devices (0 to 1, chosen by a hash of the id, as for
    /// --fail-share) whose installation fails: they report the update
    /// "failed" (try a firmware job's abort rule).
    #[arg(long, default_value_t = 0.0, requires = "firmware_key")]
    pub firmware_fail_share: f64,
}

/// How long a simulated device takes to "install" an image.
const INSTALL_PAUSE: Duration = Duration::from_millis(500);

/// Firmware settings shared by every simulated device.
#[derive(Debug, Clone)]
struct SimFirmware {
    key: [u8; 32],
    /// Each device downloads into `dir/<device_id>`.
    dir: PathBuf,
}

/// Parses `--firmware-key`: 32 bytes in hex.
fn parse_key(hex_key: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(hex_key.trim())
        .context("--firmware-key must be hex (the 32-byte Ed25519 public key)")?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| {
        anyhow::anyhow!("--firmware-key must be 32 bytes (64 hex digits), got {len} bytes")
    })
}

/// Descriptors the simulator needs besides one per device.
const FD_MARGIN: usize = 64;

/// The soft limit on open files, from /proc (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    rejected: AtomicU64,
    commands: AtomicU64,
    desired: AtomicU64,
    firmware_installed: AtomicU64,
    firmware_failed: AtomicU64,
    firmware_refused: AtomicU64,
    connected: AtomicUsize,
    reconnects: AtomicU64,
    errors: AtomicU64,
}

fn payload(bytes: usize, value: f64) -> Vec<u8> {
    let head = format!(r#"{{"v":{value:.3},"p":""#);
    let pad = bytes.saturating_sub(head.len() + 2);
    let mut s = head;
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s.into_bytes()
}

async fn device(
    args: Arc<SimArgs>,
    firmware: Option<SimFirmware>,
    id: String,
    token: String,
    counters: Arc<Counters>,
    stop_at: Instant,
) -> anyhow::Result<()> {
    let mut cfg = Config::new(args.addr.clone(), id.clone(), token);
    if let Some(fw) = &firmware {
        // One directory per device: a sink keeps one download per directory.
        cfg.firmware = Some(furrow_client::FirmwareConfig::new(
            fw.key,
            args.firmware_model.clone(),
            args.firmware_version.clone(),
            fw.dir.join(&id),
        ));
    }
    if let Some(dir) = &args.outbox_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create outbox directory {}", dir.display()))?;
        cfg.outbox_path = Some(dir.join(format!("{id}.outbox")));
    }
    if let Some(ca) = &args.tls_ca {
        let mut tls = furrow_client::TlsOptions::new(ca);
        if let Some(dir) = &args.tls_certs {
            let d = dir.join("devices");
            tls = tls.with_client_cert(d.join(format!("{id}.pem")), d.join(format!("{id}.key")));
        }
        cfg.tls = Some(tls);
    }
    // Commands: succeed, or fail for the failing share.
    let failing = furrow::jobs::in_share(&id, args.fail_share);
    let cmds = Arc::clone(&counters);
    let handler = furrow_client::handler(move |_cmd| {
        let cmds = Arc::clone(&cmds);
        async move {
            cmds.commands.fetch_add(1, Ordering::Relaxed);
            if failing {
                furrow_client::CommandReply::failed("simulated failure")
            } else {
                furrow_client::CommandReply::ok(1, "{}")
            }
        }
    });
    // Desired state: echoed as reported by a task of the device.
    let (desired_tx, mut desired_rx) = tokio::sync::mpsc::unbounded_channel();
    let desired: Option<furrow_client::DesiredHandler> = args.state.then(|| {
        let h: furrow_client::DesiredHandler = Arc::new(move |d: furrow_client::Desired| {
            let _ = desired_tx.send(d);
        });
        h
    });
    let client = Arc::new(Client::start_with_handlers(cfg, Some(handler), desired)?);
    let echo = {
        let (client, c) = (Arc::clone(&client), Arc::clone(&counters));
        tokio::spawn(async move {
            while let Some(d) = desired_rx.recv().await {
                c.desired.fetch_add(1, Ordering::Relaxed);
                match client.report(d.document).await {
                    Ok(_) => {
                        c.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "state report failed"),
                }
            }
        })
    };
    // Firmware: a verified image is "installed" (or fails, for the failing
    // share) by a task of the device, as the application would.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let install = {
        let (client, c) = (Arc::clone(&client), Arc::clone(&counters));
        let failing = furrow::jobs::in_share(&id, args.firmware_fail_share);
        tokio::spawn(async move {
            while let Some(version) = ready_rx.recv().await {
                if failing {
                    match client.firmware_failed("install failed (simulated)").await {
                        Ok(()) => {
                            c.firmware_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "firmware report failed"),
                    }
                    continue;
                }
                if let Err(e) = client.firmware_installing().await {
                    tracing::warn!(error = %e, "firmware report failed");
                    continue;
                }
                tokio::time::sleep(INSTALL_PAUSE).await;
                match client.firmware_installed(&version).await {
                    Ok(()) => {
                        c.firmware_installed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "firmware report failed"),
                }
            }
        })
    };
    let mut events = client.events();
    let c = Arc::clone(&counters);
    let watcher = tokio::spawn(async move {
        let mut up = false;
        let mut last_acked = 0;
        loop {
            match events.recv().await {
                Ok(Event::Connected { last_seq }) => {
                    // Count ACKs from what the gateway already had.
                    last_acked = last_acked.max(last_seq);
                    if !up {
                        c.connected.fetch_add(1, Ordering::Relaxed);
                        up = true;
                    }
                }
                Ok(Event::Disconnected { reason, .. }) => {
                    if up {
                        c.connected.fetch_sub(1, Ordering::Relaxed);
                        up = false;
                        if reason != Disconnect::Closed {
                            c.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Event::Acked(n)) => {
                    if n > last_acked {
                        c.acked.fetch_add(n - last_acked, Ordering::Relaxed);
                        last_acked = n;
                    }
                }
                Ok(Event::Rejected { .. }) => {
                    c.rejected.fetch_add(1, Ordering::Relaxed);
                }
                // The client switches tokens by itself; a simulated
                // device keeps nothing to persist.
                Ok(Event::TokenRotated { .. } | Event::Desired { .. }) => {}
                Ok(Event::FirmwareReady { version, .. }) => {
                    let _ = ready_tx.send(version);
                }
                // The SDK logs why.
                Ok(Event::FirmwareRefused { .. }) => {
                    c.firmware_refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        if up {
            c.connected.fetch_sub(1, Ordering::Relaxed);
        }
    });
    // Spread the fleet's first readings over one period; a device sends at
    // start + offset + k x period while that is before `stop_at`, so a run of
    // D seconds at R per second sends D x R readings per device.
    let period = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let stop = tokio::time::Instant::from_std(stop_at);
    let start = stop - Duration::from_secs(args.duration);
    let first = start + period.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(first, period);
    // A late tick keeps the grid: the readings it missed go at once, as a
    // device sends what it queued, and every tick before the stop still
    // counts. (`Delay` moved the grid: on a busy machine the last reading
    // could slide past the stop and a run sent one reading too few.)
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut value = 20.0;
    loop {
        tokio::select! {
            // A tick scheduled before the stop counts even when it is late.
            biased;
            at = tick.tick() => if at >= stop { break },
            _ = tokio::time::sleep_until(stop) => break,
        }
        value += 0.01;
        match client.send(1, payload(args.payload_bytes, value)).await {
            Ok(_) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "send failed");
                break;
            }
        }
    }
    // Up to 10 s for the last ACKs, then close.
    let _ = tokio::time::timeout(Duration::from_secs(10), client.flush()).await;
    client.close().await;
    echo.abort();
    install.abort();
    drop(client);
    let _ = watcher.await;
    Ok(())
}

/// Runs the simulation and prints the summary.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of readings per second");
    }
    if !(0.0..=1.0).contains(&args.fail_share) {
        bail!("--fail-share must be between 0 and 1");
    }
    if !(0.0..=1.0).contains(&args.firmware_fail_share) {
        bail!("--firmware-fail-share must be between 0 and 1");
    }
    // The default download directory belongs to this run and goes with it.
    let (firmware, temp_firmware_dir) = match &args.firmware_key {
        None => (None, None),
        Some(k) => {
            let key = parse_key(k)?;
            let (dir, temp) = match &args.firmware_dir {
                Some(d) => (d.clone(), None),
                None => {
                    let d = std::env::temp_dir()
                        .join(format!("furrow-sim-firmware-{}", std::process::id()));
                    (d.clone(), Some(d))
                }
            };
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create firmware directory {}", dir.display()))?;
            (Some(SimFirmware { key, dir }), temp)
        }
    };
    if let Some(limit) = open_files_limit() {
        if args.devices + FD_MARGIN > limit {
            bail!(
                "{} devices need about {} open files, but this process may open at most {} \
                 (ulimit -n). Run several simulator processes, each with at most {} devices \
                 (distinct --prefix, or split --devices-file).",
                args.devices,
                args.devices + FD_MARGIN,
                limit,
                limit.saturating_sub(FD_MARGIN)
            );
        }
    }
    let devices = crate::cli::fleet::load_devices(
        args.devices_file.as_deref(),
        args.data_dir
            .as_deref()
            .map(crate::cli::fleet::Provision::DataDir),
        &args.prefix,
        args.devices,
    )
    .await?;
    if let Some(path) = &args.save_devices {
        let text: String = devices.iter().map(|(i, t)| format!("{i} {t}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let args = Arc::new(args);
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(args.duration);
    let mut tasks = Vec::with_capacity(devices.len());
    for (id, token) in devices {
        tasks.push(tokio::spawn(device(
            Arc::clone(&args),
            firmware.clone(),
            id,
            token,
            Arc::clone(&counters),
            stop_at,
        )));
    }

    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let (mut last_sent, mut last_acked, mut last_t) = (0, 0, Instant::now());
    let all_done = async {
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                tracing::warn!(error = %e, "device failed");
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    tokio::pin!(all_done);
    loop {
        tokio::select! {
            _ = &mut all_done => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                let (s, a) = (counters.sent.load(Ordering::Relaxed), counters.acked.load(Ordering::Relaxed));
                let dt = last_t.elapsed().as_secs_f64().max(1e-3);
                bar.set_message(format!(
                    "devices connected {}/{}  sent {:.0}/s  acked {:.0}/s  reconnects {}",
                    counters.connected.load(Ordering::Relaxed),
                    args.devices,
                    (s - last_sent) as f64 / dt,
                    (a - last_acked) as f64 / dt,
                    counters.reconnects.load(Ordering::Relaxed),
                ));
                bar.tick();
                (last_sent, last_acked, last_t) = (s, a, Instant::now());
            }
        }
    }
    bar.finish_and_clear();
    // Rates are over the sending time; the last ACKs' wait is shown apart.
    let total = started.elapsed().as_secs_f64();
    let secs = total.min(args.duration as f64).max(1e-3);
    let sent = counters.sent.load(Ordering::Relaxed);
    let acked = counters.acked.load(Ordering::Relaxed);
    println!(
        "sim: {} devices for {:.1} s (then {:.1} s for the last ACKs): sent {} ({:.0}/s), \
         acked {} ({:.0}/s), rejected {}, unacknowledged {}, reconnects {}, errors {}, \
         commands answered {}, desired states applied {}",
        args.devices,
        secs,
        (total - secs).max(0.0),
        sent,
        sent as f64 / secs,
        acked,
        acked as f64 / secs,
        counters.rejected.load(Ordering::Relaxed),
        sent.saturating_sub(acked + counters.rejected.load(Ordering::Relaxed)),
        counters.reconnects.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed),
        counters.commands.load(Ordering::Relaxed),
        counters.desired.load(Ordering::Relaxed),
    );
    if firmware.is_some() {
        println!(
            "sim: firmware installed {}, failed (simulated) {}, refused {}",
            counters.firmware_installed.load(Ordering::Relaxed),
            counters.firmware_failed.load(Ordering::Relaxed),
            counters.firmware_refused.load(Ordering::Relaxed),
        );
    }
    if let Some(dir) = temp_firmware_dir {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the firmware directory");
        }
    }
    Ok(())
}
