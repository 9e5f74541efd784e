//! What each enrollment API call does: checks the credential, changes the store (and with it the registry of
//! devices), makes the running gateway apply the change, and writes the audit record. Synchronous (SQLite, the
//! registry's file lock, reloads): the HTTPS server runs each call on a blocking thread.
//!
//! Start at `Service::enroll`. Every call that changes devices holds the registry lock from reading the
//! devices to committing, so addresses and names are allocated against everything enrolled (config file,
//! `devices.json`, `enroll.db`), and the token use is taken in the same transaction that creates the device.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};

use super::api::{
    ApiError, DeviceInfo, DeviceReply, DeviceState, EnrollRequest, ErrorCode, Interface,
    KeyRequest, Peer,
};
use super::audit::{Actor, AuditLog, Event, EventKind};
use super::secret::{Credential, Kind, PublicId};
use super::store::{DeviceRow, Store, StoreError, TokenRow, TokenState};
use super::wgconf::{allocate_address, free_addresses, DEVICE_MTU, PERSISTENT_KEEPALIVE};
use crate::config::{Config, Device, DeviceName, DeviceOrigin, Tenant};
use crate::core::PeerStatus;
use crate::fleet::enrollment::{Placed, SharedEnrollment};
use crate::keys::{PeerKey, PrivateKey};
use crate::registry::Registry;

/// A retry with the same token and public key within this window returns the same device (a lost reply
/// must not burn a one-off token). Longer would let a token holder take over devices enrolled long ago.
pub const RETRY_WINDOW: Duration = Duration::from_secs(600);
/// Longest `device_id`, `os` and `hostname` kept.
const MAX_TEXT: usize = 128;
/// Fleet mode: free addresses of this node's view offered to PostgreSQL, which takes the first no other
/// node's device holds (a pool with more devices elsewhere than this is refused as full until they sync).
const FLEET_CANDIDATES: usize = 4096;

/// What the enrollment service needs from the running gateway.
pub trait GatewayHandle: Send + Sync + 'static {
    /// Re-reads the config and the registry and applies them (what `rampart reload` does).
    fn reload(&self) -> Result<String, String>;
    /// The live state of every peer.
    fn peers(&self) -> Vec<PeerStatus>;
    /// The configuration the data path runs now.
    fn config(&self) -> Arc<Config>;
}

/// Where a request came from: for rate limits and audit records, and the host the device reached us at
/// (its WireGuard endpoint when `gateway.public_endpoint` is not set).
#[derive(Debug, Clone)]
pub struct Origin {
    pub source: IpAddr,
    pub host: Option<String>,
}

/// How an enrollment succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolled {
    /// A new device.
    Created,
    /// A retry within `RETRY_WINDOW`: the same device, with a new device token.
    Retried,
    /// The same token and `device_id` again: the device keeps its address and name, with the new key.
    Reenrolled,
}

pub struct Service {
    gateway: Arc<dyn GatewayHandle>,
    state_dir: PathBuf,
    gateway_key: PeerKey,
    audit: AuditLog,
    lockout_failures: u32,
    lockout: Duration,
    /// Fleet mode: tokens are checked and spent in PostgreSQL, device credentials are mirrored there and
    /// looked up there for devices enrolled on other nodes.
    fleet: Option<SharedEnrollment>,
    /// The fleet's enrollment URLs last read (used while PostgreSQL is unreachable).
    enroll_urls: Mutex<Vec<String>>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "enrollment request failed");
    err(
        ErrorCode::Unavailable,
        "the gateway cannot serve this request now; try again later (the gateway's log says why)",
    )
}

/// The fleet's PostgreSQL failed: enrollment cannot be checked (tokens live there in fleet mode).
fn fleet_unavailable(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{e:#}"), "enrollment request failed: the fleet's PostgreSQL");
    err(
        ErrorCode::Unavailable,
        "this gateway cannot reach the fleet's database, where enrollment tokens and devices are checked; try \
         again later, or through another gateway of the fleet",
    )
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        unavailable(e)
    }
}

fn token_invalid() -> ApiError {
    err(
        ErrorCode::TokenInvalid,
        "the enrollment token is not valid; check that it was copied whole (rpe1_...)",
    )
}

fn device_token_invalid() -> ApiError {
    err(
        ErrorCode::DeviceTokenInvalid,
        "missing or invalid device token; send `Authorization: Bearer rpd1_...` from the enrollment reply, or enroll again",
    )
}

/// Printable ASCII only, at most `MAX_TEXT` characters; `None` if nothing is left.
fn clean_text(s: Option<&str>) -> Option<String> {
    let t: String = s?
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_TEXT)
        .collect();
    let t = t.trim().to_string();
    (!t.is_empty()).then_some(t)
}

/// `base`, or `base-2`, `base-3`, ... whichever is free.
fn unique_name(base: &DeviceName, taken: &HashSet<String>) -> Option<DeviceName> {
    if !taken.contains(base.as_str()) {
        return Some(base.clone());
    }
    (2..10_000).find_map(|n| {
        let suffix = format!("-{n}");
        let stem = &base.as_str()[..base.as_str().len().min(64 - suffix.len())];
        let name = DeviceName::parse(&format!("{stem}{suffix}")).ok()?;
        (!taken.contains(name.as_str())).then_some(name)
    })
}

/// Whether `key` belongs to any device but `except`.
fn key_in_use(
    cfg: &Config,
    store_devices: &[DeviceRow],
    key: &PeerKey,
    except: Option<&PublicId>,
) -> bool {
    let mine = except.and_then(|id| store_devices.iter().find(|d| &d.id == id));
    let in_config = cfg
        .tenants
        .iter()
        .flat_map(|t| &t.devices)
        .any(|d| &d.public_key == key && mine.is_none_or(|m| m.public_key != *key));
    in_config
        || store_devices
            .iter()
            .any(|d| &d.public_key == key && Some(&d.id) != except)
}

/// The tenant as allocation must see it: its configured and enrolled devices plus the pending ones.
pub fn with_pending(t: &Tenant, store_devices: &[DeviceRow]) -> Tenant {
    let mut t = t.clone();
    for d in store_devices
        .iter()
        .filter(|d| d.tenant == t.id && d.state == DeviceState::Pending)
    {
        t.devices.push(Device {
            name: d.name.clone(),
            public_key: d.public_key,
            address: d.address,
            address_v6: t.derived_v6(d.address),
            user: d.user.clone(),
            groups: d.groups.clone(),
            ssh_keys: Vec::new(),
            origin: DeviceOrigin::Token,
        });
    }
    t
}

impl Service {
    pub fn new(gateway: Arc<dyn GatewayHandle>, audit: AuditLog) -> anyhow::Result<Service> {
        let cfg = gateway.config();
        let gateway_key = PrivateKey::read_file(&cfg.gateway.private_key_file)?.public_key();
        Ok(Service {
            state_dir: cfg.gateway.state_dir.clone(),
            audit,
            lockout_failures: cfg.enroll.lockout_failures,
            lockout: cfg.enroll.lockout,
            gateway_key,
            gateway,
            fleet: None,
            enroll_urls: Mutex::new(Vec::new()),
        })
    }

    /// Fleet mode (`Some`): tokens and device credentials shared through the fleet's PostgreSQL.
    pub fn with_fleet(mut self, fleet: Option<SharedEnrollment>) -> Service {
        self.fleet = fleet;
        self
    }

    /// A token by id: from the fleet's PostgreSQL in fleet mode, else from `enroll.db`.
    fn load_token(&self, id: &PublicId) -> Result<Option<TokenRow>, ApiError> {
        if let Some(f) = &self.fleet {
            return f.token(id).map_err(fleet_unavailable);
        }
        match Store::open_readonly(&self.state_dir)? {
            Some(s) => Ok(s.token(id)?),
            None => Ok(None),
        }
    }

    /// Takes one use of the token (fleet mode: one statement in PostgreSQL, so two nodes cannot both spend
    /// the last use; a use taken there is not given back if the local commit then fails).
    fn consume_token(
        &self,
        tx: &super::store::Tx<'_>,
        id: &PublicId,
        now: i64,
    ) -> Result<bool, ApiError> {
        match &self.fleet {
            Some(f) => f.consume_token(id, now).map_err(fleet_unavailable),
            None => Ok(tx.consume_token(id, now)?),
        }
    }

    /// Fleet mode: copies this node's self-enrolled devices (credentials: hashes only) to PostgreSQL, so other
    /// nodes answer them at once. A failure only delays that: the sync thread mirrors them again at its next
    /// publish (every reload, and when PostgreSQL is back).
    fn mirror(&self) {
        let Some(f) = &self.fleet else {
            return;
        };
        let devices = match Store::open_readonly(&self.state_dir) {
            Ok(Some(s)) => s.devices(),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let result = devices
            .map_err(anyhow::Error::from)
            .and_then(|d| f.mirror(&d));
        if let Err(e) = result {
            tracing::warn!(error = %format!("{e:#}"), "fleet: device credentials not shared yet; retried at the next publish");
        }
    }

    /// A change to a device that is not in this node's store: in fleet mode it belongs to another node.
    fn not_here(&self, d: &DeviceRow) -> ApiError {
        let Some(f) = &self.fleet else {
            return device_token_invalid();
        };
        match f.device(&d.id) {
            Ok(Some((_, origin))) => err(
                ErrorCode::WrongNode,
                format!(
                    "device {} was enrolled on gateway node {origin}; rotate its key or leave through that node (this \
                     node only refreshes its config)",
                    d.api_id()
                ),
            ),
            Ok(None) => device_token_invalid(),
            Err(e) => fleet_unavailable(e),
        }
    }

    pub fn gateway(&self) -> &Arc<dyn GatewayHandle> {
        &self.gateway
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The config file plus every enrolled device, read under the registry lock.
    fn load_config(&self) -> Result<Config, ApiError> {
        let path = self.gateway.config().source.clone();
        Config::load(&path).map_err(unavailable)
    }

    fn lock(&self) -> Result<crate::registry::RegistryLock, ApiError> {
        Registry::open(&self.state_dir).lock().map_err(unavailable)
    }

    fn apply(&self) {
        if let Err(e) = self.gateway.reload() {
            tracing::error!(error = %e, "the enrollment change is stored but the gateway did not apply it");
        }
    }

    fn refused(&self, origin: &Origin, token: Option<&TokenRow>, e: &ApiError) {
        let mut ev = Event::new(EventKind::EnrollRefused, Actor::Device)
            .source(origin.source)
            .detail("error", e.error.as_str());
        if let Some(t) = token {
            ev = ev.token(&t.id).tenant(t.tenant.as_str());
        }
        self.audit.record(ev);
    }

    /// `POST /v1/enroll`.
    pub fn enroll(
        &self,
        req: &EnrollRequest,
        origin: &Origin,
        now: i64,
    ) -> Result<(Enrolled, DeviceReply), ApiError> {
        let Ok(cred) = Credential::parse(Kind::Enrollment, &req.token) else {
            let e = token_invalid();
            self.refused(origin, None, &e);
            return Err(e);
        };
        let key: PeerKey = req.public_key.parse().map_err(|e| {
            err(
                ErrorCode::BadRequest,
                format!("public_key: {e}; send the output of `wg pubkey`"),
            )
        })?;
        let wanted = match req.name.as_deref() {
            Some(n) => Some(
                DeviceName::parse(n)
                    .map_err(|m| err(ErrorCode::BadRequest, format!("name: {m}")))?,
            ),
            None => req
                .hostname
                .as_deref()
                .and_then(|h| DeviceName::parse(h.split('.').next().unwrap_or(h)).ok()),
        };
        let hw_id = clean_text(req.device_id.as_deref());

        // Authenticate first: nothing expensive (registry lock, config load) for a token that fails.
        self.check_token(&cred, origin, now)?;
        // Under `audit.on_failure = "fail_closed"` nothing is enrolled that cannot be recorded.
        if self.gateway.config().audit.on_failure == crate::config::FailurePolicy::FailClosed
            && !self.audit.healthy()
        {
            return Err(unavailable(
                "the audit store cannot be written (audit.on_failure = \"fail_closed\")",
            ));
        }

        let _lock = self.lock()?;
        let cfg = self.load_config()?;
        let mut store = Store::open(&self.state_dir)?;
        let tx = store.begin()?;
        let tok = match &self.fleet {
            Some(_) => self.load_token(cred.id())?,
            None => tx.token(cred.id())?,
        };
        let Some(tok) = tok else {
            return Err(token_invalid());
        };
        let refuse = |code: ErrorCode, msg: &str| -> ApiError {
            let e = err(code, msg);
            self.refused(origin, Some(&tok), &e);
            e
        };
        // Revoked or expired since the check above.
        if let Some(e) = final_state(&tok, now) {
            return Err(refuse(e.error, &e.message));
        }
        let Some(tenant) = cfg.tenant(tok.tenant.as_str()) else {
            return Err(unavailable(format!(
                "token {} names tenant {} which is not configured",
                tok.id, tok.tenant
            )));
        };
        let devices = tx.devices()?;

        // A retry of an enrollment whose reply was lost: same token, same key, recently.
        if let Some(d) = devices.iter().find(|d| {
            d.token_id == tok.id
                && d.public_key == key
                && now - d.key_set_at <= RETRY_WINDOW.as_secs() as i64
        }) {
            let dt = Credential::generate(Kind::Device, Some(d.id.clone()));
            tx.set_device_token(&d.id, &dt.hash())?;
            tx.commit()?;
            self.mirror();
            self.audit.record(
                Event::new(EventKind::DeviceEnrollRetried, Actor::Device)
                    .device(d)
                    .source(origin.source),
            );
            let reply = self.reply(&cfg, d, Some(dt.expose()), origin.host.as_deref())?;
            return Ok((Enrolled::Retried, reply));
        }
        if tok.state(now) == TokenState::UsedUp {
            tx.commit()?;
            return Err(refuse(ErrorCode::TokenUsedUp, "this enrollment token has been used as often as it allows; ask an admin for a new one"));
        }

        // The same token and device_id again (a reinstalled machine): replace the key, keep the device.
        if let Some(hw) = &hw_id {
            if let Some(d) = devices
                .iter()
                .find(|d| d.tenant == tok.tenant && d.hw_id.as_deref() == Some(hw))
            {
                if d.token_id != tok.id {
                    return Err(refuse(ErrorCode::DeviceIdInUse, "this device_id belongs to a device enrolled with another token; ask an admin to remove it first"));
                }
                if key_in_use(&cfg, &devices, &key, Some(&d.id)) {
                    return Err(refuse(
                        ErrorCode::KeyInUse,
                        "this public key belongs to another device; generate a new key pair",
                    ));
                }
                if !self.consume_token(&tx, &tok.id, now)? {
                    return Err(refuse(
                        ErrorCode::TokenUsedUp,
                        "this enrollment token has been used up",
                    ));
                }
                let dt = Credential::generate(Kind::Device, Some(d.id.clone()));
                tx.set_key(&d.id, &key, Some(&dt.hash()), now)?;
                tx.commit()?;
                self.mirror();
                drop(_lock);
                let d = DeviceRow {
                    public_key: key,
                    key_set_at: now,
                    proven_at: None,
                    ..d.clone()
                };
                self.audit.record(
                    Event::new(EventKind::DeviceReenrolled, Actor::Device)
                        .device(&d)
                        .source(origin.source)
                        .detail("public_key", key.to_string()),
                );
                if d.state == DeviceState::Active {
                    self.apply();
                }
                let reply = self.reply(&cfg, &d, Some(dt.expose()), origin.host.as_deref())?;
                return Ok((Enrolled::Reenrolled, reply));
            }
        }

        if key_in_use(&cfg, &devices, &key, None) {
            return Err(refuse(
                ErrorCode::KeyInUse,
                "this public key belongs to another device; generate a new key pair",
            ));
        }
        let view = with_pending(tenant, &devices);
        let taken: HashSet<String> = view.devices.iter().map(|d| d.name.to_string()).collect();
        let base = wanted.unwrap_or_else(|| DeviceName::parse("device").expect("valid name"));
        let dt = Credential::generate(Kind::Device, None);
        let state = if tok.preapproved {
            DeviceState::Active
        } else {
            DeviceState::Pending
        };
        let device = |address: IpAddr, name: DeviceName| DeviceRow {
            id: dt.id().clone(),
            tenant: tok.tenant.clone(),
            name,
            user: tok.device_user(),
            groups: tok.groups.clone(),
            public_key: key,
            address,
            state,
            token_id: tok.id.clone(),
            hw_id: hw_id.clone(),
            token_hash: dt.hash(),
            enrolled_at: now,
            key_set_at: now,
            approved_at: tok.preapproved.then_some(now),
            proven_at: None,
            last_seen_at: None,
            ephemeral_secs: tok.ephemeral_secs,
            os: clean_text(req.os.as_deref()),
            hostname: clean_text(req.hostname.as_deref()),
        };
        let pool_full = || {
            tracing::warn!(tenant = %tenant.id, pool = %tenant.address_pool, "enrollment refused: address pool full");
            refuse(ErrorCode::AddressPoolFull, "the tenant's address pool is full; ask an admin to widen it or remove unused devices")
        };
        let no_name = || {
            refuse(
                ErrorCode::BadRequest,
                "no free device name; send another name",
            )
        };
        let used_up = || {
            refuse(
                ErrorCode::TokenUsedUp,
                "this enrollment token has been used up",
            )
        };
        let d = match &self.fleet {
            None => {
                let address = allocate_address(&view).ok_or_else(pool_full)?;
                let name = unique_name(&base, &taken).ok_or_else(no_name)?;
                if !tx.consume_token(&tok.id, now)? {
                    return Err(used_up());
                }
                device(address, name)
            }
            // Address, name and the token's use are taken in PostgreSQL in one transaction, against the other
            // nodes' devices too (they may not have reached this node's config yet).
            Some(f) => {
                let candidates: Vec<IpAddr> =
                    free_addresses(&view).take(FLEET_CANDIDATES).collect();
                let placed = f.place_device(
                    &tok.id,
                    now,
                    &tok.tenant,
                    &candidates,
                    |address, elsewhere| {
                        let mut all = taken.clone();
                        all.extend(elsewhere.iter().cloned());
                        unique_name(&base, &all).map(|name| device(address, name))
                    },
                );
                match placed.map_err(fleet_unavailable)? {
                    Placed::Device(d) => *d,
                    Placed::PoolFull => return Err(pool_full()),
                    Placed::NoName => return Err(no_name()),
                    Placed::TokenSpent => return Err(used_up()),
                }
            }
        };
        tx.insert_device(&d)?;
        tx.commit()?;
        drop(_lock);
        self.mirror();
        tracing::info!(tenant = %d.tenant, device = %d.name, token = %tok.id, state = d.state.as_str(), "device enrolled with a token");
        self.audit.record(
            Event::new(EventKind::DeviceEnrolled, Actor::Device)
                .device(&d)
                .source(origin.source)
                .detail("address", d.address)
                .detail("state", d.state.as_str())
                .detail("public_key", key.to_string())
                .detail("ephemeral_secs", d.ephemeral_secs),
        );
        if d.state == DeviceState::Active {
            self.apply();
        }
        let reply = self.reply(&cfg, &d, Some(dt.expose()), origin.host.as_deref())?;
        Ok((Enrolled::Created, reply))
    }

    /// Checks the token before any expensive work: unknown ids, wrong secrets (counted; `lockout_failures` in a
    /// row lock the token), locked, revoked and expired tokens stop here.
    fn check_token(&self, cred: &Credential, origin: &Origin, now: i64) -> Result<(), ApiError> {
        let Some(tok) = self.load_token(cred.id())? else {
            let e = token_invalid();
            self.refused(origin, None, &e);
            return Err(e);
        };
        if let Some(until) = tok.locked_until.filter(|u| *u > now) {
            let e = err(
                ErrorCode::TokenLocked,
                "too many wrong secrets for this token; it is locked for a while",
            )
            .retry_after((until - now) as u64);
            self.refused(origin, Some(&tok), &e);
            return Err(e);
        }
        if !tok.secret_hash.matches(&cred.hash()) {
            let locked = match &self.fleet {
                Some(f) => f
                    .record_failure(&tok.id, now, self.lockout_failures, self.lockout)
                    .map_err(fleet_unavailable)?,
                None => {
                    let mut store = Store::open(&self.state_dir)?;
                    let tx = store.begin()?;
                    let locked =
                        tx.record_failure(&tok.id, now, self.lockout_failures, self.lockout)?;
                    tx.commit()?;
                    locked
                }
            };
            let e = token_invalid();
            self.refused(origin, Some(&tok), &e);
            if let Some(until) = locked {
                tracing::warn!(token = %tok.id, "enrollment token locked after repeated wrong secrets");
                self.audit.record(
                    Event::new(EventKind::TokenLocked, Actor::Gateway)
                        .token(&tok.id)
                        .tenant(tok.tenant.as_str())
                        .source(origin.source)
                        .detail("until", until),
                );
            }
            return Err(e);
        }
        if tok.failures > 0 {
            if let Some(f) = &self.fleet {
                f.reset_failures(&tok.id).map_err(fleet_unavailable)?;
            } else {
                let mut store = Store::open(&self.state_dir)?;
                let tx = store.begin()?;
                tx.reset_failures(&tok.id)?;
                tx.commit()?;
            }
        }
        if let Some(e) = final_state(&tok, now) {
            self.refused(origin, Some(&tok), &e);
            return Err(e);
        }
        Ok(())
    }

    /// The device a `Bearer rpd1_...` header belongs to.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<DeviceRow, ApiError> {
        let cred = bearer
            .and_then(|b| Credential::parse(Kind::Device, b).ok())
            .ok_or_else(device_token_invalid)?;
        let local = match Store::open_readonly(&self.state_dir)? {
            Some(store) => store.device(cred.id())?,
            None => None,
        };
        // Fleet mode: a device enrolled on another node (its credential mirrored to PostgreSQL).
        let found = match (local, &self.fleet) {
            (Some(d), _) => Some(d),
            (None, Some(f)) => f
                .device(cred.id())
                .map_err(fleet_unavailable)?
                .map(|(d, _)| d),
            (None, None) => None,
        };
        match found {
            Some(d) if d.token_hash.matches(&cred.hash()) => Ok(d),
            _ => Err(device_token_invalid()),
        }
    }

    /// `GET /v1/devices/self`: the device's configuration as the gateway runs it now.
    pub fn current(&self, d: &DeviceRow, origin: &Origin) -> Result<DeviceReply, ApiError> {
        if d.state == DeviceState::Pending {
            return Err(pending(d));
        }
        self.reply(&self.gateway.config(), d, None, origin.host.as_deref())
    }

    /// Records a refresh (`changed`: the device's copy was out of date).
    pub fn refreshed(&self, d: &DeviceRow, origin: &Origin, changed: bool) {
        self.audit.record(
            Event::new(EventKind::DeviceRefreshed, Actor::Device)
                .device(d)
                .source(origin.source)
                .detail("changed", changed),
        );
    }

    /// `PUT /v1/devices/self/key`: a new key for the same device and address (it must handshake again to be
    /// proven).
    pub fn rotate(
        &self,
        d: &DeviceRow,
        req: &KeyRequest,
        origin: &Origin,
        now: i64,
    ) -> Result<DeviceReply, ApiError> {
        if d.state == DeviceState::Pending {
            return Err(pending(d));
        }
        let key: PeerKey = req.public_key.parse().map_err(|e| {
            err(
                ErrorCode::BadRequest,
                format!("public_key: {e}; send the output of `wg pubkey`"),
            )
        })?;
        let lock = self.lock()?;
        let cfg = self.load_config()?;
        let mut store = Store::open(&self.state_dir)?;
        let tx = store.begin()?;
        let devices = tx.devices()?;
        let Some(cur) = devices.iter().find(|x| x.id == d.id) else {
            return Err(self.not_here(d));
        };
        if key_in_use(&cfg, &devices, &key, Some(&d.id)) {
            return Err(err(
                ErrorCode::KeyInUse,
                "this public key belongs to another device; generate a new key pair",
            ));
        }
        tx.set_key(&d.id, &key, None, now)?;
        tx.commit()?;
        drop(lock);
        self.mirror();
        let d = DeviceRow {
            public_key: key,
            key_set_at: now,
            proven_at: None,
            ..cur.clone()
        };
        self.audit.record(
            Event::new(EventKind::DeviceKeyRotated, Actor::Device)
                .device(&d)
                .source(origin.source)
                .detail("public_key", key.to_string()),
        );
        self.apply();
        self.reply(&self.gateway.config(), &d, None, origin.host.as_deref())
    }

    /// `DELETE /v1/devices/self`: the device leaves; its tunnel is cut at once.
    pub fn leave(&self, d: &DeviceRow, origin: &Origin) -> Result<(), ApiError> {
        let lock = self.lock()?;
        let mut store = Store::open(&self.state_dir)?;
        let tx = store.begin()?;
        if !tx.delete_device(&d.id)? && self.fleet.is_some() {
            return Err(self.not_here(d));
        }
        tx.commit()?;
        drop(lock);
        self.mirror();
        self.audit.record(
            Event::new(EventKind::DeviceLeft, Actor::Device)
                .device(d)
                .source(origin.source),
        );
        if d.state == DeviceState::Active {
            self.apply();
        }
        Ok(())
    }

    /// The periodic look at the data path: records each device's first handshake with its current key
    /// (proof it holds the private key) and when it was last seen, and removes ephemeral devices not seen for
    /// their timeout. `rx` keeps each peer's received bytes between calls (traffic counts as seen).
    pub fn observe(
        &self,
        peers: impl FnOnce() -> Vec<PeerStatus>,
        rx: &mut HashMap<PeerKey, u64>,
        now: i64,
    ) -> Result<(), StoreError> {
        // Only ask the data path when there are self-enrolled devices to look at.
        let Some(existing) = Store::open_readonly(&self.state_dir)? else {
            return Ok(());
        };
        if !existing
            .devices()?
            .iter()
            .any(|d| d.state == DeviceState::Active)
        {
            rx.clear();
            return Ok(());
        }
        drop(existing);
        let peers = peers();
        let mut store = Store::open(&self.state_dir)?;
        let by_key: HashMap<PeerKey, &PeerStatus> =
            peers.iter().map(|p| (p.public_key, p)).collect();
        let tx = store.begin()?;
        let devices = tx.devices()?;
        let mut proven = Vec::new();
        for d in devices.iter().filter(|d| d.state == DeviceState::Active) {
            let Some(p) = by_key.get(&d.public_key) else {
                continue;
            };
            if let Some(ago) = p.last_handshake_secs {
                let at = now - ago as i64;
                // Only a handshake after the key was set proves this key.
                if at >= d.key_set_at - 1 && tx.mark_proven(&d.id, at)? {
                    proven.push((d.clone(), at));
                }
                tx.mark_seen(&d.id, at)?;
            }
            let before = rx.insert(d.public_key, p.rx_bytes);
            if before.is_some_and(|b| p.rx_bytes > b) {
                tx.mark_seen(&d.id, now)?;
            }
        }
        tx.commit()?;
        rx.retain(|k, _| by_key.contains_key(k));
        for (d, at) in proven {
            tracing::info!(tenant = %d.tenant, device = %d.name, "device proven: first handshake with its key");
            self.audit.record(
                Event::new(EventKind::DeviceProven, Actor::Gateway)
                    .device(&d)
                    .detail("handshake_at", at),
            );
        }
        self.expire(now)
    }

    /// Removes ephemeral devices whose last sign of life is older than their timeout.
    fn expire(&self, now: i64) -> Result<(), StoreError> {
        // Pending devices cannot be seen; their clock starts at approval.
        let stale = |d: &DeviceRow| {
            d.state == DeviceState::Active
                && d.ephemeral_secs
                    .is_some_and(|s| now - d.last_activity() > s as i64)
        };
        let Some(store) = Store::open_readonly(&self.state_dir)? else {
            return Ok(());
        };
        if !store.devices()?.iter().any(stale) {
            return Ok(());
        }
        let Ok(lock) = Registry::open(&self.state_dir).lock() else {
            return Ok(());
        };
        let mut store = Store::open(&self.state_dir)?;
        let tx = store.begin()?;
        let gone: Vec<DeviceRow> = tx.devices()?.into_iter().filter(stale).collect();
        for d in &gone {
            tx.delete_device(&d.id)?;
        }
        tx.commit()?;
        drop(lock);
        self.mirror();
        for d in &gone {
            tracing::info!(tenant = %d.tenant, device = %d.name, "ephemeral device removed: not seen for its timeout");
            self.audit.record(
                Event::new(EventKind::DeviceExpired, Actor::Gateway)
                    .device(d)
                    .detail("last_activity", d.last_activity())
                    .detail("ephemeral_secs", d.ephemeral_secs),
            );
        }
        if gone.iter().any(|d| d.state == DeviceState::Active) {
            self.apply();
        }
        Ok(())
    }

    /// The configuration of `d` under `cfg`.
    fn reply(
        &self,
        cfg: &Config,
        d: &DeviceRow,
        device_token: Option<String>,
        host: Option<&str>,
    ) -> Result<DeviceReply, ApiError> {
        let Some(t) = cfg.tenant(d.tenant.as_str()) else {
            return Err(unavailable(format!(
                "tenant {} of device {} is not configured",
                d.tenant, d.name
            )));
        };
        let mut reply = device_reply(cfg, t, d, self.gateway_key, device_token, host)?;
        if let Some(f) = &self.fleet {
            let mut cached = self.enroll_urls.lock().unwrap_or_else(|e| e.into_inner());
            match f.enroll_urls() {
                Ok(urls) => *cached = urls,
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "fleet: enrollment URLs not read; the last ones are sent")
                }
            }
            reply.enroll_urls = cached.clone();
            reply.config_version = config_version(&reply);
        }
        Ok(reply)
    }
}

/// The refusal for a revoked or expired token (final states: no retry helps).
fn final_state(tok: &TokenRow, now: i64) -> Option<ApiError> {
    match tok.state(now) {
        TokenState::Revoked => Some(err(
            ErrorCode::TokenRevoked,
            "this enrollment token was revoked; ask an admin for a new one",
        )),
        TokenState::Expired => Some(err(
            ErrorCode::TokenExpired,
            "this enrollment token has expired; ask an admin for a new one",
        )),
        TokenState::Valid | TokenState::UsedUp | TokenState::Locked => None,
    }
}

fn pending(d: &DeviceRow) -> ApiError {
    err(
        ErrorCode::PendingApproval,
        format!(
            "device {} waits for an admin: `rampart device approve --tenant {} --name {}`",
            d.api_id(),
            d.tenant,
            d.name
        ),
    )
}

/// The WireGuard endpoint devices are told: `gateway.public_endpoint`, else a specific listen address, else
/// the host the device reached the enrollment listener at, with the WireGuard port.
fn endpoint(cfg: &Config, host: Option<&str>) -> Result<String, ApiError> {
    if let Some(e) = &cfg.gateway.public_endpoint {
        return Ok(e.clone());
    }
    let listen = cfg.gateway.listen;
    if !listen.ip().is_unspecified() {
        return Ok(listen.to_string());
    }
    match host {
        Some(h) if h.parse::<std::net::Ipv6Addr>().is_ok() => {
            Ok(format!("[{h}]:{}", listen.port()))
        }
        Some(h) => Ok(format!("{h}:{}", listen.port())),
        None => Err(unavailable(format!(
            "no WireGuard endpoint for devices: set gateway.public_endpoint in {}",
            cfg.source.display()
        ))),
    }
}

/// A device's configuration: its address, the gateway as its one peer, the tenant's pool and off-ramp
/// networks routed into the tunnel.
pub fn device_reply(
    cfg: &Config,
    t: &Tenant,
    d: &DeviceRow,
    gateway_key: PeerKey,
    device_token: Option<String>,
    host: Option<&str>,
) -> Result<DeviceReply, ApiError> {
    let prefix = if d.address.is_ipv4() { 32 } else { 128 };
    let address = IpNet::new(d.address, prefix).expect("host prefix is valid");
    let interface = Interface {
        addresses: vec![address],
        dns: Vec::new(),
        mtu: DEVICE_MTU,
    };
    let peers = vec![Peer {
        public_key: gateway_key.to_string(),
        endpoint: endpoint(cfg, host)?,
        allowed_ips: super::wgconf::allowed_ips(t),
        persistent_keepalive: PERSISTENT_KEEPALIVE,
    }];
    let device = DeviceInfo {
        id: d.api_id(),
        name: d.name.to_string(),
        tenant: d.tenant.to_string(),
        state: d.state,
    };
    let mut reply = DeviceReply {
        device,
        device_token,
        interface,
        peers,
        config_version: String::new(),
        enroll_urls: Vec::new(),
    };
    reply.config_version = config_version(&reply);
    Ok(reply)
}

/// The reply's `config_version` (its `ETag`): a digest of what the device's file holds. The fleet's
/// enrollment URLs count only when there are any, so a single gateway's versions stay what they were.
fn config_version(r: &DeviceReply) -> String {
    let canon = if r.enroll_urls.is_empty() {
        serde_json::to_vec(&(&r.device, &r.interface, &r.peers))
    } else {
        serde_json::to_vec(&(&r.device, &r.interface, &r.peers, &r.enroll_urls))
    }
    .unwrap_or_default();
    let digest = Sha256::digest(&canon);
    super::tls::hex(&digest[..8])
}

#[cfg(test)]
mod tests;
