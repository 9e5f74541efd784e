//! Renders a decoded capture: byte-for-byte the files `ssh-log-cli decrypt` writes, or asciicast v2.

use std::io::{self, Write};
use std::path::Path;

use super::header::format_date;
use super::reader::DecodedCapture;
use super::record::Source;
use super::CaptureError;

/// The two files `ssh-log-cli decrypt` puts in its ZIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderOutput {
    /// `term_data.txt` + `term_times.txt`, the `script`/`scriptreplay` pair.
    Pty {
        term_data: Vec<u8>,
        term_times: Vec<u8>,
    },
    /// `data_from_client.txt` + `data_from_server.txt`.
    Raw {
        data_from_client: Vec<u8>,
        data_from_server: Vec<u8>,
    },
}

impl ReaderOutput {
    /// `(file name, contents)` as in the reference ZIP.
    pub fn files(&self) -> [(&'static str, &[u8]); 2] {
        match self {
            ReaderOutput::Pty {
                term_data,
                term_times,
            } => [("term_data.txt", term_data), ("term_times.txt", term_times)],
            ReaderOutput::Raw {
                data_from_client,
                data_from_server,
            } => [
                ("data_from_client.txt", data_from_client),
                ("data_from_server.txt", data_from_server),
            ],
        }
    }

    /// Writes both files into `dir` (which must exist).
    pub fn write_to_dir(&self, dir: &Path) -> io::Result<()> {
        for (name, bytes) in self.files() {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(())
    }
}

impl DecodedCapture {
    /// What `ssh-log-cli decrypt` outputs for this capture, byte for byte. Fails where the reference fails
    /// (a date it cannot print).
    pub fn reader_output(&self) -> Result<ReaderOutput, CaptureError> {
        let Some(pty) = &self.header.pty else {
            return Ok(ReaderOutput::Raw {
                data_from_client: self.data_from(Source::Client),
                data_from_server: self.data_from(Source::Origin),
            });
        };
        let mut term_data = format!(
            "Session started on {} [TERM=\"{}\" COLUMNS=\"{}\" LINES=\"{}\"]\n",
            format_date(self.header.started_at)?,
            pty.term.as_deref().unwrap_or("unknown"),
            pty.width,
            pty.height
        )
        .into_bytes();
        let mut term_times = Vec::new();
        let mut previous_us: u128 = 0;
        for r in self.records.iter().filter(|r| r.source == Source::Origin) {
            term_data.extend_from_slice(&r.data);
            // The reference subtracts u128 microseconds (wrapping in its release build: a decrease becomes a huge
            // value, `inf` as f32) and divides in single precision.
            let us = u128::from(r.elapsed_us);
            let delta = us.wrapping_sub(previous_us) as f32 / 1_000_000f32;
            previous_us = us;
            // Writing into a Vec cannot fail.
            let _ = writeln!(term_times, "{delta:.6} {}", r.data.len());
        }
        let trailer = match &self.header.exit_data {
            None => "\nSession has no termination data\n".to_string(),
            Some(exit) => {
                let end = format_date(exit.timestamp)?;
                if let Some(e) = &exit.error_msg {
                    format!("\nScript done on {end} [ERROR=\"{e}\"]\n")
                } else if exit.core_dumped {
                    format!("\nScript done on {end} [CORE DUMPED]\n")
                } else {
                    format!(
                        "\nScript done on {end} [COMMAND_EXIT_CODE=\"{}\"]\n",
                        exit.status.unwrap_or(0)
                    )
                }
            }
        };
        term_data.extend_from_slice(trailer.as_bytes());
        Ok(ReaderOutput::Pty {
            term_data,
            term_times,
        })
    }
}

/// Writes a PTY capture as asciicast v2 (`asciinema play` plays it): a header line, then one `[t, "o", text]`
/// event per origin record with `t` in seconds since the start. Output split inside a UTF-8 sequence is joined
/// across events; invalid bytes become U+FFFD. Client input is not included (the terminal echo shows it).
pub fn write_asciicast(decoded: &DecodedCapture, out: &mut impl Write) -> Result<(), CaptureError> {
    let Some(pty) = &decoded.header.pty else {
        return Err(CaptureError::Unsupported(
            "asciicast needs a PTY capture; this one holds two byte streams (use the raw output)",
        ));
    };
    let mut header = serde_json::json!({
        "version": 2,
        "width": pty.width,
        "height": pty.height,
        "timestamp": decoded.header.started_at,
    });
    if let Some(term) = &pty.term {
        header["env"] = serde_json::json!({ "TERM": term });
    }
    writeln!(out, "{header}")?;
    let mut text = Utf8Joiner::default();
    let mut last_us = 0u64;
    for r in decoded
        .records
        .iter()
        .filter(|r| r.source == Source::Origin)
    {
        // asciicast times must not go back.
        last_us = last_us.max(r.elapsed_us);
        let s = text.push(&r.data);
        if !s.is_empty() {
            writeln!(out, "{}", serde_json::json!([last_us as f64 / 1e6, "o", s]))?;
        }
    }
    let rest = text.finish();
    if !rest.is_empty() {
        writeln!(
            out,
            "{}",
            serde_json::json!([last_us as f64 / 1e6, "o", rest])
        )?;
    }
    out.flush()?;
    Ok(())
}

/// Decodes UTF-8 across chunk boundaries: an incomplete sequence at the end of a chunk waits for the next one.
#[derive(Default)]
struct Utf8Joiner {
    carry: Vec<u8>,
}

impl Utf8Joiner {
    fn push(&mut self, data: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(data);
        let mut out = String::new();
        let mut rest = &buf[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &after[bad..];
                        }
                        None => {
                            self.carry = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_chunks_is_joined() {
        let mut j = Utf8Joiner::default();
        let euro = "€".as_bytes();
        assert_eq!(j.push(&[b'a', euro[0]]), "a");
        assert_eq!(j.push(&euro[1..]), "€");
        assert_eq!(j.push(&[0xff, b'b', 0xe2]), "\u{FFFD}b");
        assert_eq!(j.finish(), "\u{FFFD}");
    }

    #[test]
    fn single_precision_timing_matches_the_reference() {
        let fmt = |prev: u64, now: u64| {
            let d = u128::from(now).wrapping_sub(u128::from(prev)) as f32 / 1_000_000f32;
            format!("{d:.6}")
        };
        assert_eq!(fmt(1, 16_777_218), "16.777216");
        assert_eq!(fmt(16_777_218, 140_234_007), "123.456795");
        assert_eq!(fmt(2_000_000, 1_000_000), "inf");
    }
}
