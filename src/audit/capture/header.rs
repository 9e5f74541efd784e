//! The container's metadata header: `u32be len ‖ base64(JSON)`. The JSON types mirror the reference reader's
//! exactly (field types, which fields may be missing), so that what it rejects we reject too.

use std::io::Read;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{CaptureError, Corruption};

/// Decodes the header base64 with or without padding, as the reference reader does.
const HEADER_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The metadata JSON. Serialized compactly in this field order, it is byte-identical to what the reference
/// captures carry. It is outside the encryption: anyone can read and alter it undetected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Capture start, Unix seconds.
    pub started_at: u64,
    /// Total plaintext bytes of all blocks (the reference reader ignores it).
    pub data_size: u64,
    /// Hex of the 32-byte HPKE encapsulated key (the ephemeral X25519 public key).
    pub encapsulated_key: String,
    /// `Some` makes this a PTY capture (rendered as a terminal session rather than two byte streams).
    pub pty: Option<PtyInfo>,
    /// Termination info; absent in a capture that was never finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_data: Option<ExitInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyInfo {
    /// `TERM`; the reference prints `unknown` for `None`.
    pub term: Option<String>,
    pub width: u32,
    pub height: u32,
    /// SSH terminal modes by name, e.g. `("ECHO", 1)`.
    pub modes: Vec<(String, u32)>,
}

/// How the captured program ended. For non-PTY captures `ssh-log-cli` shows none of this; our review tool does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// End time, Unix seconds.
    pub timestamp: u64,
    pub status: Option<u32>,
    /// Signal name without `SIG` (`"TERM"`), as SSH `exit-signal` carries it.
    pub signal: Option<String>,
    #[serde(default)]
    pub core_dumped: bool,
    /// Gateway-side error (e.g. the upstream connection was lost).
    pub error_msg: Option<String>,
}

impl Header {
    /// `u32be len ‖ base64(compact JSON)`.
    pub(super) fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let b64 = STANDARD.encode(json);
        let mut out = Vec::with_capacity(4 + b64.len());
        out.extend_from_slice(&(b64.len() as u32).to_be_bytes());
        out.extend_from_slice(b64.as_bytes());
        out
    }

    /// Reads the header from the start of a capture, leaving `input` at the first block.
    pub(super) fn read(input: &mut impl Read) -> Result<Header, CaptureError> {
        let mut len = [0u8; 4];
        read_exact_or(input, &mut len, Corruption::TruncatedHeader)?;
        let len = u32::from_be_bytes(len);
        let mut b64 = Vec::new();
        // `take` grows the buffer only as bytes arrive, so a forged length cannot allocate 4 GiB.
        input.take(u64::from(len)).read_to_end(&mut b64)?;
        if b64.len() != len as usize {
            return Err(Corruption::TruncatedHeader.into());
        }
        Header::parse_b64(&b64)
    }

    pub(super) fn parse_b64(b64: &[u8]) -> Result<Header, CaptureError> {
        let json = HEADER_B64
            .decode(b64)
            .map_err(|_| Corruption::HeaderBase64)?;
        serde_json::from_slice(&json).map_err(|e| Corruption::HeaderJson(e.to_string()).into())
    }

    /// The encapsulated key as bytes.
    pub(super) fn enc_bytes(&self) -> Result<[u8; 32], Corruption> {
        super::hex_decode(&self.encapsulated_key)
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or(Corruption::EncapsulatedKey)
    }
}

/// `read_exact`, with a clean end of file reported as `eof` instead of an I/O error.
pub(super) fn read_exact_or(
    input: &mut impl Read,
    buf: &mut [u8],
    eof: Corruption,
) -> Result<(), CaptureError> {
    match input.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(eof.into()),
        Err(e) => Err(e.into()),
    }
}

/// `YYYY-MM-DD HH:MM:SS+00` in UTC, as the reference prints dates (chrono `%Y`: years past 9999 get a `+`).
pub(super) fn format_date(unix_seconds: u64) -> Result<String, Corruption> {
    // chrono's last representable year; the reference panics beyond it, so it never prints such a date.
    const MAX_YEAR: i64 = 262_143;
    let secs = i64::try_from(unix_seconds).map_err(|_| Corruption::TimestampRange(unix_seconds))?;
    let t = crate::clock::utc_datetime(secs).ok_or(Corruption::TimestampRange(unix_seconds))?;
    let y = i64::from(t.year());
    if y > MAX_YEAR {
        return Err(Corruption::TimestampRange(unix_seconds));
    }
    let year = if y <= 9999 {
        format!("{y:04}")
    } else {
        format!("+{y}")
    };
    Ok(format!(
        "{year}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_print_like_chrono() {
        assert_eq!(format_date(0).unwrap(), "1970-01-01 00:00:00+00");
        assert_eq!(
            format_date(1_714_816_800).unwrap(),
            "2024-05-04 10:00:00+00"
        );
        assert_eq!(format_date(951_782_400).unwrap(), "2000-02-29 00:00:00+00");
        // A millisecond timestamp mistaken for seconds (the design note's year-56310 case).
        assert_eq!(
            format_date(1_714_816_800_000).unwrap(),
            "+56310-05-20 16:00:00+00"
        );
        assert_eq!(
            format_date(253_402_300_799).unwrap(),
            "9999-12-31 23:59:59+00"
        );
        assert_eq!(
            format_date(253_402_300_800).unwrap(),
            "+10000-01-01 00:00:00+00"
        );
        assert!(format_date(u64::MAX).is_err());
        assert_eq!(
            format_date(8_210_298_412_799).unwrap(),
            "+262143-12-31 23:59:59+00"
        );
        assert!(format_date(8_210_298_412_800).is_err());
    }

    #[test]
    fn header_accepts_what_the_reference_accepts() {
        let ok = |json: &str| Header::parse_b64(STANDARD.encode(json).as_bytes());
        let base = r#"{"started_at":1,"data_size":2,"encapsulated_key":"AB"#;
        let h = ok(&format!(
            r#"{base}", "extra": [1], "pty": {{"width":1,"height":2,"modes":[]}}}}"#
        ))
        .unwrap();
        assert_eq!(h.pty.unwrap().term, None);
        assert_eq!(h.exit_data, None);
        let h = ok(&format!(r#"{base}","exit_data":{{"timestamp":5,"status":null,"signal":null,"error_msg":null}}}}"#)).unwrap();
        assert!(!h.exit_data.unwrap().core_dumped);
        // Unpadded base64 is accepted too.
        let unpadded =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(format!("{base}\"}}"));
        assert!(Header::parse_b64(unpadded.as_bytes()).is_ok());
        for bad in [
            format!(r#"{base}","started_at":1}}"#), // duplicate field
            r#"{"started_at":1,"encapsulated_key":""}"#.to_string(), // missing data_size
            format!(r#"{base}","pty":{{}}}}"#),     // pty without width
            format!(r#"{base}","pty":{{"width":1,"height":2,"modes":[["ECHO",1,2]]}}}}"#),
            format!(r#"{base}","exit_data":{{"timestamp":5,"status":-1}}}}"#),
            r#"{"started_at":1.5,"data_size":2,"encapsulated_key":""}"#.to_string(),
            format!("\u{feff}{base}\"}}"),
        ] {
            assert!(ok(&bad).is_err(), "accepted {bad}");
        }
        let mut wrapped = STANDARD.encode(format!("{base}\"}}")).into_bytes();
        wrapped.insert(8, b'\n');
        assert!(Header::parse_b64(&wrapped).is_err());
    }
}
