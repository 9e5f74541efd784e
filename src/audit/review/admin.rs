//! Review of the review UI's own records (`rampart audit admin`): sign-ins, recording reads, terminations.
#![deny(unsafe_code)]

use std::path::Path;

use rusqlite::params;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct AdminRow {
    pub seq: i64,
    pub at_ms: i64,
    pub event: String,
    pub actor: String,
    pub tenant: Option<String>,
    pub session_id: Option<String>,
    pub source: Option<String>,
    pub detail: serde_json::Value,
}

/// Records since `since_ms` (all when `None`), newest first, at most `limit`.
pub fn query(path: &Path, since_ms: Option<i64>, limit: usize) -> rusqlite::Result<Vec<AdminRow>> {
    let conn = crate::audit::db::open_readonly(path)?;
    if !crate::audit::db::has_table(&conn, "admin_log")? {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(
        "SELECT chain_seq, at_ms, event, actor, tenant, session_id, source, detail FROM admin_log
         WHERE (?1 IS NULL OR at_ms >= ?1) ORDER BY chain_seq DESC LIMIT ?2",
    )?;
    let rows = st.query_map(
        params![since_ms, limit.min(i64::MAX as usize) as i64],
        |r| {
            let detail: String = r.get(7)?;
            Ok(AdminRow {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                event: r.get(2)?,
                actor: r.get(3)?,
                tenant: r.get(4)?,
                session_id: r.get(5)?,
                source: r.get(6)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        },
    )?;
    rows.collect()
}
