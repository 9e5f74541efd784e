//! SSH trust material per tenant, under `state_dir/ssh/<tenant>/`:
//!
//! | file | what |
//! |---|---|
//! | `user_ca`, `user_ca.pub` | signs the short-lived user certificates the gateway logs in to targets with (targets trust it with `TrustedUserCAKeys`) |
//! | `host_ca`, `host_ca.pub` | signs the gateway's host certificate per destination (clients trust it with `@cert-authority`) |
//! | `host_key` | the gateway's host key towards this tenant's clients |
//! | `known_targets` | target host keys pinned on first use (`addr:port key`) |
//! | `target_host_ca.pub` | optional, written by the admin: a host CA whose certificates vouch for targets |
//!
//! Private keys are OpenSSH files with mode 0600 and are never printed. Certificates are minted in sync
//! functions because rand's `ThreadRng` is `!Send`.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Certificate, HashAlg, PrivateKey, PublicKey};

use crate::audit::ssh_records::CertInfo;
use crate::keys::openssh;

/// How far back certificates are valid from (clock skew between gateway and target).
const BACKDATE: Duration = Duration::from_secs(30);
/// Validity of a user certificate towards a target (checked only at authentication).
pub const USER_CERT_VALIDITY: Duration = Duration::from_secs(5 * 60);
/// Validity of a gateway host certificate; re-minted when less than a day is left.
const HOST_CERT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(
        "tenant {0:?} has no SSH certificate authority yet; run `rampart ca init --tenant {0}` on the gateway"
    )]
    NoCa(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Key(String),
}

fn key_err(e: impl std::fmt::Display) -> TrustError {
    TrustError::Key(e.to_string())
}

/// A fresh Ed25519 key (`keys::openssh`, shared with the audit signing key).
pub fn new_ed25519(comment: &str) -> Result<PrivateKey, TrustError> {
    Ok(openssh::new_ed25519(comment)?)
}

/// Writes an OpenSSH private key with mode 0600 (atomically) and its `.pub` beside it.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> Result<(), TrustError> {
    Ok(openssh::write_private_key(path, key)?)
}

impl From<openssh::OpensshKeyError> for TrustError {
    fn from(e: openssh::OpensshKeyError) -> TrustError {
        match e {
            openssh::OpensshKeyError::File { path, msg } => TrustError::File { path, msg },
            openssh::OpensshKeyError::Key(msg) => TrustError::Key(msg),
        }
    }
}

fn read_private_key(path: &Path) -> Result<PrivateKey, TrustError> {
    let text = std::fs::read_to_string(path).map_err(|e| TrustError::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    PrivateKey::from_openssh(text).map_err(|e| TrustError::File {
        path: path.to_path_buf(),
        msg: format!("not an OpenSSH private key: {e}"),
    })
}

/// `state_dir/ssh/<tenant>`.
pub fn tenant_dir(state_dir: &Path, tenant: &str) -> PathBuf {
    state_dir.join("ssh").join(tenant)
}

/// What `rampart ca init` created (public parts only).
#[derive(Debug)]
pub struct CaInit {
    pub dir: PathBuf,
    pub user_ca_pub: String,
    pub host_ca_pub: String,
    /// False when the CAs already existed (they are never replaced).
    pub created: bool,
}

/// Creates the tenant's user CA, host CA and gateway host key unless they exist.
pub fn ca_init(state_dir: &Path, tenant: &str) -> Result<CaInit, TrustError> {
    let dir = tenant_dir(state_dir, tenant);
    let user_ca = dir.join("user_ca");
    let host_ca = dir.join("host_ca");
    let host_key = dir.join("host_key");
    let mut created = false;
    for (path, comment) in [
        (&user_ca, format!("rampart user CA ({tenant})")),
        (&host_ca, format!("rampart host CA ({tenant})")),
        (&host_key, format!("rampart gateway host key ({tenant})")),
    ] {
        if !path.exists() {
            write_private_key(path, &new_ed25519(&comment)?)?;
            created = true;
        }
    }
    let user_ca_pub = read_private_key(&user_ca)?
        .public_key()
        .to_openssh()
        .map_err(key_err)?;
    let host_ca_pub = read_private_key(&host_ca)?
        .public_key()
        .to_openssh()
        .map_err(key_err)?;
    Ok(CaInit {
        dir,
        user_ca_pub,
        host_ca_pub,
        created,
    })
}

pub use crate::audit::ssh_records::HostKeyTrust;

/// Outcome of checking a target's host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyVerdict {
    Accept {
        trust: HostKeyTrust,
        fingerprint: String,
    },
    /// The key differs from the pinned one: possible interception. Refuse.
    Changed { fingerprint: String, pinned: String },
    /// A certificate that the trusted CA did not sign, or not for this target.
    BadCertificate(String),
}

/// What the tenant's trust files looked like when they were loaded (presence, size, mtime of each), so a
/// change (`ca init`, a CA added or rotated) is picked up by the next session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustStamp(Vec<Option<(u64, SystemTime)>>);

impl TrustStamp {
    /// Stats the trust files of `tenant` (blocking file work: call it off the async runtime).
    pub fn read(state_dir: &Path, tenant: &str) -> TrustStamp {
        let dir = tenant_dir(state_dir, tenant);
        TrustStamp(
            ["user_ca", "host_ca", "host_key", "target_host_ca.pub"]
                .iter()
                .map(|f| {
                    std::fs::metadata(dir.join(f))
                        .ok()
                        .map(|m| (m.len(), m.modified().unwrap_or(UNIX_EPOCH)))
                })
                .collect(),
        )
    }
}

/// One tenant's loaded trust material.
pub struct TenantTrust {
    stamp: TrustStamp,
    dir: PathBuf,
    tenant: String,
    user_ca: PrivateKey,
    host_ca: PrivateKey,
    host_key: PrivateKey,
    target_host_ca: Option<PublicKey>,
    host_certs: Mutex<HashMap<String, Certificate>>,
    pins: Mutex<()>,
}

impl std::fmt::Debug for TenantTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantTrust")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl TenantTrust {
    /// Reads the tenant's trust files (blocking file work: call it off the async runtime).
    pub fn load(state_dir: &Path, tenant: &str) -> Result<TenantTrust, TrustError> {
        let stamp = TrustStamp::read(state_dir, tenant);
        let dir = tenant_dir(state_dir, tenant);
        if !dir.join("user_ca").exists() {
            return Err(TrustError::NoCa(tenant.to_owned()));
        }
        let target_ca_path = dir.join("target_host_ca.pub");
        let target_host_ca = match std::fs::read_to_string(&target_ca_path) {
            Ok(text) => {
                Some(
                    PublicKey::from_openssh(text.trim()).map_err(|e| TrustError::File {
                        path: target_ca_path.clone(),
                        msg: format!("not an OpenSSH public key: {e}"),
                    })?,
                )
            }
            Err(_) => None,
        };
        Ok(TenantTrust {
            stamp,
            user_ca: read_private_key(&dir.join("user_ca"))?,
            host_ca: read_private_key(&dir.join("host_ca"))?,
            host_key: read_private_key(&dir.join("host_key"))?,
            target_host_ca,
            host_certs: Mutex::new(HashMap::new()),
            pins: Mutex::new(()),
            tenant: tenant.to_owned(),
            dir,
        })
    }

    pub fn host_key(&self) -> &PrivateKey {
        &self.host_key
    }

    /// The files as they were when this was loaded.
    pub fn stamp(&self) -> &TrustStamp {
        &self.stamp
    }

    /// Whether targets must present a host certificate from the tenant's target host CA.
    pub fn has_target_host_ca(&self) -> bool {
        self.target_host_ca.is_some()
    }

    /// The gateway's host certificate for clients that connect to `principal` (the destination address),
    /// minted on first use and cached.
    pub fn host_cert(&self, principal: &str) -> Result<Certificate, TrustError> {
        let now = unix_now();
        let mut certs = self.host_certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = certs.get(principal) {
            if c.valid_before() > now + 24 * 3600 {
                return Ok(c.clone());
            }
        }
        let mut rng = rand::rng();
        let valid_after = now.saturating_sub(BACKDATE.as_secs());
        let valid_before = now + HOST_CERT_VALIDITY.as_secs();
        let mut b = Builder::new_with_random_nonce(
            &mut rng,
            self.host_key.public_key(),
            valid_after,
            valid_before,
        )
        .map_err(key_err)?;
        b.serial(rand::random::<u64>())
            .and_then(|b| b.key_id(format!("rampart gateway {} {principal}", self.tenant)))
            .and_then(|b| b.cert_type(CertType::Host))
            .and_then(|b| b.valid_principal(principal))
            .map_err(key_err)?;
        let cert = b.sign(&self.host_ca).map_err(key_err)?;
        certs.insert(principal.to_owned(), cert.clone());
        Ok(cert)
    }

    /// A user certificate for an ephemeral key: principal `login`, a few minutes of validity, `key_id` naming
    /// the session, user and device (sshd logs it verbatim).
    pub fn mint_user_cert(
        &self,
        login: &str,
        key_id: &str,
        allow_forwarding: bool,
    ) -> Result<(PrivateKey, Certificate, CertInfo), TrustError> {
        let eph = new_ed25519("rampart ephemeral")?;
        let now = unix_now();
        let mut rng = rand::rng();
        let serial = rand::random::<u64>();
        let valid_after = now.saturating_sub(BACKDATE.as_secs());
        let valid_before = now + USER_CERT_VALIDITY.as_secs();
        let mut b =
            Builder::new_with_random_nonce(&mut rng, eph.public_key(), valid_after, valid_before)
                .map_err(key_err)?;
        b.serial(serial)
            .and_then(|b| b.key_id(key_id))
            .and_then(|b| b.cert_type(CertType::User))
            .and_then(|b| b.valid_principal(login))
            .and_then(|b| b.extension("permit-pty", ""))
            .map_err(key_err)?;
        if allow_forwarding {
            b.extension("permit-port-forwarding", "").map_err(key_err)?;
        }
        let cert = b.sign(&self.user_ca).map_err(key_err)?;
        let info = CertInfo {
            serial,
            key_id: key_id.to_owned(),
            principals: vec![login.to_owned()],
            valid_after,
            valid_before,
            ca_fp: self
                .user_ca
                .public_key()
                .fingerprint(HashAlg::Sha256)
                .to_string(),
        };
        Ok((eph, cert, info))
    }

    /// Checks a target's host key. With a target host CA (`target_host_ca.pub`), only a host certificate from
    /// it whose principals include one of `names` (the target's address, and its device name for a device) is
    /// accepted, as OpenSSH does, and nothing is pinned; without one, the key pinned for `target` (pinned now on
    /// first use). Blocking file work (the pins): call it off the async runtime.
    pub fn check_target_key(
        &self,
        target: SocketAddrV4,
        names: &[String],
        key: &PublicKey,
        cert: Option<&Certificate>,
    ) -> Result<HostKeyVerdict, TrustError> {
        if let Some(ca) = &self.target_host_ca {
            return Ok(check_host_certificate(ca, target, names, key, cert));
        }
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let openssh = PublicKey::new(key.key_data().clone(), "")
            .to_openssh()
            .map_err(key_err)?;
        let _guard = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join("known_targets");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let name = target.to_string();
        for line in text.lines() {
            let Some((host, k)) = line.split_once(' ') else {
                continue;
            };
            if host != name {
                continue;
            }
            let pinned = PublicKey::from_openssh(k.trim()).map_err(|e| TrustError::File {
                path: path.clone(),
                msg: format!("bad pinned key for {host}: {e}"),
            })?;
            return Ok(if pinned.key_data() == key.key_data() {
                HostKeyVerdict::Accept {
                    trust: HostKeyTrust::Pinned,
                    fingerprint,
                }
            } else {
                HostKeyVerdict::Changed {
                    fingerprint,
                    pinned: pinned.fingerprint(HashAlg::Sha256).to_string(),
                }
            });
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrustError::File {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        writeln!(f, "{name} {openssh}")
            .and_then(|_| f.sync_all())
            .map_err(|e| TrustError::File {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        Ok(HostKeyVerdict::Accept {
            trust: HostKeyTrust::Tofu,
            fingerprint,
        })
    }
}

/// The OpenSSH rules for a host certificate: from the CA, of host type, valid now, naming the host.
fn check_host_certificate(
    ca: &PublicKey,
    target: SocketAddrV4,
    names: &[String],
    key: &PublicKey,
    cert: Option<&Certificate>,
) -> HostKeyVerdict {
    let bad = |why: String| {
        HostKeyVerdict::BadCertificate(format!(
            "target {target} {why}; the tenant trusts only host certificates from its target host CA \
             (target_host_ca.pub) that name the target"
        ))
    };
    let Some(cert) = cert else {
        return bad("presented a plain host key".into());
    };
    if cert.cert_type() != CertType::Host {
        return bad("presented a user certificate as its host key".into());
    }
    if let Err(e) = cert.validate([&ca.fingerprint(HashAlg::Sha256)]) {
        return bad(format!(
            "presented a host certificate the target host CA does not vouch for ({e})"
        ));
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return bad(
            "presented a host certificate that names no principals (valid for any host)".into(),
        );
    }
    if !principals.iter().any(|p| names.contains(p)) {
        return bad(format!(
            "presented a host certificate for {}, not for {}",
            principals.join(", "),
            names.join(" or ")
        ));
    }
    HostKeyVerdict::Accept {
        trust: HostKeyTrust::Ca,
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
    }
}

fn unix_now() -> u64 {
    crate::clock::unix_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp dir, removed when the guard drops (also after a failure).
    fn tempdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn ca_init_is_idempotent_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let state_tmp = tempdir();
        let state = state_tmp.path().to_path_buf();
        let first = ca_init(&state, "acme").unwrap();
        assert!(first.created);
        let again = ca_init(&state, "acme").unwrap();
        assert!(!again.created);
        assert_eq!(first.user_ca_pub, again.user_ca_pub);
        let mode = std::fs::metadata(first.dir.join("user_ca"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!first.user_ca_pub.contains("PRIVATE"));
    }

    #[test]
    fn user_cert_names_the_login_and_validates_against_the_ca() {
        let state_tmp = tempdir();
        let state = state_tmp.path().to_path_buf();
        ca_init(&state, "acme").unwrap();
        let t = TenantTrust::load(&state, "acme").unwrap();
        let (eph, cert, info) = t
            .mint_user_cert("alice", "sid alice laptop", false)
            .unwrap();
        assert_eq!(cert.valid_principals(), ["alice".to_string()]);
        assert_eq!(cert.key_id(), "sid alice laptop");
        assert_eq!(cert.public_key(), eph.public_key().key_data());
        assert_eq!(cert.serial(), info.serial);
        let ca_fp = t.user_ca.public_key().fingerprint(HashAlg::Sha256);
        cert.validate([&ca_fp]).unwrap();
        assert!(cert.extensions().contains_key("permit-pty"));
        assert!(!cert.extensions().contains_key("permit-port-forwarding"));
        assert!(info.valid_before - info.valid_after <= 6 * 60);
    }

    #[test]
    fn target_keys_are_pinned_on_first_use_and_changes_refused() {
        let state_tmp = tempdir();
        let state = state_tmp.path().to_path_buf();
        ca_init(&state, "acme").unwrap();
        let t = TenantTrust::load(&state, "acme").unwrap();
        let target: SocketAddrV4 = "10.0.0.5:22".parse().unwrap();
        let names = ["10.0.0.5".to_string()];
        let k1 = new_ed25519("a").unwrap().public_key().clone();
        let k2 = new_ed25519("b").unwrap().public_key().clone();
        let v = t.check_target_key(target, &names, &k1, None).unwrap();
        assert!(matches!(
            v,
            HostKeyVerdict::Accept {
                trust: HostKeyTrust::Tofu,
                ..
            }
        ));
        let v = t.check_target_key(target, &names, &k1, None).unwrap();
        assert!(matches!(
            v,
            HostKeyVerdict::Accept {
                trust: HostKeyTrust::Pinned,
                ..
            }
        ));
        let v = t.check_target_key(target, &names, &k2, None).unwrap();
        assert!(matches!(v, HostKeyVerdict::Changed { .. }));
        // Another target is independent.
        let other: SocketAddrV4 = "10.0.0.6:22".parse().unwrap();
        assert!(matches!(
            t.check_target_key(other, &names, &k2, None).unwrap(),
            HostKeyVerdict::Accept {
                trust: HostKeyTrust::Tofu,
                ..
            }
        ));
    }

    #[test]
    fn a_trusted_target_host_ca_vouches_for_the_target_it_names_only() {
        let state_tmp = tempdir();
        let state = state_tmp.path().to_path_buf();
        ca_init(&state, "acme").unwrap();
        let target_ca = new_ed25519("target ca").unwrap();
        std::fs::write(
            tenant_dir(&state, "acme").join("target_host_ca.pub"),
            target_ca.public_key().to_openssh().unwrap(),
        )
        .unwrap();
        let t = TenantTrust::load(&state, "acme").unwrap();
        let host = new_ed25519("target").unwrap();
        let cert_for = |principal: &str, ca: &PrivateKey| {
            let now = unix_now();
            let mut b = Builder::new_with_random_nonce(
                &mut rand::rng(),
                host.public_key(),
                now - 60,
                now + 3600,
            )
            .unwrap();
            b.cert_type(CertType::Host).unwrap();
            if principal.is_empty() {
                b.all_principals_valid().unwrap();
            } else {
                b.valid_principal(principal).unwrap();
            }
            b.sign(ca).unwrap()
        };
        let target: SocketAddrV4 = "10.0.0.5:22".parse().unwrap();
        let names = ["10.0.0.5".to_string(), "db-1".to_string()];
        let good = cert_for("10.0.0.5", &target_ca);
        assert!(matches!(
            t.check_target_key(target, &names, host.public_key(), Some(&good))
                .unwrap(),
            HostKeyVerdict::Accept {
                trust: HostKeyTrust::Ca,
                ..
            }
        ));
        let by_name = cert_for("db-1", &target_ca);
        assert!(matches!(
            t.check_target_key(target, &names, host.public_key(), Some(&by_name))
                .unwrap(),
            HostKeyVerdict::Accept { .. }
        ));
        let other_host = cert_for("10.0.0.6", &target_ca);
        let other_ca = cert_for("10.0.0.5", &new_ed25519("rogue").unwrap());
        let any_host = cert_for("", &target_ca);
        for bad in [other_host, other_ca, any_host] {
            assert!(matches!(
                t.check_target_key(target, &names, host.public_key(), Some(&bad))
                    .unwrap(),
                HostKeyVerdict::BadCertificate(_)
            ));
        }
        // A plain key is refused and never pinned.
        assert!(matches!(
            t.check_target_key(target, &names, host.public_key(), None)
                .unwrap(),
            HostKeyVerdict::BadCertificate(m) if m.contains("plain host key")
        ));
        assert!(!tenant_dir(&state, "acme").join("known_targets").exists());
    }

    #[test]
    fn missing_ca_says_how_to_create_it() {
        let dir_tmp = tempdir();
        let dir = dir_tmp.path().to_path_buf();
        let e = TenantTrust::load(&dir, "acme").unwrap_err();
        assert!(
            e.to_string().contains("rampart ca init --tenant acme"),
            "{e}"
        );
    }
}
