//! The admin side: the listener for `GET /health` and `GET /metrics` (Prometheus text format, this file; a
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

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::audit::AuditCounters;
use crate::core::{DropReason, Metrics, TrafficCounters};
use crate::handoff::ConfigHandle;

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
    audit: Arc<AuditCounters>,
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
        let audit = audit.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match &*access {
                AdminAccess::Plain => answer(conn, None, &metrics, &audit).await,
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
                    answer(tls, expected, &metrics, &audit).await
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
    audit: &AuditCounters,
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
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            render(metrics, audit),
        ),
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

/// Renders all counters in the Prometheus text exposition format.
pub fn render(m: &Metrics, audit: &AuditCounters) -> String {
    let tenants = m.tenants();
    let mut out = String::with_capacity(4096);
    let per_tenant = |out: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      get: &dyn Fn(&TrafficCounters) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, c) in &tenants {
            let _ = writeln!(out, "{name}{{tenant=\"{id}\"}} {}", get(c));
        }
    };
    per_tenant(
        &mut out,
        "rampart_handshakes_total",
        "counter",
        "Completed WireGuard handshakes.",
        &|c| c.handshakes.get(),
    );
    per_tenant(
        &mut out,
        "rampart_rx_packets_total",
        "counter",
        "Inner packets received from devices.",
        &|c| c.rx_packets.get(),
    );
    per_tenant(
        &mut out,
        "rampart_rx_bytes_total",
        "counter",
        "Inner bytes received from devices.",
        &|c| c.rx_bytes.get(),
    );
    per_tenant(
        &mut out,
        "rampart_tx_packets_total",
        "counter",
        "Inner packets sent to devices.",
        &|c| c.tx_packets.get(),
    );
    per_tenant(
        &mut out,
        "rampart_tx_bytes_total",
        "counter",
        "Inner bytes sent to devices.",
        &|c| c.tx_bytes.get(),
    );
    per_tenant(
        &mut out,
        "rampart_peers",
        "gauge",
        "Devices configured or enrolled.",
        &|c| c.peers.get(),
    );
    per_tenant(
        &mut out,
        "rampart_peers_connected",
        "gauge",
        "Devices with a handshake in the last 180 s.",
        &|c| c.peers_connected.get(),
    );
    per_tenant(&mut out, "rampart_flows", "gauge", "Live flows.", &|c| {
        c.flows.get()
    });
    per_tenant(
        &mut out,
        "rampart_flows_started_total",
        "counter",
        "Flows started (any decision).",
        &|c| c.flows_started.get(),
    );
    let _ = writeln!(
        out,
        "# HELP rampart_dropped_packets_total Datagrams and inner packets dropped, by reason.\n# TYPE rampart_dropped_packets_total counter"
    );
    let un = &m.global.unattributed;
    for r in DropReason::all() {
        let _ = writeln!(
            out,
            "rampart_dropped_packets_total{{tenant=\"\",reason=\"{}\"}} {}",
            r.as_str(),
            un.drops(r)
        );
        for (id, c) in &tenants {
            let _ = writeln!(
                out,
                "rampart_dropped_packets_total{{tenant=\"{id}\",reason=\"{}\"}} {}",
                r.as_str(),
                c.drops(r)
            );
        }
    }
    let g = &m.global;
    for (name, help, v) in [
        (
            "rampart_datagrams_received_total",
            "UDP datagrams received.",
            g.datagrams_rx.get(),
        ),
        (
            "rampart_datagrams_sent_total",
            "UDP datagrams sent.",
            g.datagrams_tx.get(),
        ),
        (
            "rampart_udp_receive_calls_total",
            "recvmmsg calls on the WireGuard socket that returned datagrams (datagrams per call = \
             rampart_datagrams_received_total / this).",
            g.recv_calls.get(),
        ),
        (
            "rampart_udp_send_calls_total",
            "sendmmsg calls on the WireGuard socket (datagrams per call = rampart_datagrams_sent_total / this).",
            g.send_calls.get(),
        ),
        (
            "rampart_udp_send_trains_total",
            "GSO trains sent on the WireGuard socket: one UDP_SEGMENT message of several equal-size datagrams.",
            g.send_trains.get(),
        ),
        (
            "rampart_udp_send_train_datagrams_total",
            "Datagrams sent inside GSO trains (mean train length = this / rampart_udp_send_trains_total).",
            g.send_train_datagrams.get(),
        ),
        (
            "rampart_udp_gso_fallbacks_total",
            "GSO trains the kernel refused and that were sent again as separate datagrams.",
            g.gso_fallbacks.get(),
        ),
        (
            "rampart_datapath_wakeups_total",
            "Turns of the data-path loop: each poll return, for traffic or the idle timer tick.",
            g.wakeups.get(),
        ),
        (
            "rampart_cookie_replies_total",
            "Cookie replies sent to handshake initiators while under load.",
            g.cookie_replies.get(),
        ),
        (
            "rampart_send_errors_total",
            "UDP datagrams the kernel refused to send.",
            g.send_errors.get(),
        ),
        (
            "rampart_tun_write_errors_total",
            "Packets for the gateway's namespace that the upgrade TUN refused.",
            g.tun_write_errors.get(),
        ),
        (
            "rampart_udp_receive_errors_total",
            "Failed receive calls on the WireGuard socket (usually ICMP errors for earlier sends).",
            g.recv_errors.get(),
        ),
        (
            "rampart_refusals_unrecorded_total",
            "Refused flow attempts not recorded (too many distinct ones within one summary interval).",
            g.refusals_unrecorded.get(),
        ),
        (
            "rampart_handoffs_dropped_total",
            "Upgraded flows refused because the application side's queue was full.",
            g.handoffs_dropped.get(),
        ),
        (
            "rampart_onramp_accepted_total",
            "Connected (SEQPACKET) on-ramp connections whose context was accepted.",
            g.onramp_accepted.get(),
        ),
        (
            "rampart_onramp_closed_bad_packets_total",
            "On-ramp connections the gateway closed after too many datagrams that were not IP packets.",
            g.onramp_closed_bad.get(),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP rampart_udp_gso_enabled 1 while the WireGuard socket sends GSO trains, 0 after it fell back to single datagrams.\n# TYPE rampart_udp_gso_enabled gauge\nrampart_udp_gso_enabled {}",
        g.gso_enabled.get()
    );
    let _ = writeln!(
        out,
        "# HELP rampart_nat_slots NAT slots held by upgraded flows.\n# TYPE rampart_nat_slots gauge\nrampart_nat_slots {}",
        g.nat_slots.get()
    );
    let _ = writeln!(
        out,
        "# HELP rampart_nat_slots_closing NAT slots whose flow ended, waiting for their sockets to close.
# TYPE rampart_nat_slots_closing gauge
rampart_nat_slots_closing {}",
        g.nat_slots_closing.get()
    );
    let _ = writeln!(
        out,
        "# HELP rampart_peers_timed Peers whose WireGuard timers run on each tick (with a session, a handshake or queued packets).
# TYPE rampart_peers_timed gauge
rampart_peers_timed {}",
        g.peers_timed.get()
    );
    let _ = writeln!(
        out,
        "# HELP rampart_onramp_connections Connected (SEQPACKET) on-ramp connections open now.
# TYPE rampart_onramp_connections gauge
rampart_onramp_connections {}",
        g.onramp_connections.get()
    );
    render_audit(&mut out, audit);
    out
}

/// The audit pipeline's counters: written and lost records by kind (and reason), gap records, checkpoints.
fn render_audit(out: &mut String, audit: &AuditCounters) {
    let mut seen = std::collections::HashSet::new();
    let mut lost_total = 0;
    for (name, labels, v) in audit.samples() {
        if seen.insert(name) {
            let help = match name {
                "rampart_audit_records_written_total" => "Audit records committed, by kind.",
                "rampart_audit_records_lost_total" => "Audit records lost, by kind and reason (each loss is also a gap record in the chain).",
                "rampart_audit_gap_records_total" => "Gap records written (each names the records lost since the previous one).",
                "rampart_audit_evictions_total" => "Eviction records written: the oldest closed records removed to stay under audit.max_store_mb / max_recordings_mb (on_failure = fail_open; records_lost_total{reason=\"evicted\"} counts them).",
                "rampart_audit_recordings_evicted_total" => "SSH recording files removed by evictions.",
                "rampart_audit_quota_exceeded_total" => "Times the audit store or the recordings went over their quota and stayed over (fail_closed: new flows refused, counted as drops reason audit_unavailable).",
                "rampart_audit_over_quota" => "1 while the audit store or the recordings are over their quota.",
                _ => "Audit checkpoints signed.",
            };
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
        if name == "rampart_audit_records_lost_total" {
            lost_total += v;
        }
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{}}} {v}", labels.join(","));
        }
    }
    let _ = writeln!(
        out,
        "# HELP rampart_audit_records_dropped_total Audit records lost, all kinds and reasons.\n# TYPE rampart_audit_records_dropped_total counter\nrampart_audit_records_dropped_total {lost_total}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantId;

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
        let m = Metrics::default();
        let t = m.tenant(&TenantId::parse("acme").unwrap());
        t.handshakes.add(2);
        t.count_drop(DropReason::SpoofedSource);
        m.global.cookie_replies.add(5);
        let audit = AuditCounters::default();
        audit.lost(
            crate::audit::RecordKind::Http,
            crate::audit::LossReason::QueueFull,
            3,
        );
        let text = render(&m, &audit);
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
