//! Device state and jobs, measured end to end on loopback: how long a
//! desired-state change takes from the API call to the device's callback,
//! for N online SDK devices; and a desired-state job's achieved rollout
//! rate against the requested one.
//!
//! `cargo run --release -p furrow --example state_latency -- [DEVICES] [ROUNDS] [RATE_PER_MIN]`
//! (defaults 1000, 5, 3000)
//!
//! One process holds the gateway (SQLite, synchronous=FULL, in a temporary
//! directory) and the devices, so both share its CPU: the figures are an
//! upper bound of what a gateway alone does. Each round changes every
//! device's desired state once (64 API calls in flight) and times each
//! change from the start of its PATCH to its device's desired-state
//! callback. Then a job patches every device's desired state at the rate
//! asked, and the time between its first and last device's start gives the
//! achieved rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use furrow_client::{Client, Config as ClientConfig, Desired, DesiredHandler};
use serde_json::{json, Value};

type Seen = Arc<Mutex<HashMap<(usize, u64), Instant>>>;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().map_or(Ok(1000), |a| a.parse())?;
    let rounds: u64 = args.get(1).map_or(Ok(5), |a| a.parse())?;
    let rate: u32 = args.get(2).map_or(Ok(3000), |a| a.parse())?;

    let dir = tempfile::tempdir()?;
    let mut cfg = furrow::Config {
        listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    cfg.api.listen = "127.0.0.1:0".parse()?;
    cfg.data_dir = dir.path().to_path_buf();
    cfg.limits.connect_rate_per_ip = 0;
    cfg.limits.max_connections = n + 100;
    cfg.validate()?;
    let server = furrow::Server::bind(cfg).await?;
    let (addr, api) = (
        server.local_addr(),
        server.api_addr().expect("the API is on"),
    );
    let store = server.store();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    let seen: Seen = Arc::default();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("lat-{i:05}");
        let token = furrow::devices::add_device(&*store, &id).await?;
        store
            .set_tags(&id, [("bench".to_owned(), Some("state".to_owned()))].into())
            .await?;
        let s = Arc::clone(&seen);
        let h: DesiredHandler = Arc::new(move |d: Desired| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((i, d.version), Instant::now());
        });
        clients.push(Client::start_with_handlers(
            ClientConfig::new(addr.to_string(), id, token),
            None,
            Some(h),
        )?);
    }
    let http = reqwest::Client::new();
    // Every device connected (it has had a WELCOME), within a minute.
    let started = Instant::now();
    loop {
        let up = clients
            .iter()
            .filter(|c| c.server_time_ms().is_some())
            .count();
        if up == n || started.elapsed() > Duration::from_secs(60) {
            println!("{up} of {n} devices connected in {:?}", started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut lat = Vec::with_capacity(n * rounds as usize);
    for round in 1..=rounds {
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (http, sem) = (http.clone(), Arc::clone(&sem));
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                let at = Instant::now();
                let r = http
                    .patch(format!("http://{api}/v1/devices/lat-{i:05}/state/desired"))
                    .header("content-type", "application/merge-patch+json")
                    .body(json!({ "round": round }).to_string())
                    .send()
                    .await;
                (i, at, r.map(|r| r.status().is_success()).unwrap_or(false))
            }));
        }
        let mut sent = Vec::with_capacity(n);
        for t in tasks {
            sent.push(t.await?);
        }
        // Wait (bounded) for every callback of this round.
        let wait = Instant::now();
        loop {
            let got = {
                let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                sent.iter()
                    .filter(|(i, _, _)| s.contains_key(&(*i, round)))
                    .count()
            };
            if got == n || wait.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut missing = 0;
        for (i, at, ok) in &sent {
            match s.get(&(*i, round)) {
                Some(t) if *ok => lat.push(t.saturating_duration_since(*at)),
                _ => missing += 1,
            }
        }
        println!(
            "round {round}: {} changes delivered, {missing} missing",
            n - missing
        );
    }
    lat.sort();
    println!(
        "desired change -> device callback, {} devices x {rounds} rounds: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        n,
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    // A job over all of them at the rate asked.
    let job: Value = http
        .post(format!("http://{api}/v1/jobs"))
        .json(&json!({
            "target": {"tags": {"bench": "state"}},
            "operation": {"desired": {"job": true}},
            "rate_per_minute": rate
        }))
        .send()
        .await?
        .json()
        .await?;
    let id = job["job_id"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let v: Value = http
            .get(format!("http://{api}/v1/jobs/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if v["started"].as_u64() == Some(n as u64) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut starts = Vec::with_capacity(n);
    let mut after: Option<String> = None;
    loop {
        let url = match &after {
            None => format!("http://{api}/v1/jobs/{id}/devices?limit=1000"),
            Some(a) => format!("http://{api}/v1/jobs/{id}/devices?limit=1000&after={a}"),
        };
        let v: Value = http.get(url).send().await?.json().await?;
        for d in v["devices"].as_array().into_iter().flatten() {
            starts.extend(d["started_ms"].as_u64());
        }
        match v["next"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
    }
    starts.sort_unstable();
    if let (Some(first), Some(last)) = (starts.first(), starts.last()) {
        let span = (last - first).max(1) as f64;
        let achieved = (starts.len() as f64 - 1.0) * 60_000.0 / span;
        println!(
            "job rollout: {} devices started over {:.1} s: {achieved:.0} a minute against {rate} asked ({:.3}x)",
            starts.len(),
            span / 1000.0,
            achieved / f64::from(rate.max(1))
        );
    }
    for c in &clients {
        c.close().await;
    }
    let _ = stop_tx.send(());
    let _ = gateway.await;
    Ok(())
}
