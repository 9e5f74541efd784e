//! `rampart audit flows|http|keygen`: the flow and HTTP review commands, and the fleet's review and verification
//! (`--fleet`: flows, HTTP, enrollment records, `verify`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::load;
use crate::clock::{format_ms, since_arg, unix_ms};

#[allow(clippy::too_many_arguments)]
pub(super) fn audit_flows(
    config: &Path,
    tenant: Option<String>,
    user: Option<String>,
    device: Option<String>,
    dst: Option<String>,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use crate::audit::review::flows::{FlowFilter, FlowStore};
    let cfg = load(config)?;
    let path = crate::audit::existing_store(&cfg)?;
    let now_ms = unix_ms();
    let dst = dst
        .map(|d| crate::audit::review::flows::parse_dst(&d))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--dst: {e}"))?;
    let since_ms = since_arg(since, now_ms)?;
    let store = FlowStore::open(path)
        .with_context(|| format!("cannot open the audit store {}", path.display()))?;
    let rows = store.flows(&FlowFilter {
        tenant,
        user,
        device,
        dst,
        since_ms,
        limit,
        ..Default::default()
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
        let (flow, end) = flow_cells(r);
        crate::inert_line!(
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

/// A flow row's `FLOW` and `END` cells, for the local and the fleet listing.
fn flow_cells(r: &crate::audit::review::flows::FlowRow) -> (String, String) {
    let flow = format!("{}:{} -> {}:{}", r.src, r.sport, r.dst, r.dport);
    let end = match (&r.end_reason, r.ended_ms) {
        (Some(reason), Some(ms)) => {
            format!("{reason} after {:.1}s", (ms - r.started_ms) as f64 / 1000.0)
        }
        _ => "open".to_string(),
    };
    (flow, end)
}

pub(super) fn audit_keygen(out: &Path) -> anyhow::Result<()> {
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

#[allow(clippy::too_many_arguments)]
pub(super) fn audit_http(
    config: &Path,
    tenant: Option<String>,
    user: Option<String>,
    host: Option<String>,
    flow_id: Option<i64>,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use crate::audit::review::http::{query, HttpFilter};
    let cfg = load(config)?;
    let path = crate::audit::existing_store(&cfg)?;
    let now_ms = unix_ms();
    let since_ms = since_arg(since, now_ms)?;
    let rows = query(
        path,
        &HttpFilter {
            tenant,
            user,
            host,
            flow_id,
            since_ms,
            limit,
            ..Default::default()
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
    http_table_head(&mut out, &format!("{:<24}", "TIME"))?;
    for r in &rows {
        let lead = format!("{:<24}", format_ms(r.record.at_ms));
        http_table_row(&mut out, &lead, &r.record, r.flow_id)?;
    }
    Ok(())
}

/// The columns `audit http` and `audit http --fleet` share, after `lead` (time, or time, node and sequence).
fn http_table_head(out: &mut impl std::io::Write, lead: &str) -> std::io::Result<()> {
    writeln!(
        out,
        "{lead} {:<10} {:<14} {:<14} {:<7} {:<28} {:<32} {:>6} {:>10} {:>10} {:>7}  {:<11} {:<16} {:<12} FLOW",
        "TENANT", "USER", "DEVICE", "METHOD", "HOST", "PATH", "STATUS", "UP", "DOWN", "MS", "DECISION", "RULE",
        "REF"
    )
}

/// One record in the columns of [`http_table_head`]; text from devices is shown inert.
fn http_table_row(
    out: &mut impl std::io::Write,
    lead: &str,
    rec: &crate::audit::http_records::HttpRecord,
    flow_id: Option<i64>,
) -> std::io::Result<()> {
    crate::inert_line!(
        out,
        "{lead} {:<10} {:<14} {:<14} {:<7} {:<28} {:<32} {:>6} {:>10} {:>10} {:>7}  {:<11} {:<16} {:<12} {}",
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
        flow_id
            .map(|f| f.to_string())
            .unwrap_or_else(|| format!("seq {}", rec.flow_seq)),
    )
}

/// The fleet's PostgreSQL, for review commands (`[fleet]` of the config).
pub(super) fn fleet_client(
    cfg: &crate::config::Config,
) -> anyhow::Result<(tokio::runtime::Runtime, tokio_postgres::Client)> {
    let Some(f) = &cfg.fleet else {
        anyhow::bail!(
            "{}: has no [fleet] section; --fleet reviews the records a fleet's nodes shipped to PostgreSQL (docs/fleet.md)",
            cfg.source.display()
        );
    };
    let connector = crate::fleet::Connector::new(f, &cfg.source)?.for_review();
    let rt = crate::fleet::runtime()?;
    let client = rt.block_on(connector.connect())?;
    Ok((rt, client))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn audit_flows_fleet(
    config: &Path,
    node: Option<String>,
    tenant: Option<String>,
    user: Option<String>,
    device: Option<String>,
    since: Option<String>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use crate::fleet::review::{flows, FleetFlowFilter};
    let cfg = load(config)?;
    let since_ms = since_arg(since, unix_ms())?;
    let (rt, client) = fleet_client(&cfg)?;
    let filter = FleetFlowFilter {
        node,
        tenant,
        tenant_in: None,
        user,
        device,
        since_ms,
        limit,
    };
    let rows = rt.block_on(flows(&client, &filter)).map_err(|e| {
        anyhow::anyhow!(
            "querying the fleet's flows: {}",
            crate::fleet::error_text(&e)
        )
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
        "{:<24} {:<12} {:>8} {:<10} {:<14} {:<14} {:<44} {:<7} {:<16} {:>16} {:>16}  END",
        "STARTED",
        "NODE",
        "SEQ",
        "TENANT",
        "USER",
        "DEVICE",
        "FLOW",
        "ACTION",
        "RULE",
        "OUT pkts/bytes",
        "IN pkts/bytes"
    )?;
    for r in &rows {
        let f = &r.flow;
        let (flow, end) = flow_cells(f);
        crate::inert_line!(
            out,
            "{:<24} {:<12} {:>8} {:<10} {:<14} {:<14} {:<44} {:<7} {:<16} {:>16} {:>16}  {end}",
            format_ms(f.started_ms),
            r.node,
            r.chain_seq,
            f.tenant,
            f.user,
            f.device,
            flow,
            f.action,
            f.rule,
            format!("{}/{}", f.packets_out, f.bytes_out),
            format!("{}/{}", f.packets_in, f.bytes_in),
        )?;
    }
    Ok(())
}

/// `rampart audit http --fleet`: the local command's columns after NODE and SEQ.
pub(super) fn audit_http_fleet(
    config: &Path,
    mut filter: crate::fleet::review::FleetHttpFilter,
    since: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let cfg = load(config)?;
    filter.since_ms = since_arg(since, unix_ms())?;
    let (rt, client) = fleet_client(&cfg)?;
    let rows = rt.block_on(crate::fleet::review::http_records(&client, &filter))?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    http_table_head(
        &mut out,
        &format!("{:<24} {:<12} {:>8}", "TIME", "NODE", "SEQ"),
    )?;
    for r in &rows {
        let lead = format!(
            "{:<24} {:<12} {:>8}",
            format_ms(r.record.at_ms),
            r.node,
            r.chain_seq
        );
        http_table_row(&mut out, &lead, &r.record, r.flow_id)?;
    }
    Ok(())
}

/// `rampart audit enroll --fleet`: the local command's columns after NODE and SEQ.
pub(super) fn audit_enroll_fleet(
    config: &Path,
    mut filter: crate::fleet::review::FleetEnrollFilter,
    since: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let cfg = load(config)?;
    filter.since_ms = since_arg(since, unix_ms())?;
    let (rt, client) = fleet_client(&cfg)?;
    let rows = rt.block_on(crate::fleet::review::enroll_records(&client, &filter))?;
    let mut out = std::io::stdout().lock();
    if json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<12} {:>8} {:<22} {:<10} {:<20} {:<16} {:<14} {:<16} DETAIL",
        "TIME", "NODE", "SEQ", "EVENT", "TENANT", "DEVICE", "TOKEN", "ACTOR", "SOURCE"
    )?;
    for e in &rows {
        let r = &e.row;
        crate::inert_line!(
            out,
            "{:<24} {:<12} {:>8} {:<22} {:<10} {:<20} {:<16} {:<14} {:<16} {}",
            format_ms(r.at_ms),
            e.node,
            r.seq,
            r.event,
            r.tenant.as_deref().unwrap_or("-"),
            r.device_name.as_deref().unwrap_or("-"),
            r.token.as_deref().unwrap_or("-"),
            r.actor,
            r.source.as_deref().unwrap_or("-"),
            r.detail,
        )?;
    }
    Ok(())
}

/// `rampart audit verify --fleet`: exits non-zero at the first break of any node.
pub(super) fn verify_fleet(config: &Path, json: bool) -> anyhow::Result<()> {
    let cfg = load(config)?;
    let (rt, client) = fleet_client(&cfg)?;
    let report = rt
        .block_on(crate::fleet::review::verify(&client))
        .map_err(|e| {
            anyhow::anyhow!(
                "reading the fleet's records: {}",
                crate::fleet::error_text(&e)
            )
        })?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        for (node, r) in &report.nodes {
            let kinds: Vec<String> = r.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            crate::inert_line!(
                out,
                "node {node}: {} entries shipped (1..{}), {} flow rows, {} checkpoints{}; {}",
                r.entries,
                r.shipped_seq,
                r.flows,
                r.checkpoints,
                if r.records_missing > 0 {
                    format!(
                        ", {} records evicted locally before shipping",
                        r.records_missing
                    )
                } else {
                    String::new()
                },
                match &r.first_break {
                    None => "OK".to_string(),
                    Some(b) => format!("BROKEN at {b}"),
                }
            )?;
            if !kinds.is_empty() {
                crate::inert_line!(out, "  {}", kinds.join(", "))?;
            }
            match r.keys.as_slice() {
                [] => {}
                [k] => crate::inert_line!(out, "  checkpoints signed with {k}")?,
                ks => crate::inert_line!(
                    out,
                    "  signing key CHANGED: {} published keys, oldest first: {}",
                    ks.len(),
                    ks.join(", ")
                )?,
            }
        }
        if report.nodes.is_empty() {
            writeln!(out, "no node has shipped records yet")?;
        }
    }
    if !report.ok() {
        anyhow::bail!("the fleet's audit trail does not verify (see above)");
    }
    Ok(())
}
