//! The review API over the whole fleet (`fleet=1` on `/api/v1/flows`, `/api/v1/http`, `/api/v1/sessions`
//! and a session's `channels/N/cast|blob`), when the gateway has `[fleet]`: the records every node shipped
//! to PostgreSQL, each item with its `node` (and a `node` filter), from the functions behind
//! `rampart audit … --fleet` (`fleet::review`, `fleet::ssh_review`), so the CLI and the web agree. A
//! recording of any node is fetched from the object store and verified against its manifest and the hash in
//! its audit record before a byte of it is served (as `audit ssh replay --fleet` does).
//!
//! Scoping is the local API's: the caller's tenants go into the query, another tenant's session is
//! `not_found`. Known limits: one page per call (no cursor; `limit` up to 200), no full-text search over
//! the fleet's commands, and a node's records appear once it shipped them (seconds while PostgreSQL is up).
#![deny(unsafe_code)]

use std::future::Future;
use std::path::Path;

use http::StatusCode;
use serde::Serialize;

use super::super::headers::{json, ApiError, ErrorCode, Resp};
use super::super::web::{Caller, Ctx};
use crate::admin::trail::Params;
use crate::audit::admin_records::AdminEvent;
use crate::audit::review::ssh::{self as review, CastMeta, SessionFilter};
use crate::fleet::objects::ObjectError;
use crate::fleet::review::{FleetFlowFilter, FleetHttpFilter};
use crate::fleet::ReviewAccess;

/// Whether a list call asks for the fleet (`fleet=1`, `fleet=true` or a bare `fleet`).
pub(super) fn wanted(q: &[(String, String)]) -> bool {
    q.iter()
        .any(|(k, v)| k == "fleet" && matches!(v.as_str(), "" | "1" | "true"))
}

fn access(ctx: &Ctx) -> Result<&ReviewAccess, ApiError> {
    ctx.svc.fleet.as_deref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            "this gateway has no [fleet]; fleet=1 reviews what every node shipped to the fleet's PostgreSQL",
        )
    })
}

/// Runs `f` with a connection to the fleet's PostgreSQL (one per call, on the UI's runtime; the caller is on
/// a blocking thread).
fn with_pg<T, F, Fut>(a: &ReviewAccess, f: F) -> Result<T, ApiError>
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let rt = tokio::runtime::Handle::current();
    rt.block_on(async {
        let client = a.connector.connect().await.map_err(|e| {
            tracing::warn!(error = %e, "review UI: the fleet's PostgreSQL is not reachable");
            ApiError::new(
                ErrorCode::Unavailable,
                "the fleet's PostgreSQL is not reachable; this node's own records are listed without fleet=1",
            )
        })?;
        f(client).await
    })
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "review UI: reading the fleet's records failed");
    ApiError::new(
        ErrorCode::Unavailable,
        "reading the fleet's records failed; see the gateway log",
    )
}

/// The query parameters of a fleet list call: `allowed` and `fleet` itself.
fn params<'a>(q: &'a [(String, String)], allowed: &[&str]) -> Result<Params<'a>, ApiError> {
    let all: Vec<&str> = allowed.iter().copied().chain(["fleet"]).collect();
    Params::new(q, &all)
}

#[derive(Serialize)]
struct Page<T> {
    items: Vec<T>,
    /// Always `None`: a fleet list is one page (narrow it with filters).
    next_cursor: Option<String>,
}

/// `GET /api/v1/flows?fleet=1`: node, tenant, user, device, from, limit.
pub(super) fn list_flows(
    ctx: &Ctx,
    caller: &Caller,
    q: &[(String, String)],
) -> Result<Resp, ApiError> {
    let p = params(q, &["node", "tenant", "user", "device", "from", "limit"])?;
    let (tenant, tenant_in) = p.scope(caller)?;
    let f = FleetFlowFilter {
        node: p.get("node"),
        tenant,
        tenant_in,
        user: p.get("user"),
        device: p.get("device"),
        since_ms: p.time("from", crate::clock::unix_ms())?,
        limit: p.limit()?,
    };
    let items = with_pg(access(ctx)?, |c| async move {
        crate::fleet::review::flows(&c, &f)
            .await
            .map_err(|e| unavailable(crate::fleet::error_text(&e)))
    })?;
    Ok(json(
        StatusCode::OK,
        &Page {
            items,
            next_cursor: None,
        },
    ))
}

/// `GET /api/v1/http?fleet=1`: node, tenant, user, device, host, decision, flow (with node), from, limit.
pub(super) fn list_http(
    ctx: &Ctx,
    caller: &Caller,
    q: &[(String, String)],
) -> Result<Resp, ApiError> {
    let p = params(
        q,
        &[
            "node", "tenant", "user", "device", "host", "decision", "flow", "from", "limit",
        ],
    )?;
    let (tenant, tenant_in) = p.scope(caller)?;
    let flow_id = p.number("flow")?;
    let f = FleetHttpFilter {
        node: p.get("node"),
        tenant,
        tenant_in,
        user: p.get("user"),
        device: p.get("device"),
        host: p.get("host"),
        decision: p.get("decision"),
        flow_id,
        since_ms: p.time("from", crate::clock::unix_ms())?,
        limit: p.limit()?,
    };
    let items = with_pg(access(ctx)?, |c| async move {
        crate::fleet::review::http_records(&c, &f)
            .await
            .map_err(unavailable)
    })?;
    Ok(json(
        StatusCode::OK,
        &Page {
            items,
            next_cursor: None,
        },
    ))
}

/// `GET /api/v1/sessions?fleet=1`: node, tenant, user, device, target, from, limit.
pub(super) fn list_sessions(
    ctx: &Ctx,
    caller: &Caller,
    q: &[(String, String)],
) -> Result<Resp, ApiError> {
    let p = params(
        q,
        &[
            "node", "tenant", "user", "device", "target", "from", "limit",
        ],
    )?;
    let (tenant, _) = p.scope(caller)?;
    let limit = p.limit()?;
    let f = SessionFilter {
        tenant,
        user: p.get("user"),
        target: p.get("target"),
        since_ms: p.time("from", crate::clock::unix_ms())?,
        limit: usize::MAX,
    };
    let all = with_pg(access(ctx)?, |c| async move {
        crate::fleet::ssh_review::sessions(&c, &f)
            .await
            .map_err(|e| unavailable(format!("{e:#}")))
    })?;
    let (node, device) = (p.get("node"), p.get("device"));
    let items: Vec<_> = all
        .into_iter()
        .filter(|s| {
            caller.account.sees(&s.session.tenant)
                && node.as_ref().is_none_or(|n| *n == s.node)
                && device.as_ref().is_none_or(|d| *d == s.session.device)
        })
        .take(limit)
        .collect();
    Ok(json(
        StatusCode::OK,
        &Page {
            items,
            next_cursor: None,
        },
    ))
}

/// `GET /api/v1/sessions/{id}?fleet=1`: a session of any node as the local call shows one, with its `node`,
/// from the records the node shipped. Its recordings are checked when they are fetched (`recording`), so
/// `intact` is not known here; a shipped log has no checkpoints, so `chain.signed` is false.
pub(super) fn session_detail(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let a = access(ctx)?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(ApiError::not_found());
    }
    let id = id.to_owned();
    let view = with_pg(a, |c| async move {
        let s = crate::fleet::ssh_review::session(&c, &id)
            .await
            .map_err(|e| {
                tracing::debug!(error = %format!("{e:#}"), "review UI: fleet session lookup");
                ApiError::not_found()
            })?;
        let rows = s
            .log
            .session_rows(&s.session_id)
            .map_err(ApiError::internal)?;
        match rows.first() {
            Some(r) if caller.account.sees(&r.keys.tenant) => {}
            _ => return Err(ApiError::not_found()),
        }
        let mut view = super::sessions::session_view(&rows, &[], |_| None)?;
        view.node = Some(s.node);
        Ok(view)
    })?;
    ctx.svc.audit.emit(
        AdminEvent::SessionRead,
        &caller.actor(),
        Some(&view.tenant),
        Some(&view.id),
        Some(caller.source),
        serde_json::json!({ "node": view.node }),
    );
    Ok(json(StatusCode::OK, &view))
}

/// `GET /api/v1/sessions/{id}/channels/{ch}/cast|blob?fleet=1`: a recording of any node, from the object
/// store, verified first; as the local call, a sealed one only as `blob` (opened in the page).
pub(super) fn recording(
    ctx: &Ctx,
    caller: &Caller,
    id: &str,
    ch: u32,
    what: &str,
    gzip: bool,
) -> Result<Resp, ApiError> {
    let a = access(ctx)?;
    let Some(objects) = a.objects.clone() else {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "this gateway has no [fleet.objects]; recordings of other nodes are fetched from the fleet's object store",
        ));
    };
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(ApiError::not_found());
    }
    let id = id.to_owned();
    let (node, tenant, meta, rec, bytes) = with_pg(a, |c| async move {
        // Any failure to find it (no such session, or several nodes claim it) is `not_found` here; the
        // reason is in the gateway log.
        let s = crate::fleet::ssh_review::session(&c, &id)
            .await
            .map_err(|e| {
                tracing::debug!(error = %format!("{e:#}"), "review UI: fleet session lookup");
                ApiError::not_found()
            })?;
        let rows = s
            .log
            .session_rows(&s.session_id)
            .map_err(ApiError::internal)?;
        let Some(first) = rows.first() else {
            return Err(ApiError::not_found());
        };
        if !caller.account.sees(&first.keys.tenant) {
            return Err(ApiError::not_found());
        }
        let k = first.keys.clone();
        let rec = crate::fleet::ssh_review::recordings(&s, &objects.settings().prefix)
            .map_err(ApiError::internal)?
            .into_iter()
            .find(|r| r.channel_seq == ch)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    "this channel has no finished recording",
                )
            })?;
        let bytes = crate::fleet::ssh_review::fetch_recording(&objects, &s.session_id, &rec)
            .await
            .map_err(|e| match e {
                ObjectError::NotFound(m) => ApiError::new(ErrorCode::NotFound, m),
                ObjectError::Tampered(m) => {
                    tracing::warn!(object = %rec.object_key, "review UI: refused a recording from the object store: {m}");
                    ApiError::new(
                        ErrorCode::RecordingUnverified,
                        format!("the recording in the object store does not verify; it is not served: {m}"),
                    )
                }
                other => unavailable(other),
            })?;
        let meta = CastMeta {
            session_id: k.session_id.clone(),
            channel_seq: ch,
            user: k.user.clone(),
            device: k.device.clone(),
            target: k.target.clone(),
            login: k.login.clone(),
            command: None,
        };
        Ok((s.node, k.tenant, meta, rec, bytes))
    })?;
    let sealed = rec.info.format == crate::audit::ssh_records::RecordingFormat::SshLogCli;
    let body = match super::sessions::recording_form(what, sealed)? {
        super::sessions::Form::Blob => bytes.to_vec(),
        super::sessions::Form::Cast => {
            let decoded =
                review::decode_recording(&bytes, Path::new(&rec.object_key), &rec.info, None)
                    .map_err(ApiError::internal)?;
            super::sessions::cast_bytes(&decoded, &meta)?
        }
    };
    ctx.svc.audit.emit(
        AdminEvent::RecordingRead,
        &caller.actor(),
        Some(&tenant),
        Some(&meta.session_id),
        Some(caller.source),
        serde_json::json!({ "channel": ch, "form": what, "node": node, "object": rec.object_key }),
    );
    Ok(super::sessions::recording_response(what, gzip, body))
}
