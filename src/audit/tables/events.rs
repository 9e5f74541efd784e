//! Table `events`: what the gateway says about the audit trail itself, in the chain like any record:
//! `chain.start` (the first entry: rows already in the store when the chain began), `run.start` (a gateway
//! run began; whether the previous one stopped cleanly), `gap` (records lost since the previous gap record, by
//! kind and reason), `eviction` (records removed to stay under the size quota), `run.end`.
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use serde_json::json;

use super::chain::{self, Head};

pub const CHAIN_START: &str = "chain.start";
pub const RUN_START: &str = "run.start";
pub const RUN_END: &str = "run.end";
pub const GAP: &str = "gap";
pub const EVICTION: &str = "eviction";

/// Appends an event and chains it; returns its seq.
pub fn append(
    conn: &Connection,
    head: &mut Head,
    kind: &str,
    at_ms: i64,
    body: &serde_json::Value,
) -> rusqlite::Result<u64> {
    let seq = head.seq + 1;
    conn.prepare_cached("INSERT INTO events (seq, at_ms, kind, body) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![seq as i64, at_ms, kind, body.to_string()])?;
    let canonical = canonical(conn, seq)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    chain::push(conn, head, kind, at_ms, &chain::digest(&canonical))
}

pub fn canonical(conn: &Connection, entry: u64) -> rusqlite::Result<Option<serde_json::Value>> {
    conn.prepare_cached("SELECT seq, at_ms, kind, body FROM events WHERE seq = ?1")?
        .query_row([entry as i64], |r| {
            Ok(json!([
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?
            ]))
        })
        .optional()
}

/// The kind and body of the event at `seq`.
pub fn get(conn: &Connection, seq: u64) -> rusqlite::Result<Option<(String, serde_json::Value)>> {
    conn.prepare_cached("SELECT kind, body FROM events WHERE seq = ?1")?
        .query_row([seq as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
            ))
        })
        .optional()
}

/// The last event of the chain of one of `kinds`.
pub fn last_of(conn: &Connection, kinds: &[&str]) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare_cached("SELECT kind FROM events ORDER BY seq DESC")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let k: String = r.get(0)?;
        if kinds.contains(&k.as_str()) {
            return Ok(Some(k));
        }
    }
    Ok(None)
}
