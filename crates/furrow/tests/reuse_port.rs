//! `furrow serve --reuse-port`: two real gateway processes, each with its
//! own data directory and API port, share one device port, and the kernel
//! spreads connections between them. Without the flag, a second process
//! cannot bind the port and says why.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::process::GatewayProcess;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_device_port_with_reuse_port() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut a = GatewayProcess::spawn(dir.path(), "gw-a", listen, &["--reuse-port"]);
    a.ready(&http).await;
    let mut b = GatewayProcess::spawn(dir.path(), "gw-b", listen, &["--reuse-port"]);
    b.ready(&http).await;

    // The kernel picks a listener by a hash of each connection's addresses:
    // new source ports land on both. Bounded: 400 connections at most
    // (all on one of two listeners by chance: about 2^-399).
    let mut tries = 0;
    let (mut on_a, mut on_b) = (0, 0);
    while tries < 400 {
        for _ in 0..20 {
            let s = within(
                Duration::from_secs(5),
                "connect",
                tokio::net::TcpStream::connect(listen),
            )
            .await
            .expect("connect to the shared port");
            drop(s);
            tries += 1;
        }
        on_a = a.accepted(&http).await;
        on_b = b.accepted(&http).await;
        if on_a > 0 && on_b > 0 {
            break;
        }
    }
    assert!(
        on_a > 0 && on_b > 0,
        "after {tries} connections: {on_a} accepted by gw-a, {on_b} by gw-b\n{}\n{}",
        a.logs(),
        b.logs()
    );

    // A third process without the flag cannot join, and says why.
    let mut c = GatewayProcess::spawn(dir.path(), "gw-c", listen, &[]);
    let status = c
        .exit_status(Duration::from_secs(15))
        .expect("a gateway that cannot bind exits");
    assert!(!status.success());
    let err = c.logs();
    assert!(
        err.contains(&listen.to_string()) && err.contains("in use") && err.contains("reuse_port"),
        "{err}"
    );
    // Both sharing processes are unaffected.
    assert!(a.child.try_wait().unwrap().is_none(), "{}", a.logs());
    assert!(b.child.try_wait().unwrap().is_none(), "{}", b.logs());
}
