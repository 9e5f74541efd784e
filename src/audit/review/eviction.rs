//! `rampart audit verify` over a chain cut by evictions (`audit::quota`): the eviction record that vouches for
//! the cut names every row left in the store whose chain entries were removed (open flows, SSH sessions that go
//! on past the cut), each with its entry's digest. Each of those rows must still be there as it was, and no
//! other row may refer to a removed entry.
#![deny(unsafe_code)]

use std::collections::HashSet;
use std::path::Path;

use rusqlite::Connection;
use serde_json::Value;

use super::verify::{check_recording, row_matches, Break, VerifyReport};
use crate::audit::quota;
use crate::audit::tables::ssh;

/// Checks the store below `first` (the chain's first entry) against `body`, the eviction record at `at` that
/// vouches for the cut; records what was evicted in `report`.
pub(super) fn check_cut(
    conn: &Connection,
    state_dir: &Path,
    report: &mut VerifyReport,
    at: u64,
    body: &Value,
) -> anyhow::Result<Option<Break>> {
    let first = report.first_seq;
    report.evicted_records = serde_json::from_value(body["removed_since_chain_start"].clone())
        .unwrap_or_else(|_| quota::removed(body));
    let fail = |seq: u64, what: String| Ok(Some(Break { seq, what }));
    let kept = quota::kept(body);
    let mut named = HashSet::new();
    for (seq, kind, digest) in &kept {
        if *seq >= first {
            return fail(
                at,
                format!("eviction record {at} names record {seq} as removed, but the chain still has it"),
            );
        }
        let digest = hex::decode(digest).unwrap_or_default();
        match row_matches(conn, kind, *seq, &digest)? {
            None => {
                return fail(
                    *seq,
                    format!(
                        "record {seq} ({kind}), kept open across the eviction at record {at}, was removed from its table"
                    ),
                )
            }
            Some(false) => {
                return fail(
                    *seq,
                    format!(
                        "record {seq} ({kind}), kept open across the eviction at record {at}, was altered: its hash does not match its content"
                    ),
                )
            }
            Some(true) => {}
        }
        if kind == ssh::KIND {
            if let Some(what) = check_recording(conn, state_dir, *seq, report)? {
                return fail(*seq, what);
            }
        }
        named.insert(*seq);
    }
    // Rows whose last entry is older than the chain's first must be ones the eviction kept.
    let older = |sql: &str| -> rusqlite::Result<Vec<u64>> {
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([first as i64], |r| Ok(r.get::<_, i64>(0)? as u64))?;
        rows.collect()
    };
    let checks = [
        (
            "flows",
            "SELECT max(start_chain, coalesce(est_chain, 0), coalesce(end_chain, 0)) AS last FROM flows
             WHERE start_chain < ?1 AND last < ?1",
        ),
        ("ssh_log", "SELECT seq FROM ssh_log WHERE seq < ?1"),
        (
            "http_requests",
            "SELECT chain_seq FROM http_requests WHERE chain_seq < ?1",
        ),
        ("events", "SELECT seq FROM events WHERE seq < ?1"),
        (
            "enroll_log",
            "SELECT chain_seq FROM enroll_log WHERE chain_seq < ?1",
        ),
        (
            "admin_log",
            "SELECT chain_seq FROM admin_log WHERE chain_seq < ?1",
        ),
    ];
    for (table, sql) in checks {
        if let Some(seq) = older(sql)?.into_iter().find(|s| !named.contains(s)) {
            return fail(
                seq,
                format!(
                    "a row of table {table} refers to record {seq}, which the eviction at record {at} removed without keeping it (added behind the gateway's back)"
                ),
            );
        }
    }
    // The first eviction removed every row from before the chain.
    let unchained: i64 = conn.query_row(
        "SELECT (SELECT count(*) FROM flows WHERE start_chain IS NULL)
              + (SELECT count(*) FROM http_requests WHERE chain_seq IS NULL)
              + (SELECT count(*) FROM ssh_log_v1)",
        [],
        |r| r.get(0),
    )?;
    if unchained > 0 {
        return fail(
            first,
            format!("{unchained} rows outside the chain were added after the eviction at record {at} removed the older ones"),
        );
    }
    Ok(None)
}
