//! Table `admin_log`: one row per review UI record (`audit::admin_records`), each a chain entry; the row's key
//! is its chain seq.
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use serde_json::json;

use super::chain::{self, Head};
use crate::audit::admin_records::AdminRecord;

/// The chain entry kind of a review UI record.
pub const KIND: &str = "admin";

pub fn insert(conn: &Connection, head: &mut Head, r: &AdminRecord) -> rusqlite::Result<()> {
    let seq = head.seq + 1;
    conn.prepare_cached(
        "INSERT INTO admin_log (chain_seq, at_ms, event, actor, tenant, session_id, source, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        seq as i64,
        r.at_ms,
        r.event.as_str(),
        r.actor,
        r.tenant,
        r.session_id,
        r.source,
        r.detail.to_string(),
    ])?;
    let canonical = canonical(conn, seq)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    chain::push(conn, head, KIND, r.at_ms, &chain::digest(&canonical))?;
    Ok(())
}

/// The row of chain entry `entry`, as hashed.
pub fn canonical(conn: &Connection, entry: u64) -> rusqlite::Result<Option<serde_json::Value>> {
    conn.prepare_cached(
        "SELECT at_ms, event, actor, tenant, session_id, source, detail FROM admin_log WHERE chain_seq = ?1",
    )?
    .query_row([entry as i64], |r| {
        Ok(json!([
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, String>(6)?,
        ]))
    })
    .optional()
}
