//! The channels of an intercepted connection: each client channel is opened on the target first and accepted
//! only then; a [`ChannelShared`] plus a pump task (`bridge::pump`) relay it. Requests that need an answer
//! (pty, shell, exec, subsystem) go to the target with want_reply and are answered to the client from the
//! target's reply (design note G2); [`ConnHandler::start_program`] starts the recording and emits
//! `channel.open` and the exec `command` record first.
#![deny(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use russh::server::{ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure, Pty};

use super::bridge::{self, ChannelShared, GATEWAY_EXIT_STATUS};
use super::forward::{self, Forward};
use super::handler::{Bridge, ConnHandler};
use super::input_line::LineAssembler;
use super::recorder::ChannelRecorder;
use super::sftp::SftpParser;
use super::{unix_ms, GATEWAY_NAME};
use crate::audit::capture::PtyInfo;
use crate::audit::ssh_records::{
    ChannelDecision, ChannelKind, ChannelOpen, Command, CommandSource, CommandText, Confidence,
    EnvVar, PtyRequest, Secret, SshEvent, Tcpip,
};
use crate::config::Recording;
use crate::handoff::Identity;

impl ConnHandler {
    /// A session channel: opened on the target first, then accepted (fail-closed).
    pub(super) async fn open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let id = channel.id();
        drop(channel);
        let Some(up) = self.upstream.as_ref() else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        if self.channels.len() >= self.ctx.services.limits().max_channels {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        match up.handle.channel_open_session().await {
            Ok(upch) => {
                reply.accept().await;
                let shared = self.new_channel(id);
                self.spawn_pump(id, upch, shared, session);
            }
            Err(e) => {
                tracing::debug!(session = %self.session.id, error = %e, "target refused a session channel");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    /// `ssh -L` / `-W`: refused unless the rule allows forwarding and the tenant's flow policy lets the device
    /// reach the destination (`forward::decide`); opened on the target first.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        orig_addr: &str,
        orig_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let id = channel.id();
        drop(channel);
        let Some(up) = self.upstream.as_ref() else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let mut tcpip = Tcpip {
            host: host.into(),
            port,
            orig_addr: orig_addr.into(),
            orig_port,
            rule: None,
        };
        let refused = if !self.ctx.settings.allow_forwarding {
            Some("port forwarding is not allowed by the rule (allow_forwarding)".to_string())
        } else if self.channels.len() >= self.ctx.services.limits().max_channels {
            Some("too many channels".into())
        } else {
            let who = Identity {
                tenant: self.ctx.tenant.clone(),
                device: self.ctx.device.clone(),
                user: self.ctx.user.clone(),
                groups: self.ctx.groups.clone(),
            };
            match forward::decide(
                &self.ctx.config.current(),
                &who,
                *self.ctx.dst.ip(),
                host,
                port,
            ) {
                Forward::Allowed { rule } => {
                    tcpip.rule = Some(rule.to_string());
                    None
                }
                Forward::Denied { rule, reason } => {
                    tcpip.rule = rule.map(|r| r.to_string());
                    Some(format!("forwarding refused: {reason}"))
                }
            }
        };
        let mut open = ChannelOpen {
            kind: ChannelKind::DirectTcpip,
            program: "direct-tcpip".into(),
            subsystem: None,
            pty: None,
            env: Vec::new(),
            command: None,
            tcpip: Some(tcpip),
            decision: ChannelDecision::Allowed,
            deny_reason: None,
        };
        if let Some(why) = refused {
            tracing::debug!(session = %self.session.id, reason = %why, "SSH forwarding refused");
            open.decision = ChannelDecision::Denied;
            open.deny_reason = Some(why);
            self.session.emit(None, SshEvent::ChannelOpen(open));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        match up
            .handle
            .channel_open_direct_tcpip(host, port, orig_addr, orig_port)
            .await
        {
            Ok(upch) => {
                reply.accept().await;
                let shared = self.new_channel(id);
                {
                    let mut st = shared.state();
                    st.program = Some("direct-tcpip".into());
                }
                self.session
                    .emit(Some(shared.seq), SshEvent::ChannelOpen(open));
                self.spawn_pump(id, upch, shared, session);
            }
            Err(e) => {
                open.decision = ChannelDecision::Denied;
                open.deny_reason = Some(format!("target refused: {e}"));
                self.session.emit(None, SshEvent::ChannelOpen(open));
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    /// Remembers the terminal for the recording, then asks the target.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn pty(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if let Some(b) = self.channels.get(&channel) {
            let mut st = b.shared.state();
            st.pty = Some(PtyInfo {
                term: Some(term.to_owned()),
                width: cols,
                height: rows,
                modes: modes.iter().map(|(m, v)| (format!("{m:?}"), *v)).collect(),
            });
            st.pty_request = Some(PtyRequest {
                term: term.to_owned(),
                cols,
                rows,
            });
        }
        let ok = self
            .ask(
                channel,
                Request::Pty {
                    term,
                    cols,
                    rows,
                    pw,
                    ph,
                    modes,
                },
            )
            .await;
        if ok {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    /// Records the variable (its value sealed to the reviewer key) and passes it on.
    pub(super) async fn env(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if let Some(b) = self.channels.get(&channel) {
            b.shared.state().env.push(EnvVar {
                name: name.to_owned(),
                value: Secret::new(value, self.ctx.recipient.as_ref()),
            });
            let _ = b.up.set_env(false, name, value).await;
        }
        // The target decides (sshd's AcceptEnv); its answer is not waited for, like OpenSSH clients don't.
        session.channel_success(channel)?;
        Ok(())
    }

    /// Client -> target data: recording, typed lines, SFTP operations, then the target channel (whose window
    /// is the backpressure).
    pub(super) async fn client_data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(b) = self.channels.get(&channel) else {
            return Ok(());
        };
        self.session
            .bytes_c2t
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if let Err(e) = b.shared.on_client_data(data, &self.session) {
            let msg = format!("\r\n{GATEWAY_NAME}: {e}; the session is terminated\r\n");
            session.extended_data(channel, 1, msg.into_bytes())?;
            let _ = b.up.close().await;
            return Ok(());
        }
        let _ = b.up.data_bytes(data.to_vec()).await;
        Ok(())
    }

    fn new_channel(&mut self, id: ChannelId) -> Arc<ChannelShared> {
        self.next_seq += 1;
        self.session.channels.fetch_add(1, Ordering::Relaxed);
        Arc::new(ChannelShared::new(self.next_seq, id))
    }

    fn spawn_pump(
        &mut self,
        id: ChannelId,
        channel: russh::Channel<russh::client::Msg>,
        shared: Arc<ChannelShared>,
        session: &Session,
    ) {
        let (read, write) = channel.split();
        tokio::spawn(bridge::pump(
            read,
            session.handle(),
            shared.clone(),
            self.session.clone(),
            self.alive.clone(),
        ));
        self.channels.insert(id, Bridge { up: write, shared });
    }

    /// Sends a request to the target with want_reply and waits for its answer (G2).
    pub(super) async fn ask(&self, channel: ChannelId, req: Request<'_>) -> bool {
        let Some(b) = self.channels.get(&channel) else {
            return false;
        };
        let reply = b.shared.expect_reply();
        let sent = match req {
            Request::Pty {
                term,
                cols,
                rows,
                pw,
                ph,
                modes,
            } => {
                b.up.request_pty(true, term, cols, rows, pw, ph, modes)
                    .await
            }
            Request::Shell => b.up.request_shell(true).await,
            Request::Exec(cmd) => b.up.exec(true, cmd.to_vec()).await,
            Request::Subsystem(name) => b.up.request_subsystem(true, name).await,
        };
        if sent.is_err() {
            return false;
        }
        let timeout = self.ctx.services.limits().reply_timeout;
        matches!(tokio::time::timeout(timeout, reply).await, Ok(Ok(true)))
    }

    /// Starts a program (shell, exec, subsystem) on a session channel: recording, records, then the request.
    pub(super) async fn start_program(
        &mut self,
        channel: ChannelId,
        program: &str,
        command: Option<&[u8]>,
        subsystem: Option<&str>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(b) = self.channels.get(&channel) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let shared = b.shared.clone();
        let recipient = self.ctx.recipient;
        let (pty, pty_request, env) = {
            let st = shared.state();
            (st.pty.clone(), st.pty_request.clone(), st.env.clone())
        };
        let mut open = ChannelOpen {
            kind: ChannelKind::Session,
            program: program.into(),
            subsystem: subsystem.map(str::to_owned),
            pty: pty_request,
            env,
            command: command.map(|c| CommandText::new(c, recipient.as_ref())),
            tcpip: None,
            decision: ChannelDecision::Allowed,
            deny_reason: None,
        };
        let mode = self.ctx.settings.recording;
        let mut recorder = None;
        if mode != Recording::Off {
            let rel = format!("{}/{}", self.session_dir(), shared.seq);
            match ChannelRecorder::start(
                self.ctx.services.state_dir(),
                &rel,
                recipient.as_ref(),
                (unix_ms() / 1000) as u64,
                pty.clone(),
                self.session.recording_budget.clone(),
            ) {
                Ok(mut r) => {
                    r.tap(self.session.live.tap(), shared.seq);
                    recorder = Some(r)
                }
                Err(e) if mode == Recording::Required => {
                    return self.refuse_program(channel, open, e, session).await;
                }
                Err(e) => {
                    tracing::warn!(session = %self.session.id, error = %e, "SSH recording unavailable (best effort)")
                }
            }
        }
        if let Err(e) = self
            .session
            .emit_required(Some(shared.seq), SshEvent::ChannelOpen(open.clone()))
            .await
        {
            if let Some(r) = recorder {
                r.finish(None);
            }
            return self
                .refuse_program(
                    channel,
                    open,
                    format!("audit log unavailable: {e}"),
                    session,
                )
                .await;
        }
        if let (Some(_), Some(text)) = (command, open.command.take()) {
            let seq = {
                let mut st = shared.state();
                st.command_seq += 1;
                st.command_seq
            };
            let ev = SshEvent::Command(Command {
                seq,
                source: CommandSource::Exec,
                confidence: Confidence::Exact,
                command: text,
            });
            if let Err(e) = self.session.emit_required(Some(shared.seq), ev).await {
                if let Some(r) = recorder {
                    r.finish(None);
                }
                return self
                    .refuse_program(
                        channel,
                        open,
                        format!("audit log unavailable: {e}"),
                        session,
                    )
                    .await;
            }
        }
        {
            let mut st = shared.state();
            st.program = Some(program.into());
            st.recorder = recorder;
            st.recording_required = mode == Recording::Required;
            if pty.is_some() && self.ctx.settings.capture_input {
                st.input = Some(LineAssembler::default());
            }
            if subsystem == Some("sftp") {
                st.sftp = Some(SftpParser::default());
            }
        }
        let req = match (command, subsystem) {
            (Some(c), _) => Request::Exec(c),
            (None, Some(s)) => Request::Subsystem(s),
            (None, None) => Request::Shell,
        };
        if self.ask(channel, req).await {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    /// Refuses a program the gateway cannot record (or log) under `recording = "required"`: a one-line message
    /// on stderr, exit status 254, channel closed. The request itself is answered with success so that the
    /// client shows the message and the status, rather than OpenSSH's bare "exec request failed".
    async fn refuse_program(
        &mut self,
        channel: ChannelId,
        mut open: ChannelOpen,
        why: String,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        tracing::warn!(session = %self.session.id, reason = %why, "SSH program refused (recording required)");
        let seq = self.channels.get(&channel).map(|b| b.shared.seq);
        open.decision = ChannelDecision::Denied;
        open.deny_reason = Some(why.clone());
        self.session.emit(seq, SshEvent::ChannelOpen(open));
        let msg = format!(
            "{GATEWAY_NAME}: refused: recording is required for this session but is unavailable ({why})\r\n"
        );
        session.extended_data(channel, 1, msg.into_bytes())?;
        session.channel_success(channel)?;
        session.exit_status_request(channel, GATEWAY_EXIT_STATUS)?;
        session.eof(channel)?;
        session.close(channel)?;
        if let Some(b) = self.channels.get(&channel) {
            b.shared.client_closed.store(true, Ordering::Relaxed);
            let _ = b.up.close().await;
        }
        Ok(())
    }
}

pub(super) enum Request<'a> {
    Pty {
        term: &'a str,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        modes: &'a [(Pty, u32)],
    },
    Shell,
    Exec(&'a [u8]),
    Subsystem(&'a str),
}
