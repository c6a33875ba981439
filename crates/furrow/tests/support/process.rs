//! Real `furrow serve` processes for end-to-end tests that need several
//! gateways (shared port, clusters) or must kill one with SIGKILL.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{free_port, furrow_cmd};

/// A `furrow serve` child, killed on drop if still running.
pub struct GatewayProcess {
    /// The process.
    pub child: Child,
    /// Its HTTP API.
    pub api: SocketAddr,
    log: std::path::PathBuf,
}

impl GatewayProcess {
    /// Starts `furrow serve` as instance `name` on `listen`, with its data
    /// directory and log under `dir`, its API on a free port, and `extra`
    /// arguments.
    pub fn spawn(dir: &Path, name: &str, listen: SocketAddr, extra: &[&str]) -> Self {
        Self::spawn_with_env(dir, name, listen, extra, &[])
    }

    /// Like [`Self::spawn`], with environment variables (FURROW_*).
    pub fn spawn_with_env(
        dir: &Path,
        name: &str,
        listen: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
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
        let mut cmd = furrow_cmd(&args);
        cmd.env("FURROW_API__LISTEN", api.to_string())
            .env("FURROW_INSTANCE_ID", name);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("furrow serve starts");
        Self { child, api, log }
    }

    /// What it logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until /readyz answers 200.
    pub async fn ready(&mut self, http: &reqwest::Client) {
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

    /// The sum of its metric samples whose line starts with `name` (all
    /// label sets), 0 if none.
    pub async fn metric(&self, http: &reqwest::Client, name: &str) -> f64 {
        let text = http
            .get(format!("http://{}/metrics", self.api))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Its `furrow_connections_accepted_total`.
    pub async fn accepted(&self, http: &reqwest::Client) -> u64 {
        self.metric(http, "furrow_connections_accepted_total ")
            .await as u64
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn exit_status(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
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

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
