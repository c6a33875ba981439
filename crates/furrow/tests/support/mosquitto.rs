//! A throwaway Mosquitto broker (Debian's `mosquitto` package) on a free
//! loopback port, in a temporary directory, killed when dropped. A test
//! that needs one fails loudly when the program is missing: scripts/test.sh
//! installs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running broker.
pub struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    /// Certificates and the log file of a mutual-TLS broker.
    log_dir: Option<tempfile::TempDir>,
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

/// A development CA and a server certificate for `localhost` signed by
/// it (rcgen), as PEM files in `dir`: `ca.pem`, `server.pem`, `server.key`.
pub fn dev_certs(dir: &std::path::Path) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "furrow test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server cert");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), server.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
}

impl Mosquitto {
    /// Starts a broker: anonymous, persistence off, loopback only.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a broker that speaks TLS only, with a certificate for
    /// `localhost` from [`dev_certs`]; returns it and the CA file.
    pub fn start_tls() -> (Self, PathBuf) {
        let certs = tempfile::tempdir().expect("temp dir");
        dev_certs(certs.path());
        let p = |f: &str| certs.path().join(f).display().to_string();
        let extra = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        );
        let m = Self::start_with(&extra);
        let ca = m._dir.path().join("ca.pem");
        std::fs::copy(certs.path().join("ca.pem"), &ca).expect("copy CA");
        (m, ca)
    }

    /// Starts a broker that speaks TLS only and requires a client
    /// certificate from `ca_pem`'s CA, presenting `cert_pem` and `key_pem`.
    pub fn start_mtls(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Self {
        let certs = tempfile::tempdir().expect("temp dir");
        let p = |f: &str, text: &str| {
            let path = certs.path().join(f);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        };
        // A log file of its own: Mosquitto flushes it line by line (its
        // stdout, a file here, is block-buffered).
        let extra = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nlog_dest file {}\n",
            p("ca.pem", ca_pem),
            p("server.pem", cert_pem),
            p("server.key", key_pem),
            certs.path().join("broker.log").display()
        );
        let mut m = Self::start_with(&extra);
        m.log_dir = Some(certs);
        m
    }

    /// What the broker logged so far (brokers from [`Self::start_mtls`]).
    pub fn log(&self) -> String {
        self.log_dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("broker.log")).ok())
            .unwrap_or_default()
    }

    fn start_with(listener_options: &str) -> Self {
        // Tests of one binary start brokers side by side: a port freed by a
        // broker that a test stopped (to start it again there) must not be
        // taken by another test's new broker meanwhile.
        let _ports = PORTS.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..5 {
            if let Some(m) = Self::try_start_at(super::free_port(), listener_options) {
                return m;
            }
        }
        panic!("mosquitto could not bind a free port in 5 tries");
    }

    /// Starts a broker on `port` and checks that it, not another process,
    /// listens there. `None` if it could not bind.
    fn try_start_at(port: u16, listener_options: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        // `user root`: run as root, mosquitto would otherwise drop to its own
        // user, which cannot read our temporary files.
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\n{listener_options}allow_anonymous true\n\
                 persistence false\nlog_dest stdout\n"
            ),
        )
        .expect("write mosquitto.conf");
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log file");
        let child = Command::new(program())
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut me = Self {
            child,
            addr,
            _dir: dir,
            log_dir: None,
        };
        // Something answers on the port; if it is not our broker (which
        // then failed to bind), ours exits at once: give it the time to.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if me.child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if std::net::TcpStream::connect(addr).is_ok() {
                std::thread::sleep(Duration::from_millis(150));
                return me.child.try_wait().ok().flatten().is_none().then_some(me);
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {addr} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
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

    /// `mqtt://ADDR`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// Kills the broker at once (as a crash would); its port stays
    /// reserved against this binary's other brokers until [`Stopped::restart`].
    pub fn kill(mut self) -> Stopped {
        let guard = PORTS.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.child.kill();
        let _ = self.child.wait();
        Stopped {
            port: self.addr.port(),
            _guard: guard,
        }
    }
}

static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A killed broker's port, held until it is started there again.
pub struct Stopped {
    port: u16,
    _guard: std::sync::MutexGuard<'static, ()>,
}

impl Stopped {
    /// A plain broker again on the same port.
    pub fn restart(self) -> Mosquitto {
        Mosquitto::try_start_at(self.port, "")
            .unwrap_or_else(|| panic!("mosquitto could not bind port {} again", self.port))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
