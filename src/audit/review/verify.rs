//! `rampart audit verify`: proves the store holds what the gateway wrote, with a public key pinned out of
//! band. It walks the whole chain (sequence, links, each entry's hash, each record's row against its digest,
//! each recording's sha256), finds rows no entry vouches for, checks every checkpoint's signature with the
//! pinned key, and, given the head exported outside the store, that no tail was cut. It stops at the first
//! break and says where.
#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _};
use russh::keys::ssh_key::{HashAlg, PublicKey, SshSig};
use serde::Serialize;

use crate::audit::ssh_records::{file_sha256, SshEvent};
use crate::audit::tables::chain::{self, Checkpoint, HeadLine, CHECKPOINT_NAMESPACE};
use crate::audit::tables::{admin, enroll, events, flows, http, ssh};

/// Where the store stops agreeing with itself, its signatures or the exported head.
#[derive(Debug, Clone, Serialize)]
pub struct Break {
    pub seq: u64,
    pub what: String,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Chain entries verified, and how many of each kind.
    pub records: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub recordings: u64,
    pub checkpoints: u64,
    pub last_checkpoint_seq: Option<u64>,
    /// Entries after the last signed checkpoint (chained, not yet signed).
    pub unsigned_tail: u64,
    /// The exported head that was checked, if any.
    pub head_seq: Option<u64>,
    /// Gap records, and the records they say were lost.
    pub gaps: u64,
    pub records_lost: u64,
    /// Eviction records (records removed under the size quota) and how many entries they removed.
    pub evictions: u64,
    pub evicted_through: Option<u64>,
    /// Chain entries evicted since the chain began, by kind (as the vouching eviction record counts them).
    pub evicted_records: BTreeMap<String, u64>,
    /// Rows from before the chain (schema 1), which it does not cover, and how many of each table.
    pub unchained_rows: u64,
    pub unchained_by_table: BTreeMap<String, u64>,
    pub first_break: Option<Break>,
}

/// The exported head with the highest seq whose signature is the pinned key's, from lines of a head file or
/// a syslog file. `Err` names what is wrong when no line qualifies.
pub fn pick_head(text: &str, pinned: &PublicKey) -> Result<Checkpoint, String> {
    let mut found = 0;
    let mut best: Option<Checkpoint> = None;
    for cp in text.lines().filter_map(HeadLine::parse) {
        found += 1;
        if signature_ok(&cp, pinned).is_ok() && best.as_ref().is_none_or(|b| cp.seq > b.seq) {
            best = Some(cp);
        }
    }
    match (best, found) {
        (Some(b), _) => Ok(b),
        (None, 0) => Err("holds no exported audit head (lines with \"rampart-audit-head\")".into()),
        (None, n) => Err(format!(
            "holds {n} exported heads, none signed by the pinned key"
        )),
    }
}

fn signature_ok(cp: &Checkpoint, pinned: &PublicKey) -> Result<(), String> {
    let pinned_fp = pinned.fingerprint(HashAlg::Sha256).to_string();
    if cp.key_fingerprint != pinned_fp {
        return Err(format!(
            "is signed by key {}, not the pinned key {pinned_fp} (the store was re-signed with another key, or the \
             pinned key is not this gateway's)",
            cp.key_fingerprint
        ));
    }
    let sig = SshSig::from_pem(cp.signature.as_bytes())
        .map_err(|e| format!("has an unreadable signature: {e}"))?;
    pinned
        .verify(
            CHECKPOINT_NAMESPACE,
            &chain::checkpoint_message(cp.seq, &cp.hash),
            &sig,
        )
        .map_err(|_| {
            format!("has a signature that does not verify with the pinned key {pinned_fp}")
        })
}

/// What a record of each chain kind is called in messages.
fn describe(conn: &Connection, kind: &str, seq: u64) -> String {
    if kind == ssh::KIND {
        let row: Option<(String, String)> = conn
            .query_row(
                "SELECT kind, session_id FROM ssh_log WHERE seq = ?1",
                [seq as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .ok()
            .flatten();
        if let Some((k, s)) = row {
            return format!("{k} of session {s}");
        }
        return "SSH record".into();
    }
    if let Some(d) = flows::describe(conn, kind, seq) {
        return d;
    }
    match kind {
        http::KIND => http_ref(conn, seq)
            .map(|r| format!("HTTP request ref {r}"))
            .unwrap_or_else(|| "HTTP request".into()),
        enroll::KIND => "enrollment record".into(),
        admin::KIND => "review UI record".into(),
        k => k.to_string(),
    }
}

pub(crate) fn canonical(
    conn: &Connection,
    kind: &str,
    seq: u64,
) -> rusqlite::Result<Option<serde_json::Value>> {
    match kind {
        flows::START | flows::ESTABLISHED | flows::END => flows::canonical(conn, kind, seq),
        http::KIND => http::canonical(conn, seq),
        ssh::KIND => ssh::canonical(conn, seq),
        enroll::KIND => enroll::canonical(conn, seq),
        admin::KIND => admin::canonical(conn, seq),
        _ => events::canonical(conn, seq),
    }
}

/// Whether the row of chain entry `seq` still hashes to `digest`; `None` when the row is gone. A flow entry
/// from before flow row ids were hashed matches without the id (`flows::without_row_id`).
pub(super) fn row_matches(
    conn: &Connection,
    kind: &str,
    seq: u64,
    digest: &[u8],
) -> rusqlite::Result<Option<bool>> {
    let Some(c) = canonical(conn, kind, seq)? else {
        return Ok(None);
    };
    let legacy_flow = || {
        matches!(kind, flows::START | flows::ESTABLISHED | flows::END)
            && chain::digest(&flows::without_row_id(&c)) == digest
    };
    Ok(Some(chain::digest(&c) == digest || legacy_flow()))
}

/// Verifies the store on `conn` (recordings under `state_dir`) against the `pinned` key and, when given, the
/// exported `head`.
pub fn verify(
    conn: &Connection,
    state_dir: &Path,
    pinned: &PublicKey,
    head: Option<&Checkpoint>,
) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let checkpoints = chain::checkpoints(conn)?;
    let mut wanted: HashSet<u64> = checkpoints.iter().map(|c| c.seq).collect();
    wanted.extend(head.map(|h| h.seq));
    let mut hashes: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut prev: Option<Vec<u8>> = None;
    let mut first_prev = Vec::new();
    let mut evictions: Vec<(u64, serde_json::Value)> = Vec::new();
    let mut chain_start_unchained: Option<BTreeMap<String, u64>> = None;
    let mut after = 0u64;
    'walk: loop {
        let entries = chain::entries_after(conn, after, 10_000)?;
        if entries.is_empty() {
            break;
        }
        for e in &entries {
            let fail = |what: String| Break { seq: e.seq, what };
            match &prev {
                None => {
                    report.first_seq = e.seq;
                    first_prev = e.prev_hash.clone();
                    if e.seq == 1 && e.prev_hash != vec![0u8; 32] {
                        report.first_break = Some(fail("record 1 does not start the chain".into()));
                        break 'walk;
                    }
                }
                Some(p) => {
                    if e.seq != report.last_seq + 1 {
                        report.first_break = Some(Break {
                            seq: report.last_seq + 1,
                            what: format!(
                                "record {} is missing (the chain goes from {} to {})",
                                report.last_seq + 1,
                                report.last_seq,
                                e.seq
                            ),
                        });
                        break 'walk;
                    }
                    if e.prev_hash != *p {
                        report.first_break = Some(fail(format!(
                            "record {} does not link to record {}",
                            e.seq, report.last_seq
                        )));
                        break 'walk;
                    }
                }
            }
            if chain::entry_hash(&e.prev_hash, e.seq, &e.kind, e.at_ms, &e.digest) != e.hash {
                report.first_break = Some(fail(format!(
                    "record {} ({}) was altered in the chain: its hash does not match",
                    e.seq, e.kind
                )));
                break 'walk;
            }
            match row_matches(conn, &e.kind, e.seq, &e.digest)? {
                None => {
                    report.first_break = Some(fail(format!(
                        "record {} ({}) was removed from its table",
                        e.seq, e.kind
                    )));
                    break 'walk;
                }
                Some(false) => {
                    report.first_break = Some(fail(format!(
                        "record {} ({}) was altered: its hash does not match its content",
                        e.seq,
                        describe(conn, &e.kind, e.seq)
                    )));
                    break 'walk;
                }
                Some(true) => {}
            }
            if e.kind == ssh::KIND {
                if let Some(what) = check_recording(conn, state_dir, e.seq, &mut report)? {
                    report.first_break = Some(fail(what));
                    break 'walk;
                }
            }
            if let Some((kind, body)) = events::get(conn, e.seq)? {
                match kind.as_str() {
                    events::GAP => {
                        report.gaps += 1;
                        report.records_lost += body["records_lost"].as_u64().unwrap_or(0);
                    }
                    events::EVICTION => {
                        report.evictions += 1;
                        evictions.push((e.seq, body.clone()));
                    }
                    events::CHAIN_START => {
                        let u = &body["unchained_rows"];
                        chain_start_unchained = Some(
                            UNCHAINED
                                .iter()
                                .map(|(t, _)| (t.to_string(), u[t].as_u64().unwrap_or(0)))
                                .collect(),
                        );
                    }
                    _ => {}
                }
            }
            if wanted.contains(&e.seq) {
                hashes.insert(e.seq, e.hash.clone());
            }
            *report.by_kind.entry(e.kind.clone()).or_default() += 1;
            report.records += 1;
            report.last_seq = e.seq;
            prev = Some(e.hash.clone());
            after = e.seq;
        }
    }
    if report.first_break.is_none() {
        report.first_break = check_coverage(
            conn,
            state_dir,
            &mut report,
            &evictions,
            &first_prev,
            chain_start_unchained,
        )?;
    }
    for cp in &checkpoints {
        if report.first_break.is_some() {
            break;
        }
        if cp.seq < report.first_seq {
            // Signed before an eviction removed what it covered; the eviction record vouches for the cut.
            continue;
        }
        report.checkpoints += 1;
        let what = match hashes.get(&cp.seq) {
            Some(h) if *h == cp.hash => signature_ok(cp, pinned).err(),
            Some(_) => Some("does not match the chain".into()),
            None => Some(format!(
                "is beyond the end of the chain (record {}): records were removed from the tail",
                report.last_seq
            )),
        };
        if let Some(what) = what {
            report.first_break = Some(Break {
                seq: cp.seq,
                what: format!("checkpoint at record {} {what}", cp.seq),
            });
            break;
        }
        report.last_checkpoint_seq = Some(cp.seq);
    }
    if let (None, Some(h)) = (&report.first_break, head) {
        report.head_seq = Some(h.seq);
        report.first_break = match hashes.get(&h.seq) {
            _ if h.seq > report.last_seq => Some(Break {
                seq: report.last_seq + 1,
                what: format!(
                    "the exported head names record {}, but the store ends at record {}: the tail was removed",
                    h.seq, report.last_seq
                ),
            }),
            Some(x) if *x == h.hash => None,
            _ => Some(Break {
                seq: h.seq,
                what: format!(
                    "record {} is not the one the exported head names (the chain was rewritten)",
                    h.seq
                ),
            }),
        };
    }
    report.unsigned_tail = report.last_seq.saturating_sub(
        report
            .last_checkpoint_seq
            .unwrap_or(report.first_seq.saturating_sub(1)),
    );
    Ok(report)
}

/// A channel.close record's recording must hash as recorded.
pub(super) fn check_recording(
    conn: &Connection,
    state_dir: &Path,
    seq: u64,
    report: &mut VerifyReport,
) -> anyhow::Result<Option<String>> {
    let body: Option<String> = conn
        .query_row(
            "SELECT body FROM ssh_log WHERE seq = ?1 AND kind = 'channel.close'",
            [seq as i64],
            |r| r.get(0),
        )
        .optional()?;
    let Some(SshEvent::ChannelClose(c)) = body.and_then(|b| serde_json::from_str(&b).ok()) else {
        return Ok(None);
    };
    let Some(rec) = c.recording.as_ref().filter(|x| x.sha256.is_some()) else {
        return Ok(None);
    };
    report.recordings += 1;
    Ok(match file_sha256(&state_dir.join(&rec.path)) {
        Ok((h, _)) if Some(&h) == rec.sha256.as_ref() => None,
        Ok((h, _)) => Some(format!(
            "recording {} was altered: sha256 {h}, record {seq} says {}",
            rec.path,
            rec.sha256.as_deref().unwrap_or("")
        )),
        Err(e) => Some(format!(
            "recording {} is missing or unreadable: {e}",
            rec.path
        )),
    })
}

/// Every row is vouched for by a chain entry, and a chain that does not start at 1 was cut by an eviction
/// record that says so.
fn check_coverage(
    conn: &Connection,
    state_dir: &Path,
    report: &mut VerifyReport,
    evictions: &[(u64, serde_json::Value)],
    first_prev: &[u8],
    chain_start_unchained: Option<BTreeMap<String, u64>>,
) -> anyhow::Result<Option<Break>> {
    if report.first_seq > 1 {
        let cut = report.first_seq - 1;
        let first_prev = hex::encode(first_prev);
        let vouching = evictions
            .iter()
            .find(|(_, b)| crate::audit::quota::through(b) == Some((cut, first_prev.as_str())));
        let Some((at, body)) = vouching else {
            return Ok(Some(Break {
                seq: 1,
                what: format!(
                    "records 1 to {cut} were removed without an eviction record saying so"
                ),
            }));
        };
        report.evicted_through = Some(cut);
        if let Some(b) = super::eviction::check_cut(conn, state_dir, report, *at, body)? {
            return Ok(Some(b));
        }
    }
    // Without a cut every numbered row must be vouched for, whatever its number (0 and negative ones too);
    // below a cut, `eviction::check_cut` has checked the rows against the eviction record.
    let lower = if report.first_seq > 1 {
        report.first_seq as i64
    } else {
        i64::MIN
    };
    let first = report.first_seq.max(1) as i64;
    let count = |sql: &str| -> rusqlite::Result<u64> {
        conn.query_row(sql, [first], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    };
    if let Some(b) = check_rows_chained(conn, lower)? {
        return Ok(Some(b));
    }
    if let Some(b) = check_http_rows(conn)? {
        return Ok(Some(b));
    }
    for (table, sql) in UNCHAINED {
        let n = count(&format!("SELECT count(*) + 0 * ?1 FROM {sql}"))?;
        report.unchained_rows += n;
        if n > 0 {
            report.unchained_by_table.insert(table.to_string(), n);
        }
        if let Some(expected) = chain_start_unchained.as_ref().map(|m| m[table]) {
            if n != expected {
                return Ok(Some(Break {
                    seq: 1,
                    what: format!(
                        "table {table} holds {n} rows outside the chain, but the chain began with {expected} such rows \
                         (from before it): rows were added or removed behind the gateway's back"
                    ),
                }));
            }
        }
    }
    Ok(None)
}

/// Each numbered row (at or above `lower`) of every table has a chain entry of its kind, and a flow row's
/// entries are in order (start, establishment, end). Names the first row that fails.
fn check_rows_chained(conn: &Connection, lower: i64) -> rusqlite::Result<Option<Break>> {
    const FLOW: &str =
        "'flow ' || f.seq || ' of run ' || f.run_id || ' (flow row ' || f.id || '): its '";
    let flow_entry = |column: &str, kind: &str| {
        format!(
            "SELECT f.{column}, {FLOW} || '{kind} entry ' || f.{column} FROM flows f
             WHERE f.{column} >= ?1 AND NOT EXISTS
               (SELECT 1 FROM chain c WHERE c.seq = f.{column} AND c.kind = '{kind}')
             ORDER BY f.{column} LIMIT 1"
        )
    };
    let row = |table: &str, column: &str, kind: &str, what: &str| {
        format!(
            "SELECT t.{column}, 'row ' || t.{column} || ' of table {table} (' || {what} || ')' FROM {table} t
             WHERE t.{column} >= ?1 AND NOT EXISTS
               (SELECT 1 FROM chain c WHERE c.seq = t.{column} AND c.kind = {kind})
             ORDER BY t.{column} LIMIT 1"
        )
    };
    let checks = [
        flow_entry("start_chain", flows::START),
        flow_entry("est_chain", flows::ESTABLISHED),
        flow_entry("end_chain", flows::END),
        row(
            "ssh_log",
            "seq",
            "'ssh'",
            "t.kind || ' of session ' || t.session_id",
        ),
        row("events", "seq", "t.kind", "t.kind"),
        row("enroll_log", "chain_seq", "'enroll'", "t.event"),
        row("admin_log", "chain_seq", "'admin'", "t.event"),
    ];
    for sql in &checks {
        let stray = conn
            .query_row(sql, [lower], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })
            .optional()?;
        if let Some((seq, what)) = stray {
            return Ok(Some(Break {
                seq: seq.max(0) as u64,
                what: format!("{what} is not in the chain (added behind the gateway's back)"),
            }));
        }
    }
    // An entry never comes before its flow's start: this also holds below an eviction's cut.
    let disordered = conn
        .query_row(
            &format!(
                "SELECT f.start_chain, {FLOW} || 'entries are out of order (start ' || f.start_chain
                   || ', established ' || coalesce(f.est_chain, '-') || ', end ' || coalesce(f.end_chain, '-') || ')'
                 FROM flows f WHERE f.est_chain <= f.start_chain OR f.end_chain <= f.start_chain
                   OR f.end_chain <= f.est_chain
                 ORDER BY f.start_chain LIMIT 1"
            ),
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?;
    Ok(disordered.map(|(seq, what)| Break {
        seq: seq.max(0) as u64,
        what: format!("{what}: rows were changed behind the gateway's back"),
    }))
}

/// Tables with rows from before the chain (schema 1), which it does not cover, and how to find them (as
/// `chain.start` counted them).
const UNCHAINED: [(&str, &str); 3] = [
    ("flows", "flows WHERE start_chain IS NULL"),
    ("http_requests", "http_requests WHERE chain_seq IS NULL"),
    ("ssh_log_v1", "ssh_log_v1"),
];

/// The reference id of the HTTP record of chain entry `seq`.
fn http_ref(conn: &Connection, seq: u64) -> Option<String> {
    conn.query_row(
        "SELECT CAST(ref_id AS TEXT) FROM http_requests WHERE chain_seq = ?1 ORDER BY id LIMIT 1",
        [seq as i64],
        |r| r.get(0),
    )
    .optional()
    .ok()
    .flatten()
}

/// HTTP rows beyond what their chain entries vouch for (the walk checked each entry's row): every numbered
/// row is an HTTP entry's, each entry has one row (a copy would show in review), and the flow row a record
/// links to (`flow_id`, which review follows) is the one its hashed run and flow seq name (flow records hash
/// their own row id too, except entries from before that).
fn check_http_rows(conn: &Connection) -> rusqlite::Result<Option<Break>> {
    let named =
        |r: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, String, Option<i64>, Option<i64>)> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        };
    let stray = conn
        .query_row(
            "SELECT h.id, CAST(h.ref_id AS TEXT), CAST(h.chain_seq AS INTEGER), NULL FROM http_requests h WHERE h.chain_seq IS NOT NULL AND NOT EXISTS
               (SELECT 1 FROM chain c WHERE c.seq = h.chain_seq AND c.kind = 'http')
             ORDER BY h.id LIMIT 1",
            [],
            named,
        )
        .optional()?;
    if let Some((id, ref_id, seq, _)) = stray {
        let seq = seq.unwrap_or(0);
        return Ok(Some(Break {
            seq: seq.max(0) as u64,
            what: format!(
                "row {id} of table http_requests (HTTP request ref {ref_id}) names record {seq}, but no HTTP entry of \
                 the chain vouches for it: it was added behind the gateway's back"
            ),
        }));
    }
    let copied = conn
        .query_row(
            "SELECT max(id), '', chain_seq, count(*) FROM http_requests WHERE chain_seq IS NOT NULL
             GROUP BY chain_seq HAVING count(*) > 1 ORDER BY chain_seq LIMIT 1",
            [],
            named,
        )
        .optional()?;
    if let Some((id, _, seq, n)) = copied {
        let seq = seq.unwrap_or(0).max(0) as u64;
        return Ok(Some(Break {
            seq,
            what: format!(
                "record {seq} ({}) has {} rows in table http_requests (the last is row {id}): a copy was added \
                 behind the gateway's back",
                describe(conn, http::KIND, seq),
                n.unwrap_or(0)
            ),
        }));
    }
    let mislinked = conn
        .query_row(
            "SELECT h.id, CAST(h.ref_id AS TEXT), h.chain_seq, h.flow_id FROM http_requests h
             WHERE h.chain_seq IS NOT NULL AND h.flow_id IS NOT NULL AND (
               EXISTS (SELECT 1 FROM flows f WHERE f.id = h.flow_id AND (f.run_id IS NOT h.run_id OR f.seq != h.flow_seq))
               OR NOT EXISTS (SELECT 1 FROM flows f WHERE f.id = h.flow_id)
                  AND EXISTS (SELECT 1 FROM flows f WHERE f.run_id = h.run_id AND f.seq = h.flow_seq))
             ORDER BY h.chain_seq LIMIT 1",
            [],
            named,
        )
        .optional()?;
    Ok(mislinked.map(|(_, ref_id, seq, flow_id)| {
        let seq = seq.unwrap_or(0).max(0) as u64;
        Break {
            seq,
            what: format!(
                "record {seq} (HTTP request ref {ref_id}) links to flow row {}, which is not its flow (the flow rows \
                 were renumbered behind the gateway's back)",
                flow_id.unwrap_or(0)
            ),
        }
    }))
}
