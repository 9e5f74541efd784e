//! Command-line interface: clap definitions and the glue that calls into the modules. No logic of its own.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG};
use crate::control::{self, Request};
use crate::keys::PrivateKey;

mod admin;
mod audit;
mod audit_ssh;
mod device;
mod enroll;
mod fleet;
mod token;

use audit::{audit_flows, audit_http, audit_keygen};
use device::{device_add, device_config, device_list, device_remove};

const DEFAULT_CONFIG_PATH: &str = "/etc/rampart/gateway.toml";

#[derive(Parser, Debug)]
#[command(
    name = "rampart",
    version,
    about = "Rampart: a WireGuard-terminating zero-trust gateway.",
    long_about = "Rampart terminates WireGuard tunnels from devices, binds each device to a tenant and a user, and relays traffic between devices of the same tenant. Tenants are isolated and may use the same address ranges.\n\nStart with `rampart init`, then `rampart run -c /etc/rampart/gateway.toml`, then enroll devices with `rampart device add`."
)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter such as `rampart=debug`).
    #[arg(long, global = true, env = "RAMPART_LOG", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a starter config and a gateway key into a directory (existing files are kept).
    Init {
        /// Directory to write gateway.toml and gateway.key into.
        #[arg(long, default_value = "/etc/rampart")]
        dir: PathBuf,
        /// Turn the enrollment listener on at this address (e.g. 0.0.0.0:8443) in the written config (the
        /// appliance does this on first boot).
        #[arg(long)]
        enroll_listen: Option<std::net::SocketAddr>,
        /// Set gateway.user to this existing unprivileged system user in the written config (the gateway then
        /// drops to it after start) and make the config readable by its group (mode 0640). The appliance
        /// does this on first boot with `rampart`.
        #[arg(long)]
        user: Option<String>,
    },
    /// Run the gateway in the foreground.
    Run {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file (and the devices enrolled in its state_dir) without touching a running gateway.
    CheckConfig {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Make a running gateway re-read its config and enrolled devices (like SIGHUP). A bad config is rejected
    /// and the gateway keeps running unchanged.
    Reload {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print a new WireGuard private key (base64, as `wg genkey`); its public key goes to stderr.
    Keygen,
    /// Enroll, list and remove devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Enrollment tokens: devices enroll themselves with one (`rampart enroll`, or curl and wg).
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// On a device: enroll with a token (key pair made here), refresh, rotate the key, or leave.
    Enroll(enroll::EnrollArgs),
    /// Accounts of the review web UI (gateway.ui_listen): the first admin is created here.
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Review the audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Certificate authorities of a tenant (kept in state_dir).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Fleet mode (`[fleet]`): the nodes sharing this gateway's PostgreSQL.
    Fleet {
        #[command(subcommand)]
        command: fleet::FleetCommand,
    },
    /// Appliance slots and updates.
    System {
        #[command(subcommand)]
        command: crate::system::SystemCommand,
    },
    /// Test builds only: hooks the end-to-end tests use to provoke failures.
    #[cfg(feature = "test-hooks")]
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

#[cfg(feature = "test-hooks")]
#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Stops the running gateway's data path for `--secs` seconds.
    StallDatapath {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        secs: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Create a tenant's CA (an existing one is kept). Without --tls: the SSH user CA (targets trust it for
    /// the gateway's short-lived certificates), the SSH host CA (clients trust it for the gateway) and the
    /// gateway's SSH host key, under state_dir/ssh/TENANT (private keys are never printed). With --tls: the
    /// TLS inspection CA that signs the
    /// certificates shown to devices of a tenant with `tls_decrypt = true`; its certificate
    /// (state_dir/tls/TENANT/ca.pem) must be installed as trusted on those devices.
    Init {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        /// The TLS inspection CA.
        #[arg(long)]
        tls: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Flows: who, from which device, to where, which rule decided, bytes each way, how it ended.
    Flows {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Source device name.
        #[arg(long)]
        device: Option<String>,
        /// Destination inside this CIDR (or exactly this address).
        #[arg(long)]
        dst: Option<String>,
        /// Only flows started since: a duration back from now (15m, 2h, 7d) or a UTC time (2026-11-26T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// At most this many flows (newest first).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// The flows of every node of the fleet, from PostgreSQL (`[fleet]`), with a NODE column.
        #[arg(long)]
        fleet: bool,
        /// With --fleet: only this node's flows.
        #[arg(long, requires = "fleet")]
        node: Option<String>,
    },
    /// HTTP requests seen by the HTTP inspector (`inspect_http` flows): who, method, host, path, status, bytes,
    /// duration, the deciding HTTP rule and decision; TLS connections that were not decrypted appear with
    /// method "-".
    Http {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Exact host name (as requested, without port).
        #[arg(long)]
        host: Option<String>,
        /// Only requests of this flow (the `id` of `rampart audit flows`).
        #[arg(long)]
        flow: Option<i64>,
        /// Only requests since: a duration back from now (15m, 2h, 7d) or a UTC time (2026-11-26T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// At most this many requests (newest first).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// The requests of every node of the fleet, from PostgreSQL (`[fleet]`), with NODE and SEQ columns.
        #[arg(long)]
        fleet: bool,
        /// With --fleet: only this node's requests (`--flow` ids are per node).
        #[arg(long, requires = "fleet")]
        node: Option<String>,
    },
    /// SSH sessions seen by the SSH inspector (`inspect_ssh` flows): list, show, replay, search, export.
    Ssh {
        #[command(subcommand)]
        command: audit_ssh::SshCommand,
    },
    /// What was done in the review web UI: sign-ins (and refusals), reads of recordings, live views,
    /// terminated sessions, token and device changes.
    Admin {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only records since: a duration back from now (15m, 2h, 7d) or a UTC time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Enrollment records: tokens created and revoked, devices enrolled (or refused), approved, refreshed,
    /// rotated, proven by their first handshake, left, revoked, expired.
    Enroll {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        /// Device name or id (dev_...).
        #[arg(long)]
        device: Option<String>,
        /// Only this event (device_enrolled, enroll_refused, device_approved, ...).
        #[arg(long)]
        event: Option<String>,
        /// Only records since: a duration back from now (15m, 2h, 7d) or a UTC time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// The records of every node of the fleet, from PostgreSQL (`[fleet]`), with NODE and SEQ columns
        /// (records still in a node's local spool are not there yet).
        #[arg(long)]
        fleet: bool,
        /// With --fleet: only this node's records.
        #[arg(long, requires = "fleet")]
        node: Option<String>,
    },
    /// Check that the audit trail is whole and unaltered: the hash chain over every record (flows, HTTP,
    /// SSH, gap and eviction records), each recording's sha256, and the checkpoints' signatures with a public
    /// key pinned out of band; with --head, that no tail was cut. Reports the first break and exits non-zero.
    Verify {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The gateway's audit signing public key, kept outside the gateway (a copy of
        /// state_dir/audit_signing_key.pub taken at installation); default: audit.verify_key.
        #[arg(long)]
        pubkey: Option<PathBuf>,
        /// The exported checkpoint heads (audit.checkpoint_sink's file, or a syslog file holding them).
        #[arg(long)]
        head: Option<PathBuf>,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Verify what every node shipped to the fleet's PostgreSQL (`[fleet]`) instead of the local store:
        /// each node's chain (sequence, links, hashes, records against digests), flow rows, checkpoints.
        #[arg(long, conflicts_with_all = ["pubkey", "head"])]
        fleet: bool,
    },
    /// Make a reviewer key pair for encrypting recordings at rest (the ssh-log-cli format). The private key is
    /// written to FILE (mode 0600) and never given to the gateway; put the printed public key into the
    /// tenant's `audit_recipient`.
    Keygen {
        /// Where to write the private key (refuses to overwrite); the public key goes to FILE.pub.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Enroll a device: generate its key pair, allocate an address from the tenant's pool, make it live in a
    /// running gateway, and print the wg-quick config to import on the device.
    Add {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Tenant id (`[[tenant]] id` in the config).
        #[arg(long)]
        tenant: String,
        /// Device name, unique within the tenant.
        #[arg(long)]
        name: String,
        /// The user the device belongs to.
        #[arg(long)]
        user: String,
        /// Groups of the user, comma separated (used by policy).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// HOST:PORT the device uses to reach the gateway (default: gateway.public_endpoint).
        #[arg(long)]
        endpoint: Option<String>,
        /// Also print the config as a QR code (on stderr) for mobile WireGuard apps.
        #[arg(long)]
        qr: bool,
        /// SSH public key(s) of the device's user, in authorized_keys syntax (an id_*.pub file, or several
        /// lines): what `ssh_auth = "publickey"` rules accept from this device. Repeatable.
        #[arg(long = "ssh-key", value_name = "FILE")]
        ssh_keys: Vec<PathBuf>,
    },
    /// List devices (configured and enrolled) with their live tunnel state when the gateway runs.
    List {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a device's client config again (for example after the tenant's off-ramp networks changed). The
    /// private key is not kept by the gateway, so the printed config has a placeholder for it.
    Config {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        /// HOST:PORT the device uses to reach the gateway (default: gateway.public_endpoint).
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Approve a device that enrolled with a `--pending` token: it gets its tunnel at once.
    Approve {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        /// Device name (or its id, dev_...).
        #[arg(long)]
        name: String,
    },
    /// Remove an enrolled device; a running gateway cuts its tunnel at once.
    Remove {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
    },
}

pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            enroll_listen,
            user,
        } => init(&dir, enroll_listen, user.as_deref()),
        Command::Run { config } => crate::daemon::run(&config),
        Command::CheckConfig { config } => {
            let c = load(&config)?;
            println!(
                "{}: ok ({} tenants, {} devices)",
                config.display(),
                c.tenants.len(),
                c.device_count()
            );
            Ok(())
        }
        Command::Reload { config } => {
            let c = load(&config)?;
            match control::request(&c.gateway.state_dir, &Request::Reload)? {
                Some(r) if r.ok => {
                    println!("{}", r.message);
                    Ok(())
                }
                Some(r) => bail!("{}", r.message),
                None => bail!(
                    "no gateway is running with state_dir {}",
                    c.gateway.state_dir.display()
                ),
            }
        }
        Command::Keygen => {
            let k = PrivateKey::generate();
            println!("{}", k.to_base64());
            eprintln!("public key: {}", k.public_key());
            Ok(())
        }
        Command::Device { command } => match command {
            DeviceCommand::Add {
                config,
                tenant,
                name,
                user,
                groups,
                endpoint,
                qr,
                ssh_keys,
            } => device_add(
                &config, &tenant, &name, &user, groups, &ssh_keys, endpoint, qr,
            ),
            DeviceCommand::List {
                config,
                tenant,
                json,
            } => device_list(&config, tenant.as_deref(), json),
            DeviceCommand::Remove {
                config,
                tenant,
                name,
            } => device_remove(&config, &tenant, &name),
            DeviceCommand::Config {
                config,
                tenant,
                name,
                endpoint,
            } => device_config(&config, &tenant, &name, endpoint),
            DeviceCommand::Approve {
                config,
                tenant,
                name,
            } => token::device_approve(&config, &tenant, &name),
        },
        Command::Token { command } => token::run(command),
        Command::Admin { command } => admin::run(command),
        Command::Enroll(args) => enroll::run(args),
        Command::Audit { command } => match command {
            AuditCommand::Flows {
                config,
                tenant,
                user,
                device,
                dst,
                since,
                limit,
                json,
                fleet,
                node,
            } => {
                if fleet {
                    if dst.is_some() {
                        anyhow::bail!("--dst is not supported with --fleet yet");
                    }
                    audit::audit_flows_fleet(
                        &config, node, tenant, user, device, since, limit, json,
                    )
                } else {
                    audit_flows(&config, tenant, user, device, dst, since, limit, json)
                }
            }
            AuditCommand::Keygen { out } => audit_keygen(&out),
            AuditCommand::Admin {
                config,
                since,
                limit,
                json,
            } => admin::audit_admin(&config, since, limit, json),
            AuditCommand::Ssh { command } => audit_ssh::run(command),
            AuditCommand::Verify {
                config,
                pubkey,
                head,
                json,
                fleet,
            } => {
                if fleet {
                    audit::verify_fleet(&config, json)
                } else {
                    audit_ssh::verify(&config, pubkey.as_deref(), head.as_deref(), json)
                }
            }
            AuditCommand::Enroll {
                config,
                tenant,
                device,
                event,
                since,
                limit,
                json,
                fleet,
                node,
            } => {
                if fleet {
                    let filter = crate::fleet::review::FleetEnrollFilter {
                        node,
                        tenant,
                        device,
                        event,
                        since_ms: None,
                        limit,
                    };
                    audit::audit_enroll_fleet(&config, filter, since, json)
                } else {
                    token::audit_enroll(&config, tenant, device, event, since, limit, json)
                }
            }
            AuditCommand::Http {
                config,
                tenant,
                user,
                host,
                flow,
                since,
                limit,
                json,
                fleet,
                node,
            } => {
                if fleet {
                    let filter = crate::fleet::review::FleetHttpFilter {
                        node,
                        tenant,
                        user,
                        host,
                        flow_id: flow,
                        limit,
                        ..Default::default()
                    };
                    audit::audit_http_fleet(&config, filter, since, json)
                } else {
                    audit_http(&config, tenant, user, host, flow, since, limit, json)
                }
            }
        },
        Command::Ca { command } => match command {
            CaCommand::Init {
                config,
                tenant,
                tls,
            } => ca_init(&config, &tenant, tls),
        },
        Command::Fleet { command } => fleet::run(command),
        Command::System { command } => crate::system::run(command),
        #[cfg(feature = "test-hooks")]
        Command::Debug(DebugCommand::StallDatapath { config, secs }) => {
            let c = load(&config)?;
            match control::request(&c.gateway.state_dir, &Request::DebugStall { secs })? {
                Some(r) if r.ok => {
                    println!("{}", r.message);
                    Ok(())
                }
                Some(r) => bail!("{}", r.message),
                None => bail!("no gateway is running"),
            }
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    let c = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::sandbox::act_as_state_owner(&c)?;
    Ok(c)
}

/// The starter config's commented-out enrollment listener line (`init --enroll-listen` turns it on).
const ENROLL_LISTEN_LINE: &str = "# enroll_listen = \"0.0.0.0:8443\"";
/// The starter config's commented-out gateway user line (`init --user` turns it on).
const USER_LINE: &str = "# user = \"rampart\"";

fn init(
    dir: &Path,
    enroll_listen: Option<std::net::SocketAddr>,
    user: Option<&str>,
) -> anyhow::Result<()> {
    // The user must exist before anything is written (the config would otherwise name a user `run` refuses).
    let owner = match user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .with_context(|| format!("--user {name}: cannot look the user up"))?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--user {name}: no such user; create it \
                         (`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`) or leave --user out"
                    )
                })?,
        ),
        None => None,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg_path = dir.join("gateway.toml");
    if cfg_path.exists() {
        eprintln!("{} exists; keeping it", cfg_path.display());
    } else {
        // The starter config keeps its key and state next to itself, so the directory is self-contained.
        let mut text = DEFAULT_CONFIG
            .replace(
                "private_key_file = \"/var/lib/rampart/gateway.key\"",
                "private_key_file = \"gateway.key\"",
            )
            .replace("state_dir = \"/var/lib/rampart\"", "state_dir = \"state\"");
        if let Some(addr) = enroll_listen {
            anyhow::ensure!(
                text.contains(ENROLL_LISTEN_LINE),
                "the embedded starter config lacks the line {ENROLL_LISTEN_LINE:?} that --enroll-listen turns on"
            );
            text = text.replace(ENROLL_LISTEN_LINE, &format!("enroll_listen = \"{addr}\""));
        }
        if let Some(u) = &owner {
            anyhow::ensure!(
                text.contains(USER_LINE),
                "the embedded starter config lacks the line {USER_LINE:?} that --user turns on"
            );
            text = text.replace(USER_LINE, &format!("user = \"{}\"", u.name));
        }
        std::fs::write(&cfg_path, text)
            .with_context(|| format!("cannot write {}", cfg_path.display()))?;
        if let Some(u) = &owner {
            // root owns the config; the gateway's group reads it (reloads re-read it after the drop).
            std::os::unix::fs::chown(&cfg_path, None, Some(u.gid.as_raw())).with_context(|| {
                format!("cannot give {} to group of {}", cfg_path.display(), u.name)
            })?;
            std::fs::set_permissions(
                &cfg_path,
                <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o640),
            )
            .with_context(|| format!("cannot chmod 640 {}", cfg_path.display()))?;
        }
        eprintln!("wrote {}", cfg_path.display());
    }
    let cfg = load(&cfg_path)?;
    let key_path = &cfg.gateway.private_key_file;
    if key_path.exists() {
        eprintln!("{} exists; keeping it", key_path.display());
    } else {
        let k = PrivateKey::generate();
        k.write_new_file(key_path)
            .with_context(|| format!("cannot write {}", key_path.display()))?;
        eprintln!(
            "wrote {} (public key {})",
            key_path.display(),
            k.public_key()
        );
    }
    std::fs::create_dir_all(&cfg.gateway.state_dir)?;
    let tenant = cfg
        .tenants
        .first()
        .map(|t| t.id.to_string())
        .unwrap_or_else(|| "<tenant>".into());
    println!(
        "next:\n  rampart run -c {cfg}\n  rampart device add -c {cfg} --tenant {tenant} --name laptop --user alice@example.com --endpoint <this-host>:{port}",
        cfg = cfg_path.display(),
        port = cfg.gateway.listen.port()
    );
    if let Some(l) = cfg.enroll.listen {
        println!(
            "  rampart token create -c {cfg} --tenant {tenant} --host <this-host>:{port}   (devices enroll themselves; `rampart token pin` shows the pin)",
            cfg = cfg_path.display(),
            port = l.port()
        );
    }
    Ok(())
}

fn unix_now() -> u64 {
    crate::clock::unix_secs()
}

fn tenant_or_bail<'a>(cfg: &'a Config, id: &str) -> anyhow::Result<&'a crate::config::Tenant> {
    cfg.tenant(id).ok_or_else(|| {
        let known: Vec<&str> = cfg.tenants.iter().map(|t| t.id.as_str()).collect();
        anyhow::anyhow!(
            "no tenant with id {id:?} in {}; configured tenants: {}",
            cfg.source.display(),
            known.join(", ")
        )
    })
}

/// Tells a running gateway to reload; reports what happened on stderr.
fn notify_gateway(cfg: &Config) -> anyhow::Result<()> {
    match control::request(&cfg.gateway.state_dir, &Request::Reload)? {
        Some(r) if r.ok => eprintln!("running gateway updated: {}", r.message),
        Some(r) => bail!("the running gateway rejected the change: {}", r.message),
        None => eprintln!("no running gateway found; the change applies when it starts"),
    }
    Ok(())
}

fn ca_init(config: &Path, tenant: &str, tls: bool) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let t = tenant_or_bail(&cfg, tenant)?;
    if !tls {
        return audit_ssh::ssh_ca_init(&cfg, t.id.as_str());
    }
    let r = crate::http::tls::ca_init(&cfg.gateway.state_dir, t.id.as_str())?;
    if r.created {
        eprintln!("created the TLS inspection CA of tenant {}", t.id);
    } else {
        eprintln!(
            "the TLS inspection CA of tenant {} exists; keeping it",
            t.id
        );
    }
    if !t.http.tls_decrypt {
        eprintln!(
            "note: tenant {} does not decrypt yet; set `tls_decrypt = true` on its [[tenant]] and reload",
            t.id
        );
    }
    eprintln!("install this certificate as trusted on the tenant's devices:");
    println!("{}", r.cert_path.display());
    Ok(())
}
