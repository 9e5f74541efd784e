//! Command-line interface: clap definitions and the glue that calls into the modules. No logic of its own.
#![deny(unsafe_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::config::{Config, DeviceName, DeviceOrigin, TenantId, UserName, DEFAULT_CONFIG};
use crate::control::{self, Request};
use crate::enroll::{allocate_address, ClientConfig};
use crate::keys::PrivateKey;
use crate::registry::{EnrolledDevice, Registry};

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
    /// Appliance slots and updates.
    System {
        #[command(subcommand)]
        command: crate::system::SystemCommand,
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
    },
    /// SSH sessions seen by the SSH inspector (`inspect_ssh` flows): list, show, replay, search, export.
    Ssh {
        #[command(subcommand)]
        command: crate::audit::ssh_cli::SshCommand,
    },
    /// Check that the SSH audit records and recordings are unaltered: the hash chain, each recording's sha256
    /// and the signed checkpoints. Reports the first break and exits non-zero.
    Verify {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
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
        Command::Init { dir } => init(&dir),
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
            } => device_add(&config, &tenant, &name, &user, groups, endpoint, qr),
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
        },
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
            } => audit_flows(&config, tenant, user, device, dst, since, limit, json),
            AuditCommand::Keygen { out } => audit_keygen(&out),
            AuditCommand::Ssh { command } => crate::audit::ssh_cli::run(command),
            AuditCommand::Verify { config } => crate::audit::ssh_cli::verify(&config),
            AuditCommand::Http {
                config,
                tenant,
                user,
                host,
                flow,
                since,
                limit,
                json,
            } => audit_http(&config, tenant, user, host, flow, since, limit, json),
        },
        Command::Ca { command } => match command {
            CaCommand::Init {
                config,
                tenant,
                tls,
            } => ca_init(&config, &tenant, tls),
        },
        Command::System { command } => crate::system::run(command),
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn init(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cfg_path = dir.join("gateway.toml");
    if cfg_path.exists() {
        eprintln!("{} exists; keeping it", cfg_path.display());
    } else {
        // The starter config keeps its key and state next to itself, so the directory is self-contained.
        let text = DEFAULT_CONFIG
            .replace(
                "private_key_file = \"/var/lib/rampart/gateway.key\"",
                "private_key_file = \"gateway.key\"",
            )
            .replace("state_dir = \"/var/lib/rampart\"", "state_dir = \"state\"");
        std::fs::write(&cfg_path, text)
            .with_context(|| format!("cannot write {}", cfg_path.display()))?;
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
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

fn device_add(
    config: &Path,
    tenant: &str,
    name: &str,
    user: &str,
    groups: Vec<String>,
    endpoint: Option<String>,
    qr: bool,
) -> anyhow::Result<()> {
    let name = DeviceName::parse(name).map_err(|m| anyhow::anyhow!("--name: {m}"))?;
    let user = UserName::parse(user).map_err(|m| anyhow::anyhow!("--user: {m}"))?;
    let pre = load(config)?;
    let endpoint = client_endpoint(&pre, endpoint)?;
    let gateway_key = PrivateKey::read_file(&pre.gateway.private_key_file)
        .or_else(|_| {
            // First use before the gateway ever ran: create the key it will use.
            let k = PrivateKey::generate();
            k.write_new_file(&pre.gateway.private_key_file)?;
            Ok::<_, anyhow::Error>(k)
        })
        .with_context(|| {
            format!(
                "cannot read or create {}",
                pre.gateway.private_key_file.display()
            )
        })?
        .public_key();

    let registry = Registry::open(&pre.gateway.state_dir);
    let lock = registry.lock()?;
    // Re-read under the lock so concurrent enrollments see each other.
    let cfg = load(config)?;
    let t = tenant_or_bail(&cfg, tenant)?;
    if let Some(d) = t.devices.iter().find(|d| d.name == name) {
        bail!("device {:?} already exists in tenant {} (address {}); choose another --name or remove it first", name.as_str(), t.id, d.address);
    }
    let Some(address) = allocate_address(t) else {
        bail!(
            "address pool {} of tenant {} is full ({} devices); widen address_pool in {} or remove unused devices",
            t.address_pool,
            t.id,
            t.devices.len(),
            config.display()
        );
    };
    let key = PrivateKey::generate();
    let mut devices = registry.load()?;
    devices.push(EnrolledDevice {
        tenant: t.id.clone(),
        name: name.clone(),
        public_key: key.public_key(),
        address,
        user,
        groups,
        enrolled_at: unix_now(),
    });
    registry.store(&lock, &devices)?;
    drop(lock);
    eprintln!(
        "enrolled device {} in tenant {} with address {address}",
        name.as_str(),
        t.id
    );
    let text = ClientConfig {
        tenant: t,
        device_name: name.as_str(),
        private_key: Some(&key),
        address,
        gateway_key,
        endpoint: &endpoint,
    }
    .render();
    notify_gateway(&cfg)?;
    std::io::stdout().write_all(text.as_bytes())?;
    if qr {
        let code =
            qrcode::QrCode::new(text.as_bytes()).context("config too large for a QR code")?;
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        eprintln!("{art}");
    }
    Ok(())
}

/// The Endpoint printed into client configs: `--endpoint`, else `gateway.public_endpoint`, else a specific
/// listen address.
fn client_endpoint(cfg: &Config, endpoint: Option<String>) -> anyhow::Result<String> {
    match endpoint.or_else(|| cfg.gateway.public_endpoint.clone()) {
        Some(e) => Ok(e),
        None if !cfg.gateway.listen.ip().is_unspecified() => Ok(cfg.gateway.listen.to_string()),
        None => bail!(
            "no endpoint known for client configs: pass --endpoint HOST:PORT (the address devices reach this gateway at), \
             or set gateway.public_endpoint in {}",
            cfg.source.display()
        ),
    }
}

fn device_config(
    config: &Path,
    tenant: &str,
    name: &str,
    endpoint: Option<String>,
) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let t = tenant_or_bail(&cfg, tenant)?;
    let Some(d) = t.devices.iter().find(|d| d.name.as_str() == name) else {
        bail!(
            "no device {name:?} in tenant {}; see `rampart device list -c {}`",
            t.id,
            config.display()
        );
    };
    let endpoint = client_endpoint(&cfg, endpoint)?;
    let gateway_key = PrivateKey::read_file(&cfg.gateway.private_key_file)?.public_key();
    let text = ClientConfig {
        tenant: t,
        device_name: name,
        private_key: None,
        address: d.address,
        gateway_key,
        endpoint: &endpoint,
    }
    .render();
    eprintln!("the gateway does not keep device private keys: keep the PrivateKey line of the device's current config");
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn device_list(config: &Path, tenant: Option<&str>, json: bool) -> anyhow::Result<()> {
    let cfg = load(config)?;
    if let Some(t) = tenant {
        tenant_or_bail(&cfg, t)?;
    }
    let live = control::request(&cfg.gateway.state_dir, &Request::Status)
        .ok()
        .flatten()
        .map(|r| r.peers)
        .unwrap_or_default();
    let mut rows = Vec::new();
    for t in cfg
        .tenants
        .iter()
        .filter(|t| tenant.is_none_or(|id| t.id.as_str() == id))
    {
        for d in &t.devices {
            let key = d.public_key.to_string();
            let st = live.iter().find(|p| p.public_key == key);
            rows.push(serde_json::json!({
                "tenant": t.id,
                "name": d.name,
                "address": d.address,
                "user": d.user,
                "groups": d.groups,
                "public_key": key,
                "origin": d.origin,
                "endpoint": st.and_then(|s| s.endpoint.clone()),
                "last_handshake_secs": st.and_then(|s| s.last_handshake_secs),
                "rx_bytes": st.map(|s| s.rx_bytes),
                "tx_bytes": st.map(|s| s.tx_bytes),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<20} {:<16} {:<24} {:<10} {:<9} HANDSHAKE",
        "TENANT", "NAME", "ADDRESS", "USER", "GROUPS", "ORIGIN"
    );
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let groups: Vec<&str> = r["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g.as_str())
            .collect();
        let hs = match r["last_handshake_secs"].as_u64() {
            Some(s) => format!("{s}s ago"),
            None => "never".into(),
        };
        println!(
            "{:<12} {:<20} {:<16} {:<24} {:<10} {:<9} {hs}",
            s("tenant"),
            s("name"),
            s("address"),
            s("user"),
            groups.join(","),
            s("origin")
        );
    }
    Ok(())
}

fn device_remove(config: &Path, tenant: &str, name: &str) -> anyhow::Result<()> {
    let pre = load(config)?;
    let t = tenant_or_bail(&pre, tenant)?;
    let tenant_id: TenantId = t.id.clone();
    match t.devices.iter().find(|d| d.name.as_str() == name) {
        None => bail!("no device {name:?} in tenant {tenant_id}; see `rampart device list -c {}`", config.display()),
        Some(d) if d.origin == DeviceOrigin::Config => bail!(
            "device {name:?} is declared in {}; delete its [[tenant.device]] entry there and run `rampart reload -c {}`",
            config.display(),
            config.display()
        ),
        Some(_) => {}
    }
    let registry = Registry::open(&pre.gateway.state_dir);
    let lock = registry.lock()?;
    let mut devices = registry.load()?;
    let before = devices.len();
    devices.retain(|d| !(d.tenant == tenant_id && d.name.as_str() == name));
    if devices.len() == before {
        bail!("device {name:?} in tenant {tenant_id} was removed concurrently");
    }
    registry.store(&lock, &devices)?;
    drop(lock);
    eprintln!("removed device {name} from tenant {tenant_id}");
    notify_gateway(&pre)
}

#[allow(clippy::too_many_arguments)]
fn audit_flows(
    config: &Path,
    tenant: Option<String>,
    user: Option<String>,
    device: Option<String>,
    dst: Option<String>,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use crate::audit::store::{FlowFilter, Store};
    use crate::audit::time::format_ms;
    let cfg = load(config)?;
    let path = crate::audit::existing_store(&cfg)?;
    let now_ms = unix_now() as i64 * 1000;
    let dst = dst
        .map(|d| {
            d.parse::<ipnet::IpNet>()
                .or_else(|_| d.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        })
        .transpose()
        .map_err(|_| anyhow::anyhow!("--dst: not a CIDR or address; write it like 10.1.0.0/16"))?;
    let since_ms = crate::audit::time::since_arg(since, now_ms)?;
    let store = Store::open_readonly(path)
        .with_context(|| format!("cannot open the audit store {}", path.display()))?;
    let rows = store.flows(&FlowFilter {
        tenant,
        user,
        device,
        dst,
        since_ms,
        limit,
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<10} {:<14} {:<14} {:<5} {:<44} {:<7} {:<16} {:>16} {:>16}  END",
        "STARTED",
        "TENANT",
        "USER",
        "DEVICE",
        "PROTO",
        "FLOW",
        "ACTION",
        "RULE",
        "OUT pkts/bytes",
        "IN pkts/bytes"
    )?;
    for r in &rows {
        let proto = match r.protocol {
            1 | 58 => "icmp".to_string(),
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            p => p.to_string(),
        };
        let flow = format!("{}:{} -> {}:{}", r.src, r.sport, r.dst, r.dport);
        let end = match (&r.end_reason, r.ended_ms) {
            (Some(reason), Some(ms)) => {
                format!("{reason} after {:.1}s", (ms - r.started_ms) as f64 / 1000.0)
            }
            _ => "open".to_string(),
        };
        writeln!(
            out,
            "{:<24} {:<10} {:<14} {:<14} {:<5} {:<44} {:<7} {:<16} {:>16} {:>16}  {end}",
            format_ms(r.started_ms),
            r.tenant,
            r.user,
            r.device,
            proto,
            flow,
            r.action,
            r.rule,
            format!("{}/{}", r.packets_out, r.bytes_out),
            format!("{}/{}", r.packets_in, r.bytes_in),
        )?;
    }
    Ok(())
}

fn audit_keygen(out: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let (private, public) = crate::audit::capture::audit_keygen()?;
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (it must not exist yet)", out.display()))?;
    // No trailing newline: the exact format ssh-log-cli writes and reads.
    f.write_all(private.as_bytes())?;
    f.sync_all()?;
    std::fs::write(&pub_path, public.as_bytes())
        .with_context(|| format!("cannot write {}", pub_path.display()))?;
    eprintln!(
        "private key: {} (keep it off the gateway)\npublic key:  {}",
        out.display(),
        pub_path.display()
    );
    println!("audit_recipient = \"{public}\"");
    Ok(())
}

fn ca_init(config: &Path, tenant: &str, tls: bool) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let t = tenant_or_bail(&cfg, tenant)?;
    if !tls {
        return crate::audit::ssh_cli::ssh_ca_init(&cfg, t.id.as_str());
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

#[allow(clippy::too_many_arguments)]
fn audit_http(
    config: &Path,
    tenant: Option<String>,
    user: Option<String>,
    host: Option<String>,
    flow_id: Option<i64>,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use crate::audit::http_records::{query, HttpFilter};
    use crate::audit::time::format_ms;
    let cfg = load(config)?;
    let path = crate::audit::existing_store(&cfg)?;
    let now_ms = unix_now() as i64 * 1000;
    let since_ms = crate::audit::time::since_arg(since, now_ms)?;
    let rows = query(
        path,
        &HttpFilter {
            tenant,
            user,
            host,
            flow_id,
            since_ms,
            limit,
        },
    )
    .with_context(|| format!("cannot read HTTP records from {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<10} {:<14} {:<14} {:<7} {:<28} {:<32} {:>6} {:>10} {:>10} {:>7}  {:<11} {:<16} {:<12} FLOW",
        "TIME", "TENANT", "USER", "DEVICE", "METHOD", "HOST", "PATH", "STATUS", "UP", "DOWN", "MS", "DECISION",
        "RULE", "REF"
    )?;
    for r in &rows {
        let rec = &r.record;
        writeln!(
            out,
            "{:<24} {:<10} {:<14} {:<14} {:<7} {:<28} {:<32} {:>6} {:>10} {:>10} {:>7}  {:<11} {:<16} {:<12} {}",
            format_ms(rec.at_ms),
            rec.tenant,
            rec.user,
            rec.device,
            rec.method,
            rec.host,
            rec.path,
            rec.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            rec.req_bytes,
            rec.resp_bytes,
            rec.duration_ms,
            rec.decision,
            rec.rule.as_deref().unwrap_or("-"),
            if rec.ref_id.is_empty() { "-" } else { &rec.ref_id },
            r.flow_id
                .map(|f| f.to_string())
                .unwrap_or_else(|| format!("seq {}", rec.flow_seq)),
        )?;
    }
    Ok(())
}
