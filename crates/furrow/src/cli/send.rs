//! `furrow send`: one device, a few readings, every step of the exchange
//! printed. The quickest way to see a reading go in, and a check that a
//! device's id and token work. It is a real SDK client: seqs continue after
//! WELCOME's `last_seq`, so running it again adds new readings.

use std::time::Duration;

use anyhow::bail;
use furrow_client::{Client, Config, Event};

/// `furrow send` options.
#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// The device id.
    pub device_id: String,
    /// The device's token (as `furrow device add` printed it).
    #[arg(long, env = "FURROW_DEVICE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Gateway device address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// How many readings to send.
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    /// The reading: a JSON value (the default makes one per reading).
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// Give up after this many seconds without every ACK.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// Connects, sends, waits for the ACKs, and prints each step.
pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if let Some(p) = &args.payload {
        furrow_proto::content::validate(1, p.as_bytes())
            .map_err(|e| anyhow::anyhow!("--payload is not JSON: {e}"))?;
    }
    let mut cfg = Config::new(args.addr.clone(), args.device_id.clone(), args.token);
    cfg.connect_timeout = Duration::from_secs(5);
    let client = Client::start(cfg)?;
    let mut events = client.events();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let wait = |e: &str| format!("no {e} from {} within {} s", args.addr, args.timeout);

    // WELCOME first, so that the seqs printed are the gateway's.
    let last_seq = loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => bail!(wait("WELCOME")),
            Ok(Err(_)) => bail!("the client stopped"),
            Ok(Ok(Event::Connected { last_seq })) => break last_seq,
            // A refusal that retrying cannot mend ends the run at once.
            Ok(Ok(Event::Disconnected { reason, retry_in })) => {
                use furrow_client::Disconnect;
                match &reason {
                    Disconnect::Error { code, message }
                        if *code != furrow_proto::ErrorCode::Busy as u16 =>
                    {
                        bail!("the gateway refused {}: {message}", args.device_id)
                    }
                    _ => println!(
                        "not connected ({reason:?}); trying again in {} ms",
                        retry_in.as_millis()
                    ),
                }
            }
            Ok(Ok(_)) => {}
        }
    };
    println!(
        "<- WELCOME: {} connected to {}; the gateway has stored up to seq {last_seq}",
        args.device_id, args.addr
    );
    let (mut first, mut last) = (0, 0);
    for i in 0..args.count {
        let body = match &args.payload {
            Some(p) => p.clone(),
            None => format!(r#"{{"n":{i},"temp_c":{:.1}}}"#, 21.5 + i as f64 / 10.0),
        };
        let seq = client.send(1, body.into_bytes()).await?;
        if first == 0 {
            first = seq;
        }
        last = seq;
    }
    println!("-> TELEMETRY seq {first}..{last} ({} readings)", args.count);
    let mut rejected = 0;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => bail!(wait("ACK")),
            Ok(Err(_)) => bail!("the client stopped"),
            Ok(Ok(Event::Acked(n))) => {
                println!("<- ACK {n}");
                if n >= last {
                    break;
                }
            }
            Ok(Ok(Event::Rejected { seq, reason, .. })) => {
                rejected += 1;
                println!("<- REJECT {seq}: {reason}");
            }
            Ok(Ok(Event::Disconnected { reason, .. })) => {
                println!("disconnected ({reason:?}); the SDK reconnects and resends")
            }
            Ok(Ok(Event::Connected { last_seq })) => {
                println!("<- WELCOME again: stored up to seq {last_seq}")
            }
            Ok(Ok(Event::TokenRotated { .. })) => {
                println!("<- COMMAND furrow.token: a new token, used from the next connection")
            }
            // `furrow send` speaks neither device state nor firmware.
            Ok(Ok(_)) => {}
        }
    }
    client.close().await;
    let stored = args.count - rejected;
    println!("{stored} readings stored and acknowledged (seq {first}..{last})");
    if rejected > 0 {
        bail!("{rejected} readings rejected")
    }
    Ok(())
}
