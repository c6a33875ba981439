//! A throwaway PostgreSQL cluster (Debian's `postgresql` package: initdb and
//! pg_ctl) on a free loopback port, in a temporary directory, stopped when
//! dropped. A test that needs one fails loudly when the programs are
//! missing: scripts/test.sh installs them.
//!
//! The cluster can be stopped and started again on the same port and data
//! directory ([`Postgres::stop`], [`Postgres::start_again`]): the outage
//! tests take the database away under a running gateway.
//!
//! PostgreSQL refuses to run as root; as root (CI here), the programs run
//! as the `postgres` user through `runuser`, and the directory is theirs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running (or stopped) throwaway cluster.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    running: bool,
    /// Server options beyond the port and socket (TLS).
    extra: String,
    _dir: tempfile::TempDir,
}

/// The newest installed server's programs.
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): \
             run `apt-get install postgresql` (scripts/test.sh does)"
        )
    })
}

fn is_root() -> bool {
    // The effective uid of this process, through `id` (no libc needed).
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL program, as `postgres` when we are root.
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port nobody listens on now (released before PostgreSQL binds it;
/// PostgreSQL's own bind error is reported if another process races us).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Postgres {
    /// Creates and starts a cluster: trust authentication for `postgres`
    /// over TCP on 127.0.0.1 only, fsync on (the durability under test).
    pub fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("furrow-pg")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown",
            );
        }
        let data = dir.path().join("data");
        let mut init = pg_command(&bin.join("initdb"));
        init.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(init, "initdb");
        let mut pg = Self {
            bin,
            data,
            port: free_port(),
            running: false,
            extra: String::new(),
            _dir: dir,
        };
        pg.start_again();
        pg
    }

    /// Like [`Self::start`], with TLS on (`ssl=on`, this certificate and
    /// key) and TLS required of every TCP client (`hostssl` only).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        let mut pg = Self::start();
        pg.stop();
        let owned_file = |name: &str, text: &str| {
            let path = pg.data.join(name);
            std::fs::write(&path, text).expect("write");
            let mut c = Command::new("chmod");
            c.arg("600").arg(&path);
            run(c, "chmod");
            if is_root() {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&path);
                run(c, "chown");
            }
        };
        owned_file("server.crt", cert_pem);
        owned_file("server.key", key_pem);
        owned_file(
            "pg_hba.conf",
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        );
        pg.extra = "-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".into();
        pg.start_again();
        pg
    }

    /// Starts the stopped cluster again, on the same port.
    pub fn start_again(&mut self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=on {}",
            self.port,
            self.data.display(),
            self.extra
        );
        let mut c = pg_command(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"]);
        run(c, "pg_ctl start");
        self.running = true;
    }

    /// Stops the cluster (fast shutdown: clients are disconnected at once).
    pub fn stop(&mut self) {
        let mut c = pg_command(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run(c, "pg_ctl stop");
        self.running = false;
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db`.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of the default database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// Creates a fresh database and returns its URL: tests of one binary
    /// share a cluster, each with its own database.
    pub async fn fresh_db(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let name = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        drop(client);
        let _ = task.await;
        self.url_of(&name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let mut c = pg_command(&self.bin.join("pg_ctl"));
            c.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
            let _ = c.output();
        }
    }
}
