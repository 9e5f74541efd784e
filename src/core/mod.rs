//! The sans-IO gateway core: tenants, devices (each a boringtun `Tunn`), and the verdict for every datagram.
//!
//! It never touches sockets, files or threads. The IO shell (`onramp`) drives it:
//! 1. `Gateway::apply` with a validated `Config` at start and on every reload;
//! 2. for each received UDP datagram, `Gateway::handle_datagram(now, from, datagram, scratch, tx)`;
//! 3. every `TIMER_TICK`, `Gateway::handle_timers(now, tx)`;
//! 4. after each batch, send every datagram in the `TxQueue` (one `sendmmsg`) and `TxQueue::clear` it, and
//!    drain flow lifecycle events with `Gateway::take_events` (they feed the audit trail);
//! 5. before exiting, `Gateway::shutdown` ends every flow (so no flow record is left open).
//!
//! `now` only moves forward. Every decrypted packet belongs to exactly one flow (`flow_table`); a flow's route
//! and policy decision (`policy`) are computed at its first packet and memoized, as a router would.
//!
//! Output is written into buffers the caller owns (`TxQueue` slots are reused, never freed), so the hot path
//! does not allocate. A bad datagram is never an error: it is dropped and counted by `DropReason`.
//!
//! Clock: boringtun reads `Instant::now()` internally; the core itself takes `now` only where it keeps time of
//! its own (slot quarantine).
#![deny(unsafe_code)]

pub mod counters;
pub mod flow_table;
pub mod nat;
pub mod policy;
pub mod tx;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use crate::config::{Action, Config, Device, DeviceName, FlowSettings, TenantId, UserName};
use crate::keys::{PeerKey, PrivateKey};
use crate::packet::{
    self, Hop, IpView, LocalReply, Transport, Unreachable, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    TCP_ACK, TCP_RST, TCP_SYN,
};
pub use counters::{DropReason, GlobalCounters, TrafficCounters};
pub use flow_table::EndReason;
use flow_table::{Flow, FlowKey, FlowTable, FlowTarget, KeyDir, Transition, IN, OUT};
use nat::{DowngradeNat, NatKey, SlotPool, UpgradeNat};
use policy::{Policy, Subject, Target};
pub use tx::TxQueue;

/// How often the shell must call `handle_timers`.
pub const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake initiations per second (all peers together) before cookies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// A freed peer slot is reused only after this long, so late packets for an old receiver index never reach a
/// new peer (3 × REJECT_AFTER_TIME).
pub const SLOT_QUARANTINE: Duration = Duration::from_secs(540);
/// Receiver index layout: `(slot << 16) | (worker << 8) | boringtun's 8-bit counter`.
pub const MAX_SLOTS: usize = 1 << 16;
/// A peer counts as connected while its last handshake is younger than this (REJECT_AFTER_TIME).
const CONNECTED_WINDOW: Duration = Duration::from_secs(180);
/// Most idle flows examined per timer tick (bounded work; the rest expire on later ticks).
const EXPIRY_BUDGET: usize = 20_000;
/// At most one "flow limit reached" warning per this many milliseconds.
const LIMIT_WARN_EVERY_MS: u64 = 10_000;

/// A flow began: who, from which device, to where, and what policy decided.
#[derive(Debug, Clone)]
pub struct FlowStart {
    pub seq: u64,
    pub tenant: TenantId,
    pub device: DeviceName,
    pub user: UserName,
    pub protocol: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub action: Action,
    pub rule: Arc<str>,
    /// The destination device, when the flow goes to one.
    pub dst_device: Option<DeviceName>,
    pub at: Instant,
}

/// Where upgraded flows enter the gateway's namespace: NAT sources come from `UPGRADE_NAT_RANGE`/16 (routed to
/// the upgrade TUN there) and every upgraded TCP/UDP flow lands on `UPGRADE_LISTENER`.
pub const UPGRADE_NAT_RANGE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
pub const UPGRADE_LISTENER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(100, 66, 0, 1), 7000);
/// Downgrade connections are made to addresses of `DOWNGRADE_NAT_RANGE`/16 (routed to the downgrade TUN).
pub const DOWNGRADE_NAT_RANGE: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 0);
/// `TxQueue` entries bound for the TUN carry no address.
const UNADDRESSED: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
/// MSS announced to devices for upgraded TCP (inner MTU 1420 minus 40 bytes of IPv4 + TCP headers).
pub const UPGRADE_MSS: u16 = 1380;

/// An upgraded flow: the application side (off-ramp proxy, inspectors) sees a connection from `slot` on
/// `UPGRADE_LISTENER` and uses this to know what it really is.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub seq: u64,
    pub slot: SocketAddrV4,
    pub protocol: u8,
    /// The device side of the original flow.
    pub src: SocketAddrV4,
    /// Where the device was going.
    pub dst: SocketAddrV4,
    pub tenant: TenantId,
    pub device: DeviceName,
    pub user: UserName,
    pub groups: Arc<[String]>,
    pub rule: Arc<str>,
    /// For `proxy` between devices: the address (inside the namespace) to connect to for a stream that comes
    /// out as `src -> dst` towards the destination device. `None`: off-ramp to `dst` with a host socket.
    pub downgrade: Option<SocketAddrV4>,
    /// What sits between the two legs (the deciding rule's inspector).
    pub inspect: crate::config::Inspect,
}

/// Flow lifecycle events, drained by the shell with `take_events`.
#[derive(Debug, Clone)]
pub enum FlowEvent {
    Start(Box<FlowStart>),
    /// A flow was handed to layer 4 (for the application side, not the audit trail).
    Upgraded(Box<Upgraded>),
    Established {
        seq: u64,
        at: Instant,
    },
    End {
        seq: u64,
        at: Instant,
        packets: [u64; 2],
        bytes: [u64; 2],
        reason: EndReason,
    },
}

/// Counters shared between the data path (writer) and the admin endpoint (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    pub global: GlobalCounters,
    tenants: RwLock<BTreeMap<TenantId, Arc<TrafficCounters>>>,
}

impl Metrics {
    /// The counters of `tenant`, created on first use and kept across reloads.
    pub fn tenant(&self, tenant: &TenantId) -> Arc<TrafficCounters> {
        if let Some(c) = self.tenants.read().expect("metrics lock").get(tenant) {
            return c.clone();
        }
        self.tenants
            .write()
            .expect("metrics lock")
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    pub fn tenants(&self) -> Vec<(TenantId, Arc<TrafficCounters>)> {
        self.tenants
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One device's tunnel.
struct Peer {
    tunn: Tunn,
    key: PeerKey,
    tenant: usize,
    device: Arc<Device>,
    /// Where the device was last seen sending authenticated traffic from.
    endpoint: Option<SocketAddr>,
}

struct TenantState {
    id: TenantId,
    /// Stable across reloads; part of every flow key.
    num: u32,
    gateway_address: IpAddr,
    policy: Policy,
    max_flows: Option<usize>,
    offramp: Vec<ipnet::IpNet>,
    /// Device address -> peer slot. Addresses are per tenant: two tenants may use the same ones.
    routes: HashMap<IpAddr, u32>,
    counters: Arc<TrafficCounters>,
}

/// What `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub removed: usize,
    pub updated: usize,
    /// Devices that could not be given a peer slot (more than `MAX_SLOTS`).
    pub rejected: usize,
}

/// A device's live state, for `rampart device list` and endpoint persistence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub tenant: TenantId,
    pub name: DeviceName,
    pub public_key: PeerKey,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The gateway state of one data-path worker.
pub struct Gateway {
    worker: u8,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Consulted before any DH on handshake initiations; demands cookies above `HANDSHAKE_RATE_LIMIT`.
    gate: Arc<RateLimiter>,
    /// Given to every `Tunn` so its own re-check validates mac1 without counting the handshake twice.
    mac1_only: Arc<RateLimiter>,
    peers: Vec<Option<Peer>>,
    free_slots: VecDeque<(u32, Instant)>,
    by_key: HashMap<PeerKey, u32>,
    tenants: Vec<TenantState>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    flows: FlowTable,
    max_flows: usize,
    next_flow_seq: u64,
    tenant_nums: HashMap<TenantId, u32>,
    /// Live flows per tenant number.
    flow_counts: Vec<usize>,
    events: Vec<FlowEvent>,
    /// Cleared by the shell while the audit trail cannot take records and policy says fail closed.
    admit_new_flows: bool,
    last_limit_warn_ms: Option<u64>,
    /// Room to build packets the gateway originates (echo replies are built in place instead).
    build_buf: Box<[u8]>,
    upgrade_nat: UpgradeNat,
    downgrade_nat: DowngradeNat,
    /// Packets for the upgrade TUN (the address of each entry is unused).
    tun_out: TxQueue,
    /// Packets for the downgrade TUN.
    dn_out: TxQueue,
}

/// Where a destination is, before policy decides how to carry the flow there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Local,
    Peer(u32),
    /// An upstream network of the tenant, reached through the gateway host.
    Offramp,
}

impl Route {
    /// Whether an existing flow's target is still this route.
    fn carries(self, target: FlowTarget) -> bool {
        match (self, target) {
            (Route::Local, FlowTarget::Local) => true,
            (Route::Peer(a), FlowTarget::Peer(b)) => a == b,
            (Route::Offramp, FlowTarget::Upgrade(_, None) | FlowTarget::Offramp) => true,
            (Route::Peer(a), FlowTarget::Upgrade(_, Some(b))) => a == b,
            _ => false,
        }
    }
}

fn subject(p: &Peer) -> Subject<'_> {
    Subject {
        user: &p.device.user,
        groups: &p.device.groups,
        device: &p.device.name,
    }
}

/// The NAT key of an upgraded flow (IPv4 only).
fn nat_key(f: &Flow) -> Option<NatKey> {
    match f.endpoints() {
        (IpAddr::V4(s), sport, IpAddr::V4(d), dport) => Some(NatKey {
            tenant: f.key.tenant(),
            protocol: f.key.protocol(),
            src: SocketAddrV4::new(s, sport),
            dst: SocketAddrV4::new(d, dport),
        }),
        _ => None,
    }
}

fn is_echo_request(pkt: &[u8], v: &IpView) -> bool {
    let ty = pkt.get(v.l4_offset).copied();
    matches!(
        (v.protocol, ty),
        (PROTO_ICMP, Some(8)) | (PROTO_ICMPV6, Some(128))
    )
}

impl Gateway {
    pub fn new(worker: u8, key: &PrivateKey, metrics: Arc<Metrics>, now: Instant) -> Gateway {
        let secret = key.to_x25519();
        let public = x25519::PublicKey::from(&secret);
        Gateway {
            worker,
            gate: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            mac1_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
            peers: Vec::new(),
            free_slots: VecDeque::new(),
            by_key: HashMap::new(),
            tenants: Vec::new(),
            metrics,
            epoch: now,
            flows: FlowTable::new(&FlowSettings::default()),
            max_flows: FlowSettings::default().max_flows,
            next_flow_seq: 1,
            tenant_nums: HashMap::new(),
            flow_counts: Vec::new(),
            events: Vec::new(),
            admit_new_flows: true,
            last_limit_warn_ms: None,
            build_buf: vec![0u8; 2048].into_boxed_slice(),
            upgrade_nat: UpgradeNat::new(
                UPGRADE_LISTENER,
                SlotPool::new(UPGRADE_NAT_RANGE, 65_534, (1024, 65_535)),
            ),
            downgrade_nat: DowngradeNat::new(SlotPool::new(
                DOWNGRADE_NAT_RANGE,
                65_534,
                (1024, 65_535),
            )),
            tun_out: TxQueue::new(),
            dn_out: TxQueue::new(),
        }
    }

    /// Packets the core wants written to the downgrade TUN; drained like `tun_queue`.
    pub fn downgrade_queue(&mut self) -> &mut TxQueue {
        &mut self.dn_out
    }

    /// Packets the core wants written to the upgrade TUN; the shell writes and clears them after each batch.
    pub fn tun_queue(&mut self) -> &mut TxQueue {
        &mut self.tun_out
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether new flows may start (the shell clears this while the audit trail refuses records under a
    /// fail-closed policy). Existing flows are not affected.
    pub fn set_admit_new_flows(&mut self, admit: bool) {
        self.admit_new_flows = admit;
    }

    /// Moves the pending flow events into `out`.
    pub fn take_events(&mut self, out: &mut Vec<FlowEvent>) {
        out.append(&mut self.events);
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn public_key(&self) -> PeerKey {
        PeerKey(self.public.to_bytes())
    }

    /// Reconciles tenants and devices with `cfg`: new devices get a tunnel, removed devices lose theirs at once
    /// (their packets are dropped from the next datagram on), unchanged devices keep their sessions.
    /// Live flows are re-checked against the new policy and routes: a flow that is no longer allowed ends
    /// (`PolicyRevoked` / `PeerRemoved`), and TCP connections are reset on both sides (RSTs queued in `tx`).
    pub fn apply(&mut self, cfg: &Config, now: Instant, tx: &mut TxQueue) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let mut wanted: HashMap<PeerKey, (usize, &Device)> = HashMap::new();
        for (ti, t) in cfg.tenants.iter().enumerate() {
            for d in &t.devices {
                wanted.insert(d.public_key, (ti, d));
            }
        }
        // Remove peers that are gone or moved to another tenant (a tenant move gets a fresh tunnel). `peer.tenant`
        // still indexes the previous tenant list here.
        let stale: Vec<PeerKey> = self
            .by_key
            .iter()
            .filter(|(k, &slot)| {
                let peer = self.peers[slot as usize]
                    .as_ref()
                    .expect("indexed peer exists");
                wanted
                    .get(*k)
                    .is_none_or(|(ti, _)| cfg.tenants[*ti].id != self.tenants[peer.tenant].id)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.remove_peer(k, now);
            summary.removed += 1;
        }
        let mut nums = Vec::with_capacity(cfg.tenants.len());
        for t in &cfg.tenants {
            let next = self.tenant_nums.len() as u32;
            nums.push(*self.tenant_nums.entry(t.id.clone()).or_insert(next));
        }
        self.flow_counts.resize(self.tenant_nums.len(), 0);
        self.tenants = cfg
            .tenants
            .iter()
            .zip(nums)
            .map(|(t, num)| TenantState {
                id: t.id.clone(),
                num,
                gateway_address: t.gateway_address,
                policy: Policy::compile(t),
                max_flows: t.max_flows,
                offramp: t.offramp.clone(),
                routes: HashMap::with_capacity(t.devices.len()),
                counters: self.metrics.tenant(&t.id),
            })
            .collect();
        self.flows.set_timeouts(&cfg.flows);
        self.max_flows = cfg.flows.max_flows;
        let mut keys: Vec<&PeerKey> = wanted.keys().collect();
        keys.sort(); // deterministic slot assignment
        for key in keys {
            let (ti, d) = wanted[key];
            if let Some(&slot) = self.by_key.get(key) {
                let peer = self.peers[slot as usize]
                    .as_mut()
                    .expect("indexed peer exists");
                if *peer.device != *d {
                    summary.updated += 1;
                    peer.device = Arc::new(d.clone());
                }
                peer.tenant = ti;
            } else if self.add_peer(ti, d, now).is_some() {
                summary.added += 1;
            } else {
                summary.rejected += 1;
            }
        }
        for (slot, p) in self.peers.iter().enumerate() {
            if let Some(p) = p {
                self.tenants[p.tenant]
                    .routes
                    .insert(p.device.address, slot as u32);
            }
        }
        for t in &self.tenants {
            t.counters.peers.set(t.routes.len() as u64);
        }
        self.recheck_flows(now, tx);
        summary
    }

    /// After a reload: ends flows whose route or decision changed; resets cut TCP connections.
    fn recheck_flows(&mut self, now: Instant, tx: &mut TxQueue) {
        let tenant_of_num: HashMap<u32, usize> = self
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (t.num, i))
            .collect();
        for idx in self.flows.indices() {
            let f = self.flows.get(idx);
            if f.state == flow_table::FlowState::Ended {
                continue;
            }
            let (src, sport, dst, dport) = f.endpoints();
            let verdict = match (
                tenant_of_num.get(&f.key.tenant()),
                self.peers.get(f.src_slot as usize),
            ) {
                (Some(&ti), Some(Some(p))) if p.tenant == ti && p.device.address == src => {
                    let t = &self.tenants[ti];
                    match self.route_of(ti, f.src_slot, dst) {
                        Some(route) if route.carries(f.target) => {
                            let protocol = f.key.protocol();
                            let dport_for_policy = Transport::has_ports(protocol).then_some(dport);
                            let d = t.policy.evaluate(
                                &subject(p),
                                &Target {
                                    dst,
                                    protocol,
                                    dport: dport_for_policy,
                                },
                            );
                            if d.action == f.action {
                                Ok(d.rule)
                            } else {
                                Err(EndReason::PolicyRevoked)
                            }
                        }
                        _ => Err(EndReason::PeerRemoved),
                    }
                }
                _ => Err(EndReason::PeerRemoved),
            };
            match verdict {
                Ok(rule) => self.flows.get_mut(idx).rule = rule,
                Err(reason) => {
                    let f = self.flows.get(idx);
                    let (seq, was_open_tcp) = (
                        f.seq,
                        f.action == Action::Allow && f.key.protocol() == PROTO_TCP,
                    );
                    if was_open_tcp {
                        self.reset_both_sides(idx, src, sport, dst, dport, tx);
                    }
                    tracing::debug!(seq, reason = reason.as_str(), "flow cut after reload");
                    let layer3 = matches!(self.flows.get(idx).target, FlowTarget::Peer(_));
                    if was_open_tcp && layer3 {
                        // Keep the cut connection as a lingering rejected flow: a segment still in flight
                        // (which the RSTs above may not match exactly) is answered with a RST built from its
                        // own ACK, which the sender always accepts.
                        let f = self.flows.get_mut(idx);
                        f.state = flow_table::FlowState::Ended;
                        f.action = Action::Reject;
                        let (packets, bytes) = (f.packets, f.bytes);
                        self.events.push(FlowEvent::End {
                            seq,
                            at: now,
                            packets,
                            bytes,
                            reason,
                        });
                    } else {
                        self.end_flow(idx, now, reason);
                    }
                }
            }
        }
    }

    /// Sends an acceptable RST to each end of a TCP flow, as if from the other end.
    fn reset_both_sides(
        &mut self,
        idx: u32,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        tx: &mut TxQueue,
    ) {
        let f = self.flows.get(idx);
        let (src_slot, target, next_seq) = (f.src_slot, f.target, f.next_seq);
        if let Some(n) = packet::build_tcp_rst(
            dst,
            dport,
            src,
            sport,
            next_seq[IN],
            None,
            &mut self.build_buf,
        ) {
            self.send_built(src_slot, n, tx);
        }
        if let FlowTarget::Peer(t) = target {
            if let Some(n) = packet::build_tcp_rst(
                src,
                sport,
                dst,
                dport,
                next_seq[OUT],
                None,
                &mut self.build_buf,
            ) {
                self.send_built(t, n, tx);
            }
        }
    }

    /// Removes a flow that has not ended yet and records its end.
    fn end_flow(&mut self, idx: u32, now: Instant, reason: EndReason) {
        let f = self.flows.remove(idx);
        self.forget_flow(&f, self.ms(now));
        self.events.push(FlowEvent::End {
            seq: f.seq,
            at: now,
            packets: f.packets,
            bytes: f.bytes,
            reason,
        });
    }

    fn forget_flow(&mut self, f: &Flow, now_ms: u64) {
        let n = &mut self.flow_counts[f.key.tenant() as usize];
        *n = n.saturating_sub(1);
        if let (FlowTarget::Upgrade(_, peer), Some(key)) = (f.target, nat_key(f)) {
            self.upgrade_nat.release(&key, now_ms);
            if peer.is_some() {
                self.downgrade_nat.release(&key, now_ms);
            }
        }
    }

    /// Ends every upgraded flow (their kernel sockets lived in a namespace that is gone); TCP devices get a RST.
    pub fn end_upgraded_flows(&mut self, now: Instant, tx: &mut TxQueue) {
        for idx in self.flows.indices() {
            let f = self.flows.get(idx);
            if !matches!(f.target, FlowTarget::Upgrade(..))
                || f.state == flow_table::FlowState::Ended
            {
                continue;
            }
            if f.key.protocol() == PROTO_TCP {
                let (src, sport, dst, dport) = f.endpoints();
                let (slot, seq_in) = (f.src_slot, f.next_seq[IN]);
                if let Some(n) =
                    packet::build_tcp_rst(dst, dport, src, sport, seq_in, None, &mut self.build_buf)
                {
                    self.send_built(slot, n, tx);
                }
            }
            self.end_flow(idx, now, EndReason::UpgradeLost);
        }
    }

    /// Ends every live flow (clean shutdown), so every flow record gets its end.
    pub fn shutdown(&mut self, now: Instant) {
        for idx in self.flows.indices() {
            if self.flows.get(idx).state == flow_table::FlowState::Ended {
                let f = self.flows.remove(idx);
                self.forget_flow(&f, self.ms(now));
            } else {
                self.end_flow(idx, now, EndReason::Shutdown);
            }
        }
    }

    /// Where a packet from the device in `src_slot` to `dst` goes within tenant `ti`; `None`: no route.
    fn route_of(&self, ti: usize, src_slot: u32, dst: IpAddr) -> Option<Route> {
        let t = &self.tenants[ti];
        if dst == t.gateway_address {
            return Some(Route::Local);
        }
        match t.routes.get(&dst) {
            Some(&slot) if slot != src_slot => Some(Route::Peer(slot)),
            Some(_) => None,
            None if t.offramp.iter().any(|n| n.contains(&dst)) => Some(Route::Offramp),
            None => None,
        }
    }

    fn add_peer(&mut self, tenant: usize, d: &Device, now: Instant) -> Option<u32> {
        let slot = match self.free_slots.front() {
            Some(&(slot, freed)) if now.saturating_duration_since(freed) >= SLOT_QUARANTINE => {
                self.free_slots.pop_front();
                slot
            }
            _ if self.peers.len() < MAX_SLOTS => {
                self.peers.push(None);
                (self.peers.len() - 1) as u32
            }
            _ => {
                tracing::error!(device = %d.name, "no free peer slot ({MAX_SLOTS} per worker); device not connected");
                return None;
            }
        };
        let index = (slot << 8) | u32::from(self.worker);
        debug_assert!(index < 1 << 24);
        let tunn = Tunn::new(
            self.secret.clone(),
            d.public_key.to_x25519(),
            None,
            None,
            index,
            Some(self.mac1_only.clone()),
        );
        self.peers[slot as usize] = Some(Peer {
            tunn,
            key: d.public_key,
            tenant,
            device: Arc::new(d.clone()),
            endpoint: None,
        });
        self.by_key.insert(d.public_key, slot);
        tracing::debug!(device = %d.name, slot, "peer added");
        Some(slot)
    }

    fn remove_peer(&mut self, key: PeerKey, now: Instant) {
        if let Some(slot) = self.by_key.remove(&key) {
            if let Some(p) = self.peers[slot as usize].take() {
                tracing::info!(device = %p.device.name, "device removed; tunnel closed");
            }
            self.free_slots.push_back((slot, now));
        }
    }

    /// Handles one UDP datagram from `from`. `scratch` must hold any datagram (65,536 bytes is enough).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        let g = &self.metrics.global;
        g.datagrams_rx.add(1);
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return g.unattributed.count_drop(DropReason::MalformedDatagram),
        };
        let slot = match packet {
            Packet::HandshakeInit(_) => {
                // Gate before any DH: under load this answers with a cookie reply instead.
                let half = match self
                    .gate
                    .verify_packet(Some(from.ip()), datagram, tx.slot())
                {
                    Ok(Packet::HandshakeInit(init)) => {
                        parse_handshake_anon(&self.secret, &self.public, &init)
                    }
                    Ok(_) => return g.unattributed.count_drop(DropReason::MalformedDatagram),
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let len = cookie.len();
                        tx.commit(from, len);
                        g.cookie_replies.add(1);
                        return g.unattributed.count_drop(DropReason::UnderLoad);
                    }
                    Err(_) => return g.unattributed.count_drop(DropReason::HandshakeInvalid),
                };
                let Ok(half) = half else {
                    return g.unattributed.count_drop(DropReason::HandshakeInvalid);
                };
                match self.by_key.get(&PeerKey(half.peer_static_public)) {
                    Some(&slot) => slot,
                    None => return g.unattributed.count_drop(DropReason::UnknownPeer),
                }
            }
            Packet::HandshakeResponse(p) => match self.slot_of(p.receiver_idx) {
                Some(s) => s,
                None => return g.unattributed.count_drop(DropReason::UnknownReceiver),
            },
            Packet::PacketCookieReply(p) => match self.slot_of(p.receiver_idx) {
                Some(s) => s,
                None => return g.unattributed.count_drop(DropReason::UnknownReceiver),
            },
            Packet::PacketData(p) => match self.slot_of(p.receiver_idx) {
                Some(s) => s,
                None => return g.unattributed.count_drop(DropReason::UnknownReceiver),
            },
        };
        let is_data = datagram.first() == Some(&4);
        self.decapsulate(now, slot, from, datagram, is_data, scratch, tx);
    }

    /// The peer slot a receiver index names, if it belongs to this worker and is occupied.
    fn slot_of(&self, receiver_idx: u32) -> Option<u32> {
        let slot = receiver_idx >> 16;
        let worker = (receiver_idx >> 8) & 0xff;
        (worker == u32::from(self.worker) && matches!(self.peers.get(slot as usize), Some(Some(_))))
            .then_some(slot)
    }

    #[allow(clippy::too_many_arguments)]
    fn decapsulate(
        &mut self,
        now: Instant,
        slot: u32,
        from: SocketAddr,
        datagram: &[u8],
        is_data: bool,
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        let peer = self.peers[slot as usize].as_mut().expect("slot_of checked");
        let counters = &self.tenants[peer.tenant].counters;
        let had_session = peer.tunn.time_since_last_handshake().is_some();
        let inner_len = match peer.tunn.decapsulate(Some(from.ip()), datagram, scratch) {
            TunnResult::WriteToNetwork(out) => {
                // Authenticated (a handshake answered, or a response completed): the endpoint is proven.
                let len = out.len();
                tx.slot()[..len].copy_from_slice(out);
                tx.commit(from, len);
                peer.endpoint = Some(from);
                if !is_data {
                    counters.handshakes.add(1);
                    if had_session {
                        tracing::debug!(tenant = %self.tenants[peer.tenant].id, device = %peer.device.name, "rekeyed");
                    } else {
                        tracing::info!(tenant = %self.tenants[peer.tenant].id, device = %peer.device.name, user = %peer.device.user, "tunnel up");
                    }
                }
                // Flush packets boringtun queued while there was no session.
                while let TunnResult::WriteToNetwork(out) =
                    peer.tunn.decapsulate(None, &[], tx.slot())
                {
                    let len = out.len();
                    tx.commit(from, len);
                }
                return;
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => p.len(),
            TunnResult::Done => {
                if is_data {
                    peer.endpoint = Some(from); // authenticated keepalive
                }
                return;
            }
            TunnResult::Err(e) => {
                return counters.count_drop(match e {
                    WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                        DropReason::Replayed
                    }
                    WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                        DropReason::NoSession
                    }
                    WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
                    WireGuardError::ConnectionExpired => DropReason::ConnectionExpired,
                    WireGuardError::UnderLoad => DropReason::UnderLoad,
                    WireGuardError::InvalidMac
                    | WireGuardError::WrongKey
                    | WireGuardError::InvalidTai64nTimestamp
                    | WireGuardError::WrongTai64nTimestamp => DropReason::HandshakeInvalid,
                    _ => DropReason::MalformedDatagram,
                });
            }
        };
        peer.endpoint = Some(from);
        counters.rx_packets.add(1);
        counters.rx_bytes.add(inner_len as u64);
        self.route_inner(now, slot, &mut scratch[..inner_len], tx);
    }

    /// Anti-spoofing, flow lookup (or a new flow: route, limits, policy), then local delivery or re-encryption
    /// towards the destination device of the same tenant.
    fn route_inner(&mut self, now: Instant, src_slot: u32, pkt: &mut [u8], tx: &mut TxQueue) {
        let src_peer = self.peers[src_slot as usize]
            .as_ref()
            .expect("caller holds slot");
        let ti = src_peer.tenant;
        let tenant = &self.tenants[ti];
        let Ok(view) = packet::parse_ip(pkt) else {
            return tenant.counters.count_drop(DropReason::InvalidInnerPacket);
        };
        if view.src != src_peer.device.address {
            return tenant.counters.count_drop(DropReason::SpoofedSource);
        }
        if view.fragment {
            // Fragments after the first carry no ports, so port rules could not be enforced on them.
            return tenant.counters.count_drop(DropReason::Fragment);
        }
        let Ok(t) = packet::parse_transport(pkt, &view) else {
            return tenant.counters.count_drop(DropReason::MalformedTransport);
        };
        let (key, dir) = FlowKey::new(
            tenant.num,
            view.protocol,
            view.src,
            t.sport,
            view.dst,
            t.dport,
        );
        let mut existing = self.flows.lookup(&key);
        if let Some(i) = existing {
            // A fresh SYN on a connection that already ended (the client reused its port while the old flow
            // lingers) opens a new flow: new decision, new NAT slot, new record.
            let syn_only =
                view.protocol == PROTO_TCP && t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if syn_only && self.flows.get(i).state == flow_table::FlowState::Ended {
                let old = self.flows.remove(i);
                self.forget_flow(&old, self.ms(now));
                existing = None;
            }
        }
        let idx = match existing {
            Some(i) => i,
            None => match self.start_flow(now, ti, src_slot, key, dir, &view, &t, pkt, tx) {
                Some(i) => i,
                None => return,
            },
        };
        let now_ms = self.ms(now);
        let flow = self.flows.get_mut(idx);
        let side = flow.side(dir);
        if let (IN, FlowTarget::Upgrade(_, Some(_))) = (side, flow.target) {
            // The destination device answering the gateway's downgraded connection: back into the namespace.
            // Not counted in the flow (its counters follow the initiator's leg).
            let f = self.flows.get(idx);
            let counters = self.tenants[ti].counters.clone();
            match nat_key(f) {
                Some(key) if self.downgrade_nat.to_kernel(pkt, &key).is_some() => {
                    let buf = self.dn_out.slot();
                    buf[..pkt.len()].copy_from_slice(pkt);
                    self.dn_out.commit(UNADDRESSED, pkt.len());
                }
                _ => counters.count_drop(DropReason::NatStale),
            }
            return;
        }
        let tcp = (view.protocol == PROTO_TCP).then_some((t.tcp_flags, t.tcp_seq, t.tcp_seg_len));
        let transition = flow.record(side, view.len, tcp, now_ms);
        let (action, target, initiator_slot, seq) =
            (flow.action, flow.target, flow.src_slot, flow.seq);
        match transition {
            Transition::None => {}
            Transition::Established => self.events.push(FlowEvent::Established { seq, at: now }),
            Transition::Ended(reason) => {
                let f = self.flows.get(idx);
                self.events.push(FlowEvent::End {
                    seq,
                    at: now,
                    packets: f.packets,
                    bytes: f.bytes,
                    reason,
                });
            }
        }
        let counters = self.tenants[ti].counters.clone();
        match action {
            Action::Allow | Action::Proxy | Action::InspectSsh | Action::InspectHttp => {}
            Action::Deny => return counters.count_drop(DropReason::PolicyDenied),
            Action::Reject => {
                // Either side: a rejected flow's responder only sends after a reload cut the flow.
                self.reject(src_slot, ti, pkt, &view, &t, Unreachable::Prohibited, tx);
                return counters.count_drop(DropReason::PolicyRejected);
            }
        }
        let dst_slot = match (side, target) {
            (OUT, FlowTarget::Local) => match packet::echo_reply_in_place(pkt, &view) {
                LocalReply::Reply(len) => {
                    // The gateway's answer is the flow's reply direction.
                    self.flows.get_mut(idx).record(IN, len, None, now_ms);
                    src_slot
                }
                LocalReply::NotHandled => return counters.count_drop(DropReason::NoLocalService),
            },
            (OUT, FlowTarget::Peer(dst)) => dst,
            (OUT, FlowTarget::Upgrade(slot, _)) => {
                // Into the gateway's namespace: NAT to `slot -> listener`; the kernel there terminates it.
                if self.upgrade_nat.inbound(pkt, slot).is_err() {
                    return counters.count_drop(DropReason::OfframpUnsupported);
                }
                nat::clamp_mss(pkt, UPGRADE_MSS);
                let buf = self.tun_out.slot();
                buf[..pkt.len()].copy_from_slice(pkt);
                self.tun_out.commit(UNADDRESSED, pkt.len());
                return;
            }
            // Replies of upgraded flows come out of the namespace (`handle_tun_packet`), never from a device.
            (_, FlowTarget::Upgrade(..) | FlowTarget::Offramp) => {
                return counters.count_drop(DropReason::NoRoute)
            }
            (_, _) => initiator_slot,
        };
        if dst_slot != src_slot && packet::decrement_ttl(pkt, &view) == Hop::Expired {
            return counters.count_drop(DropReason::TtlExpired);
        }
        self.send_to_peer(dst_slot, pkt, &counters, tx);
    }

    /// Routes, limits and decides a new flow; records its start. `None` when no flow is created (the packet
    /// has been dropped and counted).
    #[allow(clippy::too_many_arguments)]
    fn start_flow(
        &mut self,
        now: Instant,
        ti: usize,
        src_slot: u32,
        key: FlowKey,
        dir: KeyDir,
        view: &IpView,
        t: &Transport,
        pkt: &[u8],
        tx: &mut TxQueue,
    ) -> Option<u32> {
        let counters = self.tenants[ti].counters.clone();
        let Some(route) = self.route_of(ti, src_slot, view.dst) else {
            self.reject(src_slot, ti, pkt, view, t, Unreachable::NoRoute, tx);
            counters.count_drop(DropReason::NoRoute);
            return None;
        };
        if !self.admit_new_flows {
            counters.count_drop(DropReason::AuditUnavailable);
            return None;
        }
        let now_ms = self.ms(now);
        let tenant = &self.tenants[ti];
        let num = tenant.num as usize;
        if self.flows.len() >= self.max_flows
            || tenant.max_flows.is_some_and(|m| self.flow_counts[num] >= m)
        {
            counters.count_drop(DropReason::FlowLimit);
            if self
                .last_limit_warn_ms
                .is_none_or(|t| now_ms >= t + LIMIT_WARN_EVERY_MS)
            {
                self.last_limit_warn_ms = Some(now_ms);
                tracing::warn!(tenant = %tenant.id, flows = self.flows.len(), tenant_flows = self.flow_counts[num], "flow limit reached; new flows are dropped until some end");
            }
            return None;
        }
        let peer = self.peers[src_slot as usize]
            .as_ref()
            .expect("caller holds slot");
        let dport = Transport::has_ports(view.protocol).then_some(t.dport);
        let decision = tenant.policy.evaluate(
            &subject(peer),
            &Target {
                dst: view.dst,
                protocol: view.protocol,
                dport,
            },
        );
        let rule = tenant.policy.rule_id(&decision);
        let carried = decision.action == Action::Allow || decision.action.is_layer4();
        // Carried at layer 4: allowed flows to upstream networks, and `proxy`/`inspect_*` flows (also between
        // devices, by splicing the upgraded stream to a downgraded one).
        let upgrade = carried
            && (route == Route::Offramp
                || (decision.action.is_layer4() && matches!(route, Route::Peer(_))));
        let (device, user) = (peer.device.name.clone(), peer.device.user.clone());
        let peer_device = peer.device.clone();
        let peer_groups = &peer_device.groups;
        let seq = self.next_flow_seq;
        let target = match route {
            Route::Local => FlowTarget::Local,
            Route::Peer(s) if !upgrade => FlowTarget::Peer(s),
            Route::Offramp if !upgrade => FlowTarget::Offramp,
            Route::Offramp | Route::Peer(_) => {
                let (IpAddr::V4(s), IpAddr::V4(d)) = (view.src, view.dst) else {
                    counters.count_drop(DropReason::OfframpUnsupported);
                    return None;
                };
                if !Transport::has_ports(view.protocol) {
                    counters.count_drop(DropReason::OfframpUnsupported);
                    return None;
                }
                let (src, dst) = (SocketAddrV4::new(s, t.sport), SocketAddrV4::new(d, t.dport));
                let nat_key = NatKey {
                    tenant: tenant.num,
                    protocol: view.protocol,
                    src,
                    dst,
                };
                let Ok(slot) = self.upgrade_nat.claim(nat_key, now_ms) else {
                    counters.count_drop(DropReason::NatExhausted);
                    return None;
                };
                let splice_peer = match route {
                    Route::Peer(p) => Some(p),
                    _ => None,
                };
                let downgrade = match splice_peer {
                    Some(_) => match self.downgrade_nat.claim(nat_key, now_ms) {
                        Ok(d) => Some(d),
                        Err(_) => {
                            self.upgrade_nat.release(&nat_key, now_ms);
                            counters.count_drop(DropReason::NatExhausted);
                            return None;
                        }
                    },
                    None => None,
                };
                self.events.push(FlowEvent::Upgraded(Box::new(Upgraded {
                    seq,
                    slot,
                    protocol: view.protocol,
                    src,
                    dst,
                    tenant: tenant.id.clone(),
                    device: device.clone(),
                    user: user.clone(),
                    groups: Arc::from(peer_groups.as_slice()),
                    rule: rule.clone(),
                    downgrade,
                    inspect: tenant.policy.inspect(&decision),
                })));
                FlowTarget::Upgrade(slot, splice_peer)
            }
        };
        self.next_flow_seq += 1;
        let dst_device = match route {
            Route::Peer(s) => self.peers[s as usize]
                .as_ref()
                .map(|p| p.device.name.clone()),
            Route::Local | Route::Offramp => None,
        };
        let tenant = &self.tenants[ti];
        // The start record goes before the `Upgraded` event in the queue so the audit trail sees it first.
        let start = FlowEvent::Start(Box::new(FlowStart {
            seq,
            tenant: tenant.id.clone(),
            device,
            user,
            protocol: view.protocol,
            src: view.src,
            sport: t.sport,
            dst: view.dst,
            dport: t.dport,
            action: decision.action,
            rule,
            dst_device,
            at: now,
        }));
        let at = if upgrade {
            self.events.len() - 1
        } else {
            self.events.len()
        };
        self.events.insert(at, start);
        tracing::trace!(seq, action = decision.action.as_str(), "flow start");
        counters.flows_started.add(1);
        self.flow_counts[num] += 1;
        Some(self.flows.insert(Flow::new(
            key,
            dir,
            seq,
            src_slot,
            target,
            decision.action,
            decision.rule,
            now_ms,
        )))
    }

    /// Tells the sender of `pkt` that it was refused: TCP RST for TCP, ICMP unreachable otherwise (never in
    /// answer to an ICMP error or a RST).
    #[allow(clippy::too_many_arguments)]
    fn reject(
        &mut self,
        src_slot: u32,
        ti: usize,
        pkt: &[u8],
        v: &IpView,
        t: &Transport,
        why: Unreachable,
        tx: &mut TxQueue,
    ) {
        let gw = self.tenants[ti].gateway_address;
        let n = match v.protocol {
            PROTO_TCP if t.tcp_flags & TCP_RST != 0 => return,
            PROTO_TCP => {
                let (seq, ack) = if t.tcp_flags & TCP_ACK != 0 {
                    (t.tcp_ack, None)
                } else {
                    (0, Some(t.tcp_seq.wrapping_add(t.tcp_seg_len)))
                };
                packet::build_tcp_rst(
                    v.dst,
                    t.dport,
                    v.src,
                    t.sport,
                    seq,
                    ack,
                    &mut self.build_buf,
                )
            }
            PROTO_ICMP | PROTO_ICMPV6 if !is_echo_request(pkt, v) => return,
            _ => packet::build_unreachable(pkt, v, gw, why, &mut self.build_buf),
        };
        if let Some(n) = n {
            self.send_built(src_slot, n, tx);
        }
    }

    /// Encrypts the first `n` bytes of `build_buf` to the peer in `slot`.
    fn send_built(&mut self, slot: u32, n: usize, tx: &mut TxQueue) {
        let Some(p) = self.peers[slot as usize].as_mut() else {
            return;
        };
        let Some(endpoint) = p.endpoint else { return };
        if let TunnResult::WriteToNetwork(out) = p.tunn.encapsulate(&self.build_buf[..n], tx.slot())
        {
            let len = out.len();
            tx.commit(endpoint, len);
        }
    }

    /// Encrypts an inner packet to the peer in `slot` and queues it for its endpoint.
    fn send_to_peer(
        &mut self,
        slot: u32,
        pkt: &[u8],
        counters: &TrafficCounters,
        tx: &mut TxQueue,
    ) {
        let peer = self.peers[slot as usize]
            .as_mut()
            .expect("flows name live slots");
        let Some(endpoint) = peer.endpoint else {
            return counters.count_drop(DropReason::DestinationOffline);
        };
        match peer.tunn.encapsulate(pkt, tx.slot()) {
            TunnResult::WriteToNetwork(out) => {
                let n = out.len();
                tx.commit(endpoint, n);
                counters.tx_packets.add(1);
                counters.tx_bytes.add(pkt.len() as u64);
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                counters.count_drop(DropReason::ConnectionExpired)
            }
            // Queued inside boringtun until the handshake it started completes.
            _ => {}
        }
    }

    /// A packet the gateway's namespace sent out of the upgrade TUN (a reply on an upgraded flow): un-NAT it to
    /// `dst -> src` of the original flow and encrypt it to the device that opened the flow.
    pub fn handle_tun_packet(&mut self, now: Instant, pkt: &mut [u8], tx: &mut TxQueue) {
        let unattributed = &self.metrics.global.unattributed;
        let Some(nat_key) = self.upgrade_nat.outbound(pkt) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let (key, dir) = FlowKey::new(
            nat_key.tenant,
            nat_key.protocol,
            IpAddr::V4(*nat_key.dst.ip()),
            nat_key.dst.port(),
            IpAddr::V4(*nat_key.src.ip()),
            nat_key.src.port(),
        );
        let Some(idx) = self.flows.lookup(&key) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let Ok(view) = packet::parse_ip(pkt) else {
            return unattributed.count_drop(DropReason::InvalidInnerPacket);
        };
        let t = packet::parse_transport(pkt, &view).unwrap_or_default();
        let now_ms = self.ms(now);
        let flow = self.flows.get_mut(idx);
        let side = flow.side(dir);
        let tcp = (view.protocol == PROTO_TCP).then_some((t.tcp_flags, t.tcp_seq, t.tcp_seg_len));
        let transition = flow.record(side, view.len, tcp, now_ms);
        let (seq, initiator, packets, bytes) = (flow.seq, flow.src_slot, flow.packets, flow.bytes);
        match transition {
            Transition::None => {}
            Transition::Established => self.events.push(FlowEvent::Established { seq, at: now }),
            Transition::Ended(reason) => self.events.push(FlowEvent::End {
                seq,
                at: now,
                packets,
                bytes,
                reason,
            }),
        }
        let Some(ti) = self.tenants.iter().position(|t| t.num == nat_key.tenant) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let counters = self.tenants[ti].counters.clone();
        self.send_to_peer(initiator, pkt, &counters, tx);
    }

    /// A packet the gateway's namespace sent out of the downgrade TUN (the proxy's connection towards a device):
    /// un-NAT it to `src -> dst` of the spliced flow and encrypt it to the destination device.
    pub fn handle_downgrade_tun_packet(&mut self, pkt: &mut [u8], tx: &mut TxQueue) {
        let unattributed = &self.metrics.global.unattributed;
        let Some(key) = self.downgrade_nat.from_kernel(pkt) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let (fkey, _) = FlowKey::new(
            key.tenant,
            key.protocol,
            IpAddr::V4(*key.src.ip()),
            key.src.port(),
            IpAddr::V4(*key.dst.ip()),
            key.dst.port(),
        );
        let Some(FlowTarget::Upgrade(_, Some(peer))) =
            self.flows.lookup(&fkey).map(|i| self.flows.get(i).target)
        else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let Some(ti) = self.tenants.iter().position(|t| t.num == key.tenant) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        nat::clamp_mss(pkt, UPGRADE_MSS);
        let counters = self.tenants[ti].counters.clone();
        self.send_to_peer(peer, pkt, &counters, tx);
    }

    /// Drives every peer's timers (handshake retries, keepalives, expiry) and resets the handshake gate.
    /// Also expires idle flows (bounded work per call).
    pub fn handle_timers(&mut self, now: Instant, tx: &mut TxQueue) {
        self.gate.reset_count();
        let mut expired = Vec::new();
        self.flows.expire(self.ms(now), EXPIRY_BUDGET, &mut expired);
        let now_ms = self.ms(now);
        for e in expired {
            self.forget_flow(&e.flow, now_ms);
            if e.idle {
                let f = e.flow;
                self.events.push(FlowEvent::End {
                    seq: f.seq,
                    at: now,
                    packets: f.packets,
                    bytes: f.bytes,
                    reason: EndReason::IdleTimeout,
                });
            }
        }
        for t in &self.tenants {
            t.counters
                .flows
                .set(self.flow_counts[t.num as usize] as u64);
        }
        self.metrics
            .global
            .nat_slots
            .set(self.upgrade_nat.len() as u64);
        let mut connected = vec![0u64; self.tenants.len()];
        for p in self.peers.iter_mut().flatten() {
            match p.tunn.update_timers(tx.slot()) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    if let Some(ep) = p.endpoint {
                        tx.commit(ep, len);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::trace!(device = %p.device.name, ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
            if p.tunn
                .time_since_last_handshake()
                .is_some_and(|t| t < CONNECTED_WINDOW)
            {
                connected[p.tenant] += 1;
            }
        }
        for (t, n) in self.tenants.iter().zip(connected) {
            t.counters.peers_connected.set(n);
        }
    }

    /// Restores a device's last known endpoint (after a restart) and sends it a handshake initiation, so the
    /// device does not have to notice the restart by itself.
    pub fn handle_restored_endpoint(
        &mut self,
        key: PeerKey,
        endpoint: SocketAddr,
        tx: &mut TxQueue,
    ) -> bool {
        let Some(&slot) = self.by_key.get(&key) else {
            return false;
        };
        let p = self.peers[slot as usize]
            .as_mut()
            .expect("indexed peer exists");
        if p.endpoint.is_some() {
            return false;
        }
        p.endpoint = Some(endpoint);
        match p.tunn.format_handshake_initiation(tx.slot(), false) {
            TunnResult::WriteToNetwork(out) => {
                let len = out.len();
                tx.commit(endpoint, len);
                true
            }
            _ => false,
        }
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .flatten()
            .map(|p| {
                let (last, tx_bytes, rx_bytes, _, _) = p.tunn.stats();
                PeerStatus {
                    tenant: self.tenants[p.tenant].id.clone(),
                    name: p.device.name.clone(),
                    public_key: p.key,
                    endpoint: p.endpoint,
                    last_handshake_secs: last.map(|d| d.as_secs()),
                    rx_bytes: rx_bytes as u64,
                    tx_bytes: tx_bytes as u64,
                }
            })
            .collect()
    }

    #[cfg(test)]
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests;
