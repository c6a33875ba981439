//! A temperature sensor on the Furrow SDK: sends a JSON reading every
//! second, answers a `set_interval` command, and survives restarts without
//! losing or repeating a reading (durable outbox).
//!
//! ```sh
//! furrow serve &
//! TOKEN=$(furrow device add sensor-1)
//! cargo run -p furrow-client --example sensor -- 127.0.0.1:7700 sensor-1 "$TOKEN" ./sensor-1.outbox
//! ```
//!
//! Kill it at any time (Ctrl-C, kill -9) and start it again: the seq counter
//! and every unacknowledged reading come back from the outbox file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use furrow_client::{handler, Client, CommandReply, Config, Event};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, id, token, outbox] = args.as_slice() else {
        return Err("usage: sensor ADDR DEVICE_ID TOKEN OUTBOX_FILE".into());
    };
    let mut cfg = Config::new(addr.as_str(), id.as_str(), token.as_str());
    cfg.outbox_path = Some(outbox.into());

    // Commands: `set_interval` with a JSON number of milliseconds.
    let interval_ms = Arc::new(AtomicU64::new(1000));
    let interval = Arc::clone(&interval_ms);
    let on_command = handler(move |cmd| {
        let interval = Arc::clone(&interval);
        async move {
            match cmd.name.as_str() {
                "set_interval" => match std::str::from_utf8(&cmd.payload)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    Some(ms) if ms >= 10 => {
                        interval.store(ms, Ordering::Relaxed);
                        CommandReply::ok(3, format!("interval now {ms} ms"))
                    }
                    _ => CommandReply::failed("expected a number of milliseconds >= 10"),
                },
                _ => CommandReply::unknown(),
            }
        }
    });
    let client = Client::start_with_handler(cfg, on_command)?;

    let mut events = client.events();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            match e {
                Event::Acked(_) => {}
                other => eprintln!("event: {other:?}"),
            }
        }
    });

    let mut temp = 20.0f64;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(interval_ms.load(Ordering::Relaxed))) => {}
        }
        temp += (rand_step() - 0.5) * 0.2;
        let seq = client
            .send(1, format!(r#"{{"temp_c":{temp:.2}}}"#).into_bytes())
            .await?;
        println!(
            "queued reading {seq}; acked up to {}",
            *client.acked().borrow()
        );
    }
    // Give the gateway what is pending, then say GOODBYE.
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
    client.close().await;
    Ok(())
}

/// A cheap pseudo-random step in [0, 1) from the clock (no extra crate).
fn rand_step() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(n % 1000) / 1000.0
}
