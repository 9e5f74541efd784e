//! The russh server `Handler` of one intercepted connection ([`ConnHandler`]): each callback hands over to the
//! session's authentication (`auth`) or channel relay (`channels`).
//!
//! Callbacks run on the connection's event loop: a callback that waits (for the target's window, or its reply
//! to a request) holds up that connection's other channels too (design note G3; OpenSSH behaves alike).
//! The `Channel` russh hands to `channel_open_*` is dropped at once: events are taken from the callbacks only
//! (G1), replies to requests are answered from inside the callback after the target answered (G2).
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::HashAlg;
use russh::server::{self, Auth, ChannelOpenHandle, Msg, Session};
use russh::{Channel, ChannelId, ChannelWriteHalf, Disconnect, Pty, Sig};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::bridge::ChannelShared;
use super::session::SessionState;
use super::trust::TenantTrust;
use super::upstream::Upstream;
use super::SshContext;
use crate::config::SshAuth;

pub(super) struct Bridge {
    pub(super) up: ChannelWriteHalf<russh::client::Msg>,
    pub(super) shared: Arc<ChannelShared>,
}

pub struct ConnHandler {
    pub(super) ctx: Arc<SshContext>,
    pub(super) session: Arc<SessionState>,
    pub(super) trust: Arc<TenantTrust>,
    pub(super) upstream_stream: Option<TcpStream>,
    pub(super) upstream: Option<Upstream>,
    /// Why the session cannot go on (told to the client right after authentication, G6).
    pub(super) failure: Option<(String, crate::audit::ssh_records::SessionEndReason)>,
    pub(super) preauth: Option<super::PreauthGuard>,
    pub(super) channels: HashMap<ChannelId, Bridge>,
    pub(super) next_seq: u32,
    pub(super) alive: mpsc::Sender<()>,
    pub(super) client_key_fp: Option<String>,
    pub(super) auth_method: String,
    pub(super) client_version: String,
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

impl server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if self.ctx.settings.auth != SshAuth::None {
            return Ok(Auth::reject());
        }
        Ok(self.login(user, "none").await)
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Refused before the signature, so the client goes on with its next key.
        Ok(if self.client_key_registered(offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if !self.client_key_registered(key.public_key) {
            return Ok(Auth::reject());
        }
        self.client_key_fp = Some(key.public_key.fingerprint(HashAlg::Sha256).to_string());
        Ok(self.login(user, "publickey").await)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.on_auth_succeeded(session).await
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.open_session(channel, reply, session).await
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
        self.open_direct_tcpip(channel, host, port, orig_addr, orig_port, reply, session)
            .await
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
        self.pty(channel, term, cols, rows, pw, ph, modes, session)
            .await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.env(channel, name, value, session).await
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
        self.client_data(channel, data, session).await
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
