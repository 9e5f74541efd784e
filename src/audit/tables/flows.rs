//! Table `flows`: one row per flow, inserted at its start and updated when it is established and when it
//! ends, keyed by `(run_id, seq)` (flow numbers restart with each gateway run).
#![deny(unsafe_code)]

use rusqlite::{params, Connection};

use crate::clock::WallClock;
use crate::core::FlowEvent;

/// Writes one flow event; returns whether a row was inserted or updated (an update of a flow whose start
/// record was lost touches nothing).
pub fn write(
    conn: &Connection,
    run_id: i64,
    clock: &WallClock,
    ev: &FlowEvent,
) -> rusqlite::Result<bool> {
    let n = match ev {
        FlowEvent::Start(s) => conn
            .prepare_cached(
                "INSERT OR IGNORE INTO flows (run_id, seq, tenant, device, user, protocol, src, sport, dst, dport,
                     dst_device, action, rule, started_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
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
                clock.unix_ms(s.at),
            ])?,
        FlowEvent::Established { seq, at } => conn
            .prepare_cached("UPDATE flows SET established_ms = ?3 WHERE run_id = ?1 AND seq = ?2")?
            .execute(params![run_id, *seq as i64, clock.unix_ms(*at)])?,
        FlowEvent::End {
            seq,
            at,
            packets,
            bytes,
            reason,
        } => conn
            .prepare_cached(
                "UPDATE flows SET ended_ms = ?3, packets_out = ?4, bytes_out = ?5, packets_in = ?6, bytes_in = ?7,
                     end_reason = ?8
                 WHERE run_id = ?1 AND seq = ?2",
            )?
            .execute(params![
                run_id,
                *seq as i64,
                clock.unix_ms(*at),
                packets[0] as i64,
                bytes[0] as i64,
                packets[1] as i64,
                bytes[1] as i64,
                reason.as_str()
            ])?,
        FlowEvent::Upgraded(_) | FlowEvent::Released { .. } => 0,
    };
    Ok(n > 0)
}
