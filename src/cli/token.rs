//! `rampart token ...` (enrollment tokens), `rampart device approve` and `rampart audit enroll`: glue around
//! `enroll::admin`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;

use super::{load, notify_gateway, DEFAULT_CONFIG_PATH};
use crate::config::UserName;
use crate::enroll::admin::{self, TokenRequest};
use crate::enroll::audit::AuditLog;
use crate::enroll::secret::{masked, Kind};

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Mint an enrollment token. Its secret is printed once (only its hash is kept) with the enrollment URL,
    /// the certificate pin for `rampart enroll` and the SPKI pin for `curl --pinnedpubkey`.
    Create {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Tenant the devices join.
        #[arg(long)]
        tenant: String,
        /// User the devices belong to (default: `token-<id>`).
        #[arg(long)]
        user: Option<String>,
        /// Groups of the devices, comma separated (used by policy).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// How many devices it may enroll.
        #[arg(long, default_value_t = 1, conflicts_with = "reusable")]
        uses: u32,
        /// No limit on the number of devices (pair with --pending or low-privilege --groups: tokens leak).
        #[arg(long)]
        reusable: bool,
        /// Lifetime: 30m, 24h, 7d (at most 90d).
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Remove its devices after this long without being seen (e.g. 10m for CI runners).
        #[arg(long)]
        ephemeral: Option<String>,
        /// Devices wait for `rampart device approve` before they get any traffic.
        #[arg(long)]
        pending: bool,
        /// Free text kept with the token.
        #[arg(long, default_value = "")]
        note: String,
        /// HOST[:PORT] devices reach the enrollment listener at (default: [enroll] public_host, or the host of
        /// gateway.public_endpoint with the enroll_listen port).
        #[arg(long)]
        host: Option<String>,
        /// Also print the URL with the token as a QR code (on stderr).
        #[arg(long)]
        qr: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (masked) with their state and use count.
    List {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token (by id or as listed): it enrolls nothing from now on. Devices it enrolled stay; remove
    /// them with `rampart device remove`.
    Revoke {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        id: String,
    },
    /// Print the enrollment listener's pins (minting its certificate if it has none yet).
    Pin {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// The CLI's records go to the spool the running gateway takes them from (one writer for the audit store).
fn spool(cfg: &crate::config::Config) -> AuditLog {
    AuditLog::Spool(cfg.gateway.state_dir.clone())
}

/// Who runs the command, for audit records.
fn actor() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid()))
}

fn parse_duration(what: &str, s: &str) -> anyhow::Result<Duration> {
    let back = crate::clock::parse_since(s, 0)
        .ok()
        .filter(|ms| *ms < 0 && s.trim().ends_with(['s', 'm', 'h', 'd']))
        .ok_or_else(|| {
            anyhow::anyhow!("{what}: {s:?} is not a duration; write it like 30m, 24h or 7d")
        })?;
    Ok(Duration::from_millis((-back) as u64))
}

fn time_text(unix: i64) -> String {
    crate::clock::format_ms(unix * 1000)
}

pub(super) fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            config,
            tenant,
            user,
            groups,
            uses,
            reusable,
            expires,
            ephemeral,
            pending,
            note,
            host,
            qr,
            json,
        } => {
            let cfg = load(&config)?;
            let req = TokenRequest {
                tenant,
                user: user
                    .map(|u| UserName::parse(&u).map_err(|m| anyhow::anyhow!("--user: {m}")))
                    .transpose()?,
                groups,
                max_uses: (!reusable).then_some(uses),
                ttl: parse_duration("--expires", &expires)?,
                ephemeral: ephemeral
                    .map(|e| parse_duration("--ephemeral", &e))
                    .transpose()?,
                preapproved: !pending,
                note,
            };
            let identity = admin::listener_identity(&cfg)?;
            let authority = host.or_else(|| admin::listener_authority(&cfg));
            let new = admin::create_token(
                &cfg,
                shared(&cfg)?.as_ref(),
                req,
                &actor(),
                crate::enroll::unix_now(),
                &spool(&cfg),
            )?;
            let pin = identity.pins.url_pin();
            let url = authority
                .as_deref()
                .map(|a| admin::enrollment_url(a, &pin, None));
            let url_with_token = authority
                .as_deref()
                .map(|a| admin::enrollment_url(a, &pin, Some(&new.token)));
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": new.row.id,
                        "token": new.token,
                        "tenant": new.row.tenant,
                        "max_uses": new.row.max_uses,
                        "expires_at": new.row.expires_at,
                        "preapproved": new.row.preapproved,
                        "ephemeral_secs": new.row.ephemeral_secs,
                        "url": url,
                        "url_with_token": url_with_token,
                        "pin": pin,
                        "curl_pin": identity.pins.curl_pin(),
                    })
                );
            } else {
                let mut o = std::io::stdout().lock();
                writeln!(o, "token   {}", new.token)?;
                writeln!(
                    o,
                    "        shown once: hand it over now (the gateway keeps only its hash)"
                )?;
                writeln!(
                    o,
                    "tenant  {}, {}, expires {}{}{}",
                    new.row.tenant,
                    match new.row.max_uses {
                        Some(1) => "one use".to_string(),
                        Some(n) => format!("{n} uses"),
                        None => "reusable".to_string(),
                    },
                    time_text(new.row.expires_at),
                    if new.row.preapproved {
                        ""
                    } else {
                        ", devices wait for approval"
                    },
                    match new.row.ephemeral_secs {
                        Some(s) => format!(", ephemeral ({s}s)"),
                        None => String::new(),
                    }
                )?;
                match &url {
                    Some(u) => {
                        writeln!(o, "enroll  RAMPART_ENROLL_TOKEN=<token> rampart enroll '{u}'")?;
                        writeln!(o, "        (or put the token in a file and pass --token-file FILE)")?;
                    }
                    None => writeln!(
                        o,
                        "enroll  no listener address known: set gateway.enroll_listen and [enroll] public_host, or pass --host"
                    )?,
                }
                writeln!(o, "pin     {pin}")?;
                writeln!(o, "curl    --pinnedpubkey '{}'", identity.pins.curl_pin())?;
            }
            if qr {
                let Some(u) = &url_with_token else {
                    anyhow::bail!("--qr needs the listener's address: pass --host HOST:PORT");
                };
                let code =
                    qrcode::QrCode::new(u.as_bytes()).context("URL too long for a QR code")?;
                let art = code
                    .render::<qrcode::render::unicode::Dense1x2>()
                    .quiet_zone(true)
                    .build();
                eprintln!("{art}");
            }
            Ok(())
        }
        TokenCommand::List {
            config,
            tenant,
            json,
        } => {
            let cfg = load(&config)?;
            let now = crate::enroll::unix_now();
            let rows = admin::tokens_of(&cfg, shared(&cfg)?.as_ref())?;
            let mut o = std::io::stdout().lock();
            if !json {
                writeln!(
                    o,
                    "{:<28} {:<12} {:<8} {:<7} {:<24} {:<9} {:<12} NOTE",
                    "TOKEN", "TENANT", "STATE", "USED", "EXPIRES", "APPROVAL", "GROUPS"
                )?;
            }
            for t in rows
                .iter()
                .filter(|t| tenant.as_deref().is_none_or(|x| t.tenant.as_str() == x))
            {
                let state = t.state(now).as_str();
                let used = match t.max_uses {
                    Some(m) => format!("{}/{m}", t.used),
                    None => format!("{}", t.used),
                };
                if json {
                    writeln!(
                        o,
                        "{}",
                        serde_json::json!({
                            "id": t.id,
                            "token": masked(Kind::Enrollment, &t.id),
                            "tenant": t.tenant,
                            "state": state,
                            "used": t.used,
                            "max_uses": t.max_uses,
                            "created_at": t.created_at,
                            "expires_at": t.expires_at,
                            "last_used_at": t.last_used_at,
                            "revoked_at": t.revoked_at,
                            "locked_until": t.locked_until,
                            "preapproved": t.preapproved,
                            "ephemeral_secs": t.ephemeral_secs,
                            "groups": t.groups,
                            "user": t.user,
                            "created_by": t.created_by,
                            "note": t.note,
                        })
                    )?;
                } else {
                    writeln!(
                        o,
                        "{:<28} {:<12} {:<8} {:<7} {:<24} {:<9} {:<12} {}",
                        masked(Kind::Enrollment, &t.id),
                        t.tenant,
                        state,
                        used,
                        time_text(t.expires_at),
                        if t.preapproved { "auto" } else { "manual" },
                        t.groups.join(","),
                        t.note
                    )?;
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { config, id } => {
            let cfg = load(&config)?;
            let t = admin::revoke_token(
                &cfg,
                shared(&cfg)?.as_ref(),
                &id,
                &actor(),
                crate::enroll::unix_now(),
                &spool(&cfg),
            )?;
            eprintln!(
                "revoked {} (tenant {}, used {} times); devices it enrolled stay until removed",
                masked(Kind::Enrollment, &t.id),
                t.tenant,
                t.used
            );
            Ok(())
        }
        TokenCommand::Pin { config, json } => {
            let cfg = load(&config)?;
            let identity = admin::listener_identity(&cfg)?;
            let authority = admin::listener_authority(&cfg);
            let pin = identity.pins.url_pin();
            let url = authority
                .as_deref()
                .map(|a| admin::enrollment_url(a, &pin, None));
            if json {
                println!(
                    "{}",
                    serde_json::json!({"pin": pin, "curl_pin": identity.pins.curl_pin(), "url": url, "listen": cfg.enroll.listen})
                );
            } else {
                match cfg.enroll.listen {
                    Some(l) => println!("listener  https://{l}"),
                    None => {
                        println!("listener  off (set gateway.enroll_listen to serve enrollments)")
                    }
                }
                if let Some(u) = url {
                    println!("url       {u}");
                }
                println!("pin       {pin}");
                println!("curl pin  {}", identity.pins.curl_pin());
            }
            Ok(())
        }
    }
}

/// `rampart device approve`.
pub(super) fn device_approve(config: &Path, tenant: &str, name: &str) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let d = admin::approve_device(
        &cfg,
        tenant,
        name,
        &actor(),
        crate::enroll::unix_now(),
        &spool(&cfg),
    )?;
    eprintln!(
        "approved device {} ({}) of tenant {} with address {}",
        d.name,
        d.api_id(),
        d.tenant,
        d.address
    );
    notify_gateway(&cfg)
}

/// `rampart device remove` of a self-enrolled device; false if there is none by that name.
pub(super) fn device_revoke(config: &Path, tenant: &str, name: &str) -> anyhow::Result<bool> {
    let cfg = load(config)?;
    let Some(d) = admin::remove_device(&cfg, tenant, name, &actor(), &spool(&cfg))? else {
        return Ok(false);
    };
    eprintln!(
        "removed device {} ({}) from tenant {}; its device token no longer works",
        d.name,
        d.api_id(),
        d.tenant
    );
    notify_gateway(&cfg)?;
    Ok(true)
}

/// `rampart audit enroll`: the committed records, newest first, after any the gateway has not taken from the
/// spool yet.
#[allow(clippy::too_many_arguments)]
pub(super) fn audit_enroll(
    config: &Path,
    tenant: Option<String>,
    device: Option<String>,
    kind: Option<String>,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use crate::audit::review::enroll::{query, EnrollFilter, EnrollRow};
    use crate::inert_line;
    let cfg = load(config)?;
    let now_ms = crate::enroll::unix_now() * 1000;
    let f = EnrollFilter {
        tenant,
        device,
        event: kind,
        since_ms: crate::clock::since_arg(since, now_ms)?,
        limit,
    };
    let mut rows: Vec<(bool, EnrollRow)> = Vec::new();
    for r in crate::enroll::audit::spooled(&cfg.gateway.state_dir)
        .into_iter()
        .rev()
    {
        let row = EnrollRow {
            seq: 0,
            at_ms: r.at_ms,
            event: r.event.as_str().to_string(),
            actor: r.actor,
            tenant: r.tenant,
            device: r.device,
            device_name: r.device_name,
            token: r.token,
            source: r.source,
            detail: r.detail,
        };
        let keep = f
            .tenant
            .as_ref()
            .is_none_or(|t| row.tenant.as_ref() == Some(t))
            && f.device.as_ref().is_none_or(|d| {
                row.device.as_ref() == Some(d) || row.device_name.as_ref() == Some(d)
            })
            && f.event.as_ref().is_none_or(|e| &row.event == e)
            && f.since_ms.is_none_or(|s| row.at_ms >= s);
        if keep {
            rows.push((true, row));
        }
    }
    if cfg.audit.path.exists() {
        let path = cfg.audit.path.as_path();
        let stored = query(path, &f)
            .with_context(|| format!("cannot read enrollment records from {}", path.display()))?;
        rows.extend(stored.into_iter().map(|r| (false, r)));
    }
    rows.truncate(limit);
    let mut o = std::io::stdout().lock();
    if json {
        for (spooled, r) in &rows {
            let mut v = serde_json::to_value(r)?;
            v["spooled"] = serde_json::Value::Bool(*spooled);
            writeln!(o, "{v}")?;
        }
        return Ok(());
    }
    writeln!(
        o,
        "{:<24} {:<22} {:<10} {:<20} {:<16} {:<14} {:<16} DETAIL",
        "TIME", "EVENT", "TENANT", "DEVICE", "TOKEN", "ACTOR", "SOURCE"
    )?;
    for (spooled, r) in &rows {
        inert_line!(
            o,
            "{:<24} {:<22} {:<10} {:<20} {:<16} {:<14} {:<16} {}{}",
            crate::clock::format_ms(r.at_ms),
            r.event,
            r.tenant.as_deref().unwrap_or("-"),
            r.device_name.as_deref().unwrap_or("-"),
            r.token.as_deref().unwrap_or("-"),
            r.actor,
            r.source.as_deref().unwrap_or("-"),
            r.detail,
            if *spooled {
                "  (spooled: the gateway has not taken it yet)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// With `[fleet]`, the fleet's shared tokens (reads the PostgreSQL password file).
fn shared(
    cfg: &crate::config::Config,
) -> anyhow::Result<Option<crate::fleet::enrollment::SharedEnrollment>> {
    crate::fleet::enrollment::SharedEnrollment::from_config(cfg)
}
