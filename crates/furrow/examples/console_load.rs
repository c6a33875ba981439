//! What the operator's console costs: its time to first view (a full page
//! load until the overview's numbers, or the device list's first page, are
//! drawn: the `furrow:view` performance mark app.js sets) and the gateway's
//! CPU while N consoles sit on the overview (each refreshes every 5 s),
//! beside the same span with none, in a real headless Chromium.
//!
//! `bench/console.sh` runs it against a release gateway holding 10,000
//! devices:
//!
//! ```sh
//! cargo run --release -p furrow --example console_load -- \
//!     --api http://127.0.0.1:7780 --pid $(pidof furrow) --consoles 10 --seconds 60
//! ```

#[allow(dead_code)]
#[path = "../tests/support/browser.rs"]
mod browser;

/// What `browser.rs` takes from the tests' support module.
mod support {
    /// A free loopback port below Linux's ephemeral range (32768 and up),
    /// which the idle fleet's 10,000 connections crowd.
    pub fn free_port() -> u16 {
        (20_000..32_000)
            .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .expect("a free loopback port in 20000..32000")
    }
}

use std::time::Duration;

use anyhow::{bail, Context};
use browser::Browser;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// The gateway's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:7780")]
    api: String,
    /// The gateway's process id (its CPU is read from /proc).
    #[arg(long)]
    pid: u32,
    /// API token to sign in with (empty: an open loopback API).
    #[arg(long, default_value = "")]
    token: String,
    /// Consoles open on the overview while CPU is measured.
    #[arg(long, default_value_t = 10)]
    consoles: usize,
    /// Seconds of each CPU span (without consoles, then with them).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Page loads timed per page (at least 1).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..))]
    loads: u16,
    /// Also write screenshots of the overview and of device `--device`
    /// (the README's) into this directory.
    #[arg(long)]
    screenshots: Option<std::path::PathBuf>,
    /// The device whose page `--screenshots` shows.
    #[arg(long, default_value = "sim-0")]
    device: String,
}

/// Timers of background windows run at full speed: every console refreshes
/// as if it were in front.
const SWITCHES: &[&str] = &[
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ui = format!("{}/ui/", args.api.trim_end_matches('/'));
    let b = Browser::start_with("console-load", 1280, 900, SWITCHES).await;
    b.goto(&ui).await;
    b.type_into("signin-token", &args.token).await;
    b.click("signin-submit").await;
    b.wait_testid("overview-online").await;
    let total = b.text("overview-total").await.unwrap_or_default();
    println!("console at {ui}, fleet of {total} devices");

    // ---- time to first view: full page loads (the token stays in the tab) ----
    println!(
        "\npage          first load   median of the next {}   (ms from navigation to data drawn)",
        args.loads - 1
    );
    for (page, hash) in [("overview", "#/"), ("device list", "#/devices")] {
        let mut times = Vec::new();
        for _ in 0..args.loads {
            b.goto("about:blank").await;
            b.goto(&format!("{ui}{hash}")).await;
            wait_view(&b).await;
            let t = b
                .js(
                    "return performance.getEntriesByName('furrow:view')[0].startTime;",
                    vec![],
                )
                .await;
            times.push(t.as_f64().context("a mark time")?);
        }
        let first = times[0];
        let mut rest = times[1..].to_vec();
        rest.sort_by(f64::total_cmp);
        let median = rest.get(rest.len() / 2).copied().unwrap_or(first);
        println!("{page:<13} {first:>10.0}   {median:>10.0}");
    }

    if let Some(dir) = &args.screenshots {
        std::fs::create_dir_all(dir)?;
        b.goto(&format!("{ui}#/")).await;
        wait_view(&b).await;
        b.js(
            "document.getElementById('announce-close').click(); return true;",
            vec![],
        )
        .await;
        b.screenshot_to(&dir.join("console-overview.png")).await;
        // Tall enough for the status, tags and the chart.
        b.client.set_window_size(1280, 1100).await?;
        b.goto(&format!("{ui}#/devices/{}", args.device)).await;
        b.wait_testid("telemetry-chart").await;
        b.screenshot_to(&dir.join("console-device.png")).await;
        b.client.set_window_size(1280, 900).await?;
    }

    // ---- gateway CPU: no console, then N on the overview ----
    b.goto("about:blank").await;
    let span = Duration::from_secs(args.seconds);
    let idle = cpu_share(args.pid, span).await?;
    let mut windows = Vec::new();
    for i in 0..args.consoles {
        if i > 0 {
            let w = b.client.new_window(false).await?;
            b.client.switch_to_window(w.handle.clone()).await?;
        }
        windows.push(b.client.window().await?);
        if i > 0 {
            // The token lives in each tab's sessionStorage: sign in again.
            b.goto(&ui).await;
            b.type_into("signin-token", &args.token).await;
            b.click("signin-submit").await;
        } else {
            b.goto(&ui).await;
        }
        b.wait_testid("overview-online").await;
    }
    let busy = cpu_share(args.pid, span).await?;
    // Every console kept refreshing: its "updated" time moved lately.
    let mut stale = 0;
    for w in windows {
        b.client.switch_to_window(w).await?;
        let age = b
            .js(
                "const m = document.querySelector('main p.muted')?.textContent.match(/updated (\\d+):(\\d+):(\\d+)/);
                 if (!m) return null;
                 const d = new Date(); d.setHours(+m[1], +m[2], +m[3]);
                 return (Date.now() - d.getTime()) / 1000;",
                vec![],
            )
            .await;
        if !matches!(age, Value::Number(ref n) if n.as_f64().is_some_and(|s| s.abs() < 12.0)) {
            stale += 1;
        }
    }
    println!(
        "\ngateway CPU over {} s: {:.2} % of a core without a console, {:.2} % with {} on the overview (+{:.2} points)",
        args.seconds,
        idle * 100.0,
        busy * 100.0,
        args.consoles,
        (busy - idle) * 100.0
    );
    if stale > 0 {
        bail!("{stale} of {} consoles stopped refreshing", args.consoles);
    }
    println!(
        "{}",
        json!({ "cpu_idle": idle, "cpu_consoles": busy, "consoles": args.consoles })
    );
    b.close().await;
    Ok(())
}

/// Waits for the page's `furrow:view` mark: its first data drawn.
async fn wait_view(b: &Browser) {
    b.wait_js(
        "the first view drawn",
        "return performance.getEntriesByName('furrow:view').length > 0;",
        vec![],
    )
    .await;
}

/// The share of one core `pid` used over `span` (utime + stime from
/// /proc/PID/stat, in clock ticks of 1/100 s).
async fn cpu_share(pid: u32, span: Duration) -> anyhow::Result<f64> {
    let ticks = || -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("no process {pid}"))?;
        // Fields after the command's closing parenthesis: state is field 3,
        // utime 14 and stime 15 (1-based), so 11 and 12 after it.
        let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Ok(f.get(11).context("utime")?.parse::<u64>()?
            + f.get(12).context("stime")?.parse::<u64>()?)
    };
    let t0 = ticks()?;
    let start = std::time::Instant::now();
    tokio::time::sleep(span).await;
    let t1 = ticks()?;
    Ok((t1 - t0) as f64 / 100.0 / start.elapsed().as_secs_f64())
}
