//! The async shell of one inspected connection: a hyper server (HTTP/1.1 or HTTP/2, picked by the preface)
//! towards the device; each request is classified (`policy`), answered with a page or forwarded to the
//! `Origin`, and recorded. Bodies stream through `Counted` (never collected); the record is emitted when the
//! response body is done or dropped, so its duration and byte counts cover the whole transfer.
//! `Upgrade` (WebSocket) and allowed `CONNECT` become a byte tunnel after the origin's 101 / 2xx.
#![deny(unsafe_code)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::origin::{Body, Origin};
use super::policy::{self, Identity, RequestFacts};
use super::rewrite;
use super::FlowCtx;
use crate::audit::http_records::{HttpDecision, HttpRecord};
use crate::config::HttpAction;

/// Headers (and the whole idle time between keep-alive requests) must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/1 read buffer: the most header bytes one request may have (431 above).
const MAX_BUF: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
const H2_MAX_STREAMS: u32 = 200;

/// Why the origin cannot be used on this connection (every request gets a 502 page naming it).
#[derive(Debug, Clone)]
pub struct OriginFailure {
    pub rule: &'static str,
    pub detail: String,
}

/// One device connection.
pub struct ConnCtx {
    pub flow: FlowCtx,
    /// `http` or `https` (decrypted).
    pub scheme: &'static str,
    pub sni: Option<String>,
    pub origin: Result<Origin, OriginFailure>,
}

/// Serves the device side until the connection ends.
pub async fn serve<I>(io: I, ctx: Arc<ConnCtx>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let seq = ctx.flow.upgraded.seq;
    let ctx_for_close = ctx.clone();
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx).await) }
    });
    let origin_gone = async {
        match &ctx_for_close.origin {
            Ok(o) => o.closed().await,
            Err(_) => std::future::pending().await,
        }
    };
    let stop = ctx_for_close.flow.services.stop().clone();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = origin_gone => {
            // The origin closed and cannot be re-opened: finish the request in flight, then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = stop.cancelled() => {
            // The gateway is shutting down: no new requests; the ones in flight finish and are recorded.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = r {
        tracing::debug!(seq, error = %e, "inspected HTTP connection ended with an error");
        // hyper answered a malformed request head itself (400, or 431 for oversized heads): record it too.
        if let Some(h) = e.downcast_ref::<hyper::Error>().filter(|h| h.is_parse()) {
            let status = if h.is_parse_too_large() { 431 } else { 400 };
            let u = &ctx_for_close.flow.upgraded;
            let record = HttpRecord {
                at_ms: unix_ms(),
                ref_id: random_ref(),
                scheme: ctx_for_close.scheme.to_string(),
                sni: ctx_for_close.sni.clone(),
                method: "-".into(),
                host: ctx_for_close
                    .sni
                    .clone()
                    .unwrap_or_else(|| u.dst.ip().to_string()),
                path: "-".into(),
                status: Some(status),
                decision: HttpDecision::Error,
                rule: Some("malformed-request".into()),
                error: Some(h.to_string()),
                ..ctx_for_close.flow.base_record()
            };
            ctx_for_close.flow.emit(record);
        }
    }
}

/// A record in progress; emitted (with duration and bytes) when dropped.
pub struct RecordGuard {
    record: HttpRecord,
    started: Instant,
    req_bytes: Arc<AtomicU64>,
    resp_bytes: Arc<AtomicU64>,
    flow: FlowCtx,
}

impl RecordGuard {
    pub fn new(flow: &FlowCtx, record: HttpRecord) -> RecordGuard {
        RecordGuard {
            record,
            started: Instant::now(),
            req_bytes: Arc::new(AtomicU64::new(0)),
            resp_bytes: Arc::new(AtomicU64::new(0)),
            flow: flow.clone(),
        }
    }

    pub fn record_mut(&mut self) -> &mut HttpRecord {
        &mut self.record
    }

    pub fn add_bytes(&self, up: u64, down: u64) {
        self.req_bytes.fetch_add(up, Ordering::Relaxed);
        self.resp_bytes.fetch_add(down, Ordering::Relaxed);
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let mut r = std::mem::take(&mut self.record);
        r.req_bytes = self.req_bytes.load(Ordering::Relaxed);
        r.resp_bytes = self.resp_bytes.load(Ordering::Relaxed);
        r.duration_ms = self.started.elapsed().as_millis() as u64;
        tracing::debug!(
            seq = r.flow_seq,
            method = %r.method,
            host = %r.host,
            path = %r.path,
            status = ?r.status,
            decision = %r.decision,
            rule = ?r.rule,
            "http request"
        );
        self.flow.emit(r);
    }
}

/// A body that counts its data bytes, notes an error, and (for responses) owns the request's record.
struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    failed: Option<Arc<AtomicBool>>,
    guard: Option<RecordGuard>,
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = &this.failed {
                    f.store(true, Ordering::Relaxed);
                }
                if let Some(g) = this.guard.as_mut() {
                    g.record.error = Some("the origin aborted the response body".into());
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn random_ref() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub use crate::clock::unix_ms;

/// A page answered by the inspector itself; completes the record.
fn page(
    status: StatusCode,
    rule: &str,
    detail: &str,
    mut guard: RecordGuard,
    decision: HttpDecision,
) -> Response<Body> {
    let r = guard.record_mut();
    r.status = Some(status.as_u16());
    r.decision = decision;
    r.rule = Some(rule.to_string());
    let body = super::page::render(status, rule, &r.ref_id, &r.host, detail);
    guard.add_bytes(0, body.len() as u64);
    drop(guard);
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn handle(mut req: Request<Incoming>, ctx: Arc<ConnCtx>) -> Response<Body> {
    let flow = &ctx.flow;
    let u = &flow.upgraded;
    let cfg = flow.config.current();
    let tenant = cfg.tenant(u.identity.tenant.as_str());
    // Only a protocol switch the tenant allows may turn this connection into a tunnel (and only HTTP/1.1
    // has them); anything else (h2c above all) is forwarded as a plain request.
    let allowed = match (req.version(), tenant) {
        (Version::HTTP_11, Some(t)) => &t.http.allow_upgrade[..],
        _ => &[][..],
    };
    let upgrade_to = rewrite::limit_upgrade(req.headers_mut(), allowed);
    let tunnel = upgrade_to.is_some() || req.method() == Method::CONNECT;
    let device_upgrade = tunnel.then(|| hyper::upgrade::on(&mut req));
    let device_version = req.version();
    let (mut parts, body) = req.into_parts();
    let authority = rewrite::request_authority(&parts)
        .or_else(|| ctx.sni.clone())
        .unwrap_or_else(|| u.dst.to_string());
    let host = rewrite::normalize_host(&authority);
    let raw_path = parts.uri.path().to_string();
    // CONNECT names an authority, not a path.
    let path = if parts.method == Method::CONNECT {
        Ok(String::new())
    } else {
        rewrite::canonical_path(&raw_path)
    };
    let method = parts.method.as_str().to_ascii_uppercase();

    let mut guard = RecordGuard::new(
        flow,
        HttpRecord {
            at_ms: unix_ms(),
            ref_id: random_ref(),
            scheme: ctx.scheme.to_string(),
            sni: ctx.sni.clone(),
            method: method.clone(),
            host: host.clone(),
            path: if parts.method == Method::CONNECT {
                authority.clone()
            } else {
                raw_path
            },
            decision: HttpDecision::Allow,
            ..flow.base_record()
        },
    );

    let Some(tenant) = tenant else {
        return page(
            StatusCode::FORBIDDEN,
            "tenant-removed",
            "This network is no longer configured on the gateway.",
            guard,
            HttpDecision::Block,
        );
    };
    if !flow.audit_admits(&cfg) {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit-unavailable",
            "The gateway cannot record requests right now and is set to refuse them until it can.",
            guard,
            HttpDecision::Block,
        );
    }
    let path = match path {
        Ok(p) => p,
        Err(why) => {
            guard.record.error = Some(format!("ambiguous path: {why}"));
            return page(
                StatusCode::BAD_REQUEST,
                policy::AMBIGUOUS_PATH,
                &format!(
                    "The gateway does not forward this path: {why}. Ask for the plain form of the address."
                ),
                guard,
                HttpDecision::Block,
            );
        }
    };
    let who = Identity {
        user: &u.identity.user,
        device: &u.identity.device,
        groups: &u.identity.groups,
    };
    let verdict = policy::classify_request(
        &tenant.http.rules,
        &who,
        &RequestFacts {
            host: &host,
            path: Some(&path),
            method: Some(&method),
        },
    );
    guard.record.rule = verdict.rule.clone();
    guard.record.decision = match verdict.action {
        HttpAction::Allow => HttpDecision::Allow,
        HttpAction::Log => HttpDecision::Log,
        HttpAction::Block => HttpDecision::Block,
    };
    if verdict.action == HttpAction::Block {
        let rule = verdict.rule.unwrap_or_default();
        let detail = if rule == policy::CONNECT_REFUSED {
            "Tunnels (CONNECT) are not allowed through the gateway for this destination."
        } else {
            "The gateway's policy blocks this request."
        };
        return page(
            StatusCode::FORBIDDEN,
            &rule,
            detail,
            guard,
            HttpDecision::Block,
        );
    }
    // Decrypted: the name the device verified must be the host it asks for (no domain fronting).
    if let Some(sni) = &ctx.sni {
        if rewrite::normalize_host(sni) != host {
            return page(
                StatusCode::MISDIRECTED_REQUEST,
                "sni-host-mismatch",
                "The requested host differs from the TLS server name of this connection.",
                guard,
                HttpDecision::Block,
            );
        }
    }
    let origin = match &ctx.origin {
        Ok(o) => o,
        Err(f) => {
            return page(
                StatusCode::BAD_GATEWAY,
                f.rule,
                &f.detail,
                guard,
                HttpDecision::Block,
            )
        }
    };
    let lease = match origin.lease().await {
        Ok(l) => l,
        Err(e) => {
            guard.record.error = Some(e.to_string());
            return page(
                StatusCode::BAD_GATEWAY,
                "upstream-unreachable",
                "The gateway could not reach the site.",
                guard,
                HttpDecision::Error,
            );
        }
    };
    if let Err(e) = rewrite::to_origin(&mut parts, lease.proto(), ctx.scheme, &authority, &path) {
        guard.record.error = Some(e.to_string());
        return page(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "The request could not be forwarded.",
            guard,
            HttpDecision::Error,
        );
    }
    let body_failed = Arc::new(AtomicBool::new(false));
    let up_body = Counted {
        inner: body,
        bytes: guard.req_bytes.clone(),
        failed: Some(body_failed.clone()),
        guard: None,
    }
    .boxed();
    let mut resp = match lease.send(Request::from_parts(parts, up_body)).await {
        Ok(r) => r,
        Err(e) => {
            guard.record.error = Some(e.to_string());
            // The device's own body was broken (bad chunking, aborted upload): its fault, not the origin's.
            if body_failed.load(Ordering::Relaxed) {
                return page(
                    StatusCode::BAD_REQUEST,
                    "bad-request-body",
                    "The request body was malformed or cut short.",
                    guard,
                    HttpDecision::Error,
                );
            }
            return page(
                StatusCode::BAD_GATEWAY,
                "upstream-error",
                "The site did not answer the request.",
                guard,
                HttpDecision::Error,
            );
        }
    };
    let status = resp.status();
    guard.record.status = Some(status.as_u16());
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let switched = upgrade_to
            .as_deref()
            .and_then(|asked| rewrite::switched_protocol(resp.headers(), asked));
        let Some(protocol) = switched else {
            // Never hand the device a switch it was not allowed to ask for.
            guard.record.error = Some("the origin switched protocols unasked".into());
            return page(
                StatusCode::BAD_GATEWAY,
                "upstream-error",
                "The site switched to a protocol the gateway does not allow.",
                guard,
                HttpDecision::Error,
            );
        };
        // The record names the protocol the connection switched to: `http+websocket`.
        guard.record.scheme = format!("{}+{protocol}", ctx.scheme);
    }
    if let Some(device_upgrade) = device_upgrade {
        let switched = status == StatusCode::SWITCHING_PROTOCOLS
            || (method == "CONNECT" && status.is_success());
        if switched {
            let origin_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(relay_tunnel(device_upgrade, origin_upgrade, guard));
            let (mut parts, _) = resp.into_parts();
            rewrite::strip_hop_by_hop(
                &mut parts.headers,
                status == StatusCode::SWITCHING_PROTOCOLS,
            );
            return Response::from_parts(
                parts,
                Empty::new().map_err(|never| match never {}).boxed(),
            );
        }
    }
    let (mut parts, body) = resp.into_parts();
    rewrite::strip_hop_by_hop(&mut parts.headers, false);
    // The device's protocol, not the origin's: an HTTP/1.0 origin must not end the device's keep-alive.
    parts.version = device_version;
    let bytes = guard.resp_bytes.clone();
    Response::from_parts(
        parts,
        Counted {
            inner: body,
            bytes,
            failed: None,
            guard: Some(guard),
        }
        .boxed(),
    )
}

/// Bytes both ways between the device and the origin after a protocol switch; the record closes with it.
async fn relay_tunnel(
    device: hyper::upgrade::OnUpgrade,
    origin: hyper::upgrade::OnUpgrade,
    mut guard: RecordGuard,
) {
    match tokio::try_join!(device, origin) {
        Ok((d, o)) => {
            let (mut d, mut o) = (TokioIo::new(d), TokioIo::new(o));
            match tokio::io::copy_bidirectional(&mut d, &mut o).await {
                Ok((up, down)) => guard.add_bytes(up, down),
                Err(e) => guard.record.error = Some(format!("tunnel: {e}")),
            }
        }
        Err(e) => guard.record.error = Some(format!("upgrade failed: {e}")),
    }
}
