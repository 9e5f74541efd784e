//! Table `ssh_log`: the SSH records, each a chain entry (`seq` is its position in the chain).
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;
use serde_json::json;

use super::chain::{self, Head};
use crate::audit::ssh_records::{SessionKeys, SshEvent, SshRecord};

/// The chain entry kind of an SSH record.
pub const KIND: &str = "ssh";

/// A row of `ssh_log`, with its chain links.
#[derive(Debug, Clone, Serialize)]
pub struct LogRow {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub keys: SessionKeys,
    pub channel_seq: Option<u32>,
    pub body: String,
    #[serde(skip)]
    pub prev_hash: Vec<u8>,
    #[serde(skip)]
    pub hash: Vec<u8>,
}

impl LogRow {
    pub fn event(&self) -> Option<SshEvent> {
        serde_json::from_str(&self.body).ok()
    }
}

/// Appends one record as chain entry `head.seq + 1`; returns its seq.
pub fn append(conn: &Connection, head: &mut Head, r: &SshRecord) -> rusqlite::Result<u64> {
    let seq = head.seq + 1;
    let k = &r.keys;
    conn.prepare_cached(
        "INSERT INTO ssh_log (seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login,
                              cert_serial, rule, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        seq as i64,
        r.at_ms,
        r.event.kind(),
        k.tenant,
        k.session_id,
        r.channel_seq,
        k.device,
        k.user,
        k.target,
        k.login,
        k.cert_serial.map(|s| s.to_string()),
        k.rule,
        serde_json::to_string(&r.event).unwrap_or_default(),
    ])?;
    let canonical = canonical(conn, seq)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    chain::push(conn, head, KIND, r.at_ms, &chain::digest(&canonical))
}

/// The row of chain entry `entry`, as hashed (every column).
pub fn canonical(conn: &Connection, entry: u64) -> rusqlite::Result<Option<serde_json::Value>> {
    conn.prepare_cached(
        "SELECT seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login, cert_serial,
                rule, body
         FROM ssh_log WHERE seq = ?1",
    )?
    .query_row([entry as i64], |r| {
        Ok(json!([
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<i64>>(5)?,
            r.get::<_, String>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, String>(8)?,
            r.get::<_, String>(9)?,
            r.get::<_, Option<String>>(10)?,
            r.get::<_, String>(11)?,
            r.get::<_, String>(12)?,
        ]))
    })
    .optional()
}
