//! The files under `deploy/` stay true to the code: the Grafana dashboard
//! parses and uses only metrics the gateway describes.

use std::collections::BTreeSet;

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
