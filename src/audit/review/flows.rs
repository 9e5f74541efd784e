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

/// Filters for `rampart audit flows`; `None` = no filter.
#[derive(Debug, Default)]
pub struct FlowFilter {
    pub tenant: Option<String>,
    pub user: Option<String>,
    pub device: Option<String>,
    pub dst: Option<ipnet::IpNet>,
    pub since_ms: Option<i64>,
    pub limit: usize,
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
               AND (?4 IS NULL OR started_ms >= ?4)
             ORDER BY started_ms DESC, id DESC",
        )?;
        let rows = stmt.query_map(params![f.tenant, f.user, f.device, f.since_ms], |r| {
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
        })?;
        let mut out = Vec::new();
        for row in rows {
            let row = row?;
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

    pub fn flow_count(&self) -> rusqlite::Result<i64> {
        self.conn
            .query_row("SELECT count(*) FROM flows", [], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
    }
}
