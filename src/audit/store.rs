//! The embedded audit store: SQLite (WAL, `synchronous = FULL`) under `state_dir`. One writer (the audit
//! thread) and any number of readers (`rampart audit ...`), which WAL lets run concurrently.
//!
//! Durability: a record is durable once the transaction holding it commits (fsync'd, so it survives kill -9
//! and power loss). Records are committed in batches at most `audit.commit_interval_ms` after they are
//! emitted; a crash loses at most what was still queued or in the open batch.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _};

use crate::core::{EndReason, FlowStart};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    protocol INTEGER NOT NULL,
    src TEXT NOT NULL,
    sport INTEGER NOT NULL,
    dst TEXT NOT NULL,
    dport INTEGER NOT NULL,
    dst_device TEXT,
    action TEXT NOT NULL,
    rule TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    established_ms INTEGER,
    ended_ms INTEGER,
    packets_out INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    packets_in INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    end_reason TEXT,
    UNIQUE (run_id, seq)
);
CREATE INDEX IF NOT EXISTS flows_by_time ON flows (started_ms);
CREATE INDEX IF NOT EXISTS flows_by_tenant ON flows (tenant, started_ms);
";

/// A record as the writer stores it (wall-clock times already resolved).
#[derive(Debug, Clone)]
pub enum Record {
    FlowStart {
        start: Box<FlowStart>,
        at_ms: i64,
    },
    FlowEstablished {
        seq: u64,
        at_ms: i64,
    },
    FlowEnd {
        seq: u64,
        at_ms: i64,
        packets: [u64; 2],
        bytes: [u64; 2],
        reason: EndReason,
    },
}

/// A flow as review shows it.
#[derive(Debug, Clone, serde::Serialize)]
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

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the store for writing.
    pub fn open(path: &Path) -> rusqlite::Result<Store> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store { conn })
    }

    /// Opens an existing store for review without writing to it.
    pub fn open_readonly(path: &Path) -> rusqlite::Result<Store> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Store { conn })
    }

    /// Writes a batch in one transaction (all or nothing).
    pub fn write_batch(&mut self, run_id: i64, records: &[Record]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut start = tx.prepare_cached(
                "INSERT OR IGNORE INTO flows (run_id, seq, tenant, device, user, protocol, src, sport, dst, dport, dst_device, action, rule, started_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let mut est = tx.prepare_cached(
                "UPDATE flows SET established_ms = ?3 WHERE run_id = ?1 AND seq = ?2",
            )?;
            let mut end = tx.prepare_cached(
                "UPDATE flows SET ended_ms = ?3, packets_out = ?4, bytes_out = ?5, packets_in = ?6, bytes_in = ?7, end_reason = ?8
                 WHERE run_id = ?1 AND seq = ?2",
            )?;
            for r in records {
                match r {
                    Record::FlowStart { start: s, at_ms } => {
                        start.execute(params![
                            run_id,
                            s.seq as i64,
                            s.tenant.as_str(),
                            s.device.as_str(),
                            s.user.as_str(),
                            s.protocol,
                            s.src.to_string(),
                            s.sport,
                            s.dst.to_string(),
                            s.dport,
                            s.dst_device.as_ref().map(|d| d.as_str()),
                            s.action.as_str(),
                            &*s.rule,
                            at_ms,
                        ])?;
                    }
                    Record::FlowEstablished { seq, at_ms } => {
                        est.execute(params![run_id, *seq as i64, at_ms])?;
                    }
                    Record::FlowEnd {
                        seq,
                        at_ms,
                        packets,
                        bytes,
                        reason,
                    } => {
                        end.execute(params![
                            run_id,
                            *seq as i64,
                            at_ms,
                            packets[0] as i64,
                            bytes[0] as i64,
                            packets[1] as i64,
                            bytes[1] as i64,
                            reason.as_str()
                        ])?;
                    }
                }
            }
        }
        tx.commit()
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

    /// `PRAGMA integrity_check` result ("ok" when healthy).
    pub fn integrity_check(&self) -> rusqlite::Result<String> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
    }

    pub fn flow_count(&self) -> rusqlite::Result<i64> {
        self.conn
            .query_row("SELECT count(*) FROM flows", [], |r| r.get(0))
            .optional()
            .map(|v| v.unwrap_or(0))
    }
}
