//! What a TLS handshake holds on the gateway's heap while it waits for the
//! device's next flight.
//!
//! In a burst of connections hundreds of handshakes wait at once, a round
//! trip each, and the long-lived objects allocated meanwhile (registry
//! entries, records, parked sessions) land between whatever they hold:
//! those pages stay resident after the burst (docs/performance.md, "A
//! burst of handshakes, and what it leaves behind"). So a waiting handshake
//! holds rustls' state and nothing else: no ciphertext buffer either way.
//!
//! The server side runs on this test's thread, whose allocations a counting
//! allocator tallies; the devices, on a thread of their own, send a
//! ClientHello, read the start of the server's flight and go quiet.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::BytesMut;
use furrow::ingress::tls::TlsState;
use furrow::ingress::tls_conn::TlsConn;
use tokio::net::TcpListener;
use tokio_rustls::rustls;

#[path = "support/counting.rs"]
mod counting;

#[global_allocator]
static GLOBAL: counting::Counting = counting::Counting;

const N: usize = 40;

/// A waiting handshake held 4,736 bytes here (rustls' state, the task and
/// the `TlsConn`) with the ciphertext buffers freed and 17,031 when it kept
/// them; the bound leaves room for rustls to grow, not for a buffer.
const MOST_PER_WAITING_HANDSHAKE: i64 = 8 * 1024;

#[test]
fn a_handshake_waiting_for_the_device_holds_no_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = furrow::certs::Ca::new("tls-handshake-memory", 2).expect("ca");
    let server = ca
        .server(&["localhost".to_owned()], 2)
        .expect("server cert");
    std::fs::write(dir.path().join("server.pem"), &server.cert_pem).expect("write");
    std::fs::write(dir.path().join("server.key"), &server.key_pem).expect("write");
    let cfg = furrow::config::Tls {
        cert_file: dir.path().join("server.pem"),
        key_file: dir.path().join("server.key"),
        ..Default::default()
    };
    let state = TlsState::load(&cfg, 0).expect("tls state");
    let mut roots = rustls::RootCertStore::empty();
    for c in furrow::ingress::tls::read_certs("CA", &{
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, &ca.cert_pem).expect("write");
        p
    })
    .expect("ca certs")
    {
        roots.add(c).expect("root");
    }
    let client = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");

    // The devices: a ClientHello each, the first bytes of the answer, then
    // silence until told to go.
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let devices = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..N {
            let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = rustls::ClientConnection::new(Arc::clone(&client), name).expect("client");
            let mut hello = Vec::new();
            tls.write_tls(&mut hello).expect("client hello");
            tcp.write_all(&hello).expect("send client hello");
            let mut first = [0u8; 1];
            tcp.read_exact(&mut first).expect("the server's flight");
            held.push((tcp, tls));
        }
        waiting_tx.send(()).expect("report");
        let _ = go_rx.recv();
        drop(held);
    });

    let per_handshake = rt.block_on(async {
        counting::on(true);
        let before = counting::counted().0;
        let mut tasks = Vec::new();
        for _ in 0..N {
            let (tcp, _) = listener.accept().await.expect("accept");
            let config = state.current();
            tasks.push(tokio::spawn(async move {
                let mut plain = BytesMut::new();
                let _ = TlsConn::accept(&tcp, config, &[], &mut plain).await;
            }));
        }
        // Every device has read the server's flight: every handshake now
        // waits for the device's Finished.
        tokio::task::spawn_blocking(move || waiting_rx.recv())
            .await
            .expect("join")
            .expect("devices");
        tokio::task::yield_now().await;
        let held = counting::counted().0 - before;
        counting::on(false);
        go_tx.send(()).expect("release the devices");
        for t in tasks {
            let _ = t.await;
        }
        held / N as i64
    });
    devices.join().expect("device thread");
    assert!(
        per_handshake > 0,
        "nothing counted: the measurement is broken"
    );
    assert!(
        per_handshake <= MOST_PER_WAITING_HANDSHAKE,
        "a handshake waiting for its device holds {per_handshake} bytes \
         (at most {MOST_PER_WAITING_HANDSHAKE}): a ciphertext buffer stayed"
    );
    eprintln!("a waiting handshake holds {per_handshake} bytes");
}
