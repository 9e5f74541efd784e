//! `rampart audit verify`: the chain, recordings and checkpoint signatures, up to the first break.
#![deny(unsafe_code)]

use std::path::Path;

use russh::keys::ssh_key::{HashAlg, PublicKey, SshSig};
use serde::Serialize;

use crate::audit::review::ssh::SshLog;
use crate::audit::ssh_records::{file_sha256, SshEvent};
use crate::audit::tables::ssh::{chain_hash, checkpoint_message, LogRow, CHECKPOINT_NAMESPACE};

/// The first place the log and recordings disagree with their hashes or signatures.
#[derive(Debug, Clone, Serialize)]
pub struct Break {
    pub seq: u64,
    pub what: String,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub recordings: u64,
    pub checkpoints: u64,
    pub last_checkpoint_seq: Option<u64>,
    /// Records after the last signed checkpoint (chained, but not yet signed).
    pub unsigned_tail: u64,
    pub first_break: Option<Break>,
}

/// Walks the chain from the first record: sequence numbers, `prev_hash` links and recomputed hashes; the
/// sha256 of every finished recording; then every checkpoint's hash and signature (with `signing_key`, the
/// gateway's `audit_signing_key.pub`). Stops at the first break.
pub fn verify(
    log: &SshLog,
    state_dir: &Path,
    signing_key: Option<&PublicKey>,
) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut prev = vec![0u8; 32];
    let mut expect = 1u64;
    // Only the hashes that checkpoints name are kept (the log may be long).
    let checkpoints = log.checkpoints()?;
    let wanted: std::collections::HashSet<u64> = checkpoints.iter().map(|c| c.seq).collect();
    let mut hashes = std::collections::HashMap::new();
    let fail = |report: &mut VerifyReport, seq: u64, what: String| {
        report.first_break = Some(Break { seq, what });
    };
    'walk: loop {
        let rows: Vec<LogRow> = log.rows_after(expect - 1, 10_000)?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            if r.seq != expect {
                fail(
                    &mut report,
                    expect,
                    format!("record {expect} is missing (next is {})", r.seq),
                );
                break 'walk;
            }
            if r.prev_hash != prev {
                fail(
                    &mut report,
                    r.seq,
                    format!("record {} does not link to record {}", r.seq, r.seq - 1),
                );
                break 'walk;
            }
            if chain_hash(&prev, r).to_vec() != r.hash {
                fail(
                    &mut report,
                    r.seq,
                    format!(
                        "record {} ({} of session {}) was altered: its hash does not match its content",
                        r.seq, r.kind, r.keys.session_id
                    ),
                );
                break 'walk;
            }
            if let Some(SshEvent::ChannelClose(c)) = r.event() {
                if let Some(rec) = c.recording.as_ref().filter(|x| x.sha256.is_some()) {
                    report.recordings += 1;
                    let path = state_dir.join(&rec.path);
                    match file_sha256(&path) {
                        Ok((h, _)) if Some(&h) == rec.sha256.as_ref() => {}
                        Ok((h, _)) => {
                            fail(
                                &mut report,
                                r.seq,
                                format!(
                                    "recording {} was altered: sha256 {h}, record {} says {}",
                                    rec.path,
                                    r.seq,
                                    rec.sha256.as_deref().unwrap_or("")
                                ),
                            );
                            break 'walk;
                        }
                        Err(e) => {
                            fail(
                                &mut report,
                                r.seq,
                                format!("recording {} is missing or unreadable: {e}", rec.path),
                            );
                            break 'walk;
                        }
                    }
                }
            }
            if wanted.contains(&r.seq) {
                hashes.insert(r.seq, r.hash.clone());
            }
            prev = r.hash.clone();
            report.records = r.seq;
            expect += 1;
        }
    }
    for cp in checkpoints {
        report.checkpoints += 1;
        if report.first_break.is_some() {
            break;
        }
        match hashes.get(&cp.seq) {
            Some(h) if *h == cp.hash => {}
            Some(_) => {
                fail(
                    &mut report,
                    cp.seq,
                    format!("checkpoint at record {} does not match the chain", cp.seq),
                );
                break;
            }
            None => {
                let ends = report.records;
                fail(
                    &mut report,
                    cp.seq,
                    format!(
                        "checkpoint at record {} but the log ends at {} (records were removed)",
                        cp.seq, ends
                    ),
                );
                break;
            }
        }
        let sig = match SshSig::from_pem(cp.signature.as_bytes()) {
            Ok(s) => s,
            Err(e) => {
                fail(
                    &mut report,
                    cp.seq,
                    format!("checkpoint at record {}: unreadable signature: {e}", cp.seq),
                );
                break;
            }
        };
        let key = match signing_key {
            Some(k) => k.clone(),
            None => PublicKey::new(sig.public_key().clone(), ""),
        };
        if key.fingerprint(HashAlg::Sha256).to_string() != cp.key_fingerprint
            || key
                .verify(
                    CHECKPOINT_NAMESPACE,
                    &checkpoint_message(cp.seq, &cp.hash),
                    &sig,
                )
                .is_err()
        {
            fail(
                &mut report,
                cp.seq,
                format!(
                    "checkpoint at record {}: the signature is not the gateway's audit signing key's",
                    cp.seq
                ),
            );
            break;
        }
        report.last_checkpoint_seq = Some(cp.seq);
    }
    report.unsigned_tail = report
        .records
        .saturating_sub(report.last_checkpoint_seq.unwrap_or(0));
    Ok(report)
}
