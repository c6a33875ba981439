//! The `furrow` command: run the gateway and manage devices.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use furrow::config::{Config, Overrides};
use furrow::store::prelude::*;

mod cli;

use cli::{bench, send, sim};

#[derive(Parser)]
#[command(
    name = "furrow",
    version,
    about = "A TCP gateway for IoT device fleets"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (holds furrow.db).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL database shared by instances (postgres://user:pass@host/db);
    /// without it, SQLite in the data directory.
    #[arg(long = "database", value_name = "URL", env = "FURROW_DATABASE_URL")]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Device listener address [default: 0.0.0.0:7700].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Publish events to this MQTT broker (mqtt://host[:port]).
        #[arg(long, value_name = "URL")]
        mqtt: Option<String>,
        /// Share the device port with other gateway processes that set it
        /// too (SO_REUSEPORT) [config: reuse_port].
        #[arg(long)]
        reuse_port: bool,
        /// Require a PROXY protocol header (v1 or v2) from a trusted load
        /// balancer on every device connection [config: proxy_protocol.enabled].
        #[arg(long)]
        proxy_protocol: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Make development certificates: a CA, a server certificate, device
    /// certificates (for TLS and mutual TLS; use your own PKI in production).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Firmware signing: make the fleet's Ed25519 key, sign an image.
    Firmware {
        #[command(subcommand)]
        cmd: FirmwareCmd,
    },
    /// Apply database schema migrations and exit (the gateway also applies
    /// them when it starts).
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Manage devices.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Manage the HTTP API's tokens: each has a role (read, operate,
    /// admin) and names its holder in the audit log.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Send a few readings as one device and print the exchange (WELCOME,
    /// TELEMETRY, ACK): the quickest check that a device gets in.
    Send(send::SendArgs),
    /// Simulate a fleet of devices (on the device SDK) against a gateway.
    Sim(sim::SimArgs),
    /// Load-test a gateway (furrow/1) or an MQTT broker: flat, steady,
    /// idle or storm.
    Bench(bench::BenchCmd),
    /// A worker process of `furrow bench` (started by it; reads stdin).
    #[command(hide = true)]
    BenchWorker,
    /// Load and validate the configuration, print the effective settings as
    /// TOML, and exit.
    CheckConfig {
        #[command(flatten)]
        common: Common,
    },
}

/// The TLS listener's flags.
#[derive(clap::Args, Clone, Default)]
struct TlsArgs {
    /// PEM certificate chain: turns on the TLS device listener [config:
    /// tls.cert_file].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert [config: tls.key_file].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA of device certificates: mutual TLS, required for every TLS
    /// device [config: tls.client_ca_file].
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// TLS device listener address [default: 0.0.0.0:7701].
    #[arg(long, value_name = "ADDR")]
    tls_listen: Option<std::net::SocketAddr>,
}

impl TlsArgs {
    fn overrides(self) -> Option<furrow::config::TlsOverride> {
        let o = furrow::config::TlsOverride {
            listen: self.tls_listen,
            cert_file: self.tls_cert,
            key_file: self.tls_key,
            client_ca_file: self.client_ca,
        };
        let any = o.listen.is_some()
            || o.cert_file.is_some()
            || o.key_file.is_some()
            || o.client_ca_file.is_some();
        any.then_some(o)
    }
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A development CA: OUT/ca.pem and OUT/ca.key.
    Ca {
        #[arg(long, value_name = "DIR", default_value = "furrow-certs")]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// A server certificate signed by OUT's CA: OUT/server.pem, .key.
    Server {
        /// DNS names or IP addresses devices connect to (repeatable).
        #[arg(long = "name", value_name = "NAME", required = true)]
        names: Vec<String>,
        #[arg(long, value_name = "DIR", default_value = "furrow-certs")]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Device certificates signed by OUT's CA, naming each device id:
    /// OUT/devices/ID.pem and .key.
    Device {
        /// Device ids.
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long, value_name = "DIR", default_value = "furrow-certs")]
        out: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Subcommand)]
enum FirmwareCmd {
    /// A new Ed25519 key pair: OUT (PKCS#8, keep it secret; the gateway's
    /// firmware.signing_key_file) and OUT.pub (the public key in hex, to
    /// build into devices). Prints the public key.
    Keygen {
        #[arg(long, value_name = "FILE", default_value = "firmware.key")]
        out: PathBuf,
    },
    /// Signs IMAGE for MODEL and VERSION; prints the hex signature, for
    /// `POST /v1/firmware?...&signature=`.
    Sign {
        /// The key from `keygen`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The device model the image is for.
        #[arg(long)]
        model: String,
        /// The version it installs.
        #[arg(long)]
        version: String,
        /// The image file.
        image: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Register a device; prints its token once, on its own line.
    Add {
        /// Device id: 1 to 128 characters of A-Z a-z 0-9 . _ : -
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// List devices.
    List {
        /// Only devices with this tag, KEY:VALUE; repeat for several (all
        /// must match).
        #[arg(long = "tag", value_name = "KEY:VALUE")]
        tags: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Set or remove a device's tags; prints them all.
    Tag {
        /// Device id.
        id: String,
        /// Tags to set, KEY=VALUE.
        #[arg(value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Tags to remove.
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Give a device a new token; prints it once, on its own line. The old
    /// token keeps working for the grace period, or until the device first
    /// authenticates with the new one.
    Rotate {
        /// Device id.
        id: String,
        /// Seconds the old token still works [default: devices.token_grace_s,
        /// 7 days]; 0: it stops working at once.
        #[arg(long)]
        grace_s: Option<u64>,
        /// Also send the new token to the device as a `furrow.token`
        /// command (the device SDK switches to it by itself); a running
        /// gateway sends it at the device's next connection.
        #[arg(long)]
        deliver: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Revoke a device; a connected one is disconnected with GOODBYE DEVICE_REVOKED.
    Revoke {
        /// Device id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an API token; prints it once, on its own line.
    Create {
        /// Its name: 1 to 64 characters of A-Z a-z 0-9 . _ : -
        name: String,
        /// read (dashboards, monitoring), operate (also commands) or admin.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        common: Common,
    },
    /// List API tokens (never their secrets).
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Revoke an API token: it opens nothing from its next request on.
    Revoke {
        /// Its name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Who the audit log says acted from the command line.
fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

/// Records a change made from the command line; a failure to record is
/// reported (the change is made).
async fn audit(
    store: &dyn furrow::store::Store,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    let entry = furrow::store::NewAudit {
        actor: cli_actor(),
        source: "cli".into(),
        action: action.into(),
        target: target.into(),
        detail: detail.to_string(),
    };
    if let Err(e) = store.record_audit(entry).await {
        eprintln!("warning: the change is made but the audit log could not record it: {e}");
    }
}

fn load(common: &Common) -> anyhow::Result<Config> {
    load_with(common, Overrides::default())
}

/// Loads the configuration with `overrides` from flags (its `data_dir`
/// comes from `common`).
fn load_with(common: &Common, overrides: Overrides) -> anyhow::Result<Config> {
    let overrides = Overrides {
        data_dir: common.data_dir.clone(),
        database_url: common.database_url.clone(),
        ..overrides
    };
    Ok(Config::load(common.config.as_deref(), &overrides)?)
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

async fn open_store(cfg: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    furrow::server::connect_store(cfg)
        .await
        .with_context(|| "cannot open the device database")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve {
            common,
            listen,
            mqtt,
            reuse_port,
            proxy_protocol,
            tls,
        } => {
            // A flag that is absent leaves the file and environment alone.
            let overrides = Overrides {
                listen,
                mqtt: mqtt.map(|url| furrow::config::MqttOverride { url }),
                reuse_port: reuse_port.then_some(true),
                proxy_protocol: proxy_protocol
                    .then_some(furrow::config::ProxyProtocolOverride { enabled: true }),
                tls: tls.overrides(),
                ..Overrides::default()
            };
            let cfg = load_with(&common, overrides)?;
            let server = furrow::Server::bind(cfg).await?;
            server.run(shutdown_signal()).await;
        }
        Cmd::Certs { cmd } => {
            let made = match cmd {
                CertsCmd::Ca { out, days } => furrow::certs::make_ca(&out, days)?,
                CertsCmd::Server { names, out, days } => {
                    furrow::certs::make_server(&out, &names, days)?
                }
                CertsCmd::Device { ids, out, days } => {
                    let mut all = Vec::new();
                    for id in &ids {
                        all.extend(furrow::certs::make_device(&out, id, days)?);
                    }
                    all
                }
            };
            for path in made {
                println!("{}", path.display());
            }
        }
        Cmd::Firmware { cmd } => match cmd {
            FirmwareCmd::Keygen { out } => {
                use std::io::Write;
                let der = furrow::firmware::SigningKey::generate()?;
                let key = furrow::firmware::SigningKey::from_pkcs8(&der, "new key")?;
                let mut f = std::fs::OpenOptions::new();
                f.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
                f.open(&out)
                    .and_then(|mut file| file.write_all(&der))
                    .with_context(|| format!("cannot write {}", out.display()))?;
                let mut public = out.clone().into_os_string();
                public.push(".pub");
                std::fs::write(&public, format!("{}\n", key.public_hex()))
                    .with_context(|| format!("cannot write {public:?}"))?;
                println!("{}", key.public_hex());
            }
            FirmwareCmd::Sign {
                key,
                model,
                version,
                image,
            } => {
                use sha2::Digest;
                furrow::firmware::check_label("model", &model)?;
                furrow::firmware::check_label("version", &version)?;
                let key = furrow::firmware::SigningKey::load(&key)?;
                let mut f = std::fs::File::open(&image)
                    .with_context(|| format!("cannot open {}", image.display()))?;
                let mut hash = sha2::Sha256::new();
                let size = std::io::copy(&mut f, &mut hash)
                    .with_context(|| format!("cannot read {}", image.display()))?;
                let id: [u8; 32] = hash.finalize().into();
                println!("{}", hex::encode(key.sign(&id, size, &model, &version)));
            }
        },
        Cmd::Send(args) => send::run(args).await?,
        Cmd::Sim(args) => sim::run(args).await?,
        Cmd::Bench(cmd) => bench::run(cmd).await?,
        Cmd::BenchWorker => tokio::task::spawn_blocking(furrow_bench::worker_main).await??,
        Cmd::Migrate { common } => {
            let cfg = load(&common)?;
            // Opening migrates; it also refuses a schema newer than this build.
            open_store(&cfg).await?;
            eprintln!("database schema is up to date");
        }
        Cmd::CheckConfig { common } => {
            let cfg = load(&common)?;
            print_out(&toml_string(&cfg)?)?;
        }
        Cmd::Device { cmd } => match cmd {
            DeviceCmd::Add { id, common } => {
                // Refuse a bad id before creating anything on disk.
                if !furrow_proto::message::valid_device_id(id.as_bytes()) {
                    anyhow::bail!(furrow::devices::ProvisionError::InvalidId(id));
                }
                let store = open_store(&load(&common)?).await?;
                let token = furrow::devices::add_device(&*store, &id).await?;
                audit(&*store, "device.create", &id, serde_json::json!({})).await;
                eprintln!("device {id} created; its token is shown once:");
                println!("{token}");
            }
            DeviceCmd::Tag {
                id,
                set,
                remove,
                common,
            } => {
                let mut changes = std::collections::BTreeMap::new();
                for kv in set {
                    let Some((k, v)) = kv.split_once('=') else {
                        anyhow::bail!("{kv:?}: expected KEY=VALUE");
                    };
                    changes.insert(k.to_owned(), Some(v.to_owned()));
                }
                for k in remove {
                    changes.insert(k, None);
                }
                let store = open_store(&load(&common)?).await?;
                let detail = serde_json::json!({ "tags": changes });
                let tags = store.set_tags(&id, changes).await?;
                audit(&*store, "device.tags", &id, detail).await;
                for (k, v) in tags {
                    println!("{k}={v}");
                }
            }
            DeviceCmd::List { tags, common } => {
                let selector = furrow::jobs::parse_selector(&tags)?;
                let store = open_store(&load(&common)?).await?;
                let mut after = None;
                println!(
                    "{:<40} {:>12} {:<20} {:<20}",
                    "device_id", "last_seq", "created (UTC)", "revoked (UTC)"
                );
                loop {
                    let page = if selector.is_empty() {
                        store.list_devices(after.clone(), 500).await?
                    } else {
                        store.select_devices(&selector, after.clone(), 500).await?
                    };
                    for d in &page {
                        println!(
                            "{:<40} {:>12} {:<20} {:<20}",
                            d.device_id,
                            d.last_seq,
                            furrow::clock::rfc3339(d.created_ms),
                            furrow::clock::rfc3339(d.revoked_ms.unwrap_or(0)),
                        );
                    }
                    match page.last() {
                        Some(d) if page.len() == 500 => after = Some(d.device_id.clone()),
                        _ => break,
                    }
                }
            }
            DeviceCmd::Rotate {
                id,
                grace_s,
                deliver,
                common,
            } => {
                let cfg = load(&common)?;
                let grace_s = grace_s.unwrap_or(cfg.devices.token_grace_s);
                let store = open_store(&cfg).await?;
                let r = furrow::devices::rotate_token(
                    &*store,
                    &id,
                    std::time::Duration::from_secs(grace_s),
                )
                .await?;
                audit(
                    &*store,
                    "device.rotate_token",
                    &id,
                    serde_json::json!({ "grace_s": grace_s, "deliver": deliver }),
                )
                .await;
                if deliver {
                    let ttl_s = grace_s.clamp(3600, 30 * 24 * 3600);
                    let cmd = store
                        .create_command(
                            &id,
                            furrow::store::NewCommand {
                                name: furrow::store::TOKEN_COMMAND.into(),
                                content_type: furrow_proto::ContentType::Json as u8,
                                payload: format!(r#"{{"token":"{}"}}"#, r.token).into_bytes(),
                                expires_ms: furrow::clock::now_ms().saturating_add(ttl_s * 1000),
                            },
                        )
                        .await?;
                    eprintln!("command {} carries the new token to {id}", cmd.id);
                }
                match r.previous_until_ms {
                    Some(_) => eprintln!(
                        "new token for {id}; the old one works for {grace_s} s more, or until {id} uses the new one"
                    ),
                    None => eprintln!("new token for {id}; the old one no longer works"),
                }
                println!("{}", r.token);
            }
            DeviceCmd::Revoke { id, common } => {
                let store = open_store(&load(&common)?).await?;
                let newly = store.revoke_device(&id).await?;
                audit(
                    &*store,
                    "device.revoke",
                    &id,
                    serde_json::json!({ "newly": newly }),
                )
                .await;
                let cancelled = store.cancel_open_commands(&id).await?;
                if !cancelled.is_empty() {
                    eprintln!("{} open command(s) cancelled", cancelled.len());
                }
                if newly {
                    eprintln!("device {id} revoked; a running gateway disconnects it within its poll interval");
                } else {
                    eprintln!("device {id} was already revoked");
                }
            }
        },
        Cmd::Token { cmd } => match cmd {
            TokenCmd::Create { name, role, common } => {
                if !furrow::api::admin::valid_token_name(&name) {
                    anyhow::bail!("token name {name:?}: 1 to 64 characters of A-Z a-z 0-9 . _ : -");
                }
                let Some(role) = furrow::store::Role::parse(&role) else {
                    anyhow::bail!("--role {role:?}: read, operate or admin");
                };
                let store = open_store(&load(&common)?).await?;
                let token = furrow::devices::auth::generate_token();
                let hash = furrow::devices::auth::hash_token(token.as_bytes());
                store.create_api_token(&name, role, hash).await?;
                audit(
                    &*store,
                    "api_token.create",
                    &name,
                    serde_json::json!({ "role": role.as_str() }),
                )
                .await;
                eprintln!(
                    "API token {name} ({}) created; it is shown once:",
                    role.as_str()
                );
                println!("{token}");
            }
            TokenCmd::List { common } => {
                let store = open_store(&load(&common)?).await?;
                println!(
                    "{:<32} {:<8} {:<20} {:<20}",
                    "name", "role", "created (UTC)", "revoked (UTC)"
                );
                for t in store.api_tokens().await? {
                    println!(
                        "{:<32} {:<8} {:<20} {:<20}",
                        t.name,
                        t.role.as_str(),
                        furrow::clock::rfc3339(t.created_ms),
                        t.revoked_ms
                            .map_or_else(|| "-".to_owned(), furrow::clock::rfc3339)
                    );
                }
            }
            TokenCmd::Revoke { name, common } => {
                let store = open_store(&load(&common)?).await?;
                let newly = store.revoke_api_token(&name).await?;
                audit(
                    &*store,
                    "api_token.revoke",
                    &name,
                    serde_json::json!({ "newly": newly }),
                )
                .await;
                if newly {
                    eprintln!("API token {name} revoked");
                } else {
                    eprintln!("API token {name} was already revoked");
                }
            }
        },
    }
    Ok(())
}

/// The effective configuration as TOML, ready to paste into a config file.
/// Secrets (the admin token, the broker password) are not printed: they
/// are emptied, and a comment says which were set.
/// Writes to stdout; a reader that went away (`furrow check-config | head`)
/// is not an error, unlike `println!`, which panics on a closed pipe.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn toml_string(cfg: &Config) -> anyhow::Result<String> {
    let mut shown = cfg.clone();
    let mut hidden = Vec::new();
    if !shown.api.token.is_empty() {
        shown.api.token.clear();
        hidden.push("api.token");
    }
    if shown.database_url != furrow::config::redact_url(&shown.database_url) {
        shown.database_url = furrow::config::redact_url(&shown.database_url);
        hidden.push("the password in database_url");
    }
    if !shown.mqtt.password.is_empty() {
        shown.mqtt.password.clear();
        hidden.push("mqtt.password");
    }
    let mut out = String::new();
    for key in hidden {
        out.push_str(&format!("# {key} is set; not shown\n"));
    }
    out.push_str(&toml::to_string_pretty(&shown)?);
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
