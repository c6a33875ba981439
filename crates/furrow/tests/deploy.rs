//! The files under `deploy/` stay true to the code: the Grafana dashboard
//! parses and uses only metrics the gateway describes; HAProxy accepts its
//! configuration (`haproxy -c`); systemd accepts the unit
//! (`systemd-analyze verify`); the compose gateways' settings load.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const DASHBOARD: &str = include_str!("../../../deploy/grafana/furrow.json");
const METRICS_RS: &str = include_str!("../src/metrics.rs");

/// `furrow_*` names in `text`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("furrow_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_parses_and_uses_only_described_metrics() {
    let dash: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut used = BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            used.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    // Described metrics: the first argument of each describe_*! call.
    let described: BTreeSet<String> = METRICS_RS
        .split("describe_")
        .skip(1)
        .filter_map(|chunk| chunk.split('"').nth(1).map(str::to_owned))
        .filter(|n| n.starts_with("furrow_"))
        .collect();
    let unknown: Vec<_> = used.difference(&described).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses undescribed metrics: {unknown:?}"
    );
    assert!(used.len() >= 15, "{used:?}");
}

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a checker that must be installed (scripts/test.sh installs it):
/// a missing one fails the test, loudly, rather than skipping it.
fn run_checker(program: &str, package: &str, args: &[&str]) -> std::process::Output {
    let found = Command::new(program).args(args).output();
    // Debian installs haproxy in /usr/sbin, which a non-root PATH may lack.
    let found = match found {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Command::new(Path::new("/usr/sbin").join(program))
                .args(args)
                .output()
        }
        other => other,
    };
    found.unwrap_or_else(|e| {
        panic!("cannot run {program} ({e}): install it (apt-get install {package}), as scripts/test.sh does")
    })
}

#[test]
fn haproxy_accepts_its_configuration() {
    let cfg = root().join("deploy/haproxy/haproxy.cfg");
    let text = std::fs::read_to_string(&cfg).unwrap();
    // What the gateways rely on.
    for needle in [
        "mode tcp",
        "balance leastconn",
        "send-proxy-v2",
        "check port 7780",
        "uri /readyz",
    ] {
        assert!(text.contains(needle), "haproxy.cfg lacks {needle:?}");
    }
    // -dW: warnings are errors.
    let out = run_checker(
        "haproxy",
        "haproxy",
        &["-dW", "-c", "-f", cfg.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "haproxy -c refused deploy/haproxy/haproxy.cfg:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_accepts_the_unit() {
    // verify checks that ExecStart's program exists: point it at the
    // binary under test, in a copy.
    let unit = std::fs::read_to_string(root().join("deploy/systemd/furrow.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/furrow serve"));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("furrow.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/furrow", env!("CARGO_BIN_EXE_furrow")),
    )
    .unwrap();
    let out = run_checker(
        "systemd-analyze",
        "systemd",
        &["verify", copy.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values, with a warning.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    // The stop timeout leaves the drain its time (10 s + 5 s + 5 s).
    let default = furrow::Config::default().shutdown.drain_timeout_ms / 1000;
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec=Ns");
    assert!(stop > default + 10, "TimeoutStopSec={stop}s");
}

#[test]
fn the_compose_gateways_settings_load() {
    use figment::providers::{Format, Serialized, Toml};
    let path = root().join("deploy/compose/furrow.toml");
    let mut cfg: furrow::Config =
        figment::Figment::from(Serialized::defaults(furrow::Config::default()))
            .merge(Toml::file_exact(&path))
            .extract()
            .expect("deploy/compose/furrow.toml loads");
    // The compose file gives the token through the environment.
    cfg.api.token = "a-token-from-the-environment".into();
    cfg.validate().expect("and validates");
    assert!(cfg.proxy_protocol.enabled);
    let haproxy: std::net::IpAddr = "172.28.0.10".parse().unwrap();
    assert!(furrow::ingress::proxy::is_trusted(
        haproxy,
        &cfg.proxy_protocol.trusted
    ));
    let compose =
        std::fs::read_to_string(root().join("deploy/compose/docker-compose.yml")).unwrap();
    assert!(compose.contains("ipv4_address: 172.28.0.10"));
}
