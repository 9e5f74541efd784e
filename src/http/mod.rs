//! The HTTP inspector: on a flow upgraded by an `inspect_http` rule, the gateway serves the device's side with
//! a hyper server and forwards each request over the leg the off-ramp opened to the original destination
//! (re-opened when the origin closes it), applying the tenant's `[[tenant.http_rule]]`s per request and
//! recording every request in the audit store (`audit::http_records`).
//!
//! - A connection whose first byte is a TLS handshake record is decided on its ClientHello (server name,
//!   ALPN) before anything is decrypted ([`policy::classify_tls`]): passed through untouched, refused with a
//!   TLS alert, or — for tenants with `tls_decrypt` — decrypted with a leaf from the tenant CA and
//!   re-encrypted towards the origin, whose certificate must verify (else every request gets a block page).
//!   On a decrypting tenant the device cannot choose to be left alone: non-HTTP ALPN is refused unless listed,
//!   and a `do_not_inspect` name counts only once the origin's certificate proves it ([`OriginCheck`]).
//! - Paths are matched and forwarded in one canonical form (`rewrite::canonical_path`); protocol switches are
//!   limited to the tenant's list, never `h2c` (`rewrite::limit_upgrade`).
//! - Identity comes from the WireGuard peer (tenant, device, user in `handoff::FlowContext`, fixed when the
//!   flow started), never from requests.
//!
//! Start reading at [`inspect`], then `proxy::handle`. Pure parts: `policy`, `rewrite`, `page`. Never: write
//! audit storage other than through the sink, re-resolve names (the origin is always the original
//! destination), or buffer whole bodies.
#![deny(unsafe_code)]

pub mod origin;
pub mod page;
pub mod policy;
pub mod proxy;
pub mod rewrite;
pub mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::audit::http_records::{HttpAuditSink, HttpDecision, HttpRecord};
use crate::config::{Config, FailurePolicy, Tenant};
use crate::handoff::{ConfigHandle, FlowContext};
pub use origin::Reconnect;
use origin::{Origin, OriginIo};
use policy::{Identity, NoDecrypt, TlsAction, TlsAlert, TlsFacts};
use proxy::{ConnCtx, OriginFailure, RecordGuard};
use rustls::pki_types::ServerName;
use tls::{TenantTls, TlsError, ALPN_H2, ALPN_HTTP11};

/// The device must send its first byte (request line or ClientHello) within this.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// The TLS handshake with the origin (before the device's) must finish within this.
pub const ORIGIN_TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffers of a TLS passthrough relay.
const RELAY_BUFFER: usize = 64 * 1024;

/// Long-lived state of the HTTP inspector, shared by all flows (clone = same state).
#[derive(Clone, Default)]
pub struct HttpServices {
    inner: Arc<ServicesInner>,
    /// The gateway's shutdown: connections stop taking requests, finish the ones in flight (their records
    /// are written) and close.
    stop: CancellationToken,
}

#[derive(Default)]
struct ServicesInner {
    /// The audit pipeline's HTTP handle (`None`: records are not kept, in tests without a store).
    sink: Option<HttpAuditSink>,
    /// Loaded tenant TLS material, keyed by tenant and the settings it was loaded with.
    tls: Mutex<HashMap<String, (TlsKey, Arc<TenantTls>)>>,
    counters: HttpCounters,
}

/// What the HTTP inspector counts (`prometheus-client` metrics: atomic adds).
#[derive(Debug, Default)]
struct HttpCounters {
    /// Upgraded flows handed to the inspector.
    connections: Counter,
    /// Audit records of the inspector (requests and TLS decisions), by decision.
    decisions: Family<DecisionLabel, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabel {
    decision: String,
}

/// What the loaded material depends on: paths and modification times of the CA and the trusted origin CAs.
type TlsKey = (
    PathBuf,
    Option<PathBuf>,
    Option<SystemTime>,
    Option<SystemTime>,
);

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl HttpServices {
    /// Services whose records go to `sink`.
    pub fn new(sink: HttpAuditSink) -> HttpServices {
        HttpServices {
            inner: Arc::new(ServicesInner {
                sink: Some(sink),
                tls: Mutex::default(),
                counters: HttpCounters::default(),
            }),
            stop: CancellationToken::new(),
        }
    }

    /// Connections end gracefully when `stop` is cancelled (the gateway's shutdown).
    pub fn with_shutdown(mut self, stop: CancellationToken) -> HttpServices {
        self.stop = stop;
        self
    }

    pub(crate) fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Registers the inspector's counters (names without `_total`: the encoder adds it).
    pub fn register_metrics(&self, reg: &mut prometheus_client::registry::Registry) {
        let c = &self.inner.counters;
        reg.register(
            "rampart_http_connections",
            "Upgraded flows handed to the HTTP inspector",
            c.connections.clone(),
        );
        reg.register(
            "rampart_http_decisions",
            "HTTP requests and TLS connections decided by the HTTP inspector, by decision (one per audit record)",
            c.decisions.clone(),
        );
    }

    /// One more request or TLS connection decided `decision` (a family created on first use: absent from
    /// `/metrics` until the first one).
    pub(crate) fn count_decision(&self, decision: &str) {
        self.inner
            .counters
            .decisions
            .get_or_create(&DecisionLabel {
                decision: decision.to_string(),
            })
            .inc();
    }

    fn sink(&self) -> Option<HttpAuditSink> {
        self.inner.sink.clone()
    }

    /// The tenant's TLS material (loaded once; a missing CA is retried on the next connection, so
    /// `rampart ca init` takes effect without a restart).
    fn tenant_tls(&self, cfg: &Config, tenant: &Tenant) -> Result<Arc<TenantTls>, TlsError> {
        let id = tenant.id.as_str();
        let key: TlsKey = (
            cfg.gateway.state_dir.clone(),
            tenant.http.tls_upstream_ca.clone(),
            mtime(&tls::ca_dir(&cfg.gateway.state_dir, id).join("ca.pem")),
            tenant.http.tls_upstream_ca.as_deref().and_then(mtime),
        );
        if let Some((k, t)) = self.inner.tls.lock().expect("tls cache").get(id) {
            if *k == key {
                return Ok(t.clone());
            }
        }
        let t = Arc::new(TenantTls::load(
            &cfg.gateway.state_dir,
            id,
            tenant.http.tls_upstream_ca.as_deref(),
        )?);
        self.inner
            .tls
            .lock()
            .expect("tls cache")
            .insert(id.to_string(), (key, t.clone()));
        Ok(t)
    }
}

/// What every request of a flow shares: the flow, the gateway's environment, the record sink.
#[derive(Clone)]
pub struct FlowCtx {
    pub upgraded: Arc<FlowContext>,
    pub config: ConfigHandle,
    pub services: HttpServices,
    sink: Option<HttpAuditSink>,
}

impl FlowCtx {
    /// A record with the flow's fields filled in.
    pub fn base_record(&self) -> HttpRecord {
        let u = &self.upgraded;
        HttpRecord {
            flow_seq: u.seq,
            tenant: u.identity.tenant.to_string(),
            device: u.identity.device.to_string(),
            user: u.identity.user.to_string(),
            src: u.src.to_string(),
            dst: u.dst.to_string(),
            flow_rule: u.rule.to_string(),
            ..Default::default()
        }
    }

    /// Whether requests may be served, per `audit.on_failure`: a fail-closed gateway serves none while HTTP
    /// records cannot be kept (store not opened, or its last write failed).
    pub fn audit_admits(&self, cfg: &Config) -> bool {
        cfg.audit.on_failure != FailurePolicy::FailClosed
            || self.sink.as_ref().is_some_and(HttpAuditSink::healthy)
    }

    pub fn emit(&self, r: HttpRecord) {
        self.services.count_decision(r.decision.as_ref());
        if let Some(s) = &self.sink {
            s.emit(r);
        }
    }
}

/// Inspects one upgraded flow: `client` is the device's stream, `upstream` the leg the off-ramp opened to the
/// original destination, `reconnect` opens another one the same way. Returns when the connection is done.
pub async fn inspect(
    client: TcpStream,
    upstream: TcpStream,
    flow: Arc<FlowContext>,
    config: &ConfigHandle,
    services: &HttpServices,
    reconnect: Reconnect,
) {
    // A downgraded leg carries the device's own 5-tuple towards the destination device: there is only one.
    let reconnect = flow.downgrade.is_none().then_some(reconnect);
    services.inner.counters.connections.inc();
    let ctx = FlowCtx {
        upgraded: flow.clone(),
        config: config.clone(),
        services: services.clone(),
        sink: services.sink(),
    };
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        // Shutting down: a connection without a request yet just closes.
        () = services.stop.cancelled() => return,
        p = tokio::time::timeout(FIRST_BYTE_TIMEOUT, client.peek(&mut first)) => p,
    };
    match peeked {
        Ok(Ok(1)) => {}
        Ok(_) => return,
        Err(_) => {
            tracing::debug!(
                seq = flow.seq,
                "no request within the first-byte timeout; closing"
            );
            return;
        }
    }
    // 0x16: a TLS handshake record. HTTP requests start with a method token.
    if first[0] == 0x16 {
        inspect_tls(client, upstream, ctx, reconnect).await;
    } else {
        let conn = ConnCtx {
            flow: ctx,
            scheme: "http",
            sni: None,
            origin: Ok(Origin::new(OriginIo::Plain(upstream), None, reconnect)),
        };
        proxy::serve(client, Arc::new(conn)).await;
    }
}

fn tls_record(
    ctx: &FlowCtx,
    sni: Option<&str>,
    decision: HttpDecision,
    rule: Option<String>,
) -> HttpRecord {
    let u = &ctx.upgraded;
    HttpRecord {
        at_ms: proxy::unix_ms(),
        ref_id: String::new(),
        scheme: "tls".into(),
        sni: sni.map(str::to_string),
        method: "-".into(),
        host: sni
            .map(str::to_string)
            .unwrap_or_else(|| u.dst.ip().to_string()),
        path: "-".into(),
        decision,
        rule,
        ..ctx.base_record()
    }
}

async fn inspect_tls(
    mut client: TcpStream,
    upstream: TcpStream,
    ctx: FlowCtx,
    reconnect: Option<Reconnect>,
) {
    let seq = ctx.upgraded.seq;
    let (accepted, seen) = match tls::read_client_hello(&mut client, FIRST_BYTE_TIMEOUT).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(seq, error = %e, "no usable ClientHello; closing");
            return;
        }
    };
    let hello = accepted.client_hello();
    // Only a DNS name counts (rustls reports no name for an IP literal; checked again here).
    let sni = hello
        .server_name()
        .map(|s| s.to_ascii_lowercase())
        .filter(|s| s.parse::<std::net::IpAddr>().is_err());
    let offered: Option<Vec<Vec<u8>>> = hello.alpn().map(|l| l.map(<[u8]>::to_vec).collect());
    let http_alpn: Vec<Vec<u8>> = offered
        .iter()
        .flatten()
        .filter(|p| policy::is_http_alpn(p))
        .cloned()
        .collect();

    let cfg = ctx.config.current();
    let Some(tenant) = cfg.tenant(ctx.upgraded.identity.tenant.as_str()) else {
        return;
    };
    let u = ctx.upgraded.clone();
    let who = Identity {
        user: &u.identity.user,
        device: &u.identity.device,
        groups: &u.identity.groups,
    };
    if !ctx.audit_admits(&cfg) {
        tracing::warn!(
            seq,
            "HTTP audit store unavailable and audit.on_failure = fail_closed; refusing"
        );
        tls::refuse(client, TlsAlert::AccessDenied).await;
        return;
    }
    let facts = TlsFacts {
        sni: sni.as_deref(),
        dst: (*u.dst.ip()).into(),
        alpn: offered.as_deref(),
    };
    let (action, mut upstream) = match policy::classify_tls(&tenant.http, &who, &facts) {
        TlsAction::PassthroughIfOriginProvesName { rule, otherwise } => {
            let name = sni.as_deref().unwrap_or_default();
            let check = OriginCheck {
                ctx: &ctx,
                cfg: &cfg,
                tenant,
                name,
                offered: offered.as_deref(),
            };
            match check.run(upstream, reconnect.as_ref()).await {
                Some((true, leg)) => (
                    TlsAction::Passthrough {
                        why: NoDecrypt::DoNotInspect,
                        rule,
                    },
                    leg,
                ),
                Some((false, leg)) => (*otherwise, leg),
                None => return,
            }
        }
        action => (action, upstream),
    };
    match action {
        TlsAction::Reject { rule, alert } => {
            let mut g = RecordGuard::new(
                &ctx,
                tls_record(&ctx, sni.as_deref(), HttpDecision::Block, Some(rule)),
            );
            g.record_mut().error = Some(match alert {
                TlsAlert::NoApplicationProtocol => format!(
                    "refused before decryption: the ClientHello offers only protocols that are not HTTP \
                     and not on tls_passthrough_alpn ({}) (alert no_application_protocol)",
                    alpn_names(offered.as_deref().unwrap_or_default())
                ),
                TlsAlert::AccessDenied if sni.is_none() => "refused before decryption: no server name \
                     (SNI) while the tenant's HTTP rules name hosts (alert access_denied)"
                    .to_string(),
                TlsAlert::AccessDenied => {
                    "refused on the TLS server name (alert access_denied)".to_string()
                }
            });
            drop(g);
            tls::refuse(client, alert).await;
        }
        TlsAction::Passthrough { why, rule } => {
            let mut record = tls_record(&ctx, sni.as_deref(), HttpDecision::Passthrough, rule);
            if why == NoDecrypt::AllowedAlpn {
                // The protocol is part of what the reviewer sees: `tls+imap`.
                record.scheme =
                    format!("tls+{}", alpn_names(offered.as_deref().unwrap_or_default()));
            }
            let g = RecordGuard::new(&ctx, record);
            if upstream.write_all(&seen).await.is_err() {
                return;
            }
            g.add_bytes(seen.len() as u64, 0);
            let relay = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut upstream,
                RELAY_BUFFER,
                RELAY_BUFFER,
            );
            tokio::select! {
                r = relay => if let Ok((up, down)) = r {
                    g.add_bytes(up, down);
                },
                // Shutting down: an opaque stream has no request boundary to wait for; it closes like a
                // plain off-ramp connection (recorded as its guard drops).
                () = ctx.services.stop.cancelled() => {}
            }
        }
        TlsAction::Decrypt => {
            let ttls = match ctx.services.tenant_tls(&cfg, tenant) {
                Ok(t) => t,
                Err(e) => {
                    // Fail closed: a tenant that asked for decryption never gets a silent bypass.
                    tracing::warn!(tenant = %u.identity.tenant, error = %e, "cannot decrypt TLS for this tenant; refusing");
                    let mut g = RecordGuard::new(
                        &ctx,
                        tls_record(
                            &ctx,
                            sni.as_deref(),
                            HttpDecision::Block,
                            Some("tls-ca-unavailable".into()),
                        ),
                    );
                    g.record_mut().error = Some(e.to_string());
                    drop(g);
                    tls::refuse(client, TlsAlert::AccessDenied).await;
                    return;
                }
            };
            let hello = Hello {
                accepted,
                sni,
                http_alpn,
            };
            decrypt(client, upstream, hello, ctx, reconnect, ttls).await;
        }
        TlsAction::PassthroughIfOriginProvesName { .. } => {
            // `classify_tls` never nests it; refuse rather than guess.
            tls::refuse(client, TlsAlert::AccessDenied).await;
        }
    }
}

/// ALPN protocol names for a record, comma-separated (bytes that are not printable are escaped).
fn alpn_names(list: &[Vec<u8>]) -> String {
    list.iter()
        .map(|p| p.escape_ascii().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A server name on `do_not_inspect` is only the device's claim: before relaying untouched, the gateway
/// connects to the origin itself with that name (and the device's protocols) and checks that the origin's
/// certificate is valid for it (the tenant's origin trust: web roots and `tls_upstream_ca`).
struct OriginCheck<'a> {
    ctx: &'a FlowCtx,
    cfg: &'a Config,
    tenant: &'a Tenant,
    name: &'a str,
    offered: Option<&'a [Vec<u8>]>,
}

impl OriginCheck<'_> {
    /// Uses `upstream` for the check and returns whether the origin proved the name, with a fresh leg for
    /// what follows. `None`: no fresh leg could be opened (the connection is closed). Without `reconnect`
    /// (a downgraded leg: there is only one) the name cannot be checked and counts as not proven. A
    /// destination that proved the name recently (`TenantTls::proven`) is not asked again.
    async fn run(
        &self,
        upstream: TcpStream,
        reconnect: Option<&Reconnect>,
    ) -> Option<(bool, TcpStream)> {
        let Some(reconnect) = reconnect else {
            return Some((false, upstream));
        };
        let seq = self.ctx.upgraded.seq;
        let dst = self.ctx.upgraded.dst;
        let ttls = match self.ctx.services.tenant_tls(self.cfg, self.tenant) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::debug!(seq, error = %e, "no TLS material to check the origin's name");
                None
            }
        };
        if ttls.as_ref().is_some_and(|t| t.proven(dst, self.name)) {
            return Some((true, upstream));
        }
        let proven = match (&ttls, ServerName::try_from(self.name.to_string())) {
            (Some(ttls), Ok(name)) => {
                let cfg = ttls.client_config(self.offered.map(<[_]>::to_vec).unwrap_or_default());
                let r = tokio::time::timeout(
                    ORIGIN_TLS_TIMEOUT,
                    tokio_rustls::TlsConnector::from(cfg).connect(name, upstream),
                )
                .await;
                match r {
                    Ok(Ok(_)) => {
                        ttls.remember_proven(dst, self.name);
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(seq, error = %e, "the origin did not prove the do_not_inspect name");
                        false
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        match reconnect().await {
            Ok(leg) => Some((proven, leg)),
            Err(e) => {
                tracing::debug!(seq, error = %e, "cannot reach the origin again");
                None
            }
        }
    }
}

/// A ClientHello that was read but not answered yet.
struct Hello {
    accepted: rustls::server::Accepted,
    sni: Option<String>,
    /// The HTTP protocols the device offered (ALPN), in its order.
    http_alpn: Vec<Vec<u8>>,
}

/// Connects to the origin with TLS (the device's name and protocols) and tells what to offer the device.
async fn connect_origin(
    ttls: &TenantTls,
    upstream: TcpStream,
    hello: &Hello,
    dst: std::net::IpAddr,
    reconnect: Option<Reconnect>,
) -> (Result<Origin, OriginFailure>, Vec<Vec<u8>>) {
    let to_origin = if hello.http_alpn.is_empty() {
        vec![ALPN_HTTP11.to_vec()]
    } else {
        hello.http_alpn.clone()
    };
    let client_cfg = ttls.client_config(to_origin);
    let name = tls::origin_name(hello.sni.as_deref(), dst);
    let connected = tokio::time::timeout(
        ORIGIN_TLS_TIMEOUT,
        tokio_rustls::TlsConnector::from(client_cfg.clone()).connect(name.clone(), upstream),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    match connected {
        Ok(tls) => {
            // The origin's protocol first (rustls picks by server preference).
            let alpn = if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
                vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
            } else {
                vec![ALPN_HTTP11.to_vec(), ALPN_H2.to_vec()]
            };
            let origin = Origin::new(
                OriginIo::Tls(Box::new(tls)),
                Some((client_cfg, name)),
                reconnect,
            );
            (Ok(origin), alpn)
        }
        Err(e) => {
            tracing::debug!(error = %e, "origin TLS handshake failed");
            let failure = match tls::rustls_error(&e) {
                Some(rustls::Error::InvalidCertificate(c)) => OriginFailure {
                    rule: "upstream-cert-untrusted",
                    detail: format!(
                        "The site's certificate is not trusted ({c:?}); the gateway does not connect you to it."
                    ),
                },
                _ => OriginFailure {
                    rule: "upstream-tls-failed",
                    detail: format!("A secure connection to the site failed ({e})."),
                },
            };
            (Err(failure), vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()])
        }
    }
}

/// Decrypts: the origin first (its certificate and protocol decide what the device is offered), then the
/// device's handshake with a leaf from the tenant CA, then the HTTP server on the decrypted stream. An origin
/// that failed TLS still gets the device handshake, so the device sees the page saying why.
async fn decrypt(
    client: TcpStream,
    upstream: TcpStream,
    hello: Hello,
    ctx: FlowCtx,
    reconnect: Option<Reconnect>,
    ttls: Arc<TenantTls>,
) {
    let (seq, dst) = (ctx.upgraded.seq, *ctx.upgraded.dst.ip());
    let (origin, device_alpn) =
        connect_origin(&ttls, upstream, &hello, dst.into(), reconnect).await;
    let leaf_name = hello.sni.clone().unwrap_or_else(|| dst.to_string());
    let leaf = match ttls.leaf(&leaf_name) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(seq, error = %e, "cannot mint a leaf certificate; refusing");
            tls::refuse(client, TlsAlert::AccessDenied).await;
            return;
        }
    };
    let server_cfg = ttls.server_config(leaf, device_alpn);
    let stream = match tokio_rustls::StartHandshake::from_parts(hello.accepted, client)
        .into_stream(server_cfg)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(seq, error = %e, "device TLS handshake failed (does it trust the tenant CA?)");
            return;
        }
    };
    let conn = ConnCtx {
        flow: ctx,
        scheme: "https",
        sni: hello.sni,
        origin,
    };
    proxy::serve(stream, Arc::new(conn)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    const CONFIG: &str = r#"
[gateway]
state_dir = "state"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
offramp = ["127.0.0.0/8"]
[[tenant.rule]]
id = "web"
action = "inspect_http"
proto = "tcp"
[[tenant.device]]
name = "laptop"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
address = "100.96.0.2"
user = "alice"
"#;

    /// An HTTP/1.1 origin whose `/wait3` answers only once 3 requests are in flight at once (or after 10 s),
    /// with the most it saw in flight.
    async fn origin() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let (in_flight, most) = (in_flight.clone(), most.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let (in_flight, most) = (in_flight.clone(), most.clone());
                        async move {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                            while most.load(Ordering::SeqCst) < 3
                                && tokio::time::Instant::now() < deadline
                            {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            let body = most.load(Ordering::SeqCst).to_string();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http2_streams_to_an_http1_origin_run_in_parallel() {
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = Config::from_toml(CONFIG, &dir.join("gateway.toml")).unwrap();
        let config = ConfigHandle::new(Arc::new(cfg));
        let services = HttpServices::default();
        let origin_addr = origin().await;
        let std::net::SocketAddr::V4(dst) = origin_addr else {
            unreachable!()
        };
        let flow = Arc::new(FlowContext::new(&crate::core::Upgraded {
            seq: crate::core::FlowSeq::new(1),
            slot: "100.64.0.1:1024".parse().unwrap(),
            protocol: 6,
            src: "100.96.0.2:40000".parse().unwrap(),
            dst,
            tenant: crate::config::TenantId::parse("acme").unwrap(),
            device: crate::config::DeviceName::parse("laptop").unwrap(),
            user: crate::config::UserName::parse("alice").unwrap(),
            groups: Arc::from(Vec::new()),
            rule: Arc::from("web"),
            downgrade: None,
            inspect: crate::config::Inspect::Http,
        }));
        // The device side: an HTTP/2 (prior knowledge) client connected to the inspector.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let device = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let upstream = TcpStream::connect(origin_addr).await.unwrap();
        let reconnect: Reconnect =
            Arc::new(move || Box::pin(async move { TcpStream::connect(origin_addr).await }));
        let inspector = tokio::spawn(async move {
            inspect(accepted, upstream, flow, &config, &services, reconnect).await;
        });
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(device),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let get = |path: &'static str| {
            let mut s = sender.clone();
            async move {
                let req = hyper::Request::get(format!("http://127.0.0.1/{path}"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = s.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap().to_bytes()
            }
        };
        let (a, b, c) = tokio::join!(get("wait3"), get("wait3"), get("wait3"));
        assert_eq!((&a[..], &b[..], &c[..]), (&b"3"[..], &b"3"[..], &b"3"[..]));
        drop(sender);
        inspector.abort();
    }

    /// The gateway's shutdown while a response streams: the inspector finishes that response (hyper's
    /// graceful shutdown), then closes the connection and returns. Raw sockets on both sides, so the test
    /// decides exactly when each byte is sent.
    #[tokio::test]
    async fn shutdown_finishes_the_response_in_flight_then_closes() {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let dir_tmp = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml(CONFIG, &dir_tmp.path().join("gateway.toml")).unwrap();
        let config = ConfigHandle::new(Arc::new(cfg));
        let stop = CancellationToken::new();
        let services = HttpServices::default().with_shutdown(stop.clone());
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_addr = origin.local_addr().unwrap();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let origin_task = tokio::spawn(async move {
            let (s, _) = origin.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut line = String::new();
            while s.read_line(&mut line).await.unwrap() > 2 {
                line.clear();
            }
            let s = s.get_mut();
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nline 0\n\r\n")
                .await
                .unwrap();
            released.await.unwrap();
            s.write_all(b"7\r\nline 1\n\r\n0\r\n\r\n").await.unwrap();
        });
        let std::net::SocketAddr::V4(dst) = origin_addr else {
            unreachable!()
        };
        let flow = Arc::new(FlowContext::new(&crate::core::Upgraded {
            seq: crate::core::FlowSeq::new(1),
            slot: "100.64.0.1:1024".parse().unwrap(),
            protocol: 6,
            src: "100.96.0.2:40000".parse().unwrap(),
            dst,
            tenant: crate::config::TenantId::parse("acme").unwrap(),
            device: crate::config::DeviceName::parse("laptop").unwrap(),
            user: crate::config::UserName::parse("alice").unwrap(),
            groups: Arc::from(Vec::new()),
            rule: Arc::from("web"),
            downgrade: None,
            inspect: crate::config::Inspect::Http,
        }));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut device = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        let upstream = TcpStream::connect(origin_addr).await.unwrap();
        let reconnect: Reconnect =
            Arc::new(move || Box::pin(async move { TcpStream::connect(origin_addr).await }));
        let inspector = tokio::spawn(async move {
            inspect(accepted, upstream, flow, &config, &services, reconnect).await;
        });
        device
            .write_all(b"GET /stream HTTP/1.1\r\nHost: origin\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("line 0") {
            let n = device.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the first chunk: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        stop.cancel();
        release.send(()).unwrap();
        let read_rest = device.read_to_end(&mut got);
        tokio::time::timeout(Duration::from_secs(30), read_rest)
            .await
            .expect("the connection closes after the response")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("line 1") && text.ends_with("0\r\n\r\n"),
            "the response in flight was cut: {text:?}"
        );
        tokio::time::timeout(Duration::from_secs(30), inspector)
            .await
            .expect("the inspector returns")
            .unwrap();
        origin_task.await.unwrap();
    }
}
