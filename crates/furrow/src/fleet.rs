//! Where simulated and benchmark devices come from: fresh devices
//! provisioned into a gateway's database (SQLite in its data directory, or
//! PostgreSQL by URL), or `device_id token` lines from a file (`furrow sim`
//! and `furrow bench` share this).

use std::path::Path;

use anyhow::{bail, Context};

/// Where to provision devices: the gateway's SQLite data directory or its
/// PostgreSQL database.
#[derive(Debug, Clone, Copy)]
pub enum Provision<'a> {
    /// SQLite in this data directory.
    DataDir(&'a Path),
    /// This PostgreSQL URL.
    Database(&'a str),
}

/// Reads `count` devices from `devices_file`, or provisions `PREFIX-0..`
/// into the gateway's database.
pub async fn load_devices(
    devices_file: Option<&Path>,
    provision: Option<Provision<'_>>,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    if let Some(path) = devices_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read devices file {}", path.display()))?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(token), None) => out.push((id.to_owned(), token.to_owned())),
                _ => bail!("{}:{}: expected `device_id token`", path.display(), n + 1),
            }
            if out.len() == count {
                break;
            }
        }
        if out.len() < count {
            bail!(
                "{} lists {} devices, fewer than --devices {}",
                path.display(),
                out.len(),
                count
            );
        }
        return Ok(out);
    }
    let cfg = match provision {
        Some(Provision::DataDir(dir)) => furrow::Config {
            data_dir: dir.to_path_buf(),
            ..furrow::Config::default()
        },
        Some(Provision::Database(url)) => furrow::Config {
            database_url: url.to_owned(),
            ..furrow::Config::default()
        },
        None => bail!(
            "say where the devices come from: --data-dir DIR or --database URL (provision), \
             or --devices-file FILE"
        ),
    };
    let store = furrow::server::connect_store(&cfg).await?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let token = furrow::devices::add_device(&*store, &id)
            .await
            .with_context(|| format!("provisioning {id} (choose a new --prefix)"))?;
        out.push((id, token));
    }
    Ok(out)
}
