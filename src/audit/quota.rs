//! The size quotas of the audit store (`audit.max_store_mb`, the store's used pages) and of the SSH recordings
//! (`audit.max_recordings_mb`, `state_dir/recordings`), and eviction: what `on_failure = "fail_open"` does at
//! a quota. Only the writer thread calls this (blocking SQLite and file work, never on the async runtime).
//!
//! Eviction removes a prefix of the hash chain, entries 1 (or the last cut) to `through_seq`, with every closed
//! record those entries describe: ended flows (and flows of earlier runs) with their rows, HTTP requests,
//! ended SSH sessions whole (every row, every recording file), enrollment and review UI records, the writer's
//! own events, checkpoints and rows from before the chain. What is still open (this run's flows without an
//! end, this run's SSH sessions without a `session.end`) is kept, and so is every row of an SSH session that
//! goes on past the cut. Then one `eviction` record joins the chain (and is signed at once): how many entries
//! of which kinds and rows of which tables were removed, the range, the hash of the last removed entry (the
//! remaining chain links to it), and, for each kept row whose chain entries were removed, that entry's seq,
//! kind and digest (`kept`), so `rampart audit verify` still checks every row left in the store.
//!
//! Never: remove an entry that is not in the prefix (the chain stays contiguous from `through_seq + 1`), delete a
//! file outside `state_dir/recordings`.
#![deny(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension as _};
use serde_json::{json, Value};

use super::ssh_records::SshEvent;
use super::tables::chain::Head;
use super::tables::{events, flows};

/// Eviction stops once the store is at most this share of its quota (per mille) ...
pub const TARGET_PER_MILLE: u64 = 900;
/// ... in at most this many rounds (each removes a larger prefix) within one transaction.
const MAX_ROUNDS: usize = 16;

/// Bytes of the store's pages in use (free pages left by an eviction are reused before the file grows).
pub fn store_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok((pages - free).max(0) as u64 * size as u64)
}

/// Bytes of the files under `dir` (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// What an eviction should achieve.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    /// Remove until the store's used pages are at most this many bytes (`None`: the store is not over).
    pub store_target: Option<u64>,
    /// Remove ended SSH sessions until their recordings free at least this many bytes.
    pub recordings_to_free: u64,
}

/// What one eviction removed (its record in the chain says the same).
#[derive(Debug, Default)]
pub struct Evicted {
    /// The eviction record's seq.
    pub seq: u64,
    pub first_seq: u64,
    pub through_seq: u64,
    /// Chain entries removed, by chain kind.
    pub entries: BTreeMap<String, u64>,
    /// Recording files (and session directories) to delete once the transaction is committed.
    pub files: Vec<PathBuf>,
    pub kept: usize,
}

/// Who is still open: this run's id and the seq of its `run.start` (SSH sessions that began before it ended
/// with the previous run).
#[derive(Debug, Clone, Copy)]
pub struct OpenScope {
    pub run_id: i64,
    pub run_start_seq: u64,
}

/// Removes the oldest closed records to meet `goal` and appends the eviction record; `None` when the chain
/// holds nothing that could be removed. Runs inside the writer's transaction `tx` (the caller commits, then
/// deletes `Evicted::files`).
pub fn evict(
    tx: &Connection,
    head: &mut Head,
    state_dir: &Path,
    scope: OpenScope,
    goal: Goal,
    at_ms: i64,
) -> rusqlite::Result<Option<Evicted>> {
    let first: Option<i64> = tx.query_row("SELECT min(seq) FROM chain", [], |r| r.get(0))?;
    let Some(first) = first.map(|f| f as u64) else {
        return Ok(None);
    };
    let last = head.seq;
    if last < first {
        return Ok(None);
    }
    let store_before = store_bytes(tx)?;
    // Rows kept across the previous eviction stay vouched for by what it said.
    let previous = previous_eviction(tx, first)?;
    let mut kept: BTreeMap<u64, (String, String)> = BTreeMap::new();
    if let Some(p) = &previous {
        for k in p["kept"].as_array().into_iter().flatten() {
            if let (Some(seq), Some(kind), Some(d)) = (k[0].as_u64(), k[1].as_str(), k[2].as_str())
            {
                kept.insert(seq, (kind.to_owned(), d.to_owned()));
            }
        }
    }
    let sessions = ssh_sessions(tx, scope)?;
    let min_cut = recordings_cut(state_dir, &sessions, goal.recordings_to_free);
    let mut ev = Evicted {
        first_seq: first,
        ..Evicted::default()
    };
    let mut rows: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut recording_bytes = 0u64;
    let mut evicted_sessions: HashSet<String> = HashSet::new();
    let mut lo = first - 1;
    let mut through_hash = Vec::new();
    for _ in 0..MAX_ROUNDS {
        let used = store_bytes(tx)?;
        let under = goal.store_target.is_none_or(|t| used <= t);
        if lo >= last || (under && lo >= min_cut) {
            break;
        }
        // The share of the remaining entries to remove, a little more than the share of bytes over target.
        let over = goal
            .store_target
            .map_or(0.0, |t| used.saturating_sub(t) as f64 / used.max(1) as f64);
        let step = (((last - lo) as f64) * (over + 0.02)).ceil() as u64;
        let hi = (lo + step.max(1)).max(min_cut).min(last);
        through_hash = tx.query_row("SELECT hash FROM chain WHERE seq = ?1", [hi as i64], |r| {
            r.get(0)
        })?;
        // Open flows whose last entry is being removed: kept, with that entry's digest.
        {
            let mut stmt = tx.prepare(
                "SELECT c.seq, c.kind, c.digest FROM flows f JOIN chain c ON c.seq = coalesce(f.est_chain, f.start_chain)
                 WHERE f.start_chain <= ?3 AND f.run_id = ?1 AND f.end_chain IS NULL AND c.seq > ?2
                   AND c.seq <= ?3",
            )?;
            let found = stmt.query_map(params![scope.run_id, lo as i64, hi as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    hex::encode(r.get::<_, Vec<u8>>(2)?),
                ))
            })?;
            for f in found {
                let (seq, kind, d) = f?;
                kept.insert(seq, (kind, d));
            }
        }
        // SSH sessions: whole ones go when ended and inside the prefix; the rest keep their rows.
        let gone: Vec<&Session> = sessions
            .iter()
            .filter(|s| s.closed && s.last <= hi && !evicted_sessions.contains(&s.id))
            .collect();
        {
            let mut stmt = tx.prepare(
                "SELECT s.seq, c.digest, s.session_id FROM ssh_log s JOIN chain c ON c.seq = s.seq
                 WHERE s.seq > ?1 AND s.seq <= ?2",
            )?;
            let found = stmt.query_map(params![lo as i64, hi as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    hex::encode(r.get::<_, Vec<u8>>(1)?),
                    r.get::<_, String>(2)?,
                ))
            })?;
            for f in found {
                let (seq, d, session) = f?;
                let leaving =
                    evicted_sessions.contains(&session) || gone.iter().any(|s| s.id == session);
                if !leaving {
                    kept.insert(seq, (super::tables::ssh::KIND.to_owned(), d));
                }
            }
        }
        for s in gone {
            recording_bytes += session_bytes(state_dir, s);
            ev.files
                .extend(s.files.iter().filter_map(|f| recording_path(state_dir, f)));
            ev.files.extend(session_dir(state_dir, &s.tenant, &s.id));
            *rows.entry("ssh_log").or_default() +=
                tx.execute("DELETE FROM ssh_log WHERE session_id = ?1", [&s.id])? as u64;
            *rows.entry("ssh_sessions").or_default() += 1;
            evicted_sessions.insert(s.id.clone());
        }
        let mut entries = tx.prepare(
            "SELECT kind, count(*) FROM chain WHERE seq > ?1 AND seq <= ?2 GROUP BY kind",
        )?;
        for r in entries.query_map(params![lo as i64, hi as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })? {
            let (kind, n) = r?;
            *ev.entries.entry(kind).or_default() += n;
        }
        let h = hi as i64;
        let mut del = |table: &'static str, sql: &str, p: &[&dyn rusqlite::ToSql]| {
            tx.execute(sql, p).map(|n| {
                *rows.entry(table).or_default() += n as u64;
            })
        };
        del(
            "flows",
            "DELETE FROM flows WHERE start_chain <= ?1
               AND max(start_chain, coalesce(est_chain, 0), coalesce(end_chain, 0)) <= ?1
               AND NOT (run_id = ?2 AND end_chain IS NULL)",
            &[&h, &scope.run_id],
        )?;
        del(
            "http_requests",
            "DELETE FROM http_requests WHERE chain_seq <= ?1",
            &[&h],
        )?;
        del(
            "enroll_log",
            "DELETE FROM enroll_log WHERE chain_seq <= ?1",
            &[&h],
        )?;
        del(
            "admin_log",
            "DELETE FROM admin_log WHERE chain_seq <= ?1",
            &[&h],
        )?;
        del("events", "DELETE FROM events WHERE seq <= ?1", &[&h])?;
        // Rows from before the chain are older than anything in it.
        del(
            "unchained_rows",
            "DELETE FROM flows WHERE start_chain IS NULL",
            &[],
        )?;
        del(
            "unchained_rows",
            "DELETE FROM http_requests WHERE chain_seq IS NULL",
            &[],
        )?;
        del("unchained_rows", "DELETE FROM ssh_log_v1", &[])?;
        tx.execute("DELETE FROM ssh_checkpoints_v1", [])?;
        tx.execute("DELETE FROM checkpoints WHERE seq <= ?1", [h])?;
        tx.execute("DELETE FROM chain WHERE seq <= ?1", [h])?;
        lo = hi;
    }
    if lo < first {
        return Ok(None);
    }
    // Only rows still in the store whose last entry is gone need a kept entry.
    kept.retain(|&seq, (kind, _)| seq <= lo && still_needed(tx, kind, seq).unwrap_or(true));
    ev.through_seq = lo;
    ev.kept = kept.len();
    let store_after = store_bytes(tx)?;
    let cumulative = |key: &str| -> BTreeMap<String, u64> {
        let mut m: BTreeMap<String, u64> = previous
            .as_ref()
            .and_then(|p| serde_json::from_value(p[key].clone()).ok())
            .unwrap_or_default();
        for (k, n) in &ev.entries {
            *m.entry(k.clone()).or_default() += n;
        }
        m
    };
    let body = json!({
        "run_id": scope.run_id,
        "first_seq": first,
        "through_seq": lo,
        "head_hash": hex::encode(&through_hash),
        "removed": ev.entries,
        "removed_since_chain_start": cumulative("removed_since_chain_start"),
        "rows": rows,
        "recordings_bytes": recording_bytes,
        "store_bytes_before": store_before,
        "store_bytes_after": store_after,
        "kept": kept.iter().map(|(s, (k, d))| json!([s, k, d])).collect::<Vec<_>>(),
    });
    ev.seq = events::append(tx, head, events::EVICTION, at_ms, &body)?;
    Ok(Some(ev))
}

/// Whether the row of kept entry `seq` is still in the store with no later entry vouching for it.
fn still_needed(conn: &Connection, kind: &str, seq: u64) -> rusqlite::Result<bool> {
    let s = seq as i64;
    Ok(match kind {
        flows::START | flows::ESTABLISHED => conn
            .query_row(
                "SELECT 1 FROM flows WHERE (start_chain = ?1 OR est_chain = ?1)
                   AND max(start_chain, coalesce(est_chain, 0), coalesce(end_chain, 0)) = ?1",
                [s],
                |_| Ok(()),
            )
            .optional()?
            .is_some(),
        _ => conn
            .query_row("SELECT 1 FROM ssh_log WHERE seq = ?1", [s], |_| Ok(()))
            .optional()?
            .is_some(),
    })
}

/// The body of the eviction record that made the chain start at `first` (`None` if it starts at 1).
fn previous_eviction(conn: &Connection, first: u64) -> rusqlite::Result<Option<Value>> {
    if first <= 1 {
        return Ok(None);
    }
    let mut stmt = conn.prepare("SELECT body FROM events WHERE kind = ?1 ORDER BY seq DESC")?;
    let mut rows = stmt.query([events::EVICTION])?;
    while let Some(r) = rows.next()? {
        let body: Value = serde_json::from_str(&r.get::<_, String>(0)?).unwrap_or_default();
        if body["through_seq"].as_u64() == Some(first - 1) {
            return Ok(Some(body));
        }
    }
    Ok(None)
}

struct Session {
    id: String,
    tenant: String,
    last: u64,
    closed: bool,
    /// Recording paths its `channel.close` records name (relative to `state_dir`).
    files: Vec<String>,
}

/// Every SSH session in the store, by its last entry.
fn ssh_sessions(conn: &Connection, scope: OpenScope) -> rusqlite::Result<Vec<Session>> {
    let mut stmt = conn.prepare(
        "SELECT session_id, min(tenant), min(seq), max(seq), sum(kind = 'session.end') FROM ssh_log
         GROUP BY session_id ORDER BY max(seq)",
    )?;
    let mut out: Vec<Session> = stmt
        .query_map([], |r| {
            let first = r.get::<_, i64>(2)? as u64;
            Ok(Session {
                id: r.get(0)?,
                tenant: r.get(1)?,
                last: r.get::<_, i64>(3)? as u64,
                closed: r.get::<_, i64>(4)? > 0 || first < scope.run_start_seq,
                files: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt =
        conn.prepare("SELECT session_id, body FROM ssh_log WHERE kind = 'channel.close'")?;
    let closes = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let index: std::collections::HashMap<String, usize> = out
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    for c in closes {
        let (id, body) = c?;
        if let (Some(&i), Ok(SshEvent::ChannelClose(cc))) =
            (index.get(&id), serde_json::from_str::<SshEvent>(&body))
        {
            if let Some(r) = cc.recording {
                out[i].files.push(r.path);
            }
        }
    }
    Ok(out)
}

/// The smallest cut that removes ended sessions whose recordings add up to `need` bytes (0: none needed).
fn recordings_cut(state_dir: &Path, sessions: &[Session], need: u64) -> u64 {
    if need == 0 {
        return 0;
    }
    let mut freed = 0;
    for s in sessions.iter().filter(|s| s.closed) {
        freed += session_bytes(state_dir, s);
        if freed >= need {
            return s.last;
        }
    }
    sessions
        .iter()
        .filter(|s| s.closed)
        .map(|s| s.last)
        .max()
        .unwrap_or(0)
}

/// The bytes an ended session's recordings take: its directory (with files of channels a crash cut, which no
/// record names) and any named file elsewhere under `recordings/`.
fn session_bytes(state_dir: &Path, s: &Session) -> u64 {
    let dir = session_dir(state_dir, &s.tenant, &s.id);
    let elsewhere: u64 = s
        .files
        .iter()
        .filter_map(|f| recording_path(state_dir, f))
        .filter(|p| dir.as_ref().is_none_or(|d| !p.starts_with(d)))
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    elsewhere + dir.map_or(0, |d| dir_bytes(&d))
}

/// `state_dir/<rel>` if `rel` is a plain relative path under `recordings/` (a tampered store cannot make the
/// writer delete anything else).
fn recording_path(state_dir: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && p.starts_with("recordings")).then(|| state_dir.join(p))
}

/// `state_dir/recordings/<tenant>/<session>` (where the SSH inspector writes a session's recordings), if both
/// are single plain path components.
fn session_dir(state_dir: &Path, tenant: &str, session: &str) -> Option<PathBuf> {
    let one = |s: &str| {
        let mut c = Path::new(s).components();
        matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
    };
    (one(tenant) && one(session)).then(|| state_dir.join("recordings").join(tenant).join(session))
}

/// Deletes what an eviction named (after its transaction committed); returns the files removed.
pub fn delete_files(files: &[PathBuf]) -> u64 {
    let mut n = 0;
    for f in files {
        let r = if f.is_dir() {
            n += count_files(f);
            std::fs::remove_dir_all(f)
        } else {
            std::fs::remove_file(f).map(|()| n += 1)
        };
        if let Err(e) = r {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "cannot delete an evicted recording");
            }
        }
    }
    n
}

fn count_files(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => n += 1,
                Err(_) => {}
            }
        }
    }
    n
}

/// The chain entries an eviction record says it removed, by chain kind.
pub fn removed(body: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(body["removed"].clone()).unwrap_or_default()
}

/// The head an eviction record names (hash of its last removed entry).
pub fn through(body: &Value) -> Option<(u64, &str)> {
    Some((body["through_seq"].as_u64()?, body["head_hash"].as_str()?))
}

/// The eviction records' view for `rampart audit verify`: each kept entry, `(seq, kind, digest hex)`.
pub fn kept(body: &Value) -> Vec<(u64, String, String)> {
    body["kept"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| {
            Some((
                k[0].as_u64()?,
                k[1].as_str()?.to_owned(),
                k[2].as_str()?.to_owned(),
            ))
        })
        .collect()
}
