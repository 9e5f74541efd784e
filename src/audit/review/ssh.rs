//! Review of the SSH audit log (`rampart audit ssh …`): sessions, timelines, command search, recordings.
//!
//! Sealed fields and recordings need the tenant's reviewer key (`--key`); without it they are shown as
//! sealed. Start at [`sessions`], [`show`] and [`load_recording`].
#![deny(unsafe_code)]

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use rusqlite::{params, Connection};

use crate::audit::capture::{self, DecodedCapture, Header, PtyInfo, Record, ReviewerKey, Source};
use crate::audit::ssh_records::{
    ChannelDecision, CommandSource, RecordingFormat, RecordingInfo, SessionKeys, SshEvent,
};
use crate::audit::tables::chain::Checkpoint;
use crate::audit::tables::ssh::LogRow;
use crate::clock::format_ms;

/// The `ssh_log` tables, read-only.
pub struct SshLog {
    conn: Connection,
}

impl SshLog {
    /// For review: fails if the store or its SSH tables do not exist.
    pub fn open_readonly(path: &Path) -> rusqlite::Result<SshLog> {
        let conn = crate::audit::db::open_readonly(path)?;
        conn.query_row("SELECT count(*) FROM ssh_log", [], |_| Ok(()))?;
        Ok(SshLog { conn })
    }

    /// An in-memory log of `rows` (one node's records, shipped to the fleet's PostgreSQL), so fleet review
    /// runs the same queries and rendering as local review.
    pub fn from_rows(rows: &[LogRow]) -> rusqlite::Result<SshLog> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(
            "CREATE TABLE ssh_log (seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
                 tenant TEXT NOT NULL, session_id TEXT NOT NULL, channel_seq INTEGER, device TEXT NOT NULL,
                 user TEXT NOT NULL, target TEXT NOT NULL, login TEXT NOT NULL, cert_serial TEXT,
                 rule TEXT NOT NULL, body TEXT NOT NULL);
             CREATE TABLE chain (seq INTEGER PRIMARY KEY, prev_hash BLOB NOT NULL, hash BLOB NOT NULL);",
        )?;
        for r in rows {
            let k = &r.keys;
            conn.execute(
                "INSERT INTO ssh_log VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    r.seq as i64,
                    r.at_ms,
                    r.kind,
                    k.tenant,
                    k.session_id,
                    r.channel_seq,
                    k.device,
                    k.user,
                    k.target,
                    k.login,
                    k.cert_serial.map(|s| s.to_string()),
                    k.rule,
                    r.body
                ],
            )?;
            conn.execute(
                "INSERT INTO chain VALUES (?1, ?2, ?3)",
                params![r.seq as i64, r.prev_hash, r.hash],
            )?;
        }
        Ok(SshLog { conn })
    }

    /// Rows with `seq > after`, in order, at most `limit`.
    pub fn rows_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<LogRow>> {
        self.query(
            "SELECT s.seq, s.at_ms, s.kind, tenant, session_id, channel_seq, device, user, target, login,
                    cert_serial, rule, body, coalesce(c.prev_hash, x''), coalesce(c.hash, x'')
             FROM ssh_log s LEFT JOIN chain c ON c.seq = s.seq WHERE s.seq > ?1 ORDER BY s.seq LIMIT ?2",
            params![after as i64, limit as i64],
        )
    }

    /// Every row of one session, in order.
    pub fn session_rows(&self, session_id: &str) -> rusqlite::Result<Vec<LogRow>> {
        self.query(
            "SELECT s.seq, s.at_ms, s.kind, tenant, session_id, channel_seq, device, user, target, login,
                    cert_serial, rule, body, coalesce(c.prev_hash, x''), coalesce(c.hash, x'')
             FROM ssh_log s LEFT JOIN chain c ON c.seq = s.seq WHERE session_id = ?1 ORDER BY s.seq",
            params![session_id],
        )
    }

    /// Rows of one kind since `since_ms`, newest first.
    pub fn rows_of_kind(&self, kind: &str, since_ms: i64) -> rusqlite::Result<Vec<LogRow>> {
        self.query(
            "SELECT s.seq, s.at_ms, s.kind, tenant, session_id, channel_seq, device, user, target, login,
                    cert_serial, rule, body, coalesce(c.prev_hash, x''), coalesce(c.hash, x'')
             FROM ssh_log s LEFT JOIN chain c ON c.seq = s.seq WHERE s.kind = ?1 AND s.at_ms >= ?2 ORDER BY s.seq DESC",
            params![kind, since_ms],
        )
    }

    pub fn checkpoints(&self) -> rusqlite::Result<Vec<Checkpoint>> {
        crate::audit::tables::chain::checkpoints(&self.conn)
    }

    fn query(&self, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<Vec<LogRow>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(p, |r| {
            Ok(LogRow {
                seq: r.get::<_, i64>(0)? as u64,
                at_ms: r.get(1)?,
                kind: r.get(2)?,
                keys: SessionKeys {
                    tenant: r.get(3)?,
                    session_id: r.get(4)?,
                    device: r.get(6)?,
                    user: r.get(7)?,
                    target: r.get(8)?,
                    login: r.get(9)?,
                    cert_serial: r.get::<_, Option<String>>(10)?.and_then(|s| s.parse().ok()),
                    rule: r.get(11)?,
                },
                channel_seq: r.get(5)?,
                body: r.get(12)?,
                prev_hash: r.get(13)?,
                hash: r.get(14)?,
            })
        })?;
        rows.collect()
    }

    /// Test and tamper-drill seam: the raw connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Code of a client record carrying a terminal resize (see `ssh::recorder`).
const CODE_RESIZE: u32 = 0x7273_0001;

/// One session as `rampart audit ssh sessions` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSummary {
    pub session_id: String,
    pub tenant: String,
    pub device: String,
    pub user: String,
    pub target: String,
    pub login: String,
    pub rule: String,
    pub cert_serial: Option<u64>,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
    pub decision: String,
    pub channels: u32,
}

#[derive(Debug, Default)]
pub struct SessionFilter {
    pub tenant: Option<String>,
    pub user: Option<String>,
    /// Exact `ip:port`, or an IP (any port).
    pub target: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Sessions matching `f`, newest first.
pub fn sessions(log: &SshLog, f: &SessionFilter) -> rusqlite::Result<Vec<SessionSummary>> {
    let since = f.since_ms.unwrap_or(i64::MIN);
    let starts = log.rows_of_kind("session.start", since)?;
    let mut out = Vec::new();
    for r in starts {
        let k = &r.keys;
        if f.tenant.as_ref().is_some_and(|t| *t != k.tenant)
            || f.user.as_ref().is_some_and(|u| *u != k.user)
            || f.target.as_ref().is_some_and(|t| {
                *t != k.target && k.target.rsplit_once(':').map(|(ip, _)| ip) != Some(t.as_str())
            })
        {
            continue;
        }
        let decision = match r.event() {
            Some(SshEvent::SessionStart(s)) => s.decision,
            _ => String::new(),
        };
        let end = log
            .session_rows(&k.session_id)?
            .into_iter()
            .rev()
            .find(|x| x.kind == "session.end");
        let (ended_ms, end_reason, channels) = match end.as_ref().and_then(|e| e.event()) {
            Some(SshEvent::SessionEnd(e)) => (
                end.as_ref().map(|x| x.at_ms),
                Some(e.reason.to_string()),
                e.channels,
            ),
            _ => (None, None, 0),
        };
        out.push(SessionSummary {
            session_id: k.session_id.clone(),
            tenant: k.tenant.clone(),
            device: k.device.clone(),
            user: k.user.clone(),
            target: k.target.clone(),
            login: k.login.clone(),
            rule: k.rule.clone(),
            cert_serial: k.cert_serial,
            started_ms: r.at_ms,
            ended_ms,
            end_reason,
            decision,
            channels,
        });
        if out.len() >= f.limit.max(1) {
            break;
        }
    }
    Ok(out)
}

/// Resolves a session id or a unique prefix of one (at least 8 characters).
pub fn resolve_session(log: &SshLog, id: &str) -> anyhow::Result<String> {
    if !log.session_rows(id)?.is_empty() {
        return Ok(id.to_owned());
    }
    if id.len() >= 8 {
        let found: Vec<String> = log
            .rows_of_kind("session.start", i64::MIN)?
            .into_iter()
            .map(|r| r.keys.session_id)
            .filter(|s| s.starts_with(id))
            .collect();
        match found.len() {
            1 => return Ok(found[0].clone()),
            n if n > 1 => anyhow::bail!("{id:?} matches {n} sessions; give more of the id"),
            _ => {}
        }
    }
    anyhow::bail!(
        "no SSH session {id:?} in the audit log (list them with `rampart audit ssh sessions`)"
    )
}

/// The session's timeline: one line per record, sensitive fields opened with `key` when given.
pub fn show(
    log: &SshLog,
    session_id: &str,
    key: Option<&ReviewerKey>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rows = log.session_rows(session_id)?;
    let Some(first) = rows.first() else {
        anyhow::bail!("no SSH session {session_id:?}");
    };
    let k = &first.keys;
    crate::inert_line!(
        out,
        "session {}  tenant {}  user {}  device {}  target {}  rule {}",
        k.session_id,
        k.tenant,
        k.user,
        k.device,
        k.target,
        k.rule
    )?;
    for r in &rows {
        let ch = r
            .channel_seq
            .map(|c| format!("ch{c}"))
            .unwrap_or_else(|| "  ".into());
        let what = match r.event() {
            Some(ev) => describe(&ev, &r.keys.login, key),
            None => format!("{} (unreadable body)", r.kind),
        };
        crate::inert_line!(out, "{}  {ch:<4} {what}", format_ms(r.at_ms))?;
    }
    Ok(())
}

fn describe(ev: &SshEvent, login: &str, key: Option<&ReviewerKey>) -> String {
    match ev {
        SshEvent::SessionStart(s) => {
            let cert = s
                .cert
                .as_ref()
                .map(|c| format!(" cert serial {} key_id {:?}", c.serial, c.key_id))
                .unwrap_or_default();
            format!(
                "session start: login {login} auth {} {}{cert} target key {} ({}) recording {}",
                s.auth_method,
                s.decision,
                s.target_host_key_fp.as_deref().unwrap_or("-"),
                s.target_host_key_trust.as_ref().map_or("-", |t| t.as_ref()),
                s.recording.as_str()
            )
        }
        SshEvent::SessionEnd(e) => format!(
            "session end: {}{} after {:.1}s, {} channels, {} bytes to target, {} bytes from target",
            e.reason,
            e.error
                .as_ref()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default(),
            e.duration_ms as f64 / 1000.0,
            e.channels,
            e.bytes_client_to_target,
            e.bytes_target_to_client
        ),
        SshEvent::ChannelOpen(o) => {
            let mut s = format!("open {} {}", o.kind, o.program);
            if let Some(sub) = &o.subsystem {
                s += &format!(" {sub}");
            }
            if let Some(p) = &o.pty {
                s += &format!(" pty {} {}x{}", p.term, p.cols, p.rows);
            }
            if let Some(c) = &o.command {
                s += &format!(" command {:?}", c.text.show(key));
            }
            if let Some(t) = &o.tcpip {
                s += &format!(
                    " to {}:{} from {}:{}",
                    t.host, t.port, t.orig_addr, t.orig_port
                );
                if let Some(rule) = &t.rule {
                    s += &format!(" (flow rule {rule})");
                }
            }
            for e in &o.env {
                s += &format!(" env {}={:?}", e.name, e.value.show(key));
            }
            if o.decision != ChannelDecision::Allowed {
                s += &format!(
                    " DENIED ({})",
                    o.deny_reason.as_deref().unwrap_or("no reason")
                );
            }
            s
        }
        SshEvent::ChannelClose(c) => {
            let mut s = format!(
                "close after {:.1}s, {} bytes in, {} bytes out",
                c.duration_ms as f64 / 1000.0,
                c.bytes_in,
                c.bytes_out
            );
            if let Some(st) = c.exit_status {
                s += &format!(", exit status {st}");
            }
            if let Some(sig) = &c.exit_signal {
                s += &format!(
                    ", killed by signal {sig}{}",
                    if c.core_dumped { " (core dumped)" } else { "" }
                );
            }
            if let Some(e) = &c.error {
                s += &format!(", error: {e}");
            }
            if let Some(r) = &c.recording {
                s += &format!(
                    ", recording {} ({}{})",
                    r.path,
                    r.format,
                    if r.complete { "" } else { ", incomplete" }
                );
            }
            s
        }
        SshEvent::Command(c) => format!(
            "{} [{}] {:?}{}",
            c.source,
            c.confidence,
            c.command.text.show(key),
            if c.command.truncated {
                format!(
                    " (truncated; {} bytes, sha256 {})",
                    c.command.len, c.command.sha256
                )
            } else {
                String::new()
            }
        ),
        SshEvent::HostKey(h) => match &h.pinned_fingerprint {
            Some(p) => format!(
                "TARGET HOST KEY {}: now {}, pinned {p}",
                h.change.as_ref().to_uppercase(),
                h.fingerprint
            ),
            None => format!("target host key {}: {}", h.change, h.fingerprint),
        },
    }
}

/// A command found by [`search`].
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
    pub session_id: String,
    pub channel_seq: Option<u32>,
    pub at_ms: i64,
    pub tenant: String,
    pub user: String,
    pub target: String,
    pub login: String,
    pub source: CommandSource,
    pub text: String,
}

/// Commands (exec, typed lines, SFTP operations) containing `needle`. Sealed ones are searched only with the
/// key; the second value counts those that could not be opened.
pub fn search(
    log: &SshLog,
    needle: &str,
    key: Option<&ReviewerKey>,
) -> rusqlite::Result<(Vec<Hit>, usize)> {
    let mut hits = Vec::new();
    let mut sealed = 0;
    let mut after = 0;
    loop {
        let rows = log.rows_after(after, 10_000)?;
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for r in rows.iter().filter(|r| r.kind == "command") {
            let Some(SshEvent::Command(c)) = r.event() else {
                continue;
            };
            let Some(text) = c.command.text.open(key) else {
                sealed += 1;
                continue;
            };
            if text.contains(needle) {
                hits.push(Hit {
                    session_id: r.keys.session_id.clone(),
                    channel_seq: r.channel_seq,
                    at_ms: r.at_ms,
                    tenant: r.keys.tenant.clone(),
                    user: r.keys.user.clone(),
                    target: r.keys.target.clone(),
                    login: r.keys.login.clone(),
                    source: c.source,
                    text,
                });
            }
        }
    }
    Ok((hits, sealed))
}

/// The channels of a session that have a recording, with their close records' exit data.
pub fn recordings(
    log: &SshLog,
    session_id: &str,
) -> rusqlite::Result<Vec<(u32, RecordingInfo, crate::audit::ssh_records::ChannelClose)>> {
    let mut out = Vec::new();
    for r in log.session_rows(session_id)? {
        if let (Some(seq), Some(SshEvent::ChannelClose(c))) = (r.channel_seq, r.event()) {
            if let Some(rec) = c.recording.clone() {
                out.push((seq, rec, c));
            }
        }
    }
    Ok(out)
}

/// Why a recording cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("the recording is sealed to the tenant's reviewer key; pass --key FILE (the private key from `rampart audit keygen`)")]
    NeedKey,
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    #[error("{0}: not a Rampart recording ({1})")]
    Format(PathBuf, String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes a channel's recording (sealed or plaintext) into records.
pub fn load_recording(
    state_dir: &Path,
    info: &RecordingInfo,
    key: Option<&ReviewerKey>,
) -> Result<DecodedCapture, RecordingError> {
    let path = state_dir.join(&info.path);
    if info.format == RecordingFormat::SshLogCli || path.extension().is_some_and(|e| e == "cap") {
        let key = key.ok_or(RecordingError::NeedKey)?;
        return Ok(capture::decode_file(&path, key)?);
    }
    read_plain(&path)
}

/// Decodes a recording's bytes fetched from elsewhere (the fleet's object store); `label` names it in errors.
pub fn decode_recording(
    bytes: &[u8],
    label: &Path,
    info: &RecordingInfo,
    key: Option<&ReviewerKey>,
) -> Result<DecodedCapture, RecordingError> {
    if info.format == RecordingFormat::SshLogCli || label.extension().is_some_and(|e| e == "cap") {
        let key = key.ok_or(RecordingError::NeedKey)?;
        return Ok(capture::decode(bytes, key)?);
    }
    plain_from(bytes, label)
}

fn read_plain(path: &Path) -> Result<DecodedCapture, RecordingError> {
    plain_from(BufReader::new(std::fs::File::open(path)?), path)
}

fn plain_from(mut r: impl std::io::BufRead, path: &Path) -> Result<DecodedCapture, RecordingError> {
    let bad = |m: &str| RecordingError::Format(path.to_path_buf(), m.to_owned());
    let mut magic = String::new();
    r.read_line(&mut magic)?;
    if magic.trim_end() != "rampart-rec-v1" {
        return Err(bad("no rampart-rec-v1 line"));
    }
    let mut header = String::new();
    r.read_line(&mut header)?;
    #[derive(serde::Deserialize)]
    struct PlainHeader {
        started_at: u64,
        pty: Option<PtyInfo>,
    }
    let h: PlainHeader = serde_json::from_str(&header).map_err(|e| bad(&e.to_string()))?;
    let mut records = Vec::new();
    let mut data_size = 0u64;
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len < 13 {
            return Err(bad("record shorter than 13 bytes"));
        }
        let mut body = Vec::new();
        (&mut r).take(len as u64).read_to_end(&mut body)?;
        if body.len() != len {
            // A recording cut by a crash: keep what is whole.
            break;
        }
        data_size += 4 + len as u64;
        let source = match body[0] {
            0 => Source::Client,
            1 => Source::Origin,
            _ => return Err(bad("record with an unknown source")),
        };
        let code = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
        let mut us = [0u8; 8];
        us.copy_from_slice(&body[5..13]);
        records.push(Record {
            source,
            code,
            elapsed_us: u64::from_be_bytes(us),
            data: body[13..].to_vec(),
        });
    }
    Ok(DecodedCapture {
        header: Header {
            started_at: h.started_at,
            data_size,
            encapsulated_key: String::new(),
            pty: h.pty,
            exit_data: None,
        },
        records,
        anomalies: Vec::new(),
        blocks_opened: 0,
    })
}

/// Extra fields for the asciicast header (Tailscale-style).
#[derive(Debug, Default, Serialize)]
pub struct CastMeta {
    pub session_id: String,
    pub channel_seq: u32,
    pub user: String,
    pub device: String,
    pub target: String,
    pub login: String,
    pub command: Option<String>,
}

/// Writes a PTY recording as asciicast v2: `o` for target output, `i` for typed input (only recorded with
/// `capture_input`), `r` for resizes. Output split inside a UTF-8 sequence is joined.
pub fn write_cast(
    decoded: &DecodedCapture,
    meta: &CastMeta,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let Some(pty) = &decoded.header.pty else {
        anyhow::bail!("not a terminal (PTY) recording; export it as two byte streams instead");
    };
    let mut header = serde_json::json!({
        "version": 2,
        "width": pty.width,
        "height": pty.height,
        "timestamp": decoded.header.started_at,
        "rampart": meta,
    });
    if let Some(term) = &pty.term {
        header["env"] = serde_json::json!({ "TERM": term });
    }
    writeln!(out, "{header}")?;
    let mut joiners = [Vec::<u8>::new(), Vec::new()];
    let mut last = 0u64;
    for r in &decoded.records {
        last = last.max(r.elapsed_us);
        let t = last as f64 / 1e6;
        match (r.source, r.code) {
            (Source::Client, CODE_RESIZE) => {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!([t, "r", String::from_utf8_lossy(&r.data)])
                )?;
            }
            (Source::Client, _) => {
                let s = utf8_join(&mut joiners[0], &r.data);
                if !s.is_empty() {
                    writeln!(out, "{}", serde_json::json!([t, "i", s]))?;
                }
            }
            (Source::Origin, _) => {
                let s = utf8_join(&mut joiners[1], &r.data);
                if !s.is_empty() {
                    writeln!(out, "{}", serde_json::json!([t, "o", s]))?;
                }
            }
        }
    }
    let rest = String::from_utf8_lossy(&std::mem::take(&mut joiners[1])).into_owned();
    if !rest.is_empty() {
        writeln!(out, "{}", serde_json::json!([last as f64 / 1e6, "o", rest]))?;
    }
    Ok(())
}

/// Appends `data` to `carry` and returns the longest valid UTF-8 prefix (invalid bytes as U+FFFD), keeping an
/// incomplete trailing sequence for the next call.
fn utf8_join(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&carry[start..]) {
            Ok(s) => {
                out.push_str(s);
                carry.clear();
                return out;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&carry[start..valid]));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start = valid + n;
                    }
                    None => {
                        carry.drain(..valid);
                        return out;
                    }
                }
            }
        }
    }
}

/// Plays a recording's target output to `out` with its original timing divided by `speed` (pauses longer
/// than `max_idle` are shortened to it).
pub fn replay(
    decoded: &DecodedCapture,
    speed: f64,
    max_idle: Option<Duration>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let speed = if speed > 0.0 { speed } else { 1.0 };
    let mut last = 0u64;
    for r in decoded
        .records
        .iter()
        .filter(|r| r.source == Source::Origin)
    {
        let gap = Duration::from_micros(r.elapsed_us.saturating_sub(last)).div_f64(speed);
        last = last.max(r.elapsed_us);
        let gap = max_idle.map_or(gap, |m| gap.min(m));
        if !gap.is_zero() {
            out.flush()?;
            std::thread::sleep(gap);
        }
        out.write_all(&r.data)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_joined_across_records() {
        let mut c = Vec::new();
        let euro = "€".as_bytes();
        assert_eq!(utf8_join(&mut c, &[b'a', euro[0]]), "a");
        assert_eq!(utf8_join(&mut c, &euro[1..]), "€");
        assert_eq!(utf8_join(&mut c, &[0xff, b'b']), "\u{FFFD}b");
    }
}
