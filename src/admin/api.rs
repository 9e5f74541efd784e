//! The review UI's JSON API (`/api/v1/...`), which the pages use and scripts may use with an API token.
//! Queries, recordings and casts come from `audit::review` (the same functions as `rampart audit ssh`), so the
//! CLI and the web agree.
//!
//! Every object is scoped to the caller's tenants: another tenant's session is `not_found`, exactly like a
//! session that does not exist. Auditors read; admins also terminate sessions and manage devices and tokens.
//! Reads of recordings, live views and changes are audit records (`admin::audit`).
//!
//! Sealed tenants (`audit_recipient`): recordings are served as stored (`/blob`) for the reviewer's browser to
//! open with the key it holds; command texts stay sealed in the JSON. The gateway never opens them.
#![deny(unsafe_code)]

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Serialize;

mod enrollment;
mod fleet;
mod sessions;

use enrollment::{
    approve, create_token, devices, revoke_token, tokens, ApproveRequest, TokenCreate,
};
use sessions::{list_sessions, live, recording, session_detail, terminate};

use super::accounts::Role;
use super::headers::{full, json, ApiError, ErrorCode, Resp};
use super::session::me;
use super::web::{read_json, Caller, Ctx};
use crate::audit::admin_records::AdminEvent;
use crate::audit::review::ssh::{self as review, CastMeta, SessionFilter, SessionSummary, SshLog};
use crate::audit::ssh_records::{Secret, SshEvent};
use crate::config::Config;

/// Most sessions one page of the list returns.
const MAX_PAGE: usize = 200;
/// Longest value of one filter.
const MAX_FILTER: usize = 256;

pub async fn route(
    ctx: Arc<Ctx>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_start_matches("/api/v1/").split('/').collect();
    match (&method, parts.as_slice()) {
        (&Method::GET, ["me"]) => Ok(json(StatusCode::OK, &me(&ctx, &caller))),
        (&Method::GET, ["sessions"]) => {
            let q = query_pairs(req.uri().query())?;
            if fleet::wanted(&q) {
                return blocking(move || fleet::list_sessions(&ctx, &caller, &q)).await;
            }
            blocking(move || list_sessions(&ctx, &caller, &q)).await
        }
        (&Method::GET, ["sessions", id]) => {
            let id = id.to_string();
            if fleet::wanted(&query_pairs(req.uri().query())?) {
                return blocking(move || fleet::session_detail(&ctx, &caller, &id)).await;
            }
            blocking(move || session_detail(&ctx, &caller, &id)).await
        }
        (&Method::GET, ["sessions", id, "channels", ch, what @ ("cast" | "blob")]) => {
            let (id, what) = (id.to_string(), what.to_string());
            let ch: u32 = ch
                .parse()
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "the channel is a number"))?;
            let gzip = req
                .headers()
                .get(http::header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("gzip"));
            if fleet::wanted(&query_pairs(req.uri().query())?) {
                return blocking(move || fleet::recording(&ctx, &caller, &id, ch, &what, gzip))
                    .await;
            }
            blocking(move || recording(&ctx, &caller, &id, ch, &what, gzip)).await
        }
        (&Method::GET, ["sessions", id, "live"]) => live(&ctx, &caller, id),
        (&Method::POST, ["sessions", id, "terminate"]) => terminate(&ctx, &caller, id),
        (&Method::GET, ["flows"]) => {
            let q = query_pairs(req.uri().query())?;
            if fleet::wanted(&q) {
                return blocking(move || fleet::list_flows(&ctx, &caller, &q)).await;
            }
            blocking(move || super::trail::list_flows(&ctx, &caller, &q)).await
        }
        (&Method::GET, ["http"]) => {
            let q = query_pairs(req.uri().query())?;
            if fleet::wanted(&q) {
                return blocking(move || fleet::list_http(&ctx, &caller, &q)).await;
            }
            blocking(move || super::trail::list_http(&ctx, &caller, &q)).await
        }
        (&Method::GET, ["verify"]) => {
            blocking(move || super::trail::verify_store(&ctx, &caller)).await
        }
        (&Method::GET, ["devices"]) => blocking(move || devices(&ctx, &caller)).await,
        (&Method::POST, ["devices", "approve"]) => {
            require_admin(&caller)?;
            let body: ApproveRequest = read_json(req).await?;
            blocking(move || approve(&ctx, &caller, &body)).await
        }
        (&Method::GET, ["tokens"]) => blocking(move || tokens(&ctx, &caller)).await,
        (&Method::POST, ["tokens"]) => {
            require_admin(&caller)?;
            let body: TokenCreate = read_json(req).await?;
            blocking(move || create_token(&ctx, &caller, body)).await
        }
        (&Method::POST, ["tokens", id, "revoke"]) => {
            require_admin(&caller)?;
            let id = id.to_string();
            blocking(move || revoke_token(&ctx, &caller, &id)).await
        }
        (_, ["me" | "sessions" | "flows" | "http" | "verify" | "devices" | "tokens", ..]) => Err(
            ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed here"),
        ),
        _ => Err(ApiError::new(ErrorCode::NotFound, "no such API endpoint")),
    }
}

async fn blocking(
    f: impl FnOnce() -> Result<Resp, ApiError> + Send + 'static,
) -> Result<Resp, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

fn require_admin(c: &Caller) -> Result<(), ApiError> {
    if c.account.role != Role::Admin {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "this needs the admin role (auditors read only)",
        ));
    }
    Ok(())
}

fn query_pairs(q: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v).ok_or_else(|| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("filter {k:?} is not valid percent-encoded UTF-8"),
            )
        })?;
        if v.len() > MAX_FILTER {
            return Err(ApiError::new(
                ErrorCode::QueryTooLong,
                format!("filter {k:?} is longer than {MAX_FILTER} bytes"),
            ));
        }
        out.push((k.to_string(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::enrollment::qr_svg;
    use super::*;

    #[test]
    fn filters_are_decoded_and_bounded() {
        let q = query_pairs(Some("user=alice%40example.com&q=rm+-rf")).unwrap();
        assert_eq!(q[0], ("user".into(), "alice@example.com".into()));
        assert_eq!(q[1], ("q".into(), "rm -rf".into()));
        let long = format!("q={}", "a".repeat(MAX_FILTER + 1));
        assert_eq!(
            query_pairs(Some(&long)).unwrap_err().error,
            ErrorCode::QueryTooLong
        );
        assert_eq!(
            query_pairs(Some("q=%ff")).unwrap_err().error,
            ErrorCode::BadRequest
        );
        assert!(qr_svg("rampart://gw:8443/?pin=sha256:00")
            .unwrap()
            .starts_with("<svg"));
    }
}
