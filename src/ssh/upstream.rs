//! The gateway's SSH client towards the target: host key verification (pin or CA, never accept-all) and
//! certificate login as the requested user. Called at authentication time, so a failure reaches the user as a
//! clear disconnect message (design note G6) rather than "Permission denied".
#![deny(unsafe_code)]

use std::borrow::Cow;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::ssh_key::{Algorithm, EcdsaCurve, HashAlg, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::Preferred;
use tokio::net::TcpStream;

use super::trust::{HostKeyTrust, HostKeyVerdict, TenantTrust};
use crate::audit::ssh_records::{CertInfo, HostKeyChange, HostKeyEvent, SshEvent};

/// Host certificate types asked of targets when the tenant trusts a target host CA, most preferred first.
const HOST_CERT_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// A logged-in connection to the target.
pub struct Upstream {
    pub handle: client::Handle<TargetKeyCheck>,
    pub cert: CertInfo,
    pub host_key_fp: String,
    pub host_key_trust: HostKeyTrust,
}

/// Checks the target's host key during key exchange and remembers the verdict.
pub struct TargetKeyCheck {
    trust: Arc<TenantTrust>,
    target: SocketAddrV4,
    /// What a host certificate must name: the target's address (and its device name).
    names: Arc<[String]>,
    verdict: Arc<Mutex<Option<Result<HostKeyVerdict, String>>>>,
}

impl client::Handler for TargetKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let (public, cert) = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (key.clone(), None),
            PublicKeyOrCertificate::Certificate(c) => {
                (PublicKey::new(c.public_key().clone(), ""), Some(c.clone()))
            }
        };
        // Pins are a file: checked on the blocking pool.
        let (trust, target, names) = (self.trust.clone(), self.target, self.names.clone());
        let verdict = tokio::task::spawn_blocking(move || {
            trust
                .check_target_key(target, &names, &public, cert.as_ref())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let ok = matches!(verdict, Ok(HostKeyVerdict::Accept { .. }));
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(verdict);
        Ok(ok)
    }
}

/// Why the gateway could not log in to the target; the text is shown to the user after the gateway's name.
#[derive(Debug)]
pub struct UpstreamError {
    pub message: String,
    /// A host key event to record (pinned on first use, or changed).
    pub host_key_event: Option<SshEvent>,
}

/// Runs SSH over `stream`, verifies the target, and logs in as `login` with a fresh certificate. On success,
/// a first-use pin is reported through `pinned` so the caller can record it.
#[allow(clippy::too_many_arguments)]
pub async fn connect(
    stream: TcpStream,
    trust: Arc<TenantTrust>,
    target: SocketAddrV4,
    names: Vec<String>,
    login: &str,
    key_id: &str,
    allow_forwarding: bool,
    keepalive: std::time::Duration,
) -> Result<(Upstream, Option<SshEvent>), UpstreamError> {
    let fail = |message: String| UpstreamError {
        message,
        host_key_event: None,
    };
    let (key, cert, info) = trust
        .mint_user_cert(login, key_id, allow_forwarding)
        .map_err(|e| fail(format!("cannot mint a certificate: {e}")))?;
    // With a target host CA, ask for a host certificate (russh offers none by default); a target without one
    // still answers with its plain key, which the check refuses.
    let preferred = if trust.has_target_host_ca() {
        Preferred {
            host_key_certificates: Cow::Borrowed(HOST_CERT_ALGORITHMS),
            ..Preferred::default()
        }
    } else {
        Preferred::default()
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max: 3,
        nodelay: true,
        preferred,
        ..Default::default()
    });
    let verdict = Arc::new(Mutex::new(None));
    let check = TargetKeyCheck {
        trust,
        target,
        names: names.into(),
        verdict: verdict.clone(),
    };
    let _ = stream.set_nodelay(true);
    let connected = client::connect_stream(config, stream, check).await;
    let verdict = verdict.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (host_key_fp, host_key_trust, event) = match verdict {
        Some(Ok(HostKeyVerdict::Accept { trust, fingerprint })) => {
            let event = (trust == HostKeyTrust::Tofu).then(|| {
                SshEvent::HostKey(HostKeyEvent {
                    change: HostKeyChange::Pinned,
                    fingerprint: fingerprint.clone(),
                    pinned_fingerprint: None,
                })
            });
            (fingerprint, trust, event)
        }
        Some(Ok(HostKeyVerdict::Changed {
            fingerprint,
            pinned,
        })) => {
            // Tenant addresses stay at DEBUG; the session's record names the target.
            tracing::warn!(
                %key_id,
                "SSH target host key does not match its pin: refusing (possible interception)"
            );
            tracing::debug!(target_addr = %target, %fingerprint, %pinned, "SSH target host key changed");
            return Err(UpstreamError {
                message: format!(
                    "target {target} host key changed ({fingerprint}, pinned {pinned}); refusing the session \
                     (possible interception; an admin can remove the pin from the tenant's known_targets)"
                ),
                host_key_event: Some(SshEvent::HostKey(HostKeyEvent {
                    change: HostKeyChange::Changed,
                    fingerprint,
                    pinned_fingerprint: Some(pinned),
                })),
            });
        }
        Some(Ok(HostKeyVerdict::BadCertificate(msg))) => return Err(fail(msg)),
        Some(Err(e)) => return Err(fail(format!("cannot verify target {target}: {e}"))),
        None => {
            let e = connected.err().map(|e| e.to_string()).unwrap_or_default();
            return Err(fail(format!("cannot open session to target {target}: {e}")));
        }
    };
    let mut handle =
        connected.map_err(|e| fail(format!("cannot open session to target {target}: {e}")))?;
    let auth = handle
        .authenticate_openssh_cert(login, Arc::new(key), cert)
        .await
        .map_err(|e| fail(format!("cannot open session to target {target}: {e}")))?;
    if !auth.success() {
        // Say goodbye rather than drop the handle: russh's client session outlives a dropped handle.
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        return Err(fail(format!(
            "cannot open session to target: target {target} rejected the gateway certificate for \
             principal '{login}' (does the target trust the tenant's user CA with TrustedUserCAKeys, and \
             does the account exist?)"
        )));
    }
    Ok((
        Upstream {
            handle,
            cert: info,
            host_key_fp,
            host_key_trust,
        },
        event,
    ))
}
