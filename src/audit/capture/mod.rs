//! Encrypted SSH session captures in the container format of Cloudflare's `ssh-log-cli`, so a reviewer can
//! decrypt what the gateway recorded with Cloudflare's own tool as well as with ours
//! (`../shared/design/ssh-interception.md` §10 is the exact spec).
//!
//! A capture is `u32be meta_len ‖ base64(metadata JSON) ‖ { u32be ct_len ‖ ct }*`. The blocks are sealed with one
//! HPKE base-mode context per file (DHKEM X25519 / HKDF-SHA256 / ChaCha20-Poly1305, empty info, empty AAD)
//! to the tenant's reviewer key; their plaintexts concatenate into a stream of records
//! `u32be len ‖ u8 source ‖ u32be code ‖ u64be elapsed_us ‖ data`.
//!
//! - [`CaptureWriter`] / [`CaptureFile`] encode on the fly. The header holds `data_size` and `exit_data`, known
//!   only at channel close, so blocks are spooled (the spool is itself a valid capture with a provisional header,
//!   readable after a crash) and `header ‖ blocks` is assembled at [`CaptureWriter::finish`].
//! - [`CaptureReader`] / [`decode_file`] decode, mirroring `ssh-log-cli decrypt` exactly, including its quirks
//!   (an empty block ends the stream, decreasing timestamps print `inf`); [`DecodedCapture::anomalies`] says
//!   when one of those quirks shaped the output. [`DecodedCapture::reader_output`] renders the files the
//!   reference tool writes; [`write_asciicast`] renders a PTY capture for `asciinema play`.
//! - [`ReviewerKey`] / [`RecipientKey`] / [`generate_key_pair`]: keys as `ssh-log-cli generate-key-pair` writes them.
//!
//! Known weaknesses of this format, which Rampart's own storage must not copy (§10.6): the metadata (start and
//! end time, exit status, signal, error, PTY size) is neither encrypted nor authenticated; there is no
//! final-block marker, so truncation at a block boundary decodes cleanly; the empty HPKE info binds nothing to
//! the session, so a capture can be passed off as another session's. The audit hash chain (which records each
//! finished capture's sha256) is what detects those edits, not this module.
//!
//! Never: panic on a malformed capture, seal an empty block, split a record across blocks, or hold a
//! reviewer's private key on the gateway (only decoding needs it).
//!
//! Start reading at [`CaptureWriter::record`] and [`CaptureReader::next_record`]; `tests.rs` runs the shared
//! conformance vectors.
#![deny(unsafe_code)]

mod header;
mod keys;
mod reader;
mod record;
mod render;
mod writer;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use header::{ExitInfo, Header, PtyInfo};
pub use keys::{generate_key_pair, KeyError, RecipientKey, ReviewerKey};
pub use reader::{decode, Anomaly, CaptureReader, DecodedCapture};
pub use record::{Record, Source, CODE_DATA, CODE_STDERR};
pub use render::{write_asciicast, ReaderOutput};
pub use writer::{
    CaptureFile, CaptureSummary, CaptureWriter, Sha256Writer, DEFAULT_BLOCK_TARGET, MAX_RECORD_DATA,
};

use crate::keys::recipient::Kem;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Length of the Poly1305 tag at the end of every sealed block.
const TAG_LEN: usize = 16;

/// Why a capture could not be written or read. Each variant is something the caller handles differently.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The key text is malformed (the message says how to fix it).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The first block does not open with this key: the capture was sealed to another reviewer key (another
    /// tenant's, or an older one), or its first block was altered.
    #[error(
        "this reviewer key does not open the capture: it was encrypted to another public key \
         (check the tenant's audit_recipient), or its first block was altered"
    )]
    WrongKey,
    /// The file is truncated, altered or not a capture at all. Nothing of it should be shown.
    #[error("capture is corrupt or truncated: {0}")]
    Corrupt(#[from] Corruption),
    /// Well-formed input that this operation cannot handle.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What exactly is wrong with a corrupt capture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("file ends inside the metadata header")]
    TruncatedHeader,
    #[error("metadata header is not base64 without line breaks")]
    HeaderBase64,
    #[error("metadata header is not the expected JSON: {0}")]
    HeaderJson(String),
    #[error("encapsulated_key in the metadata is not 64 hex digits of a usable X25519 public key")]
    EncapsulatedKey,
    #[error("{0} stray bytes after the last block")]
    TrailingBytes(usize),
    #[error("block {index} is cut short (declares {declared} bytes, {present} present)")]
    TruncatedBlock {
        index: u64,
        declared: u32,
        present: usize,
    },
    #[error("block {index} is {len} bytes, shorter than its 16-byte tag")]
    ShortBlock { index: u64, len: usize },
    #[error("block {index} fails authentication (altered, reordered or from another capture)")]
    BlockAuth { index: u64 },
    #[error("record {index} declares length {len}, below the 13-byte minimum")]
    ShortRecord { index: usize, len: u32 },
    #[error("record {index} is cut short by the end of the stream")]
    TruncatedRecord { index: usize },
    #[error("record {index} has source {source_byte}, neither client (0) nor origin (1)")]
    BadSource { index: usize, source_byte: u8 },
    #[error("timestamp {0} s is beyond what ssh-log-cli can print (year 262143)")]
    TimestampRange(u64),
}

/// Decrypts the capture at `path` with the reviewer's private key. The whole file is read and every record kept in
/// memory; for very large captures use [`CaptureReader`] directly.
pub fn decode_file(path: &Path, key: &ReviewerKey) -> Result<DecodedCapture, CaptureError> {
    let file = std::fs::File::open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    decode(std::io::BufReader::new(file), key)
}

/// `rampart audit keygen`: a new reviewer key pair as `(private, public)`, both standard padded base64 of 32 bytes
/// with no newline, byte-compatible with `ssh-log-cli generate-key-pair` files.
pub fn audit_keygen() -> Result<(String, String), CaptureError> {
    generate_key_pair()
}

fn os_random(buf: &mut [u8]) -> Result<(), CaptureError> {
    getrandom::fill(buf).map_err(|e| {
        CaptureError::Io(std::io::Error::other(format!(
            "OS random number generator: {e}"
        )))
    })
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Hex of either case, as the reference reader accepts it.
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}
