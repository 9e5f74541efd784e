//! Table `http_requests`: one row per request the HTTP inspector handled (or TLS connection it decided
//! without decrypting). A row links to its flow's row by `(run_id, flow seq)`: the flow's start record went
//! through the same queue before it, so it is in this transaction or an earlier one (or was lost: no link).
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::audit::http_records::HttpRecord;

pub fn insert(conn: &Connection, run_id: i64, r: &HttpRecord) -> rusqlite::Result<()> {
    let flow_id: Option<i64> = conn
        .prepare_cached("SELECT id FROM flows WHERE run_id = ?1 AND seq = ?2")?
        .query_row(params![run_id, r.flow_seq as i64], |row| row.get(0))
        .optional()?;
    conn.prepare_cached(
        "INSERT INTO http_requests (at_ms, ref_id, flow_seq, flow_id, tenant, device, user, src, dst, scheme,
            sni, method, host, path, status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
            ?21, ?22)",
    )?
    .execute(params![
        r.at_ms,
        r.ref_id,
        r.flow_seq as i64,
        flow_id,
        r.tenant,
        r.device,
        r.user,
        r.src,
        r.dst,
        r.scheme,
        r.sni,
        r.method,
        r.host,
        r.path,
        r.status,
        r.req_bytes as i64,
        r.resp_bytes as i64,
        r.duration_ms as i64,
        r.flow_rule,
        r.rule,
        r.decision,
        r.error,
    ])?;
    Ok(())
}
