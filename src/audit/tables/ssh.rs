//! Table `ssh_log`: the SSH records, hash-chained (`hash = sha256(domain ‖ prev_hash ‖ canonical row)`), and
//! `ssh_checkpoints`: Ed25519 SSHSIG signatures over `seq ‖ hash` of the chain's head.
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use russh::keys::ssh_key::{HashAlg, LineEnding, PrivateKey};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::audit::ssh_records::{SessionKeys, SshEvent, SshRecord};

/// SSHSIG namespace of checkpoint signatures.
pub const CHECKPOINT_NAMESPACE: &str = "rampart-audit-checkpoint@v1";
/// Domain separation of the chain hash.
const CHAIN_DOMAIN: &[u8] = b"rampart-ssh-audit-v1";

/// A row of `ssh_log`.
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

/// The chain's head (`seq`, `hash`); `(0, zeros)` for an empty chain.
pub fn head(conn: &Connection) -> rusqlite::Result<(u64, Vec<u8>)> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM ssh_log ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match last {
        Some((s, h)) => (s as u64, h),
        None => (0, vec![0u8; 32]),
    })
}

/// Appends one record after `head` (updated to the new row); returns its seq.
pub fn append(
    conn: &Connection,
    head: &mut (u64, Vec<u8>),
    r: &SshRecord,
) -> rusqlite::Result<u64> {
    let seq = head.0 + 1;
    let row = LogRow {
        seq,
        at_ms: r.at_ms,
        kind: r.event.kind().to_owned(),
        keys: r.keys.clone(),
        channel_seq: r.channel_seq,
        body: serde_json::to_string(&r.event).unwrap_or_default(),
        prev_hash: head.1.clone(),
        hash: Vec::new(),
    };
    let hash = chain_hash(&head.1, &row);
    let k = &r.keys;
    conn.prepare_cached(
        "INSERT INTO ssh_log (seq, at_ms, kind, tenant, session_id, channel_seq, device, user, target, login,
                              cert_serial, rule, body, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
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
        head.1,
        hash.to_vec(),
    ])?;
    *head = (seq, hash.to_vec());
    Ok(seq)
}

/// Signs the current head of the chain (nothing if the chain is empty or already checkpointed there).
pub fn checkpoint(conn: &Connection, key: &PrivateKey, at_ms: i64) -> anyhow::Result<Option<u64>> {
    let (seq, hash) = head(conn)?;
    if seq == 0 {
        return Ok(None);
    }
    let sig = key
        .sign(
            CHECKPOINT_NAMESPACE,
            HashAlg::Sha512,
            &checkpoint_message(seq, &hash),
        )
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    let pem = sig
        .to_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding the signature: {e}"))?;
    conn.execute(
        "INSERT OR IGNORE INTO ssh_checkpoints (seq, hash, at_ms, key_fingerprint, signature)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            seq as i64,
            hash,
            at_ms,
            key.public_key().fingerprint(HashAlg::Sha256).to_string(),
            pem
        ],
    )?;
    Ok(Some(seq))
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
