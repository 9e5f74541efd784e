//! The review web UI's HTTPS listener (`gateway.ui_listen`): pages under `/ui/`, the JSON API under
//! `/api/v1/` (`admin::api`), both behind one sign-in. This file: the listener, TLS, connection limits and
//! routing; `admin::session`: sign-in, session cookies, API tokens and CSRF; `admin::headers`: error codes,
//! response helpers and the security headers every response carries.
//!
//! - TLS with the enrollment listener's certificate (one identity, the same pins); HTTP/1.1, bounded headers,
//!   bodies and handshakes; at most [`MAX_CONNECTIONS`] at once.
//! - Authentication: a session cookie `__Host-rampart_session` (`Secure; HttpOnly; SameSite=Strict; Path=/`,
//!   32 random bytes, only their SHA-256 kept in memory, a new one at every sign-in; idle and absolute expiry
//!   from `[ui]`), or `Authorization: Bearer rpa1_...` (API tokens, `admin::accounts`).
//! - CSRF: a state-changing request made with the cookie needs the session's token in `X-Rampart-CSRF`, a JSON
//!   body type, and `Sec-Fetch-Site: same-origin` when the browser sends it. Sign-in needs the latter two.
//! - Sign-in throttling: per account (lockout in `admin.db`) and per source address (in memory).
//! - Every response carries a strict CSP (`script-src 'self' 'wasm-unsafe-eval'`, no inline script or style)
//!   and the other security headers; API responses are `Cache-Control: no-store`.
//!
//! Never: log a password, cookie or token; serve device-supplied text as HTML (the pages insert it as text).
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::accounts::{Account, AccountStore};
use super::headers::{error, redirect, secure_headers, ApiError, ErrorCode, Resp};
use super::session::{authenticate, check_csrf, login, logout, UiSession};
use crate::config::Config;
use crate::handoff::ConfigHandle;
use crate::ssh::live::LiveSessions;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 128;
/// Longest JSON body any API call takes.
pub const MAX_BODY: usize = 16 * 1024;
/// Longest query string (filters); longer ones get `query_too_long`.
pub const MAX_QUERY: usize = 2048;

/// What the UI needs from the running gateway.
pub struct UiServices {
    pub config: ConfigHandle,
    pub live: Arc<LiveSessions>,
    /// Applies the config and registry again (after approving a device).
    pub reload: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
    pub audit: super::audit::AdminAudit,
    /// Token and device changes are enrollment records too.
    pub enroll_audit: crate::audit::enroll_records::EnrollAuditSink,
    /// Fleet mode: the shared enrollment tokens (the daemon's connector: the password file may be unreadable
    /// once sandboxed).
    pub shared_enrollment: Option<crate::fleet::enrollment::SharedEnrollment>,
    /// With `[fleet]`: the fleet's records for `fleet=1` calls (`api::fleet`).
    pub fleet: Option<std::sync::Arc<crate::fleet::ReviewAccess>>,
}

pub struct Ctx {
    pub svc: UiServices,
    pub(super) sessions: Mutex<HashMap<[u8; 32], UiSession>>,
    pub(super) login_failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Held while `/api/v1/verify` walks the store (one walk at a time).
    pub verify_lock: Mutex<()>,
}

impl Ctx {
    pub fn config(&self) -> Arc<Config> {
        self.svc.config.current()
    }
}

/// Who made a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: Account,
    pub csrf: Option<String>,
    pub via_cookie: bool,
    pub source: IpAddr,
}

impl Caller {
    pub fn actor(&self) -> String {
        self.account.name.clone()
    }
}

/// The running listener; `shutdown` stops it.
pub struct UiServer {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl UiServer {
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Starts the listener when `gateway.ui_listen` is set; `cancel` (the gateway's shutdown, or `shutdown` here)
/// stops it. Errors name the setting to fix.
pub async fn start(svc: UiServices, cancel: CancellationToken) -> anyhow::Result<Option<UiServer>> {
    use anyhow::Context as _;
    let cfg = svc.config.current();
    let Some(listen) = cfg.ui.listen else {
        return Ok(None);
    };
    let identity = crate::enroll::admin::listener_identity(&cfg).with_context(|| {
        format!(
            "review UI certificate (gateway.ui_listen uses the enrollment listener's; [enroll] tls_cert/tls_key in {})",
            cfg.source.display()
        )
    })?;
    let tls = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
    let tcp = TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on {listen} (gateway.ui_listen in {})",
            cfg.source.display()
        )
    })?;
    // Creates admin.db with its tables now, so a bad state_dir shows at start.
    AccountStore::open(&cfg.gateway.state_dir)?;
    eprintln!(
        "rampart: review UI on https://{listen}/ui/ (certificate pin {}); create an account with `rampart admin create -c {}`",
        identity.pins.url_pin(),
        cfg.source.display()
    );
    let ctx = Arc::new(Ctx {
        svc,
        sessions: Mutex::new(HashMap::new()),
        login_failures: Mutex::new(HashMap::new()),
        verify_lock: Mutex::new(()),
    });
    let task = tokio::spawn(accept_loop(tcp, tls, ctx, cancel.clone()));
    Ok(Some(UiServer { cancel, task }))
}

async fn accept_loop(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    ctx: Arc<Ctx>,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => {
                let Ok((tcp, peer)) = r else { continue };
                if conns.len() >= MAX_CONNECTIONS {
                    continue;
                }
                conns.spawn(connection(tcp, peer, tls.clone(), ctx.clone(), cancel.clone()));
            }
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    ctx: Arc<Ctx>,
    cancel: CancellationToken,
) {
    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await else {
        return;
    };
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, peer.ip(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(32 * 1024)
        .serve_connection(TokioIo::new(stream), svc);
    // No overall deadline: a live view streams for as long as its session runs.
    tokio::select! {
        _ = conn => {}
        _ = cancel.cancelled() => {}
    }
}

async fn handle(ctx: Arc<Ctx>, source: IpAddr, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut r =
        if path.starts_with("/api/") && req.uri().query().is_some_and(|q| q.len() > MAX_QUERY) {
            error(&ApiError::new(
                ErrorCode::QueryTooLong,
                format!("the query string is longer than {MAX_QUERY} bytes; narrow the filters"),
            ))
        } else {
            route(&ctx, source, req).await
        };
    secure_headers(
        &mut r,
        path.starts_with("/ui/vendor/") || path.starts_with("/ui/assets/"),
    );
    tracing::debug!(%source, %method, %path, status = r.status().as_u16(), "review UI request");
    r
}

async fn route(ctx: &Arc<Ctx>, source: IpAddr, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if let Some(rest) = path.strip_prefix("/ui/vendor/") {
        return super::assets::vendor(rest);
    }
    if let Some(rest) = path.strip_prefix("/ui/assets/") {
        return super::assets::own(rest);
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/" | "/ui" | "/ui/") => return redirect("/ui/sessions"),
        (&Method::GET, "/ui/login") => return super::assets::page("login"),
        (&Method::POST, "/api/v1/login") => {
            return login(ctx, source, req).await.unwrap_or_else(|e| error(&e))
        }
        _ => {}
    }
    let caller = match authenticate(ctx, source, &req).await {
        Ok(c) => c,
        Err(e) if path.starts_with("/ui/") => {
            let _ = e;
            return redirect(&format!("/ui/login?next={}", urlencode(&path)));
        }
        Err(e) => return error(&e),
    };
    if let Some(page) = path.strip_prefix("/ui/") {
        return if method == Method::GET {
            super::assets::page(page)
        } else {
            error(&ApiError::new(
                ErrorCode::MethodNotAllowed,
                "pages are GET only",
            ))
        };
    }
    if method != Method::GET && method != Method::HEAD {
        if let Err(e) = check_csrf(&caller, &req) {
            return error(&e);
        }
    }
    if path == "/api/v1/logout" && method == Method::POST {
        return logout(ctx, &req);
    }
    super::api::route(ctx.clone(), caller, req)
        .await
        .unwrap_or_else(|e| error(&e))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let body = tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            ErrorCode::BadRequest,
            "the request body did not arrive in time",
        )
    })?
    .map_err(|_| {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("bodies are at most {MAX_BODY} bytes"),
        )
    })?
    .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("the body is not the expected JSON: {e}"),
        )
    })
}
