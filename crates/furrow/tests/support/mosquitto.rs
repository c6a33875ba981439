//! A throwaway Mosquitto broker (Debian's `mosquitto` package) on a free
//! loopback port, in a temporary directory, killed when dropped. A test
//! that needs one fails loudly when the program is missing: scripts/test.sh
//! installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running broker.
pub struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Where the mosquitto program is.
fn program() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("mosquitto is not installed: run `apt-get install mosquitto` (scripts/test.sh does)");
}

impl Mosquitto {
    /// Starts a broker: anonymous, persistence off, loopback only.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stdout\n"
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(program())
            .arg("-c")
            .arg(&conf)
            // Run as root, mosquitto drops to its own user, which cannot
            // write into our directory: we open its log for it.
            .stdout(std::fs::File::create(dir.path().join("mosquitto.log")).expect("log file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mosquitto");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// Its listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
