//! Where simulated and benchmark devices come from: fresh devices
//! provisioned into a gateway's data directory, or `device_id token` lines
//! from a file (`furrow sim` and `furrow bench` share this).

use std::path::Path;

use anyhow::{bail, Context};

/// Reads `count` devices from `devices_file`, or provisions `PREFIX-0..`
/// into the database under `data_dir`.
pub async fn load_devices(
    devices_file: Option<&Path>,
    data_dir: Option<&Path>,
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
    let Some(dir) = data_dir else {
        bail!("say where the devices come from: --data-dir DIR (provision) or --devices-file FILE");
    };
    let cfg = furrow::Config {
        data_dir: dir.to_path_buf(),
        ..furrow::Config::default()
    };
    let store = furrow::server::open_store(&cfg)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let token = furrow::devices::add_device(&store, &id)
            .await
            .with_context(|| format!("provisioning {id} (choose a new --prefix)"))?;
        out.push((id, token));
    }
    Ok(out)
}
