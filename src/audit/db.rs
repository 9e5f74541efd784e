//! The audit store's SQLite file: how it is opened (WAL, `synchronous = FULL`, busy timeout) and its schema,
//! with every migration in one place ([`migrate`], keyed by `PRAGMA user_version`).
//!
//! One connection writes (the writer thread); review commands open their own read-only connections, which
//! WAL lets run alongside. Durability: a record is durable once the transaction holding it commits (fsync'd,
//! so it survives kill -9 and power loss).
#![deny(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 4;

/// Version 1: the three record tables as the first three writers made them (stores written before
/// `user_version` was set are version 1 too).
pub(super) const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS flows (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    protocol INTEGER NOT NULL,
    src TEXT NOT NULL,
    sport INTEGER NOT NULL,
    dst TEXT NOT NULL,
    dport INTEGER NOT NULL,
    dst_device TEXT,
    action TEXT NOT NULL,
    rule TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    established_ms INTEGER,
    ended_ms INTEGER,
    packets_out INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    packets_in INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    end_reason TEXT,
    UNIQUE (run_id, seq)
);
CREATE INDEX IF NOT EXISTS flows_by_time ON flows (started_ms);
CREATE INDEX IF NOT EXISTS flows_by_tenant ON flows (tenant, started_ms);
CREATE TABLE IF NOT EXISTS http_requests (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    ref_id TEXT NOT NULL,
    flow_seq INTEGER NOT NULL,
    flow_id INTEGER,
    tenant TEXT NOT NULL,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    scheme TEXT NOT NULL,
    sni TEXT,
    method TEXT NOT NULL,
    host TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER,
    req_bytes INTEGER NOT NULL,
    resp_bytes INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    flow_rule TEXT NOT NULL,
    rule TEXT,
    decision TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS http_requests_by_time ON http_requests (at_ms);
CREATE INDEX IF NOT EXISTS http_requests_by_tenant ON http_requests (tenant, at_ms);
CREATE INDEX IF NOT EXISTS http_requests_by_flow ON http_requests (flow_id);
CREATE TABLE IF NOT EXISTS ssh_log (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    session_id TEXT NOT NULL,
    channel_seq INTEGER,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    target TEXT NOT NULL,
    login TEXT NOT NULL,
    cert_serial TEXT,
    rule TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ssh_log_by_session ON ssh_log (session_id, seq);
CREATE INDEX IF NOT EXISTS ssh_log_by_kind ON ssh_log (kind, at_ms);
CREATE TABLE IF NOT EXISTS ssh_checkpoints (
    seq INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    at_ms INTEGER NOT NULL,
    key_fingerprint TEXT NOT NULL,
    signature TEXT NOT NULL
);
";

/// Version 2: every record joins one hash chain (`chain`), signed by `checkpoints`. Flow rows name the chain
/// entries of their start, establishment and end; HTTP rows theirs (and their run); SSH rows are numbered
/// by the chain; gateway events (run start, gaps, evictions) have their table. The version 1 SSH tables are
/// kept, renamed, as they were (never deleted; `rampart audit verify` reports them as not covered).
const SCHEMA_V2: &str = "
CREATE TABLE chain (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    digest BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    at_ms INTEGER NOT NULL,
    key_fingerprint TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
ALTER TABLE flows ADD COLUMN start_chain INTEGER;
ALTER TABLE flows ADD COLUMN est_chain INTEGER;
ALTER TABLE flows ADD COLUMN end_chain INTEGER;
CREATE INDEX flows_by_start_chain ON flows (start_chain);
CREATE INDEX flows_by_est_chain ON flows (est_chain);
CREATE INDEX flows_by_end_chain ON flows (end_chain);
ALTER TABLE http_requests ADD COLUMN run_id INTEGER;
ALTER TABLE http_requests ADD COLUMN chain_seq INTEGER;
CREATE INDEX http_requests_by_chain ON http_requests (chain_seq);
ALTER TABLE ssh_log RENAME TO ssh_log_v1;
ALTER TABLE ssh_checkpoints RENAME TO ssh_checkpoints_v1;
DROP INDEX IF EXISTS ssh_log_by_session;
DROP INDEX IF EXISTS ssh_log_by_kind;
CREATE TABLE ssh_log (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tenant TEXT NOT NULL,
    session_id TEXT NOT NULL,
    channel_seq INTEGER,
    device TEXT NOT NULL,
    user TEXT NOT NULL,
    target TEXT NOT NULL,
    login TEXT NOT NULL,
    cert_serial TEXT,
    rule TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX ssh_log_by_session ON ssh_log (session_id, seq);
CREATE INDEX ssh_log_by_kind ON ssh_log (kind, at_ms);
";

/// Version 3: enrollment records (`tables::enroll`), each a chain entry.
const SCHEMA_V3: &str = "
CREATE TABLE enroll_log (
    chain_seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    tenant TEXT,
    device TEXT,
    device_name TEXT,
    token TEXT,
    source TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX enroll_log_by_time ON enroll_log (at_ms);
CREATE INDEX enroll_log_by_tenant ON enroll_log (tenant, at_ms);
";

/// Version 4: review UI records (`tables::admin`), each a chain entry.
const SCHEMA_V4: &str = "
CREATE TABLE admin_log (
    chain_seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    tenant TEXT,
    session_id TEXT,
    source TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX admin_log_by_time ON admin_log (at_ms);
";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the audit store was written by a newer Rampart (schema {found}, this build knows {SCHEMA_VERSION}); upgrade Rampart to use it")]
    TooNew { found: i64 },
}

/// Opens (creating if needed, mode 0600) the store for writing and brings its schema to [`SCHEMA_VERSION`].
pub fn open_rw(path: &Path) -> Result<Connection, DbError> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Records hold tenant data: readable by the gateway's user only.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Opens an existing store for review, never writing to it.
pub fn open_readonly(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`], one version at a time, each step in its own transaction.
pub fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(DbError::TooNew { found: version });
    }
    if version < 1 {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA_V1)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()?;
    }
    if version < 2 {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA_V2)?;
        tx.pragma_update(None, "user_version", 2)?;
        tx.commit()?;
    }
    if version < 3 {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA_V3)?;
        tx.pragma_update(None, "user_version", 3)?;
        tx.commit()?;
    }
    if version < 4 {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA_V4)?;
        tx.pragma_update(None, "user_version", 4)?;
        tx.commit()?;
    }
    Ok(())
}

/// Whether `table` exists (review of a store that never held records of some kind).
pub fn has_table(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .is_some())
}
