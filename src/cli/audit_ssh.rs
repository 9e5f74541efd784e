//! `rampart audit ssh …` and `rampart audit verify`: argument definitions and output. The queries, rendering
//! and verification are in `audit::review`.
#![deny(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;

use crate::audit::capture::{Header, ReviewerKey};
use crate::audit::review::ssh::{self as ssh_review, CastMeta, SessionFilter, SshLog};
use crate::audit::review::verify;
use crate::audit::ssh_records::SshEvent;
use crate::clock::format_ms;
use crate::config::Config;

const DEFAULT_CONFIG_PATH: &str = "/etc/rampart/gateway.toml";

#[derive(clap::Subcommand, Debug)]
pub enum SshCommand {
    /// SSH sessions, newest first: who, from which device, to which target as which login, how it ended.
    Sessions {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Target address (`10.0.0.5`) or address and port (`10.0.0.5:22`).
        #[arg(long)]
        target: Option<String>,
        /// Only sessions started since: a duration back from now (15m, 2h, 7d) or a UTC time.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// The sessions of every node of the fleet, from PostgreSQL (`[fleet]`), with a NODE column.
        #[arg(long)]
        fleet: bool,
    },
    /// The timeline of one session: channels, commands, exit statuses, recordings.
    Show {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Session id (or a unique prefix of at least 8 characters).
        id: String,
        /// The tenant's reviewer private key, to open sealed fields.
        #[arg(long)]
        key: Option<PathBuf>,
        /// A session of any node, from PostgreSQL; recordings are checked in the object store.
        #[arg(long)]
        fleet: bool,
    },
    /// Plays a session's terminal recordings in this terminal with their original timing.
    Replay {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        id: String,
        /// Faster (2) or slower (0.5) than real time.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Shorten pauses longer than this many seconds.
        #[arg(long)]
        max_idle: Option<f64>,
        /// Only this channel (the `chN` of `show`).
        #[arg(long)]
        channel: Option<u32>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// A session of any node, from PostgreSQL, its recordings fetched from the fleet's object store
        /// (`[fleet.objects]`) and verified against their manifest and audit record first.
        #[arg(long)]
        fleet: bool,
    },
    /// Finds commands (exec commands, typed lines, SFTP operations) containing TEXT.
    Search {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        text: String,
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Writes a session to DIR: session.json (every record), an asciicast file per terminal channel
    /// (`asciinema play DIR/ch1.cast`), client/server byte streams per other channel.
    Export {
        #[arg(short, long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

fn load(config: &Path) -> anyhow::Result<Config> {
    // Read-only review (`audit ssh`, `audit verify`): stays root, so it can read a pinned key or exported
    // heads wherever the admin keeps them (no `sandbox::act_as_state_owner`).
    Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))
}

fn open_log(cfg: &Config) -> anyhow::Result<SshLog> {
    let path = crate::audit::existing_store(cfg)?;
    SshLog::open_readonly(path).with_context(|| {
        format!(
            "cannot read SSH records from {} (no SSH session recorded yet?)",
            path.display()
        )
    })
}

fn read_key(path: Option<&Path>) -> anyhow::Result<Option<ReviewerKey>> {
    path.map(|p| ReviewerKey::read_file(p).with_context(|| format!("--key {}", p.display())))
        .transpose()
}

pub fn run(command: SshCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        SshCommand::Sessions {
            config,
            tenant,
            user,
            target,
            since,
            limit,
            json,
            fleet,
        } => {
            let cfg = load(&config)?;
            if fleet {
                let since_ms = crate::clock::since_arg(since, crate::clock::unix_ms())?;
                let f = SessionFilter {
                    tenant,
                    user,
                    target,
                    since_ms,
                    limit,
                };
                return sessions_fleet(&cfg, &f, json, &mut out);
            }
            let log = open_log(&cfg)?;
            let now_ms = crate::clock::unix_ms();
            let since_ms = crate::clock::since_arg(since, now_ms)?;
            let rows = ssh_review::sessions(
                &log,
                &SessionFilter {
                    tenant,
                    user,
                    target,
                    since_ms,
                    limit,
                },
            )?;
            if json {
                for r in &rows {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                }
                return Ok(());
            }
            writeln!(
                out,
                "{:<36} {:<24} {:<10} {:<20} {:<14} {:<21} {:<10} {:>3}  END",
                "SESSION", "STARTED", "TENANT", "USER", "DEVICE", "TARGET", "LOGIN", "CH"
            )?;
            for r in &rows {
                let end = match (&r.end_reason, r.ended_ms) {
                    (Some(reason), Some(ms)) => {
                        format!("{reason} after {:.1}s", (ms - r.started_ms) as f64 / 1000.0)
                    }
                    _ => "open".into(),
                };
                let end = if r.decision == "allowed" {
                    end
                } else {
                    format!("{end}; {}", r.decision)
                };
                crate::inert_line!(
                    out,
                    "{:<36} {:<24} {:<10} {:<20} {:<14} {:<21} {:<10} {:>3}  {end}",
                    r.session_id,
                    format_ms(r.started_ms),
                    r.tenant,
                    r.user,
                    r.device,
                    r.target,
                    r.login,
                    r.channels
                )?;
            }
            Ok(())
        }
        SshCommand::Show {
            config,
            id,
            key,
            fleet,
        } => {
            let cfg = load(&config)?;
            if fleet {
                return show_fleet(&cfg, &id, read_key(key.as_deref())?.as_ref(), &mut out);
            }
            let log = open_log(&cfg)?;
            let key = read_key(key.as_deref())?;
            let id = ssh_review::resolve_session(&log, &id)?;
            ssh_review::show(&log, &id, key.as_ref(), &mut out)?;
            // What the ssh-log-cli container keeps only in its (plaintext) header, for every recording.
            for (seq, rec, _) in ssh_review::recordings(&log, &id)? {
                if let Ok(h) = read_capture_header(&cfg.gateway.state_dir.join(&rec.path)) {
                    let exit = h.exit_data.unwrap_or_default();
                    crate::inert_line!(
                        out,
                        "recording ch{seq} ({}): {} exit status {} signal {} error {}",
                        rec.path,
                        if h.pty.is_some() {
                            "terminal,"
                        } else {
                            "streams,"
                        },
                        exit.status.map_or("-".into(), |s| s.to_string()),
                        exit.signal.as_deref().unwrap_or("-"),
                        exit.error_msg.as_deref().unwrap_or("-"),
                    )?;
                }
            }
            Ok(())
        }
        SshCommand::Replay {
            config,
            id,
            speed,
            max_idle,
            channel,
            key,
            fleet,
        } => {
            let cfg = load(&config)?;
            if fleet {
                let key = read_key(key.as_deref())?;
                return replay_fleet(
                    &cfg,
                    &id,
                    key.as_ref(),
                    channel,
                    speed,
                    max_idle.map(Duration::from_secs_f64),
                    &mut out,
                );
            }
            let log = open_log(&cfg)?;
            let key = read_key(key.as_deref())?;
            let id = ssh_review::resolve_session(&log, &id)?;
            let mut played = 0;
            for (seq, rec, _) in ssh_review::recordings(&log, &id)? {
                if channel.is_some_and(|c| c != seq) || (!rec.pty && channel.is_none()) {
                    continue;
                }
                let decoded =
                    ssh_review::load_recording(&cfg.gateway.state_dir, &rec, key.as_ref())?;
                ssh_review::replay(
                    &decoded,
                    speed,
                    max_idle.map(Duration::from_secs_f64),
                    &mut out,
                )?;
                played += 1;
            }
            if played == 0 {
                bail!("session {id} has no terminal recording to replay (see `rampart audit ssh show {id}`)");
            }
            Ok(())
        }
        SshCommand::Search {
            config,
            text,
            key,
            json,
        } => {
            let cfg = load(&config)?;
            let log = open_log(&cfg)?;
            let key = read_key(key.as_deref())?;
            let (hits, sealed) = ssh_review::search(&log, &text, key.as_ref())?;
            for h in &hits {
                if json {
                    writeln!(out, "{}", serde_json::to_string(h)?)?;
                } else {
                    crate::inert_line!(
                        out,
                        "{}  {}  ch{}  {}@{} ({}, {})  {}: {}",
                        format_ms(h.at_ms),
                        h.session_id,
                        h.channel_seq.unwrap_or(0),
                        h.login,
                        h.target,
                        h.user,
                        h.tenant,
                        h.source,
                        h.text
                    )?;
                }
            }
            if sealed > 0 {
                eprintln!(
                    "{sealed} sealed commands were not searched{}",
                    if key.is_some() {
                        " (the key does not open them: another tenant's?)"
                    } else {
                        "; pass --key with the tenant's reviewer key"
                    }
                );
            }
            Ok(())
        }
        SshCommand::Export {
            config,
            id,
            out: dir,
            key,
        } => {
            let cfg = load(&config)?;
            let log = open_log(&cfg)?;
            let key = read_key(key.as_deref())?;
            let id = ssh_review::resolve_session(&log, &id)?;
            export(&cfg, &log, &id, &dir, key.as_ref())?;
            writeln!(out, "{}", dir.display())?;
            Ok(())
        }
    }
}

/// The fleet's PostgreSQL, and its object store when the config has `[fleet.objects]`.
fn fleet_review(
    cfg: &Config,
) -> anyhow::Result<(
    tokio::runtime::Runtime,
    tokio_postgres::Client,
    Option<crate::fleet::objects::Objects>,
)> {
    let (rt, client) = super::audit::fleet_client(cfg)?;
    let objects = match cfg.fleet.as_ref().and_then(|f| f.objects.as_ref()) {
        Some(o) => Some(crate::fleet::objects::Objects::new(o, &cfg.source)?),
        None => None,
    };
    Ok((rt, client, objects))
}

fn sessions_fleet(
    cfg: &Config,
    f: &SessionFilter,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (rt, client) = super::audit::fleet_client(cfg)?;
    let rows = rt.block_on(crate::fleet::ssh_review::sessions(&client, f))?;
    if json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<12} {:<36} {:<24} {:<10} {:<20} {:<14} {:<21} {:<10} {:>3}  END",
        "NODE", "SESSION", "STARTED", "TENANT", "USER", "DEVICE", "TARGET", "LOGIN", "CH"
    )?;
    for f in &rows {
        let r = &f.session;
        let end = match (&r.end_reason, r.ended_ms) {
            (Some(reason), Some(ms)) => {
                format!("{reason} after {:.1}s", (ms - r.started_ms) as f64 / 1000.0)
            }
            _ => "open".into(),
        };
        crate::inert_line!(
            out,
            "{:<12} {:<36} {:<24} {:<10} {:<20} {:<14} {:<21} {:<10} {:>3}  {end}",
            f.node,
            r.session_id,
            format_ms(r.started_ms),
            r.tenant,
            r.user,
            r.device,
            r.target,
            r.login,
            r.channels
        )?;
    }
    Ok(())
}

/// The timeline from PostgreSQL, then each recording's state in the object store (verified, or why not).
fn show_fleet(
    cfg: &Config,
    id: &str,
    key: Option<&ReviewerKey>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (rt, client, objects) = fleet_review(cfg)?;
    let s = rt.block_on(crate::fleet::ssh_review::session(&client, id))?;
    writeln!(out, "node {}", s.node)?;
    ssh_review::show(&s.log, &s.session_id, key, out)?;
    let prefix = objects
        .as_ref()
        .map(|o| o.settings().prefix.clone())
        .unwrap_or_default();
    for r in crate::fleet::ssh_review::recordings(&s, &prefix)? {
        let state = match &objects {
            None => "not checked (no [fleet.objects] in the config)".to_owned(),
            Some(o) => match rt.block_on(crate::fleet::ssh_review::fetch_recording(
                o,
                &s.session_id,
                &r,
            )) {
                Ok(b) => format!(
                    "verified against its manifest and audit record ({} bytes)",
                    b.len()
                ),
                Err(e) => format!("NOT VERIFIED: {e}"),
            },
        };
        crate::inert_line!(
            out,
            "recording ch{} {}: {state}",
            r.channel_seq,
            r.object_key
        )?;
    }
    Ok(())
}

/// Replays recordings fetched from the object store; each is verified before a byte of it is shown.
fn replay_fleet(
    cfg: &Config,
    id: &str,
    key: Option<&ReviewerKey>,
    channel: Option<u32>,
    speed: f64,
    max_idle: Option<Duration>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let (rt, client, objects) = fleet_review(cfg)?;
    let Some(objects) = objects else {
        bail!(
            "{}: has no [fleet.objects]; replay --fleet fetches recordings from the fleet's object store (docs/fleet.md)",
            cfg.source.display()
        );
    };
    let s = rt.block_on(crate::fleet::ssh_review::session(&client, id))?;
    let mut played = 0;
    for r in crate::fleet::ssh_review::recordings(&s, &objects.settings().prefix)? {
        if channel.is_some_and(|c| c != r.channel_seq) || (!r.info.pty && channel.is_none()) {
            continue;
        }
        let bytes = rt
            .block_on(crate::fleet::ssh_review::fetch_recording(
                &objects,
                &s.session_id,
                &r,
            ))
            .with_context(|| {
                format!(
                    "ch{} of session {} (node {})",
                    r.channel_seq, s.session_id, s.node
                )
            })?;
        let decoded = ssh_review::decode_recording(&bytes, Path::new(&r.object_key), &r.info, key)?;
        ssh_review::replay(&decoded, speed, max_idle, out)?;
        played += 1;
    }
    if played == 0 {
        bail!(
            "session {} has no terminal recording to replay",
            s.session_id
        );
    }
    Ok(())
}

fn export(
    cfg: &Config,
    log: &SshLog,
    id: &str,
    dir: &Path,
    key: Option<&ReviewerKey>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rows = log.session_rows(id)?;
    let records: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["body"] = serde_json::from_str(&r.body).unwrap_or_default();
            v
        })
        .collect();
    std::fs::write(
        dir.join("session.json"),
        serde_json::to_vec_pretty(&serde_json::json!({ "session_id": id, "records": records }))?,
    )?;
    let first = rows.first().map(|r| r.keys.clone()).unwrap_or_default();
    for (seq, rec, close) in ssh_review::recordings(log, id)? {
        let decoded = match ssh_review::load_recording(&cfg.gateway.state_dir, &rec, key) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ch{seq}: {e}");
                continue;
            }
        };
        let command = rows.iter().find_map(|r| match r.event() {
            Some(SshEvent::ChannelOpen(o)) if r.channel_seq == Some(seq) => {
                o.command.map(|c| c.text.show(key))
            }
            _ => None,
        });
        if decoded.header.pty.is_some() {
            let meta = CastMeta {
                session_id: id.to_owned(),
                channel_seq: seq,
                user: first.user.clone(),
                device: first.device.clone(),
                target: first.target.clone(),
                login: first.login.clone(),
                command: command.clone(),
            };
            let mut f =
                std::io::BufWriter::new(std::fs::File::create(dir.join(format!("ch{seq}.cast")))?);
            ssh_review::write_cast(&decoded, &meta, &mut f)?;
            f.flush()?;
        } else {
            use crate::audit::capture::Source;
            std::fs::write(
                dir.join(format!("ch{seq}.client.bin")),
                decoded.data_from(Source::Client),
            )?;
            std::fs::write(
                dir.join(format!("ch{seq}.server.bin")),
                decoded.data_from(Source::Origin),
            )?;
        }
        std::fs::write(
            dir.join(format!("ch{seq}.json")),
            serde_json::to_vec_pretty(&serde_json::json!({
                "command": command,
                "exit_status": close.exit_status,
                "exit_signal": close.exit_signal,
                "core_dumped": close.core_dumped,
                "error": close.error,
                "capture_header_exit": decoded.header.exit_data,
                "recording": rec,
            }))?,
        )?;
    }
    Ok(())
}

/// The plaintext header of an `ssh-log-cli` capture (readable without the key).
fn read_capture_header(path: &Path) -> anyhow::Result<Header> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 4];
    f.read_exact(&mut len)?;
    let mut b64 = Vec::new();
    f.take(u64::from(u32::from_be_bytes(len)))
        .read_to_end(&mut b64)?;
    let json = base64::engine::general_purpose::STANDARD.decode(&b64)?;
    Ok(serde_json::from_slice(&json)?)
}

/// `rampart audit verify`: the whole chain, recordings and checkpoint signatures against a pinned key; with
/// `head`, the exported head too.
pub fn verify(
    config: &Path,
    pubkey: Option<&Path>,
    head: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    use russh::keys::ssh_key::{HashAlg, PublicKey};
    let cfg = load(config)?;
    let path = crate::audit::existing_store(&cfg)?;
    let state = &cfg.gateway.state_dir;
    let key_path = pubkey.map(Path::to_path_buf).or(cfg.audit.verify_key.clone()).ok_or_else(|| {
        anyhow::anyhow!(
            "audit verify needs the gateway's audit signing public key from outside the gateway, or a forger who \
             rewrote the store could sign it too: pass --pubkey FILE (a copy of {} taken when the gateway was \
             installed) or set audit.verify_key in {}",
            state.join("audit_signing_key.pub").display(),
            config.display()
        )
    })?;
    let inside = |p: &Path| {
        let canon = |x: &Path| std::fs::canonicalize(x).unwrap_or_else(|_| x.to_path_buf());
        canon(p).starts_with(canon(state))
    };
    if inside(&key_path) {
        bail!(
            "{} is inside state_dir ({}), where whoever can rewrite the store can replace it too; verify with a copy \
             kept elsewhere (--pubkey FILE)",
            key_path.display(),
            state.display()
        );
    }
    let text = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read the pinned key {}", key_path.display()))?;
    let pinned = PublicKey::from_openssh(text.trim())
        .map_err(|e| anyhow::anyhow!("{}: not an OpenSSH public key ({e})", key_path.display()))?;
    let head = head
        .map(|h| -> anyhow::Result<_> {
            let text = std::fs::read_to_string(h)
                .with_context(|| format!("cannot read the exported heads {}", h.display()))?;
            verify::pick_head(&text, &pinned).map_err(|e| anyhow::anyhow!("{} {e}", h.display()))
        })
        .transpose()?;
    let conn = crate::audit::db::open_readonly(path)
        .with_context(|| format!("cannot open the audit store {}", path.display()))?;
    let report = verify::verify(&conn, state, &pinned, head.as_ref())?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if let Some(b) = &report.first_break {
        bail!(
            "audit trail verification FAILED at record {}: {}\n({} records verified before it)",
            b.seq,
            // The message quotes the store (reference ids, session ids), which a forger may have filled with
            // escape sequences.
            crate::audit::review::inert(&b.what),
            report.records
        );
    }
    if json {
        return Ok(());
    }
    let kinds: Vec<String> = report
        .by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "ok: {} audit records chained ({}), {} recordings match their hashes, {} checkpoints signed by the pinned key {}{}",
        report.records,
        kinds.join(", "),
        report.recordings,
        report.checkpoints,
        pinned.fingerprint(HashAlg::Sha256),
        report
            .last_checkpoint_seq
            .map(|s| format!(" (last at record {s})"))
            .unwrap_or_default(),
    );
    match report.head_seq {
        Some(h) => println!("ok: the exported head (record {h}) is in the store"),
        None => println!(
            "note: without --head, records removed from the end of the store would not show; pass the exported heads \
             (audit.checkpoint_sink)"
        ),
    }
    if report.unsigned_tail > 0 {
        println!(
            "note: the last {} records are not signed yet (the gateway signs every {} records, every {} s and at shutdown)",
            report.unsigned_tail,
            cfg.audit.checkpoint_every,
            cfg.audit.checkpoint_interval.as_secs()
        );
    }
    if report.gaps > 0 {
        println!(
            "note: {} gap records say {} records were lost (by kind and reason: table events, kind 'gap'; /metrics rampart_audit_records_lost_total)",
            report.gaps, report.records_lost
        );
    }
    if let Some(e) = report.evicted_through {
        let kinds: Vec<String> = report
            .evicted_records
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        println!(
            "note: records 1 to {e} were evicted under the size quota (audit.max_store_mb / max_recordings_mb): {}; \
             the eviction record in the chain names them (table events, kind 'eviction')",
            if kinds.is_empty() { "no records".to_string() } else { kinds.join(", ") }
        );
    }
    if report.unchained_rows > 0 {
        let tables: Vec<String> = report
            .unchained_by_table
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        println!(
            "note: {} rows from before the chain (schema 1: {}) are not covered by it; only their number is checked",
            report.unchained_rows,
            tables.join(", ")
        );
    }
    Ok(())
}

/// `rampart ca init --tenant T` (without --tls): the tenant's SSH user CA, host CA and gateway host key.
pub fn ssh_ca_init(cfg: &Config, tenant: &str) -> anyhow::Result<()> {
    let r = crate::ssh::trust::ca_init(&cfg.gateway.state_dir, tenant)?;
    if r.created {
        eprintln!(
            "created the SSH certificate authorities of tenant {tenant} in {}",
            r.dir.display()
        );
    } else {
        eprintln!("the SSH certificate authorities of tenant {tenant} exist; keeping them");
    }
    eprintln!(
        "targets trust the user CA (sshd_config: TrustedUserCAKeys /etc/ssh/rampart_user_ca.pub):"
    );
    println!("{}", r.user_ca_pub);
    eprintln!("clients trust the host CA (a line in ~/.ssh/known_hosts):");
    println!("@cert-authority * {}", r.host_ca_pub);
    Ok(())
}
