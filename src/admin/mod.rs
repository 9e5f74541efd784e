//! The admin side: the listener for `GET /health` and `GET /metrics` (this file: the text of
//! [`MetricsRegistry`], which every part registers into at start; a
//! deliberately small HTTP/1.1 responder, one request per connection, bounded size, time and connections; plain
//! HTTP on loopback, else HTTPS with a bearer token, see [`AdminAccess`]), and the review
//! web UI on its own HTTPS listener (`web`: sign-in, CSRF, CSP; `api`: the JSON API, with `trail` for flows, HTTP requests and verification; `assets`: embedded
//! files; `accounts`: `admin.db`; `audit`: its audit records). It reads counters and the audit store; it
//! never reaches into the core.
#![deny(unsafe_code)]

pub mod accounts;
pub mod api;
pub mod assets;
pub mod audit;
pub mod trail;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::core::Metrics;
use crate::handoff::ConfigHandle;
use crate::metrics::MetricsRegistry;

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How the admin listener is reached (`config::admin`): plain HTTP (loopback only), or HTTPS where every
/// request carries the bearer token of the current config (a reload rotates it).
pub enum AdminAccess {
    Plain,
    Tls {
        acceptor: tokio_rustls::TlsAcceptor,
        config: ConfigHandle,
    },
}

pub async fn serve(
    listener: TcpListener,
    access: AdminAccess,
    metrics: Arc<Metrics>,
    registry: Arc<MetricsRegistry>,
) {
    let access = Arc::new(access);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let metrics = metrics.clone();
        let registry = registry.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match &*access {
                AdminAccess::Plain => answer(conn, None, &metrics, &registry).await,
                AdminAccess::Tls { acceptor, config } => {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await
                    else {
                        return;
                    };
                    // No token in the current config (a reload cannot drop it while the listener is not on
                    // loopback, but fail closed anyway): nothing is authorized.
                    let token = config.current().gateway.admin_token.clone();
                    let expected = Some(token.as_ref().map(|t| t.secret()).unwrap_or_default());
                    answer(tls, expected, &metrics, &registry).await
                }
            }
        });
    }
}

/// Reads one request head and answers it; `token`: the bearer token every request must carry.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    token: Option<&[u8]>,
    metrics: &Metrics,
    registry: &MetricsRegistry,
) {
    let mut buf = [0u8; 4096];
    let mut n = 0;
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while n < buf.len() {
            let r = conn.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n")
                || buf[..n].windows(2).any(|w| w == b"\n\n")
            {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authorized = token.is_none_or(|t| bearer_matches(&head, t));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        _ if !authorized => (
            "401 Unauthorized",
            "text/plain",
            "missing or wrong bearer token; send `Authorization: Bearer <the token in gateway.admin_token_file>`\n"
                .to_string(),
        ),
        ("GET", "/health") => health(metrics),
        ("GET", "/metrics") => ("200 OK", crate::metrics::CONTENT_TYPE, registry.encode()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found; try /health or /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let challenge = if authorized {
        ""
    } else {
        tracing::debug!(%method, %path, "admin request without the right bearer token refused");
        "WWW-Authenticate: Bearer realm=\"rampart admin\"\r\n"
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\n{challenge}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Whether the request head carries `Authorization: Bearer <token>`. The comparison is over SHA-256 digests
/// in constant time, so neither the token's bytes nor its length show in the timing.
fn bearer_matches(head: &str, token: &[u8]) -> bool {
    let Some(value) = head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim())
    }) else {
        return false;
    };
    let Some((scheme, given)) = value.split_once(' ') else {
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

fn health(m: &Metrics) -> (&'static str, &'static str, String) {
    let age = m.datapath.age(std::time::Instant::now());
    if age > HEALTH_MAX_BEAT_AGE {
        return (
            "503 Service Unavailable",
            "text/plain",
            format!(
                "data path stalled: no progress for {} ms\n",
                age.as_millis()
            ),
        );
    }
    ("200 OK", "text/plain", "ok\n".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditCounters;
    use crate::config::TenantId;
    use crate::core::DropReason;

    #[test]
    fn only_the_exact_bearer_token_is_accepted() {
        let t = b"0123456789abcdef";
        let req = |auth: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
        for ok in [
            "Authorization: Bearer 0123456789abcdef",
            "authorization:   bearer 0123456789abcdef  ",
            "AUTHORIZATION: BEARER 0123456789abcdef",
        ] {
            assert!(bearer_matches(&req(ok), t), "{ok}");
        }
        for bad in [
            "",
            "Authorization: Bearer 0123456789abcde",
            "Authorization: Bearer 0123456789abcdef0",
            "Authorization: Basic 0123456789abcdef",
            "Authorization: 0123456789abcdef",
            "Authorization: Bearer",
            "X-Authorization: Bearer 0123456789abcdef",
        ] {
            assert!(!bearer_matches(&req(bad), t), "{bad:?}");
        }
        // The request line is not a header; an empty expected token matches nothing.
        assert!(!bearer_matches(
            "GET /Authorization: Bearer 0123456789abcdef HTTP/1.1\r\n\r\n",
            t
        ));
        assert!(!bearer_matches(&req("Authorization: Bearer "), b""));
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
