//! HTTP audit records: one row per request the HTTP inspector (`crate::http`) handled (and one per TLS
//! connection it passed through or refused without decrypting), in table `http_requests` of the audit SQLite
//! store, written through a connection of its own (WAL, so flow writes and reviews run alongside).
//!
//! - [`HttpAuditSink::emit`] never blocks: a full queue drops the record and counts it.
//! - One writer thread commits batches at most [`COMMIT_INTERVAL`] after a record arrived, or up to
//!   [`FLOW_LINK_WAIT`] later while the record waits for its flow's row. Durability is that of the flow store
//!   (WAL, `synchronous = FULL`); a crash loses what was queued or still held.
//! - Each row carries the flow's `seq` and its id in `flows` (`flow_id`, NULL if the flow's row never
//!   appeared), so a reviewer goes from `rampart audit flows` to the flow's requests
//!   (`rampart audit http --flow ID`).
//!
//! Never: update or delete a row.
#![deny(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _};
use serde::Serialize;

/// Records queued towards the writer before `emit` starts dropping.
const QUEUE: usize = 8192;
/// Longest a record waits in the writer before its batch commits.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// How long a record may wait for its flow's row (to store `flow_id`); the flow writer commits every
/// `audit.commit_interval_ms` (250 ms by default).
pub const FLOW_LINK_WAIT: Duration = Duration::from_secs(3);

const SCHEMA: &str = "
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
";

/// One request (or TLS connection) as the inspector saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpRecord {
    /// When the request started (Unix ms).
    pub at_ms: i64,
    /// Reference id shown on block pages, so a user's report finds its record.
    pub ref_id: String,
    pub flow_seq: u64,
    pub tenant: String,
    pub device: String,
    pub user: String,
    /// `ip:port` of the device side and of the original destination.
    pub src: String,
    pub dst: String,
    /// `http`, `https` (decrypted) or `tls` (not decrypted: passed through or refused on the server name).
    pub scheme: String,
    pub sni: Option<String>,
    /// `-` for TLS connections that were not decrypted.
    pub method: String,
    pub host: String,
    pub path: String,
    /// The status the device got; `None` when it got none (TLS records, aborted requests).
    pub status: Option<u16>,
    /// Body bytes from the device (after a protocol switch or for TLS not decrypted: all bytes each way).
    pub req_bytes: u64,
    /// Body bytes to the device, including the inspector's own pages.
    pub resp_bytes: u64,
    /// From the request head to the end of the response body (or of the tunnel).
    pub duration_ms: u64,
    /// The flow rule (`[[tenant.rule]]`) that sent the flow to the inspector.
    pub flow_rule: String,
    /// The deciding `[[tenant.http_rule]]` (or a built-in reason such as `upstream-cert-untrusted`); `None`:
    /// no rule matched (allowed).
    pub rule: Option<String>,
    /// `allow`, `log`, `block`, `passthrough` or `error`.
    pub decision: String,
    pub error: Option<String>,
}

/// The inspector's handle on the writer. When the last clone is dropped, everything queued is committed
/// before the drop returns (so a clean shutdown loses nothing).
#[derive(Clone)]
pub struct HttpAuditSink {
    // Field order matters: the sender goes first, so the writer sees the channel close, then `_writer` joins it.
    tx: SyncSender<HttpRecord>,
    dropped: Arc<AtomicU64>,
    /// False while the last write failed.
    healthy: Arc<AtomicBool>,
    _writer: Arc<WriterThread>,
}

struct WriterThread(Option<std::thread::JoinHandle<()>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

impl HttpAuditSink {
    /// Opens (creating if needed) the table in the store at `path` and starts the writer thread, which ends
    /// after the last sink is dropped and everything queued is committed.
    pub fn start(path: &Path) -> rusqlite::Result<HttpAuditSink> {
        let conn = open_rw(path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let thread = std::thread::Builder::new()
            .name("rampart-http-audit".into())
            .spawn(move || writer(conn, rx, h))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(HttpAuditSink {
            tx,
            dropped,
            healthy,
            _writer: Arc::new(WriterThread(Some(thread))),
        })
    }

    /// Queues a record; never blocks.
    pub fn emit(&self, r: HttpRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(r) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether records are being committed (false while the store fails).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full or the writer had stopped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn open_rw(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<HttpRecord>, healthy: Arc<AtomicBool>) {
    let mut pending: Vec<HttpRecord> = Vec::new();
    let mut open = true;
    let mut last_error_log: Option<Instant> = None;
    while open || !pending.is_empty() {
        if pending.is_empty() {
            match rx.recv() {
                Ok(r) => pending.push(r),
                Err(_) => break,
            }
        }
        let deadline = Instant::now() + COMMIT_INTERVAL;
        while open && pending.len() < 1024 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(r) => pending.push(r),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        // At shutdown (`!open`) everything held is written, linked or not.
        match write_batch(&mut conn, &pending, open) {
            Ok(deferred) => {
                healthy.store(true, Ordering::Relaxed);
                pending = deferred;
                if !pending.is_empty() && open {
                    // Only records waiting for their flow's row: do not spin.
                    std::thread::sleep(COMMIT_INTERVAL);
                }
            }
            Err(e) => {
                healthy.store(false, Ordering::Relaxed);
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_error_log = Some(Instant::now());
                    tracing::error!(error = %e, held = pending.len(), "HTTP audit write failed; retrying");
                }
                if !open || pending.len() > QUEUE {
                    tracing::error!(
                        lost = pending.len(),
                        "HTTP audit records lost (store not writable)"
                    );
                    pending.clear();
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Inserts `records` in one transaction. With `wait_for_flows`, a record whose flow row is not there yet (the
/// flow writer commits on its own schedule) and that ended less than [`FLOW_LINK_WAIT`] ago is returned
/// instead of inserted, to be tried again; past that it is stored without `flow_id`.
fn write_batch(
    conn: &mut Connection,
    records: &[HttpRecord],
    wait_for_flows: bool,
) -> rusqlite::Result<Vec<HttpRecord>> {
    let now_ms = unix_ms_now();
    let mut deferred = Vec::new();
    // IMMEDIATE: take the write lock up front (a deferred read-then-write transaction fails with
    // SQLITE_BUSY_SNAPSHOT when the flow writer commits in between).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut flow_id = tx
            .prepare_cached(
                "SELECT id FROM flows WHERE seq = ?1 AND tenant = ?2 AND src = ?3 AND sport = ?4
                   AND started_ms <= ?5 ORDER BY id DESC LIMIT 1",
            )
            .ok();
        let mut insert = tx.prepare_cached(
            "INSERT INTO http_requests (at_ms, ref_id, flow_seq, flow_id, tenant, device, user, src, dst, scheme,
                sni, method, host, path, status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                ?21, ?22)",
        )?;
        for r in records {
            let (ip, port) = r.src.rsplit_once(':').unwrap_or((&r.src, "0"));
            let port: i64 = port.parse().unwrap_or(0);
            let fid: Option<i64> = flow_id.as_mut().and_then(|s| {
                s.query_row(
                    params![r.flow_seq as i64, r.tenant, ip, port, r.at_ms + 1000],
                    |row| row.get(0),
                )
                .optional()
                .ok()
                .flatten()
            });
            let ended_ms = r.at_ms + r.duration_ms as i64;
            if fid.is_none()
                && wait_for_flows
                && now_ms - ended_ms < FLOW_LINK_WAIT.as_millis() as i64
            {
                deferred.push(r.clone());
                continue;
            }
            insert.execute(params![
                r.at_ms,
                r.ref_id,
                r.flow_seq as i64,
                fid,
                r.tenant,
                r.device,
                r.user,
                r.src,
                r.dst,
                r.scheme,
                r.sni,
                r.method,
                r.host,
                r.path,
                r.status,
                r.req_bytes as i64,
                r.resp_bytes as i64,
                r.duration_ms as i64,
                r.flow_rule,
                r.rule,
                r.decision,
                r.error,
            ])?;
        }
    }
    tx.commit()?;
    Ok(deferred)
}

/// A stored record as review shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRow {
    pub id: i64,
    pub flow_id: Option<i64>,
    #[serde(flatten)]
    pub record: HttpRecord,
}

/// Filters for `rampart audit http`; `None` = no filter.
#[derive(Debug, Default)]
pub struct HttpFilter {
    pub tenant: Option<String>,
    pub user: Option<String>,
    /// Exact host (case-insensitive).
    pub host: Option<String>,
    pub flow_id: Option<i64>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Records matching `f`, newest first. An audit store without HTTP records yields none.
pub fn query(path: &Path, f: &HttpFilter) -> rusqlite::Result<Vec<HttpRow>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let exists: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'http_requests'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT id, flow_id, at_ms, ref_id, flow_seq, tenant, device, user, src, dst, scheme, sni, method, host,
                path, status, req_bytes, resp_bytes, duration_ms, flow_rule, rule, decision, error
         FROM http_requests
         WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR user = ?2) AND (?3 IS NULL OR host = lower(?3))
           AND (?4 IS NULL OR flow_id = ?4) AND (?5 IS NULL OR at_ms >= ?5)
         ORDER BY at_ms DESC, id DESC LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![
            f.tenant,
            f.user,
            f.host,
            f.flow_id,
            f.since_ms,
            f.limit.min(i64::MAX as usize) as i64
        ],
        |r| {
            Ok(HttpRow {
                id: r.get(0)?,
                flow_id: r.get(1)?,
                record: HttpRecord {
                    at_ms: r.get(2)?,
                    ref_id: r.get(3)?,
                    flow_seq: r.get::<_, i64>(4)? as u64,
                    tenant: r.get(5)?,
                    device: r.get(6)?,
                    user: r.get(7)?,
                    src: r.get(8)?,
                    dst: r.get(9)?,
                    scheme: r.get(10)?,
                    sni: r.get(11)?,
                    method: r.get(12)?,
                    host: r.get(13)?,
                    path: r.get(14)?,
                    status: r.get(15)?,
                    req_bytes: r.get::<_, i64>(16)? as u64,
                    resp_bytes: r.get::<_, i64>(17)? as u64,
                    duration_ms: r.get::<_, i64>(18)? as u64,
                    flow_rule: r.get(19)?,
                    rule: r.get(20)?,
                    decision: r.get(21)?,
                    error: r.get(22)?,
                },
            })
        },
    )?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(host: &str, at_ms: i64) -> HttpRecord {
        HttpRecord {
            at_ms,
            ref_id: "r1".into(),
            flow_seq: 7,
            tenant: "acme".into(),
            device: "laptop".into(),
            user: "alice".into(),
            src: "100.96.0.2:40000".into(),
            dst: "198.18.1.2:80".into(),
            scheme: "http".into(),
            method: "GET".into(),
            host: host.into(),
            path: "/x".into(),
            status: Some(200),
            req_bytes: 0,
            resp_bytes: 10,
            duration_ms: 3,
            flow_rule: "web".into(),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_are_committed_and_filtered() {
        let dir = std::env::temp_dir().join(format!("rampart-http-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.db");
        // The flow table exists in a real store; the flow id is resolved from it.
        crate::audit::store::Store::open(&path).unwrap();
        let sink = HttpAuditSink::start(&path).unwrap();
        sink.emit(rec("a.example", 1000));
        sink.emit(rec("b.example", 2000));
        // Dropping the last sink commits everything queued before it returns.
        drop(sink);
        let rows = query(
            &path,
            &HttpFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].record, rec("b.example", 2000));
        assert_eq!(rows[0].flow_id, None);
        let only = query(
            &path,
            &HttpFilter {
                host: Some("A.example".into()),
                since_ms: Some(500),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].record.host, "a.example");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn wait(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_failing_store_marks_the_sink_unhealthy_until_writes_succeed_again() {
        let dir = std::env::temp_dir().join(format!("rampart-http-health-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.db");
        let sink = HttpAuditSink::start(&path).unwrap();
        let all = || {
            query(
                &path,
                &HttpFilter {
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        sink.emit(rec("a.example", 1000));
        wait("the first record", || all().len() == 1);
        assert!(sink.healthy());
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(Duration::from_secs(5)).unwrap();
        other.execute_batch("DROP TABLE http_requests").unwrap();
        sink.emit(rec("b.example", 2000));
        wait("the sink to notice the failure", || !sink.healthy());
        other.execute_batch(SCHEMA).unwrap();
        wait("the held record to be written", || {
            all().len() == 1 && sink.healthy()
        });
        assert_eq!(all()[0].record.host, "b.example");
        drop(sink);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_waits_for_its_flow_row_and_is_linked() {
        let dir = std::env::temp_dir().join(format!("rampart-http-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.db");
        crate::audit::store::Store::open(&path).unwrap();
        let sink = HttpAuditSink::start(&path).unwrap();
        let now = unix_ms_now();
        sink.emit(rec("late.example", now));
        std::thread::sleep(COMMIT_INTERVAL * 3);
        assert!(
            query(
                &path,
                &HttpFilter {
                    limit: 10,
                    ..Default::default()
                }
            )
            .unwrap()
            .is_empty(),
            "written before its flow's row appeared"
        );
        // The flow writer commits the flow's row a little later.
        let conn = Connection::open(&path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute(
            "INSERT INTO flows (run_id, seq, tenant, device, user, protocol, src, sport, dst, dport, action, rule,
                started_ms) VALUES (1, 7, 'acme', 'laptop', 'alice', 6, '100.96.0.2', 40000, '198.18.1.2', 80,
                'inspect_http', 'web', ?1)",
            params![now - 5],
        )
        .unwrap();
        let flow_id = conn.last_insert_rowid();
        drop(sink);
        let rows = query(
            &path,
            &HttpFilter {
                flow_id: Some(flow_id),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].flow_id, Some(flow_id));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
