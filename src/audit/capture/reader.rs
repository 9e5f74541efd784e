//! The decoder. It consumes the plaintext exactly the way `ssh-log-cli` does, so its output matches the reference
//! tool even for captures a correct writer never produces:
//!
//! - the reference's stream adapter serves the bytes left in the current block and decrypts **at most one** new
//!   block per read call; a record's 4-byte length is one such call (short reads are zero-filled), its body a
//!   read-exact loop of them;
//! - so an empty block met at a record boundary reads as the end of the stream (later blocks are never opened),
//!   and an empty block met inside a body is skipped only if the same call also returned pending bytes.
//!
//! Those cases are reported as [`Anomaly`]s so a review tool can say "ssh-log-cli shows less than the file holds".

use std::io::{self, Read};

use hpke::aead::AeadCtxR;
use hpke::{Deserializable, OpModeR};

use super::header::{ExitInfo, Header};
use super::keys::ReviewerKey;
use super::record::{self, Record, Source, RECORD_FIXED};
use super::{Aead, CaptureError, Corruption, Kdf, Kem, TAG_LEN};

/// Something in a capture that the reference reader handles in a surprising way (our writer never produces any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// Block `block` decrypted to nothing at a record boundary: the reference reader stops there without error,
    /// so anything after it (`more_follows`) is neither shown nor checked.
    StoppedAtEmptyBlock { block: u64, more_follows: bool },
    /// Origin record `record` is earlier than the origin record before it; the reference prints `inf` as its
    /// timing delta and `scriptreplay` rejects the timing file.
    OriginTimeWentBack {
        record: usize,
        previous_us: u64,
        elapsed_us: u64,
    },
    /// The length prefix of record `record` came back short (`got` of 4 bytes, split over three blocks); the
    /// reference zero-fills the rest and carries on with that length.
    ShortLengthRead { record: usize, got: usize },
}

/// Reads a capture record by record. [`decode`] collects everything; use this directly to stream large captures.
pub struct CaptureReader<R> {
    input: R,
    header: Header,
    ctx: AeadCtxR<Aead, Kdf, Kem>,
    /// The current block's plaintext and how much of it was consumed.
    pending: Vec<u8>,
    pending_pos: usize,
    blocks_opened: u64,
    input_eof: bool,
    state: State,
    records: usize,
    last_origin_us: u64,
    anomalies: Vec<Anomaly>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    Ended,
    Failed,
}

impl<R: Read> CaptureReader<R> {
    /// Reads the header and sets up decryption. A wrong key shows only at the first block.
    pub fn open(mut input: R, key: &ReviewerKey) -> Result<Self, CaptureError> {
        let header = Header::read(&mut input)?;
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&header.enc_bytes()?)
            .map_err(|_| Corruption::EncapsulatedKey)?;
        let ctx = hpke::setup_receiver::<Aead, Kdf, Kem>(&OpModeR::Base, key.hpke(), &enc, &[])
            .map_err(|_| Corruption::EncapsulatedKey)?;
        Ok(CaptureReader {
            input,
            header,
            ctx,
            pending: Vec::new(),
            pending_pos: 0,
            blocks_opened: 0,
            input_eof: false,
            state: State::Reading,
            records: 0,
            last_origin_us: 0,
            anomalies: Vec::new(),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn anomalies(&self) -> &[Anomaly] {
        &self.anomalies
    }

    /// Blocks decrypted so far (empty ones included).
    pub fn blocks_opened(&self) -> u64 {
        self.blocks_opened
    }

    /// The next record, or `None` at the end of the stream. After an error the capture must be discarded as a
    /// whole (the reference writes no output at all); further calls return `Unsupported`.
    pub fn next_record(&mut self) -> Result<Option<Record>, CaptureError> {
        match self.state {
            State::Reading => {}
            State::Ended => return Ok(None),
            State::Failed => {
                return Err(CaptureError::Unsupported(
                    "reading on after a capture error",
                ))
            }
        }
        let result = self.read_record();
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => self.state = State::Ended,
            Err(_) => self.state = State::Failed,
        }
        result
    }

    fn read_record(&mut self) -> Result<Option<Record>, CaptureError> {
        let index = self.records;
        let mut len = Vec::with_capacity(4);
        let got = self.read_call(&mut len, 4)?;
        if got == 0 {
            if !self.input_eof {
                let more_follows = read_full(&mut self.input, &mut [0u8; 1])? > 0;
                self.anomalies.push(Anomaly::StoppedAtEmptyBlock {
                    block: self.blocks_opened.saturating_sub(1),
                    more_follows,
                });
            }
            return Ok(None);
        }
        if got < 4 {
            self.anomalies
                .push(Anomaly::ShortLengthRead { record: index, got });
            len.resize(4, 0);
        }
        let total = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        if (total as usize) < RECORD_FIXED {
            return Err(Corruption::ShortRecord { index, len: total }.into());
        }
        // Grown as plaintext arrives, so a forged length cannot allocate more than the file holds.
        let mut body = Vec::new();
        while body.len() < total as usize {
            let want = total as usize - body.len();
            if self.read_call(&mut body, want)? == 0 {
                return Err(Corruption::TruncatedRecord { index }.into());
            }
        }
        let record = record::parse_body(body)
            .map_err(|source_byte| Corruption::BadSource { index, source_byte })?;
        if record.source == Source::Origin {
            if record.elapsed_us < self.last_origin_us {
                self.anomalies.push(Anomaly::OriginTimeWentBack {
                    record: index,
                    previous_us: self.last_origin_us,
                    elapsed_us: record.elapsed_us,
                });
            }
            self.last_origin_us = record.elapsed_us;
        }
        self.records += 1;
        Ok(Some(record))
    }

    /// One read call of the reference's stream adapter: appends up to `want` bytes to `dst`, first from the current
    /// block, then from at most one newly decrypted block. Returns how many bytes it appended.
    fn read_call(&mut self, dst: &mut Vec<u8>, want: usize) -> Result<usize, CaptureError> {
        let left = &self.pending[self.pending_pos..];
        let n = left.len().min(want);
        dst.extend_from_slice(&left[..n]);
        self.pending_pos += n;
        if n == want {
            return Ok(n);
        }
        let block = self.next_block()?;
        let m = block.len().min(want - n);
        dst.extend_from_slice(&block[..m]);
        self.pending = block;
        self.pending_pos = m;
        Ok(n + m)
    }

    /// The next block's plaintext; empty at the end of the file, as in the reference.
    fn next_block(&mut self) -> Result<Vec<u8>, CaptureError> {
        if self.input_eof {
            return Ok(Vec::new());
        }
        let mut len = [0u8; 4];
        match read_full(&mut self.input, &mut len)? {
            0 => {
                self.input_eof = true;
                return Ok(Vec::new());
            }
            4 => {}
            n => return Err(Corruption::TrailingBytes(n).into()),
        }
        let declared = u32::from_be_bytes(len);
        let index = self.blocks_opened;
        let mut ct = Vec::new();
        (&mut self.input)
            .take(u64::from(declared))
            .read_to_end(&mut ct)?;
        if ct.len() != declared as usize {
            return Err(Corruption::TruncatedBlock {
                index,
                declared,
                present: ct.len(),
            }
            .into());
        }
        if ct.len() < TAG_LEN {
            return Err(Corruption::ShortBlock {
                index,
                len: ct.len(),
            }
            .into());
        }
        let plaintext = self.ctx.open(&ct, &[]).map_err(|_| {
            if index == 0 {
                CaptureError::WrongKey
            } else {
                Corruption::BlockAuth { index }.into()
            }
        })?;
        self.blocks_opened += 1;
        Ok(plaintext)
    }
}

/// Fills `buf` as far as the input goes; returns the bytes read (less than `buf.len()` only at end of file).
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A whole decoded capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCapture {
    pub header: Header,
    /// The records the reference reader would use, in stream order.
    pub records: Vec<Record>,
    pub anomalies: Vec<Anomaly>,
    pub blocks_opened: u64,
}

/// Decrypts and parses a whole capture. Any error means nothing of it should be shown.
pub fn decode(input: impl Read, key: &ReviewerKey) -> Result<DecodedCapture, CaptureError> {
    let mut reader = CaptureReader::open(input, key)?;
    let mut records = Vec::new();
    while let Some(r) = reader.next_record()? {
        records.push(r);
    }
    Ok(DecodedCapture {
        header: reader.header,
        records,
        anomalies: reader.anomalies,
        blocks_opened: reader.blocks_opened,
    })
}

impl DecodedCapture {
    /// PTY captures render as a terminal session; the others as client and server byte streams.
    pub fn is_pty(&self) -> bool {
        self.header.pty.is_some()
    }

    /// Capture start, Unix seconds.
    pub fn started_at(&self) -> u64 {
        self.header.started_at
    }

    /// Termination info from the (unauthenticated) header; `None` for a capture that was never finished.
    /// `ssh-log-cli` never shows it for non-PTY captures, and never shows the signal.
    pub fn exit(&self) -> Option<&ExitInfo> {
        self.header.exit_data.as_ref()
    }

    pub fn exit_status(&self) -> Option<u32> {
        self.exit().and_then(|e| e.status)
    }

    pub fn exit_signal(&self) -> Option<&str> {
        self.exit().and_then(|e| e.signal.as_deref())
    }

    pub fn error_msg(&self) -> Option<&str> {
        self.exit().and_then(|e| e.error_msg.as_deref())
    }

    pub fn core_dumped(&self) -> bool {
        self.exit().is_some_and(|e| e.core_dumped)
    }

    /// All bytes one side sent, concatenated in stream order (stderr included for the origin).
    pub fn data_from(&self, source: Source) -> Vec<u8> {
        let mut out = Vec::new();
        for r in self.records.iter().filter(|r| r.source == source) {
            out.extend_from_slice(&r.data);
        }
        out
    }
}
