//! `furrow serve --reuse-port`: two real gateway processes, each with its
//! own data directory and API port, share one device port, and the kernel
//! spreads connections between them. Without the flag, a second process
//! cannot bind the port and says why.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use support::*;
use tokio::time::Instant;

/// A `furrow serve` child, killed on drop if still running.
struct Gateway {
    child: Child,
    api: SocketAddr,
    log: std::path::PathBuf,
}

impl Gateway {
    fn spawn(dir: &Path, name: &str, listen: SocketAddr, extra: &[&str]) -> Self {
        let data = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen = listen.to_string();
        let mut args = vec![
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let child = furrow_cmd(&args)
            .env("FURROW_API__LISTEN", api.to_string())
            .env("FURROW_INSTANCE_ID", name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("furrow serve starts");
        Self { child, api, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until /readyz answers 200.
    async fn ready(&mut self, http: &reqwest::Client) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("furrow serve exited early ({status}):\n{}", self.logs());
            }
            let r = http.get(format!("http://{}/readyz", self.api)).send().await;
            if matches!(r, Ok(ref r) if r.status().is_success()) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "furrow serve not ready after 15 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its `furrow_connections_accepted_total`.
    async fn accepted(&self, http: &reqwest::Client) -> u64 {
        let text = http
            .get(format!("http://{}/metrics", self.api))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix("furrow_connections_accepted_total "))
            .map_or(0, |v| v.trim().parse().expect("a counter"))
    }

    /// Waits (bounded) for the process to exit by itself.
    fn exit_status(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_device_port_with_reuse_port() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut a = Gateway::spawn(dir.path(), "gw-a", listen, &["--reuse-port"]);
    a.ready(&http).await;
    let mut b = Gateway::spawn(dir.path(), "gw-b", listen, &["--reuse-port"]);
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
    let mut c = Gateway::spawn(dir.path(), "gw-c", listen, &[]);
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
