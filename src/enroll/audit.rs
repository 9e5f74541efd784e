//! How enrollment writes its audit records (`audit::enroll_records`): inside the gateway, straight into the
//! audit pipeline; from the admin CLI (another process), into a spool file in `state_dir` that the gateway's
//! watcher moves into the pipeline (every 2 s, and at start), so the audit store keeps one writer and one hash
//! chain.
//!
//! Spool: `state_dir/enroll-audit.spool`, one JSON record per line, mode 0600, appended and taken under an
//! exclusive lock on `state_dir/enroll-audit.lock`. A record leaves the spool only once it is committed; a
//! crash between the two can repeat it, never lose it.
//!
//! Never: a secret in a record (tokens are named by their public id).
#![deny(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use crate::audit::enroll_records::EnrollEvent as EventKind;
use crate::audit::enroll_records::{EnrollAuditSink, EnrollRecord};

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A request to the enrollment listener (a device, or whoever holds a token).
    Device,
    /// An admin, by local user name (CLI) or account (web UI).
    Admin(String),
    /// The gateway itself (handshake seen, ephemeral timeout).
    Gateway,
}

impl Actor {
    fn text(&self) -> String {
        match self {
            Actor::Device => "device".into(),
            Actor::Admin(who) => format!("admin:{who}"),
            Actor::Gateway => "gateway".into(),
        }
    }
}

/// Builds one record.
#[derive(Debug, Clone)]
pub struct Event(EnrollRecord);

impl Event {
    pub fn new(kind: EventKind, actor: Actor) -> Event {
        Event(EnrollRecord {
            at_ms: now_ms(),
            event: kind,
            actor: actor.text(),
            tenant: None,
            device: None,
            device_name: None,
            token: None,
            source: None,
            detail: serde_json::Value::Object(Default::default()),
        })
    }

    pub fn device(mut self, d: &super::store::DeviceRow) -> Event {
        self.0.tenant = Some(d.tenant.to_string());
        self.0.device = Some(d.api_id());
        self.0.device_name = Some(d.name.to_string());
        self.0.token = Some(d.token_id.to_string());
        self
    }

    pub fn token(mut self, id: &super::secret::PublicId) -> Event {
        self.0.token = Some(id.to_string());
        self
    }

    pub fn tenant(mut self, t: &str) -> Event {
        self.0.tenant = Some(t.to_string());
        self
    }

    pub fn source(mut self, ip: IpAddr) -> Event {
        self.0.source = Some(ip.to_string());
        self
    }

    pub fn detail(mut self, key: &str, value: impl Serialize) -> Event {
        if let serde_json::Value::Object(m) = &mut self.0.detail {
            m.insert(
                key.to_string(),
                serde_json::to_value(value).unwrap_or_default(),
            );
        }
        self
    }

    pub fn into_record(self) -> EnrollRecord {
        self.0
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where records go.
#[derive(Clone)]
pub enum AuditLog {
    /// Inside the gateway: its audit pipeline.
    Pipeline(EnrollAuditSink),
    /// Another process (the admin CLI): the spool of `state_dir`, for the gateway to take.
    Spool(PathBuf),
}

impl AuditLog {
    /// Records `e`; a failure is logged (the action itself has happened: `enroll.db` is its store of record).
    pub fn record(&self, e: Event) {
        match self {
            AuditLog::Pipeline(sink) => sink.emit(e.0),
            AuditLog::Spool(state_dir) => {
                if let Err(err) = append(state_dir, std::slice::from_ref(&e.0)) {
                    tracing::error!(event = e.0.event.as_str(), error = %err,
                        "cannot spool the enrollment audit record");
                }
            }
        }
    }

    /// Whether records are being committed now (a spool always takes them).
    pub fn healthy(&self) -> bool {
        match self {
            AuditLog::Pipeline(sink) => sink.healthy(),
            AuditLog::Spool(_) => true,
        }
    }
}

pub fn spool_path(state_dir: &Path) -> PathBuf {
    state_dir.join("enroll-audit.spool")
}

fn lock(state_dir: &Path) -> std::io::Result<File> {
    std::fs::create_dir_all(state_dir)?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join("enroll-audit.lock"))?;
    f.lock()?;
    Ok(f)
}

fn append(state_dir: &Path, records: &[EnrollRecord]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let _lock = lock(state_dir)?;
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(spool_path(state_dir))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Moves the spooled records into the pipeline, each waiting for its commit; what is not committed stays
/// spooled for the next call.
pub async fn drain_spool(state_dir: &Path, sink: &EnrollAuditSink) -> std::io::Result<usize> {
    let path = spool_path(state_dir);
    if !path.exists() {
        return Ok(0);
    }
    let dir = state_dir.to_path_buf();
    let (guard, records) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let guard = lock(&dir)?;
        let text = match std::fs::read_to_string(spool_path(&dir)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut records = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<EnrollRecord>(line) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::error!(error = %e, "skipping an unreadable spooled enrollment record")
                }
            }
        }
        Ok((guard, records))
    })
    .await
    .map_err(std::io::Error::other)??;
    let mut done = 0;
    for r in &records {
        if let Err(e) = sink.emit_durable(r.clone()).await {
            tracing::warn!(error = %e, "spooled enrollment records wait: the audit store does not take them now");
            break;
        }
        done += 1;
    }
    let dir = state_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let _guard = guard;
        let path = spool_path(&dir);
        if done == records.len() {
            return std::fs::remove_file(&path);
        }
        // Keep what was not committed (and anything appended meanwhile is impossible: we hold the lock).
        let tmp = dir.join("enroll-audit.spool.tmp");
        let _ = std::fs::remove_file(&tmp);
        append_to(&tmp, &records[done..])?;
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(done)
}

fn append_to(path: &Path, records: &[EnrollRecord]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for r in records {
        writeln!(
            f,
            "{}",
            serde_json::to_string(r).map_err(std::io::Error::other)?
        )?;
    }
    f.sync_all()
}

/// The spooled records (tests and `rampart audit enroll` for what is not committed yet).
pub fn spooled(state_dir: &Path) -> Vec<EnrollRecord> {
    std::fs::read_to_string(spool_path(state_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::review::enroll::{query, EnrollFilter};
    use crate::audit::{start, PipelineOptions};

    #[test]
    fn spooled_records_reach_the_chain_once() {
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        let log = AuditLog::Spool(dir.clone());
        log.record(
            Event::new(EventKind::TokenCreated, Actor::Admin("root".into()))
                .tenant("acme")
                .detail("max_uses", 1),
        );
        log.record(
            Event::new(EventKind::DeviceApproved, Actor::Admin("root".into())).tenant("acme"),
        );
        assert_eq!(spooled(&dir).len(), 2);
        let db = dir.join("audit.db");
        let (sink, writer) = start(PipelineOptions::new(
            db.clone(),
            dir.join("audit_signing_key"),
        ))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let enroll = sink.enroll();
        assert_eq!(rt.block_on(drain_spool(&dir, &enroll)).unwrap(), 2);
        assert!(!spool_path(&dir).exists());
        assert_eq!(rt.block_on(drain_spool(&dir, &enroll)).unwrap(), 0);
        AuditLog::Pipeline(enroll).record(
            Event::new(EventKind::EnrollRefused, Actor::Device)
                .source("198.18.1.2".parse().unwrap())
                .detail("error", "token_expired"),
        );
        drop(sink);
        writer.finish();
        let rows = query(
            &db,
            &EnrollFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        let events: Vec<&str> = rows.iter().map(|r| r.event.as_str()).collect();
        assert_eq!(
            events,
            ["enroll_refused", "device_approved", "token_created"]
        );
        assert_eq!(rows[0].detail["error"], "token_expired");
        assert_eq!(rows[0].source.as_deref(), Some("198.18.1.2"));
        assert_eq!(rows[2].actor, "admin:root");
        // They are chain entries: verify covers them, and a changed byte shows.
        use crate::audit::review::verify::verify;
        let key = russh::keys::ssh_key::PublicKey::from_openssh(
            std::fs::read_to_string(dir.join("audit_signing_key.pub"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        let conn = crate::audit::db::open_readonly(&db).unwrap();
        let report = verify(&conn, &dir, &key, None).unwrap();
        assert!(report.first_break.is_none(), "{report:?}");
        assert_eq!(report.by_kind.get("enroll"), Some(&3));
        drop(conn);
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(
                "UPDATE enroll_log SET actor = 'admin:mallory' WHERE event = 'token_created'",
            )
            .unwrap();
        let conn = crate::audit::db::open_readonly(&db).unwrap();
        let report = verify(&conn, &dir, &key, None).unwrap();
        assert!(
            report
                .first_break
                .is_some_and(|b| b.what.contains("enrollment record")),
            "a changed record must break the chain"
        );
    }
}
