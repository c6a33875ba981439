//! `furrow bench`: the load generator (the `furrow-bench` crate) with the
//! gateway's provisioning in front of it. furrow/1 devices are provisioned
//! fresh into the gateway's data directory (`--data-dir`) or PostgreSQL
//! database (`--database`), or read from a file (`--devices-file`); MQTT devices need no provisioning (client ids
//! PREFIXN, no password) unless a file gives them.

use std::path::PathBuf;

use anyhow::Context;
use furrow_bench::{BenchArgs, Cred, Launcher, Protocol};

/// `furrow bench` options.
#[derive(clap::Args, Debug)]
pub struct BenchCmd {
    #[command(flatten)]
    bench: BenchArgs,
    /// Provision devices PREFIX0.. into this gateway data directory.
    #[arg(long, conflicts_with = "devices_file")]
    data_dir: Option<PathBuf>,
    /// Provision devices PREFIX0.. into this PostgreSQL database
    /// (the gateway's `--database`).
    #[arg(long, value_name = "URL", conflicts_with_all = ["devices_file", "data_dir"])]
    database: Option<String>,
    /// Read devices from this file: one `device_id token` per line.
    #[arg(long)]
    devices_file: Option<PathBuf>,
    /// Device id prefix for provisioned devices: PREFIX0, PREFIX1, ... (a
    /// device that exists from an earlier run is reused with a new token).
    #[arg(long, default_value = "bench-")]
    prefix: String,
}

/// Runs the benchmark and prints its summary.
pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    let BenchCmd {
        bench,
        data_dir,
        database,
        devices_file,
        prefix,
    } = cmd;
    bench.validate()?;
    let creds: Vec<Cred> = if bench.protocol == Protocol::Mqtt && devices_file.is_none() {
        (0..bench.devices)
            .map(|i| Cred {
                id: format!("{prefix}{i}"),
                token: String::new(),
            })
            .collect()
    } else {
        crate::cli::fleet::load_devices(
            devices_file.as_deref(),
            match (&database, &data_dir) {
                (Some(url), _) => Some(crate::cli::fleet::Provision::Database(url)),
                (None, Some(dir)) => Some(crate::cli::fleet::Provision::DataDir(dir)),
                (None, None) => None,
            },
            &prefix,
            bench.devices,
        )
        .await?
        .into_iter()
        .map(|(id, token)| Cred { id, token })
        .collect()
    };
    let launcher = Launcher {
        program: std::env::current_exe().context("cannot find the furrow executable")?,
        args: vec!["bench-worker".into()],
    };
    let (json, chart) = (bench.json.clone(), bench.chart.clone());
    let report =
        tokio::task::spawn_blocking(move || furrow_bench::run(bench, creds, Some(&launcher)))
            .await??;
    print!("{}", report.summary());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = chart {
        furrow_bench::chart::write_svg(&report, &path)?;
    }
    Ok(())
}
