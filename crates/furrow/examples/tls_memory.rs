//! What one idle device TLS connection holds on the gateway's heap.
//!
//! `cargo run --release -p furrow --example tls_memory`
//!
//! Runs N handshakes over loopback against the gateway's own TLS setup
//! (`TlsState` with a certificate from `furrow certs`), each server side on
//! one thread whose allocations are counted, then exchanges one record
//! each way, releases the idle buffers (the records leave rustls then) and
//! parks, as a quiet session does. It prints the live bytes and
//! allocations per connection at each step: the
//! floor under `bench/compare.py`'s TLS idle row, without the allocator's
//! fragmentation or the rest of the session.

use std::sync::Arc;

use bytes::BytesMut;
use furrow::ingress::tls::TlsState;
use furrow::ingress::tls_conn::TlsConn;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "../tests/support/counting.rs"]
mod counting;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

use counting::counted;

const N: usize = 200;

fn main() -> anyhow::Result<()> {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        measure(version)?;
    }
    Ok(())
}

/// One round of N connections over `version`.
fn measure(version: &'static rustls::SupportedProtocolVersion) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = furrow::certs::Ca::new("tls-memory", 2)?;
    let server = ca.server(&["localhost".to_owned()], 2)?;
    std::fs::write(dir.path().join("server.pem"), &server.cert_pem)?;
    std::fs::write(dir.path().join("server.key"), &server.key_pem)?;
    std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem)?;
    let cfg = furrow::config::Tls {
        cert_file: dir.path().join("server.pem"),
        key_file: dir.path().join("server.key"),
        ..Default::default()
    };
    let state = TlsState::load(&cfg, 0)?;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in furrow::ingress::tls::read_certs("CA", &dir.path().join("ca.pem"))? {
        roots.add(c)?;
    }
    let client = Arc::new(
        tokio_rustls::rustls::ClientConfig::builder_with_protocol_versions(&[version])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;

    // The devices, on a thread of their own (not counted).
    let devices = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut held = Vec::new();
            for _ in 0..N {
                let tcp = TcpStream::connect(addr).await?;
                let name = rustls_pki_types::ServerName::try_from("localhost")?;
                let mut s = tokio_rustls::TlsConnector::from(Arc::clone(&client))
                    .connect(name, tcp)
                    .await?;
                s.write_all(b"hello").await?;
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).await?;
                held.push(s);
            }
            // Hold them until the gateway side is measured.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            Ok::<_, anyhow::Error>(())
        })
    });

    let (handshake, traffic, idle, parked) = rt.block_on(async {
        let mut conns = Vec::new();
        let mut at_handshake = (0, 0);
        for _ in 0..N {
            let (tcp, _) = listener.accept().await?;
            let config = state.current();
            counting::on(true);
            let before = counted();
            let mut plain = BytesMut::new();
            let (mut tls, _, _) = TlsConn::accept(&tcp, config, &[], &mut plain).await?;
            let after = counted();
            at_handshake.0 += after.0 - before.0;
            at_handshake.1 += after.1 - before.1;
            while plain.len() < 5 {
                tcp.readable().await?;
                let _ = tls.read_from(&tcp, 4096);
                tls.process(&mut plain, None)?;
            }
            {
                let mut out = BytesMut::from(&b"howdy"[..]);
                tls.process(&mut plain, Some(&mut out))?;
            }
            while tls.unsent() > 0 {
                tcp.writable().await?;
                let _ = tls.write_to(&tcp);
            }
            drop(plain);
            counting::on(false);
            conns.push((tcp, tls));
        }
        counting::on(true);
        let traffic = counted();
        for (_, tls) in conns.iter_mut() {
            tls.release_idle();
        }
        let idle = counted();
        for (_, tls) in conns.iter_mut() {
            anyhow::ensure!(
                tls.handed_over() == (true, true),
                "TLS 1.3 records or key schedule stayed with rustls"
            );
            tls.park();
        }
        let parked = counted();
        counting::on(false);
        Ok::<_, anyhow::Error>((at_handshake, traffic, idle, parked))
    })?;
    devices
        .join()
        .map_err(|_| anyhow::anyhow!("device thread panicked"))??;
    let per = |(b, a): (i64, i64)| {
        format!(
            "{:>6} bytes in {:>3} allocations",
            b / N as i64,
            a / N as i64
        )
    };
    println!(
        "per TLS connection, {N} connections (rustls unbuffered, ECDSA P-256, {:?}):",
        version.version
    );
    println!("  after the handshake      {}", per(handshake));
    println!("  after a record each way  {}", per(traffic));
    println!(
        "  idle: buffers released, records handed over from rustls {}",
        per(idle)
    );
    println!(
        "  parked: expanded keys dropped too                      {}",
        per(parked)
    );
    Ok(())
}
