//! Review of the fleet's SSH sessions (`rampart audit ssh sessions|show|replay --fleet`): the records come
//! from PostgreSQL (`fleet_chain`, each node's canonical `ssh_log` rows), are loaded per node into an
//! in-memory [`SshLog`] so local and fleet review share their queries and rendering, and recordings come from
//! the object store, verified against their manifest and the hash their audit record names before anything is
//! shown ([`fetch_recording`]).
//!
//! Known limit: listing reads the SSH records of the period asked for (`--since`) from every node; a session is
//! found by a scan of the SSH entries (no index on the session id yet).
#![deny(unsafe_code)]

use std::collections::BTreeMap;

use serde::Serialize;

use super::objects::{self, Manifest, ObjectError, Objects};
use crate::audit::review::ssh::{self as ssh_review, SessionFilter, SessionSummary, SshLog};
use crate::audit::ssh_records::{RecordingInfo, SessionKeys, SshEvent};
use crate::audit::tables::ssh::{LogRow, KIND};

/// A session of some node.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSession {
    pub node: String,
    #[serde(flatten)]
    pub session: SessionSummary,
}

/// One canonical `ssh_log` row (`audit::tables::ssh::canonical`) as shipped.
fn parse_row(record: &str, prev_hash: Vec<u8>, hash: Vec<u8>) -> Result<LogRow, String> {
    let v: serde_json::Value = serde_json::from_str(record).map_err(|e| e.to_string())?;
    let a = v
        .as_array()
        .filter(|a| a.len() == 13)
        .ok_or("not a 13-column row")?;
    let s = |i: usize| {
        a[i].as_str()
            .map(str::to_owned)
            .ok_or(format!("column {i} is not text"))
    };
    Ok(LogRow {
        seq: a[0].as_u64().ok_or("seq")?,
        at_ms: a[1].as_i64().ok_or("at_ms")?,
        kind: s(2)?,
        keys: SessionKeys {
            tenant: s(3)?,
            session_id: s(4)?,
            device: s(6)?,
            user: s(7)?,
            target: s(8)?,
            login: s(9)?,
            cert_serial: a[10].as_str().and_then(|c| c.parse().ok()),
            rule: s(11)?,
        },
        channel_seq: a[5].as_u64().map(|c| c as u32),
        body: s(12)?,
        prev_hash,
        hash,
    })
}

/// SSH rows per node: the whole period since `since_ms`, or one session.
async fn rows(
    client: &tokio_postgres::Client,
    since_ms: Option<i64>,
    session: Option<&str>,
) -> anyhow::Result<BTreeMap<String, Vec<LogRow>>> {
    let rows = client
        .query(
            "SELECT node_id, prev_hash, hash, record FROM fleet_chain
             WHERE kind = $1 AND record IS NOT NULL AND ($2::BIGINT IS NULL OR at_ms >= $2)
               AND ($3::TEXT IS NULL OR (record::jsonb ->> 4) = $3)
             ORDER BY node_id, seq",
            &[&KIND, &since_ms, &session],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!("reading the fleet's SSH records: {}", super::error_text(&e))
        })?;
    let mut out: BTreeMap<String, Vec<LogRow>> = BTreeMap::new();
    for r in rows {
        let node: String = r.get(0);
        let record: String = r.get(3);
        let row = parse_row(&record, r.get(1), r.get(2)).map_err(|e| {
            anyhow::anyhow!("node {node}: a shipped SSH record is unreadable ({e})")
        })?;
        out.entry(node).or_default().push(row);
    }
    Ok(out)
}

/// Sessions of every node matching `f`, newest first (by start, then node).
pub async fn sessions(
    client: &tokio_postgres::Client,
    f: &SessionFilter,
) -> anyhow::Result<Vec<FleetSession>> {
    let mut out = Vec::new();
    for (node, rows) in rows(client, f.since_ms, None).await? {
        let log = SshLog::from_rows(&rows)?;
        for s in ssh_review::sessions(&log, f)? {
            out.push(FleetSession {
                node: node.clone(),
                session: s,
            });
        }
    }
    out.sort_by(|a, b| (b.session.started_ms, &b.node).cmp(&(a.session.started_ms, &a.node)));
    out.truncate(f.limit.max(1));
    Ok(out)
}

/// One session of the fleet: its node and its records as a log.
pub struct FleetSessionLog {
    pub node: String,
    pub session_id: String,
    pub log: SshLog,
}

/// Finds a session by id or unique prefix (at least 8 characters).
pub async fn session(client: &tokio_postgres::Client, id: &str) -> anyhow::Result<FleetSessionLog> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        anyhow::bail!(
            "{id:?} is not a session id (list them with `rampart audit ssh sessions --fleet`)"
        );
    }
    let mut full = id.to_owned();
    if id.len() < 36 && id.len() >= 8 {
        let found: Vec<String> = client
            .query(
                "SELECT DISTINCT record::jsonb ->> 4 FROM fleet_chain
                 WHERE kind = $1 AND record IS NOT NULL AND (record::jsonb ->> 2) = 'session.start'
                   AND starts_with(record::jsonb ->> 4, $2)",
                &[&KIND, &id],
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!("reading the fleet's SSH records: {}", super::error_text(&e))
            })?
            .iter()
            .map(|r| r.get(0))
            .collect();
        match found.len() {
            1 => full = found[0].clone(),
            n if n > 1 => anyhow::bail!("{id:?} matches {n} sessions; give more of the id"),
            _ => {}
        }
    }
    let mut by_node = rows(client, None, Some(&full)).await?;
    if by_node.len() > 1 {
        anyhow::bail!(
            "session {full} has records from several nodes ({}); review each node's store",
            by_node.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    let Some((node, rows)) = by_node.pop_first() else {
        anyhow::bail!(
            "no SSH session {id:?} in the fleet's records (list them with `rampart audit ssh sessions --fleet`; a node ships its records within seconds while PostgreSQL is reachable)"
        );
    };
    Ok(FleetSessionLog {
        node,
        session_id: full,
        log: SshLog::from_rows(&rows)?,
    })
}

/// A channel's recording as the audit trail names it.
#[derive(Debug, Clone)]
pub struct FleetRecording {
    pub channel_seq: u32,
    pub info: RecordingInfo,
    /// Where the uploader put it.
    pub object_key: String,
}

/// The session's recordings and their object keys.
pub fn recordings(s: &FleetSessionLog, prefix: &str) -> rusqlite::Result<Vec<FleetRecording>> {
    let mut out = Vec::new();
    for r in s.log.session_rows(&s.session_id)? {
        if let (Some(ch), Some(SshEvent::ChannelClose(c))) = (r.channel_seq, r.event()) {
            if let Some(info) = c.recording {
                out.push(FleetRecording {
                    channel_seq: ch,
                    object_key: objects::recording_key(
                        prefix,
                        &r.keys.tenant,
                        r.at_ms,
                        &r.keys.session_id,
                        &info.path,
                    ),
                    info,
                });
            }
        }
    }
    Ok(out)
}

/// Downloads a recording and its manifest and checks them against each other and against the hash in the
/// audit record; the object's bytes only if all agree.
pub async fn fetch_recording(
    objects: &Objects,
    session_id: &str,
    r: &FleetRecording,
) -> Result<bytes::Bytes, ObjectError> {
    let mkey = objects::manifest_key(&r.object_key);
    let manifest = match objects.get(&mkey).await {
        Ok(b) => b,
        Err(ObjectError::NotFound(_)) => {
            return Err(ObjectError::NotFound(format!(
                "{mkey} (the recording is not uploaded yet, or its upload did not finish; its node keeps the local copy)"
            )))
        }
        Err(e) => return Err(e),
    };
    let manifest: Manifest = serde_json::from_slice(&manifest).map_err(|e| {
        ObjectError::Tampered(format!(
            "{mkey}: not a recording manifest ({e}); refusing to show the recording"
        ))
    })?;
    let object = objects.get(&r.object_key).await?;
    objects::verify_download(
        &manifest,
        &r.object_key,
        session_id,
        &object,
        r.info.sha256.as_deref(),
    )?;
    Ok(object)
}
