//! The admin side: the listener for `GET /health` and `GET /metrics` (this file: hyper serves it, one request
//! per connection, bounded head size, time and connections; plain HTTP on loopback, else HTTPS with a bearer
//! token, see [`AdminAccess`]; `/metrics` is the text of [`MetricsRegistry`], which every part registers into
//! at start), and the review web UI on its own HTTPS listener (`web`: the listener and routing; `session`: sign-in, cookies,
//! API tokens, CSRF; `headers`: error codes, responses, CSP; `api`: the JSON API,
//! with `trail` for flows, HTTP requests and verification; `assets`: embedded files; `accounts`: `admin.db`;
//! `audit`: its audit records). It reads counters and the audit store; it never reaches into the core.
#![deny(unsafe_code)]

pub mod accounts;
pub mod api;
pub mod assets;
pub mod audit;
pub mod headers;
pub mod session;
pub mod trail;
pub mod web;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::core::Metrics;
use crate::handoff::ConfigHandle;
use crate::metrics::MetricsRegistry;
use crate::shutdown::Shutdown;

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The request head must have arrived within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection (head, answer, a slow reader of `/metrics`) ends after this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (hyper's smallest buffer); a longer one gets 431.
const MAX_HEAD: usize = 8 * 1024;

/// How the admin listener is reached (`config::admin`): plain HTTP (loopback only), or HTTPS where every
/// request carries the bearer token of the current config (a reload rotates it).
pub enum AdminAccess {
    Plain,
    Tls {
        acceptor: tokio_rustls::TlsAcceptor,
        config: ConfigHandle,
    },
}

impl AdminAccess {
    /// The bearer token a request must carry now: `None` when none is needed (plain HTTP on loopback).
    /// Without a token in the current config (a reload cannot drop it while the listener is not on loopback,
    /// but fail closed anyway) the empty token is expected, which nothing matches.
    fn expected_token(&self) -> Option<Vec<u8>> {
        match self {
            AdminAccess::Plain => None,
            AdminAccess::Tls { config, .. } => Some(
                config
                    .current()
                    .gateway
                    .admin_token
                    .as_ref()
                    .map(|t| t.secret().to_vec())
                    .unwrap_or_default(),
            ),
        }
    }
}

/// What the listener answers from.
struct Admin {
    access: AdminAccess,
    metrics: Arc<Metrics>,
    registry: Arc<MetricsRegistry>,
}

/// Serves the admin listener until `shutdown` fires (connections in flight end with it).
pub async fn serve(
    listener: TcpListener,
    access: AdminAccess,
    metrics: Arc<Metrics>,
    registry: Arc<MetricsRegistry>,
    shutdown: Shutdown,
) {
    let admin = Arc::new(Admin {
        access,
        metrics,
        registry,
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((conn, _)) = accepted else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (admin, stop) = (admin.clone(), shutdown.clone());
        shutdown.spawn(async move {
            let _slot = slot;
            let answer = async {
                match &admin.access {
                    AdminAccess::Plain => connection(conn, admin.clone()).await,
                    AdminAccess::Tls { acceptor, .. } => {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await
                        else {
                            return;
                        };
                        connection(tls, admin.clone()).await
                    }
                }
            };
            tokio::select! {
                () = answer => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Serves one connection: one request, answered with `Connection: close`.
async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: S, admin: Arc<Admin>) {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        async move {
            let token = admin.access.expected_token();
            Ok::<_, Infallible>(respond(
                &req,
                token.as_deref(),
                &admin.metrics,
                &admin.registry,
                Instant::now(),
            ))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), svc);
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
}

type Answer = (StatusCode, &'static str, String);

/// The answer to one request; `token`: the bearer token every request must carry (checked before anything
/// else, so an unauthorized caller learns nothing about paths or methods).
fn respond<B>(
    req: &Request<B>,
    token: Option<&[u8]>,
    metrics: &Metrics,
    registry: &MetricsRegistry,
    now: Instant,
) -> Response<Full<Bytes>> {
    let authorized = token.is_none_or(|t| bearer_matches(req.headers().get(AUTHORIZATION), t));
    let (status, ctype, body): Answer = if !authorized {
        tracing::debug!(method = %req.method(), path = %req.uri().path(), "admin request without the right bearer token refused");
        (
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "missing or wrong bearer token; send `Authorization: Bearer <the token in gateway.admin_token_file>`\n"
                .to_string(),
        )
    } else {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => health(metrics, now),
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                crate::metrics::CONTENT_TYPE,
                registry.encode(),
            ),
            (&Method::GET, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /health or /metrics\n".to_string(),
            ),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".to_string(),
            ),
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    if !authorized {
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"rampart admin\""),
        );
    }
    r
}

/// Whether an `Authorization` value is `Bearer <token>` (scheme in any case). The comparison is over SHA-256
/// digests in constant time, so neither the token's bytes nor its length show in the timing.
fn bearer_matches(value: Option<&HeaderValue>, token: &[u8]) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return false;
    }
    let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
    let wanted: [u8; 32] = Sha256::digest(token).into();
    given.ct_eq(&wanted).into()
}

/// The data path must have gone round its loop recently (it does at least every `TIMER_TICK`).
const HEALTH_MAX_BEAT_AGE: Duration = Duration::from_secs(5);

fn health(m: &Metrics, now: Instant) -> Answer {
    let age = m.datapath.age(now);
    if age > HEALTH_MAX_BEAT_AGE {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "data path stalled: no progress for {} ms\n",
                age.as_millis()
            ),
        );
    }
    (StatusCode::OK, "text/plain", "ok\n".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditCounters;
    use crate::config::TenantId;
    use crate::core::DropReason;
    use http_body_util::BodyExt as _;

    const TOKEN: &[u8] = b"0123456789abcdef";

    fn auth(v: &str) -> Option<HeaderValue> {
        Some(HeaderValue::from_str(v).unwrap())
    }

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        for ok in [
            "Bearer 0123456789abcdef",
            "  bearer 0123456789abcdef  ",
            "BEARER 0123456789abcdef",
        ] {
            assert!(bearer_matches(auth(ok).as_ref(), TOKEN), "{ok}");
        }
        for bad in [
            "",
            "Bearer 0123456789abcde",
            "Bearer 0123456789abcdef0",
            "Basic 0123456789abcdef",
            "0123456789abcdef",
            "Bearer",
            "Bearer ",
        ] {
            assert!(!bearer_matches(auth(bad).as_ref(), TOKEN), "{bad:?}");
        }
        assert!(!bearer_matches(None, TOKEN));
        // An empty expected token matches nothing, not even an empty one.
        assert!(!bearer_matches(auth("Bearer ").as_ref(), b""));
        assert!(!bearer_matches(auth("Bearer x").as_ref(), b""));
    }

    /// What a caller sees: status, content type, challenge, body.
    struct Seen {
        status: u16,
        ctype: String,
        challenge: Option<String>,
        body: String,
    }

    fn ask(method: &str, uri: &str, authz: Option<&str>, token: Option<&[u8]>, age: u64) -> Seen {
        let m = Arc::new(Metrics::default());
        let beat = Instant::now();
        m.datapath.beat(beat);
        let mut registry = MetricsRegistry::new();
        registry.collect(m.clone());
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = authz {
            b = b.header(AUTHORIZATION, a);
        }
        let now = beat + Duration::from_secs(age);
        let r = respond(&b.body(()).unwrap(), token, &m, &registry, now);
        let h = |n| {
            r.headers()
                .get(n)
                .map(|v: &HeaderValue| v.to_str().unwrap().to_string())
        };
        let (status, ctype, challenge) = (
            r.status().as_u16(),
            h(CONTENT_TYPE).unwrap(),
            h(WWW_AUTHENTICATE),
        );
        let body = futures::executor::block_on(r.into_body().collect())
            .unwrap()
            .to_bytes();
        Seen {
            status,
            ctype,
            challenge,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    #[test]
    fn routes_and_answers_as_before() {
        let s = ask("GET", "/health", None, None, 0);
        assert_eq!(
            (s.status, s.ctype.as_str(), s.body.as_str()),
            (200, "text/plain", "ok\n")
        );
        assert_eq!(s.challenge, None);
        let s = ask("GET", "/health", None, None, 6);
        assert_eq!(s.status, 503);
        assert!(
            s.body
                .starts_with("data path stalled: no progress for 6000 ms"),
            "{}",
            s.body
        );
        let s = ask("GET", "/metrics?x=1", None, None, 0);
        assert_eq!(
            (s.status, s.ctype.as_str()),
            (200, crate::metrics::CONTENT_TYPE)
        );
        assert!(
            s.body.contains("rampart_cookie_replies_total 0"),
            "{}",
            s.body
        );
        let s = ask("GET", "/nope", None, None, 0);
        assert_eq!(
            (s.status, s.body.as_str()),
            (404, "not found; try /health or /metrics\n")
        );
        for m in ["POST", "PUT", "HEAD", "DELETE"] {
            let s = ask(m, "/metrics", None, None, 0);
            assert_eq!((s.status, s.body.as_str()), (405, "only GET\n"), "{m}");
        }
    }

    #[test]
    fn with_a_token_every_request_needs_it_before_anything_else() {
        let good = "Bearer 0123456789abcdef";
        // The positive control: with the token, the same requests are answered.
        assert_eq!(
            ask("GET", "/metrics", Some(good), Some(TOKEN), 0).status,
            200
        );
        assert_eq!(
            ask("GET", "/health", Some(good), Some(TOKEN), 0).status,
            200
        );
        assert_eq!(ask("GET", "/x", Some(good), Some(TOKEN), 0).status, 404);
        assert_eq!(ask("POST", "/x", Some(good), Some(TOKEN), 0).status, 405);
        for (method, path, authz) in [
            ("GET", "/metrics", None),
            ("GET", "/health", Some("Bearer 0123456789abcdeX")),
            ("GET", "/x", Some("Basic 0123456789abcdef")),
            ("POST", "/metrics", None),
        ] {
            let s = ask(method, path, authz, Some(TOKEN), 0);
            assert_eq!(s.status, 401, "{method} {path} {authz:?}");
            assert!(
                s.body.contains("bearer token") && !s.body.contains("rampart_"),
                "{}",
                s.body
            );
            assert_eq!(
                s.challenge.as_deref(),
                Some("Bearer realm=\"rampart admin\"")
            );
        }
        // No token in the config (fail closed): nothing is authorized.
        assert_eq!(
            ask("GET", "/health", Some("Bearer "), Some(b""), 0).status,
            401
        );
    }

    /// The listener over a real socket: one request per connection, `Connection: close`, HTTP/1.0 too.
    #[tokio::test]
    async fn the_listener_answers_over_tcp_and_closes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::default());
        m.datapath.beat(Instant::now());
        let mut registry = MetricsRegistry::new();
        registry.collect(m.clone());
        let shutdown = Shutdown::new();
        let server = tokio::spawn(serve(
            listener,
            AdminAccess::Plain,
            m,
            Arc::new(registry),
            shutdown.clone(),
        ));
        for (req, want) in [
            ("GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200 OK"),
            ("GET /metrics HTTP/1.0\r\n\r\n", "HTTP/1.0 200 OK"),
            (
                "GET /x HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 404 Not Found",
            ),
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            // The server closes after one answer: read_to_string returns.
            tokio::time::timeout(Duration::from_secs(30), c.read_to_string(&mut out))
                .await
                .unwrap()
                .unwrap();
            assert!(out.starts_with(want), "{req:?} -> {out}");
            if req.contains("HTTP/1.1") {
                assert!(
                    out.to_ascii_lowercase()
                        .contains("\r\nconnection: close\r\n"),
                    "{out}"
                );
            }
        }
        // The shutdown ends the accept loop (and would end connections in flight).
        assert_eq!(shutdown.run_down(Duration::from_secs(30)).await, 0);
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn metrics_render_every_family_with_tenant_labels() {
        let m = Arc::new(Metrics::default());
        let t = m.tenant(&TenantId::parse("acme").unwrap());
        t.handshakes.add(2);
        t.count_drop(DropReason::SpoofedSource);
        m.global.cookie_replies.add(5);
        let audit = Arc::new(AuditCounters::default());
        audit.lost(
            crate::audit::RecordKind::Http,
            crate::audit::LossReason::QueueFull,
            3,
        );
        let mut registry = MetricsRegistry::new();
        registry.collect(m.clone());
        registry.collect(audit.clone());
        let text = registry.encode();
        for line in [
            "rampart_handshakes_total{tenant=\"acme\"} 2",
            "rampart_dropped_packets_total{tenant=\"acme\",reason=\"spoofed_source\"} 1",
            "rampart_dropped_packets_total{tenant=\"\",reason=\"malformed_datagram\"} 0",
            "rampart_cookie_replies_total 5",
            "rampart_flows{tenant=\"acme\"} 0",
            "rampart_audit_records_lost_total{kind=\"http\",reason=\"queue_full\"} 3",
            "rampart_audit_records_dropped_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
        // Every sample line is `name{labels} value` or `name value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "bad sample {l:?}");
        }
    }
}
