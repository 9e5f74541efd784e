//! The SSH inspector: on a flow upgraded by an `inspect_ssh` rule, the gateway terminates the client's SSH
//! session (russh server) and opens its own to the target (russh client), relaying every channel while it
//! records who ran what, where, as whom.
//!
//! - Identity comes from the WireGuard peer (tenant, device, user in [`SshContext`]), never from the client.
//!   Client authentication on top is per rule (`none` or `publickey`).
//! - Towards the target: an ephemeral key and a user certificate (principal = requested login, minutes of
//!   validity, `key_id` = session, user, device) from the tenant's user CA; the target's host key is pinned on
//!   first use or vouched for by a trusted host CA ([`trust`]).
//! - Towards the client: a host certificate for the destination address from the tenant's host CA, so
//!   `@cert-authority` works.
//! - Records go to the SSH audit log (`audit::ssh_records`) through [`SshServices::audit`]; recordings per
//!   channel ([`recorder`]).
//!
//! Start reading at [`intercept`], then `session::run` (one per connection), `handler::ConnHandler` (its russh
//! callbacks, which hand over to `auth` and `channels`) and `bridge` (one per channel).
//! Never: accept any target host key, take identity from what the client claims, write audit storage other
//! than through the sink, or hold a reviewer's private key.
#![deny(unsafe_code)]

mod auth;
pub mod bridge;
mod channels;
pub mod forward;
mod handler;
pub mod input_line;
pub mod recorder;
pub mod session;
pub mod sftp;
pub mod trust;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::audit::capture::RecipientKey;
use crate::audit::ssh_records::SshAuditSink;
use crate::config::SshRuleSettings;
use crate::handoff::{ConfigHandle, FlowContext, Identity};
use trust::{TenantTrust, TrustError};

/// How the gateway names itself in messages to SSH clients.
pub const GATEWAY_NAME: &str = "rampart gateway";

/// Tunables; the defaults are what production uses.
#[derive(Debug, Clone)]
pub struct SshLimits {
    /// A connection not authenticated by then is closed (OpenSSH's `LoginGraceTime`).
    pub login_grace: Duration,
    /// Unauthenticated connections at once, per device and in total (`MaxStartups`-like); more wait for a
    /// slot within the login grace time.
    pub preauth_per_device: usize,
    pub preauth_total: usize,
    /// Channels open at once on one connection.
    pub max_channels: usize,
    /// Keepalive interval on both legs (3 unanswered ones close the connection); idle shells are never
    /// closed for inactivity.
    pub keepalive: Duration,
    /// Upstream TCP + key exchange + authentication.
    pub upstream_timeout: Duration,
    /// Waiting for the target's reply to a pty, shell, exec or subsystem request.
    pub reply_timeout: Duration,
}

impl Default for SshLimits {
    fn default() -> Self {
        SshLimits {
            login_grace: Duration::from_secs(30),
            preauth_per_device: 16,
            preauth_total: 128,
            max_channels: 16,
            keepalive: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(20),
            reply_timeout: Duration::from_secs(15),
        }
    }
}

/// What every intercepted session shares: where trust material and recordings live, the audit sink, limits.
pub struct SshServices {
    state_dir: PathBuf,
    audit: SshAuditSink,
    limits: SshLimits,
    trust: Mutex<HashMap<String, Arc<TenantTrust>>>,
    preauth: Preauth,
}

impl SshServices {
    pub fn new(state_dir: &Path, audit: SshAuditSink, limits: SshLimits) -> SshServices {
        SshServices {
            state_dir: state_dir.to_path_buf(),
            audit,
            limits,
            trust: Mutex::new(HashMap::new()),
            preauth: Preauth::default(),
        }
    }

    pub fn audit(&self) -> &SshAuditSink {
        &self.audit
    }

    pub fn limits(&self) -> &SshLimits {
        &self.limits
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The tenant's CAs and keys, read again when the files changed since (`rampart ca init`, a target host CA
    /// added, removed or rotated) and retried while missing. Blocking file work: call it off the async runtime
    /// ([`SshServices::tenant_trust_async`]).
    pub fn tenant_trust(&self, tenant: &str) -> Result<Arc<TenantTrust>, TrustError> {
        let stamp = trust::TrustStamp::read(&self.state_dir, tenant);
        if let Some(t) = self
            .trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
        {
            if *t.stamp() == stamp {
                return Ok(t.clone());
            }
        }
        let t = Arc::new(TenantTrust::load(&self.state_dir, tenant)?);
        tracing::debug!(tenant, "SSH trust material (re)loaded");
        self.trust
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_owned(), t.clone());
        Ok(t)
    }

    /// [`SshServices::tenant_trust`] on the blocking pool.
    pub async fn tenant_trust_async(
        self: &Arc<Self>,
        tenant: &str,
    ) -> Result<Arc<TenantTrust>, TrustError> {
        let (services, tenant) = (self.clone(), tenant.to_owned());
        tokio::task::spawn_blocking(move || services.tenant_trust(&tenant))
            .await
            .unwrap_or_else(|e| Err(TrustError::Key(format!("loading trust material: {e}"))))
    }
}

/// Counts unauthenticated connections per device and in total.
#[derive(Default)]
struct Preauth {
    total: AtomicUsize,
    per_device: Mutex<HashMap<String, usize>>,
}

/// Held while a connection is not yet authenticated.
pub struct PreauthGuard {
    services: Arc<SshServices>,
    device: String,
}

impl Drop for PreauthGuard {
    fn drop(&mut self) {
        let p = &self.services.preauth;
        p.total.fetch_sub(1, Ordering::Relaxed);
        let mut m = p.per_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.device) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.device);
            }
        }
    }
}

/// Waits (at most the login grace time) for a pre-auth slot.
async fn wait_preauth(services: &Arc<SshServices>, device: &str) -> Option<PreauthGuard> {
    let deadline = tokio::time::Instant::now() + services.limits.login_grace;
    loop {
        if let Some(g) = try_preauth(services, device) {
            return Some(g);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn try_preauth(services: &Arc<SshServices>, device: &str) -> Option<PreauthGuard> {
    let p = &services.preauth;
    let mut m = p.per_device.lock().unwrap_or_else(|e| e.into_inner());
    let n = m.entry(device.to_owned()).or_insert(0);
    if *n >= services.limits.preauth_per_device
        || p.total.load(Ordering::Relaxed) >= services.limits.preauth_total
    {
        if *n == 0 {
            m.remove(device);
        }
        return None;
    }
    *n += 1;
    p.total.fetch_add(1, Ordering::Relaxed);
    Some(PreauthGuard {
        services: services.clone(),
        device: device.to_owned(),
    })
}

/// Everything the inspector knows about one upgraded flow.
#[derive(Clone)]
pub struct SshContext {
    pub tenant: crate::config::TenantId,
    pub device: crate::config::DeviceName,
    pub user: crate::config::UserName,
    pub groups: Arc<[String]>,
    /// The device's side of the flow.
    pub src: SocketAddrV4,
    /// Where the device was going (the target).
    pub dst: SocketAddrV4,
    pub rule: Arc<str>,
    /// The deciding rule's settings, fixed when the flow started.
    pub settings: SshRuleSettings,
    /// The tenant's reviewer key: recordings and sensitive fields are sealed to it.
    pub recipient: Option<RecipientKey>,
    /// The configuration in force (read again for what may change during a session: registered client keys,
    /// the flow policy forwarded channels are checked against).
    pub config: ConfigHandle,
    pub services: Arc<SshServices>,
}

impl SshContext {
    /// The context of a flow: the identity fixed at flow start, the rule's settings, and the tenant's reviewer
    /// key from the configuration in force.
    pub fn new(
        identity: &Identity,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        rule: Arc<str>,
        settings: SshRuleSettings,
        config: ConfigHandle,
        services: Arc<SshServices>,
    ) -> SshContext {
        let recipient = config
            .current()
            .tenant(identity.tenant.as_str())
            .and_then(|t| t.audit_recipient.as_deref())
            .and_then(|r| RecipientKey::from_base64(r).ok());
        SshContext {
            tenant: identity.tenant.clone(),
            device: identity.device.clone(),
            user: identity.user.clone(),
            groups: identity.groups.clone(),
            src,
            dst,
            rule,
            settings,
            recipient,
            config,
            services,
        }
    }
}

/// Inspects one SSH connection: `client` is the device's stream, `upstream` the connected stream to the target.
/// Returns when the session is over and its records are emitted.
pub async fn intercept(client: TcpStream, upstream: TcpStream, ctx: SshContext) {
    session::run(client, upstream, Arc::new(ctx)).await
}

/// Inspects an upgraded flow of an `inspect_ssh` rule: the context comes from the flow (tenant, device, user,
/// addresses, rule) and the configuration in force (the tenant's reviewer key).
pub async fn intercept_flow(
    client: TcpStream,
    upstream: TcpStream,
    flow: &FlowContext,
    settings: &SshRuleSettings,
    config: &ConfigHandle,
    services: &Arc<SshServices>,
) {
    let ctx = SshContext::new(
        &flow.identity,
        flow.src,
        flow.dst,
        flow.rule.clone(),
        settings.clone(),
        config.clone(),
        services.clone(),
    );
    intercept(client, upstream, ctx).await
}

pub use crate::clock::unix_ms;

/// A new session id: UUIDv7 text (time-ordered).
pub fn new_session_id() -> String {
    crate::clock::uuid_v7()
}

#[cfg(test)]
mod tests {
    #[test]
    fn session_ids_are_uuid_v7_and_ordered() {
        let a = super::new_session_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::new_session_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        assert!(a < b);
    }
}
