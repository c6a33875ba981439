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

/// Reads `count` devices from `devices_file`, or provisions `PREFIX0..`
/// (`sim-0`, `sim-1`, ...) into the gateway's database, reusing those that
/// exist already with a new token.
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
    let mut reused = 0;
    for i in 0..count {
        let id = format!("{prefix}{i}");
        let token = match furrow::devices::add_device(&*store, &id).await {
            Ok(token) => token,
            // This tool's own device from an earlier run: take it over with
            // a new token, so that a second run just works. Its history and
            // `last_seq` stay; the SDK continues after them.
            Err(furrow::devices::ProvisionError::Store(
                furrow::store::StoreError::DeviceExists(_),
            )) => {
                let revoked = store.device(&id).await?.and_then(|d| d.revoked_ms);
                if revoked.is_some() {
                    bail!("{id} exists and is revoked: choose another --prefix");
                }
                reused += 1;
                // No grace: the load generator's devices start afresh.
                furrow::devices::rotate_token(&*store, &id, std::time::Duration::ZERO)
                    .await
                    .with_context(|| format!("reusing {id} (choose another --prefix)"))?
                    .token
            }
            Err(e) => return Err(e).with_context(|| format!("provisioning {id}")),
        };
        out.push((id, token));
    }
    if reused > 0 {
        eprintln!(
            "reusing {reused} of the {count} devices {prefix}0.. from an earlier run (new tokens; \
             their stored readings stay)"
        );
    }
    Ok(out)
}
