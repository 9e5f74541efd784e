//! The layer-4 off-ramp: flows the core upgraded (`core::Upgraded`) arrive as ordinary kernel connections on
//! the listener in the gateway's private namespace; this module proxies each one to its real destination with
//! ordinary sockets from the gateway host.
//!
//! Egress: upstream sockets are opened in the gateway process's own network namespace, so the host's routing
//! table picks the interface and source address (as for any local client). The device's address never leaves
//! the gateway.
//!
//! The accepted connection's peer address is the flow's NAT slot; the `Upgraded` event for that slot (sent by
//! the data path before the SYN is written to the TUN) says what the flow really is. This module decides
//! nothing: policy was applied by the core when the flow started.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::config::Inspect;
use crate::core::counters::Counter;
use crate::core::Upgraded;
use crate::handoff::{ConfigHandle, FlowContext};
use crate::netns::supervisor::NsConnector;
use crate::packet::PROTO_UDP;

/// How long a connection to an upstream host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an accepted connection waits for its flow's `Upgraded` event (normally already there).
const LOOKUP_WAIT: Duration = Duration::from_secs(2);
/// Upgraded flows never accepted are forgotten after this long.
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);
/// A UDP flow's upstream socket closes after this much silence.
const UDP_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct OfframpCounters {
    pub tcp_connections: Counter,
    pub tcp_connect_failures: Counter,
    pub udp_flows: Counter,
    pub unknown_slot: Counter,
}

/// Upgraded flows by NAT slot, filled from the data path's events.
#[derive(Default)]
pub struct Flows {
    by_slot: Mutex<HashMap<SocketAddrV4, (Arc<FlowContext>, Instant)>>,
}

impl Flows {
    fn insert(&self, u: Box<Upgraded>) {
        let mut m = self.by_slot.lock().expect("flows lock");
        let now = Instant::now();
        m.retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
        m.insert(u.slot, (Arc::new(FlowContext::new(&u)), now));
    }

    fn get(&self, slot: SocketAddrV4) -> Option<Arc<FlowContext>> {
        self.by_slot
            .lock()
            .expect("flows lock")
            .get(&slot)
            .map(|(u, _)| u.clone())
    }

    fn take(&self, slot: SocketAddrV4) -> Option<Arc<FlowContext>> {
        self.by_slot
            .lock()
            .expect("flows lock")
            .remove(&slot)
            .map(|(u, _)| u)
    }

    /// Waits (briefly) for the event of `slot`.
    async fn wait(&self, slot: SocketAddrV4, take: bool) -> Option<Arc<FlowContext>> {
        let deadline = Instant::now() + LOOKUP_WAIT;
        loop {
            let found = if take {
                self.take(slot)
            } else {
                self.get(slot)
            };
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Consumes `Upgraded` events from the data path.
pub async fn track(mut upgrades: UnboundedReceiver<Box<Upgraded>>, flows: Arc<Flows>) {
    while let Some(u) = upgrades.recv().await {
        flows.insert(u);
    }
}

/// Serves one namespace generation: TCP accept loop and UDP relay. Returns the tasks (abort them when the
/// namespace goes away).
pub fn serve(
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
    flows: Arc<Flows>,
    counters: Arc<OfframpCounters>,
    connector: NsConnector,
    env: InspectEnv,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    tcp.set_nonblocking(true)?;
    udp.set_nonblocking(true)?;
    let tcp = TcpListener::from_std(tcp)?;
    let udp = Arc::new(UdpSocket::from_std(udp)?);
    Ok(vec![
        tokio::spawn(accept_loop(
            tcp,
            flows.clone(),
            counters.clone(),
            connector,
            env,
        )),
        tokio::spawn(udp_loop(udp, flows, counters)),
    ])
}

async fn accept_loop(
    listener: TcpListener,
    flows: Arc<Flows>,
    counters: Arc<OfframpCounters>,
    connector: NsConnector,
    env: InspectEnv,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (flows, counters, connector, env) = (
            flows.clone(),
            counters.clone(),
            connector.clone(),
            env.clone(),
        );
        tokio::spawn(async move {
            let SocketAddr::V4(slot) = peer else { return };
            let Some(flow) = flows.wait(slot, true).await else {
                counters.unknown_slot.add(1);
                tracing::debug!(%slot, "upgraded connection without a flow; closing");
                reset(conn);
                return;
            };
            proxy_tcp(conn, flow, &counters, &connector, &env).await;
        });
    }
}

/// Closes with a RST (so the device sees a refused connection, not a clean close). A zero linger never
/// blocks on drop (the deprecation is about positive lingers).
#[allow(deprecated)]
fn reset(conn: TcpStream) {
    let _ = conn.set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// Opens the other leg: an ordinary socket to the upstream host, or (for `proxy` between devices) a
/// downgraded connection from inside the namespace whose packets reach the destination device as
/// `src -> dst` of the original flow.
async fn connect_leg(flow: &FlowContext, connector: &NsConnector) -> std::io::Result<TcpStream> {
    let Some(nat_dst) = flow.downgrade else {
        return TcpStream::connect(flow.dst).await;
    };
    let std = connector
        .connect_async(SocketAddr::V4(nat_dst), None)
        .await
        .map_err(std::io::Error::other)?;
    let s = TcpStream::from_std(std)?;
    s.writable().await?;
    match s.take_error()? {
        Some(e) => Err(e),
        None => Ok(s),
    }
}

async fn proxy_tcp(
    conn: TcpStream,
    flow: Arc<FlowContext>,
    counters: &OfframpCounters,
    connector: &NsConnector,
    env: &InspectEnv,
) {
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, connect_leg(&flow, connector)).await;
    let upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            counters.tcp_connect_failures.add(1);
            tracing::debug!(seq = flow.seq, error = %e, "off-ramp connect failed");
            return reset(conn);
        }
        Err(_) => {
            counters.tcp_connect_failures.add(1);
            tracing::debug!(seq = flow.seq, "off-ramp connect timed out");
            return reset(conn);
        }
    };
    counters.tcp_connections.add(1);
    let _ = upstream.set_nodelay(true);
    let _ = conn.set_nodelay(true);
    match &flow.inspect {
        Inspect::None => splice(conn, upstream, flow.seq).await,
        Inspect::Http => {
            let reconnect = reconnect_leg(&flow, connector);
            crate::http::inspect(
                conn,
                upstream,
                flow.clone(),
                &env.config,
                &env.http,
                reconnect,
            )
            .await
        }
        Inspect::Ssh(settings) => match env.ssh() {
            Some(ssh) => {
                let cfg = env.config.current();
                crate::ssh::intercept_flow(conn, upstream, &flow, settings, &cfg, ssh).await
            }
            None => {
                tracing::error!(
                    seq = flow.seq,
                    "the SSH inspector is not running; closing the flow"
                );
                reset(conn);
            }
        },
    }
}

/// Opens further legs like the first (for inspectors whose origin connection may close between requests).
fn reconnect_leg(flow: &Arc<FlowContext>, connector: &NsConnector) -> crate::http::Reconnect {
    let (flow, connector) = (flow.clone(), connector.clone());
    Arc::new(move || {
        let (flow, connector) = (flow.clone(), connector.clone());
        Box::pin(async move {
            tokio::time::timeout(CONNECT_TIMEOUT, connect_leg(&flow, &connector))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        })
    })
}

/// The plain layer-4 proxy: bytes both ways until both sides are done.
async fn splice(mut conn: TcpStream, mut upstream: TcpStream, seq: u64) {
    match tokio::io::copy_bidirectional(&mut conn, &mut upstream).await {
        Ok((up, down)) => tracing::trace!(seq, up, down, "off-ramp connection done"),
        Err(e) => tracing::trace!(seq, error = %e, "off-ramp connection ended with an error"),
    }
}

/// What inspectors need from the running gateway.
#[derive(Clone)]
pub struct InspectEnv {
    config: ConfigHandle,
    ssh: Option<Arc<crate::ssh::SshServices>>,
    http: crate::http::HttpServices,
}

impl InspectEnv {
    pub fn new(config: ConfigHandle) -> InspectEnv {
        InspectEnv {
            config,
            ssh: None,
            http: crate::http::HttpServices::default(),
        }
    }

    /// Adds the SSH inspector's shared services (trust material, audit sink).
    pub fn with_ssh(mut self, ssh: Arc<crate::ssh::SshServices>) -> InspectEnv {
        self.ssh = Some(ssh);
        self
    }

    pub fn ssh(&self) -> Option<&Arc<crate::ssh::SshServices>> {
        self.ssh.as_ref()
    }
}

/// Datagrams of upgraded UDP flows: each flow (NAT slot) gets a connected upstream socket; replies go back to
/// the slot through the namespace socket.
async fn udp_loop(ns: Arc<UdpSocket>, flows: Arc<Flows>, counters: Arc<OfframpCounters>) {
    let mut upstreams: HashMap<SocketAddrV4, (Arc<UdpSocket>, JoinHandle<()>)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match ns.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade UDP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(slot) = peer else { continue };
        upstreams.retain(|_, (_, task)| !task.is_finished());
        if let std::collections::hash_map::Entry::Vacant(entry) = upstreams.entry(slot) {
            let Some(flow) = flows
                .wait(slot, false)
                .await
                .filter(|f| f.protocol == PROTO_UDP)
            else {
                counters.unknown_slot.add(1);
                continue;
            };
            let bind = if flow.dst.ip().is_loopback() {
                "127.0.0.1:0"
            } else {
                "0.0.0.0:0"
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(flow.dst).await.is_err() {
                continue;
            }
            counters.udp_flows.add(1);
            let sock = Arc::new(sock);
            let task = tokio::spawn(udp_replies(sock.clone(), ns.clone(), slot));
            entry.insert((sock, task));
        }
        if let Some((sock, _)) = upstreams.get(&slot) {
            let _ = sock.send(&buf[..n]).await;
        }
    }
}

async fn udp_replies(up: Arc<UdpSocket>, ns: Arc<UdpSocket>, slot: SocketAddrV4) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, up.recv(&mut buf)).await {
        let _ = ns.send_to(&buf[..n], slot).await;
    }
}
