//! The HTTPS enrollment listener (`gateway.enroll_listen`) and the device watcher.
//!
//! Routes: `POST /v1/enroll`, `GET /v1/devices/self` (`ETag` / `If-None-Match` -> 304),
//! `PUT /v1/devices/self/key`, `DELETE /v1/devices/self`. Each connection carries one request (no keep-alive)
//! and is bounded: TLS handshake 10 s, headers 10 s, body `api::MAX_BODY` bytes within 5 s, the whole
//! connection 60 s, at most 256 connections at once (more are closed on accept). `POST /v1/enroll` and failed
//! device-token checks count against a per-source rate limit (`429` with `Retry-After`). Errors are JSON with
//! a stable code (`api::ErrorCode`).
//!
//! The watcher looks at the data path every 2 s (`Service::observe`): first handshakes prove devices,
//! ephemeral devices not seen for their timeout are removed. It runs whether or not the listener is on.
//!
//! Never: log a request body or an `Authorization` header; block the runtime (the service runs on blocking
//! threads).
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH,
    RETRY_AFTER,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::api::{
    ApiError, DeviceReply, DeviceState, EnrollRequest, ErrorCode, KeyRequest, MAX_BODY, WG_QUICK,
};
use super::limit::RateLimiter;
use super::service::{Enrolled, GatewayHandle, Origin, Service};
use super::tls::Pins;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_CONNECTIONS: usize = 256;
const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

struct Ctx {
    service: Arc<Service>,
    limiter: Mutex<RateLimiter>,
    pins: Pins,
}

/// The running listener and watcher; `shutdown` stops both.
pub struct EnrollServer {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EnrollServer {
    /// Stops accepting, lets requests in flight finish (up to a few seconds), stops the watcher.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the watcher, and the listener when `gateway.enroll_listen` is set (minting its certificate on
/// first start); records go to `sink`. Errors (address in use, unreadable certificate) name the setting to
/// fix. `cancel` (the gateway's shutdown, or `shutdown` here) stops them.
pub async fn start(
    gateway: Arc<dyn GatewayHandle>,
    sink: crate::audit::enroll_records::EnrollAuditSink,
    fleet: Option<crate::fleet::enrollment::SharedEnrollment>,
    cancel: CancellationToken,
) -> anyhow::Result<EnrollServer> {
    use anyhow::Context as _;
    let cfg = gateway.config();
    let service = Arc::new(
        Service::new(gateway, super::audit::AuditLog::Pipeline(sink.clone()))?.with_fleet(fleet),
    );
    let state_dir = cfg.gateway.state_dir.clone();
    // Everything that can fail comes before the first task holds the gateway.
    let mut listener = None;
    if let Some(listen) = cfg.enroll.listen {
        let identity = super::admin::listener_identity(&cfg).with_context(|| {
            format!(
                "enrollment listener certificate (gateway.enroll_listen, [enroll] tls_cert/tls_key in {})",
                cfg.source.display()
            )
        })?;
        let tls = tokio_rustls::TlsAcceptor::from(identity.server_config()?);
        let tcp = TcpListener::bind(listen).await.with_context(|| {
            format!(
                "cannot listen on {listen} (gateway.enroll_listen in {})",
                cfg.source.display()
            )
        })?;
        let pins = identity.pins.clone();
        tracing::info!(%listen, pin = %pins.url_pin(), curl_pin = %pins.curl_pin(), "enrollment listener running");
        eprintln!(
            "rampart: enrollment on https://{listen}: pin {} (curl --pinnedpubkey {}); mint a token with `rampart token create -c {} --tenant <tenant>`",
            pins.url_pin(),
            pins.curl_pin(),
            cfg.source.display()
        );
        let ctx = Arc::new(Ctx {
            service: service.clone(),
            limiter: Mutex::new(RateLimiter::new(
                cfg.enroll.rate_per_minute,
                cfg.enroll.rate_burst,
            )),
            pins,
        });
        listener = Some((tcp, tls, ctx));
    }
    let mut tasks = vec![tokio::spawn(watch(
        service,
        sink,
        state_dir,
        cancel.clone(),
    ))];
    if let Some((tcp, tls, ctx)) = listener {
        tasks.push(tokio::spawn(accept_loop(tcp, tls, ctx, cancel.clone())));
    }
    Ok(EnrollServer { cancel, tasks })
}

/// Every `WATCH_INTERVAL`: the admin CLI's spooled audit records into the pipeline, then `Service::observe`.
async fn watch(
    service: Arc<Service>,
    sink: crate::audit::enroll_records::EnrollAuditSink,
    state_dir: std::path::PathBuf,
    cancel: CancellationToken,
) {
    let mut rx = HashMap::new();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = super::audit::drain_spool(&state_dir, &sink).await {
            tracing::warn!(error = %e, "cannot take the spooled enrollment audit records");
        }
        let svc = service.clone();
        let r = tokio::task::spawn_blocking(move || {
            let gw = svc.gateway().clone();
            let r = svc.observe(|| gw.peers(), &mut rx, super::unix_now());
            (rx, r)
        })
        .await;
        match r {
            Ok((back, result)) => {
                rx = back;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "enrollment watcher");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "enrollment watcher failed");
                rx = HashMap::new();
            }
        }
    }
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
                    tracing::debug!(%peer, "enrollment listener at its connection limit; closing");
                    continue;
                }
                conns.spawn(connection(tcp, peer, tls.clone(), ctx.clone()));
            }
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: tokio_rustls::TlsAcceptor,
    ctx: Arc<Ctx>,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "enrollment TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "enrollment TLS handshake timed out");
            return;
        }
    };
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, peer.ip(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), svc);
    if tokio::time::timeout(CONNECTION_TIMEOUT, conn)
        .await
        .is_err()
    {
        tracing::debug!(%peer, "enrollment connection timed out");
    }
}

type Resp = Response<Full<Bytes>>;

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(e: &ApiError) -> Resp {
    let status =
        StatusCode::from_u16(e.error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json(status, e);
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

async fn handle(ctx: &Ctx, source: IpAddr, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let r = route(ctx, source, req).await;
    tracing::debug!(%source, %method, %path, status = r.status().as_u16(), "enrollment request");
    r
}

async fn route(ctx: &Ctx, source: IpAddr, req: Request<Incoming>) -> Resp {
    let origin = Origin {
        source,
        host: request_host(&req),
    };
    let r = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/enroll") => enroll(ctx, origin, req).await,
        (&Method::GET, "/v1/devices/self") => self_get(ctx, origin, req).await,
        (&Method::PUT, "/v1/devices/self/key") => self_key(ctx, origin, req).await,
        (&Method::DELETE, "/v1/devices/self") => self_delete(ctx, origin, req).await,
        (_, "/v1/enroll" | "/v1/devices/self" | "/v1/devices/self/key") => Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            "method not allowed here; see the enrollment API in README.md",
        )),
        _ => Err(ApiError::new(
            ErrorCode::NotFound,
            "no such endpoint; the API is POST /v1/enroll and /v1/devices/self",
        )),
    };
    r.unwrap_or_else(|e| error(&e))
}

fn rate_limit(ctx: &Ctx, source: IpAddr) -> Result<(), ApiError> {
    let mut l = ctx.limiter.lock().unwrap_or_else(|p| p.into_inner());
    l.check(source, Instant::now()).map_err(|wait| {
        ApiError::new(
            ErrorCode::RateLimited,
            "too many enrollment requests from this address; retry later",
        )
        .retry_after(wait.as_secs_f64().ceil() as u64)
    })
}

/// The host the client addressed (`Host` without its port), if it looks like one.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let h = req.headers().get(HOST)?.to_str().ok()?;
    let host = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next()?
    } else {
        h.rsplit_once(':').map(|(a, _)| a).unwrap_or(h)
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':');
    ok.then(|| host.to_string())
}

/// The `rampart://` URL (without token) a device reached us at, kept in its config file for `--refresh`.
fn self_url<B>(ctx: &Ctx, req: &Request<B>) -> Option<String> {
    self_url_with(&ctx.pins, req)
}

fn self_url_with<B>(pins: &Pins, req: &Request<B>) -> Option<String> {
    let authority = req.headers().get(HOST)?.to_str().ok()?;
    let host = request_host(req)?;
    // Only `host` or `host:port` (brackets for IPv6) goes into the device's file.
    let rest = authority
        .trim_start_matches('[')
        .strip_prefix(host.as_str())?
        .trim_start_matches(']');
    if !(rest.is_empty()
        || rest
            .strip_prefix(':')
            .is_some_and(|p| p.parse::<u16>().is_ok()))
    {
        return None;
    }
    Some(super::admin::enrollment_url(
        authority,
        &pins.url_pin(),
        None,
    ))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => Err(ApiError::new(
            ErrorCode::BodyTimeout,
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::new(
            ErrorCode::BadRequest,
            "cannot read the request body",
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

fn wants_wg_quick<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|m| m.trim().starts_with(WG_QUICK)))
}

/// A device reply as JSON or wg-quick text (with the comment lines `rampart enroll --refresh` reads).
fn device_reply(
    status: StatusCode,
    reply: &DeviceReply,
    wg_quick: bool,
    url: Option<&str>,
) -> Resp {
    let mut r = if wg_quick {
        let text = format!(
            "{}{}{}",
            reply.header(),
            super::client::meta_comments(reply, url),
            reply.wg_quick_body()
        );
        let mut r = Response::new(Full::new(Bytes::from(text)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(WG_QUICK));
        r
    } else {
        json(status, reply)
    };
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", reply.config_version)) {
        r.headers_mut().insert(ETAG, v);
    }
    r
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "enrollment request handler failed");
        Err(ApiError::new(
            ErrorCode::Unavailable,
            "internal error; try again",
        ))
    })
}

async fn enroll(ctx: &Ctx, origin: Origin, req: Request<Incoming>) -> Result<Resp, ApiError> {
    rate_limit(ctx, origin.source)?;
    let wg = wants_wg_quick(&req);
    let url = self_url(ctx, &req);
    let body: EnrollRequest = parse_json(&read_body(req).await?)?;
    let svc = ctx.service.clone();
    let (how, reply) = blocking(move || svc.enroll(&body, &origin, super::unix_now())).await?;
    let status = match (how, reply.device.state) {
        (_, DeviceState::Pending) => StatusCode::ACCEPTED,
        (Enrolled::Created, DeviceState::Active) => StatusCode::CREATED,
        (Enrolled::Retried | Enrolled::Reenrolled, DeviceState::Active) => StatusCode::OK,
    };
    Ok(device_reply(status, &reply, wg, url.as_deref()))
}

/// The device of the request's `Authorization: Bearer rpd1_...`; failures count against the rate limit.
async fn authenticate<B>(
    ctx: &Ctx,
    origin: &Origin,
    req: &Request<B>,
) -> Result<super::store::DeviceRow, ApiError> {
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let svc = ctx.service.clone();
    match blocking(move || svc.authenticate(bearer.as_deref())).await {
        Ok(d) => Ok(d),
        Err(e) if e.error == ErrorCode::DeviceTokenInvalid => {
            rate_limit(ctx, origin.source)?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

fn etag_matches<B>(req: &Request<B>, version: &str) -> bool {
    req.headers()
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == version || t == "*")
}

async fn self_get(ctx: &Ctx, origin: Origin, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let d = authenticate(ctx, &origin, &req).await?;
    let svc = ctx.service.clone();
    let (o, dd) = (origin.clone(), d.clone());
    let reply = blocking(move || svc.current(&dd, &o)).await?;
    let unchanged = etag_matches(&req, &reply.config_version);
    let svc = ctx.service.clone();
    let _ = blocking(move || {
        svc.refreshed(&d, &origin, !unchanged);
        Ok(())
    })
    .await;
    if unchanged {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", reply.config_version)) {
            r.headers_mut().insert(ETAG, v);
        }
        return Ok(r);
    }
    Ok(device_reply(
        StatusCode::OK,
        &reply,
        wants_wg_quick(&req),
        self_url(ctx, &req).as_deref(),
    ))
}

async fn self_key(ctx: &Ctx, origin: Origin, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let d = authenticate(ctx, &origin, &req).await?;
    let wg = wants_wg_quick(&req);
    let url = self_url(ctx, &req);
    let body: KeyRequest = parse_json(&read_body(req).await?)?;
    let svc = ctx.service.clone();
    let reply = blocking(move || svc.rotate(&d, &body, &origin, super::unix_now())).await?;
    Ok(device_reply(StatusCode::OK, &reply, wg, url.as_deref()))
}

async fn self_delete(ctx: &Ctx, origin: Origin, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let d = authenticate(ctx, &origin, &req).await?;
    let svc = ctx.service.clone();
    blocking(move || svc.leave(&d, &origin)).await?;
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_forms() {
        let req = |h: &str| Request::builder().header(HOST, h).body(()).unwrap();
        assert_eq!(
            request_host(&req("198.18.0.1:8443")).as_deref(),
            Some("198.18.0.1")
        );
        assert_eq!(
            request_host(&req("gw.example")).as_deref(),
            Some("gw.example")
        );
        assert_eq!(
            request_host(&req("[fd00::1]:8443")).as_deref(),
            Some("fd00::1")
        );
        assert_eq!(request_host(&req("evil/x:1")), None);
        assert_eq!(request_host(&req("")), None);
    }

    #[test]
    fn only_a_plain_authority_goes_into_the_device_file() {
        let req = |h: &str| Request::builder().header(HOST, h).body(()).unwrap();
        let pins = Pins {
            cert_sha256: [1; 32],
            spki_sha256: [2; 32],
        };
        let url = |h: &str| self_url_with(&pins, &req(h));
        assert_eq!(
            url("198.18.0.1:8443").as_deref(),
            Some(format!("rampart://198.18.0.1:8443/?pin=sha256:{}", "01".repeat(32)).as_str())
        );
        assert!(url("[fd00::1]:8443").is_some());
        assert!(url("gw.example").is_some());
        assert_eq!(url("198.18.0.1:8443 # x"), None);
        assert_eq!(url("198.18.0.1:x"), None);
    }

    #[test]
    fn if_none_match_forms() {
        let req = |h: &str| {
            Request::builder()
                .header(IF_NONE_MATCH, h)
                .body(())
                .unwrap()
        };
        assert!(etag_matches(&req("\"abc\""), "abc"));
        assert!(etag_matches(&req("W/\"abc\""), "abc"));
        assert!(etag_matches(&req("\"x\", \"abc\""), "abc"));
        assert!(!etag_matches(&req("\"abd\""), "abc"));
        assert!(!etag_matches(&Request::new(()), "abc"));
    }

    #[test]
    fn accept_negotiation() {
        let req = |h: &str| Request::builder().header(ACCEPT, h).body(()).unwrap();
        assert!(wants_wg_quick(&req("text/x-wg-quick")));
        assert!(wants_wg_quick(&req(
            "application/json, text/x-wg-quick;q=0.9"
        )));
        assert!(!wants_wg_quick(&req("application/json")));
        assert!(!wants_wg_quick(&Request::new(())));
    }
}
