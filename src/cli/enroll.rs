//! `rampart enroll`: the device side of self-enrollment. Glue around `enroll::client`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;

use crate::enroll::api::ErrorCode;
use crate::enroll::client::{self, ClientError, EnrollOptions, EnrollUrl, Headless, Refreshed};

/// Where `rampart enroll` looks for its headless settings when given no URL.
pub const HEADLESS_FILE: &str = "/etc/rampart/enroll.toml";
const DEFAULT_OUT: &str = "/etc/wireguard/rampart.conf";

#[derive(Args, Debug)]
pub struct EnrollArgs {
    /// The enrollment URL the admin gave you: rampart://HOST:PORT/?pin=sha256:... (without it, the settings
    /// of --config are used).
    pub url: Option<String>,
    /// File holding the enrollment token (rpe1_...). Or set RAMPART_ENROLL_TOKEN. A token inside the URL works
    /// too, but other local users can read command lines.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where to write the wg-quick config (mode 0600); `-` for stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Device name (default: this host's name).
    #[arg(long)]
    pub name: Option<String>,
    /// A stable id of this machine (MDM serial): enrolling again with it replaces the key of the same device.
    #[arg(long)]
    pub device_id: Option<String>,
    /// Also print the config as a QR code (on stderr) for a phone's WireGuard app.
    #[arg(long)]
    pub qr: bool,
    /// Fetch the current config for the device of --out and rewrite the file if it changed.
    #[arg(long, conflicts_with_all = ["rotate", "leave"])]
    pub refresh: bool,
    /// Make a new key pair for the device of --out (same device and address) and rewrite the file.
    #[arg(long, conflicts_with = "leave")]
    pub rotate: bool,
    /// Remove the device of --out from the gateway, and the file.
    #[arg(long)]
    pub leave: bool,
    /// Keep the device of --out connected (failover Mode A, for a fleet of gateways): refresh the file every
    /// --interval and apply changes to --interface; when its gateway node is gone (--api-failures failed
    /// refreshes in a row, or no handshake for --handshake-timeout), move it to the next live node the file
    /// lists and apply that with `wg syncconf`. Runs until stopped.
    #[arg(long, conflicts_with_all = ["refresh", "rotate", "leave"], requires = "interface")]
    pub watch: bool,
    /// The WireGuard interface the file configures (for --watch).
    #[arg(long)]
    pub interface: Option<String>,
    /// Seconds between two looks of --watch.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// --watch: seconds without a handshake after which the node counts as gone (WireGuard's reject-after
    /// time by default; a working tunnel with PersistentKeepalive handshakes at least every two minutes).
    #[arg(long, default_value_t = 180, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout: u64,
    /// --watch: failed refreshes in a row after which the node counts as gone.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub api_failures: u32,
    /// Headless settings (url, pin, token_file, device_id, name, out), used when no URL is given.
    #[arg(long, default_value = HEADLESS_FILE)]
    pub config: PathBuf,
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    Ok(t.trim().to_string())
}

fn write_out(out: &Path, text: &str, qr: bool) -> anyhow::Result<()> {
    if out == Path::new("-") {
        std::io::stdout().write_all(text.as_bytes())?;
    } else {
        client::write_private(out, text)?;
    }
    if qr {
        // Only what a WireGuard app imports: no comment lines (they hold the device token).
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let code =
            qrcode::QrCode::new(body.as_bytes()).context("config too large for a QR code")?;
        let art = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build();
        eprintln!("{art}");
    }
    Ok(())
}

pub(super) fn run(a: EnrollArgs) -> anyhow::Result<()> {
    let env_token = std::env::var("RAMPART_ENROLL_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let maintain = a.refresh || a.rotate || a.leave || a.watch;
    let headless = match &a.url {
        Some(_) => None,
        // Maintenance only needs the file's `out`, when there is a headless file at all.
        None if maintain && !a.config.exists() => None,
        None => Some(Headless::load(&a.config).map_err(|e| {
            anyhow::anyhow!("{e}\nno enrollment URL given and no headless settings: run `rampart enroll URL --token-file FILE`")
        })?),
    };
    let out = a
        .out
        .clone()
        .or_else(|| headless.as_ref().and_then(|h| h.out.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OUT));

    if maintain {
        if out == Path::new("-") {
            bail!(
                "--refresh, --rotate, --leave and --watch work on a config file: pass --out FILE"
            );
        }
        if a.watch {
            let settings = crate::enroll::failover::WatchSettings {
                interface: a.interface.clone().unwrap_or_default(),
                interval: std::time::Duration::from_secs(a.interval),
                handshake_timeout: std::time::Duration::from_secs(a.handshake_timeout),
                api_failures: a.api_failures,
            };
            eprintln!(
                "rampart enroll --watch: keeping {} current on {} (every {}s)",
                out.display(),
                settings.interface,
                a.interval
            );
            crate::enroll::failover::Watcher::new(&out, settings).run()?;
        } else if a.leave {
            client::leave(&out)?;
            eprintln!("left the gateway; removed {}", out.display());
        } else if a.rotate {
            let r = client::rotate(&out)?;
            eprintln!(
                "new key for device {} ({}); wrote {} (apply it: wg syncconf or wg-quick down/up)",
                r.device.name,
                r.device.id,
                out.display()
            );
        } else {
            refresh(&out)?;
        }
        return Ok(());
    }

    // Headless (MDM): a device that enrolled before refreshes; if the gateway forgot it, it enrolls again
    // (same device_id: the same device, with a new key).
    if let Some(h) = &headless {
        if out.exists() {
            match client::refresh(&out) {
                Ok(r) => {
                    report_refresh(&out, &r);
                    return Ok(());
                }
                Err(ClientError::Api { error, .. })
                    if error.error == ErrorCode::DeviceTokenInvalid =>
                {
                    eprintln!("the gateway does not know this device any more; enrolling again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let url = h.url()?;
        let token = read_token(&h.token_file)?;
        let opts = EnrollOptions {
            name: a.name.clone().or(h.name.clone()),
            hostname: hostname(),
            device_id: a.device_id.clone().or(h.device_id.clone()),
        };
        return finish(client::enroll(&url, &token, &opts)?, &out, a.qr);
    }

    let mut url = EnrollUrl::parse(a.url.as_deref().unwrap_or_default())?;
    let in_url = url.token.take();
    let token = match (&a.token_file, env_token, in_url) {
        (Some(f), _, _) => read_token(f)?,
        (None, Some(t), _) => t,
        (None, None, Some(t)) => {
            eprintln!(
                "rampart: warning: the enrollment token is on the command line, where other local users can \
                 read it (ps, shell history); prefer --token-file FILE or RAMPART_ENROLL_TOKEN"
            );
            t
        }
        (None, None, None) => bail!(
            "no enrollment token: pass --token-file FILE or set RAMPART_ENROLL_TOKEN (the admin's `rampart token create` printed it)"
        ),
    };
    let opts = EnrollOptions {
        name: a.name.clone(),
        hostname: hostname(),
        device_id: a.device_id.clone(),
    };
    finish(client::enroll(&url, &token, &opts)?, &out, a.qr)
}

fn finish(e: client::Enrollment, out: &Path, qr: bool) -> anyhow::Result<()> {
    write_out(out, &e.text, qr)?;
    let d = &e.reply.device;
    let addr: Vec<String> = e
        .reply
        .interface
        .addresses
        .iter()
        .map(|a| a.to_string())
        .collect();
    eprintln!(
        "enrolled device {} ({}) in tenant {} with address {}",
        d.name,
        d.id,
        d.tenant,
        addr.join(", ")
    );
    if out != Path::new("-") {
        eprintln!(
            "wrote {} (mode 0600); bring it up with `wg-quick up {}`, keep it current with `rampart enroll --refresh --out {}`",
            out.display(),
            out.display(),
            out.display()
        );
    }
    if client::is_pending(&e.reply) {
        eprintln!("the device waits for an admin's approval (`rampart device approve`); the tunnel works once approved");
    }
    Ok(())
}

fn report_refresh(out: &Path, r: &Refreshed) {
    match r {
        Refreshed::Unchanged => eprintln!("{} is up to date", out.display()),
        Refreshed::Updated(reply) => {
            let nets: Vec<String> = reply
                .peers
                .iter()
                .flat_map(|p| &p.allowed_ips)
                .map(|n| n.to_string())
                .collect();
            eprintln!(
                "updated {} (AllowedIPs {}); apply it with `wg syncconf` or wg-quick down/up",
                out.display(),
                nets.join(", ")
            );
        }
    }
}

fn refresh(out: &Path) -> anyhow::Result<()> {
    let r = client::refresh(out)?;
    report_refresh(out, &r);
    Ok(())
}
