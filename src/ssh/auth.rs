//! Client authentication of an intercepted connection: the method the rule asks for (`none` or `publickey`, on
//! top of the WireGuard identity), the login checks, the recording-store check under `recording = "required"`,
//! and the gateway's certificate login to the target (`upstream::connect`). A refusal is told to the client
//! right after authentication as a disconnect message naming the gateway (design note G6) and recorded.
#![deny(unsafe_code)]

use std::sync::atomic::Ordering;

use russh::keys::ssh_key::{HashAlg, PublicKey};
use russh::server::{Auth, Session};
use russh::Disconnect;

use super::handler::ConnHandler;
use super::upstream;
use super::GATEWAY_NAME;
use crate::audit::ssh_records::SessionEndReason as R;
use crate::audit::ssh_records::{SessionStart, SshEvent};
use crate::config::{valid_login, Recording, SshAuth};

/// Refused client keys named in a session's record (a client may offer many).
const MAX_REFUSED_KEYS: usize = 8;

impl ConnHandler {
    /// First successful client authentication: check the recording store, log in to the target. Always
    /// accepts; a failure is told to the client in `auth_succeeded`.
    pub(super) async fn login(&mut self, login: &str, method: &str) -> Auth {
        if self.upstream.is_some() || self.failure.is_some() {
            return Auth::Accept;
        }
        self.auth_method = method.to_owned();
        {
            let mut k = self.session.keys.lock().unwrap_or_else(|p| p.into_inner());
            k.login = login.to_owned();
        }
        if !valid_login(login) {
            self.failure = Some((format!("invalid login name {login:?}"), R::Policy));
            return Auth::Accept;
        }
        if !self.ctx.settings.login_allowed(login, &self.ctx.user) {
            let allowed: Vec<String> = (self.ctx.settings.logins.iter().flatten())
                .map(ToString::to_string)
                .collect();
            self.failure = Some((
                format!(
                    "login {login:?} is not allowed by rule {} (logins: {})",
                    self.ctx.rule,
                    allowed.join(", ")
                ),
                R::Policy,
            ));
            return Auth::Accept;
        }
        if self.ctx.settings.recording == Recording::Required {
            if let Err(e) = self.recording_store_ready() {
                self.failure = Some((
                    format!(
                        "session refused: recording is required but the recording store is unavailable ({e})"
                    ),
                    R::Policy,
                ));
                return Auth::Accept;
            }
        }
        let Some(stream) = self.upstream_stream.take() else {
            self.failure = Some(("internal error: no target connection".into(), R::Error));
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
            self.target_names(),
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
                self.failure = Some((e.message, R::UpstreamFailed));
            }
            Err(_) => {
                self.failure = Some((
                    format!(
                        "cannot open session to target {}: timed out after {:?}",
                        self.ctx.dst, limits.upstream_timeout
                    ),
                    R::UpstreamFailed,
                ))
            }
        }
        Auth::Accept
    }

    /// Under `ssh_auth = "publickey"`: whether `key` is registered for the device in the configuration in
    /// force (`device add --ssh-key`, or the device's `ssh_keys`). A refused key is remembered for the record.
    pub(super) fn client_key_registered(&self, key: &PublicKey) -> bool {
        if self.ctx.settings.auth != SshAuth::Publickey {
            return true;
        }
        let config = self.ctx.config.current();
        let registered = config
            .tenant(self.ctx.tenant.as_str())
            .and_then(|t| t.devices.iter().find(|d| d.name == self.ctx.device))
            .is_some_and(|d| d.ssh_keys.iter().any(|k| k.matches(key)));
        if !registered {
            let fp = key.fingerprint(HashAlg::Sha256).to_string();
            let mut refused = self
                .session
                .refused_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if refused.len() < MAX_REFUSED_KEYS && !refused.contains(&fp) {
                refused.push(fp);
            }
        }
        registered
    }

    /// What a target's host certificate must name: its address, and for a device of the tenant its name.
    fn target_names(&self) -> Vec<String> {
        let ip = std::net::IpAddr::V4(*self.ctx.dst.ip());
        let mut names = vec![ip.to_string()];
        let config = self.ctx.config.current();
        if let Some(d) = config
            .tenant(self.ctx.tenant.as_str())
            .and_then(|t| t.devices.iter().find(|d| d.address == ip))
        {
            names.push(d.name.to_string());
        }
        names
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
    pub(super) fn session_dir(&self) -> String {
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
            target_host_key_trust: up.map(|u| u.host_key_trust),
            cert: up.map(|u| u.cert.clone()),
            recording: self.ctx.settings.recording,
            capture_input: self.ctx.settings.capture_input,
            allow_forwarding: self.ctx.settings.allow_forwarding,
            decision,
        }
    }

    /// Authentication is over: tell the client why the session cannot go on (G6), or record its start
    /// (durably under `recording = "required"`).
    pub(super) async fn on_auth_succeeded(
        &mut self,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        self.session.authed.store(true, Ordering::Relaxed);
        self.preauth = None;
        self.client_version = String::from_utf8_lossy(session.remote_sshid())
            .trim()
            .chars()
            .take(255)
            .collect();
        if let Some((msg, reason)) = self.failure.clone() {
            tracing::info!(session = %self.session.id, tenant = %self.ctx.tenant, device = %self.ctx.device,
                %reason, "SSH session refused");
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
            self.session.set_end(R::Policy, Some(msg.clone()));
            self.upstream = None;
            session.disconnect(
                Disconnect::ByApplication,
                &format!("{GATEWAY_NAME}: {msg}"),
                "en",
            )?;
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
