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
pub mod live;
pub mod recorder;
pub mod session;
pub mod sftp;
pub mod trust;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

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
    /// Unauthenticated connections at once, per device, per tenant and in total (`MaxStartups`-like); more
    /// wait in order for a slot within the login grace time. A tenant's cap keeps one tenant's devices from
    /// taking every slot.
    pub preauth_per_device: usize,
    pub preauth_per_tenant: usize,
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
            preauth_per_tenant: 64,
            preauth_total: 512,
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
    preauth: Arc<Preauth>,
    live: Arc<live::LiveSessions>,
    counters: SshCounters,
    /// Cancelled when the gateway stops: open sessions then end through their normal path (`session.end`
    /// with reason `shutdown`).
    shutdown: CancellationToken,
}

/// What the SSH inspector counts (`prometheus-client` counters: atomic adds).
#[derive(Debug, Default)]
struct SshCounters {
    /// Upgraded flows handed to the inspector.
    connections: Counter,
    /// Connections closed because no pre-auth slot came free within the login grace time.
    preauth_timeouts: Counter,
    /// Connections closed because the tenant's trust material (CAs, host key) could not be loaded.
    trust_unavailable: Counter,
}

impl SshServices {
    pub fn new(state_dir: &Path, audit: SshAuditSink, limits: SshLimits) -> SshServices {
        SshServices {
            state_dir: state_dir.to_path_buf(),
            audit,
            trust: Mutex::new(HashMap::new()),
            preauth: Arc::new(Preauth::new(&limits)),
            limits,
            live: Arc::new(live::LiveSessions::default()),
            counters: SshCounters::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Ends every open session (cleanly, with its records) when `token` is cancelled.
    pub fn with_shutdown(mut self, token: CancellationToken) -> SshServices {
        self.shutdown = token;
        self
    }

    /// Completes when the gateway stops.
    pub fn shutting_down(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.shutdown.cancelled()
    }

    /// Registers the inspector's counters (names without `_total`: the encoder adds it).
    pub fn register_metrics(&self, reg: &mut prometheus_client::registry::Registry) {
        let c = &self.counters;
        for (name, help, m) in [
            (
                "rampart_ssh_connections",
                "Upgraded flows handed to the SSH inspector",
                &c.connections,
            ),
            (
                "rampart_ssh_preauth_timeouts",
                "SSH connections closed because no pre-authentication slot (per device, tenant, gateway) came \
                 free within the login grace time",
                &c.preauth_timeouts,
            ),
            (
                "rampart_ssh_trust_unavailable",
                "SSH connections closed because the tenant's CAs or host key could not be loaded",
                &c.trust_unavailable,
            ),
        ] {
            reg.register(name, help, m.clone());
        }
    }

    /// Sessions in progress (the review UI's live view and terminate).
    pub fn live(&self) -> &Arc<live::LiveSessions> {
        &self.live
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

/// Unauthenticated connections: a semaphore per device (keyed by tenant and name), per tenant, and one in
/// total. Waiters are served in order; a key's semaphore is dropped once nobody holds or waits for it.
struct Preauth {
    per_device: usize,
    per_tenant: usize,
    total: Arc<Semaphore>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    devices: Mutex<HashMap<(String, String), Arc<Semaphore>>>,
}

/// Held while a connection is not yet authenticated.
pub struct PreauthGuard {
    preauth: Arc<Preauth>,
    tenant: String,
    device: String,
    permits: Option<[OwnedSemaphorePermit; 3]>,
}

impl Preauth {
    fn new(limits: &SshLimits) -> Preauth {
        Preauth {
            per_device: limits.preauth_per_device,
            per_tenant: limits.preauth_per_tenant,
            total: Arc::new(Semaphore::new(limits.preauth_total)),
            tenants: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
        }
    }

    /// Waits (at most `grace`) for a slot of the device, its tenant and the gateway.
    async fn wait(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        grace: Duration,
    ) -> Option<PreauthGuard> {
        let mut guard = PreauthGuard {
            preauth: self.clone(),
            tenant: tenant.to_owned(),
            device: device.to_owned(),
            permits: None,
        };
        let device_sem = semaphore(
            &self.devices,
            (tenant.to_owned(), device.to_owned()),
            self.per_device,
        );
        let tenant_sem = semaphore(&self.tenants, tenant.to_owned(), self.per_tenant);
        let total = self.total.clone();
        let acquire = async move {
            let d = device_sem.acquire_owned().await.ok()?;
            let t = tenant_sem.acquire_owned().await.ok()?;
            let g = total.acquire_owned().await.ok()?;
            Some([d, t, g])
        };
        guard.permits = tokio::time::timeout(grace, acquire).await.ok().flatten();
        // Without permits, the guard's drop forgets the semaphores nobody else uses.
        guard.permits.is_some().then_some(guard)
    }

    #[cfg(test)]
    fn tracked(&self) -> (usize, usize) {
        (
            self.devices.lock().unwrap_or_else(|p| p.into_inner()).len(),
            self.tenants.lock().unwrap_or_else(|p| p.into_inner()).len(),
        )
    }
}

fn semaphore<K: Eq + std::hash::Hash>(
    map: &Mutex<HashMap<K, Arc<Semaphore>>>,
    key: K,
    permits: usize,
) -> Arc<Semaphore> {
    map.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert_with(|| Arc::new(Semaphore::new(permits)))
        .clone()
}

/// Forgets `key`'s semaphore when the map holds the only reference (no holder, no waiter).
fn forget_idle<K: Eq + std::hash::Hash>(map: &Mutex<HashMap<K, Arc<Semaphore>>>, key: &K) {
    let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
    if m.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
        m.remove(key);
    }
}

impl Drop for PreauthGuard {
    fn drop(&mut self) {
        // The permits hold the semaphores: release them first.
        drop(self.permits.take());
        let device = (
            std::mem::take(&mut self.tenant),
            std::mem::take(&mut self.device),
        );
        forget_idle(&self.preauth.devices, &device);
        forget_idle(&self.preauth.tenants, &device.0);
    }
}

/// Waits (at most the login grace time) for a pre-auth slot of the device, its tenant and the gateway.
async fn wait_preauth(
    services: &Arc<SshServices>,
    tenant: &str,
    device: &str,
) -> Option<PreauthGuard> {
    services
        .preauth
        .wait(tenant, device, services.limits.login_grace)
        .await
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
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Preauth, SshLimits};

    #[tokio::test]
    async fn preauth_slots_are_per_device_per_tenant_and_in_total() {
        let p = Arc::new(Preauth::new(&SshLimits {
            preauth_per_device: 2,
            preauth_per_tenant: 3,
            preauth_total: 5,
            ..SshLimits::default()
        }));
        let short = Duration::from_millis(50);
        let slot = |t: &'static str, d: &'static str| {
            let p = p.clone();
            async move { p.wait(t, d, short).await }
        };
        // A device's cap; the same name in another tenant is another device.
        let a1 = slot("acme", "laptop").await.unwrap();
        let _a2 = slot("acme", "laptop").await.unwrap();
        assert!(slot("acme", "laptop").await.is_none());
        let _b1 = slot("beta", "laptop").await.unwrap();
        // The tenant's cap: acme's other devices get one more slot between them, so beta keeps room.
        let _a3 = slot("acme", "desktop").await.unwrap();
        assert!(slot("acme", "phone").await.is_none());
        let _b2 = slot("beta", "laptop").await.unwrap();
        // The total cap.
        assert!(slot("gamma", "x").await.is_none());
        // A released slot goes to the next waiter.
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait("acme", "phone", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        drop(a1);
        assert!(waiter.await.unwrap().is_some());
    }

    #[tokio::test]
    async fn preauth_forgets_devices_and_tenants_nobody_holds() {
        let p = Arc::new(Preauth::new(&SshLimits::default()));
        let g = p
            .wait("acme", "laptop", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(p.tracked(), (1, 1));
        drop(g);
        assert_eq!(p.tracked(), (0, 0));
        let full = Arc::new(Preauth::new(&SshLimits {
            preauth_total: 0,
            ..SshLimits::default()
        }));
        assert!(full
            .wait("acme", "laptop", Duration::from_millis(20))
            .await
            .is_none());
        assert_eq!(full.tracked(), (0, 0));
    }

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
