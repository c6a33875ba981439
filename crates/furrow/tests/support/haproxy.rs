//! A throwaway HAProxy (Debian's `haproxy` package) running a configuration
//! the test writes, in a temporary directory, killed when dropped. A test
//! that needs one fails loudly when the program is missing: scripts/test.sh
//! installs it.

use std::process::{Child, Command, Stdio};

/// A running HAProxy.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// HAProxy as deploy/haproxy/haproxy.cfg, on loopback: `front` spreads
    /// devices over `gateways` (name, device listener, API port) with
    /// leastconn, PROXY v2 from `source`, /readyz health checks.
    pub fn in_front_of(
        front: std::net::SocketAddr,
        source: &str,
        gateways: &[(String, std::net::SocketAddr, u16)],
    ) -> Self {
        let mut cfg = format!(
            "global\n    maxconn 2000\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5m\n    timeout server 5m\n\
             \x20   retries 3\n    option redispatch\n\
             frontend devices\n    bind {front}\n    default_backend gateways\n\
             backend gateways\n    balance leastconn\n    option httpchk\n\
             \x20   http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host furrow\n\
             \x20   http-check expect status 200\n"
        );
        for (name, listen, api_port) in gateways {
            cfg.push_str(&format!(
                "    server {name} {listen} send-proxy-v2 source {source} check port {api_port} inter 300ms fall 2 rise 1\n"
            ));
        }
        Self::start(&cfg)
    }

    /// Checks and starts `config` (foreground, `-db`).
    pub fn start(config: &str) -> Self {
        let program = ["haproxy", "/usr/sbin/haproxy"]
            .into_iter()
            .find(|p| Command::new(p).arg("-v").output().is_ok())
            .expect("haproxy is installed (apt-get install haproxy, as scripts/test.sh does)");
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let check = Command::new(program)
            .args(["-c", "-f"])
            .arg(&path)
            .output()
            .expect("haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refuses the test's configuration:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(program)
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        Self { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
