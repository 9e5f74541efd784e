//! The sans-IO gateway core: tenants, devices (each a boringtun `Tunn`), and the verdict for every datagram.
//!
//! It never touches sockets, files, threads or clocks. The IO shell (`onramp`) drives it; how is documented on
//! `Gateway`.
//!
//! Every decrypted packet belongs to exactly one flow (`flow_table`); a flow's route
//! and policy decision (`policy`) are computed at its first packet and memoized, as a router would.
//!
//! Output is written into buffers the caller owns (`TxQueue` lanes are reused, never freed), so the hot path
//! does not allocate. A bad datagram is never an error: it is dropped and counted by `DropReason`.
//!
//! Clock: boringtun reads `Instant::now()` internally; the core itself takes `now` only where it keeps time of
//! its own (timers, flow deadlines, slot quarantine) and never reads a clock.
#![deny(unsafe_code)]

pub mod conn;
pub mod counters;
mod events;
pub mod flow_table;
mod ids;
pub mod nat;
pub mod policy;
mod refused;
mod reload;
mod router;
mod timers;
pub mod tx;
mod upgrade;
mod verdict;
mod wg;

pub use events::{ApplySummary, Dest, FlowEvent, FlowStart, PeerStatus, Transmit, Upgraded};
use ids::TenantIdx;
pub use ids::{FlowSeq, PeerSlot};
use router::subject;
use upgrade::nat_key;

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
pub use counters::{DropReason, GlobalCounters, Heartbeat, TrafficCounters};
pub use flow_table::EndReason;
use flow_table::{Flow, FlowKey, FlowTable, FlowTarget, KeyDir, Transition, IN, OUT};
use nat::{DowngradeNat, NatKey, SlotPool, UpgradeNat};
use policy::{Policy, Subject, Target};
pub use timers::TimerKind;
pub use tx::{Train, TxQueue};
pub use verdict::Verdict;

/// The granularity of the core's timers: periodic ones (armed peers' timers, the handshake gate) run once per
/// tick, and every deadline is rounded up to a tick boundary so wakeups coalesce.
pub const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake initiations per second (all peers together) before cookies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// A freed peer slot is reused only after this long, so late packets for an old receiver index never reach a
/// new peer (3 × REJECT_AFTER_TIME).
pub const SLOT_QUARANTINE: Duration = Duration::from_secs(540);
/// Receiver index layout: `(slot << 14) | (worker << 8) | boringtun's 8-bit counter`: boringtun takes a 24-bit
/// index per peer, of which the worker takes `WORKER_BITS` (what a steering program reads to pick the worker).
pub const WORKER_BITS: u32 = 6;
/// Data-path workers one gateway key can be sharded over.
pub const MAX_WORKERS: usize = 1 << WORKER_BITS;
/// Peers per worker (262,144: room for a 100k-device fleet on one worker).
pub const MAX_SLOTS: usize = 1 << (24 - WORKER_BITS);
/// A peer counts as connected while its last handshake is younger than this (REJECT_AFTER_TIME).
const CONNECTED_WINDOW: Duration = Duration::from_secs(180);
/// Most idle flows examined per `handle_timeout` (bounded work; the rest expire on later ticks).
const EXPIRY_BUDGET: usize = 20_000;
/// At most one "flow limit reached" warning per this many milliseconds.
const LIMIT_WARN_EVERY_MS: u64 = 10_000;

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

/// Counters shared between the data path (writer) and the admin endpoint (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    pub global: GlobalCounters,
    /// Beaten by the data-path thread every turn of its loop.
    pub datapath: counters::Heartbeat,
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

/// A retired upgrade slot (see `Gateway::closing`).
#[derive(Debug, Clone, Copy)]
struct Closing {
    seq: FlowSeq,
    downgrade: Option<SocketAddrV4>,
    /// The device that opened the flow (the close handshake's last segments still go to it), while it exists.
    initiator: Option<PeerSlot>,
}

/// How packets reach a peer: its WireGuard tunnel, or a connected on-ramp's connection (the core queues its
/// packets in `conn_out`, addressed by slot, and the shell writes them to the connection).
#[allow(clippy::large_enum_variant)]
enum Link {
    Wg(Tunn),
    Conn(Box<conn::ConnLink>),
}

/// One subject of the data path: a device's tunnel, or an on-ramp connection.
struct Peer {
    link: Link,
    key: PeerKey,
    tenant: TenantIdx,
    device: Arc<Device>,
    /// Where the device was last seen sending authenticated traffic from.
    endpoint: Option<SocketAddr>,
    /// Live flows the device opened (limited by `flows.device_max_flows`).
    live_flows: usize,
    /// In `Gateway::timed`: boringtun's timers run for this peer on every tick.
    timed: bool,
    /// New-flow token bucket: thousandths of a token, and when it was last refilled.
    tokens_milli: u64,
    refilled_ms: u64,
}

struct TenantState {
    id: TenantId,
    /// Stable across reloads; part of every flow key.
    num: u32,
    /// The gateway's own addresses in the tenant (IPv4, and IPv6 in a dual-stack tenant).
    gateway_addresses: Vec<IpAddr>,
    policy: Policy,
    max_flows: Option<usize>,
    offramp: Vec<ipnet::IpNet>,
    offramp_allow_local: Vec<SocketAddr>,
    pools: Vec<ipnet::IpNet>,
    /// Device address -> peer slot. Addresses are per tenant: two tenants may use the same ones.
    routes: HashMap<IpAddr, PeerSlot>,
    /// On-ramp connections' source prefixes -> slot, newest connection first.
    conn_routes: Vec<(ipnet::IpNet, PeerSlot)>,
    counters: Arc<TrafficCounters>,
}

/// The gateway state of one data-path worker.
///
/// How a shell drives it (`onramp::pump` is the one in production, `core::tests` and `core::sim` drive it in
/// memory):
/// - **configure**: `apply` with a validated `Config` at start and on every reload; `set_local_addresses`,
///   `set_admit_new_flows` (cleared while the audit trail refuses records under a fail-closed policy).
/// - **input** (`handle_*`, each with `now`): `handle_datagram` for each UDP datagram, `handle_conn_packet`
///   (and `open_conn`/`close_conn`) for connected on-ramps, `handle_tun_packet` / `handle_downgrade_tun_packet`
///   for packets leaving the namespace, `handle_slot_closed` when the application side closed an upgraded
///   flow's sockets, `handle_restored_endpoint` after a restart.
/// - **time**: `poll_timeout` gives the next deadline and why (`TimerKind`); `None` means no wakeup is needed
///   until new input. Sleep until then (or until input arrives) and call `handle_timeout(now)`, which runs
///   only what is due. Calling it early is harmless.
/// - **output**, after each batch of input, in this order: send the caller's `TxQueue` (UDP trains, written
///   during `handle_*`; caller-owned so one `sendmmsg` sends the whole batch without a copy), then drain
///   `poll_event` (hand-offs before the namespace sees the packets that need them), then `poll_transmit`
///   (trains for the namespace's TUNs) and `conn_queue` (packets for connected on-ramps).
/// - **end**: `shutdown` ends every flow (so no flow record is left open); drain `poll_event` once more.
///
/// Time only moves forward: a `now` earlier than one seen before is taken as that one. boringtun reads its
/// own clock inside `Tunn`; that is the one place the core does not control time.
pub struct Gateway {
    worker: u8,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Consulted before any DH on handshake initiations; demands cookies above `HANDSHAKE_RATE_LIMIT`.
    gate: Arc<RateLimiter>,
    /// Given to every `Tunn` so its own re-check validates mac1 without counting the handshake twice.
    mac1_only: Arc<RateLimiter>,
    peers: Vec<Option<Peer>>,
    /// The peers whose timers run on each tick: those with a session, a handshake or queued packets (armed by
    /// any datagram from or packet to them, dropped when boringtun reports the connection expired). An idle
    /// peer costs nothing per tick, so a tick is O(active peers), not O(configured devices).
    timed: Vec<PeerSlot>,
    free_slots: VecDeque<(PeerSlot, Instant)>,
    by_key: HashMap<PeerKey, PeerSlot>,
    tenants: Vec<TenantState>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    flows: FlowTable,
    max_flows: usize,
    device_max_flows: usize,
    /// New flows per second per device, and the burst.
    new_flow_rate: (u32, u32),
    /// Refused flows, tallied per device, destination and rule until the next summary.
    refused: refused::Tally,
    deny_summary_ms: u64,
    next_flow_seq: FlowSeq,
    tenant_nums: HashMap<TenantId, u32>,
    /// Live flows per tenant number.
    flow_counts: Vec<usize>,
    /// Tenant number -> index in `tenants` (`None`: no longer configured).
    tenant_by_num: Vec<Option<TenantIdx>>,
    /// The appliance's own addresses (never off-ramp destinations), kept current by the shell.
    local_addrs: Vec<IpAddr>,
    /// Flow events not yet taken by `poll_event`, oldest first.
    events: VecDeque<FlowEvent>,
    /// Cleared by the shell while the audit trail cannot take records and policy says fail closed.
    admit_new_flows: bool,
    last_limit_warn_ms: Option<u64>,
    /// Room to build packets the gateway originates (echo replies are built in place instead).
    build_buf: Box<[u8]>,
    upgrade_nat: UpgradeNat,
    downgrade_nat: DowngradeNat,
    /// Retired upgrade slots awaiting the application side's report that their sockets are closed:
    /// slot -> (flow seq, downgrade slot, the device that opened the flow).
    closing: HashMap<SocketAddrV4, Closing>,
    /// Packets for the upgrade TUN (the address of each entry is unused), drained by `poll_transmit`.
    tun_out: TxQueue,
    /// Packets for the downgrade TUN, drained by `poll_transmit` after `tun_out`.
    dn_out: TxQueue,
    /// Where `poll_transmit` is: the queue (0 upgrade, 1 downgrade) and the next train in it.
    tun_cursor: (u8, usize),
    /// Packets for on-ramp connections, by slot.
    conn_out: conn::ConnOut,
    /// On-ramp connections the core ended (their tenant is gone); the shell closes them.
    conns_ended: Vec<PeerSlot>,
    next_conn_seq: u64,
    /// The latest `now` given to any `handle_*` (time only moves forward).
    now: Instant,
    timers: timers::TimerHeap,
    /// Handshake initiations were seen recently: the gate's count is reset once a second until then.
    gate_busy_until: Option<Instant>,
    /// Flow, NAT or peer counts changed since the gauges were last set.
    gauges_dirty: bool,
}

impl Gateway {
    pub fn new(worker: u8, key: &PrivateKey, metrics: Arc<Metrics>, now: Instant) -> Gateway {
        assert!(
            usize::from(worker) < MAX_WORKERS,
            "worker {worker} >= {MAX_WORKERS}"
        );
        let secret = key.to_x25519();
        let public = x25519::PublicKey::from(&secret);
        Gateway {
            worker,
            gate: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            mac1_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
            peers: Vec::new(),
            timed: Vec::new(),
            free_slots: VecDeque::new(),
            by_key: HashMap::new(),
            tenants: Vec::new(),
            metrics,
            epoch: now,
            flows: FlowTable::new(&FlowSettings::default()),
            max_flows: FlowSettings::default().max_flows,
            device_max_flows: FlowSettings::default().device_max_flows,
            new_flow_rate: (
                FlowSettings::default().device_new_flows_per_sec,
                FlowSettings::default().device_new_flows_burst,
            ),
            refused: refused::Tally::default(),
            deny_summary_ms: FlowSettings::default().deny_summary.as_millis() as u64,
            next_flow_seq: FlowSeq::FIRST,
            tenant_nums: HashMap::new(),
            flow_counts: Vec::new(),
            tenant_by_num: Vec::new(),
            local_addrs: Vec::new(),
            events: VecDeque::new(),
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
            tun_cursor: (0, 0),
            dn_out: TxQueue::new(),
            closing: HashMap::new(),
            conn_out: conn::ConnOut::default(),
            conns_ended: Vec::new(),
            next_conn_seq: 1,
            now,
            timers: timers::TimerHeap::default(),
            gate_busy_until: None,
            gauges_dirty: false,
        }
    }

    /// The next train of packets the core wants written to a TUN of the namespace (`None`: nothing more; the
    /// queues are then empty and keep their buffers). The train borrows the core's buffer: write each of its
    /// datagrams (`Train::datagrams`) to the TUN `dest` names before polling again.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        loop {
            let (q, i) = self.tun_cursor;
            let (dest, queue) = match q {
                0 => (Dest::UpgradeTun, &mut self.tun_out),
                1 => (Dest::DowngradeTun, &mut self.dn_out),
                _ => {
                    self.tun_cursor = (0, 0);
                    return None;
                }
            };
            if i < queue.train_count() {
                self.tun_cursor.1 += 1;
                let queue = if q == 0 { &self.tun_out } else { &self.dn_out };
                return queue.train(i).map(|train| Transmit { dest, train });
            }
            queue.clear();
            self.tun_cursor = (q + 1, 0);
        }
    }

    /// The oldest flow event not yet taken (audit records, and the hand-off of upgraded flows to the
    /// application side). A `Start` always comes before the events of its flow (an `Upgraded` included).
    pub fn poll_event(&mut self) -> Option<FlowEvent> {
        self.events.pop_front()
    }

    /// The appliance's own addresses (every interface's, plus what it listens on): never off-ramp destinations.
    pub fn set_local_addresses(&mut self, addrs: Vec<IpAddr>) {
        self.local_addrs = addrs;
    }

    /// The index in `tenants` of the tenant with stable number `num`.
    fn tenant_index(&self, num: u32) -> Option<TenantIdx> {
        self.tenant_by_num.get(num as usize).copied().flatten()
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether new flows may start (the shell clears this while the audit trail refuses records under a
    /// fail-closed policy). Existing flows are not affected.
    pub fn set_admit_new_flows(&mut self, admit: bool) {
        self.admit_new_flows = admit;
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn public_key(&self) -> PeerKey {
        PeerKey(self.public.to_bytes())
    }

    #[cfg(test)]
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
