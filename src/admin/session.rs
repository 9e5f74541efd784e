//! Who is calling the review UI: sign-in (`login`, throttled per account in `admin.db` and per source address
//! in memory), the `__Host-` session cookie (32 random bytes, only their SHA-256 kept, idle and absolute
//! expiry from `[ui]`), API tokens (`Authorization: Bearer rpa1_...`), sign-out, and the CSRF rule for
//! state-changing requests made with the cookie ([`check_csrf`]).
//!
//! Never: log a password, cookie or token.
#![deny(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::HeaderValue;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::accounts::{AccountStore, LoginError, Role};
use super::headers::{json, ApiError, ErrorCode, Resp};
use super::web::{read_json, Caller, Ctx};

/// Failed sign-ins per source address per minute before `rate_limited`.
const LOGIN_FAILURES_PER_MINUTE: u32 = 20;
pub const COOKIE: &str = "__Host-rampart_session";
pub const CSRF_HEADER: &str = "x-rampart-csrf";

/// A signed-in browser session.
#[derive(Clone)]
pub(super) struct UiSession {
    account: String,
    csrf: String,
    created: Instant,
    last: Instant,
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

pub(super) fn check_csrf<B>(caller: &Caller, req: &Request<B>) -> Result<(), ApiError> {
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

pub(super) async fn authenticate<B>(
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
    /// With `[fleet]`: this node's id; the review pages then offer "All nodes" (`fleet=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_node: Option<String>,
}

pub fn me(ctx: &Ctx, c: &Caller) -> Me {
    Me {
        name: c.account.name.clone(),
        role: c.account.role,
        tenants: c.account.scope.clone(),
        csrf: c.csrf.clone(),
        idle_timeout_secs: ctx.config().ui.idle_timeout.as_secs(),
        fleet_node: ctx
            .svc
            .fleet
            .as_ref()
            .and(ctx.config().fleet.as_ref())
            .map(|f| f.node_id.clone()),
    }
}

pub(super) async fn login(
    ctx: &Arc<Ctx>,
    source: IpAddr,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
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

pub(super) fn logout<B>(ctx: &Ctx, req: &Request<B>) -> Resp {
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
    use super::super::accounts::Account;
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
