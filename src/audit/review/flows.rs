//! Review of flows (`rampart audit flows`): the query and its filters.
#![deny(unsafe_code)]

use std::net::IpAddr;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension as _};

/// A flow as review shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FlowRow {
    pub id: i64,
    pub tenant: String,
    pub device: String,
    pub user: String,
    pub protocol: u8,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub dst_device: Option<String>,
    pub action: String,
    pub rule: String,
    pub started_ms: i64,
    pub established_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub end_reason: Option<String>,
}

/// The records that belong to one flow.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FlowLinks {
    pub http_requests: u64,
    pub ssh_session: Option<String>,
}

/// Filters for `rampart audit flows` and the review UI's `/api/v1/flows`; `None` = no filter.
#[derive(Debug, Default)]
pub struct FlowFilter {
    pub tenant: Option<String>,
    /// Only these tenants (the caller's scope); `None` = every tenant.
    pub tenant_in: Option<Vec<String>>,
    pub user: Option<String>,
    pub device: Option<String>,
    pub dst: Option<ipnet::IpNet>,
    /// The flow's action (`allow`, `inspect_ssh`, `deny`, ...).
    pub action: Option<String>,
    pub id: Option<i64>,
    pub since_ms: Option<i64>,
    /// Started at or before.
    pub until_ms: Option<i64>,
    /// Page cursor: only flows after `(started_ms, id)` in the newest-first order.
    pub before: Option<(i64, i64)>,
    pub limit: usize,
}

/// A destination filter: a CIDR (`10.1.0.0/16`) or one address.
pub fn parse_dst(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR or address; write it like 10.1.0.0/16"))
}

/// A read-only view of the store's flows.
pub struct FlowStore {
    conn: Connection,
}

impl FlowStore {
    pub fn open(path: &Path) -> rusqlite::Result<FlowStore> {
        Ok(FlowStore {
            conn: crate::audit::db::open_readonly(path)?,
        })
    }

    /// Flows matching `f`, newest first.
    pub fn flows(&self, f: &FlowFilter) -> rusqlite::Result<Vec<FlowRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, tenant, device, user, protocol, src, sport, dst, dport, dst_device, action, rule, started_ms,
                    established_ms, ended_ms, packets_out, bytes_out, packets_in, bytes_in, end_reason
             FROM flows
             WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR user = ?2) AND (?3 IS NULL OR device = ?3)
               AND (?4 IS NULL OR started_ms >= ?4) AND (?5 IS NULL OR started_ms <= ?5)
               AND (?6 IS NULL OR action = ?6) AND (?7 IS NULL OR id = ?7)
               AND (?8 IS NULL OR started_ms < ?8 OR (started_ms = ?8 AND id < ?9))
             ORDER BY started_ms DESC, id DESC",
        )?;
        let rows = stmt.query_map(
            params![
                f.tenant,
                f.user,
                f.device,
                f.since_ms,
                f.until_ms,
                f.action,
                f.id,
                f.before.map(|b| b.0),
                f.before.map(|b| b.1),
            ],
            |r| {
                Ok(FlowRow {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    device: r.get(2)?,
                    user: r.get(3)?,
                    protocol: r.get(4)?,
                    src: r.get(5)?,
                    sport: r.get(6)?,
                    dst: r.get(7)?,
                    dport: r.get(8)?,
                    dst_device: r.get(9)?,
                    action: r.get(10)?,
                    rule: r.get(11)?,
                    started_ms: r.get(12)?,
                    established_ms: r.get(13)?,
                    ended_ms: r.get(14)?,
                    packets_out: r.get::<_, i64>(15)? as u64,
                    bytes_out: r.get::<_, i64>(16)? as u64,
                    packets_in: r.get::<_, i64>(17)? as u64,
                    bytes_in: r.get::<_, i64>(18)? as u64,
                    end_reason: r.get(19)?,
                })
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let row = row?;
            if f.tenant_in
                .as_ref()
                .is_some_and(|t| !t.contains(&row.tenant))
            {
                continue;
            }
            if let Some(net) = &f.dst {
                if !row.dst.parse::<IpAddr>().is_ok_and(|a| net.contains(&a)) {
                    continue;
                }
            }
            out.push(row);
            if out.len() >= f.limit {
                break;
            }
        }
        Ok(out)
    }

    /// What else the store holds about `flow`: its HTTP requests and the SSH session inspected on it.
    pub fn links(&self, flow: &FlowRow) -> rusqlite::Result<FlowLinks> {
        use crate::audit::db::has_table;
        let http_requests = if has_table(&self.conn, "http_requests")? {
            self.conn
                .prepare_cached("SELECT count(*) FROM http_requests WHERE flow_id = ?1")?
                .query_row([flow.id], |r| r.get::<_, i64>(0))? as u64
        } else {
            0
        };
        let mut ssh_session = None;
        if flow.action == "inspect_ssh" && has_table(&self.conn, "ssh_log")? {
            // The session's start record names the flow's two ends; the same pair may come back later with
            // another flow, so only a start within the flow's lifetime counts.
            let sock = |ip: &str, port: u16| {
                ip.parse::<IpAddr>()
                    .map(|a| std::net::SocketAddr::new(a, port).to_string())
                    .unwrap_or_default()
            };
            let (client, target) = (sock(&flow.src, flow.sport), sock(&flow.dst, flow.dport));
            let mut stmt = self.conn.prepare_cached(
                "SELECT session_id, body FROM ssh_log
                 WHERE kind = 'session.start' AND tenant = ?1 AND target = ?2 AND at_ms >= ?3
                   AND (?4 IS NULL OR at_ms <= ?4)
                 ORDER BY seq",
            )?;
            let rows = stmt.query_map(
                params![flow.tenant, target, flow.started_ms, flow.ended_ms],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )?;
            for row in rows {
                let (id, body) = row?;
                let addr = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["client_addr"].as_str().map(str::to_string));
                if addr.as_deref() == Some(client.as_str()) {
                    ssh_session = Some(id);
                    break;
                }
            }
        }
        Ok(FlowLinks {
            http_requests,
            ssh_session,
        })
    }

    pub fn flow_count(&self) -> rusqlite::Result<i64> {
        self.conn
            .query_row("SELECT count(*) FROM flows", [], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
    }
}
