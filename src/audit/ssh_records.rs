//! SSH audit records: what the SSH inspector (`crate::ssh`) emits. They go through the audit pipeline
//! ([`SshAuditSink`]) into table `ssh_log`, where the writer chains them (`hash = sha256(prev_hash ‖ canonical
//! row)`) and signs checkpoints with the gateway's audit signing key (`state_dir/audit_signing_key`).
//!
//! - [`SshAuditSink::emit`] never blocks (a full queue drops and counts); [`SshAuditSink::emit_durable`] waits
//!   until the record is committed, for what `recording = "required"` must not lose.
//! - Sensitive fields (command text, typed lines, env values) are [`Secret`]s: sealed to the tenant's reviewer
//!   key, in the same container as recordings, when the tenant has `audit_recipient`.
//!
//! Review and verification are in `audit::review`. Never: log a `Secret`'s plaintext through `tracing`.
#![deny(unsafe_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use russh::keys::ssh_key::PrivateKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::capture::{self, CaptureWriter, RecipientKey, ReviewerKey, Source};
pub use super::review::ssh::SshLog;
pub use super::tables::chain::{checkpoint_message, Checkpoint, CHECKPOINT_NAMESPACE};
pub use super::tables::ssh::LogRow;
pub use super::AuditUnavailable;
use super::{AuditSink, AuditWriter, LossReason, PipelineOptions, Record, RecordKind};

/// A checkpoint is signed after this many records by default (and at writer shutdown).
pub const CHECKPOINT_EVERY: u64 = 256;

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
    let mut w = CaptureWriter::new(
        Cursor::new(Vec::new()),
        recipient,
        crate::clock::unix_secs(),
        None,
    )?;
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
    pub target_host_key_trust: Option<HostKeyTrust>,
    pub cert: Option<CertInfo>,
    pub recording: crate::config::Recording,
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

/// Why an SSH session ended; stored as its snake_case name (the spelling of the free text it replaced).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SessionEndReason {
    ClientClosed,
    LoginTimeout,
    UpstreamFailed,
    /// Refused by the rule (logins, keys, required recording unavailable).
    Policy,
    /// By an administrator in the review UI.
    Terminated,
    Error,
    /// The gateway stopped (SIGTERM).
    Shutdown,
}

impl PartialEq<&str> for SessionEndReason {
    fn eq(&self, other: &&str) -> bool {
        self.as_ref() == *other
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionEnd {
    pub started_ms: i64,
    pub duration_ms: i64,
    pub reason: SessionEndReason,
    pub error: Option<String>,
    pub bytes_client_to_target: u64,
    pub bytes_target_to_client: u64,
    pub channels: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelOpen {
    pub kind: ChannelKind,
    /// `shell` | `exec` | `subsystem` | `direct-tcpip`.
    pub program: String,
    pub subsystem: Option<String>,
    pub pty: Option<PtyRequest>,
    pub env: Vec<EnvVar>,
    pub command: Option<CommandText>,
    pub tcpip: Option<Tcpip>,
    pub decision: ChannelDecision,
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
    /// The flow rule that decided the forwarded destination (as a new flow of the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
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
    pub format: RecordingFormat,
    pub pty: bool,
    pub sha256: Option<String>,
    pub size: u64,
    pub complete: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub seq: u32,
    pub source: CommandSource,
    pub confidence: Confidence,
    pub command: CommandText,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyEvent {
    pub change: HostKeyChange,
    pub fingerprint: String,
    pub pinned_fingerprint: Option<String>,
}

/// What kind of channel a client opened (the SSH channel type, RFC 4254).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
pub enum ChannelKind {
    #[serde(rename = "session")]
    #[strum(serialize = "session")]
    Session,
    #[serde(rename = "direct-tcpip")]
    #[strum(serialize = "direct-tcpip")]
    DirectTcpip,
}

/// Whether a channel (or the program it asked for) was allowed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ChannelDecision {
    Allowed,
    Denied,
}

/// Where a command record's text came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum CommandSource {
    /// The `exec` request's command line.
    Exec,
    /// A line typed into a shell, reconstructed from the input stream.
    InputLine,
    /// An SFTP request.
    SftpOp,
}

/// How sure the record is that the command ran as shown.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Confidence {
    Exact,
    Heuristic,
}

/// How a recording file is stored.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
pub enum RecordingFormat {
    /// Sealed to the tenant's reviewer key (an `ssh-log-cli` container).
    #[serde(rename = "ssh-log-cli")]
    #[strum(serialize = "ssh-log-cli")]
    SshLogCli,
    /// Plaintext.
    #[serde(rename = "rampart-rec-v1")]
    #[strum(serialize = "rampart-rec-v1")]
    RampartRecV1,
}

/// How a target's host key was accepted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum HostKeyTrust {
    /// Matches the key pinned earlier.
    Pinned,
    /// First contact: pinned now.
    Tofu,
    /// A certificate from the tenant's trusted target host CA.
    Ca,
}

/// What happened to a target's pinned host key.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::AsRefStr, strum::Display,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum HostKeyChange {
    /// First use: the key is pinned now.
    Pinned,
    /// The key no longer matches its pin; the session was refused.
    Changed,
}

/// The SSH inspector's handle on the audit pipeline. Cloning is cheap.
#[derive(Clone)]
pub struct SshAuditSink {
    sink: AuditSink,
}

impl SshAuditSink {
    pub(super) fn new(sink: AuditSink) -> SshAuditSink {
        SshAuditSink { sink }
    }

    /// Queues a record; never blocks. When the queue is full the record is dropped and counted.
    pub fn emit(&self, record: SshRecord) {
        self.sink.emit(Record::Ssh(Box::new(record)));
    }

    /// Queues a record and waits until it is committed; returns its sequence number.
    pub async fn emit_durable(&self, record: SshRecord) -> Result<u64, AuditUnavailable> {
        self.sink.emit_durable(Record::Ssh(Box::new(record))).await
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.sink.healthy()
    }

    /// SSH records lost so far.
    pub fn dropped(&self) -> u64 {
        let c = self.sink.counters();
        LossReason::ALL
            .iter()
            .map(|r| c.lost_total(RecordKind::Ssh, *r))
            .sum()
    }
}

/// The SSH writer is the audit pipeline's writer.
pub type SshAuditWriter = AuditWriter;

/// Starts an audit pipeline on the store `db` with the signing key at `signing_key` and default settings,
/// for an SSH inspector used on its own (tests, tools); `rampart run` starts one pipeline for everything.
pub fn start(db: &Path, signing_key: &Path) -> anyhow::Result<(SshAuditSink, SshAuditWriter)> {
    let (sink, writer) = super::start(PipelineOptions::new(
        db.to_path_buf(),
        signing_key.to_path_buf(),
    ))?;
    Ok((sink.ssh(), writer))
}

/// The gateway's audit signing key (Ed25519, OpenSSH format, mode 0600), with its `.pub` next to it; created
/// only when there is none. A key that exists but cannot be read is an error, never silently replaced (that
/// would make every earlier checkpoint unverifiable with the pinned key).
pub fn load_or_create_signing_key(path: &Path) -> anyhow::Result<PrivateKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text).map_err(|e| {
            anyhow::anyhow!(
                "the audit signing key {} is not an OpenSSH private key ({e}); restore it from a backup (reviewers \
                 verify checkpoints against its public key)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::keys::openssh::new_ed25519("rampart audit signing key")?;
            crate::keys::openssh::write_private_key(path, &key)?;
            tracing::info!(path = %path.display(), "created the audit signing key; copy its .pub off the gateway to verify the audit trail with --pubkey");
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot read the audit signing key {}: {e}; fix its permissions or restore it (it is never replaced \
             while it exists)",
            path.display()
        )),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
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

    /// The wire spelling of each value (what the hash chain covers and older stores hold) and its `Display`.
    fn pins<T>(cases: &[(T, &str)])
    where
        T: Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Display
            + PartialEq
            + std::fmt::Debug,
    {
        for (v, wire) in cases {
            assert_eq!(serde_json::to_value(v).unwrap(), serde_json::json!(wire));
            assert_eq!(v.to_string(), *wire);
            assert_eq!(
                &serde_json::from_value::<T>(serde_json::json!(wire)).unwrap(),
                v
            );
        }
    }

    #[test]
    fn channel_kind_wire_strings() {
        pins(&[
            (ChannelKind::Session, "session"),
            (ChannelKind::DirectTcpip, "direct-tcpip"),
        ]);
    }

    #[test]
    fn channel_decision_wire_strings() {
        pins(&[
            (ChannelDecision::Allowed, "allowed"),
            (ChannelDecision::Denied, "denied"),
        ]);
    }

    #[test]
    fn command_source_wire_strings() {
        pins(&[
            (CommandSource::Exec, "exec"),
            (CommandSource::InputLine, "input_line"),
            (CommandSource::SftpOp, "sftp_op"),
        ]);
    }

    #[test]
    fn confidence_wire_strings() {
        pins(&[
            (Confidence::Exact, "exact"),
            (Confidence::Heuristic, "heuristic"),
        ]);
    }

    #[test]
    fn recording_format_wire_strings() {
        pins(&[
            (RecordingFormat::SshLogCli, "ssh-log-cli"),
            (RecordingFormat::RampartRecV1, "rampart-rec-v1"),
        ]);
    }

    #[test]
    fn host_key_trust_wire_strings() {
        pins(&[
            (HostKeyTrust::Pinned, "pinned"),
            (HostKeyTrust::Tofu, "tofu"),
            (HostKeyTrust::Ca, "ca"),
        ]);
    }

    #[test]
    fn host_key_change_wire_strings() {
        pins(&[
            (HostKeyChange::Pinned, "pinned"),
            (HostKeyChange::Changed, "changed"),
        ]);
    }

    /// A whole record body as written before the fields were enums (free strings), byte for byte.
    #[test]
    fn record_bodies_are_unchanged() {
        let open = SshEvent::ChannelOpen(ChannelOpen {
            kind: ChannelKind::DirectTcpip,
            program: "direct-tcpip".into(),
            subsystem: None,
            pty: None,
            env: vec![],
            command: None,
            tcpip: None,
            decision: ChannelDecision::Denied,
            deny_reason: Some("forwarding is off".into()),
        });
        assert_eq!(
            serde_json::to_string(&open).unwrap(),
            r#"{"event":"channel_open","kind":"direct-tcpip","program":"direct-tcpip","subsystem":null,"pty":null,"env":[],"command":null,"tcpip":null,"decision":"denied","deny_reason":"forwarding is off"}"#
        );
        let key = SshEvent::HostKey(HostKeyEvent {
            change: HostKeyChange::Changed,
            fingerprint: "SHA256:a".into(),
            pinned_fingerprint: Some("SHA256:b".into()),
        });
        assert_eq!(
            serde_json::to_string(&key).unwrap(),
            r#"{"event":"host_key","change":"changed","fingerprint":"SHA256:a","pinned_fingerprint":"SHA256:b"}"#
        );
    }

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
                source: CommandSource::Exec,
                confidence: Confidence::Exact,
                command: CommandText::new(format!("echo {i}").as_bytes(), None),
            }),
        }
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
    fn recording_is_written_as_configured_and_old_records_still_read() {
        let start = |recording: &str| {
            format!(
                r#"{{"event":"session_start","client_addr":"a","client_version":"v","auth_method":"none",
                "client_key_fp":null,"target_host_key_fp":null,"target_host_key_trust":null,"cert":null,
                "recording":"{recording}","capture_input":false,"allow_forwarding":false,"decision":"allowed"}}"#
            )
        };
        for text in ["best_effort", "besteffort"] {
            let ev: SshEvent = serde_json::from_str(&start(text)).unwrap();
            let SshEvent::SessionStart(s) = &ev else {
                panic!("{ev:?}")
            };
            assert_eq!(s.recording, crate::config::Recording::BestEffort);
            let json = serde_json::to_string(&ev).unwrap();
            assert!(json.contains(r#""recording":"best_effort""#), "{json}");
        }
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
        let dir_tmp = tempdir();
        let dir = dir_tmp.path().to_path_buf();
        let db = dir.join("audit.db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (sink, writer) = start(&db, &dir.join("signing_key")).unwrap();
        let seq = rt.block_on(sink.emit_durable(rec(1))).unwrap();
        // After the chain's first entry and the run's start.
        assert_eq!(seq, 3);
        sink.emit(rec(2));
        // finish() stops the writer even while sinks are alive.
        writer.finish();
        drop(sink);
        let log = SshLog::open_readonly(&db).unwrap();
        assert_eq!(log.rows_after(0, 10).unwrap().len(), 2);
        let cps = log.checkpoints().unwrap();
        // ... and the run's end.
        assert_eq!(cps.last().unwrap().seq, 5);
    }

    /// A temp dir, removed when the guard drops (also after a failure).
    pub(crate) fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }
}
