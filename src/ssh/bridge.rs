//! One relayed channel: its state (shared by the connection's handler, which relays client -> target, and the
//! channel's pump task, which relays target -> client), the recorder tee, and the per-channel FIFO of pending
//! request replies (design note G2: the target's Success/Failure answers requests in order, so the pump pops
//! the oldest waiter).
//!
//! Close ordering (G4): the pump relays the target's exit-status/exit-signal, EOF and Close through the one
//! server `Handle` (an ordered queue) and closes the client channel only on the target's Close.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::server::Handle;
use russh::{ChannelId, ChannelMsg, ChannelReadHalf, Sig};
use tokio::sync::{mpsc, oneshot};

use super::input_line::LineAssembler;
use super::recorder::ChannelRecorder;
use super::session::SessionState;
use super::sftp::SftpParser;
use crate::audit::capture::{ExitInfo, PtyInfo};
use crate::audit::ssh_records::{
    ChannelClose, Command, CommandSource, CommandText, Confidence, EnvVar, PtyRequest,
    RecordingInfo, SshEvent,
};
use crate::config::Recording;

/// Exit status the gateway reports when it ends a program itself (like OpenSSH's 255 for its own errors,
/// but distinguishable).
pub const GATEWAY_EXIT_STATUS: u32 = 254;

#[derive(Default)]
pub struct ChannelState {
    pub pty: Option<PtyInfo>,
    pub pty_request: Option<PtyRequest>,
    pub env: Vec<EnvVar>,
    pub program: Option<String>,
    pub recorder: Option<ChannelRecorder>,
    /// `recording = "required"`: a recording failure ends the channel.
    pub recording_required: bool,
    pub input: Option<LineAssembler>,
    pub sftp: Option<SftpParser>,
    pub command_seq: u32,
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub core_dumped: bool,
    pub signal_message: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

pub struct ChannelShared {
    pub seq: u32,
    pub client_id: ChannelId,
    pub opened: Instant,
    replies: Mutex<VecDeque<oneshot::Sender<bool>>>,
    pub state: Mutex<ChannelState>,
    pub client_closed: AtomicBool,
}

impl ChannelShared {
    pub fn new(seq: u32, client_id: ChannelId) -> ChannelShared {
        ChannelShared {
            seq,
            client_id,
            opened: Instant::now(),
            replies: Mutex::new(VecDeque::new()),
            state: Mutex::new(ChannelState::default()),
            client_closed: AtomicBool::new(false),
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter for the target's reply to the request about to be sent.
    pub fn expect_reply(&self) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(tx);
        rx
    }

    fn reply(&self, ok: bool) {
        if let Some(tx) = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        {
            let _ = tx.send(ok);
        }
    }

    fn fail_pending(&self) {
        for tx in self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = tx.send(false);
        }
    }

    /// Client -> target bytes: counters, recording, typed lines, SFTP operations. `Err`: the recording is
    /// required and failed; the channel must end.
    pub fn on_client_data(&self, data: &[u8], session: &SessionState) -> Result<(), String> {
        let mut events = Vec::new();
        let result = {
            let mut st = self.state();
            st.bytes_in += data.len() as u64;
            let recipient = session.ctx.recipient.as_ref();
            if let Some(input) = st.input.as_mut() {
                let mut lines = Vec::new();
                input.push(data, |l| lines.push(CommandText::new(l, recipient)));
                for command in lines {
                    st.command_seq += 1;
                    events.push(SshEvent::Command(Command {
                        seq: st.command_seq,
                        source: CommandSource::InputLine,
                        confidence: Confidence::Heuristic,
                        command,
                    }));
                }
            }
            if let Some(sftp) = st.sftp.as_mut() {
                let ops = sftp.push(data);
                for op in ops {
                    st.command_seq += 1;
                    let seq = st.command_seq;
                    events.push(SshEvent::Command(Command {
                        seq,
                        source: CommandSource::SftpOp,
                        confidence: Confidence::Exact,
                        command: CommandText::new(op.describe().as_bytes(), recipient),
                    }));
                }
            }
            // PTY input is recorded only with capture_input (it is what `input` tracks).
            let record_input = st.pty.is_none() || st.input.is_some();
            let required = st.recording_required;
            match st.recorder.as_mut() {
                Some(r) if record_input => match r.client(data) {
                    Err(e) if required => Err(e),
                    _ => Ok(()),
                },
                _ => Ok(()),
            }
        };
        for e in events {
            session.emit(Some(self.seq), e);
        }
        result
    }

    /// Target -> client bytes.
    fn on_origin(&self, code: u32, data: &[u8]) -> Result<(), String> {
        let mut st = self.state();
        st.bytes_out += data.len() as u64;
        let required = st.recording_required;
        match st.recorder.as_mut() {
            Some(r) => match r.origin(code, data) {
                Err(e) if required => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Finishes the recording (on the blocking pool: the file is synced, a sealed one assembled) and builds the
    /// close record.
    pub async fn close_record(&self, error: Option<String>) -> ChannelClose {
        let (mut close, recorder, exit) = {
            let mut st = self.state();
            let exit = ExitInfo {
                timestamp: (super::unix_ms() / 1000) as u64,
                status: st.exit_status,
                signal: st.exit_signal.clone(),
                core_dumped: st.core_dumped,
                error_msg: error.clone(),
            };
            let close = ChannelClose {
                duration_ms: self.opened.elapsed().as_millis() as i64,
                exit_status: st.exit_status,
                exit_signal: st.exit_signal.clone(),
                core_dumped: st.core_dumped,
                error,
                bytes_in: st.bytes_in,
                bytes_out: st.bytes_out,
                recording: None,
            };
            (close, st.recorder.take(), exit)
        };
        if let Some(r) = recorder {
            let path = r.rel_path().to_owned();
            let (pty, format) = (r.is_pty(), r.format());
            close.recording = Some(
                tokio::task::spawn_blocking(move || r.finish(Some(exit)))
                    .await
                    .unwrap_or_else(|e| RecordingInfo {
                        path,
                        format,
                        pty,
                        sha256: None,
                        size: 0,
                        complete: false,
                        error: Some(format!("finishing the recording failed: {e}")),
                    }),
            );
        }
        close
    }
}

/// Relays one target channel to the client until either side closes it, then records the close. Under
/// `recording = "required"` the program's exit status (or signal) reaches the client only once the close record
/// (which holds the recording's hash) is durable; otherwise the client gets exit status 254 and a message.
pub async fn pump(
    mut read: ChannelReadHalf,
    handle: Handle,
    shared: Arc<ChannelShared>,
    session: Arc<SessionState>,
    _alive: mpsc::Sender<()>,
) {
    let id = shared.client_id;
    let required = session.ctx.settings.recording == Recording::Required;
    let mut error = None;
    // Exit status/signal held back until the close record is durable (required only).
    let mut withheld = Vec::new();
    let mut eof_sent = false;
    loop {
        let Some(msg) = read.wait().await else {
            if !shared.client_closed.load(Ordering::Relaxed) {
                error = Some("connection to the target was lost".to_string());
            }
            break;
        };
        match msg {
            ChannelMsg::Data { data } => {
                session.add_t2c(data.len());
                if let Err(e) = shared.on_origin(0, &data) {
                    error = Some(e);
                    break;
                }
                if handle.data(id, data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::ExtendedData { ext, data } => {
                session.add_t2c(data.len());
                if let Err(e) = shared.on_origin(ext, &data) {
                    error = Some(e);
                    break;
                }
                if handle.extended_data(id, ext, data).await.is_err() {
                    break;
                }
            }
            ChannelMsg::Success => shared.reply(true),
            ChannelMsg::Failure => shared.reply(false),
            ChannelMsg::ExitStatus { exit_status } => {
                shared.state().exit_status = Some(exit_status);
                let msg = ChannelMsg::ExitStatus { exit_status };
                if required {
                    withheld.push(msg);
                } else {
                    relay_exit(&handle, id, msg).await;
                }
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                {
                    let mut st = shared.state();
                    st.exit_signal = Some(signal_name_str(&signal_name));
                    st.core_dumped = core_dumped;
                    st.signal_message = Some(error_message.clone());
                }
                let msg = ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                };
                if required {
                    withheld.push(msg);
                } else {
                    relay_exit(&handle, id, msg).await;
                }
            }
            // Under required the end of output waits with the exit status (a message after EOF would be a
            // protocol error to OpenSSH).
            ChannelMsg::Eof if !required => {
                eof_sent = true;
                let _ = handle.eof(id).await;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    shared.fail_pending();
    let close = shared.close_record(error.clone()).await;
    let durable = session
        .emit_required(Some(shared.seq), SshEvent::ChannelClose(close))
        .await;
    if shared.client_closed.load(Ordering::Relaxed) {
        return;
    }
    // Tell the user why their program ended (the recording was required and failed, the target went away, or
    // its end could not be recorded) before closing their channel.
    let why = match (error, durable) {
        (Some(e), _) => Some(e),
        (None, Err(e)) => {
            tracing::warn!(session = %session.id, error = %e, "SSH channel close not recorded (recording required)");
            Some(format!(
                "the audit log could not record the end of this program ({e}); its exit status is withheld"
            ))
        }
        (None, Ok(())) => None,
    };
    match why {
        Some(why) => {
            let msg = format!(
                "\r\n{}: {why}; the session is terminated\r\n",
                super::GATEWAY_NAME
            );
            if !eof_sent {
                let _ = handle.extended_data(id, 1, msg.into_bytes()).await;
            }
            if required || shared.state().exit_status.is_none() {
                let _ = handle.exit_status_request(id, GATEWAY_EXIT_STATUS).await;
            }
        }
        None => {
            for msg in withheld {
                relay_exit(&handle, id, msg).await;
            }
        }
    }
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

/// Passes the target's exit status or signal on to the client.
async fn relay_exit(handle: &Handle, id: ChannelId, msg: ChannelMsg) {
    let _ = match msg {
        ChannelMsg::ExitStatus { exit_status } => handle.exit_status_request(id, exit_status).await,
        ChannelMsg::ExitSignal {
            signal_name,
            core_dumped,
            error_message,
            lang_tag,
        } => {
            handle
                .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                .await
        }
        _ => Ok(()),
    };
}

/// The SSH name of a signal (`TERM`, `INT`, or a custom one as sent).
pub fn signal_name_str(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(s) => s,
    }
    .to_string()
}
