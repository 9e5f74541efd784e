//! The hash chain every record joins (table `chain`) and its signed checkpoints (table `checkpoints`).
//!
//! Entry `n`: `hash = sha256(domain ‖ prev_hash ‖ n ‖ kind ‖ at_ms ‖ digest)`, where `digest` is the sha256 of
//! the canonical JSON of the record's row as stored (each table module builds it, from the row read back, so
//! writer and verifier hash the very same thing). A checkpoint is an Ed25519 SSHSIG over `n ‖ hash` by the
//! gateway's audit signing key; the latest one is also exported outside the store ([`HeadLine`]), so a
//! removed tail shows.
#![deny(unsafe_code)]

use rusqlite::{params, Connection, OptionalExtension as _};
use russh::keys::ssh_key::{HashAlg, LineEnding, PrivateKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// SSHSIG namespace of checkpoint signatures.
pub const CHECKPOINT_NAMESPACE: &str = "rampart-audit-checkpoint@v1";
const CHAIN_DOMAIN: &[u8] = b"rampart-audit-chain-v2";
/// What marks an exported head in a file or in syslog.
pub const HEAD_MARKER: &str = "rampart-audit-head ";

/// The chain's last entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Vec<u8>,
}

impl Head {
    pub fn empty() -> Head {
        Head {
            seq: 0,
            hash: vec![0u8; 32],
        }
    }
}

/// An entry of `chain`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub at_ms: i64,
    pub kind: String,
    pub digest: Vec<u8>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// A signed checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
    pub at_ms: i64,
    #[serde(rename = "key")]
    pub key_fingerprint: String,
    pub signature: String,
}

/// An exported head: one line, `rampart-audit-head {json}`, in a file or a syslog message.
pub struct HeadLine;

impl HeadLine {
    pub fn format(cp: &Checkpoint) -> String {
        format!(
            "{HEAD_MARKER}{}",
            serde_json::to_string(cp).unwrap_or_default()
        )
    }

    /// The checkpoint in a line that carries one (anything before the marker, such as a syslog prefix, is
    /// ignored).
    pub fn parse(line: &str) -> Option<Checkpoint> {
        let at = line.find(HEAD_MARKER)?;
        serde_json::from_str(line[at + HEAD_MARKER.len()..].trim()).ok()
    }
}

pub fn head(conn: &Connection) -> rusqlite::Result<Head> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM chain ORDER BY seq DESC LIMIT 1",
            [],
            |r| {
                Ok(Head {
                    seq: r.get::<_, i64>(0)? as u64,
                    hash: r.get(1)?,
                })
            },
        )
        .optional()?
        .unwrap_or_else(Head::empty))
}

/// The digest of a row's canonical JSON.
pub fn digest(canonical: &serde_json::Value) -> Vec<u8> {
    digest_text(&canonical.to_string())
}

/// The digest of canonical JSON already serialised (as the fleet stores it).
pub fn digest_text(canonical: &str) -> Vec<u8> {
    Sha256::digest(canonical.as_bytes()).to_vec()
}

pub fn entry_hash(prev: &[u8], seq: u64, kind: &str, at_ms: i64, digest: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update((kind.len() as u32).to_be_bytes());
    h.update(kind.as_bytes());
    h.update(at_ms.to_be_bytes());
    h.update(digest);
    h.finalize().to_vec()
}

/// Appends entry `head.seq + 1` (its record is already in its table, numbered so) and moves the head.
pub fn push(
    conn: &Connection,
    head: &mut Head,
    kind: &str,
    at_ms: i64,
    digest: &[u8],
) -> rusqlite::Result<u64> {
    let seq = head.seq + 1;
    let hash = entry_hash(&head.hash, seq, kind, at_ms, digest);
    conn.prepare_cached(
        "INSERT INTO chain (seq, at_ms, kind, digest, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![seq as i64, at_ms, kind, digest, head.hash, hash])?;
    *head = Head { seq, hash };
    Ok(seq)
}

/// Entries with `seq > after`, in order, at most `limit`.
pub fn entries_after(conn: &Connection, after: u64, limit: usize) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, at_ms, kind, digest, prev_hash, hash FROM chain WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
        Ok(Entry {
            seq: r.get::<_, i64>(0)? as u64,
            at_ms: r.get(1)?,
            kind: r.get(2)?,
            digest: r.get(3)?,
            prev_hash: r.get(4)?,
            hash: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Signs the chain's head (nothing if the chain is empty or already signed there).
pub fn checkpoint(
    conn: &Connection,
    key: &PrivateKey,
    at_ms: i64,
) -> anyhow::Result<Option<Checkpoint>> {
    let head = head(conn)?;
    if head.seq == 0 {
        return Ok(None);
    }
    let signed: Option<i64> = conn
        .query_row(
            "SELECT seq FROM checkpoints WHERE seq = ?1",
            [head.seq as i64],
            |r| r.get(0),
        )
        .optional()?;
    if signed.is_some() {
        return Ok(None);
    }
    let sig = key
        .sign(
            CHECKPOINT_NAMESPACE,
            HashAlg::Sha512,
            &checkpoint_message(head.seq, &head.hash),
        )
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    let cp = Checkpoint {
        seq: head.seq,
        hash: head.hash,
        at_ms,
        key_fingerprint: key.public_key().fingerprint(HashAlg::Sha256).to_string(),
        signature: sig
            .to_pem(LineEnding::LF)
            .map_err(|e| anyhow::anyhow!("encoding the signature: {e}"))?,
    };
    conn.execute(
        "INSERT INTO checkpoints (seq, hash, at_ms, key_fingerprint, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            cp.seq as i64,
            cp.hash,
            cp.at_ms,
            cp.key_fingerprint,
            cp.signature
        ],
    )?;
    Ok(Some(cp))
}

pub fn checkpoints(conn: &Connection) -> rusqlite::Result<Vec<Checkpoint>> {
    let mut stmt = conn.prepare(
        "SELECT seq, hash, at_ms, key_fingerprint, signature FROM checkpoints ORDER BY seq",
    )?;
    let rows = stmt.query_map([], Checkpoint::from_row)?;
    rows.collect()
}

impl Checkpoint {
    /// The columns every checkpoint query selects: `seq, hash, at_ms, key_fingerprint, signature`.
    pub fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
        Ok(Checkpoint {
            seq: r.get::<_, i64>(0)? as u64,
            hash: r.get(1)?,
            at_ms: r.get(2)?,
            key_fingerprint: r.get(3)?,
            signature: r.get(4)?,
        })
    }
}

pub fn checkpoint_message(seq: u64, hash: &[u8]) -> Vec<u8> {
    let mut m = b"rampart-audit-checkpoint-v2\n".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m
}

mod hex_bytes {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}
