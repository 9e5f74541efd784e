//! Review of enrollment records (`rampart audit enroll`): the query and its filters.
#![deny(unsafe_code)]

use std::path::Path;

use rusqlite::params;
use serde::Serialize;

/// A stored record as review shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EnrollRow {
    /// Its chain entry.
    pub seq: i64,
    pub at_ms: i64,
    pub event: String,
    pub actor: String,
    pub tenant: Option<String>,
    pub device: Option<String>,
    pub device_name: Option<String>,
    pub token: Option<String>,
    pub source: Option<String>,
    pub detail: serde_json::Value,
}

/// Filters for `rampart audit enroll`; `None` = no filter.
#[derive(Debug, Clone, Default)]
pub struct EnrollFilter {
    pub tenant: Option<String>,
    /// Device name or `dev_<id>`.
    pub device: Option<String>,
    /// Event name (`device_enrolled`, ...).
    pub event: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Records matching `f`, newest first; none when the store has no enrollment records.
pub fn query(path: &Path, f: &EnrollFilter) -> rusqlite::Result<Vec<EnrollRow>> {
    let conn = crate::audit::db::open_readonly(path)?;
    if !crate::audit::db::has_table(&conn, "enroll_log")? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(
        "SELECT chain_seq, at_ms, event, actor, tenant, device, device_name, token, source, detail FROM enroll_log
         WHERE (?1 IS NULL OR tenant = ?1)
           AND (?2 IS NULL OR device = ?2 OR device_name = ?2)
           AND (?3 IS NULL OR event = ?3)
           AND (?4 IS NULL OR at_ms >= ?4)
         ORDER BY chain_seq DESC LIMIT ?5",
    )?;
    let rows = st.query_map(
        params![
            f.tenant,
            f.device,
            f.event,
            f.since_ms,
            f.limit.min(i64::MAX as usize) as i64
        ],
        |r| {
            let detail: String = r.get(9)?;
            Ok(EnrollRow {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                event: r.get(2)?,
                actor: r.get(3)?,
                tenant: r.get(4)?,
                device: r.get(5)?,
                device_name: r.get(6)?,
                token: r.get(7)?,
                source: r.get(8)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        },
    )?;
    rows.collect()
}
