//! A minimal furrow/1 device: connects, authenticates, sends N JSON readings
//! pipelined, and waits until the gateway has acknowledged them all.
//!
//! ```sh
//! cargo run --release -p furrow --example device -- 127.0.0.1:7700 pump-17 TOKEN 10
//! ```
//!
//! Seqs continue after WELCOME's `last_seq`, so running it again adds new
//! readings. The device SDK (`furrow-client`) does this properly, with
//! reconnects and a durable outbox; this shows the wire exchange bare.

use anyhow::{bail, Context};
use bytes::BytesMut;
use furrow_proto::message::encode_telemetry;
use furrow_proto::{FrameDecoder, Hello, Message, Str};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, id, token, count] = args.as_slice() else {
        bail!("usage: device ADDR DEVICE_ID TOKEN COUNT");
    };
    let count: u64 = count.parse().context("COUNT must be a number")?;
    let mut stream = TcpStream::connect(addr.as_str()).await?;
    let hello = Message::Hello(Hello {
        version: 1,
        keepalive_s: 30,
        device_id: Str::from(id.as_str()),
        token: Str::from(token.as_str()),
        capabilities: None,
    });
    stream.write_all(&hello.to_bytes()?).await?;

    let decoder = FrameDecoder::default();
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut target = None;
    loop {
        while let Some(frame) = decoder.decode(&mut rbuf)? {
            let msg = Message::from_frame(frame)?;
            println!("<- {msg:?}");
            match msg {
                Message::Welcome(w) => {
                    // Pipeline the readings, at most max_inflight at a time
                    // would be the rule for large counts; 10 fit easily.
                    let mut out = BytesMut::new();
                    let first = w.last_seq + 1;
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)?
                        .as_millis() as u64;
                    for seq in first..first + count.min(u64::from(w.max_inflight)) {
                        let payload = format!(r#"{{"seq":{seq},"temp_c":21.5}}"#);
                        encode_telemetry(seq, now, 1, payload.as_bytes(), &mut out)?;
                    }
                    target = Some(first + count.min(u64::from(w.max_inflight)) - 1);
                    stream.write_all(&out).await?;
                }
                Message::Ack { seq } if Some(seq) == target => {
                    println!("all {count} readings stored and acknowledged");
                    return Ok(());
                }
                Message::Error(e) => bail!("gateway refused: {} {}", e.code, e.message),
                _ => {}
            }
        }
        if stream.read_buf(&mut rbuf).await? == 0 {
            bail!("gateway closed the connection");
        }
    }
}
