//! The API's SSH session endpoints: list (`GET /sessions`), one session with its channels, commands and chain
//! (`GET /sessions/{id}`), recordings (`cast` rendered, `blob` as stored), the live view and terminate.

use super::*;
use crate::audit::ssh_records::{CommandSource, Confidence, RecordingFormat};

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

pub(super) fn list_sessions(
    ctx: &Ctx,
    caller: &Caller,
    q: &[(String, String)],
) -> Result<Resp, ApiError> {
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
            let (ms, id) = c
                .split_once(':')
                .ok_or_else(crate::admin::trail::bad_cursor)?;
            let ms = ms
                .parse::<i64>()
                .map_err(|_| crate::admin::trail::bad_cursor())?;
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(crate::admin::trail::bad_cursor());
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
    format: RecordingFormat,
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
    source: CommandSource,
    confidence: Confidence,
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
pub(super) struct SessionView {
    /// The node that recorded it, for a session read from the fleet (`?fleet=1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) node: Option<String>,
    pub(super) id: String,
    pub(super) tenant: String,
    user: String,
    device: String,
    target: String,
    login: String,
    rule: String,
    pub(super) status: &'static str,
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

pub(super) fn session_detail(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
    let cfg = ctx.config();
    let (log, rows) = scoped_rows(&cfg, caller, id)?;
    let checkpoints = log.checkpoints().map_err(ApiError::internal)?;
    let mut view = session_view(&rows, &checkpoints, |rec| {
        rec.sha256.as_ref().map(|want| {
            crate::audit::ssh_records::file_sha256(&cfg.gateway.state_dir.join(&rec.path))
                .is_ok_and(|(got, _)| got == *want)
        })
    })?;
    if ctx.svc.live.is_live(id) {
        view.status = "live";
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

/// One session's view from its rows (`rows` non-empty, in chain order) and the checkpoints of the chain they
/// are in (this node's store; none for a node's records read from the fleet: `api::fleet`). `intact` checks a
/// recording's bytes against the hash its close record names (`None`: cannot be checked here).
pub(super) fn session_view(
    rows: &[crate::audit::ssh_records::LogRow],
    checkpoints: &[crate::audit::tables::chain::Checkpoint],
    intact: impl Fn(&crate::audit::ssh_records::RecordingInfo) -> Option<bool>,
) -> Result<SessionView, ApiError> {
    let k = rows[0].keys.clone();
    let mut view = SessionView {
        node: None,
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
    for r in rows {
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
                view.end_reason = Some(e.reason.to_string());
                view.end_error = e.error;
                if view.status == "open" {
                    view.status = "ended";
                }
            }
            Some(SshEvent::ChannelOpen(o)) => view.channels.push(ChannelView {
                seq: r.channel_seq.unwrap_or(0),
                kind: o.kind.to_string(),
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
                        let intact = intact(&rec);
                        RecordingView {
                            sealed: rec.format == RecordingFormat::SshLogCli,
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
                    source: c.source,
                    confidence: c.confidence,
                    text: c.command.text,
                    truncated: c.command.truncated,
                    exit_status: None,
                };
                if c.source == CommandSource::SftpOp {
                    view.files.push(cmd);
                } else {
                    view.commands.push(cmd);
                }
            }
            _ => {}
        }
    }
    for cmd in view
        .commands
        .iter_mut()
        .filter(|c| c.source == CommandSource::Exec)
    {
        cmd.exit_status = view
            .channels
            .iter()
            .find(|ch| Some(ch.seq) == cmd.channel)
            .and_then(|ch| ch.exit_status);
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
    if let Some(cp) = checkpoints.iter().rev().find(|cp| cp.seq >= last_seq) {
        view.chain.signed = view.chain.chained == view.chain.records;
        view.chain.last_checkpoint_ms = Some(cp.at_ms);
    }
    Ok(view)
}

pub(super) fn recording(
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
    let sealed = info.format == RecordingFormat::SshLogCli;
    let path = cfg.gateway.state_dir.join(&info.path);
    let body = match recording_form(what, sealed)? {
        Form::Blob => std::fs::read(&path).map_err(ApiError::internal)?,
        Form::Cast => {
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
            cast_bytes(&decoded, &meta)?
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
    Ok(recording_response(what, gzip, body))
}

/// A decoded recording as asciicast bytes; one that cannot be shown as a terminal is `not_found`, saying why.
pub(super) fn cast_bytes(
    decoded: &crate::audit::capture::DecodedCapture,
    meta: &CastMeta,
) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    review::write_cast(decoded, meta, &mut out).map_err(|e| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("cannot show as a terminal: {e}"),
        )
    })?;
    Ok(out)
}

/// The form of a recording a request may have.
pub(super) enum Form {
    /// The sealed container, opened by the page with the reviewer key.
    Blob,
    /// A plain recording as asciicast.
    Cast,
}

/// What `what` (`blob` or `cast`) gets of a recording: a sealed one only as its blob, a plain one only as its
/// cast; the other asks are `not_found` with what to fetch instead.
pub(super) fn recording_form(what: &str, sealed: bool) -> Result<Form, ApiError> {
    match (what == "blob", sealed) {
        (true, true) => Ok(Form::Blob),
        (false, false) => Ok(Form::Cast),
        (true, false) => Err(ApiError::new(
            ErrorCode::NotFound,
            "this recording is not sealed; fetch its cast",
        )),
        (false, true) => Err(ApiError::new(
            ErrorCode::NotFound,
            "this recording is sealed to the tenant's reviewer key; fetch its blob and open it in the page",
        )),
    }
}

/// A recording as `blob` (the sealed container) or `cast` (asciicast), gzip-encoded when the browser takes it.
pub(super) fn recording_response(what: &str, gzip: bool, body: Vec<u8>) -> Resp {
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
                return r;
            }
        }
    }
    full(StatusCode::OK, ctype, body)
}

pub(super) fn live(ctx: &Arc<Ctx>, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
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

pub(super) fn terminate(ctx: &Ctx, caller: &Caller, id: &str) -> Result<Resp, ApiError> {
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
