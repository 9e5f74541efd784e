//! Audit records of enrollment: tokens created and revoked, devices enrolled, refused, approved, refreshed,
//! rotated, proven, left, revoked and expired. Kept in the audit store (`audit.path`, table `enroll_events`)
//! next to the flow records, and reviewed with `rampart audit enroll`.
//!
//! These records are rare (one per admin action or device request, rate limited per source), so each is
//! written synchronously in its own transaction when it happens. A record that cannot be written is logged at
//! ERROR; the action itself has already happened (the store of record is `enroll.db`).
//!
//! Never: a secret in a record (tokens are named by their public id).
#![deny(unsafe_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS enroll_events (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tenant TEXT,
    device TEXT,
    device_name TEXT,
    token TEXT,
    actor TEXT NOT NULL,
    source TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS enroll_events_at ON enroll_events (at_ms);
";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    TokenCreated,
    TokenRevoked,
    /// Too many wrong secrets: the token is locked for a while.
    TokenLocked,
    /// A device enrolled (active or pending).
    DeviceEnrolled,
    /// A retry within the retry window returned the same device (new device token).
    DeviceEnrollRetried,
    /// Same token and `device_id` again: the device's key was replaced.
    DeviceReenrolled,
    /// An enrollment was refused (detail: the error code).
    EnrollRefused,
    DeviceApproved,
    /// A device fetched its configuration (detail: whether it changed).
    DeviceRefreshed,
    DeviceKeyRotated,
    /// The first completed handshake with the device's current key.
    DeviceProven,
    /// The device removed itself.
    DeviceLeft,
    /// An admin removed the device.
    DeviceRevoked,
    /// An ephemeral device was not seen for its timeout and was removed.
    DeviceExpired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TokenCreated => "token_created",
            EventKind::TokenRevoked => "token_revoked",
            EventKind::TokenLocked => "token_locked",
            EventKind::DeviceEnrolled => "device_enrolled",
            EventKind::DeviceEnrollRetried => "device_enroll_retried",
            EventKind::DeviceReenrolled => "device_reenrolled",
            EventKind::EnrollRefused => "enroll_refused",
            EventKind::DeviceApproved => "device_approved",
            EventKind::DeviceRefreshed => "device_refreshed",
            EventKind::DeviceKeyRotated => "device_key_rotated",
            EventKind::DeviceProven => "device_proven",
            EventKind::DeviceLeft => "device_left",
            EventKind::DeviceRevoked => "device_revoked",
            EventKind::DeviceExpired => "device_expired",
        }
    }
}

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

/// One record.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub actor: Actor,
    pub tenant: Option<String>,
    /// `dev_<id>`.
    pub device: Option<String>,
    pub device_name: Option<String>,
    /// The token's public id.
    pub token: Option<String>,
    pub source: Option<IpAddr>,
    /// Small JSON object with what else matters (address, state, error code, ...).
    pub detail: serde_json::Value,
}

impl Event {
    pub fn new(kind: EventKind, actor: Actor) -> Event {
        Event {
            kind,
            actor,
            tenant: None,
            device: None,
            device_name: None,
            token: None,
            source: None,
            detail: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn device(mut self, d: &super::store::DeviceRow) -> Event {
        self.tenant = Some(d.tenant.to_string());
        self.device = Some(d.api_id());
        self.device_name = Some(d.name.to_string());
        self.token = Some(d.token_id.to_string());
        self
    }

    pub fn token(mut self, id: &super::secret::PublicId) -> Event {
        self.token = Some(id.to_string());
        self
    }

    pub fn tenant(mut self, t: &str) -> Event {
        self.tenant = Some(t.to_string());
        self
    }

    pub fn source(mut self, ip: IpAddr) -> Event {
        self.source = Some(ip);
        self
    }

    pub fn detail(mut self, key: &str, value: impl Serialize) -> Event {
        if let serde_json::Value::Object(m) = &mut self.detail {
            m.insert(
                key.to_string(),
                serde_json::to_value(value).unwrap_or_default(),
            );
        }
        self
    }
}

/// Writes enrollment records to the audit store.
pub struct AuditLog {
    path: PathBuf,
    conn: Mutex<Option<Connection>>,
}

impl AuditLog {
    pub fn new(path: &Path) -> AuditLog {
        AuditLog {
            path: path.to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    /// Writes `e` now; a failure is logged (and the connection reopened next time).
    pub fn record(&self, e: Event) {
        if let Err(err) = self.try_record(&e) {
            tracing::error!(kind = e.kind.as_str(), path = %self.path.display(), error = %err,
                "cannot write the enrollment audit record");
        }
    }

    pub fn try_record(&self, e: &Event) -> rusqlite::Result<()> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(open(&self.path)?);
        }
        let conn = guard.as_ref().expect("opened above");
        let r = conn.execute(
            "INSERT INTO enroll_events (at_ms, kind, tenant, device, device_name, token, actor, source, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
                e.kind.as_str(),
                e.tenant,
                e.device,
                e.device_name,
                e.token,
                e.actor.text(),
                e.source.map(|s| s.to_string()),
                e.detail.to_string(),
            ],
        );
        if r.is_err() {
            *guard = None;
        }
        r.map(|_| ())
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// A record as reviewed.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub at_ms: i64,
    pub kind: String,
    pub tenant: Option<String>,
    pub device: Option<String>,
    pub device_name: Option<String>,
    pub token: Option<String>,
    pub actor: String,
    pub source: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub tenant: Option<String>,
    /// Device name or `dev_<id>`.
    pub device: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Records matching `f`, newest first; none when the store has no enrollment records yet.
pub fn query(path: &Path, f: &EventFilter) -> rusqlite::Result<Vec<EventRow>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'enroll_events')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut st = conn.prepare(
        "SELECT id, at_ms, kind, tenant, device, device_name, token, actor, source, detail FROM enroll_events
         WHERE (?1 IS NULL OR tenant = ?1)
           AND (?2 IS NULL OR device = ?2 OR device_name = ?2)
           AND (?3 IS NULL OR kind = ?3)
           AND (?4 IS NULL OR at_ms >= ?4)
         ORDER BY id DESC LIMIT ?5",
    )?;
    let rows = st.query_map(
        params![f.tenant, f.device, f.kind, f.since_ms, f.limit as i64],
        |r| {
            let detail: String = r.get(9)?;
            Ok(EventRow {
                id: r.get(0)?,
                at_ms: r.get(1)?,
                kind: r.get(2)?,
                tenant: r.get(3)?,
                device: r.get(4)?,
                device_name: r.get(5)?,
                token: r.get(6)?,
                actor: r.get(7)?,
                source: r.get(8)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
            })
        },
    )?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_and_queried_newest_first() {
        let dir = std::env::temp_dir().join(format!(
            "rampart-enroll-audit-{}-{}",
            std::process::id(),
            super::super::secret::PublicId::random()
        ));
        let path = dir.join("audit.db");
        let log = AuditLog::new(&path);
        log.try_record(
            &Event::new(EventKind::TokenCreated, Actor::Admin("root".into()))
                .tenant("acme")
                .detail("max_uses", 1),
        )
        .unwrap();
        log.try_record(
            &Event::new(EventKind::EnrollRefused, Actor::Device)
                .tenant("acme")
                .source("198.18.1.2".parse().unwrap())
                .detail("error", "token_expired"),
        )
        .unwrap();
        let rows = query(
            &path,
            &EventFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].kind, "enroll_refused");
        assert_eq!(rows[0].detail["error"], "token_expired");
        assert_eq!(rows[0].source.as_deref(), Some("198.18.1.2"));
        assert_eq!(rows[1].actor, "admin:root");
        let only = query(
            &path,
            &EventFilter {
                kind: Some("token_created".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(only.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
