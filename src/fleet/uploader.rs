//! The recording uploader (`[fleet.objects]`): a thread of its own (`rampart-objects`, a current-thread tokio
//! runtime) that uploads each finished SSH recording to the fleet's object store, with a manifest of its
//! SHA-256, and keeps the local copy until the upload is confirmed.
//!
//! Why its own thread and not the shipper's: a large recording may take minutes to upload, and the object
//! store and PostgreSQL fail independently; on one thread either would hold the other back. It needs nothing
//! from PostgreSQL (object keys follow from the audit record: [`objects::recording_key`]).
//!
//! Outbox: the work list is `state_dir/fleet-uploads.db` (SQLite, this thread's only). Each pass takes the
//! audit store's `channel.close` records after the cursor that name a finished recording and, in one
//! transaction, adds them as `pending` and moves the cursor: each recording is queued exactly once, whatever
//! crashes. A pending recording is uploaded create-only, then its manifest; only then is it `uploaded` (and,
//! with `keep_local = false`, its local file removed). A crash between the two leaves it pending; the retry
//! finds the same bytes under the key and confirms. The audit store is only read (the writer thread owns it).
//! Start reading at [`start`].
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{params, Connection, OptionalExtension as _};
use tokio::sync::Notify;

use super::objects::{self, Manifest, ObjectError, Objects};
use crate::audit::ssh_records::SshEvent;
use crate::audit::AuditCounters;

const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// `channel.close` records read per pass.
const SCAN_BATCH: i64 = 500;

pub struct UploaderHandle {
    thread: std::thread::JoinHandle<()>,
    stop: Arc<Stop>,
}

struct Stop {
    flag: AtomicBool,
    wake: Notify,
}

impl UploaderHandle {
    /// Stops after the upload in progress (what is left uploads at the next start).
    pub fn finish(self) {
        self.stop.flag.store(true, Ordering::SeqCst);
        self.stop.wake.notify_one();
        let _ = self.thread.join();
    }
}

/// What the uploader needs from the gateway's config.
pub struct UploaderConfig {
    pub node: String,
    pub state_dir: PathBuf,
    pub audit_db: PathBuf,
    pub interval: Duration,
}

/// The outbox file in `state_dir`.
pub fn outbox_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet-uploads.db")
}

/// Opens (and creates) the outbox.
pub fn open_outbox(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
         INSERT OR IGNORE INTO cursor (id, seq) VALUES (1, 0);
         CREATE TABLE IF NOT EXISTS uploads (
             seq INTEGER PRIMARY KEY,      -- the channel.close record's entry in the audit chain
             tenant TEXT NOT NULL,
             session_id TEXT NOT NULL,
             channel_seq INTEGER,
             path TEXT NOT NULL,           -- the local recording, relative to state_dir
             format TEXT NOT NULL,
             object_key TEXT NOT NULL,
             sha256 TEXT NOT NULL,
             size INTEGER NOT NULL,
             state TEXT NOT NULL,          -- pending | uploaded | failed
             attempts INTEGER NOT NULL DEFAULT 0,
             last_error TEXT,
             done_ms INTEGER
         );
         CREATE INDEX IF NOT EXISTS uploads_by_state ON uploads (state, seq);",
    )?;
    Ok(conn)
}

/// One recording in the outbox.
#[derive(Debug, Clone)]
pub struct Upload {
    pub seq: u64,
    pub tenant: String,
    pub session_id: String,
    pub channel_seq: Option<u32>,
    pub path: String,
    pub format: String,
    pub object_key: String,
    pub sha256: String,
    pub size: u64,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// Every row of the outbox, in chain order (for tests and `status`-like tools).
pub fn uploads(outbox: &Connection) -> rusqlite::Result<Vec<Upload>> {
    let mut stmt = outbox.prepare(
        "SELECT seq, tenant, session_id, channel_seq, path, format, object_key, sha256, size, state, attempts,
                last_error FROM uploads ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Upload {
            seq: r.get::<_, i64>(0)? as u64,
            tenant: r.get(1)?,
            session_id: r.get(2)?,
            channel_seq: r.get(3)?,
            path: r.get(4)?,
            format: r.get(5)?,
            object_key: r.get(6)?,
            sha256: r.get(7)?,
            size: r.get::<_, i64>(8)? as u64,
            state: r.get(9)?,
            attempts: r.get(10)?,
            last_error: r.get(11)?,
        })
    })?;
    rows.collect()
}

/// Queues the recordings of `channel.close` records after the cursor; returns how many records it read.
fn enqueue(audit: &Connection, outbox: &mut Connection, prefix: &str) -> rusqlite::Result<usize> {
    let cursor: i64 = outbox.query_row("SELECT seq FROM cursor WHERE id = 1", [], |r| r.get(0))?;
    let mut stmt = audit.prepare_cached(
        "SELECT seq, at_ms, tenant, session_id, channel_seq, body FROM ssh_log
         WHERE seq > ?1 AND kind = 'channel.close' ORDER BY seq LIMIT ?2",
    )?;
    let rows: Vec<(i64, i64, String, String, Option<u32>, String)> = stmt
        .query_map(params![cursor, SCAN_BATCH], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let Some(last) = rows.last().map(|r| r.0) else {
        return Ok(0);
    };
    let tx = outbox.transaction()?;
    for (seq, at_ms, tenant, session_id, channel_seq, body) in &rows {
        let Ok(SshEvent::ChannelClose(c)) = serde_json::from_str::<SshEvent>(body) else {
            continue;
        };
        // A recording that never got a hash (it failed to start or to finish) has nothing to upload.
        let Some(rec) = c.recording else { continue };
        let Some(sha256) = rec.sha256 else { continue };
        let key = objects::recording_key(prefix, tenant, *at_ms, session_id, &rec.path);
        tx.execute(
            "INSERT OR IGNORE INTO uploads (seq, tenant, session_id, channel_seq, path, format, object_key, sha256,
                 size, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending')",
            params![seq, tenant, session_id, channel_seq, rec.path, rec.format.as_ref(), key, sha256, rec.size as i64],
        )?;
    }
    tx.execute("UPDATE cursor SET seq = ?1 WHERE id = 1", [last])?;
    tx.commit()?;
    Ok(rows.len())
}

fn pending(outbox: &Connection) -> rusqlite::Result<Vec<Upload>> {
    Ok(uploads(outbox)?
        .into_iter()
        .filter(|u| u.state == "pending")
        .collect())
}

fn count(outbox: &Connection, state: &str) -> u64 {
    outbox
        .query_row(
            "SELECT count(*) FROM uploads WHERE state = ?1",
            [state],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .ok()
        .flatten()
        .unwrap_or(0) as u64
}

/// Uploads one recording and its manifest.
async fn upload_one(
    objects: &Objects,
    cfg: &UploaderConfig,
    u: &Upload,
) -> Result<(), ObjectError> {
    let local = cfg.state_dir.join(&u.path);
    if !local.exists() {
        return Err(ObjectError::Conflict(format!(
            "the local recording {} is gone (removed before it was uploaded)",
            local.display()
        )));
    }
    objects
        .upload_file(&u.object_key, &local, &u.sha256)
        .await?;
    let manifest = Manifest {
        format: objects::MANIFEST_FORMAT.into(),
        node: cfg.node.clone(),
        tenant: u.tenant.clone(),
        session_id: u.session_id.clone(),
        channel_seq: u.channel_seq,
        chain_seq: u.seq,
        object: u.object_key.clone(),
        sha256: u.sha256.clone(),
        size: u.size,
        recording_format: u.format.clone(),
    };
    let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    objects
        .put_create(&objects::manifest_key(&u.object_key), body.into())
        .await
}

/// Starts the uploader. Checks the bucket first: a missing bucket or refused credentials stop `rampart run`
/// (naming the key to fix); an unreachable store only delays the uploads (the recordings wait locally).
pub fn start(
    objects: Objects,
    cfg: UploaderConfig,
    counters: Arc<AuditCounters>,
) -> anyhow::Result<UploaderHandle> {
    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        wake: Notify::new(),
    });
    let outbox_file = outbox_path(&cfg.state_dir);
    let outbox = open_outbox(&outbox_file)
        .with_context(|| format!("cannot open the upload outbox {}", outbox_file.display()))?;
    let stop2 = stop.clone();
    let thread = super::start_worker(
        "rampart-objects",
        "recording uploader",
        move |ready| async move {
            match objects.check().await {
                Ok(()) => {}
                Err(ObjectError::Config(m)) => return ready.failed(anyhow::anyhow!("{m}")),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the fleet's object store is not reachable; SSH recordings are kept here and uploaded when it is"
                ),
            }
            ready.started();
            run(objects, cfg, outbox, stop2, counters).await;
        },
    )?;
    Ok(UploaderHandle { thread, stop })
}

async fn run(
    objects: Objects,
    cfg: UploaderConfig,
    mut outbox: Connection,
    stop: Arc<Stop>,
    counters: Arc<AuditCounters>,
) {
    let g = &counters.fleet.objects;
    g.enabled.store(true, Ordering::Relaxed);
    g.uploaded
        .store(count(&outbox, "uploaded"), Ordering::Relaxed);
    let mut audit: Option<Connection> = None;
    let mut backoff = Duration::from_millis(250);
    let mut last_warn: Option<Instant> = None;
    loop {
        if stop.flag.load(Ordering::SeqCst) {
            return;
        }
        if audit.is_none() {
            // The store exists once the audit writer started; a read-only open fails before its first commit.
            audit = crate::audit::db::open_readonly(&cfg.audit_db).ok();
        }
        let mut reopen = false;
        if let Some(a) = &audit {
            loop {
                match enqueue(a, &mut outbox, &objects.settings().prefix) {
                    Ok(n) if n as i64 >= SCAN_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        // `ssh_log` appears with the first SSH record; until then there is nothing to read.
                        tracing::debug!(error = %e, "recording uploader: cannot read the audit store yet");
                        reopen = true;
                        break;
                    }
                }
            }
        }
        if reopen {
            audit = None;
        }
        let work = pending(&outbox).unwrap_or_default();
        g.pending.store(work.len() as u64, Ordering::Relaxed);
        g.failed.store(count(&outbox, "failed"), Ordering::Relaxed);
        let mut retry = false;
        for u in &work {
            if stop.flag.load(Ordering::SeqCst) {
                return;
            }
            match upload_one(&objects, &cfg, u).await {
                Ok(()) => {
                    let _ = outbox.execute(
                        "UPDATE uploads SET state = 'uploaded', attempts = attempts + 1, last_error = NULL,
                             done_ms = ?2 WHERE seq = ?1",
                        params![u.seq as i64, crate::clock::unix_ms()],
                    );
                    g.uploaded.fetch_add(1, Ordering::Relaxed);
                    g.pending.fetch_sub(1, Ordering::Relaxed);
                    backoff = Duration::from_millis(250);
                    tracing::debug!(object = %u.object_key, "recording uploaded to the fleet's object store");
                    if !objects.settings().keep_local {
                        let p = cfg.state_dir.join(&u.path);
                        if let Err(e) = std::fs::remove_file(&p) {
                            tracing::warn!(path = %p.display(), error = %e, "cannot remove an uploaded recording");
                        }
                    }
                }
                Err(ObjectError::Conflict(m)) | Err(ObjectError::Tampered(m)) => {
                    tracing::error!(object = %u.object_key, "recording not uploaded (kept locally): {m}");
                    let _ = outbox.execute(
                        "UPDATE uploads SET state = 'failed', attempts = attempts + 1, last_error = ?2, done_ms = ?3
                         WHERE seq = ?1",
                        params![u.seq as i64, m, crate::clock::unix_ms()],
                    );
                    g.pending.fetch_sub(1, Ordering::Relaxed);
                    g.failed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let m = e.to_string();
                    let _ = outbox.execute(
                        "UPDATE uploads SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1",
                        params![u.seq as i64, m],
                    );
                    g.retries.fetch_add(1, Ordering::Relaxed);
                    if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        tracing::warn!(
                            "recording upload failed, retrying (the local copy is kept): {m}"
                        );
                        last_warn = Some(Instant::now());
                    } else {
                        tracing::debug!("recording upload failed, retrying: {m}");
                    }
                    retry = true;
                    break;
                }
            }
        }
        let pause = if retry {
            let b = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            b
        } else {
            cfg.interval
        };
        let _ = tokio::time::timeout(pause, stop.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit_with_closes(n: usize) -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE ssh_log (seq INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
                 tenant TEXT NOT NULL, session_id TEXT NOT NULL, channel_seq INTEGER, body TEXT NOT NULL)",
        )
        .unwrap();
        for i in 0..n {
            use crate::audit::ssh_records::{ChannelClose, RecordingInfo};
            let body = serde_json::to_string(&SshEvent::ChannelClose(ChannelClose {
                duration_ms: 1,
                exit_status: Some(0),
                exit_signal: None,
                core_dumped: false,
                error: None,
                bytes_in: 1,
                bytes_out: 2,
                recording: Some(RecordingInfo {
                    path: format!("recordings/acme/s{i}/1.cap"),
                    format: crate::audit::ssh_records::RecordingFormat::SshLogCli,
                    pty: true,
                    sha256: Some("ab".into()),
                    size: 2,
                    complete: true,
                    error: None,
                }),
            }))
            .unwrap();
            c.execute(
                "INSERT INTO ssh_log VALUES (?1, 0, 'channel.close', 'acme', ?2, 1, ?3)",
                params![2 * i as i64 + 1, format!("s{i}"), body],
            )
            .unwrap();
            c.execute(
                "INSERT INTO ssh_log VALUES (?1, 0, 'command', 'acme', ?2, 1, '{}')",
                params![2 * i as i64 + 2, format!("s{i}")],
            )
            .unwrap();
        }
        c
    }

    #[test]
    fn each_recording_is_queued_once_across_passes_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let audit = audit_with_closes(3);
        let probe: Result<SshEvent, _> = serde_json::from_str(
            &audit
                .query_row("SELECT body FROM ssh_log WHERE seq = 1", [], |r| {
                    r.get::<_, String>(0)
                })
                .unwrap(),
        );
        assert!(
            matches!(probe, Ok(SshEvent::ChannelClose(_))),
            "the test's record is a channel.close: {probe:?}"
        );
        let path = outbox_path(dir.path());
        let mut ob = open_outbox(&path).unwrap();
        assert_eq!(
            enqueue(&audit, &mut ob, "p/").unwrap(),
            3,
            "three channel.close records read"
        );
        assert_eq!(
            enqueue(&audit, &mut ob, "p/").unwrap(),
            0,
            "the cursor moved"
        );
        drop(ob);
        let mut ob = open_outbox(&path).unwrap();
        assert_eq!(
            enqueue(&audit, &mut ob, "p/").unwrap(),
            0,
            "the cursor survives a reopen"
        );
        let all = uploads(&ob).unwrap();
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|u| u.state == "pending"));
        assert_eq!(all[0].object_key, "p/acme/1970/01/01/s0/1.cap");
    }
}
