//! The plaintext record framing: `u32be len ‖ u8 source ‖ u32be code ‖ u64be elapsed_us ‖ data`, where `len`
//! counts everything after itself.

/// Bytes of a record before its data, after the length prefix.
pub(super) const RECORD_FIXED: usize = 13;

/// `code` of ordinary channel data (our convention: the SSH extended-data type).
pub const CODE_DATA: u32 = 0;
/// `code` of SSH extended data type 1 (stderr). The reference reader mixes it into the origin stream.
pub const CODE_STDERR: u32 = 1;

/// Which side of the SSH channel sent the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// Bytes from the SSH client (typed input, stdin).
    Client,
    /// Bytes from the target (terminal output, stdout, stderr).
    Origin,
}

impl Source {
    pub(super) fn byte(self) -> u8 {
        match self {
            Source::Client => 0,
            Source::Origin => 1,
        }
    }

    pub(super) fn from_byte(b: u8) -> Option<Source> {
        match b {
            0 => Some(Source::Client),
            1 => Some(Source::Origin),
            _ => None,
        }
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub source: Source,
    /// [`CODE_DATA`] or [`CODE_STDERR`] when we wrote it; any value in foreign captures.
    pub code: u32,
    /// Microseconds since the capture started.
    pub elapsed_us: u64,
    pub data: Vec<u8>,
}

/// Appends one record to `out`. `data` must be shorter than `u32::MAX - 13` (the writer splits larger data).
pub(super) fn encode_into(
    out: &mut Vec<u8>,
    source: Source,
    code: u32,
    elapsed_us: u64,
    data: &[u8],
) {
    debug_assert!(data.len() <= u32::MAX as usize - RECORD_FIXED);
    out.reserve(4 + RECORD_FIXED + data.len());
    out.extend_from_slice(&((RECORD_FIXED + data.len()) as u32).to_be_bytes());
    out.push(source.byte());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&elapsed_us.to_be_bytes());
    out.extend_from_slice(data);
}

/// Splits a record body (everything after the length prefix) into its fields; `Err` carries a bad source byte.
/// The caller has checked that the body holds at least the 13 fixed bytes.
pub(super) fn parse_body(mut body: Vec<u8>) -> Result<Record, u8> {
    let source = Source::from_byte(body[0]).ok_or(body[0])?;
    let code = u32::from_be_bytes([body[1], body[2], body[3], body[4]]);
    let mut elapsed = [0u8; 8];
    elapsed.copy_from_slice(&body[5..RECORD_FIXED]);
    body.drain(..RECORD_FIXED);
    Ok(Record {
        source,
        code,
        elapsed_us: u64::from_be_bytes(elapsed),
        data: body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let mut out = Vec::new();
        encode_into(
            &mut out,
            Source::Origin,
            CODE_STDERR,
            0x0102_0304_0506_0708,
            b"hi",
        );
        assert_eq!(
            out,
            [0, 0, 0, 15, 1, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, b'h', b'i']
        );
        let r = parse_body(out[4..].to_vec()).unwrap();
        assert_eq!(r.source, Source::Origin);
        assert_eq!(r.code, CODE_STDERR);
        assert_eq!(r.elapsed_us, 0x0102_0304_0506_0708);
        assert_eq!(r.data, b"hi");
        let mut bad = out[4..].to_vec();
        bad[0] = 2;
        assert_eq!(parse_body(bad), Err(2));
    }
}
