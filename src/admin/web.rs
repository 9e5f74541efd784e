//! The review web UI's HTTPS listener (`gateway.ui_listen`): pages under `/ui/`, the JSON API under
//! `/api/v1/` (`admin::api`), both behind one sign-in.
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

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::accounts::{Account, AccountStore, LoginError, Role};
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
/// Failed sign-ins per source address per minute before `rate_limited`.
const LOGIN_FAILURES_PER_MINUTE: u32 = 20;
pub const COOKIE: &str = "__Host-rampart_session";
pub const CSRF_HEADER: &str = "x-rampart-csrf";

pub const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; \
img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; \
frame-ancestors 'none'; form-action 'self'";

pub type Body = UnsyncBoxBody<Bytes, Infallible>;
pub type Resp = Response<Body>;

/// What the UI needs from the running gateway.
pub struct UiServices {
    pub config: ConfigHandle,
    pub live: Arc<LiveSessions>,
    /// Applies the config and registry again (after approving a device).
    pub reload: Box<dyn Fn() -> Result<String, String> + Send + Sync>,
    pub audit: super::audit::AdminAudit,
    /// Token and device changes are enrollment records too.
    pub enroll_audit: crate::audit::enroll_records::EnrollAuditSink,
}

/// A signed-in browser session.
#[derive(Clone)]
struct UiSession {
    account: String,
    csrf: String,
    created: Instant,
    last: Instant,
}

pub struct Ctx {
    pub svc: UiServices,
    sessions: Mutex<HashMap<[u8; 32], UiSession>>,
    login_failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
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

/// A stable error code of the API, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthenticated,
    SessionExpired,
    BadCredentials,
    AccountLocked,
    RateLimited,
    CsrfRejected,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    BadRequest,
    QueryTooLong,
    BadCursor,
    BodyTooLarge,
    NotLive,
    LiveSealed,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthenticated | ErrorCode::SessionExpired | ErrorCode::BadCredentials => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::AccountLocked | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::CsrfRejected | ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::BadRequest | ErrorCode::QueryTooLong | ErrorCode::BadCursor => {
                StatusCode::BAD_REQUEST
            }
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::NotLive | ErrorCode::LiveSealed => StatusCode::CONFLICT,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An API error: `{"error": code, "message": ...}`.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    pub error: ErrorCode,
    pub message: String,
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(error: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "no such session, channel or object")
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::warn!(error = %e, "review UI request failed");
        ApiError::new(ErrorCode::Internal, "internal error; see the gateway log")
    }
}

pub fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Resp {
    full(
        status,
        "application/json",
        serde_json::to_vec(body).unwrap_or_default(),
    )
}

pub fn error(e: &ApiError) -> Resp {
    let mut r = json(e.error.status(), e);
    if let Some(s) = e.retry_after {
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

fn redirect(to: &str) -> Resp {
    let mut r = full(StatusCode::SEE_OTHER, "text/plain", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(http::header::LOCATION, v);
    }
    r
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

fn secure_headers(r: &mut Resp, cacheable: bool) {
    let h = r.headers_mut();
    let mut set = |k: &'static str, v: &'static str| {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    };
    set("content-security-policy", CSP);
    set("x-content-type-options", "nosniff");
    set("referrer-policy", "no-referrer");
    set("cross-origin-opener-policy", "same-origin");
    set("cross-origin-resource-policy", "same-origin");
    set("x-frame-options", "DENY");
    set(
        "permissions-policy",
        "camera=(), microphone=(), geolocation=(), usb=(), payment=()",
    );
    if !cacheable {
        set("cache-control", "no-store");
    } else {
        set("cache-control", "no-cache");
    }
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

fn header<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Browsers name the site a request comes from; anything but our own origin is refused for state changes.
fn same_origin<B>(req: &Request<B>) -> bool {
    match header(req, "sec-fetch-site") {
        Some(site) => site == "same-origin",
        None => true,
    }
}

fn json_body<B>(req: &Request<B>) -> bool {
    header(req, "content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    })
}

fn check_csrf<B>(caller: &Caller, req: &Request<B>) -> Result<(), ApiError> {
    if !caller.via_cookie {
        return Ok(());
    }
    let token_ok = match (&caller.csrf, header(req, CSRF_HEADER)) {
        (Some(want), Some(got)) => bool::from(want.as_bytes().ct_eq(got.as_bytes())),
        _ => false,
    };
    if !token_ok || !same_origin(req) {
        return Err(ApiError::new(
            ErrorCode::CsrfRejected,
            "missing or wrong X-Rampart-CSRF header, or a cross-site request; reload the page",
        ));
    }
    if !json_body(req) {
        return Err(ApiError::new(
            ErrorCode::CsrfRejected,
            "state-changing requests must be application/json",
        ));
    }
    Ok(())
}

fn cookie_value<B>(req: &Request<B>) -> Option<String> {
    for h in req.headers().get_all(http::header::COOKIE) {
        let Ok(s) = h.to_str() else { continue };
        for part in s.split(';') {
            if let Some(v) = part
                .trim()
                .strip_prefix(COOKIE)
                .and_then(|r| r.strip_prefix('='))
            {
                return Some(v.to_string());
            }
        }
    }
    None
}

fn session_key(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

async fn authenticate<B>(
    ctx: &Arc<Ctx>,
    source: IpAddr,
    req: &Request<B>,
) -> Result<Caller, ApiError> {
    let cfg = ctx.config();
    if let Some(auth) = header(req, "authorization") {
        let Some(token) = auth.strip_prefix("Bearer ") else {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "Authorization must be `Bearer rpa1_...`",
            ));
        };
        let token = token.trim().to_string();
        let dir = cfg.gateway.state_dir.clone();
        let account =
            tokio::task::spawn_blocking(move || AccountStore::open(&dir)?.check_token(&token))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::internal)?;
        return account
            .map(|account| Caller {
                account,
                csrf: None,
                via_cookie: false,
                source,
            })
            .ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthenticated, "unknown or revoked API token")
            });
    }
    let Some(cookie) = cookie_value(req) else {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "sign in first (POST /api/v1/login)",
        ));
    };
    let key = session_key(&cookie);
    let now = Instant::now();
    let session = {
        let mut map = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| {
            now.duration_since(s.last) < cfg.ui.idle_timeout
                && now.duration_since(s.created) < cfg.ui.absolute_timeout
        });
        match map.get_mut(&key) {
            Some(s) => {
                s.last = now;
                Some(s.clone())
            }
            None => None,
        }
    };
    let Some(session) = session else {
        return Err(ApiError::new(
            ErrorCode::SessionExpired,
            "your session has expired or ended; sign in again",
        ));
    };
    // The account may have been removed or changed since sign-in: it is read at every request.
    let dir = cfg.gateway.state_dir.clone();
    let name = session.account.clone();
    let account = tokio::task::spawn_blocking(move || AccountStore::open(&dir)?.get(&name))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let Some(account) = account else {
        ctx.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        return Err(ApiError::new(
            ErrorCode::SessionExpired,
            "the account no longer exists",
        ));
    };
    Ok(Caller {
        account,
        csrf: Some(session.csrf),
        via_cookie: true,
        source,
    })
}

#[derive(serde::Deserialize)]
struct LoginRequest {
    name: String,
    password: String,
}

/// What the pages get about the signed-in account.
#[derive(Serialize)]
pub struct Me {
    pub name: String,
    pub role: Role,
    pub tenants: super::accounts::Scope,
    pub csrf: Option<String>,
    pub idle_timeout_secs: u64,
}

pub fn me(ctx: &Ctx, c: &Caller) -> Me {
    Me {
        name: c.account.name.clone(),
        role: c.account.role,
        tenants: c.account.scope.clone(),
        csrf: c.csrf.clone(),
        idle_timeout_secs: ctx.config().ui.idle_timeout.as_secs(),
    }
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

async fn login(ctx: &Arc<Ctx>, source: IpAddr, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if !json_body(&req) || !same_origin(&req) {
        return Err(ApiError::new(
            ErrorCode::CsrfRejected,
            "sign-in takes an application/json body from this site's own page",
        ));
    }
    {
        let mut f = ctx.login_failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, n)) = f.get(&source) {
            if since.elapsed() < Duration::from_secs(60) && *n >= LOGIN_FAILURES_PER_MINUTE {
                let mut e = ApiError::new(
                    ErrorCode::RateLimited,
                    "too many failed sign-ins from this address; wait a minute",
                );
                e.retry_after = Some(60u64.saturating_sub(since.elapsed().as_secs()));
                return Err(e);
            } else if since.elapsed() >= Duration::from_secs(60) {
                f.remove(&source);
            }
        }
    }
    let LoginRequest { name, password } = read_json(req).await?;
    let cfg = ctx.config();
    let dir = cfg.gateway.state_dir.clone();
    let (tried, failures, lockout) = (
        name.clone(),
        cfg.ui.lockout_failures,
        cfg.ui.lockout.as_millis() as i64,
    );
    let now_ms = crate::clock::unix_ms();
    let result = tokio::task::spawn_blocking(move || {
        AccountStore::open(&dir)?.login(&tried, &password, now_ms, failures, lockout)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let account = match result {
        Ok(a) => a,
        Err(e) => {
            let mut f = ctx.login_failures.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(source).or_insert((Instant::now(), 0)).1 += 1;
            drop(f);
            ctx.svc.audit.login(
                &name,
                source,
                false,
                Some(match &e {
                    LoginError::BadCredentials => "bad_credentials",
                    LoginError::Locked { .. } => "account_locked",
                }),
            );
            return Err(match e {
                LoginError::BadCredentials => {
                    ApiError::new(ErrorCode::BadCredentials, "wrong account name or password")
                }
                LoginError::Locked { until_ms } => {
                    let mut e = ApiError::new(
                        ErrorCode::AccountLocked,
                        "too many wrong passwords: the account is locked for a while",
                    );
                    e.retry_after = Some(((until_ms - now_ms).max(0) as u64).div_ceil(1000));
                    e
                }
            });
        }
    };
    ctx.svc.audit.login(&account.name, source, true, None);
    let cookie = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let csrf = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let now = Instant::now();
    ctx.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            session_key(&cookie),
            UiSession {
                account: account.name.clone(),
                csrf: csrf.clone(),
                created: now,
                last: now,
            },
        );
    let caller = Caller {
        account,
        csrf: Some(csrf),
        via_cookie: true,
        source,
    };
    let mut r = json(StatusCode::OK, &me(ctx, &caller));
    let set = format!(
        "{COOKIE}={cookie}; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        cfg.ui.absolute_timeout.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&set) {
        r.headers_mut().insert(http::header::SET_COOKIE, v);
    }
    Ok(r)
}

fn logout<B>(ctx: &Ctx, req: &Request<B>) -> Resp {
    if let Some(c) = cookie_value(req) {
        ctx.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session_key(&c));
    }
    let mut r = json(StatusCode::OK, &serde_json::json!({"ok": true}));
    r.headers_mut().insert(
        http::header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-rampart_session=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_needs_token_same_origin_and_json() {
        let caller = Caller {
            account: Account {
                name: "a".into(),
                role: Role::Admin,
                scope: super::super::accounts::Scope::All,
                created_ms: 0,
                locked_until_ms: 0,
            },
            csrf: Some("tok".into()),
            via_cookie: true,
            source: IpAddr::from([127, 0, 0, 1]),
        };
        let req = |token: Option<&str>, site: Option<&str>, ct: &str| {
            let mut b = Request::builder()
                .method("POST")
                .uri("/api/v1/x")
                .header("content-type", ct);
            if let Some(t) = token {
                b = b.header(CSRF_HEADER, t);
            }
            if let Some(s) = site {
                b = b.header("sec-fetch-site", s);
            }
            b.body(()).unwrap()
        };
        assert!(check_csrf(
            &caller,
            &req(Some("tok"), Some("same-origin"), "application/json")
        )
        .is_ok());
        assert!(check_csrf(
            &caller,
            &req(Some("tok"), None, "application/json; charset=utf-8")
        )
        .is_ok());
        assert!(check_csrf(&caller, &req(None, Some("same-origin"), "application/json")).is_err());
        assert!(check_csrf(
            &caller,
            &req(Some("tox"), Some("same-origin"), "application/json")
        )
        .is_err());
        assert!(check_csrf(
            &caller,
            &req(Some("tok"), Some("cross-site"), "application/json")
        )
        .is_err());
        assert!(check_csrf(
            &caller,
            &req(Some("tok"), Some("same-origin"), "text/plain")
        )
        .is_err());
        let bearer = Caller {
            via_cookie: false,
            csrf: None,
            ..caller
        };
        assert!(check_csrf(&bearer, &req(None, None, "text/plain")).is_ok());
    }
}
