//! Table `flows`: one row per flow, inserted at its start and updated when it is established and when it
//! ends, keyed by `(run_id, seq)` (flow numbers restart with each gateway run). Each of the three events is a
//! chain entry (`start_chain`, `est_chain`, `end_chain`) whose digest covers the row as it stood then, so a
//! later change to any column shows.
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use serde_json::json;

use super::chain::{self, Head};
use crate::clock::WallClock;
use crate::core::FlowEvent;

/// The chain entry kinds of a flow's events.
pub const START: &str = "flow.start";
pub const ESTABLISHED: &str = "flow.established";
pub const END: &str = "flow.end";

/// Writes one flow event and chains it; `false` when there was nothing to write (an update of a flow whose
/// start record was lost, or a repeated event).
pub fn write(
    conn: &Connection,
    head: &mut Head,
    run_id: i64,
    clock: &WallClock,
    ev: &FlowEvent,
) -> rusqlite::Result<bool> {
    let seq = head.seq + 1;
    let (kind, at_ms, n) = match ev {
        FlowEvent::Start(s) => {
            let at_ms = clock.unix_ms(s.at);
            let n = conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO flows (run_id, seq, tenant, device, user, protocol, src, sport, dst,
                         dport, dst_device, action, rule, started_ms, start_chain)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                )?
                .execute(params![
                    run_id,
                    s.seq.get() as i64,
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
                    seq as i64,
                ])?;
            (START, at_ms, n)
        }
        FlowEvent::Established { seq: flow, at } => {
            let at_ms = clock.unix_ms(*at);
            let n = conn
                .prepare_cached(
                    "UPDATE flows SET established_ms = ?3, est_chain = ?4
                     WHERE run_id = ?1 AND seq = ?2 AND est_chain IS NULL AND end_chain IS NULL",
                )?
                .execute(params![run_id, flow.get() as i64, at_ms, seq as i64])?;
            (ESTABLISHED, at_ms, n)
        }
        FlowEvent::End {
            seq: flow,
            at,
            packets,
            bytes,
            reason,
        } => {
            let at_ms = clock.unix_ms(*at);
            let n = conn
                .prepare_cached(
                    "UPDATE flows SET ended_ms = ?3, packets_out = ?4, bytes_out = ?5, packets_in = ?6,
                         bytes_in = ?7, end_reason = ?8, end_chain = ?9
                     WHERE run_id = ?1 AND seq = ?2 AND end_chain IS NULL",
                )?
                .execute(params![
                    run_id,
                    flow.get() as i64,
                    at_ms,
                    packets[0] as i64,
                    bytes[0] as i64,
                    packets[1] as i64,
                    bytes[1] as i64,
                    reason.as_str(),
                    seq as i64,
                ])?;
            (END, at_ms, n)
        }
        FlowEvent::Upgraded(_) | FlowEvent::Released { .. } => return Ok(false),
    };
    if n == 0 {
        return Ok(false);
    }
    let canonical = canonical(conn, kind, seq)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    chain::push(conn, head, kind, at_ms, &chain::digest(&canonical))?;
    Ok(true)
}

/// The row that chain entry `entry` (of kind `kind`) describes, as hashed: the start columns, plus the
/// establishment, plus the end, as the entry's kind covers, and last the row's id (review links and URLs name
/// flows by it). Entries written before the id was hashed cover [`without_row_id`] of this.
pub fn canonical(
    conn: &Connection,
    kind: &str,
    entry: u64,
) -> rusqlite::Result<Option<serde_json::Value>> {
    let column = match kind {
        START => "start_chain",
        ESTABLISHED => "est_chain",
        END => "end_chain",
        _ => return Ok(None),
    };
    let sql = format!(
        "SELECT run_id, seq, tenant, device, user, protocol, src, sport, dst, dport, dst_device, action, rule,
                started_ms, established_ms, ended_ms, packets_out, bytes_out, packets_in, bytes_in, end_reason, id
         FROM flows WHERE {column} = ?1"
    );
    conn.prepare_cached(&sql)?
        .query_row([entry as i64], |r| {
            let mut v = vec![
                json!(r.get::<_, i64>(0)?),
                json!(r.get::<_, i64>(1)?),
                json!(r.get::<_, String>(2)?),
                json!(r.get::<_, String>(3)?),
                json!(r.get::<_, String>(4)?),
                json!(r.get::<_, i64>(5)?),
                json!(r.get::<_, String>(6)?),
                json!(r.get::<_, i64>(7)?),
                json!(r.get::<_, String>(8)?),
                json!(r.get::<_, i64>(9)?),
                json!(r.get::<_, Option<String>>(10)?),
                json!(r.get::<_, String>(11)?),
                json!(r.get::<_, String>(12)?),
                json!(r.get::<_, i64>(13)?),
            ];
            if kind != START {
                v.push(json!(r.get::<_, Option<i64>>(14)?));
            }
            if kind == END {
                v.push(json!(r.get::<_, Option<i64>>(15)?));
                for i in 16..20 {
                    v.push(json!(r.get::<_, i64>(i)?));
                }
                v.push(json!(r.get::<_, Option<String>>(20)?));
            }
            v.push(json!(r.get::<_, i64>(21)?));
            Ok(serde_json::Value::Array(v))
        })
        .optional()
}

/// `canonical` as entries written before the row id was hashed covered it (stores from before; the id of such
/// a row is not protected, every other column is). A newer entry's digest never matches this form: the arrays
/// differ in length.
pub fn without_row_id(canonical: &serde_json::Value) -> serde_json::Value {
    let mut v = canonical.as_array().cloned().unwrap_or_default();
    v.pop();
    serde_json::Value::Array(v)
}

/// How review names the flow of chain entry `entry`: `flow N of run R (flow row I)`.
pub fn describe(conn: &Connection, kind: &str, entry: u64) -> Option<String> {
    let column = match kind {
        START => "start_chain",
        ESTABLISHED => "est_chain",
        END => "end_chain",
        _ => return None,
    };
    conn.query_row(
        &format!("SELECT seq, run_id, id FROM flows WHERE {column} = ?1"),
        [entry as i64],
        |r| {
            Ok(format!(
                "{kind} of flow {} of run {} (flow row {})",
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?
            ))
        },
    )
    .optional()
    .ok()
    .flatten()
}
