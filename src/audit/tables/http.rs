//! Table `http_requests`: one row per request the HTTP inspector handled (or TLS connection it decided
//! without decrypting), each a chain entry. A row links to its flow's row by `(run_id, flow seq)`: the
//! flow's start record went through the same queue before it, so it is in this transaction or an earlier one
//! (or was lost: no link, never another run's flow).
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use serde_json::json;

use super::chain::{self, Head};
use crate::audit::http_records::HttpRecord;

/// The chain entry kind of an HTTP record.
pub const KIND: &str = "http";

pub fn insert(
    conn: &Connection,
    head: &mut Head,
    run_id: i64,
    r: &HttpRecord,
) -> rusqlite::Result<()> {
    let seq = head.seq + 1;
    let flow_id: Option<i64> = conn
        .prepare_cached("SELECT id FROM flows WHERE run_id = ?1 AND seq = ?2")?
        .query_row(params![run_id, r.flow_seq as i64], |row| row.get(0))
        .optional()?;
    conn.prepare_cached(
        "INSERT INTO http_requests (at_ms, ref_id, flow_seq, flow_id, tenant, device, user, src, dst, scheme,
            sni, method, host, path, status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error,
            run_id, chain_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
            ?21, ?22, ?23, ?24)",
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
        run_id,
        seq as i64,
    ])?;
    let canonical = canonical(conn, seq)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    chain::push(conn, head, KIND, r.at_ms, &chain::digest(&canonical))?;
    Ok(())
}

/// The row of chain entry `entry`, as hashed (every column but the row id).
pub fn canonical(conn: &Connection, entry: u64) -> rusqlite::Result<Option<serde_json::Value>> {
    conn.prepare_cached(
        "SELECT at_ms, ref_id, flow_seq, flow_id, tenant, device, user, src, dst, scheme, sni, method, host, path,
                status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error, run_id
         FROM http_requests WHERE chain_seq = ?1",
    )?
    .query_row([entry as i64], |r| {
        Ok(json!([
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<i64>>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, String>(8)?,
            r.get::<_, String>(9)?,
            r.get::<_, Option<String>>(10)?,
            r.get::<_, String>(11)?,
            r.get::<_, String>(12)?,
            r.get::<_, String>(13)?,
            r.get::<_, Option<i64>>(14)?,
            r.get::<_, i64>(15)?,
            r.get::<_, i64>(16)?,
            r.get::<_, i64>(17)?,
            r.get::<_, String>(18)?,
            r.get::<_, Option<String>>(19)?,
            r.get::<_, String>(20)?,
            r.get::<_, Option<String>>(21)?,
            r.get::<_, Option<i64>>(22)?,
        ]))
    })
    .optional()
}
