//! The JSON API over the rest of the audit trail: flows (`/api/v1/flows`), HTTP requests (`/api/v1/http`)
//! and verification of the whole chain (`/api/v1/verify`). The rows come from `audit::review` (the functions
//! behind `rampart audit flows`, `audit http` and `audit verify`), so the CLI and the web agree.
//!
//! Scoping: the caller's tenants go into the query itself (a page is never filled with rows it then hides);
//! asking for a tenant outside the caller's scope is `not_found`, like another tenant's session.
#![deny(unsafe_code)]

use std::path::PathBuf;

use http::StatusCode;
use serde::Serialize;

use super::accounts::Scope;
use super::headers::{json, ApiError, ErrorCode, Resp};
use super::web::{Caller, Ctx};
use crate::audit::review::flows::{self, FlowFilter, FlowLinks, FlowRow, FlowStore};
use crate::audit::review::http::{self as http_review, HttpFilter, HttpRow};
use crate::audit::review::verify;

/// Most rows one page returns.
const MAX_PAGE: usize = 200;
const DEFAULT_PAGE: usize = 50;

/// The query parameters of a list call, checked against the names it takes.
pub(super) struct Params<'a> {
    pairs: &'a [(String, String)],
}

impl<'a> Params<'a> {
    pub(super) fn new(pairs: &'a [(String, String)], allowed: &[&str]) -> Result<Self, ApiError> {
        for (k, _) in pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "unknown filter {k:?}; this call takes {}",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(Params { pairs })
    }

    pub(super) fn get(&self, k: &str) -> Option<String> {
        self.pairs
            .iter()
            .find(|(key, v)| key == k && !v.is_empty())
            .map(|(_, v)| v.clone())
    }

    pub(super) fn limit(&self) -> Result<usize, ApiError> {
        match self.get("limit") {
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::BadRequest, format!("limit is 1-{MAX_PAGE}"))
                }),
            None => Ok(DEFAULT_PAGE),
        }
    }

    /// `from` / `to`: a duration back from now (`15m`, `2h`, `7d`) or a UTC time.
    pub(super) fn time(&self, k: &str, now_ms: i64) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .map(|v| {
                crate::clock::parse_since(&v, now_ms)
                    .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("{k}: {e}")))
            })
            .transpose()
    }

    /// A numeric filter (`flow`, `id`).
    pub(super) fn number(&self, k: &str) -> Result<Option<i64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::new(ErrorCode::BadRequest, format!("{k}: {v:?} is not a number"))
                })
            })
            .transpose()
    }

    /// The cursor this API gave out as `next_cursor`: `<ms>:<row id>`.
    fn cursor(&self) -> Result<Option<(i64, i64)>, ApiError> {
        self.get("cursor")
            .map(|c| parse_cursor(&c).ok_or_else(bad_cursor))
            .transpose()
    }

    /// The caller's scope as a query filter; an explicit tenant outside it is `not_found`.
    pub(super) fn scope(
        &self,
        caller: &Caller,
    ) -> Result<(Option<String>, Option<Vec<String>>), ApiError> {
        let tenant = self.get("tenant");
        if tenant.as_ref().is_some_and(|t| !caller.account.sees(t)) {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "no such tenant (or not one of yours)",
            ));
        }
        let tenant_in = match &caller.account.scope {
            Scope::All => None,
            Scope::Tenants(t) => Some(t.clone()),
        };
        Ok((tenant, tenant_in))
    }
}

fn parse_cursor(c: &str) -> Option<(i64, i64)> {
    let (ms, id) = c.split_once(':')?;
    Some((ms.parse().ok()?, id.parse().ok()?))
}

pub(super) fn bad_cursor() -> ApiError {
    ApiError::new(
        ErrorCode::BadCursor,
        "the cursor is not one this API gave out (next_cursor); start again from the first page",
    )
}

#[derive(Serialize)]
struct FlowItem {
    #[serde(flatten)]
    flow: FlowRow,
    #[serde(flatten)]
    links: FlowLinks,
}

#[derive(Serialize)]
struct Page<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<T> Page<T> {
    fn empty() -> Page<T> {
        Page {
            items: Vec::new(),
            next_cursor: None,
        }
    }
}

/// `GET /api/v1/flows`: the filters of `rampart audit flows` (tenant, user, device, dst) plus action, flow id,
/// a time range and the cursor; newest first.
pub fn list_flows(ctx: &Ctx, caller: &Caller, q: &[(String, String)]) -> Result<Resp, ApiError> {
    let p = Params::new(
        q,
        &[
            "tenant", "user", "device", "dst", "action", "id", "from", "to", "cursor", "limit",
        ],
    )?;
    let now = crate::clock::unix_ms();
    let (tenant, tenant_in) = p.scope(caller)?;
    let limit = p.limit()?;
    let filter = FlowFilter {
        tenant,
        tenant_in,
        user: p.get("user"),
        device: p.get("device"),
        dst: p
            .get("dst")
            .map(|d| flows::parse_dst(&d))
            .transpose()
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("dst: {e}")))?,
        action: p.get("action"),
        id: p.number("id")?,
        since_ms: p.time("from", now)?,
        until_ms: p.time("to", now)?,
        before: p.cursor()?,
        // One more than a page tells whether there is a next one.
        limit: limit + 1,
    };
    let cfg = ctx.config();
    if !cfg.audit.path.exists() {
        return Ok(json(StatusCode::OK, &Page::<FlowItem>::empty()));
    }
    let store = FlowStore::open(&cfg.audit.path).map_err(ApiError::internal)?;
    let mut rows = store.flows(&filter).map_err(ApiError::internal)?;
    let next_cursor = next(&mut rows, limit, |r| (r.started_ms, r.id));
    let items = rows
        .into_iter()
        .map(|flow| {
            let links = store.links(&flow)?;
            Ok(FlowItem { flow, links })
        })
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(ApiError::internal)?;
    Ok(json(StatusCode::OK, &Page { items, next_cursor }))
}

/// `GET /api/v1/http`: the filters of `rampart audit http` (tenant, user, host, flow) plus device, decision, a
/// time range and the cursor; newest first.
pub fn list_http(ctx: &Ctx, caller: &Caller, q: &[(String, String)]) -> Result<Resp, ApiError> {
    let p = Params::new(
        q,
        &[
            "tenant", "user", "device", "host", "decision", "flow", "from", "to", "cursor", "limit",
        ],
    )?;
    let now = crate::clock::unix_ms();
    let (tenant, tenant_in) = p.scope(caller)?;
    let limit = p.limit()?;
    let filter = HttpFilter {
        tenant,
        tenant_in,
        user: p.get("user"),
        device: p.get("device"),
        host: p.get("host"),
        decision: p.get("decision"),
        flow_id: p.number("flow")?,
        since_ms: p.time("from", now)?,
        until_ms: p.time("to", now)?,
        before: p.cursor()?,
        limit: limit + 1,
    };
    let cfg = ctx.config();
    if !cfg.audit.path.exists() {
        return Ok(json(StatusCode::OK, &Page::<HttpRow>::empty()));
    }
    let mut items = http_review::query(&cfg.audit.path, &filter).map_err(ApiError::internal)?;
    let next_cursor = next(&mut items, limit, |r| (r.record.at_ms, r.id));
    Ok(json(StatusCode::OK, &Page { items, next_cursor }))
}

/// Cuts `rows` (a page plus one) to `limit` and returns the cursor of the next page, if there is one.
fn next<T>(rows: &mut Vec<T>, limit: usize, key: impl Fn(&T) -> (i64, i64)) -> Option<String> {
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    rows.last().map(|r| {
        let (ms, id) = key(r);
        format!("{ms}:{id}")
    })
}

/// The key verification used, and whether it was pinned outside the gateway.
#[derive(Serialize)]
struct KeyView {
    fingerprint: String,
    /// `audit.verify_key` (pinned out of band) or `state_dir` (the gateway's own copy: shows edits and lost
    /// records, but a forger who rewrote the store could have re-signed it).
    source: &'static str,
    pinned: bool,
}

#[derive(Serialize)]
struct BreakView {
    seq: u64,
    what: String,
}

/// `GET /api/v1/verify`: a stable shape over `audit::review::verify::VerifyReport`.
#[derive(Serialize)]
struct VerifyView {
    /// `ok` | `broken` | `empty` (no audit store yet).
    status: &'static str,
    ok: bool,
    key: Option<KeyView>,
    records: u64,
    first_seq: u64,
    last_seq: u64,
    by_kind: std::collections::BTreeMap<String, u64>,
    recordings: u64,
    checkpoints: u64,
    last_checkpoint_seq: Option<u64>,
    unsigned_tail: u64,
    gaps: u64,
    records_lost: u64,
    evicted_through: Option<u64>,
    unchained_rows: u64,
    first_break: Option<BreakView>,
    verified_at_ms: i64,
    took_ms: u64,
}

/// `GET /api/v1/verify`: what `rampart audit verify` checks (without an exported head), with the key from
/// `audit.verify_key`, else the gateway's own public key (said so in `key`). Runs on a blocking thread, one
/// at a time (later calls wait their turn).
pub fn verify_store(ctx: &Ctx, caller: &Caller) -> Result<Resp, ApiError> {
    use russh::keys::ssh_key::{HashAlg, PublicKey};
    let cfg = ctx.config();
    let started = std::time::Instant::now();
    let now = crate::clock::unix_ms();
    let state = &cfg.gateway.state_dir;
    let (key_path, source): (PathBuf, _) = match &cfg.audit.verify_key {
        Some(p) => (p.clone(), "audit.verify_key"),
        None => (state.join("audit_signing_key.pub"), "state_dir"),
    };
    if !cfg.audit.path.exists() {
        return Ok(json(
            StatusCode::OK,
            &VerifyView {
                status: "empty",
                ok: true,
                key: None,
                records: 0,
                first_seq: 0,
                last_seq: 0,
                by_kind: Default::default(),
                recordings: 0,
                checkpoints: 0,
                last_checkpoint_seq: None,
                unsigned_tail: 0,
                gaps: 0,
                records_lost: 0,
                evicted_through: None,
                unchained_rows: 0,
                first_break: None,
                verified_at_ms: now,
                took_ms: 0,
            },
        ));
    }
    let unusable = |e: String| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "cannot use the verification key {} ({source}): {e}",
                key_path.display()
            ),
        )
    };
    let text = std::fs::read_to_string(&key_path).map_err(|e| unusable(e.to_string()))?;
    let pinned = PublicKey::from_openssh(text.trim())
        .map_err(|e| unusable(format!("not an OpenSSH public key ({e})")))?;
    let report = {
        let _one_at_a_time = ctx.verify_lock.lock().unwrap_or_else(|p| p.into_inner());
        let conn = crate::audit::db::open_readonly(&cfg.audit.path).map_err(ApiError::internal)?;
        verify::verify(&conn, state, &pinned, None).map_err(ApiError::internal)?
    };
    // Where the chain breaks may name another tenant's session: scoped accounts get the position only.
    let first_break = report.first_break.as_ref().map(|b| BreakView {
        seq: b.seq,
        what: match caller.account.scope {
            Scope::All => b.what.clone(),
            Scope::Tenants(_) => format!(
                "the audit chain breaks at record {}; an all-tenant account or `rampart audit verify` shows what",
                b.seq
            ),
        },
    });
    let ok = first_break.is_none();
    Ok(json(
        StatusCode::OK,
        &VerifyView {
            status: if ok { "ok" } else { "broken" },
            ok,
            key: Some(KeyView {
                fingerprint: pinned.fingerprint(HashAlg::Sha256).to_string(),
                source,
                pinned: source == "audit.verify_key",
            }),
            records: report.records,
            first_seq: report.first_seq,
            last_seq: report.last_seq,
            by_kind: report.by_kind.clone(),
            recordings: report.recordings,
            checkpoints: report.checkpoints,
            last_checkpoint_seq: report.last_checkpoint_seq,
            unsigned_tail: report.unsigned_tail,
            gaps: report.gaps,
            records_lost: report.records_lost,
            evicted_through: report.evicted_through,
            unchained_rows: report.unchained_rows,
            first_break,
            verified_at_ms: now,
            took_ms: started.elapsed().as_millis() as u64,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_and_pages() {
        assert_eq!(
            parse_cursor("1700000000000:42"),
            Some((1_700_000_000_000, 42))
        );
        for bad in [
            "",
            "x",
            "12",
            "12:",
            ":3",
            "a:b",
            "1:2:3",
            "99999999999999999999:1",
        ] {
            assert_eq!(parse_cursor(bad), None, "{bad:?}");
        }
        let mut rows = vec![(5, 1), (4, 2), (3, 3)];
        assert_eq!(next(&mut rows, 2, |r| *r), Some("4:2".into()));
        assert_eq!(rows.len(), 2);
        let mut rows = vec![(5, 1), (4, 2)];
        assert_eq!(next(&mut rows, 2, |r| *r), None);
        let q = vec![("colour".to_string(), "red".to_string())];
        let e = Params::new(&q, &["tenant"]).err().unwrap();
        assert_eq!(e.error, ErrorCode::BadRequest);
    }
}
