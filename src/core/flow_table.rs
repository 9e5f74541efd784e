//! The flow table: every packet of a tenant maps to exactly one flow, keyed by tenant + protocol + the two
//! (address, port) endpoints in canonical order, so both directions find the same entry with one lookup.
//!
//! Layout for 1M+ flows: the flows live in a slab (`Vec<Flow>`, freed entries reused); a hash table holds only
//! slab indices (4 bytes per bucket), hashed and compared through the slab entry's key, so a lookup touches the
//! table's control bytes, one index and the flow itself; a min-heap of (deadline, index, generation) drives
//! idle expiry. A packet costs one lookup and a few stores; the heap is touched only when a flow starts or a
//! deadline passes.
//! Time is milliseconds since the core's epoch, passed in by the caller (virtual clocks work).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::BuildHasher as _;
use std::net::IpAddr;

use hashbrown::HashTable;

use super::{FlowSeq, PeerSlot};
use crate::config::{Action, FlowSettings};
use crate::packet::{
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// How long a flow that ended (FIN both ways, RST) lingers to absorb late packets without starting a new flow.
pub const LINGER_MS: u64 = 10_000;

/// Canonical flow key: endpoint `a` is the lower (address, port) of the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    tenant: u32,
    a: [u8; 16],
    b: [u8; 16],
    a_port: u16,
    b_port: u16,
    protocol: u8,
    v6: bool,
}

/// Which way a packet travels relative to the key's canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDir {
    AToB,
    BToA,
}

fn octets(ip: IpAddr) -> ([u8; 16], bool) {
    match ip {
        IpAddr::V4(v) => (v.to_ipv6_mapped().octets(), false),
        IpAddr::V6(v) => (v.octets(), true),
    }
}

impl FlowKey {
    pub fn new(
        tenant: u32,
        protocol: u8,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
    ) -> (FlowKey, KeyDir) {
        let (s, v6) = octets(src);
        let (d, _) = octets(dst);
        if (s, sport) <= (d, dport) {
            (
                FlowKey {
                    tenant,
                    a: s,
                    b: d,
                    a_port: sport,
                    b_port: dport,
                    protocol,
                    v6,
                },
                KeyDir::AToB,
            )
        } else {
            (
                FlowKey {
                    tenant,
                    a: d,
                    b: s,
                    a_port: dport,
                    b_port: sport,
                    protocol,
                    v6,
                },
                KeyDir::BToA,
            )
        }
    }

    pub fn tenant(&self) -> u32 {
        self.tenant
    }

    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    fn addr(octets: [u8; 16], v6: bool) -> IpAddr {
        let a = std::net::Ipv6Addr::from(octets);
        match a.to_ipv4_mapped() {
            Some(v4) if !v6 => IpAddr::V4(v4),
            _ => IpAddr::V6(a),
        }
    }
}

/// Where an allowed flow's packets go (from the initiator's point of view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowTarget {
    /// Answered by the gateway itself.
    Local,
    /// The destination device's peer slot.
    Peer(PeerSlot),
    /// Upgraded: the initiator's packets go, NAT-ed from this slot, into the gateway's namespace where a
    /// kernel socket terminates them; replies come back out of the namespace. With a peer slot, the stream is
    /// spliced to a downgraded connection towards that device (`proxy` between devices).
    Upgrade(std::net::SocketAddrV4, Option<PeerSlot>),
    /// An upstream network the flow was not carried to (denied or rejected by policy).
    Offramp,
}

/// TCP progress (other protocols stay `Open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowState {
    /// Non-TCP, or TCP picked up mid-stream and not yet seen both ways.
    Open,
    SynSent,
    Established,
    /// FIN seen from one side (bit 0: initiator, bit 1: responder).
    Closing(u8),
    /// Ended (both FINs, or RST); lingering until `LINGER_MS` after the last packet.
    Ended,
}

/// Index into `packets`/`bytes`: 0 = initiator to responder, 1 = replies.
pub const OUT: usize = 0;
pub const IN: usize = 1;

#[derive(Debug, Clone)]
pub struct Flow {
    pub key: FlowKey,
    /// Unique within this gateway run; names the flow in audit records.
    pub seq: FlowSeq,
    /// Canonical direction of the initiator's packets.
    pub initiator: KeyDir,
    pub src_slot: PeerSlot,
    pub target: FlowTarget,
    pub action: Action,
    pub rule: Option<u16>,
    pub state: FlowState,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Next sequence number each side will send (the highest seen; for cutting a connection with an
    /// acceptable RST and for validating RSTs).
    pub next_seq: [u32; 2],
    /// Where each side's FIN ended its sequence space (after it, that side sends no new data).
    fin_end: [Option<u32>; 2],
    generation: u32,
    live: bool,
}

/// A TCP segment as the flow table sees it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Sequence space consumed (payload + SYN + FIN).
    pub len: u32,
    pub payload: bool,
    /// The TCP checksum is right (a RST with a bad one ends nothing: the endpoint drops it too).
    pub checksum_ok: bool,
}

impl Segment {
    fn end(&self) -> u32 {
        self.seq.wrapping_add(self.len)
    }
}

/// `a <= b` in sequence space (RFC 1982 arithmetic).
fn seq_le(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

/// What a packet did to its flow's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Established,
    /// The flow just ended (FIN both ways or RST).
    Ended(EndReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    TcpFin,
    TcpRst,
    IdleTimeout,
    /// A reload changed policy or routing so the flow is no longer allowed.
    PolicyRevoked,
    /// The source or destination device was removed.
    PeerRemoved,
    Shutdown,
    /// The gateway's namespace (which held the upgraded stream) was restarted.
    UpgradeLost,
    /// Not a flow: a summary of attempts policy refused (one record per device, destination and rule per
    /// interval; the packet count is the number of attempts).
    Refused,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::TcpFin => "tcp_fin",
            EndReason::TcpRst => "tcp_rst",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::PolicyRevoked => "policy_revoked",
            EndReason::PeerRemoved => "peer_removed",
            EndReason::Shutdown => "shutdown",
            EndReason::UpgradeLost => "upgrade_lost",
            EndReason::Refused => "refused",
        }
    }
}

impl Flow {
    /// A new flow; `dir` is the canonical direction of its first packet (the initiator's).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: FlowKey,
        dir: KeyDir,
        seq: FlowSeq,
        src_slot: PeerSlot,
        target: FlowTarget,
        action: Action,
        rule: Option<u16>,
        now_ms: u64,
    ) -> Flow {
        Flow {
            key,
            seq,
            initiator: dir,
            src_slot,
            target,
            action,
            rule,
            state: FlowState::Open,
            packets: [0; 2],
            bytes: [0; 2],
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            next_seq: [0; 2],
            fin_end: [None; 2],
            generation: 0,
            live: true,
        }
    }

    /// (initiator address, port, responder address, port).
    pub fn endpoints(&self) -> (IpAddr, u16, IpAddr, u16) {
        let k = &self.key;
        let a = FlowKey::addr(k.a, k.v6);
        let b = FlowKey::addr(k.b, k.v6);
        match self.initiator {
            KeyDir::AToB => (a, k.a_port, b, k.b_port),
            KeyDir::BToA => (b, k.b_port, a, k.a_port),
        }
    }

    /// 0 for the initiator's packets, 1 for replies.
    pub fn side(&self, dir: KeyDir) -> usize {
        if dir == self.initiator {
            OUT
        } else {
            IN
        }
    }

    /// Whether a packet travelling `side` may still pass. Always, until the flow ends; after that only the
    /// tail of the close: segments without payload (ACK, FIN, RST) and, after a normal close, retransmissions
    /// of data sent before that side's FIN. New data on an ended connection (say after a forged RST) is never
    /// carried on the old decision.
    pub fn admits(&self, side: usize, tcp: Option<&Segment>) -> bool {
        if self.state != FlowState::Ended {
            return true;
        }
        let Some(seg) = tcp else {
            return false;
        };
        if seg.flags & TCP_SYN != 0 {
            return false;
        }
        !seg.payload || self.fin_end[side].is_some_and(|fin| seq_le(seg.end(), fin))
    }

    /// Accounts one packet of `len` bytes travelling `side` and advances TCP state. A RST ends the flow only
    /// when the endpoint would accept it too (RFC 5961: right checksum, sequence number exactly where that
    /// side is; or, answering a SYN, acknowledging it); otherwise it is forwarded and the endpoint decides.
    pub fn record(
        &mut self,
        side: usize,
        len: usize,
        tcp: Option<Segment>,
        now_ms: u64,
    ) -> Transition {
        let seen_before = self.packets[side] > 0;
        self.packets[side] += 1;
        self.bytes[side] += len as u64;
        if self.state == FlowState::Ended {
            // The linger is counted from the end: a trickle of packets never keeps an ended flow alive.
            return Transition::None;
        }
        self.last_seen_ms = now_ms;
        let Some(seg) = tcp else {
            return Transition::None;
        };
        let flags = seg.flags;
        if flags & TCP_RST != 0 {
            let acceptable = seg.checksum_ok
                && if self.state == FlowState::SynSent && side == IN {
                    flags & TCP_ACK != 0 && seg.ack == self.next_seq[OUT]
                } else {
                    seen_before && seg.seq == self.next_seq[side]
                };
            if !acceptable {
                return Transition::None;
            }
            self.state = FlowState::Ended;
            return Transition::Ended(EndReason::TcpRst);
        }
        if !seen_before || seq_le(self.next_seq[side], seg.end()) {
            self.next_seq[side] = seg.end();
        }
        if flags & TCP_FIN != 0 {
            self.fin_end[side] = Some(seg.end());
        }
        let fin_bit = 1u8 << side;
        match self.state {
            FlowState::Open
                if self.packets == [1, 0] && flags & TCP_SYN != 0 && flags & TCP_ACK == 0 =>
            {
                self.state = FlowState::SynSent;
                Transition::None
            }
            FlowState::SynSent
                if side == IN && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK =>
            {
                self.state = FlowState::Established;
                Transition::Established
            }
            FlowState::Open
                if self.packets[IN] > 0 && self.packets[OUT] > 0 && flags & TCP_FIN == 0 =>
            {
                self.state = FlowState::Established; // picked up mid-stream, now seen both ways
                Transition::Established
            }
            FlowState::Open | FlowState::SynSent | FlowState::Established
                if flags & TCP_FIN != 0 =>
            {
                self.state = FlowState::Closing(fin_bit);
                Transition::None
            }
            FlowState::Closing(bits) if flags & TCP_FIN != 0 && bits | fin_bit == 3 => {
                self.state = FlowState::Ended;
                Transition::Ended(EndReason::TcpFin)
            }
            _ => Transition::None,
        }
    }

    fn timeout_ms(&self, s: &Timeouts) -> u64 {
        match (self.key.protocol, self.state) {
            (_, FlowState::Ended) => LINGER_MS,
            (PROTO_TCP, FlowState::Established) => s.tcp_established,
            (PROTO_TCP, _) => s.tcp_transitory,
            (PROTO_UDP, _) => s.udp,
            (PROTO_ICMP | PROTO_ICMPV6, _) => s.icmp,
            _ => s.other,
        }
    }
}

struct Timeouts {
    tcp_established: u64,
    tcp_transitory: u64,
    udp: u64,
    icmp: u64,
    other: u64,
}

/// What `expire` found.
pub struct Expired {
    pub flow: Flow,
    /// The flow had not ended yet: it ends now, by idle timeout.
    pub idle: bool,
}

type Hasher = foldhash::fast::RandomState;

pub struct FlowTable {
    /// Slab indices of live flows, keyed by `slab[idx].key`.
    table: HashTable<u32>,
    hasher: Hasher,
    slab: Vec<Flow>,
    free: Vec<u32>,
    deadlines: BinaryHeap<Reverse<(u64, u32, u32)>>,
    timeouts: Timeouts,
    /// The flow `find` found last: consecutive packets of a train mostly belong to one flow.
    recent: u32,
}

impl FlowTable {
    pub fn new(settings: &FlowSettings) -> FlowTable {
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        FlowTable {
            table: HashTable::new(),
            hasher: Hasher::default(),
            slab: Vec::new(),
            free: Vec::new(),
            deadlines: BinaryHeap::new(),
            recent: u32::MAX,
            timeouts: Timeouts {
                tcp_established: ms(settings.tcp_established_timeout),
                tcp_transitory: ms(settings.tcp_transitory_timeout),
                udp: ms(settings.udp_timeout),
                icmp: ms(settings.icmp_timeout),
                other: ms(settings.other_timeout),
            },
        }
    }

    pub fn set_timeouts(&mut self, settings: &FlowSettings) {
        self.timeouts = FlowTable::new(settings).timeouts;
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<u32> {
        let slab = &self.slab;
        self.table
            .find(self.hasher.hash_one(key), |&i| slab[i as usize].key == *key)
            .copied()
    }

    /// `lookup` for the data path: a packet of the flow found last (the next segment of a train) is answered
    /// by comparing its key with that flow's, without hashing. Same answer as `lookup`: keys are unique among
    /// live flows, and a removed flow is not live.
    #[inline]
    pub fn find(&mut self, key: &FlowKey) -> Option<u32> {
        if let Some(f) = self.slab.get(self.recent as usize) {
            if f.live && f.key == *key {
                return Some(self.recent);
            }
        }
        let i = self.lookup(key)?;
        self.recent = i;
        Some(i)
    }

    #[inline]
    pub fn get_mut(&mut self, idx: u32) -> &mut Flow {
        &mut self.slab[idx as usize]
    }

    pub fn get(&self, idx: u32) -> &Flow {
        &self.slab[idx as usize]
    }

    /// Inserts a flow whose key is not present. Returns its index.
    pub fn insert(&mut self, mut flow: Flow) -> u32 {
        debug_assert!(self.lookup(&flow.key).is_none());
        let deadline = flow.last_seen_ms + flow.timeout_ms(&self.timeouts);
        let idx = match self.free.pop() {
            Some(i) => {
                flow.generation = self.slab[i as usize].generation.wrapping_add(1);
                self.slab[i as usize] = flow;
                i
            }
            None => {
                self.slab.push(flow);
                (self.slab.len() - 1) as u32
            }
        };
        let f = &self.slab[idx as usize];
        let (slab, hasher) = (&self.slab, &self.hasher);
        self.table.insert_unique(hasher.hash_one(f.key), idx, |&i| {
            hasher.hash_one(slab[i as usize].key)
        });
        self.deadlines.push(Reverse((deadline, idx, f.generation)));
        idx
    }

    /// Removes a flow and returns it.
    pub fn remove(&mut self, idx: u32) -> Flow {
        let f = &mut self.slab[idx as usize];
        debug_assert!(f.live);
        f.live = false;
        let out = f.clone();
        if let Ok(entry) = self
            .table
            .find_entry(self.hasher.hash_one(out.key), |&i| i == idx)
        {
            entry.remove();
        }
        self.free.push(idx);
        out
    }

    /// Indices of all live flows (for re-checking after a reload).
    pub fn indices(&self) -> Vec<u32> {
        self.table.iter().copied().collect()
    }

    /// The earliest idle deadline scheduled (ms), after dropping entries of flows removed or replaced since; a
    /// live flow's activity may have pushed its deadline later (`expire` re-schedules it then).
    pub fn next_deadline(&mut self) -> Option<u64> {
        while let Some(&Reverse((deadline, idx, gen))) = self.deadlines.peek() {
            let f = &self.slab[idx as usize];
            if f.live && f.generation == gen {
                return Some(deadline);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Removes flows idle past their timeout, at most `budget` heap entries per call (bounded work per tick).
    pub fn expire(&mut self, now_ms: u64, budget: usize, out: &mut Vec<Expired>) {
        for _ in 0..budget {
            let Some(&Reverse((deadline, idx, gen))) = self.deadlines.peek() else {
                return;
            };
            if deadline > now_ms {
                return;
            }
            self.deadlines.pop();
            let f = &self.slab[idx as usize];
            if !f.live || f.generation != gen {
                continue; // removed or replaced since this deadline was scheduled
            }
            let due = f.last_seen_ms + f.timeout_ms(&self.timeouts);
            if due > now_ms {
                self.deadlines.push(Reverse((due, idx, gen)));
                continue;
            }
            let idle = f.state != FlowState::Ended;
            out.push(Expired {
                flow: self.remove(idx),
                idle,
            });
        }
    }

    /// Bytes held (table + slab + heap, at their capacities), for the benchmark.
    pub fn memory_bytes(&self) -> usize {
        // hashbrown keeps buckets at a power of two, at most 7/8 full; each has a u32 and a control byte.
        let buckets = (self.table.capacity() * 8 / 7 + 1).next_power_of_two();
        let map = buckets * (std::mem::size_of::<u32>() + 1);
        let slab = self.slab.capacity() * std::mem::size_of::<Flow>();
        let heap = self.deadlines.capacity() * std::mem::size_of::<Reverse<(u64, u32, u32)>>();
        map + slab + heap + self.free.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> FlowTable {
        FlowTable::new(&FlowSettings::default())
    }

    #[test]
    fn both_directions_share_one_key() {
        let (k1, d1) = FlowKey::new(1, PROTO_TCP, ip("100.96.0.2"), 40000, ip("100.96.0.3"), 22);
        let (k2, d2) = FlowKey::new(1, PROTO_TCP, ip("100.96.0.3"), 22, ip("100.96.0.2"), 40000);
        assert_eq!(k1, k2);
        assert_ne!(d1, d2);
        let (k3, _) = FlowKey::new(2, PROTO_TCP, ip("100.96.0.2"), 40000, ip("100.96.0.3"), 22);
        assert_ne!(k1, k3, "tenants never share flows");
    }

    /// A segment with a right checksum; `len` is the sequence space it consumes.
    fn seg(flags: u8, seq: u32, ack: u32, len: u32) -> Option<Segment> {
        Some(Segment {
            flags,
            seq,
            ack,
            len,
            payload: len > u32::from(flags & (TCP_SYN | TCP_FIN) != 0),
            checksum_ok: true,
        })
    }

    fn established() -> Flow {
        let (k, d) = FlowKey::new(1, PROTO_TCP, ip("100.96.0.2"), 40000, ip("100.96.0.3"), 22);
        let mut f = Flow::new(
            k,
            d,
            FlowSeq::new(1),
            PeerSlot::new(0),
            FlowTarget::Peer(PeerSlot::new(1)),
            Action::Allow,
            Some(0),
            0,
        );
        f.record(OUT, 60, seg(TCP_SYN, 100, 0, 1), 0);
        f.record(IN, 60, seg(TCP_SYN | TCP_ACK, 500, 101, 1), 1);
        f.record(OUT, 1000, seg(TCP_ACK, 101, 501, 960), 2);
        f
    }

    #[test]
    fn tcp_lifecycle_start_established_fin() {
        let (k, d) = FlowKey::new(1, PROTO_TCP, ip("100.96.0.2"), 40000, ip("100.96.0.3"), 22);
        let mut f = Flow::new(
            k,
            d,
            FlowSeq::new(1),
            PeerSlot::new(0),
            FlowTarget::Peer(PeerSlot::new(1)),
            Action::Allow,
            Some(0),
            0,
        );
        assert_eq!(
            f.record(OUT, 60, seg(TCP_SYN, 100, 0, 1), 0),
            Transition::None
        );
        assert_eq!(
            f.record(IN, 60, seg(TCP_SYN | TCP_ACK, 500, 101, 1), 1),
            Transition::Established
        );
        assert_eq!(
            f.record(OUT, 1000, seg(TCP_ACK, 101, 501, 960), 2),
            Transition::None
        );
        assert_eq!(
            f.record(OUT, 52, seg(TCP_FIN | TCP_ACK, 1061, 501, 1), 3),
            Transition::None
        );
        assert_eq!(
            f.record(IN, 52, seg(TCP_FIN | TCP_ACK, 501, 1062, 1), 4),
            Transition::Ended(EndReason::TcpFin)
        );
        assert!(
            f.admits(OUT, seg(TCP_ACK, 1062, 502, 0).as_ref()),
            "late ACK absorbed"
        );
        assert_eq!(
            f.record(OUT, 52, seg(TCP_ACK, 1062, 502, 0), 5),
            Transition::None
        );
        assert_eq!(f.packets, [4, 2]);
        assert_eq!(f.bytes, [60 + 1000 + 52 + 52, 112]);
        assert_eq!(f.next_seq, [1062, 502]);
        assert!(
            f.admits(OUT, seg(TCP_ACK, 500, 502, 300).as_ref()),
            "a retransmission of data sent before the FIN still passes"
        );
        assert!(
            !f.admits(OUT, seg(TCP_ACK, 1062, 502, 100).as_ref()),
            "new data after the FIN does not"
        );
        assert!(!f.admits(OUT, seg(TCP_SYN, 7, 0, 1).as_ref()));
    }

    #[test]
    fn a_rst_answering_the_syn_ends_the_flow() {
        let (k, d) = FlowKey::new(1, PROTO_TCP, ip("100.96.0.2"), 1, ip("100.96.0.3"), 2);
        let mut f = Flow::new(
            k,
            d,
            FlowSeq::new(1),
            PeerSlot::new(0),
            FlowTarget::Peer(PeerSlot::new(1)),
            Action::Allow,
            None,
            0,
        );
        f.record(OUT, 40, seg(TCP_SYN, 1, 0, 1), 0);
        assert_eq!(
            f.record(IN, 40, seg(TCP_RST | TCP_ACK, 0, 99, 0), 0),
            Transition::None,
            "not acknowledging the SYN"
        );
        assert_eq!(
            f.record(IN, 40, seg(TCP_RST | TCP_ACK, 0, 2, 0), 0),
            Transition::Ended(EndReason::TcpRst)
        );
    }

    /// H1 of the security review: a RST the real endpoint ignores (wrong sequence number or checksum) does not
    /// end the flow, and data after an accepted RST is not carried.
    #[test]
    fn only_an_acceptable_rst_ends_an_established_flow() {
        let mut f = established();
        for bad in [
            seg(TCP_RST, 5, 0, 0),                // out of window
            seg(TCP_RST, 1060, 0, 0),             // in window but not exact
            seg(TCP_RST | TCP_ACK, 1062, 501, 0), // beyond what was sent
        ] {
            assert_eq!(f.record(OUT, 40, bad, 3), Transition::None, "{bad:?}");
        }
        let mut bad_sum = seg(TCP_RST, 1061, 0, 0).unwrap();
        bad_sum.checksum_ok = false;
        assert_eq!(f.record(OUT, 40, Some(bad_sum), 3), Transition::None);
        assert_eq!(f.state, FlowState::Established);
        assert!(f.admits(OUT, seg(TCP_ACK, 1061, 501, 100).as_ref()));
        assert_eq!(
            f.record(OUT, 40, seg(TCP_RST, 1061, 0, 0), 4),
            Transition::Ended(EndReason::TcpRst)
        );
        assert!(!f.admits(OUT, seg(TCP_ACK, 1061, 501, 100).as_ref()));
        assert!(
            f.admits(IN, seg(TCP_RST, 501, 0, 0).as_ref()),
            "the tail passes"
        );
    }

    #[test]
    fn idle_flows_expire_with_virtual_clock() {
        let mut t = table();
        let (k, d) = FlowKey::new(1, PROTO_UDP, ip("100.96.0.2"), 53000, ip("100.96.0.3"), 53);
        let i = t.insert(Flow::new(
            k,
            d,
            FlowSeq::new(1),
            PeerSlot::new(0),
            FlowTarget::Peer(PeerSlot::new(1)),
            Action::Allow,
            None,
            0,
        ));
        let mut out = Vec::new();
        t.expire(59_999, 100, &mut out);
        assert!(out.is_empty());
        t.get_mut(i).record(OUT, 10, None, 30_000); // activity pushes the deadline
        t.expire(60_000, 100, &mut out);
        assert!(out.is_empty());
        t.expire(90_000, 100, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].idle);
        assert_eq!(t.len(), 0);
        assert!(t.lookup(&k).is_none());
    }

    proptest! {
        /// Tenants never share a flow, whatever addresses and ports they use: the same few 5-tuples are sent by
        /// every tenant, in both directions, so identical flows in two tenants are the common case.
        #[test]
        fn no_cross_tenant_flow_ever(
            tuples in proptest::collection::vec((any::<[u8; 4]>(), any::<u16>(), any::<[u8; 4]>(), any::<u16>()), 1..4),
            pkts in proptest::collection::vec((0u32..3, any::<usize>(), any::<bool>()), 1..200)
        ) {
            let mut t = table();
            let mut distinct = std::collections::HashSet::new();
            for (tenant, which, reverse) in pkts {
                let (s, sp, d, dp) = tuples[which % tuples.len()];
                let (a, b) = ((IpAddr::from(s), sp), (IpAddr::from(d), dp));
                let (a, b) = if reverse { (b, a) } else { (a, b) };
                let (k, dir) = FlowKey::new(tenant, PROTO_TCP, a.0, a.1, b.0, b.1);
                let idx = match t.lookup(&k) {
                    Some(i) => i,
                    None => t.insert(Flow::new(k, dir, FlowSeq::new(0), PeerSlot::new(tenant), FlowTarget::Local, Action::Allow, None, 0)),
                };
                prop_assert_eq!(t.get(idx).key.tenant(), tenant);
                prop_assert_eq!(t.get(idx).src_slot, PeerSlot::new(tenant), "the flow found was created by this tenant");
                distinct.insert((tenant, a.min(b), a.max(b)));
            }
            prop_assert_eq!(t.len(), distinct.len(), "one flow per tenant and 5-tuple, both directions");
        }

        /// `find` (with its last-flow shortcut) answers exactly as `lookup`, through inserts, removals that free a
        /// slab slot for reuse by another key, and idle expiry; runs of one key (trains) are the common case.
        #[test]
        fn find_answers_as_lookup(
            ops in proptest::collection::vec((0u8..6, 0u16..4, 1usize..4, 0u64..40_000), 1..300)
        ) {
            let mut t = table();
            let mut now = 0u64;
            for (op, port, run, dt) in ops {
                now += dt;
                let (k, dir) = FlowKey::new(1, PROTO_UDP, ip("100.96.0.2"), port, ip("100.96.0.3"), 53);
                for _ in 0..run {
                    let want = t.lookup(&k);
                    prop_assert_eq!(t.find(&k), want);
                }
                match op {
                    0 | 1 if t.lookup(&k).is_none() => {
                        t.insert(Flow::new(k, dir, FlowSeq::new(0), PeerSlot::new(0), FlowTarget::Local, Action::Allow, None, now));
                    }
                    2 => {
                        if let Some(i) = t.lookup(&k) {
                            t.remove(i);
                        }
                    }
                    3 => {
                        let mut out = Vec::new();
                        t.expire(now, usize::MAX, &mut out);
                    }
                    _ => {}
                }
                let want = t.lookup(&k);
                prop_assert_eq!(t.find(&k), want);
            }
        }

        /// Every packet maps to exactly one flow; counters add up to what was sent; expiry leaves no stray entry.
        #[test]
        fn packets_map_to_one_flow_and_counters_add_up(
            pkts in proptest::collection::vec((0u8..4, 0u8..4, 0u16..3, 0u16..3, 1usize..1500, 0u64..5000), 1..300)
        ) {
            let mut t = table();
            let hosts = ["100.96.0.2", "100.96.0.3", "100.96.0.4", "100.96.0.5"];
            let mut sent: std::collections::HashMap<FlowKey, u64> = Default::default();
            let mut now = 0u64;
            for (s, d, sp, dp, len, dt) in pkts {
                now += dt;
                let (k, dir) = FlowKey::new(1, PROTO_UDP, ip(hosts[usize::from(s)]), sp, ip(hosts[usize::from(d)]), dp);
                let idx = match t.lookup(&k) {
                    Some(i) => i,
                    None => t.insert(Flow::new(k, dir, FlowSeq::new(0), PeerSlot::new(0), FlowTarget::Local, Action::Allow, None, now)),
                };
                let f = t.get_mut(idx);
                prop_assert_eq!(f.key, k);
                let side = f.side(dir);
                f.record(side, len, None, now);
                *sent.entry(k).or_default() += len as u64;
            }
            for (k, total) in &sent {
                let f = t.get(t.lookup(k).unwrap());
                prop_assert_eq!(f.bytes[0] + f.bytes[1], *total);
            }
            prop_assert_eq!(t.len(), sent.len());
            let mut out = Vec::new();
            t.expire(now + 61_000, usize::MAX, &mut out);
            prop_assert_eq!(out.len(), sent.len());
            prop_assert_eq!(t.len(), 0);
        }
    }
}
