//! Review of HTTP records (`rampart audit http`): the query and its filters.
#![deny(unsafe_code)]

use std::path::Path;

use rusqlite::params;
use serde::Serialize;

use crate::audit::http_records::HttpRecord;

/// A stored record as review shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRow {
    pub id: i64,
    pub flow_id: Option<i64>,
    #[serde(flatten)]
    pub record: HttpRecord,
}

/// Filters for `rampart audit http` and the review UI's `/api/v1/http`; `None` = no filter.
#[derive(Debug, Default)]
pub struct HttpFilter {
    pub tenant: Option<String>,
    /// Only these tenants (the caller's scope); `None` = every tenant.
    pub tenant_in: Option<Vec<String>>,
    pub user: Option<String>,
    pub device: Option<String>,
    /// Exact host (case-insensitive).
    pub host: Option<String>,
    /// `allowed`, `blocked`, `logged`, ... as recorded.
    pub decision: Option<String>,
    pub flow_id: Option<i64>,
    pub since_ms: Option<i64>,
    /// At or before.
    pub until_ms: Option<i64>,
    /// Page cursor: only records after `(at_ms, id)` in the newest-first order.
    pub before: Option<(i64, i64)>,
    pub limit: usize,
}

/// Records matching `f`, newest first. An audit store without HTTP records yields none.
pub fn query(path: &Path, f: &HttpFilter) -> rusqlite::Result<Vec<HttpRow>> {
    let conn = crate::audit::db::open_readonly(path)?;
    if !crate::audit::db::has_table(&conn, "http_requests")? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT id, flow_id, at_ms, ref_id, flow_seq, tenant, device, user, src, dst, scheme, sni, method, host,
                path, status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error
         FROM http_requests
         WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR user = ?2) AND (?3 IS NULL OR host = lower(?3))
           AND (?4 IS NULL OR flow_id = ?4) AND (?5 IS NULL OR at_ms >= ?5) AND (?6 IS NULL OR at_ms <= ?6)
           AND (?7 IS NULL OR device = ?7) AND (?8 IS NULL OR decision = ?8)
           AND (?9 IS NULL OR at_ms < ?9 OR (at_ms = ?9 AND id < ?10))
         ORDER BY at_ms DESC, id DESC",
    )?;
    let rows = stmt.query_map(
        params![
            f.tenant,
            f.user,
            f.host,
            f.flow_id,
            f.since_ms,
            f.until_ms,
            f.device,
            f.decision,
            f.before.map(|b| b.0),
            f.before.map(|b| b.1),
        ],
        |r| {
            Ok(HttpRow {
                id: r.get(0)?,
                flow_id: r.get(1)?,
                record: HttpRecord {
                    at_ms: r.get(2)?,
                    ref_id: r.get(3)?,
                    flow_seq: r.get::<_, i64>(4)? as u64,
                    tenant: r.get(5)?,
                    device: r.get(6)?,
                    user: r.get(7)?,
                    src: r.get(8)?,
                    dst: r.get(9)?,
                    scheme: r.get(10)?,
                    sni: r.get(11)?,
                    method: r.get(12)?,
                    host: r.get(13)?,
                    path: r.get(14)?,
                    status: r.get(15)?,
                    req_bytes: r.get::<_, i64>(16)? as u64,
                    resp_bytes: r.get::<_, i64>(17)? as u64,
                    duration_ms: r.get::<_, i64>(18)? as u64,
                    flow_rule: r.get(19)?,
                    rule: r.get(20)?,
                    decision: r.get(21)?,
                    error: r.get(22)?,
                },
            })
        },
    )?;
    // The scope is applied before the limit, so a page is full whenever enough visible records exist.
    let mut out = Vec::new();
    for row in rows {
        let row = row?;
        if out.len() >= f.limit {
            break;
        }
        if f.tenant_in
            .as_ref()
            .is_some_and(|t| !t.contains(&row.record.tenant))
        {
            continue;
        }
        out.push(row);
    }
    Ok(out)
}
