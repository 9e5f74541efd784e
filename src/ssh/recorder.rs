//! Per-channel recordings. One file per channel under `state_dir/recordings/<tenant>/<session>/<channel>.*`:
//!
//! - with a tenant reviewer key: `.cap`, the `ssh-log-cli` container (`audit::capture`), encrypted on the fly;
//! - without: `.rec`, the same record stream in plaintext (`rampart-rec-v1` line, header JSON line, then
//!   `u32be len ‖ u8 source ‖ u32be code ‖ u64be elapsed_us ‖ data` records).
//!
//! Records: target output (`origin`, code 0 stdout / 1 stderr); client input (`client`, code 0) for non-PTY
//! channels always and for PTY channels only with `capture_input`; terminal resizes as client records with
//! code [`CODE_RESIZE`] (`ssh-log-cli` ignores client records of PTY captures). Review renders PTY recordings
//! as asciicast v2 (`audit::review::ssh`).
//!
//! A write error stops the recording (never the relay); the caller decides whether the channel may go on
//! (`recording = "required"` ends it). So does the session's [`RecordingBudget`] (`max_recording_mb`,
//! `max_recording_secs`). Blocks are flushed at least once a second of activity, so a gateway crash loses
//! little; the unfinished spool is itself decodable. The file's sha256 is computed as it is written;
//! [`ChannelRecorder::finish`] is blocking file work (the sealed container is assembled then): call it off the
//! async runtime.
#![deny(unsafe_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::audit::capture::{CaptureFile, ExitInfo, PtyInfo, RecipientKey, Sha256Writer, Source};
use crate::audit::ssh_records::{RecordingFormat, RecordingInfo};

/// Code of a client record carrying a terminal resize, data `"<cols>x<rows>"`.
pub const CODE_RESIZE: u32 = 0x7273_0001;
/// First line of a plaintext recording.
pub const PLAIN_MAGIC: &str = "rampart-rec-v1";

const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Bytes a record adds to the data in the file (plaintext framing; the sealed container's is similar).
const RECORD_OVERHEAD: u64 = 17;

/// What a session's recordings may still take: bytes in total (`max_recording_mb`) and time since the session
/// started (`max_recording_secs`).
#[derive(Debug)]
pub struct RecordingBudget {
    max_bytes: u64,
    used: AtomicU64,
    until: Instant,
    max_time: Duration,
}

impl RecordingBudget {
    pub fn new(max_bytes: u64, started: Instant, max_time: Duration) -> RecordingBudget {
        RecordingBudget {
            max_bytes,
            used: AtomicU64::new(0),
            until: started + max_time,
            max_time,
        }
    }

    /// Takes `n` bytes; `Err` (why) once either cap is reached.
    pub fn take(&self, n: u64) -> Result<(), String> {
        self.open()?;
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|t| *t <= self.max_bytes)
            })
            .map(|_| ())
            .map_err(|_| {
                format!(
                    "the session's recordings reached max_recording_mb ({} MB)",
                    self.max_bytes >> 20
                )
            })
    }

    /// `Err` (why) once the time cap is reached or no byte is left.
    pub fn open(&self) -> Result<(), String> {
        if Instant::now() >= self.until {
            return Err(format!(
                "the session's recordings reached max_recording_secs ({} s)",
                self.max_time.as_secs()
            ));
        }
        if self.used.load(Ordering::Relaxed) >= self.max_bytes {
            return Err(format!(
                "the session's recordings reached max_recording_mb ({} MB)",
                self.max_bytes >> 20
            ));
        }
        Ok(())
    }
}

enum Sink {
    Sealed(Box<CaptureFile>),
    Plain {
        out: BufWriter<Sha256Writer<File>>,
        tmp: PathBuf,
    },
}

pub struct ChannelRecorder {
    budget: std::sync::Arc<RecordingBudget>,
    sink: Option<Sink>,
    path: PathBuf,
    rel_path: String,
    pty: bool,
    started: Instant,
    last_flush: Instant,
    last_elapsed: u64,
    error: Option<String>,
    /// Where target output is offered to live viewers, with this channel's number.
    live: Option<(super::live::LiveTap, u32)>,
}

impl ChannelRecorder {
    /// Creates the recording file for channel `rel_path` (relative to `state_dir`, without extension), unless
    /// the session's `budget` is spent.
    pub fn start(
        state_dir: &Path,
        rel_path: &str,
        recipient: Option<&RecipientKey>,
        started_unix: u64,
        pty: Option<PtyInfo>,
        budget: std::sync::Arc<RecordingBudget>,
    ) -> Result<ChannelRecorder, String> {
        budget.open()?;
        let is_pty = pty.is_some();
        let ext = if recipient.is_some() { "cap" } else { "rec" };
        let rel_path = format!("{rel_path}.{ext}");
        let path = state_dir.join(&rel_path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let sink = match recipient {
            Some(r) => Sink::Sealed(Box::new(
                CaptureFile::create(&path, r, started_unix, pty)
                    .map_err(|e| format!("cannot start {}: {e}", path.display()))?,
            )),
            None => {
                let tmp = {
                    let mut s = path.as_os_str().to_owned();
                    s.push(".partial");
                    PathBuf::from(s)
                };
                let f = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)
                    .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
                let mut out = BufWriter::new(Sha256Writer::new(f));
                let header = serde_json::json!({ "started_at": started_unix, "pty": pty });
                writeln!(out, "{PLAIN_MAGIC}\n{header}")
                    .and_then(|_| out.flush())
                    .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
                Sink::Plain { out, tmp }
            }
        };
        let now = Instant::now();
        Ok(ChannelRecorder {
            budget,
            sink: Some(sink),
            path,
            rel_path,
            pty: is_pty,
            started: now,
            last_flush: now,
            last_elapsed: 0,
            error: None,
            live: None,
        })
    }

    /// Offers the channel's target output to live viewers of the session.
    pub fn tap(&mut self, tap: super::live::LiveTap, channel: u32) {
        self.live = Some((tap, channel));
    }

    /// Whether the recording still works.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn origin(&mut self, code: u32, data: &[u8]) -> Result<(), String> {
        if let Some((tap, channel)) = &self.live {
            tap.send(*channel, data);
        }
        self.write(Source::Origin, code, data)
    }

    pub fn client(&mut self, data: &[u8]) -> Result<(), String> {
        self.write(Source::Client, 0, data)
    }

    pub fn resize(&mut self, cols: u32, rows: u32) -> Result<(), String> {
        self.write(
            Source::Client,
            CODE_RESIZE,
            format!("{cols}x{rows}").as_bytes(),
        )
    }

    fn write(&mut self, source: Source, code: u32, data: &[u8]) -> Result<(), String> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if let Err(why) = self.budget.take(data.len() as u64 + RECORD_OVERHEAD) {
            self.error = Some(format!("recording stopped: {why}"));
            return Err(self.error.clone().unwrap_or_default());
        }
        let elapsed = (self.started.elapsed().as_micros() as u64).max(self.last_elapsed);
        self.last_elapsed = elapsed;
        let flush = self.last_flush.elapsed() >= FLUSH_EVERY;
        let result = match self.sink.as_mut() {
            Some(Sink::Sealed(c)) => {
                let w = c.writer();
                w.record(source, code, elapsed, data)
                    .and_then(|_| if flush { w.flush_block() } else { Ok(()) })
                    .map_err(|e| e.to_string())
            }
            Some(Sink::Plain { out, .. }) => encode_plain(out, source, code, elapsed, data)
                .and_then(|_| if flush { out.flush() } else { Ok(()) })
                .map_err(|e| e.to_string()),
            None => Ok(()),
        };
        if flush {
            self.last_flush = Instant::now();
        }
        if let Err(e) = &result {
            self.error = Some(format!("recording {} failed: {e}", self.path.display()));
            return Err(self.error.clone().unwrap_or_default());
        }
        Ok(())
    }

    /// Where the recording goes, relative to `state_dir`.
    pub fn rel_path(&self) -> &str {
        &self.rel_path
    }

    pub fn is_pty(&self) -> bool {
        self.pty
    }

    /// How the file is stored.
    pub fn format(&self) -> RecordingFormat {
        match self.sink {
            Some(Sink::Sealed(_)) => RecordingFormat::SshLogCli,
            Some(Sink::Plain { .. }) | None => RecordingFormat::RampartRecV1,
        }
    }

    /// Finishes the file and returns what the channel's close record says about it. Blocking file work.
    pub fn finish(mut self, exit: Option<ExitInfo>) -> RecordingInfo {
        let sink = self.sink.take();
        let (format, result) = match sink {
            Some(Sink::Sealed(c)) => (
                RecordingFormat::SshLogCli,
                (*c).finish_hashed(exit)
                    .map(|(summary, sha256)| (sha256, summary.file_size))
                    .map_err(|e| e.to_string()),
            ),
            Some(Sink::Plain { out, tmp }) => (
                RecordingFormat::RampartRecV1,
                finish_plain(out, &tmp, &self.path),
            ),
            None => (
                RecordingFormat::RampartRecV1,
                Err("the recording was not started".into()),
            ),
        };
        let mut error = self.error.take();
        let (sha256, size) = match result {
            Ok((h, size)) => (Some(h), size),
            Err(e) => {
                error.get_or_insert(format!("finishing {} failed: {e}", self.path.display()));
                (None, 0)
            }
        };
        RecordingInfo {
            path: self.rel_path.clone(),
            format,
            pty: self.pty,
            complete: error.is_none() && sha256.is_some(),
            sha256,
            size,
            error,
        }
    }
}

/// Flushes, syncs and renames the plaintext recording into place; its sha256 and size.
fn finish_plain(
    out: BufWriter<Sha256Writer<File>>,
    tmp: &Path,
    path: &Path,
) -> Result<(String, u64), String> {
    let (f, sha256, size) = out
        .into_inner()
        .map_err(|e| e.error().to_string())?
        .finish();
    f.sync_all().map_err(|e| e.to_string())?;
    std::fs::rename(tmp, path).map_err(|e| e.to_string())?;
    Ok((sha256, size))
}

fn encode_plain(
    out: &mut impl Write,
    source: Source,
    code: u32,
    elapsed_us: u64,
    data: &[u8],
) -> std::io::Result<()> {
    let len =
        u32::try_from(13 + data.len()).map_err(|_| std::io::Error::other("record too big"))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(&[match source {
        Source::Client => 0,
        Source::Origin => 1,
    }])?;
    out.write_all(&code.to_be_bytes())?;
    out.write_all(&elapsed_us.to_be_bytes())?;
    out.write_all(data)
}
