//! The encoder. One HPKE sender context per capture; records accumulate into a block that is sealed (empty AAD,
//! sequence numbers 0, 1, 2, …) when it reaches the block target or when the caller flushes.
//!
//! The header precedes the blocks but carries `data_size` and `exit_data`, known only at channel close, and its
//! length varies with them. So the sealed blocks go to a spool, which starts with a provisional header
//! (`data_size` 0, no `exit_data`): the spool is itself a valid capture, and a gateway crash leaves a file
//! `ssh-log-cli` decrypts up to the last flushed block ("Session has no termination data"). At
//! [`CaptureWriter::finish`] the final header is written, then the blocks are copied behind it.

use std::convert::Infallible;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hpke::aead::AeadCtxS;
use hpke::rand_core::{TryCryptoRng, TryRng};
use hpke::{Kem as _, OpModeS, Serializable};

use super::header::{ExitInfo, Header, PtyInfo};
use super::keys::{KeyError, RecipientKey};
use super::record::{self, Source};
use super::{hex_encode, Aead, CaptureError, Kdf, Kem};

/// Plaintext bytes after which a block is sealed without waiting for a flush.
pub const DEFAULT_BLOCK_TARGET: usize = 64 * 1024;
/// Larger data is written as several records with the same timestamp (the decoded output is the same).
pub const MAX_RECORD_DATA: usize = 1 << 20;

/// Streams one channel's capture into the container format. `S` is the spool (a file for real captures; a
/// `Cursor<Vec<u8>>` in tests). Time is the caller's: it passes `elapsed_us` and decides when to
/// [`flush_block`](Self::flush_block) (the recording shell flushes about once a second so a crash loses little).
pub struct CaptureWriter<S> {
    spool: S,
    ctx: AeadCtxS<Aead, Kdf, Kem>,
    header: Header,
    /// Where the first block starts in the spool.
    blocks_start: u64,
    blocks_len: u64,
    blocks: u64,
    block: Vec<u8>,
    block_target: usize,
    last_elapsed_us: u64,
}

/// What [`CaptureWriter::finish`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureSummary {
    /// Plaintext bytes (records) over all blocks, as in the header's `data_size`.
    pub data_size: u64,
    pub blocks: u64,
    /// Size of the finished capture file.
    pub file_size: u64,
}

impl<S: Read + Write + Seek> CaptureWriter<S> {
    /// Starts a capture encrypted to `recipient`, with a fresh ephemeral key. `started_at` is Unix seconds;
    /// `pty` is `Some` for PTY channels. Writes the provisional header to `spool` at its current position.
    pub fn new(
        spool: S,
        recipient: &RecipientKey,
        started_at: u64,
        pty: Option<PtyInfo>,
    ) -> Result<Self, CaptureError> {
        let mut ikm = [0u8; 32];
        super::os_random(&mut ikm)?;
        let writer = Self::with_ephemeral_ikm(spool, recipient, started_at, pty, &ikm);
        ikm.fill(0);
        writer
    }

    /// The test seam: the ephemeral key pair is `DeriveKeyPair(ikm)` (RFC 9180 §7.1.3), which is exactly how
    /// hpke draws it from an RNG, so fixed `ikm` gives byte-reproducible captures. Never reuse an `ikm`.
    pub(super) fn with_ephemeral_ikm(
        mut spool: S,
        recipient: &RecipientKey,
        started_at: u64,
        pty: Option<PtyInfo>,
        ikm: &[u8; 32],
    ) -> Result<Self, CaptureError> {
        let pk = recipient.hpke()?;
        let mut rng = IkmRng { ikm: *ikm, pos: 0 };
        let (enc, ctx) =
            hpke::setup_sender_with_rng::<Aead, Kdf, Kem>(&OpModeS::Base, &pk, &[], &mut rng)
                .map_err(|_| KeyError::LowOrder)?;
        let enc = enc.to_bytes();
        // If a future hpke drew its ephemeral key differently, fixed-key tests would silently stop meaning
        // anything; fail loudly instead.
        if rng.pos != 32 || Kem::derive_keypair(ikm).1.to_bytes() != enc {
            return Err(CaptureError::Unsupported(
                "the hpke crate no longer derives the ephemeral key as DeriveKeyPair(32 random bytes)",
            ));
        }
        let header = Header {
            started_at,
            data_size: 0,
            encapsulated_key: hex_encode(&enc),
            pty,
            exit_data: None,
        };
        let start = spool.stream_position()?;
        let provisional = header.encode();
        spool.write_all(&provisional)?;
        Ok(CaptureWriter {
            spool,
            ctx,
            header,
            blocks_start: start + provisional.len() as u64,
            blocks_len: 0,
            blocks: 0,
            block: Vec::new(),
            block_target: DEFAULT_BLOCK_TARGET,
            last_elapsed_us: 0,
        })
    }

    /// Seal the current block once it holds at least this many plaintext bytes.
    pub fn set_block_target(&mut self, bytes: usize) {
        self.block_target = bytes.max(1);
    }

    /// The header as it stands (the final one gets `data_size` and `exit_data` at [`finish`](Self::finish)).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Appends bytes one side sent, `elapsed_us` after the capture started. Timestamps are kept non-decreasing
    /// (a smaller one is raised to the previous), because `scriptreplay` rejects a capture whose time goes back.
    /// Empty `data` is a valid (zero-length) record.
    pub fn record(
        &mut self,
        source: Source,
        code: u32,
        elapsed_us: u64,
        data: &[u8],
    ) -> Result<(), CaptureError> {
        let elapsed_us = elapsed_us.max(self.last_elapsed_us);
        self.last_elapsed_us = elapsed_us;
        let mut chunks = data.chunks(MAX_RECORD_DATA);
        let first = chunks.next().unwrap_or(&[]);
        for chunk in std::iter::once(first).chain(chunks) {
            record::encode_into(&mut self.block, source, code, elapsed_us, chunk);
            if self.block.len() >= self.block_target {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    /// Seals the records written since the last block (nothing if there are none: an empty block would end the
    /// stream for the reference reader) and flushes the spool.
    pub fn flush_block(&mut self) -> Result<(), CaptureError> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.block);
        self.seal(&block)?;
        self.block = block;
        self.block.clear();
        self.spool.flush()?;
        Ok(())
    }

    /// Seals `plaintext` as the next block. Callers guarantee it is non-empty whole records, except tests
    /// reproducing the malformed vectors and the `capture` fuzz target.
    pub(crate) fn seal(&mut self, plaintext: &[u8]) -> Result<(), CaptureError> {
        let ct = self
            .ctx
            .seal(plaintext, &[])
            .map_err(|_| CaptureError::Unsupported("HPKE sequence number exhausted"))?;
        let len =
            u32::try_from(ct.len()).map_err(|_| CaptureError::Unsupported("a block over 4 GiB"))?;
        let mut framed = Vec::with_capacity(4 + ct.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&ct);
        self.spool.write_all(&framed)?;
        self.blocks_len += framed.len() as u64;
        self.blocks += 1;
        self.header.data_size += plaintext.len() as u64;
        Ok(())
    }

    /// Seals what is left, then writes the finished capture (`final header ‖ blocks`) to `out`. `exit` is `None`
    /// for a capture cut short (the reference prints "Session has no termination data"). Returns the spool,
    /// which the caller deletes.
    pub fn finish(
        mut self,
        exit: Option<ExitInfo>,
        out: &mut impl Write,
    ) -> Result<(CaptureSummary, S), CaptureError> {
        self.flush_block()?;
        self.header.exit_data = exit;
        let header = self.header.encode();
        out.write_all(&header)?;
        self.spool.seek(SeekFrom::Start(self.blocks_start))?;
        let copied = io::copy(&mut (&mut self.spool).take(self.blocks_len), out)?;
        if copied != self.blocks_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "capture spool shrank while writing",
            )
            .into());
        }
        out.flush()?;
        let summary = CaptureSummary {
            data_size: self.header.data_size,
            blocks: self.blocks,
            file_size: header.len() as u64 + self.blocks_len,
        };
        Ok((summary, self.spool))
    }
}

/// A capture written to `path`: blocks spool to `<path>.partial` (a valid capture on its own if the gateway
/// dies), and [`finish`](Self::finish) writes `<path>.tmp`, syncs it, renames it to `path` and removes the spool.
pub struct CaptureFile {
    writer: CaptureWriter<File>,
    path: PathBuf,
    spool_path: PathBuf,
}

impl CaptureFile {
    /// Fails if `<path>.partial` exists (another capture of the same name is in progress or was interrupted).
    pub fn create(
        path: &Path,
        recipient: &RecipientKey,
        started_at: u64,
        pty: Option<PtyInfo>,
    ) -> Result<CaptureFile, CaptureError> {
        let spool_path = with_suffix(path, ".partial");
        let spool = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool_path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", spool_path.display())))?;
        let writer = CaptureWriter::new(spool, recipient, started_at, pty)?;
        Ok(CaptureFile {
            writer,
            path: path.to_path_buf(),
            spool_path,
        })
    }

    pub fn writer(&mut self) -> &mut CaptureWriter<File> {
        &mut self.writer
    }

    pub fn spool_path(&self) -> &Path {
        &self.spool_path
    }

    pub fn finish(self, exit: Option<ExitInfo>) -> Result<CaptureSummary, CaptureError> {
        self.finish_hashed(exit).map(|(summary, _)| summary)
    }

    /// [`finish`](Self::finish), also returning the finished file's sha256 (hex), computed as it is written.
    pub fn finish_hashed(
        self,
        exit: Option<ExitInfo>,
    ) -> Result<(CaptureSummary, String), CaptureError> {
        let tmp = with_suffix(&self.path, ".tmp");
        let mut out = io::BufWriter::new(Sha256Writer::new(File::create(&tmp)?));
        let (summary, _spool) = self.writer.finish(exit, &mut out)?;
        let (out, sha256, _) = out.into_inner().map_err(|e| e.into_error())?.finish();
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        std::fs::remove_file(&self.spool_path)?;
        // Make the rename durable before the caller records the capture's hash in the audit chain.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok((summary, sha256))
    }
}

/// A writer that hashes (sha256) and counts what it passes on, so a file's hash is known when it is written
/// without reading it again.
pub struct Sha256Writer<W> {
    inner: W,
    hash: sha2::Sha256,
    len: u64,
}

impl<W: Write> Sha256Writer<W> {
    pub fn new(inner: W) -> Sha256Writer<W> {
        Sha256Writer {
            inner,
            hash: sha2::Digest::new(),
            len: 0,
        }
    }

    /// The inner writer, the sha256 (hex) and the length of everything written.
    pub fn finish(self) -> (W, String, u64) {
        let digest = sha2::Digest::finalize(self.hash);
        (self.inner, hex_encode(&digest), self.len)
    }
}

impl<W: Write> Write for Sha256Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Hands hpke the 32 bytes it draws for the ephemeral key. hpke asks exactly once (checked after setup); should it
/// ask again, the bytes repeat and the setup is rejected by that check.
struct IkmRng {
    ikm: [u8; 32],
    pos: usize,
}

impl TryRng for IkmRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for b in dst {
            *b = self.ikm[self.pos % 32];
            self.pos += 1;
        }
        Ok(())
    }
}

impl TryCryptoRng for IkmRng {}

impl Drop for IkmRng {
    fn drop(&mut self) {
        self.ikm.fill(0);
    }
}
