//! SSH audit records: what the SSH inspector (`crate::ssh`) emits, and the append-only, hash-chained log it is
//! kept in (table `ssh_log` in the audit SQLite store, next to the flow tables, through a connection of its own).
//!
//! - [`SshAuditSink`] is the inspector's handle: [`SshAuditSink::emit`] never blocks (a full queue drops and counts);
//!   [`SshAuditSink::emit_durable`] waits until the record is committed, for what `recording = "required"` must
//!   not lose (session start, exec commands).
//! - One writer thread numbers the records, chains them (`hash = sha256(prev_hash ‖ canonical row)`), commits
//!   in batches and signs a checkpoint (Ed25519 SSHSIG over `seq ‖ hash`) every [`CHECKPOINT_EVERY`] records,
//!   [`CHECKPOINT_INTERVAL`] after the last record and at shutdown, with the gateway's audit signing key
//!   (`state_dir/audit_signing_key`).
//! - Sensitive fields (command text, typed lines, env values) are [`Secret`]s: sealed to the tenant's reviewer
//!   key, in the same container as recordings, when the tenant has `audit_recipient`.
//!
//! Review and verification (`rampart audit ssh …`, `rampart audit verify`) live in `ssh_review`.
//! Never: rewrite or delete a row, or log a `Secret`'s plaintext through `tracing`.
#![deny(unsafe_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rusqlite::{params, Connection, OptionalExtension as _};
use russh::keys::ssh_key::{HashAlg, LineEnding, PrivateKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot;

use super::capture::{self, CaptureWriter, RecipientKey, ReviewerKey, Source};

/// A checkpoint is signed after this many records (and at writer shutdown).
pub const CHECKPOINT_EVERY: u64 = 256;
/// ... and after this long without new records, when some are not signed yet.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// SSHSIG namespace of checkpoint signatures.
pub const CHECKPOINT_NAMESPACE: &str = "rampart-audit-checkpoint@v1";
/// Domain separation of the chain hash.
const CHAIN_DOMAIN: &[u8] = b"rampart-ssh-audit-v1";
/// Records queued towards the writer before `emit` starts dropping.
const QUEUE: usize = 8192;
/// Longest a record waits in the writer before its batch commits.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

const SCHEMA: &str = "
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

/// A sensitive text: plaintext, or sealed to the tenant's reviewer key (an `ssh-log-cli` container holding one
/// client record, base64). Only the reviewer's private key opens a sealed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Secret {
    Plain(String),
    Sealed { sealed: String },
}

impl Secret {
    /// Seals `text` when the tenant has a reviewer key. A sealing failure (OS RNG) yields a redaction rather
    /// than the plaintext.
    pub fn new(text: &str, recipient: Option<&RecipientKey>) -> Secret {
        let Some(recipient) = recipient else {
            return Secret::Plain(text.to_owned());
        };
        match seal(text.as_bytes(), recipient) {
            Ok(bytes) => Secret::Sealed {
                sealed: B64.encode(bytes),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot seal a sensitive audit field; it is redacted");
                Secret::Plain("<redacted: sealing failed>".into())
            }
        }
    }

    pub fn is_sealed(&self) -> bool {
        matches!(self, Secret::Sealed { .. })
    }

    /// The text, opening a sealed one with `key`. `None`: sealed and no (or the wrong) key.
    pub fn open(&self, key: Option<&ReviewerKey>) -> Option<String> {
        match self {
            Secret::Plain(s) => Some(s.clone()),
            Secret::Sealed { sealed } => {
                let bytes = B64.decode(sealed).ok()?;
                let decoded = capture::decode(Cursor::new(bytes), key?).ok()?;
                Some(String::from_utf8_lossy(&decoded.data_from(Source::Client)).into_owned())
            }
        }
    }

    /// For display: the text, or a placeholder saying a key is needed.
    pub fn show(&self, key: Option<&ReviewerKey>) -> String {
        self.open(key)
            .unwrap_or_else(|| "<sealed: pass --key with the tenant's reviewer key>".into())
    }
}

fn seal(data: &[u8], recipient: &RecipientKey) -> Result<Vec<u8>, capture::CaptureError> {
    let mut w = CaptureWriter::new(Cursor::new(Vec::new()), recipient, unix_now(), None)?;
    w.record(Source::Client, capture::CODE_DATA, 0, data)?;
    let mut out = Vec::new();
    w.finish(None, &mut out)?;
    Ok(out)
}

/// The keys every record of a session carries (columns of `ssh_log`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKeys {
    pub tenant: String,
    pub session_id: String,
    pub device: String,
    pub user: String,
    /// `ip:port` of the target.
    pub target: String,
    /// Requested login (the certificate principal); empty before authentication.
    pub login: String,
    /// Serial of the gateway's user certificate towards the target.
    pub cert_serial: Option<u64>,
    pub rule: String,
}

/// One audit record as the inspector emits it.
#[derive(Debug, Clone)]
pub struct SshRecord {
    pub at_ms: i64,
    pub keys: SessionKeys,
    /// Per-session channel number (never the raw SSH channel id).
    pub channel_seq: Option<u32>,
    pub event: SshEvent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SshEvent {
    SessionStart(SessionStart),
    SessionEnd(SessionEnd),
    ChannelOpen(ChannelOpen),
    ChannelClose(ChannelClose),
    Command(Command),
    /// A target's host key was pinned on first use, or no longer matches its pin (the session was refused).
    HostKey(HostKeyEvent),
}

impl SshEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            SshEvent::SessionStart(_) => "session.start",
            SshEvent::SessionEnd(_) => "session.end",
            SshEvent::ChannelOpen(_) => "channel.open",
            SshEvent::ChannelClose(_) => "channel.close",
            SshEvent::Command(_) => "command",
            SshEvent::HostKey(_) => "host_key",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStart {
    /// Device-side address of the flow (the WireGuard identity is device + user).
    pub client_addr: String,
    pub client_version: String,
    pub auth_method: String,
    pub client_key_fp: Option<String>,
    pub target_host_key_fp: Option<String>,
    /// `pinned` | `tofu` | `ca`.
    pub target_host_key_trust: Option<String>,
    pub cert: Option<CertInfo>,
    pub recording: String,
    pub capture_input: bool,
    pub allow_forwarding: bool,
    /// `allowed`, or why the session was refused.
    pub decision: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub serial: u64,
    pub key_id: String,
    pub principals: Vec<String>,
    pub valid_after: u64,
    pub valid_before: u64,
    pub ca_fp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEnd {
    pub started_ms: i64,
    pub duration_ms: i64,
    /// `client_closed` | `login_timeout` | `upstream_failed` | `policy` | `error`.
    pub reason: String,
    pub error: Option<String>,
    pub bytes_client_to_target: u64,
    pub bytes_target_to_client: u64,
    pub channels: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelOpen {
    /// `session` | `direct-tcpip`.
    pub kind: String,
    /// `shell` | `exec` | `subsystem` | `direct-tcpip`.
    pub program: String,
    pub subsystem: Option<String>,
    pub pty: Option<PtyRequest>,
    pub env: Vec<EnvVar>,
    pub command: Option<CommandText>,
    pub tcpip: Option<Tcpip>,
    /// `allowed` | `denied`.
    pub decision: String,
    pub deny_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    pub value: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcpip {
    pub host: String,
    pub port: u32,
    pub orig_addr: String,
    pub orig_port: u32,
}

/// A command as sent (exec) or reconstructed (typed line): text capped at [`COMMAND_TEXT_CAP`] bytes (lossy
/// UTF-8) plus the exact length and sha256 of the original bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandText {
    pub text: Secret,
    pub len: usize,
    pub sha256: String,
    pub truncated: bool,
}

/// Inline command text limit.
pub const COMMAND_TEXT_CAP: usize = 8 * 1024;

impl CommandText {
    pub fn new(bytes: &[u8], recipient: Option<&RecipientKey>) -> CommandText {
        let truncated = bytes.len() > COMMAND_TEXT_CAP;
        let shown = &bytes[..bytes.len().min(COMMAND_TEXT_CAP)];
        CommandText {
            text: Secret::new(&String::from_utf8_lossy(shown), recipient),
            len: bytes.len(),
            sha256: sha256_hex(bytes),
            truncated,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelClose {
    pub duration_ms: i64,
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub core_dumped: bool,
    pub error: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub recording: Option<RecordingInfo>,
}

/// A finished (or abandoned) per-channel recording. `sha256` is of the file as stored, so the chain detects any
/// change to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingInfo {
    /// Relative to `state_dir`.
    pub path: String,
    /// `ssh-log-cli` (sealed container) | `rampart-rec-v1` (plaintext).
    pub format: String,
    pub pty: bool,
    pub sha256: Option<String>,
    pub size: u64,
    pub complete: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub seq: u32,
    /// `exec` | `input_line` | `sftp_op`.
    pub source: String,
    /// `exact` | `heuristic`.
    pub confidence: String,
    pub command: CommandText,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyEvent {
    /// `pinned` (first use) | `changed` (mismatch; refused).
    pub change: String,
    pub fingerprint: String,
    pub pinned_fingerprint: Option<String>,
}

// ------------------------------------------------------------------------------------------------ sink ----------

struct SinkShared {
    healthy: AtomicBool,
    dropped: AtomicU64,
}

struct Queued {
    record: SshRecord,
    ack: Option<oneshot::Sender<Result<u64, String>>>,
}

enum Msg {
    Record(Box<Queued>),
    /// Commit what is queued, sign a checkpoint, stop (sinks may still be alive).
    Stop,
}

/// The inspector's handle on the SSH audit log. Cloning is cheap.
#[derive(Clone)]
pub struct SshAuditSink {
    tx: SyncSender<Msg>,
    shared: Arc<SinkShared>,
}

/// Why a durable record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditUnavailable {
    #[error("the audit queue is full")]
    QueueFull,
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the audit store failed: {0}")]
    Store(String),
}

impl SshAuditSink {
    /// Queues a record; never blocks. When the queue is full the record is dropped and counted.
    pub fn emit(&self, record: SshRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self
            .tx
            .try_send(Msg::Record(Box::new(Queued { record, ack: None })))
        {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a record and waits until it is committed; returns its sequence number.
    pub async fn emit_durable(&self, record: SshRecord) -> Result<u64, AuditUnavailable> {
        let (ack, done) = oneshot::channel();
        match self.tx.try_send(Msg::Record(Box::new(Queued {
            record,
            ack: Some(ack),
        }))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(AuditUnavailable::QueueFull),
            Err(TrySendError::Disconnected(_)) => return Err(AuditUnavailable::Stopped),
        }
        match done.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(AuditUnavailable::Store(e)),
            Err(_) => Err(AuditUnavailable::Stopped),
        }
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread; [`SshAuditWriter::finish`] (after every sink is dropped) commits what is queued and signs
/// a final checkpoint.
pub struct SshAuditWriter {
    thread: JoinHandle<()>,
    tx: SyncSender<Msg>,
}

impl SshAuditWriter {
    /// Commits what is queued, signs a final checkpoint and stops the writer (later `emit`s are dropped).
    pub fn finish(self) {
        let _ = self.tx.send(Msg::Stop);
        let _ = self.thread.join();
    }
}

/// Opens the SSH tables in `db` (creating them), loads or creates the signing key at `signing_key`, and starts
/// the writer.
pub fn start(db: &Path, signing_key: &Path) -> anyhow::Result<(SshAuditSink, SshAuditWriter)> {
    let mut log = SshLog::open(db)
        .map_err(|e| anyhow::anyhow!("cannot open the SSH audit log in {}: {e}", db.display()))?;
    let key = load_or_create_signing_key(signing_key)?;
    let (tx, rx) = mpsc::sync_channel::<Msg>(QUEUE);
    let shared = Arc::new(SinkShared {
        healthy: AtomicBool::new(true),
        dropped: AtomicU64::new(0),
    });
    let sink = SshAuditSink {
        tx: tx.clone(),
        shared: shared.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("rampart-ssh-audit".into())
        .spawn(move || writer(&mut log, &key, rx, &shared))?;
    Ok((sink, SshAuditWriter { thread, tx }))
}

/// The gateway's audit signing key (Ed25519, OpenSSH format, mode 0600), with its `.pub` next to it.
pub fn load_or_create_signing_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return PrivateKey::from_openssh(text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not an OpenSSH private key ({e}); move it away to create a new signing key",
                path.display()
            )
        });
    }
    let key = crate::ssh::trust::new_ed25519("rampart audit signing key")?;
    crate::ssh::trust::write_private_key(path, &key)?;
    Ok(key)
}

fn writer(log: &mut SshLog, key: &PrivateKey, rx: mpsc::Receiver<Msg>, shared: &SinkShared) {
    let mut open = true;
    let mut since_checkpoint = 0u64;
    let mut last_error_log: Option<Instant> = None;
    while open {
        let mut batch: Vec<Queued> = Vec::new();
        match rx.recv_timeout(CHECKPOINT_INTERVAL) {
            Ok(Msg::Record(q)) => batch.push(*q),
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => open = false,
            Err(RecvTimeoutError::Timeout) => {
                // Quiet for a while: sign what came since the last checkpoint.
                if since_checkpoint > 0 {
                    match log.checkpoint(key) {
                        Ok(_) => since_checkpoint = 0,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot sign an SSH audit checkpoint")
                        }
                    }
                }
                continue;
            }
        }
        let deadline = Instant::now() + COMMIT_INTERVAL;
        let mut urgent = batch.iter().any(|q| q.ack.is_some());
        while open && batch.len() < 1024 {
            let msg = if urgent {
                // Take what is already queued, without waiting.
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            match msg {
                Msg::Record(q) => {
                    urgent |= q.ack.is_some();
                    batch.push(*q);
                }
                Msg::Stop => open = false,
            }
        }
        if !open {
            // Stopping: whatever is still queued goes into this last batch.
            while let Ok(Msg::Record(q)) = rx.try_recv() {
                batch.push(*q);
            }
        }
        if batch.is_empty() {
            continue;
        }
        let records: Vec<&SshRecord> = batch.iter().map(|q| &q.record).collect();
        match log.append(&records) {
            Ok(seqs) => {
                shared.healthy.store(true, Ordering::Relaxed);
                since_checkpoint += seqs.len() as u64;
                for (q, seq) in batch.into_iter().zip(seqs) {
                    if let Some(ack) = q.ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
                if since_checkpoint >= CHECKPOINT_EVERY {
                    match log.checkpoint(key) {
                        Ok(_) => since_checkpoint = 0,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot sign an SSH audit checkpoint")
                        }
                    }
                }
            }
            Err(e) => {
                shared.healthy.store(false, Ordering::Relaxed);
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_error_log = Some(Instant::now());
                    tracing::error!(error = %e, lost = batch.len(), "SSH audit log write failed");
                }
                shared
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                for q in batch {
                    if let Some(ack) = q.ack {
                        let _ = ack.send(Err(e.to_string()));
                    }
                }
            }
        }
    }
    if since_checkpoint > 0 {
        if let Err(e) = log.checkpoint(key) {
            tracing::error!(error = %e, "cannot sign the final SSH audit checkpoint");
        }
    }
}

// ------------------------------------------------------------------------------------------------ store ---------

/// The `ssh_log` tables through their own connection (WAL, `synchronous = FULL`).
pub struct SshLog {
    conn: Connection,
}

/// A row of `ssh_log` as review reads it.
#[derive(Debug, Clone, Serialize)]
pub struct LogRow {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub keys: SessionKeys,
    pub channel_seq: Option<u32>,
    pub body: String,
    #[serde(skip)]
    pub prev_hash: Vec<u8>,
    #[serde(skip)]
    pub hash: Vec<u8>,
}

impl LogRow {
    pub fn event(&self) -> Option<SshEvent> {
        serde_json::from_str(&self.body).ok()
    }
}

/// A signed checkpoint row.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: Vec<u8>,
    pub at_ms: i64,
    pub key_fingerprint: String,
    pub signature: String,
}

impl SshLog {
    pub fn open(path: &Path) -> rusqlite::Result<SshLog> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(SshLog { conn })
    }

    /// For review: fails if the store or its SSH tables do not exist.
    pub fn open_readonly(path: &Path) -> rusqlite::Result<SshLog> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.query_row("SELECT count(*) FROM ssh_log", [], |_| Ok(()))?;
        Ok(SshLog { conn })
    }

    /// Appends records in one transaction, continuing the chain from the last row. Returns their seqs.
    pub fn append(&mut self, records: &[&SshRecord]) -> rusqlite::Result<Vec<u64>> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT seq, hash FROM ssh_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (mut seq, mut prev) = match last {
            Some((s, h)) => (s as u64, h),
            None => (0, vec![0u8; 32]),
        };
        let mut seqs = Vec::with_capacity(records.len());
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO ssh_log (seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login,
                                      cert_serial, rule, body, prev_hash, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            for r in records {
                seq += 1;
                let body = serde_json::to_string(&r.event).unwrap_or_default();
                let row = LogRow {
                    seq,
                    at_ms: r.at_ms,
                    kind: r.event.kind().to_owned(),
                    keys: r.keys.clone(),
                    channel_seq: r.channel_seq,
                    body,
                    prev_hash: prev.clone(),
                    hash: Vec::new(),
                };
                let hash = chain_hash(&prev, &row);
                let k = &r.keys;
                ins.execute(params![
                    seq as i64,
                    r.at_ms,
                    row.kind,
                    k.tenant,
                    k.session_id,
                    r.channel_seq,
                    k.device,
                    k.user,
                    k.target,
                    k.login,
                    k.cert_serial.map(|s| s.to_string()),
                    k.rule,
                    row.body,
                    prev,
                    hash.to_vec(),
                ])?;
                prev = hash.to_vec();
                seqs.push(seq);
            }
        }
        tx.commit()?;
        Ok(seqs)
    }

    /// Signs the current head of the chain (nothing if the chain is empty or already checkpointed there).
    pub fn checkpoint(&mut self, key: &PrivateKey) -> anyhow::Result<Option<u64>> {
        let head: Option<(i64, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT seq, hash FROM ssh_log ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((seq, hash)) = head else {
            return Ok(None);
        };
        let sig = key
            .sign(
                CHECKPOINT_NAMESPACE,
                HashAlg::Sha512,
                &checkpoint_message(seq as u64, &hash),
            )
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        let pem = sig
            .to_pem(LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("encoding the signature: {e}"))?;
        self.conn.execute(
            "INSERT OR IGNORE INTO ssh_checkpoints (seq, hash, at_ms, key_fingerprint, signature)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                seq,
                hash,
                crate::ssh::unix_ms(),
                key.public_key().fingerprint(HashAlg::Sha256).to_string(),
                pem
            ],
        )?;
        Ok(Some(seq as u64))
    }

    /// Rows with `seq > after`, in order, at most `limit`.
    pub fn rows_after(&self, after: u64, limit: usize) -> rusqlite::Result<Vec<LogRow>> {
        self.query(
            "SELECT seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login, cert_serial,
                    rule, body, prev_hash, hash
             FROM ssh_log WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after as i64, limit as i64],
        )
    }

    /// Every row of one session, in order.
    pub fn session_rows(&self, session_id: &str) -> rusqlite::Result<Vec<LogRow>> {
        self.query(
            "SELECT seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login, cert_serial,
                    rule, body, prev_hash, hash
             FROM ssh_log WHERE session_id = ?1 ORDER BY seq",
            params![session_id],
        )
    }

    /// Rows of one kind since `since_ms`, newest first.
    pub fn rows_of_kind(&self, kind: &str, since_ms: i64) -> rusqlite::Result<Vec<LogRow>> {
        self.query(
            "SELECT seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login, cert_serial,
                    rule, body, prev_hash, hash
             FROM ssh_log WHERE kind = ?1 AND at_ms >= ?2 ORDER BY seq DESC",
            params![kind, since_ms],
        )
    }

    pub fn checkpoints(&self) -> rusqlite::Result<Vec<Checkpoint>> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, hash, at_ms, key_fingerprint, signature FROM ssh_checkpoints ORDER BY seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Checkpoint {
                seq: r.get::<_, i64>(0)? as u64,
                hash: r.get(1)?,
                at_ms: r.get(2)?,
                key_fingerprint: r.get(3)?,
                signature: r.get(4)?,
            })
        })?;
        rows.collect()
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

/// `sha256(domain ‖ prev_hash ‖ canonical JSON of the row's columns)`.
pub fn chain_hash(prev: &[u8], row: &LogRow) -> [u8; 32] {
    let k = &row.keys;
    let canonical = serde_json::json!([
        row.seq,
        row.at_ms,
        row.kind,
        k.tenant,
        k.session_id,
        row.channel_seq,
        k.device,
        k.user,
        k.target,
        k.login,
        k.cert_serial.map(|s| s.to_string()),
        k.rule,
        row.body,
    ]);
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(prev);
    h.update(canonical.to_string().as_bytes());
    h.finalize().into()
}

pub fn checkpoint_message(seq: u64, hash: &[u8]) -> Vec<u8> {
    let mut m = b"rampart-ssh-audit-checkpoint-v1\n".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 (hex) and size of a file, streamed.
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex(&h.finalize()), size))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where the SSH audit pieces live under a gateway's `state_dir`.
#[derive(Debug, Clone)]
pub struct SshAuditPaths {
    pub db: PathBuf,
    pub signing_key: PathBuf,
    pub recordings: PathBuf,
}

impl SshAuditPaths {
    pub fn new(state_dir: &Path, db: &Path) -> SshAuditPaths {
        SshAuditPaths {
            db: db.to_path_buf(),
            signing_key: state_dir.join("audit_signing_key"),
            recordings: state_dir.join("recordings"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u32) -> SshRecord {
        SshRecord {
            at_ms: 1_700_000_000_000 + i64::from(i),
            keys: SessionKeys {
                tenant: "acme".into(),
                session_id: "s1".into(),
                device: "laptop".into(),
                user: "alice".into(),
                target: "10.0.0.5:22".into(),
                login: "root".into(),
                cert_serial: Some(42),
                rule: "ssh".into(),
            },
            channel_seq: Some(i),
            event: SshEvent::Command(Command {
                seq: i,
                source: "exec".into(),
                confidence: "exact".into(),
                command: CommandText::new(format!("echo {i}").as_bytes(), None),
            }),
        }
    }

    #[test]
    fn chain_continues_across_appends_and_detects_edits() {
        let dir = tempdir();
        let mut log = SshLog::open(&dir.join("audit.db")).unwrap();
        let a = rec(1);
        let b = rec(2);
        assert_eq!(log.append(&[&a]).unwrap(), vec![1]);
        assert_eq!(log.append(&[&b, &a]).unwrap(), vec![2, 3]);
        let rows = log.rows_after(0, 100).unwrap();
        let mut prev = vec![0u8; 32];
        for r in &rows {
            assert_eq!(r.prev_hash, prev);
            assert_eq!(chain_hash(&prev, r).to_vec(), r.hash);
            prev = r.hash.clone();
        }
        let mut edited = rows[1].clone();
        edited.body = edited.body.replace("echo 2", "echo 3");
        assert_ne!(chain_hash(&rows[0].hash, &edited).to_vec(), rows[1].hash);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sealed_secret_opens_only_with_the_key() {
        let (private, public) = capture::generate_key_pair().unwrap();
        let rk = RecipientKey::from_base64(&public).unwrap();
        let sk = ReviewerKey::from_base64(&private).unwrap();
        let s = Secret::new("rm -rf /tmp/x", Some(&rk));
        assert!(s.is_sealed());
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("rm -rf"), "{json}");
        assert_eq!(s.open(None), None);
        assert_eq!(s.open(Some(&sk)).as_deref(), Some("rm -rf /tmp/x"));
        let back: Secret = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let plain: Secret = serde_json::from_str("\"ls\"").unwrap();
        assert_eq!(plain.open(None).as_deref(), Some("ls"));
    }

    #[test]
    fn command_text_caps_and_hashes() {
        let big = vec![b'a'; COMMAND_TEXT_CAP + 10];
        let c = CommandText::new(&big, None);
        assert!(c.truncated);
        assert_eq!(c.len, COMMAND_TEXT_CAP + 10);
        assert_eq!(c.text.open(None).unwrap().len(), COMMAND_TEXT_CAP);
        assert_eq!(c.sha256, sha256_hex(&big));
    }

    #[test]
    fn writer_commits_durably_and_checkpoints_at_finish() {
        let dir = tempdir();
        let db = dir.join("audit.db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sink, writer) = start(&db, &dir.join("signing_key")).unwrap();
        let seq = rt.block_on(sink.emit_durable(rec(1))).unwrap();
        assert_eq!(seq, 1);
        sink.emit(rec(2));
        // finish() stops the writer even while sinks are alive.
        writer.finish();
        drop(sink);
        let log = SshLog::open_readonly(&db).unwrap();
        assert_eq!(log.rows_after(0, 10).unwrap().len(), 2);
        let cps = log.checkpoints().unwrap();
        assert_eq!(cps.last().unwrap().seq, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    pub(crate) fn tempdir() -> PathBuf {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).unwrap();
        let d = std::env::temp_dir().join(format!("rampart-ssh-audit-{}", hex(&b)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
