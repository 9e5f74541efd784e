//! The layer-4 off-ramp: flows the core upgraded arrive as ordinary kernel connections (or datagrams) on the
//! listener in the gateway's private namespace; this module proxies each one to its real destination with
//! ordinary sockets from the gateway host, or hands it to an inspector.
//!
//! Egress: upstream sockets are opened in the gateway process's own network namespace, so the host's routing
//! table picks the interface and source address (as for any local client). The device's address never leaves
//! the gateway.
//!
//! The accepted connection's peer address is the flow's NAT slot; the `Handoff::Upgraded` for that slot (sent
//! by the data path before the SYN is written to the TUN) says what the flow really is. The flow's end
//! (`Handoff::Released`) reaches every task working for it through `FlowContext::ended`: the namespace socket
//! and the upstream are closed with a RST, and when the last task is gone its `SlotLease` reports the slot
//! closed, which is the only way the data path gives the slot to another flow. This module decides nothing:
//! policy was applied by the core when the flow started.
//!
//! Threads: everything here (and the HTTP and SSH inspectors it hands flows to) runs on [`ProxyThreads`], the
//! layer-4/7 runtime, never on the runtime that serves admin and control: bulk copying cannot delay
//! `/metrics`, a reload or the shutdown. Plain streams are copied with `splice(2)` (`splice`).
#![deny(unsafe_code)]

mod splice;

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc::{self, Receiver};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use prometheus_client::metrics::counter::Counter;

use crate::config::{Egress, Inspect};
use crate::egress::Egresses;
use crate::handoff::{ConfigHandle, FlowContext, Handoff, SlotLease, SlotReleases};
use crate::netns::supervisor::NsConnector;
use crate::packet::{PROTO_TCP, PROTO_UDP};
use crate::shutdown::Shutdown;

/// How long a connection to an upstream host may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an accepted connection (or a first datagram) waits for its flow's hand-off (normally already
/// there: the data path sends it before the packet reaches the namespace).
const LOOKUP_WAIT: Duration = Duration::from_secs(2);
/// A UDP flow's upstream socket closes after this much silence.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued towards one UDP flow's upstream socket before more are dropped.
const UDP_QUEUE: usize = 256;
/// Keepalive and user timeout on both legs of every proxied connection: a peer that vanished is noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;
const USER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the off-ramp counts (`prometheus-client` counters: atomic adds, whichever thread runs the task).
#[derive(Debug, Default)]
pub struct OfframpCounters {
    pub tcp_connections: Counter,
    pub tcp_connect_failures: Counter,
    pub udp_flows: Counter,
    /// Connections and datagram flows from the namespace without a flow for their NAT slot (closed/dropped).
    pub unknown_slot: Counter,
    /// Connections and datagram relays closed because the data path ended their flow.
    pub cut: Counter,
    /// Datagrams dropped because their flow's queue towards the upstream socket was full.
    pub udp_queue_full: Counter,
}

impl OfframpCounters {
    /// Registers every counter (names without `_total`: the encoder adds it).
    pub fn register(&self, reg: &mut prometheus_client::registry::Registry) {
        for (name, help, c) in [
            (
                "rampart_offramp_tcp_connections",
                "Upgraded TCP connections whose upstream leg connected",
                &self.tcp_connections,
            ),
            (
                "rampart_offramp_tcp_connect_failures",
                "Upgraded TCP connections refused because their upstream leg could not be opened",
                &self.tcp_connect_failures,
            ),
            (
                "rampart_offramp_udp_flows",
                "Upgraded UDP flows relayed through an upstream socket",
                &self.udp_flows,
            ),
            (
                "rampart_offramp_unknown_slot",
                "Connections and datagram flows from the gateway's namespace without an upgraded flow for their \
                 NAT slot (reset or dropped)",
                &self.unknown_slot,
            ),
            (
                "rampart_offramp_flows_cut",
                "Off-ramped connections and datagram relays closed because the data path ended their flow",
                &self.cut,
            ),
            (
                "rampart_offramp_udp_queue_full",
                "Datagrams dropped because their flow's queue towards the upstream socket was full",
                &self.udp_queue_full,
            ),
        ] {
            reg.register(name, help, c.clone());
        }
    }
}

struct Entry {
    ctx: Arc<FlowContext>,
    lease: Arc<SlotLease>,
    /// A TCP flow's connection was accepted (a second connection from the same slot is refused).
    accepted: bool,
}

/// Upgraded flows by NAT slot, kept from their hand-off to their release.
pub struct Flows {
    by_slot: Mutex<HashMap<SocketAddrV4, Entry>>,
    arrived: Notify,
    releases: Arc<SlotReleases>,
}

impl Flows {
    pub fn new(releases: Arc<SlotReleases>) -> Flows {
        Flows {
            by_slot: Mutex::new(HashMap::new()),
            arrived: Notify::new(),
            releases,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddrV4, Entry>> {
        self.by_slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, h: Handoff) {
        match h {
            Handoff::Upgraded(u) => {
                let ctx = Arc::new(FlowContext::new(&u));
                let lease = Arc::new(SlotLease::new(u.slot, u.seq, self.releases.clone()));
                let old = self.lock().insert(
                    u.slot,
                    Entry {
                        ctx,
                        lease,
                        accepted: false,
                    },
                );
                if let Some(old) = old {
                    // The data path released the slot before reusing it; end the old tasks anyway.
                    old.ctx.end();
                }
                self.arrived.notify_waiters();
            }
            Handoff::Released { seq, slot } => {
                let mut m = self.lock();
                match m.get(&slot) {
                    Some(e) if e.ctx.seq == seq => {
                        let e = m.remove(&slot).expect("checked above");
                        drop(m);
                        e.ctx.end();
                        // The tasks holding the lease report the slot when they are done.
                    }
                    // Never handed off (the hand-off channel was full): nothing is open for it.
                    _ => self.releases.push(slot, seq),
                }
            }
        }
    }

    /// The flow of `slot`, waiting briefly for its hand-off. `tcp` marks the flow's connection accepted (a
    /// second connection from the slot gets `None`).
    async fn claim(
        &self,
        slot: SocketAddrV4,
        tcp: bool,
    ) -> Option<(Arc<FlowContext>, Arc<SlotLease>)> {
        let deadline = tokio::time::Instant::now() + LOOKUP_WAIT;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut m = self.lock();
                if let Some(e) = m.get_mut(&slot) {
                    if tcp && e.accepted {
                        return None;
                    }
                    e.accepted |= tcp;
                    return Some((e.ctx.clone(), e.lease.clone()));
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }
}

/// Consumes the data path's hand-offs.
pub async fn track(mut handoffs: Receiver<Handoff>, flows: Arc<Flows>) {
    while let Some(h) = handoffs.recv().await {
        flows.handle(h);
    }
}

/// The layer-4/7 runtime: `n` threads (`rampart-proxy-N`), each with a current-thread tokio runtime. The
/// accept loop and the UDP relay run on the first; each accepted connection goes to the next thread in turn
/// and stays there (its inspector's tasks too). Dropping it stops the runtimes (tasks still on them are
/// dropped: an HTTP record in progress is emitted then) and joins the threads.
pub struct ProxyThreads {
    pool: ProxyPool,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Where new off-ramp work is spawned (clone = same threads).
#[derive(Clone)]
pub struct ProxyPool {
    handles: Arc<[tokio::runtime::Handle]>,
    next: Arc<AtomicUsize>,
}

impl ProxyPool {
    /// The runtime of the first thread (the accept loop and the UDP relay).
    fn first(&self) -> &tokio::runtime::Handle {
        &self.handles[0]
    }

    /// The runtime of the next connection, round robin.
    fn pick(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }
}

impl ProxyThreads {
    /// Starts `n` (at least 1) threads, each running its runtime until dropped.
    pub fn start(n: usize) -> std::io::Result<ProxyThreads> {
        let mut t = ProxyThreads {
            pool: ProxyPool {
                handles: Arc::from(Vec::new()),
                next: Arc::new(AtomicUsize::new(0)),
            },
            stops: Vec::new(),
            threads: Vec::new(),
        };
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("rampart-proxy-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            let _ = ready_tx.send(Ok(rt.handle().clone()));
                            // Ends when the sender is dropped too (a failed start below).
                            let _ = rt.block_on(stop_rx);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })?;
            t.stops.push(stop_tx);
            t.threads.push(thread);
            // `t` stops and joins the threads started so far if this one failed.
            let handle = ready_rx.recv().map_err(|_| {
                std::io::Error::other("the proxy thread ended before its runtime was ready")
            })??;
            handles.push(handle);
        }
        t.pool.handles = Arc::from(handles);
        Ok(t)
    }

    pub fn pool(&self) -> ProxyPool {
        self.pool.clone()
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Drop for ProxyThreads {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Consumes the data path's hand-offs.
pub fn spawn_tracker(
    handoffs: Receiver<Handoff>,
    flows: Arc<Flows>,
    pool: &ProxyPool,
) -> JoinHandle<()> {
    pool.first().spawn(track(handoffs, flows))
}

/// Serves one namespace generation on `pool`: TCP accept loop and UDP relay. Returns the tasks (abort them
/// when the namespace goes away). Every task is tracked by `shutdown`: when it fires the loops stop
/// accepting, proxied connections and relays close, and HTTP connections (after the requests in flight) and
/// SSH sessions end through their own paths (with their records).
#[allow(clippy::too_many_arguments)]
pub fn serve(
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
    flows: Arc<Flows>,
    counters: Arc<OfframpCounters>,
    connector: NsConnector,
    env: InspectEnv,
    pool: &ProxyPool,
    shutdown: &Shutdown,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    tcp.set_nonblocking(true)?;
    udp.set_nonblocking(true)?;
    // Registered with the first proxy thread's reactor, where their loops run.
    let _in = pool.first().enter();
    let tcp = TcpListener::from_std(tcp)?;
    let udp = Arc::new(UdpSocket::from_std(udp)?);
    Ok(vec![
        shutdown.spawn_on(
            accept_loop(
                tcp,
                flows.clone(),
                counters.clone(),
                connector,
                env.clone(),
                pool.clone(),
                shutdown.clone(),
            ),
            pool.first(),
        ),
        shutdown.spawn_on(
            udp_loop(udp, flows, counters, env, shutdown.clone()),
            pool.first(),
        ),
    ])
}

async fn accept_loop(
    listener: TcpListener,
    flows: Arc<Flows>,
    counters: Arc<OfframpCounters>,
    connector: NsConnector,
    env: InspectEnv,
    pool: ProxyPool,
    shutdown: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (flows, counters, connector, env, stop) = (
            flows.clone(),
            counters.clone(),
            connector.clone(),
            env.clone(),
            shutdown.clone(),
        );
        // With more than one thread, the connection's socket moves to the thread that serves it (registered
        // with that thread's reactor there).
        let conn = if pool.handles.len() > 1 {
            match conn.into_std() {
                Ok(c) => Err(c),
                Err(_) => continue,
            }
        } else {
            Ok(conn)
        };
        shutdown.spawn_on(async move {
            let Ok(conn) = conn.or_else(TcpStream::from_std) else { return };
            let SocketAddr::V4(slot) = peer else { return };
            let Some((flow, lease)) = flows.claim(slot, true).await else {
                counters.unknown_slot.inc();
                tracing::debug!(%slot, "upgraded connection without a flow; closing");
                return reset(conn);
            };
            if flow.protocol != PROTO_TCP {
                counters.unknown_slot.inc();
                return reset(conn);
            }
            let legs = Legs::default();
            legs.hold(&conn);
            harden(&conn);
            let work = proxy_tcp(conn, flow.clone(), &counters, &connector, &env, &legs);
            // An SSH session sees the gateway stop itself and ends with its records; an HTTP connection
            // finishes the requests in flight (hyper's graceful shutdown) and records them; a plain
            // connection just closes.
            let ends_itself = matches!(flow.inspect, Inspect::Ssh(_) | Inspect::Http);
            tokio::select! {
                () = work => {}
                () = flow.ended() => {
                    counters.cut.inc();
                    tracing::debug!(seq = flow.seq, "flow ended by the data path; closing both legs");
                    legs.abort();
                }
                () = stop.cancelled(), if !ends_itself => {}
            }
            drop(legs);
            drop(lease);
        }, pool.pick());
    }
}

/// Duplicates of every socket a flow's task opened, so that when the data path ends the flow they can be
/// closed with a RST (SO_LINGER 0 on the shared socket; the RST goes out when the last descriptor closes)
/// while the task that owns them is dropped mid-flight.
#[derive(Default)]
struct Legs(Mutex<Vec<OwnedFd>>);

impl Legs {
    fn hold(&self, s: &impl AsFd) {
        if let Ok(fd) = s.as_fd().try_clone_to_owned() {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
        }
    }

    fn abort(&self) {
        for fd in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Keepalive and a user timeout on a proxied leg, so a peer that vanished without a word is noticed.
fn harden(s: &TcpStream) {
    let r = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = r.set_tcp_keepalive(&ka);
    let _ = r.set_tcp_user_timeout(Some(USER_TIMEOUT));
    let _ = r.set_tcp_nodelay(true);
}

/// Closes with a RST (so the device sees a refused connection, not a clean close).
fn reset(conn: TcpStream) {
    let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
    drop(conn);
}

/// Opens the other leg: an ordinary socket to the upstream host, or (for `proxy` between devices) a
/// downgraded connection from inside the namespace whose packets reach the destination device as
/// `src -> dst` of the original flow.
async fn connect_leg(
    flow: &FlowContext,
    connector: &NsConnector,
    env: &InspectEnv,
) -> std::io::Result<TcpStream> {
    let Some(nat_dst) = flow.downgrade else {
        let egress = env.egress_of(flow);
        return env
            .egresses
            .connect_tcp(&egress, SocketAddr::V4(flow.dst))
            .await;
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

/// `connect_leg` bounded in time, with the new leg held for aborting and hardened.
async fn open_leg(
    flow: &FlowContext,
    connector: &NsConnector,
    env: &InspectEnv,
    legs: &Legs,
) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, connect_leg(flow, connector, env))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))?;
    legs.hold(&s);
    harden(&s);
    Ok(s)
}

async fn proxy_tcp(
    conn: TcpStream,
    flow: Arc<FlowContext>,
    counters: &OfframpCounters,
    connector: &NsConnector,
    env: &InspectEnv,
    legs: &Legs,
) {
    let upstream = match open_leg(&flow, connector, env, legs).await {
        Ok(s) => s,
        Err(e) => {
            counters.tcp_connect_failures.inc();
            tracing::debug!(seq = flow.seq, error = %e, "off-ramp connect failed");
            return reset(conn);
        }
    };
    counters.tcp_connections.inc();
    match &flow.inspect {
        Inspect::None => splice(conn, upstream, flow.seq).await,
        Inspect::Http => {
            let reconnect = reconnect_leg(&flow, connector, env);
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
                crate::ssh::intercept_flow(conn, upstream, &flow, settings, &env.config, ssh).await
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
/// They are not held for aborting: the inspector that owns them is dropped when the flow ends, which closes
/// them.
fn reconnect_leg(
    flow: &Arc<FlowContext>,
    connector: &NsConnector,
    env: &InspectEnv,
) -> crate::http::Reconnect {
    let (flow, connector, env) = (flow.clone(), connector.clone(), env.clone());
    Arc::new(move || {
        let (flow, connector, env) = (flow.clone(), connector.clone(), env.clone());
        Box::pin(async move {
            let s = tokio::time::timeout(CONNECT_TIMEOUT, connect_leg(&flow, &connector, &env))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))?;
            harden(&s);
            Ok(s)
        })
    })
}

/// The plain layer-4 proxy: bytes both ways until both sides are done.
async fn splice(mut conn: TcpStream, mut upstream: TcpStream, seq: u64) {
    match splice::bidirectional(&mut conn, &mut upstream).await {
        Ok((up, down)) => tracing::trace!(seq, up, down, "off-ramp connection done"),
        Err(e) => tracing::trace!(seq, error = %e, "off-ramp connection ended with an error"),
    }
}

/// What inspectors need from the running gateway.
#[derive(Clone)]
pub struct InspectEnv {
    config: ConfigHandle,
    egresses: Arc<Egresses>,
    ssh: Option<Arc<crate::ssh::SshServices>>,
    http: crate::http::HttpServices,
}

impl InspectEnv {
    pub fn new(config: ConfigHandle, egresses: Arc<Egresses>) -> InspectEnv {
        InspectEnv {
            config,
            egresses,
            ssh: None,
            http: crate::http::HttpServices::default(),
        }
    }

    /// The egress of the flow's tenant in the configuration in force.
    fn egress_of(&self, flow: &FlowContext) -> Egress {
        self.config
            .current()
            .tenant(flow.identity.tenant.as_str())
            .map(|t| t.egress.clone())
            .unwrap_or_default()
    }

    /// Adds the SSH inspector's shared services (trust material, audit sink).
    pub fn with_ssh(mut self, ssh: Arc<crate::ssh::SshServices>) -> InspectEnv {
        self.ssh = Some(ssh);
        self
    }

    /// Sets the HTTP inspector's shared services (audit sink, TLS material).
    pub fn with_http(mut self, http: crate::http::HttpServices) -> InspectEnv {
        self.http = http;
        self
    }

    pub fn ssh(&self) -> Option<&Arc<crate::ssh::SshServices>> {
        self.ssh.as_ref()
    }
}

/// Datagrams of upgraded UDP flows arrive on one namespace socket; each flow (NAT slot) gets a task of its own
/// with a connected upstream socket (`udp_flow`), fed through a bounded queue, so one slow or unknown flow
/// never holds up the others.
async fn udp_loop(
    ns: Arc<UdpSocket>,
    flows: Arc<Flows>,
    counters: Arc<OfframpCounters>,
    env: InspectEnv,
    shutdown: Shutdown,
) {
    let mut relays: HashMap<SocketAddrV4, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            r = ns.recv_from(&mut buf) => r,
        };
        let (n, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade UDP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(slot) = peer else { continue };
        let relay = match relays.get(&slot) {
            Some(r) if !r.is_closed() => r,
            _ => {
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                let task = udp_flow(
                    slot,
                    rx,
                    ns.clone(),
                    flows.clone(),
                    counters.clone(),
                    env.clone(),
                    shutdown.clone(),
                );
                shutdown.spawn(task);
                relays.insert(slot, tx);
                // Forget relays that ended (bounded work: only when the map grows past its live size).
                if relays.len() > 1024 && relays.len().is_power_of_two() {
                    relays.retain(|_, r| !r.is_closed());
                }
                &relays[&slot]
            }
        };
        if relay.try_send(buf[..n].to_vec()).is_err() {
            counters.udp_queue_full.inc();
        }
    }
}

/// One UDP flow: a connected upstream socket, datagrams both ways, until the flow ends or goes quiet.
async fn udp_flow(
    slot: SocketAddrV4,
    mut rx: mpsc::Receiver<Vec<u8>>,
    ns: Arc<UdpSocket>,
    flows: Arc<Flows>,
    counters: Arc<OfframpCounters>,
    env: InspectEnv,
    shutdown: Shutdown,
) {
    let Some((flow, lease)) = flows.claim(slot, false).await else {
        counters.unknown_slot.inc();
        return;
    };
    // UDP between devices is never upgraded; a downgrade address here would send tenant-internal traffic
    // off-box, so refuse it outright.
    if flow.protocol != PROTO_UDP || flow.downgrade.is_some() {
        counters.unknown_slot.inc();
        return;
    }
    let egress = env.egress_of(&flow);
    let up = match env
        .egresses
        .connect_udp(&egress, SocketAddr::V4(flow.dst))
        .await
    {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(seq = flow.seq, error = %e, "off-ramp UDP socket failed");
            return;
        }
    };
    counters.udp_flows.inc();
    let mut buf = vec![0u8; 65_536];
    // One idle timer per flow, pushed back lazily: a datagram only stamps `last`; when the timer fires
    // early it is reset to `last + UDP_IDLE` (no timer per datagram).
    let mut last = tokio::time::Instant::now();
    let idle = tokio::time::sleep_until(last + UDP_IDLE);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            () = flow.ended() => {
                counters.cut.inc();
                break;
            }
            () = shutdown.cancelled() => break,
            dg = rx.recv() => match dg {
                Some(dg) => {
                    last = tokio::time::Instant::now();
                    let _ = up.send(&dg).await;
                }
                None => break,
            },
            r = up.recv(&mut buf) => {
                last = tokio::time::Instant::now();
                if let Ok(n) = r {
                    let _ = ns.send_to(&buf[..n], slot).await;
                }
            }
            () = idle.as_mut() => {
                if last.elapsed() >= UDP_IDLE {
                    break;
                }
                idle.as_mut().reset(last + UDP_IDLE);
            }
        }
    }
    drop(up);
    drop(lease);
}
