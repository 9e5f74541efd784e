//! One intercepted connection from accept to `session.end`: the pre-auth slot, the tenant's trust material, the
//! russh server configuration, the login grace timer ([`run`]), and what the session's records share
//! ([`SessionState`]).
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::server::{self};
use russh::{Disconnect, MethodKind, MethodSet, SshId};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::handler::ConnHandler;
use super::recorder::RecordingBudget;
use super::trust::TenantTrust;
use super::{unix_ms, SshContext, GATEWAY_NAME};
use crate::audit::ssh_records::{
    SessionEnd, SessionEndReason as R, SessionKeys, SessionStart, SshEvent, SshRecord,
};
use crate::config::{Recording, SshAuth};

/// What the session's records share, and what [`run`] reads at the end.
pub struct SessionState {
    pub ctx: Arc<SshContext>,
    pub id: String,
    pub(super) keys: Mutex<SessionKeys>,
    pub(super) started: Instant,
    pub(super) started_ms: i64,
    pub(super) authed: AtomicBool,
    pub(super) bytes_c2t: AtomicU64,
    pub(super) bytes_t2c: AtomicU64,
    pub(super) channels: AtomicU32,
    pub(super) end: Mutex<Option<(R, Option<String>)>>,
    /// Fingerprints of client keys refused under `ssh_auth = "publickey"` (at most a few).
    pub(super) refused_keys: Mutex<Vec<String>>,
    /// What the session's recordings may still take (the rule's caps).
    pub(super) recording_budget: Arc<RecordingBudget>,
    /// The session's entry among the sessions in progress (live view, terminate).
    pub(super) live: super::live::LiveGuard,
}

impl SessionState {
    pub(super) fn new(ctx: Arc<SshContext>) -> SessionState {
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
        let started = Instant::now();
        let recording_budget = Arc::new(RecordingBudget::new(
            ctx.settings.max_recording_bytes,
            started,
            ctx.settings.max_recording_time,
        ));
        let live = ctx
            .services
            .live()
            .register(&id, ctx.tenant.as_str(), ctx.recipient.is_none());
        SessionState {
            ctx,
            id,
            keys: Mutex::new(keys),
            started,
            started_ms: unix_ms(),
            authed: AtomicBool::new(false),
            bytes_c2t: AtomicU64::new(0),
            bytes_t2c: AtomicU64::new(0),
            channels: AtomicU32::new(0),
            end: Mutex::new(None),
            refused_keys: Mutex::new(Vec::new()),
            recording_budget,
            live,
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
    pub(super) async fn emit_required(
        &self,
        channel_seq: Option<u32>,
        event: SshEvent,
    ) -> Result<(), String> {
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

    /// A client that never authenticated because its keys are not registered for the device: the refusal is
    /// recorded as the session's start (naming the keys it offered) and the session ends by policy.
    fn record_refused_keys(&self) {
        if self.authed.load(Ordering::Relaxed) {
            return;
        }
        let refused = self
            .refused_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if refused.is_empty() {
            return;
        }
        let msg = format!(
            "client key {} not registered for device {} (register with `rampart device add --ssh-key` or the \
             device's ssh_keys)",
            refused.join(", "),
            self.ctx.device
        );
        tracing::info!(session = %self.id, tenant = %self.ctx.tenant, device = %self.ctx.device,
            "SSH client key refused (not registered for the device)");
        let settings = &self.ctx.settings;
        self.emit(
            None,
            SshEvent::SessionStart(SessionStart {
                client_addr: self.ctx.src.to_string(),
                client_version: String::new(),
                auth_method: "publickey".into(),
                client_key_fp: refused.first().cloned(),
                target_host_key_fp: None,
                target_host_key_trust: None,
                cert: None,
                recording: settings.recording,
                capture_input: settings.capture_input,
                allow_forwarding: settings.allow_forwarding,
                decision: format!("refused: {msg}"),
            }),
        );
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = Some((R::Policy, Some(msg)));
    }

    pub(super) fn set_end(&self, reason: R, error: Option<String>) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *end = Some((reason, error));
        }
    }
}

/// How the wait for a connection ended.
enum Ended<R> {
    Closed(R),
    Grace,
    Terminated(String),
    /// The gateway is stopping.
    Shutdown,
}

/// Tells the client why the gateway ends its session, then waits up to `wait` for the connection to close; a
/// client that does not close is cut (`killer`: a duplicate of its socket).
async fn disconnect<F>(
    handle: &server::Handle,
    mut running: std::pin::Pin<&mut F>,
    killer: Option<&std::net::TcpStream>,
    why: String,
    wait: Duration,
) -> Result<(), russh::Error>
where
    F: std::future::Future<Output = Result<(), russh::Error>>,
{
    let bye = handle.disconnect(Disconnect::ByApplication, why, "en".into());
    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
    if let Ok(r) = tokio::time::timeout(wait, &mut running).await {
        return r;
    }
    if let Some(k) = killer {
        let _ = k.shutdown(std::net::Shutdown::Both);
    }
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap_or(Ok(()))
}

/// Serves one intercepted connection until it ends (see [`super::intercept`]).
pub async fn run(client: TcpStream, upstream: TcpStream, ctx: Arc<SshContext>) {
    let services = ctx.services.clone();
    let limits = services.limits().clone();
    services.counters.connections.inc();
    // A burst waits for a pre-auth slot (within the grace period) rather than failing.
    let Some(preauth) =
        super::wait_preauth(&services, ctx.tenant.as_str(), ctx.device.as_str()).await
    else {
        services.counters.preauth_timeouts.inc();
        tracing::debug!(device = %ctx.device, "too many unauthenticated SSH connections; closing");
        return;
    };
    let trust = match services.tenant_trust_async(ctx.tenant.as_str()).await {
        Ok(t) => t,
        Err(e) => {
            services.counters.trust_unavailable.inc();
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
            session.set_end(R::LoginTimeout, None);
            Err(russh::Error::ConnectionTimeout)
        }
    };
    match running {
        Ok(running) => {
            let handle = running.handle();
            tokio::pin!(running);
            let terminated = session.live.terminated();
            tokio::pin!(terminated);
            let shutdown = services.shutting_down();
            tokio::pin!(shutdown);
            let result = tokio::select! {
                r = &mut running => Ended::Closed(r),
                _ = &mut grace, if !session.authed.load(Ordering::Relaxed) => Ended::Grace,
                by = &mut terminated => Ended::Terminated(by),
                () = &mut shutdown => Ended::Shutdown,
            };
            let result = match result {
                Ended::Grace if session.authed.load(Ordering::Relaxed) => tokio::select! {
                    r = &mut running => Ended::Closed(r),
                    by = &mut terminated => Ended::Terminated(by),
                    () = &mut shutdown => Ended::Shutdown,
                },
                other => other,
            };
            let (reason, error, why, wait) = match result {
                Ended::Closed(r) => {
                    match r {
                        Ok(()) => session.set_end(R::ClientClosed, None),
                        Err(e) => session.set_end(R::Error, Some(e.to_string())),
                    }
                    (None, None, "", Duration::ZERO)
                }
                Ended::Terminated(by) => {
                    tracing::info!(session = %session.id, tenant = %ctx.tenant, admin = %by, "SSH session terminated by an administrator");
                    (
                        Some(R::Terminated),
                        Some(format!("terminated by {by} in the review UI")),
                        "session terminated by an administrator",
                        Duration::from_secs(2),
                    )
                }
                Ended::Grace => (
                    Some(R::LoginTimeout),
                    None,
                    "login grace time exceeded",
                    Duration::from_secs(1),
                ),
                Ended::Shutdown => {
                    tracing::debug!(session = %session.id, tenant = %ctx.tenant, "gateway stopping: ending the SSH session");
                    (
                        Some(R::Shutdown),
                        None,
                        "the gateway is shutting down",
                        Duration::from_secs(2),
                    )
                }
            };
            if let Some(reason) = reason {
                session.set_end(reason, error);
                let why = format!("{GATEWAY_NAME}: {why}");
                if let Err(e) = disconnect(&handle, running, killer.as_ref(), why, wait).await {
                    session.set_end(R::Error, Some(e.to_string()));
                }
            }
        }
        Err(e) => session.set_end(R::Error, Some(e.to_string())),
    }
    // The client's connection is over: live viewers learn it now, not after the channels' close records.
    session.live.end();
    session.record_refused_keys();
    // The handler (and with it the target connection) is gone; wait for the channel pumps to record their close.
    drop(tokio::time::timeout(Duration::from_secs(10), alive_rx.recv()).await);
    let (reason, error) = session
        .end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or((R::ClientClosed, None));
    // Durable under `required` (the client is gone by now: a failure can only be logged; the writer counts the
    // lost record).
    let end = session.emit_required(
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
    if let Err(e) = end.await {
        tracing::error!(session = %session.id, tenant = %ctx.tenant, error = %e,
            "SSH session end not recorded (recording required)");
    }
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
