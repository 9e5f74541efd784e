//! Admin operations on enrollment, for the CLI (`rampart token ...`, `rampart device approve/remove`) and the
//! admin web UI: mint, list and revoke tokens (in `enroll.db`, or with `[fleet]` in the fleet's PostgreSQL); approve and remove self-enrolled devices; the enrollment URL.
//!
//! These change the store and write the audit record (to the pipeline inside the gateway, to the spool from
//! the CLI: `enroll::audit::AuditLog`); making a running gateway apply a device change is the caller's job
//! (the CLI asks over the control socket, the web UI calls its reload directly).
#![deny(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use super::api::DeviceState;
use super::audit::{Actor, AuditLog, Event, EventKind};
use super::secret::{Credential, Kind, PublicId};
use super::store::{DeviceRow, Store, StoreError, TokenRow};
use super::tls::{Identity, TlsError};
use crate::config::{Config, TenantId, UserName};
use crate::fleet::enrollment::SharedEnrollment;
use crate::registry::Registry;

/// Longest token lifetime (Tailscale's limit): a token is a standing invitation.
pub const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no tenant {0:?} in the config; use the id of a [[tenant]]")]
    NoTenant(String),
    #[error("no enrollment token {0:?}; see `rampart token list`")]
    NoToken(String),
    #[error("{0:?} is neither a token id (16 hex digits) nor a token (rpe1_...)")]
    BadTokenId(String),
    #[error("no self-enrolled device {name:?} in tenant {tenant}; see `rampart device list`")]
    NoDevice { tenant: String, name: String },
    #[error("device {0} is already approved")]
    NotPending(String),
    #[error("the token lifetime must be between 1 second and 90 days")]
    Ttl,
    #[error("a token allows at least 1 use (omit --uses for unlimited)")]
    Uses,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("device registry: {0:#}")]
    Registry(anyhow::Error),
    /// Fleet mode: tokens live in the fleet's PostgreSQL.
    #[error("enrollment tokens are shared through the fleet's PostgreSQL ([fleet]): {0:#}")]
    Fleet(anyhow::Error),
}

/// What an admin asks for when minting a token.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub tenant: String,
    /// The user its devices belong to (`None`: `token-<id>`).
    pub user: Option<UserName>,
    pub groups: Vec<String>,
    /// `None`: reusable without limit.
    pub max_uses: Option<u32>,
    pub ttl: Duration,
    /// Devices are removed after this long without being seen.
    pub ephemeral: Option<Duration>,
    /// False: devices wait for `rampart device approve`.
    pub preapproved: bool,
    pub note: String,
}

/// A minted token: the secret wire form (shown once, never stored) and its row.
pub struct NewToken {
    pub token: String,
    pub row: TokenRow,
}

/// `shared`: the fleet's tokens (`SharedEnrollment::from_config` for the CLI), `None` for `enroll.db`.
pub fn create_token(
    cfg: &Config,
    shared: Option<&SharedEnrollment>,
    req: TokenRequest,
    actor: &str,
    now: i64,
    audit: &AuditLog,
) -> Result<NewToken, AdminError> {
    let tenant = cfg
        .tenant(&req.tenant)
        .ok_or_else(|| AdminError::NoTenant(req.tenant.clone()))?;
    if req.ttl.is_zero() || req.ttl > MAX_TTL {
        return Err(AdminError::Ttl);
    }
    if req.max_uses == Some(0) {
        return Err(AdminError::Uses);
    }
    let cred = Credential::generate(Kind::Enrollment, None);
    let row = TokenRow {
        id: cred.id().clone(),
        secret_hash: cred.hash(),
        tenant: tenant.id.clone(),
        user: req.user,
        groups: req.groups,
        max_uses: req.max_uses,
        used: 0,
        created_at: now,
        expires_at: now + req.ttl.as_secs() as i64,
        ephemeral_secs: req.ephemeral.map(|d| d.as_secs().max(1)),
        preapproved: req.preapproved,
        revoked_at: None,
        created_by: actor.to_string(),
        note: req.note,
        last_used_at: None,
        failures: 0,
        locked_until: None,
    };
    match shared {
        // Fleet mode: valid on every node at once.
        Some(f) => f.insert_token(&row).map_err(AdminError::Fleet)?,
        None => {
            let mut store = Store::open(&cfg.gateway.state_dir)?;
            let tx = store.begin()?;
            tx.insert_token(&row)?;
            tx.commit()?;
        }
    }
    audit.record(
        Event::new(EventKind::TokenCreated, Actor::Admin(actor.to_string()))
            .token(&row.id)
            .tenant(row.tenant.as_str())
            .detail("max_uses", row.max_uses)
            .detail("expires_at", row.expires_at)
            .detail("preapproved", row.preapproved)
            .detail("ephemeral_secs", row.ephemeral_secs)
            .detail("groups", &row.groups)
            .detail("note", &row.note),
    );
    Ok(NewToken {
        token: cred.expose(),
        row,
    })
}

/// Every token of `cfg`'s gateway, or of the fleet (`shared`), no secrets, oldest first.
pub fn tokens_of(
    cfg: &Config,
    shared: Option<&SharedEnrollment>,
) -> Result<Vec<TokenRow>, AdminError> {
    match shared {
        Some(f) => f.tokens().map_err(AdminError::Fleet),
        None => list_tokens(&cfg.gateway.state_dir),
    }
}

/// Every token of `enroll.db` (no secrets), oldest first.
pub fn list_tokens(state_dir: &Path) -> Result<Vec<TokenRow>, AdminError> {
    match Store::open_readonly(state_dir)? {
        Some(s) => Ok(s.tokens()?),
        None => Ok(Vec::new()),
    }
}

/// Accepts a token id, a masked token (`rpe1_<id>_…`) or a whole token.
pub fn parse_token_id(s: &str) -> Result<PublicId, AdminError> {
    let s = s.trim();
    let id = s.strip_prefix(Kind::Enrollment.prefix()).unwrap_or(s);
    PublicId::parse(id.get(..16).unwrap_or(id))
        .filter(|_| id.len() == 16 || id.as_bytes().get(16) == Some(&b'_'))
        .ok_or_else(|| AdminError::BadTokenId(s.to_string()))
}

/// Revokes a token: it enrolls nothing from now on (devices it enrolled stay; remove them one by one).
pub fn revoke_token(
    cfg: &Config,
    shared: Option<&SharedEnrollment>,
    id: &str,
    actor: &str,
    now: i64,
    audit: &AuditLog,
) -> Result<TokenRow, AdminError> {
    let id = parse_token_id(id)?;
    let (row, changed) = match shared {
        // Fleet mode: invalid on every node at once.
        Some(f) => {
            let Some(row) = f.token(&id).map_err(AdminError::Fleet)? else {
                return Err(AdminError::NoToken(id.to_string()));
            };
            (row, f.revoke_token(&id, now).map_err(AdminError::Fleet)?)
        }
        None => {
            let mut store = Store::open(&cfg.gateway.state_dir)?;
            let tx = store.begin()?;
            let Some(row) = tx.token(&id)? else {
                return Err(AdminError::NoToken(id.to_string()));
            };
            let changed = tx.revoke_token(&id, now)?;
            tx.commit()?;
            (row, changed)
        }
    };
    if changed {
        audit.record(
            Event::new(EventKind::TokenRevoked, Actor::Admin(actor.to_string()))
                .token(&id)
                .tenant(row.tenant.as_str()),
        );
    }
    Ok(TokenRow {
        revoked_at: row.revoked_at.or(Some(now)),
        ..row
    })
}

/// Every self-enrolled device (pending and active).
pub fn devices(state_dir: &Path) -> Result<Vec<DeviceRow>, AdminError> {
    match Store::open_readonly(state_dir)? {
        Some(s) => Ok(s.devices()?),
        None => Ok(Vec::new()),
    }
}

fn find_device(
    tx: &super::store::Tx<'_>,
    tenant: &str,
    name: &str,
) -> Result<DeviceRow, AdminError> {
    let no = || AdminError::NoDevice {
        tenant: tenant.to_string(),
        name: name.to_string(),
    };
    let tenant_id = TenantId::parse(tenant).map_err(|_| no())?;
    let id = name.strip_prefix("dev_").and_then(PublicId::parse);
    tx.devices()?
        .into_iter()
        .find(|d| d.tenant == tenant_id && (d.name.as_str() == name || id.as_ref() == Some(&d.id)))
        .ok_or_else(no)
}

/// Pending -> active. The caller makes the running gateway apply it.
pub fn approve_device(
    cfg: &Config,
    tenant: &str,
    name: &str,
    actor: &str,
    now: i64,
    audit: &AuditLog,
) -> Result<DeviceRow, AdminError> {
    let lock = Registry::open(&cfg.gateway.state_dir)
        .lock()
        .map_err(AdminError::Registry)?;
    let mut store = Store::open(&cfg.gateway.state_dir)?;
    let tx = store.begin()?;
    let d = find_device(&tx, tenant, name)?;
    if !tx.approve(&d.id, now)? {
        return Err(AdminError::NotPending(d.name.to_string()));
    }
    tx.commit()?;
    drop(lock);
    audit.record(Event::new(EventKind::DeviceApproved, Actor::Admin(actor.to_string())).device(&d));
    Ok(DeviceRow {
        state: DeviceState::Active,
        approved_at: Some(now),
        ..d
    })
}

/// Removes a self-enrolled device (its device token stops working; a running gateway cuts its tunnel once
/// it applies the change). `None` when there is no such self-enrolled device.
pub fn remove_device(
    cfg: &Config,
    tenant: &str,
    name: &str,
    actor: &str,
    audit: &AuditLog,
) -> Result<Option<DeviceRow>, AdminError> {
    let lock = Registry::open(&cfg.gateway.state_dir)
        .lock()
        .map_err(AdminError::Registry)?;
    if Store::open_readonly(&cfg.gateway.state_dir)?.is_none() {
        return Ok(None);
    }
    let mut store = Store::open(&cfg.gateway.state_dir)?;
    let tx = store.begin()?;
    let d = match find_device(&tx, tenant, name) {
        Ok(d) => d,
        Err(AdminError::NoDevice { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    tx.delete_device(&d.id)?;
    tx.commit()?;
    drop(lock);
    audit.record(Event::new(EventKind::DeviceRevoked, Actor::Admin(actor.to_string())).device(&d));
    Ok(Some(d))
}

/// The enrollment listener's certificate (minted on first use), for the pins.
pub fn listener_identity(cfg: &Config) -> Result<Identity, AdminError> {
    Ok(Identity::load(
        &cfg.gateway.state_dir,
        cfg.enroll.tls.as_ref(),
        &certificate_names(cfg),
    )?)
}

/// Names a self-signed certificate carries: the public host, the WireGuard endpoint's host, a specific listen
/// address.
pub fn certificate_names(cfg: &Config) -> Vec<String> {
    let mut names = Vec::new();
    if let Some(h) = &cfg.enroll.public_host {
        names.push(split_host(h).to_string());
    }
    if let Some(e) = &cfg.gateway.public_endpoint {
        names.push(split_host(e).to_string());
    }
    if let Some(l) = cfg.enroll.listen.filter(|l| !l.ip().is_unspecified()) {
        names.push(l.ip().to_string());
    }
    names.dedup();
    names
}

/// `host` of `host:port` / `[v6]:port` / `host`.
fn split_host(s: &str) -> &str {
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
        _ => s,
    }
}

/// `host:port` devices reach the enrollment listener at: `[enroll] public_host` (the listen port is added
/// unless it names one), else the host of `gateway.public_endpoint`, else a specific listen address. `None`
/// when none is known (pass it to the CLI).
pub fn listener_authority(cfg: &Config) -> Option<String> {
    let listen = cfg.enroll.listen?;
    let port = listen.port();
    let with_port = |h: &str| {
        if h.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{h}]:{port}")
        } else {
            format!("{h}:{port}")
        }
    };
    if let Some(h) = &cfg.enroll.public_host {
        return Some(if split_host(h) == h.as_str() {
            with_port(h)
        } else {
            h.clone()
        });
    }
    if let Some(e) = &cfg.gateway.public_endpoint {
        return Some(with_port(split_host(e)));
    }
    (!listen.ip().is_unspecified()).then(|| listen.to_string())
}

/// `rampart://HOST:PORT/?[t=TOKEN&]pin=sha256:HEX`.
pub fn enrollment_url(authority: &str, pin: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("rampart://{authority}/?t={t}&pin={pin}"),
        None => format!("rampart://{authority}/?pin={pin}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_parse_from_every_form() {
        let c = Credential::generate(Kind::Enrollment, None);
        let id = c.id().clone();
        for s in [
            id.to_string(),
            c.expose(),
            super::super::secret::masked(Kind::Enrollment, &id),
        ] {
            assert_eq!(parse_token_id(&s).unwrap(), id, "{s}");
        }
        assert!(parse_token_id("xyz").is_err());
        assert!(parse_token_id("0123456789abcdef0").is_err());
    }

    #[test]
    fn authority_from_settings() {
        let mut cfg = Config::from_toml(
            "[gateway]\nstate_dir = \"/tmp/x\"\nenroll_listen = \"0.0.0.0:8443\"\npublic_endpoint = \"vpn.example:51820\"\n",
            Path::new("/etc/rampart/gateway.toml"),
        )
        .unwrap();
        assert_eq!(
            listener_authority(&cfg).as_deref(),
            Some("vpn.example:8443")
        );
        cfg.enroll.public_host = Some("enroll.example:443".into());
        assert_eq!(
            listener_authority(&cfg).as_deref(),
            Some("enroll.example:443")
        );
        cfg.enroll.public_host = Some("fd00::1".into());
        assert_eq!(listener_authority(&cfg).as_deref(), Some("[fd00::1]:8443"));
        cfg.enroll.public_host = None;
        cfg.gateway.public_endpoint = None;
        assert_eq!(listener_authority(&cfg), None);
        cfg.enroll.listen = Some("198.18.0.1:8443".parse().unwrap());
        assert_eq!(listener_authority(&cfg).as_deref(), Some("198.18.0.1:8443"));
        assert_eq!(
            enrollment_url("h:1", "sha256:ab", Some("rpe1_x")),
            "rampart://h:1/?t=rpe1_x&pin=sha256:ab"
        );
    }
}
