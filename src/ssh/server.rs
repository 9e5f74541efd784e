//! The client-facing side: one [`ConnHandler`] per intercepted connection (russh server `Handler`), the login
//! grace timer and pre-auth limits ([`run`]), and the session's audit records.
//!
//! Callbacks run on the connection's event loop: a callback that waits (for the target's window, or its reply
//! to a request) holds up that connection's other channels too (design note G3; OpenSSH behaves alike).
//! The `Channel` russh hands to `channel_open_*` is dropped at once: events are taken from the callbacks only
//! (G1), replies to requests are answered from inside the callback after the target answered (G2).
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::keys::ssh_key::HashAlg;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{
    Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf, Disconnect, MethodKind, MethodSet,
    Pty, Sig, SshId,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::bridge::{self, ChannelShared, GATEWAY_EXIT_STATUS};
use super::input_line::LineAssembler;
use super::recorder::ChannelRecorder;
use super::sftp::SftpParser;
use super::trust::TenantTrust;
use super::upstream::{self, Upstream};
use super::{unix_ms, SshContext, GATEWAY_NAME};
use crate::audit::capture::PtyInfo;
use crate::audit::ssh_records::{
    ChannelOpen, Command, CommandText, EnvVar, PtyRequest, Secret, SessionEnd, SessionKeys,
    SessionStart, SshEvent, SshRecord, Tcpip,
};
use crate::config::{Recording, SshAuth};

/// What the session's records share, and what [`run`] reads at the end.
pub struct SessionState {
    pub ctx: Arc<SshContext>,
    pub id: String,
    keys: Mutex<SessionKeys>,
    started: Instant,
    started_ms: i64,
    authed: AtomicBool,
    bytes_c2t: AtomicU64,
    bytes_t2c: AtomicU64,
    channels: AtomicU32,
    end: Mutex<Option<(String, Option<String>)>>,
}

impl SessionState {
    fn new(ctx: Arc<SshContext>) -> SessionState {
        let id = super::new_session_id();
        let keys = SessionKeys {
            tenant: ctx.tenant.to_string(),
            session_id: id.clone(),
            device: ctx.device.to_string(),
            user: ctx.user.to_string(),
            target: ctx.dst.to_string(),
            login: String::new(),
            cert_serial: None,
            rule: ctx.rule.to_string(),
        };
        SessionState {
            ctx,
            id,
            keys: Mutex::new(keys),
            started: Instant::now(),
            started_ms: unix_ms(),
            authed: AtomicBool::new(false),
            bytes_c2t: AtomicU64::new(0),
            bytes_t2c: AtomicU64::new(0),
            channels: AtomicU32::new(0),
            end: Mutex::new(None),
        }
    }

    fn record(&self, channel_seq: Option<u32>, event: SshEvent) -> SshRecord {
        SshRecord {
            at_ms: unix_ms(),
            keys: self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            channel_seq,
            event,
        }
    }

    pub fn emit(&self, channel_seq: Option<u32>, event: SshEvent) {
        self.ctx
            .services
            .audit()
            .emit(self.record(channel_seq, event));
    }

    /// Under `recording = "required"` waits until the record is durable; `Err` says why it is not.
    async fn emit_required(&self, channel_seq: Option<u32>, event: SshEvent) -> Result<(), String> {
        if self.ctx.settings.recording != Recording::Required {
            self.emit(channel_seq, event);
            return Ok(());
        }
        self.ctx
            .services
            .audit()
            .emit_durable(self.record(channel_seq, event))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn add_t2c(&self, n: usize) {
        self.bytes_t2c.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn set_end(&self, reason: &str, error: Option<String>) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *end = Some((reason.to_owned(), error));
        }
    }
}

/// Serves one intercepted connection until it ends (see [`super::intercept`]).
pub async fn run(client: TcpStream, upstream: TcpStream, ctx: Arc<SshContext>) {
    let services = ctx.services.clone();
    let limits = services.limits().clone();
    // A burst waits for a pre-auth slot (within the grace period) rather than failing.
    let Some(preauth) = super::wait_preauth(&services, ctx.device.as_str()).await else {
        tracing::debug!(device = %ctx.device, "too many unauthenticated SSH connections; closing");
        return;
    };
    let trust = match services.tenant_trust(ctx.tenant.as_str()) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(tenant = %ctx.tenant, error = %e, "cannot inspect SSH");
            return;
        }
    };
    let config = match server_config(&ctx, &trust) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(tenant = %ctx.tenant, error = %e, "cannot build the SSH server configuration");
            return;
        }
    };
    let session = Arc::new(SessionState::new(ctx.clone()));
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let handler = ConnHandler {
        ctx: ctx.clone(),
        session: session.clone(),
        trust,
        upstream_stream: Some(upstream),
        upstream: None,
        failure: None,
        preauth: Some(preauth),
        channels: HashMap::new(),
        next_seq: 0,
        alive: alive_tx,
        client_key_fp: None,
        auth_method: String::new(),
        client_version: String::new(),
    };
    let _ = client.set_nodelay(true);
    // russh serves the connection from a task of its own that an unauthenticated client can keep in key
    // exchange (where it does not look at our disconnect): a duplicate of the socket lets us shut it down.
    let killer = client
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .map(std::net::TcpStream::from);
    let grace = tokio::time::sleep(limits.login_grace);
    tokio::pin!(grace);
    let running = tokio::select! {
        r = server::run_stream(config, client, handler) => r,
        _ = &mut grace => {
            session.set_end("login_timeout", None);
            Err(russh::Error::ConnectionTimeout)
        }
    };
    match running {
        Ok(running) => {
            let handle = running.handle();
            tokio::pin!(running);
            let result = tokio::select! {
                r = &mut running => Some(r),
                _ = &mut grace, if !session.authed.load(Ordering::Relaxed) => None,
            };
            let result = match result {
                Some(r) => r,
                None if session.authed.load(Ordering::Relaxed) => running.await,
                None => {
                    session.set_end("login_timeout", None);
                    let bye = handle.disconnect(
                        Disconnect::ByApplication,
                        format!("{GATEWAY_NAME}: login grace time exceeded"),
                        "en".into(),
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
                    match tokio::time::timeout(Duration::from_secs(1), &mut running).await {
                        Ok(r) => r,
                        Err(_) => {
                            if let Some(k) = &killer {
                                let _ = k.shutdown(std::net::Shutdown::Both);
                            }
                            tokio::time::timeout(Duration::from_secs(5), &mut running)
                                .await
                                .unwrap_or(Ok(()))
                        }
                    }
                }
            };
            match result {
                Ok(()) => session.set_end("client_closed", None),
                Err(e) => session.set_end("error", Some(e.to_string())),
            }
        }
        Err(e) => session.set_end("error", Some(e.to_string())),
    }
    // The handler (and with it the target connection) is gone; wait for the channel pumps to record their close.
    drop(tokio::time::timeout(Duration::from_secs(10), alive_rx.recv()).await);
    let (reason, error) = session
        .end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or(("client_closed".into(), None));
    session.emit(
        None,
        SshEvent::SessionEnd(SessionEnd {
            started_ms: session.started_ms,
            duration_ms: session.started.elapsed().as_millis() as i64,
            reason,
            error,
            bytes_client_to_target: session.bytes_c2t.load(Ordering::Relaxed),
            bytes_target_to_client: session.bytes_t2c.load(Ordering::Relaxed),
            channels: session.channels.load(Ordering::Relaxed),
        }),
    );
}

fn server_config(ctx: &SshContext, trust: &TenantTrust) -> Result<Arc<server::Config>, String> {
    let cert = trust
        .host_cert(&ctx.dst.ip().to_string())
        .map_err(|e| e.to_string())?;
    let limits = ctx.services.limits();
    let methods = match ctx.settings.auth {
        SshAuth::None => MethodSet::from(&[MethodKind::None, MethodKind::PublicKey][..]),
        SshAuth::Publickey => MethodSet::from(&[MethodKind::PublicKey][..]),
    };
    Ok(Arc::new(server::Config {
        server_id: SshId::Standard("SSH-2.0-rampart".into()),
        methods,
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![trust.host_key().clone()],
        certificates: vec![cert],
        inactivity_timeout: None,
        keepalive_interval: Some(limits.keepalive),
        keepalive_max: 3,
        nodelay: true,
        max_auth_attempts: 6,
        ..Default::default()
    }))
}

struct Bridge {
    up: ChannelWriteHalf<russh::client::Msg>,
    shared: Arc<ChannelShared>,
}

pub struct ConnHandler {
    ctx: Arc<SshContext>,
    session: Arc<SessionState>,
    trust: Arc<TenantTrust>,
    upstream_stream: Option<TcpStream>,
    upstream: Option<Upstream>,
    /// Why the session cannot go on (told to the client right after authentication, G6).
    failure: Option<(String, &'static str)>,
    preauth: Option<super::PreauthGuard>,
    channels: HashMap<ChannelId, Bridge>,
    next_seq: u32,
    alive: mpsc::Sender<()>,
    client_key_fp: Option<String>,
    auth_method: String,
    client_version: String,
}

impl Drop for ConnHandler {
    /// The client's connection is gone: end the target connection too. russh's client session outlives its
    /// dropped `Handle` while the target keeps a channel open (a command still running), which would keep the
    /// channel's pump, and the session's end record, waiting.
    fn drop(&mut self) {
        if let Some(up) = self.upstream.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let bye = up.handle.disconnect(
                        Disconnect::ByApplication,
                        "client disconnected",
                        "en",
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(5), bye).await;
                });
            }
        }
    }
}

/// A login name as sshd would accept it (no control characters, no option-like names).
fn valid_login(login: &str) -> bool {
    !login.is_empty()
        && login.len() <= 64
        && !login.starts_with('-')
        && login
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'$'))
}

impl ConnHandler {
    /// First successful client authentication: check the recording store, log in to the target. Always
    /// accepts; a failure is told to the client in `auth_succeeded`.
    async fn login(&mut self, login: &str, method: &str) -> Auth {
        if self.upstream.is_some() || self.failure.is_some() {
            return Auth::Accept;
        }
        self.auth_method = method.to_owned();
        {
            let mut k = self.session.keys.lock().unwrap_or_else(|p| p.into_inner());
            k.login = login.to_owned();
        }
        if !valid_login(login) {
            self.failure = Some((format!("invalid login name {login:?}"), "policy"));
            return Auth::Accept;
        }
        if self.ctx.settings.recording == Recording::Required {
            if let Err(e) = self.recording_store_ready() {
                self.failure = Some((
                    format!(
                        "session refused: recording is required but the recording store is unavailable ({e})"
                    ),
                    "policy",
                ));
                return Auth::Accept;
            }
        }
        let Some(stream) = self.upstream_stream.take() else {
            self.failure = Some(("internal error: no target connection".into(), "error"));
            return Auth::Accept;
        };
        let key_id = format!(
            "session={} user={} device={} tenant={}",
            self.session.id, self.ctx.user, self.ctx.device, self.ctx.tenant
        );
        let limits = self.ctx.services.limits().clone();
        let connect = upstream::connect(
            stream,
            self.trust.clone(),
            self.ctx.dst,
            login,
            &key_id,
            self.ctx.settings.allow_forwarding,
            limits.keepalive,
        );
        match tokio::time::timeout(limits.upstream_timeout, connect).await {
            Ok(Ok((up, pinned))) => {
                self.session
                    .keys
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .cert_serial = Some(up.cert.serial);
                if let Some(ev) = pinned {
                    self.session.emit(None, ev);
                }
                self.upstream = Some(up);
            }
            Ok(Err(e)) => {
                if let Some(ev) = e.host_key_event {
                    self.session.emit(None, ev);
                }
                self.failure = Some((e.message, "upstream_failed"));
            }
            Err(_) => {
                self.failure = Some((
                    format!(
                        "cannot open session to target {}: timed out after {:?}",
                        self.ctx.dst, limits.upstream_timeout
                    ),
                    "upstream_failed",
                ))
            }
        }
        Auth::Accept
    }

    fn recording_store_ready(&self) -> Result<(), String> {
        if !self.ctx.services.audit().healthy() {
            return Err("the audit log is failing".into());
        }
        let dir = self.session_dir();
        std::fs::create_dir_all(self.ctx.services.state_dir().join(&dir))
            .map_err(|e| format!("{}: {e}", dir))
    }

    /// Recordings of this session, relative to `state_dir`.
    fn session_dir(&self) -> String {
        format!("recordings/{}/{}", self.ctx.tenant, self.session.id)
    }

    fn start_event(&self, decision: String) -> SessionStart {
        let up = self.upstream.as_ref();
        SessionStart {
            client_addr: self.ctx.src.to_string(),
            client_version: self.client_version.clone(),
            auth_method: self.auth_method.clone(),
            client_key_fp: self.client_key_fp.clone(),
            target_host_key_fp: up.map(|u| u.host_key_fp.clone()),
            target_host_key_trust: up.map(|u| u.host_key_trust.as_str().to_owned()),
            cert: up.map(|u| u.cert.clone()),
            recording: format!("{:?}", self.ctx.settings.recording).to_lowercase(),
            capture_input: self.ctx.settings.capture_input,
            allow_forwarding: self.ctx.settings.allow_forwarding,
            decision,
        }
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
    async fn ask(&self, channel: ChannelId, req: Request<'_>) -> bool {
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
    async fn start_program(
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
            kind: "session".into(),
            program: program.into(),
            subsystem: subsystem.map(str::to_owned),
            pty: pty_request,
            env,
            command: command.map(|c| CommandText::new(c, recipient.as_ref())),
            tcpip: None,
            decision: "allowed".into(),
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
            ) {
                Ok(r) => recorder = Some(r),
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
                source: "exec".into(),
                confidence: "exact".into(),
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
        open.decision = "denied".into();
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

enum Request<'a> {
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

impl server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if self.ctx.settings.auth != SshAuth::None {
            return Ok(Auth::reject());
        }
        Ok(self.login(user, "none").await)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // The key proves nothing about who the user is beyond the WireGuard identity; it is recorded.
        self.client_key_fp = Some(key.public_key.fingerprint(HashAlg::Sha256).to_string());
        Ok(self.login(user, "publickey").await)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.session.authed.store(true, Ordering::Relaxed);
        self.preauth = None;
        self.client_version = String::from_utf8_lossy(session.remote_sshid())
            .trim()
            .chars()
            .take(255)
            .collect();
        if let Some((msg, reason)) = self.failure.clone() {
            tracing::info!(session = %self.session.id, tenant = %self.ctx.tenant, device = %self.ctx.device,
                reason, "SSH session refused");
            tracing::debug!(session = %self.session.id, error = %msg, "SSH session refused");
            let start = self.start_event(format!("refused: {msg}"));
            self.session.emit(None, SshEvent::SessionStart(start));
            self.session.set_end(reason, Some(msg.clone()));
            session.disconnect(
                Disconnect::ByApplication,
                &format!("{GATEWAY_NAME}: {msg}"),
                "en",
            )?;
            return Ok(());
        }
        let start = self.start_event("allowed".into());
        if let Err(e) = self
            .session
            .emit_required(None, SshEvent::SessionStart(start))
            .await
        {
            let msg = format!(
                "session refused: recording is required but the audit log is unavailable ({e})"
            );
            self.session.set_end("policy", Some(msg.clone()));
            self.upstream = None;
            session.disconnect(
                Disconnect::ByApplication,
                &format!("{GATEWAY_NAME}: {msg}"),
                "en",
            )?;
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
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

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        orig_addr: &str,
        orig_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        drop(channel);
        let Some(up) = self.upstream.as_ref() else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let tcpip = Tcpip {
            host: host.into(),
            port,
            orig_addr: orig_addr.into(),
            orig_port,
        };
        let mut open = ChannelOpen {
            kind: "direct-tcpip".into(),
            program: "direct-tcpip".into(),
            subsystem: None,
            pty: None,
            env: Vec::new(),
            command: None,
            tcpip: Some(tcpip),
            decision: "allowed".into(),
            deny_reason: None,
        };
        if !self.ctx.settings.allow_forwarding
            || self.channels.len() >= self.ctx.services.limits().max_channels
        {
            open.decision = "denied".into();
            open.deny_reason = Some(if self.ctx.settings.allow_forwarding {
                "too many channels".into()
            } else {
                "port forwarding is not allowed by the rule (allow_forwarding)".into()
            });
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
                open.decision = "denied".into();
                open.deny_reason = Some(format!("target refused: {e}"));
                self.session.emit(None, SshEvent::ChannelOpen(open));
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
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

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
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

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_program(channel, "shell", None, None, session)
            .await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_program(channel, "exec", Some(data), None, session)
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start_program(channel, "subsystem", None, Some(name), session)
            .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        pw: u32,
        ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.channels.get(&channel) {
            if let Some(r) = b.shared.state().recorder.as_mut() {
                let _ = r.resize(cols, rows);
            }
            let _ = b.up.window_change(cols, rows, pw, ph).await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.channels.get(&channel) {
            let _ = b.up.signal(signal).await;
        }
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
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

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        code: u32,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.channels.get(&channel) {
            self.session
                .bytes_c2t
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let _ = b.up.extended_data_bytes(code, data.to_vec()).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.channels.get(&channel) {
            let _ = b.up.eof().await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.channels.remove(&channel) {
            b.shared.client_closed.store(true, Ordering::Relaxed);
            let _ = b.up.close().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn login_names() {
        for ok in [
            "alice",
            "root",
            "svc-deploy",
            "a.b_c",
            "DOMAIN$",
            "alice@corp",
        ] {
            assert!(super::valid_login(ok), "{ok}");
        }
        for bad in ["", "-oProxyCommand", "a b", "a\nb", &"x".repeat(65)] {
            assert!(!super::valid_login(bad), "{bad:?}");
        }
    }
}
