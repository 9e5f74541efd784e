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

use super::accounts::Role;
use super::web::{full, json, me, read_json, ApiError, Caller, Ctx, ErrorCode, Resp};
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
            blocking(move || list_sessions(&ctx, &caller, &q)).await
        }
        (&Method::GET, ["sessions", id]) => {
            let id = id.to_string();
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
            blocking(move || recording(&ctx, &caller, &id, ch, &what, gzip)).await
        }
        (&Method::GET, ["sessions", id, "live"]) => live(&ctx, &caller, id),
        (&Method::POST, ["sessions", id, "terminate"]) => terminate(&ctx, &caller, id),
        (&Method::GET, ["flows"]) => {
            let q = query_pairs(req.uri().query())?;
            blocking(move || super::trail::list_flows(&ctx, &caller, &q)).await
        }
        (&Method::GET, ["http"]) => {
            let q = query_pairs(req.uri().query())?;
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

fn open_log(cfg: &Config) -> Result<Option<SshLog>, ApiError> {
    if !cfg.audit.path.exists() {
        return Ok(None);
    }
    match SshLog::open_readonly(&cfg.audit.path) {
        Ok(l) => Ok(Some(l)),
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Serialize)]
struct SessionItem {
    #[serde(flatten)]
    summary: SessionSummary,
    /// `live` | `ended` | `open` (no end record and not running: the gateway stopped during it) | `refused`.
    status: &'static str,
}

#[derive(Serialize)]
struct SessionPage {
    items: Vec<SessionItem>,
    next_cursor: Option<String>,
    /// Sealed command texts the server could not search (`q`); the reviewer's key opens them in the page.
    sealed_commands_not_searched: usize,
}

fn time_filter(v: &str, now_ms: i64) -> Result<i64, ApiError> {
    crate::clock::parse_since(v, now_ms).map_err(|e| ApiError::new(ErrorCode::BadRequest, e))
}

fn list_sessions(ctx: &Ctx, caller: &Caller, q: &[(String, String)]) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let now = crate::clock::unix_ms();
    let get = |k: &str| {
        q.iter()
            .find(|(key, v)| key == k && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    for (k, _) in q {
        if !matches!(
            k.as_str(),
            "tenant"
                | "user"
                | "device"
                | "target"
                | "from"
                | "to"
                | "q"
                | "live"
                | "cursor"
                | "limit"
        ) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("unknown filter {k:?}"),
            ));
        }
    }
    let limit = match get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::new(ErrorCode::BadRequest, format!("limit is 1-{MAX_PAGE}"))
            })?,
        None => 50,
    };
    let from = get("from").map(|v| time_filter(&v, now)).transpose()?;
    let to = get("to").map(|v| time_filter(&v, now)).transpose()?;
    let Some(log) = open_log(&cfg)? else {
        return Ok(json(
            StatusCode::OK,
            &SessionPage {
                items: Vec::new(),
                next_cursor: None,
                sealed_commands_not_searched: 0,
            },
        ));
    };
    let all = review::sessions(
        &log,
        &SessionFilter {
            tenant: get("tenant"),
            user: get("user"),
            target: get("target"),
            since_ms: from,
            limit: usize::MAX,
        },
    )
    .map_err(ApiError::internal)?;
    let (matching, sealed) = match get("q") {
        Some(needle) => {
            let (hits, sealed) = review::search(&log, &needle, None).map_err(ApiError::internal)?;
            (
                Some(
                    hits.into_iter()
                        .map(|h| h.session_id)
                        .collect::<HashSet<_>>(),
                ),
                sealed,
            )
        }
        None => (None, 0),
    };
    let device = get("device");
    let live_only = get("live").is_some_and(|v| v == "1" || v == "true");
    // The cursor is the last item's `started_ms:session_id`; the list is newest first.
    let cursor = get("cursor")
        .map(|c| {
            let (ms, id) = c.split_once(':').ok_or_else(super::trail::bad_cursor)?;
            let ms = ms.parse::<i64>().map_err(|_| super::trail::bad_cursor())?;
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(super::trail::bad_cursor());
            }
            Ok((ms, id.to_string()))
        })
        .transpose()?;
    let mut items = Vec::new();
    let mut next_cursor = None;
    for s in all {
        if !caller.account.sees(&s.tenant)
            || device.as_ref().is_some_and(|d| *d != s.device)
            || to.is_some_and(|t| s.started_ms > t)
            || matching
                .as_ref()
                .is_some_and(|m| !m.contains(&s.session_id))
            || cursor
                .as_ref()
                .is_some_and(|(ms, id)| (s.started_ms, &s.session_id) >= (*ms, id))
        {
            continue;
        }
        let live = ctx.svc.live.is_live(&s.session_id);
        if live_only && !live {
            continue;
        }
        if items.len() == limit {
            next_cursor = items.last().map(|i: &SessionItem| {
                format!("{}:{}", i.summary.started_ms, i.summary.session_id)
            });
            break;
        }
        let status = if live {
            "live"
        } else if s.decision != "allowed" {
            "refused"
        } else if s.ended_ms.is_some() {
            "ended"
        } else {
            "open"
        };
        items.push(SessionItem { summary: s, status });
    }
    Ok(json(
        StatusCode::OK,
        &SessionPage {
            items,
            next_cursor,
            sealed_commands_not_searched: sealed,
        },
    ))
}

#[derive(Serialize, Default)]
struct ChannelView {
    seq: u32,
    kind: String,
    program: String,
    subsystem: Option<String>,
    pty: Option<crate::audit::ssh_records::PtyRequest>,
    command: Option<Secret>,
    opened_ms: i64,
    closed_ms: Option<i64>,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    error: Option<String>,
    bytes_in: u64,
    bytes_out: u64,
    recording: Option<RecordingView>,
}

#[derive(Serialize)]
struct RecordingView {
    format: String,
    sealed: bool,
    pty: bool,
    size: u64,
    sha256: Option<String>,
    complete: bool,
    error: Option<String>,
    /// The file's sha256 equals the one in the chained close record (`None`: cannot be checked).
    intact: Option<bool>,
}

#[derive(Serialize)]
struct CommandView {
    record_seq: u64,
    channel: Option<u32>,
    at_ms: i64,
    /// Seconds from the start of its channel's recording.
    t: f64,
    source: String,
    confidence: String,
    text: Secret,
    truncated: bool,
    /// The exit status of an exec channel (typed lines have none of their own).
    exit_status: Option<u32>,
}

#[derive(Serialize)]
struct ChainView {
    records: usize,
    /// The session's first and last chain positions (a break of the store's chain at or before `last_seq`
    /// touches its records: `/api/v1/verify`).
    first_seq: u64,
    last_seq: u64,
    chained: usize,
    /// The last checkpoint covers every record of the session.
    signed: bool,
    last_checkpoint_ms: Option<i64>,
}

#[derive(Serialize)]
struct SessionView {
    id: String,
    tenant: String,
    user: String,
    device: String,
    target: String,
    login: String,
    rule: String,
    status: &'static str,
    sealed: bool,
    started_ms: i64,
    ended_ms: Option<i64>,
    end_reason: Option<String>,
    end_error: Option<String>,
    start: Option<crate::audit::ssh_records::SessionStart>,
    channels: Vec<ChannelView>,
    commands: Vec<CommandView>,
    files: Vec<CommandView>,
    chain: ChainView,
}

/// The session's rows, if the caller may see it (another tenant's session is `not_found`).
fn scoped_rows(
    cfg: &Config,
    caller: &Caller,
    id: &str,
) -> Result<(SshLog, Vec<crate::audit::ssh_records::LogRow>), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::not_found());
    }
    let log = open_log(cfg)?.ok_or_else(ApiError::not_found)?;
    let rows = log.session_rows(id).map_err(ApiError::internal)?;
    match rows.first() {
        Some(r) if caller.account.sees(&r.keys.tenant) => Ok((log, rows)),
        _ => Err(ApiError::not_found()),
    }
}

fn session_detail(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let (log, rows) = scoped_rows(&cfg, caller, id)?;
    let k = rows[0].keys.clone();
    let mut view = SessionView {
        id: k.session_id.clone(),
        tenant: k.tenant.clone(),
        user: k.user.clone(),
        device: k.device.clone(),
        target: k.target.clone(),
        login: k.login.clone(),
        rule: k.rule.clone(),
        status: "open",
        sealed: false,
        started_ms: rows[0].at_ms,
        ended_ms: None,
        end_reason: None,
        end_error: None,
        start: None,
        channels: Vec::new(),
        commands: Vec::new(),
        files: Vec::new(),
        chain: ChainView {
            records: rows.len(),
            first_seq: rows.iter().map(|r| r.seq).min().unwrap_or(0),
            last_seq: rows.iter().map(|r| r.seq).max().unwrap_or(0),
            chained: rows.iter().filter(|r| !r.hash.is_empty()).count(),
            signed: false,
            last_checkpoint_ms: None,
        },
    };
    for r in &rows {
        // Login is known only after authentication; later records carry it.
        if view.login.is_empty() {
            view.login = r.keys.login.clone();
        }
        match r.event() {
            Some(SshEvent::SessionStart(s)) => {
                if s.decision != "allowed" {
                    view.status = "refused";
                }
                view.start = Some(s);
            }
            Some(SshEvent::SessionEnd(e)) => {
                view.ended_ms = Some(r.at_ms);
                view.end_reason = Some(e.reason);
                view.end_error = e.error;
                if view.status == "open" {
                    view.status = "ended";
                }
            }
            Some(SshEvent::ChannelOpen(o)) => view.channels.push(ChannelView {
                seq: r.channel_seq.unwrap_or(0),
                kind: o.kind,
                program: o.program,
                subsystem: o.subsystem,
                pty: o.pty,
                command: o.command.map(|c| c.text),
                opened_ms: r.at_ms,
                ..Default::default()
            }),
            Some(SshEvent::ChannelClose(c)) => {
                if let Some(ch) = view
                    .channels
                    .iter_mut()
                    .find(|ch| Some(ch.seq) == r.channel_seq)
                {
                    ch.closed_ms = Some(r.at_ms);
                    ch.exit_status = c.exit_status;
                    ch.exit_signal = c.exit_signal;
                    ch.error = c.error;
                    ch.bytes_in = c.bytes_in;
                    ch.bytes_out = c.bytes_out;
                    ch.recording = c.recording.map(|rec| {
                        let intact = rec.sha256.as_ref().map(|want| {
                            crate::audit::ssh_records::file_sha256(
                                &cfg.gateway.state_dir.join(&rec.path),
                            )
                            .is_ok_and(|(got, _)| got == *want)
                        });
                        RecordingView {
                            sealed: rec.format == crate::ssh::recorder::FORMAT_SEALED,
                            format: rec.format,
                            pty: rec.pty,
                            size: rec.size,
                            sha256: rec.sha256,
                            complete: rec.complete,
                            error: rec.error,
                            intact,
                        }
                    });
                }
            }
            Some(SshEvent::Command(c)) => {
                let opened = view
                    .channels
                    .iter()
                    .find(|ch| Some(ch.seq) == r.channel_seq)
                    .map(|ch| ch.opened_ms)
                    .unwrap_or(r.at_ms);
                let cmd = CommandView {
                    record_seq: r.seq,
                    channel: r.channel_seq,
                    at_ms: r.at_ms,
                    t: (r.at_ms - opened).max(0) as f64 / 1000.0,
                    source: c.source.clone(),
                    confidence: c.confidence,
                    text: c.command.text,
                    truncated: c.command.truncated,
                    exit_status: None,
                };
                if c.source == "sftp_op" {
                    view.files.push(cmd);
                } else {
                    view.commands.push(cmd);
                }
            }
            _ => {}
        }
    }
    for cmd in view.commands.iter_mut().filter(|c| c.source == "exec") {
        cmd.exit_status = view
            .channels
            .iter()
            .find(|ch| Some(ch.seq) == cmd.channel)
            .and_then(|ch| ch.exit_status);
    }
    if ctx.svc.live.is_live(id) {
        view.status = "live";
    }
    // Sealing is per recording and per text (a tenant may have got its reviewer key after this session).
    view.sealed = view
        .channels
        .iter()
        .any(|c| c.recording.as_ref().is_some_and(|r| r.sealed))
        || view
            .commands
            .iter()
            .chain(view.files.iter())
            .any(|c| c.text.is_sealed());
    let last_seq = rows.iter().map(|r| r.seq).max().unwrap_or(0);
    if let Some(cp) = log
        .checkpoints()
        .map_err(ApiError::internal)?
        .into_iter()
        .rev()
        .find(|cp| cp.seq >= last_seq)
    {
        view.chain.signed = view.chain.chained == view.chain.records;
        view.chain.last_checkpoint_ms = Some(cp.at_ms);
    }
    ctx.svc.audit.emit(
        AdminEvent::SessionRead,
        &caller.actor(),
        Some(&view.tenant),
        Some(id),
        Some(caller.source),
        serde_json::json!({}),
    );
    Ok(json(StatusCode::OK, &view))
}

fn recording(
    ctx: &Ctx,
    caller: &Caller,
    id: &str,
    ch: u32,
    what: &str,
    gzip: bool,
) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let (log, rows) = scoped_rows(&cfg, caller, id)?;
    let tenant = rows[0].keys.tenant.clone();
    let Some((_, info, _)) = review::recordings(&log, id)
        .map_err(ApiError::internal)?
        .into_iter()
        .find(|(seq, _, _)| *seq == ch)
    else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this channel has no finished recording (a live session's channels are watched with /live)",
        ));
    };
    let sealed = info.format == crate::ssh::recorder::FORMAT_SEALED;
    let path = cfg.gateway.state_dir.join(&info.path);
    let body = match (what, sealed) {
        ("blob", true) => std::fs::read(&path).map_err(ApiError::internal)?,
        ("blob", false) => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "this recording is not sealed; fetch its cast",
            ))
        }
        (_, true) => {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "this recording is sealed to the tenant's reviewer key; fetch its blob and open it in the page",
            ))
        }
        (_, false) => {
            let decoded = review::load_recording(&cfg.gateway.state_dir, &info, None)
                .map_err(ApiError::internal)?;
            let k = &rows[0].keys;
            let meta = CastMeta {
                session_id: k.session_id.clone(),
                channel_seq: ch,
                user: k.user.clone(),
                device: k.device.clone(),
                target: k.target.clone(),
                login: k.login.clone(),
                command: None,
            };
            let mut out = Vec::new();
            review::write_cast(&decoded, &meta, &mut out).map_err(|e| {
                ApiError::new(ErrorCode::NotFound, format!("cannot show as a terminal: {e}"))
            })?;
            out
        }
    };
    ctx.svc.audit.emit(
        AdminEvent::RecordingRead,
        &caller.actor(),
        Some(&tenant),
        Some(id),
        Some(caller.source),
        serde_json::json!({ "channel": ch, "form": what }),
    );
    let ctype = if what == "blob" {
        "application/octet-stream"
    } else {
        "application/x-asciicast"
    };
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        if enc.write_all(&body).is_ok() {
            if let Ok(z) = enc.finish() {
                let mut r = full(StatusCode::OK, ctype, z);
                r.headers_mut().insert(
                    http::header::CONTENT_ENCODING,
                    http::HeaderValue::from_static("gzip"),
                );
                return Ok(r);
            }
        }
    }
    Ok(full(StatusCode::OK, ctype, body))
}

fn live(ctx: &Arc<Ctx>, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let Some(tenant) = ctx.svc.live.tenant_of(id) else {
        return Err(ApiError::new(
            ErrorCode::NotLive,
            "the session is not running (any more)",
        ));
    };
    if !caller.account.sees(&tenant) {
        return Err(ApiError::not_found());
    }
    let viewer = ctx.svc.live.view(id).map_err(|e| match e {
        crate::ssh::live::ViewError::NotLive => {
            ApiError::new(ErrorCode::NotLive, "the session is not running (any more)")
        }
        crate::ssh::live::ViewError::Sealed => ApiError::new(
            ErrorCode::LiveSealed,
            "this tenant's sessions are sealed to its reviewer key: the gateway does not show them live",
        ),
    })?;
    ctx.svc.audit.emit(
        AdminEvent::LiveViewed,
        &caller.actor(),
        Some(&tenant),
        Some(id),
        Some(caller.source),
        serde_json::json!({}),
    );
    use base64::Engine as _;
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let first = Bytes::from(format!(
        ": rampart live view\n\ndata: {}\n\n",
        b64(&viewer.backlog)
    ));
    // An event with empty data is never dispatched by browsers: the end event says "end".
    let end = || Bytes::from("event: end\ndata: end\n\n");
    let stream = futures::stream::unfold(
        (Some(first), viewer.output, viewer.ended, false),
        move |(first, mut rx, mut ended, done)| async move {
            if let Some(f) = first {
                return Some((f, (None, rx, ended, false)));
            }
            if done {
                return None;
            }
            let ev = tokio::select! {
                r = rx.recv() => match r {
                    Ok(chunk) => format!("data: {}\n\n", b64(&chunk.data)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        format!("event: lagged\ndata: {n}\n\n")
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Some((end(), (None, rx, ended, true)));
                    }
                },
                _ = ended.changed() => return Some((end(), (None, rx, ended, true))),
            };
            Some((Bytes::from(ev), (None, rx, ended, false)))
        },
    );
    use futures::StreamExt as _;
    let body = StreamBody::new(stream.map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))));
    let mut r = http::Response::new(body.boxed_unsync());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(r)
}

fn terminate(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let Some(tenant) = ctx.svc.live.tenant_of(id) else {
        return Err(ApiError::new(
            ErrorCode::NotLive,
            "the session is not running (any more)",
        ));
    };
    if !caller.account.sees(&tenant) {
        return Err(ApiError::not_found());
    }
    require_admin(caller)?;
    let r = ctx.svc.live.terminate(id, &caller.actor());
    if r == crate::ssh::live::Terminate::NotLive {
        return Err(ApiError::new(
            ErrorCode::NotLive,
            "the session is not running (any more)",
        ));
    }
    ctx.svc.audit.emit(
        AdminEvent::SessionTerminated,
        &caller.actor(),
        Some(&tenant),
        Some(id),
        Some(caller.source),
        serde_json::json!({}),
    );
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "ok": true }),
    ))
}

#[derive(Serialize)]
struct DeviceView {
    tenant: String,
    name: String,
    user: String,
    address: String,
    groups: Vec<String>,
    /// `config` | `enrolled` | `token`.
    origin: &'static str,
    /// `active` | `pending`.
    state: &'static str,
}

fn devices(ctx: &Ctx, caller: &Caller) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let mut out = Vec::new();
    for t in cfg
        .tenants
        .iter()
        .filter(|t| caller.account.sees(t.id.as_str()))
    {
        for d in &t.devices {
            out.push(DeviceView {
                tenant: t.id.to_string(),
                name: d.name.to_string(),
                user: d.user.to_string(),
                address: d.address.to_string(),
                groups: d.groups.clone(),
                origin: match d.origin {
                    crate::config::DeviceOrigin::Config => "config",
                    crate::config::DeviceOrigin::Enrolled => "enrolled",
                    crate::config::DeviceOrigin::Token => "token",
                },
                state: "active",
            });
        }
    }
    let pending =
        crate::enroll::admin::devices(&cfg.gateway.state_dir).map_err(ApiError::internal)?;
    for d in pending.into_iter().filter(|d| {
        d.state == crate::enroll::api::DeviceState::Pending
            && caller.account.sees(d.tenant.as_str())
    }) {
        out.push(DeviceView {
            tenant: d.tenant.to_string(),
            name: d.name.to_string(),
            user: d.user.to_string(),
            address: d.address.to_string(),
            groups: d.groups.clone(),
            origin: "token",
            state: "pending",
        });
    }
    Ok(json(StatusCode::OK, &serde_json::json!({ "items": out })))
}

#[derive(serde::Deserialize)]
struct ApproveRequest {
    tenant: String,
    name: String,
}

fn enroll_audit(ctx: &Ctx) -> crate::enroll::audit::AuditLog {
    crate::enroll::audit::AuditLog::Pipeline(ctx.svc.enroll_audit.clone())
}

fn admin_error(e: crate::enroll::admin::AdminError) -> ApiError {
    use crate::enroll::admin::AdminError as E;
    match e {
        E::NoTenant(_) | E::NoToken(_) | E::NoDevice { .. } => {
            ApiError::new(ErrorCode::NotFound, e.to_string())
        }
        E::BadTokenId(_) | E::NotPending(_) | E::Ttl | E::Uses => {
            ApiError::new(ErrorCode::BadRequest, e.to_string())
        }
        other => ApiError::internal(other),
    }
}

fn approve(ctx: &Ctx, caller: &Caller, body: &ApproveRequest) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    if !caller.account.sees(&body.tenant) {
        return Err(ApiError::not_found());
    }
    let now = crate::clock::unix_secs() as i64;
    crate::enroll::admin::approve_device(
        &cfg,
        &body.tenant,
        &body.name,
        &caller.actor(),
        now,
        &enroll_audit(ctx),
    )
    .map_err(admin_error)?;
    ctx.svc.audit.emit(
        AdminEvent::DeviceApproved,
        &caller.actor(),
        Some(&body.tenant),
        None,
        Some(caller.source),
        serde_json::json!({ "device": body.name }),
    );
    let applied = (ctx.svc.reload)();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "ok": true, "applied": applied.is_ok(), "message": applied.unwrap_or_else(|e| e) }),
    ))
}

#[derive(Serialize)]
struct TokenView {
    id: String,
    tenant: String,
    user: Option<String>,
    groups: Vec<String>,
    max_uses: Option<u32>,
    used: u32,
    created_at: i64,
    expires_at: i64,
    preapproved: bool,
    state: &'static str,
    created_by: String,
    note: String,
}

fn token_view(t: &crate::enroll::store::TokenRow, now: i64) -> TokenView {
    TokenView {
        id: t.id.to_string(),
        tenant: t.tenant.to_string(),
        user: t.user.as_ref().map(|u| u.to_string()),
        groups: t.groups.clone(),
        max_uses: t.max_uses,
        used: t.used,
        created_at: t.created_at,
        expires_at: t.expires_at,
        preapproved: t.preapproved,
        state: t.state(now).as_str(),
        created_by: t.created_by.clone(),
        note: t.note.clone(),
    }
}

fn tokens(ctx: &Ctx, caller: &Caller) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let now = crate::clock::unix_secs() as i64;
    let items: Vec<TokenView> = crate::enroll::admin::list_tokens(&cfg.gateway.state_dir)
        .map_err(ApiError::internal)?
        .iter()
        .filter(|t| caller.account.sees(t.tenant.as_str()))
        .map(|t| token_view(t, now))
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "items": items })))
}

#[derive(serde::Deserialize)]
struct TokenCreate {
    tenant: String,
    user: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    max_uses: Option<u32>,
    ttl_secs: Option<u64>,
    #[serde(default)]
    pending: bool,
    #[serde(default)]
    note: String,
}

fn create_token(ctx: &Ctx, caller: &Caller, body: TokenCreate) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    if !caller.account.sees(&body.tenant) {
        return Err(ApiError::not_found());
    }
    let user = body
        .user
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(crate::config::UserName::parse)
        .transpose()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("user: {e}")))?;
    let now = crate::clock::unix_secs() as i64;
    let req = crate::enroll::admin::TokenRequest {
        tenant: body.tenant.clone(),
        user,
        groups: body.groups,
        max_uses: body.max_uses.or(Some(1)),
        ttl: std::time::Duration::from_secs(
            body.ttl_secs
                .unwrap_or(crate::enroll::admin::DEFAULT_TTL.as_secs()),
        ),
        ephemeral: None,
        preapproved: !body.pending,
        note: body.note.chars().take(200).collect(),
    };
    let t = crate::enroll::admin::create_token(&cfg, req, &caller.actor(), now, &enroll_audit(ctx))
        .map_err(admin_error)?;
    let url = crate::enroll::admin::listener_authority(&cfg).and_then(|authority| {
        let pins = crate::enroll::admin::listener_identity(&cfg).ok()?.pins;
        Some(crate::enroll::admin::enrollment_url(
            &authority,
            &pins.url_pin(),
            Some(&t.token),
        ))
    });
    let qr_svg = url.as_deref().and_then(qr_svg);
    ctx.svc.audit.emit(
        AdminEvent::TokenCreated,
        &caller.actor(),
        Some(&body.tenant),
        None,
        Some(caller.source),
        serde_json::json!({ "token": t.row.id.to_string() }),
    );
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({
            "token": t.token,
            "url": url,
            "qr_svg": qr_svg,
            "row": token_view(&t.row, now),
        }),
    ))
}

/// A QR code as a small SVG document (black modules as one path), for an `<img>` data URL.
fn qr_svg(text: &str) -> Option<String> {
    let code = qrcode::QrCode::new(text.as_bytes()).ok()?;
    let w = code.width();
    let colors = code.to_colors();
    let mut d = String::new();
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            d += &format!("M{} {}h1v1h-1z", i % w + 4, i / w + 4);
        }
    }
    let size = w + 8;
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" shape-rendering=\"crispEdges\"><rect width=\"{size}\" height=\"{size}\" fill=\"#fff\"/><path fill=\"#000\" d=\"{d}\"/></svg>"
    ))
}

fn revoke_token(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let tid = crate::enroll::admin::parse_token_id(id).map_err(admin_error)?;
    let row = crate::enroll::admin::list_tokens(&cfg.gateway.state_dir)
        .map_err(ApiError::internal)?
        .into_iter()
        .find(|t| t.id == tid && caller.account.sees(t.tenant.as_str()))
        .ok_or_else(ApiError::not_found)?;
    let now = crate::clock::unix_secs() as i64;
    crate::enroll::admin::revoke_token(&cfg, id, &caller.actor(), now, &enroll_audit(ctx))
        .map_err(admin_error)?;
    ctx.svc.audit.emit(
        AdminEvent::TokenRevoked,
        &caller.actor(),
        Some(row.tenant.as_str()),
        None,
        Some(caller.source),
        serde_json::json!({ "token": row.id.to_string() }),
    );
    Ok(json(StatusCode::OK, &serde_json::json!({ "ok": true })))
}

#[cfg(test)]
mod tests {
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
