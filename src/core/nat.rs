//! NAT between device flows and the gateway's private namespace (the upgrade/downgrade paths of Oxy).
//!
//! - Upgrade: a device flow `(tenant, src:sport -> dst:dport)` claims a slot `nat_src` (an address:port in a
//!   range routed to the upgrade TUN). Packets from the device are rewritten `nat_src -> listener`; packets the
//!   namespace kernel sends back (`listener -> nat_src`) are rewritten to `dst:dport -> src:sport`. The
//!   listener's `accept()` peer address is `nat_src`, which names the original flow.
//! - Downgrade: a stream the gateway opens towards a device gets a reserved `nat_dst` (routed to the downgrade
//!   TUN); the SYN the kernel sends to it is rewritten to `local:lport -> remote:rport` and goes to the device.
//!
//! Pure data structures and in-place rewrites with RFC 1624 incremental checksums; no IO, no clock (time is
//! passed in).
//!
//! A slot outlives its flow: when the flow ends the slot is *retired* (it stops carrying payload either way)
//! and only the application side's report that the namespace socket is closed *releases* it, into a
//! quarantine longer than the namespace's TIME_WAIT. So a slot never serves a new flow (of any tenant) while a
//! kernel socket of the old one can still send, and replies are matched by protocol as well as slot.
//! IPv4 only for now (IPv6 flows are refused with `NatError::Unsupported`).

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::packet::{checksum_update, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN};

/// How long a released slot rests before reuse (longer than the namespace's TIME_WAIT of 60 s).
pub const QUARANTINE_MS: u64 = 120_000;

/// The original flow a slot stands for, as seen from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub tenant: u32,
    pub protocol: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NatError {
    #[error("all NAT slots are in use or quarantined")]
    Exhausted,
    #[error("only IPv4 TCP/UDP can be translated")]
    Unsupported,
}

/// A pool of `address:port` slots over `base/prefix` × `ports`, handed out in order, recycled through a
/// quarantine.
#[derive(Debug)]
pub struct SlotPool {
    base: u32,
    hosts: u32,
    ports: (u16, u16),
    next: u64,
    capacity: u64,
    free: VecDeque<(SocketAddrV4, u64)>,
}

impl SlotPool {
    /// Slots over the `hosts` addresses starting at `base` (skipping `.0` of the range) and ports `ports`.
    pub fn new(base: Ipv4Addr, hosts: u32, ports: (u16, u16)) -> SlotPool {
        let per_host = u64::from(ports.1 - ports.0) + 1;
        SlotPool {
            base: u32::from(base),
            hosts,
            ports,
            next: 0,
            capacity: u64::from(hosts) * per_host,
            free: VecDeque::new(),
        }
    }

    fn take(&mut self, now_ms: u64) -> Option<SocketAddrV4> {
        if let Some(&(slot, released)) = self.free.front() {
            if now_ms >= released + QUARANTINE_MS {
                self.free.pop_front();
                return Some(slot);
            }
        }
        if self.next < self.capacity {
            let per_host = u64::from(self.ports.1 - self.ports.0) + 1;
            let host = (self.next / per_host) as u32;
            let port = self.ports.0 + (self.next % per_host) as u16;
            self.next += 1;
            // Skip the range's network address.
            return Some(SocketAddrV4::new(
                Ipv4Addr::from(self.base + 1 + host % self.hosts),
                port,
            ));
        }
        None
    }

    fn give_back(&mut self, slot: SocketAddrV4, now_ms: u64) {
        self.free.push_back((slot, now_ms));
    }
}

/// A slot's life: `Live` while its flow is; `Closing` from the flow's end until the application side reports
/// the namespace socket closed (`release_slot`); then quarantined in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Live,
    /// The flow ended: only segments without payload (the close handshake, RSTs) still pass, so nothing the
    /// namespace still sends for the old connection reaches anyone.
    Closing,
}

/// Upgrade translation table.
#[derive(Debug)]
pub struct UpgradeNat {
    listener: SocketAddrV4,
    pool: SlotPool,
    by_key: HashMap<NatKey, SocketAddrV4>,
    by_slot: HashMap<SocketAddrV4, (NatKey, SlotState)>,
}

impl UpgradeNat {
    pub fn new(listener: SocketAddrV4, pool: SlotPool) -> UpgradeNat {
        UpgradeNat {
            listener,
            pool,
            by_key: HashMap::new(),
            by_slot: HashMap::new(),
        }
    }

    /// Slots of live flows.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Slots whose flow ended but whose namespace socket is not known closed yet.
    pub fn closing(&self) -> usize {
        self.by_slot.len() - self.by_key.len()
    }

    /// The slot of `key`, claiming one for a new flow.
    pub fn claim(&mut self, key: NatKey, now_ms: u64) -> Result<SocketAddrV4, NatError> {
        if let Some(&s) = self.by_key.get(&key) {
            return Ok(s);
        }
        let slot = self.pool.take(now_ms).ok_or(NatError::Exhausted)?;
        self.by_key.insert(key, slot);
        self.by_slot.insert(slot, (key, SlotState::Live));
        Ok(slot)
    }

    /// The original flow behind an accepted connection's peer address (or a packet leaving the TUN).
    pub fn original(&self, slot: SocketAddrV4) -> Option<(NatKey, SlotState)> {
        self.by_slot.get(&slot).copied()
    }

    /// The flow of `key` ended: its slot stops translating payload and waits for `release_slot`. Returns the
    /// slot (`None` if `key` holds none, e.g. already retired).
    pub fn retire(&mut self, key: &NatKey) -> Option<SocketAddrV4> {
        let slot = self.by_key.remove(key)?;
        if let Some(e) = self.by_slot.get_mut(&slot) {
            e.1 = SlotState::Closing;
        }
        Some(slot)
    }

    /// The namespace side of `slot` is known closed: the slot rests in quarantine, then serves a new flow.
    pub fn release_slot(&mut self, slot: SocketAddrV4, now_ms: u64) {
        if let Some((key, _)) = self.by_slot.remove(&slot) {
            if self.by_key.get(&key) == Some(&slot) {
                self.by_key.remove(&key);
            }
            self.pool.give_back(slot, now_ms);
        }
    }

    /// Retires and releases at once (a slot no socket ever used, or whose namespace is gone).
    pub fn release(&mut self, key: &NatKey, now_ms: u64) {
        if let Some(slot) = self.retire(key) {
            self.release_slot(slot, now_ms);
        }
    }

    /// Device -> namespace: `src -> dst` becomes `slot -> listener`, in place.
    pub fn inbound(&self, pkt: &mut [u8], slot: SocketAddrV4) -> Result<(), NatError> {
        rewrite_v4(pkt, slot, self.listener)
    }

    /// Namespace -> device: `listener -> slot` becomes `dst -> src` of the original flow, in place. Returns the
    /// flow and the slot's state, or `None` if the packet is not for a slot of its protocol, or carries payload
    /// for a closing slot.
    pub fn outbound(&self, pkt: &mut [u8]) -> Option<(NatKey, SlotState)> {
        let (_, dst) = ports_v4(pkt)?;
        let (key, state) = self.original(dst)?;
        if pkt[9] != key.protocol
            || (state == SlotState::Closing
                && !(key.protocol == PROTO_TCP && tcp_without_payload(pkt)))
        {
            return None;
        }
        rewrite_v4(pkt, key.dst, key.src).ok()?;
        Some((key, state))
    }
}

/// Whether an IPv4 TCP segment carries no payload (and no SYN): the tail of a close, an ACK or a RST.
fn tcp_without_payload(p: &[u8]) -> bool {
    let ihl = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(word(p, 2)).min(p.len());
    let Some(&off) = p.get(ihl + 12) else {
        return false;
    };
    let flags = p.get(ihl + 13).copied().unwrap_or(0);
    total == ihl + usize::from(off >> 4) * 4 && flags & TCP_SYN == 0
}

/// Downgrade translation table: the gateway's proxy connects (inside the namespace) to a reserved `nat_dst`
/// for each spliced flow; the kernel's packets to `nat_dst` leave as `src -> dst` of the original flow
/// (towards the destination device), and the device's answers are turned back into `nat_dst -> kernel`.
/// TCP only (UDP between devices is never carried through the namespace).
#[derive(Debug)]
pub struct DowngradeNat {
    pool: SlotPool,
    by_key: HashMap<NatKey, (SocketAddrV4, Option<SocketAddrV4>)>,
    by_slot: HashMap<SocketAddrV4, NatKey>,
}

impl DowngradeNat {
    pub fn new(pool: SlotPool) -> DowngradeNat {
        DowngradeNat {
            pool,
            by_key: HashMap::new(),
            by_slot: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Reserves the address the proxy connects to for `key`.
    pub fn claim(&mut self, key: NatKey, now_ms: u64) -> Result<SocketAddrV4, NatError> {
        if let Some(&(s, _)) = self.by_key.get(&key) {
            return Ok(s);
        }
        let slot = self.pool.take(now_ms).ok_or(NatError::Exhausted)?;
        self.by_key.insert(key, (slot, None));
        self.by_slot.insert(slot, key);
        Ok(slot)
    }

    /// The flow of `key` ended: nothing is translated for it any more; the address waits for `release_slot`.
    pub fn retire(&mut self, key: &NatKey) -> Option<SocketAddrV4> {
        self.by_key.remove(key).map(|(slot, _)| slot)
    }

    /// The proxy's connection to `slot` is known closed: quarantine, then reuse.
    pub fn release_slot(&mut self, slot: SocketAddrV4, now_ms: u64) {
        if let Some(key) = self.by_slot.remove(&slot) {
            if self.by_key.get(&key).is_some_and(|(s, _)| *s == slot) {
                self.by_key.remove(&key);
            }
            self.pool.give_back(slot, now_ms);
        }
    }

    pub fn release(&mut self, key: &NatKey, now_ms: u64) {
        if let Some(slot) = self.retire(key) {
            self.release_slot(slot, now_ms);
        }
    }

    /// Namespace -> device: the kernel's `ksrc -> nat_dst` becomes `src -> dst` of the original flow. The
    /// kernel source is learnt from the proxy's SYN only (a stale segment of an older connection to the same
    /// address never claims the flow). Returns the flow, or `None` for an unknown or retired `nat_dst` or another
    /// socket.
    pub fn from_kernel(&mut self, pkt: &mut [u8]) -> Option<NatKey> {
        let (ksrc, nat_dst) = ports_v4(pkt)?;
        if pkt[9] != PROTO_TCP {
            return None;
        }
        let key = *self.by_slot.get(&nat_dst)?;
        // The flow may have started again on a new address while this one still waits for `release_slot`.
        let entry = self.by_key.get_mut(&key).filter(|e| e.0 == nat_dst)?;
        let ihl = usize::from(pkt[0] & 0xf) * 4;
        let flags = pkt.get(ihl + 13).copied().unwrap_or(0);
        if entry.1.is_none() && flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            entry.1 = Some(ksrc);
        }
        if entry.1 != Some(ksrc) {
            return None; // another socket than the one that opened the downgrade
        }
        rewrite_v4(pkt, key.src, key.dst).ok()?;
        Some(key)
    }

    /// Device -> namespace: the destination device's `dst -> src` answer becomes `nat_dst -> kernel`. `None` if
    /// the flow has no downgrade or the kernel has not sent yet.
    pub fn to_kernel(&self, pkt: &mut [u8], key: &NatKey) -> Option<()> {
        let (nat_dst, ksrc) = self.by_key.get(key)?;
        rewrite_v4(pkt, *nat_dst, (*ksrc)?).ok()
    }
}

/// Reads `(src, dst)` socket addresses of an IPv4 TCP/UDP packet.
pub fn ports_v4(p: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    if ihl < 20 || !(p[9] == PROTO_TCP || p[9] == PROTO_UDP) || p.len() < ihl + 8 {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
    Some((
        SocketAddrV4::new(ip(12), port(ihl)),
        SocketAddrV4::new(ip(16), port(ihl + 2)),
    ))
}

fn word(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

/// Rewrites source and destination address:port of an IPv4 TCP/UDP packet in place, patching the IP header
/// checksum and the transport checksum incrementally (a zero UDP checksum stays zero: "none").
pub fn rewrite_v4(p: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4) -> Result<(), NatError> {
    let (old_src, old_dst) = ports_v4(p).ok_or(NatError::Unsupported)?;
    let ihl = usize::from(p[0] & 0xf) * 4;
    let l4_ck = match p[9] {
        PROTO_TCP if p.len() >= ihl + 18 => Some(ihl + 16),
        PROTO_UDP if word(p, ihl + 6) != 0 => Some(ihl + 6),
        PROTO_UDP => None,
        _ => return Err(NatError::Unsupported),
    };
    let mut ip_ck = word(p, 10);
    let mut tp_ck = l4_ck.map(|at| word(p, at));
    let changes = [
        (12, old_src.ip().octets(), src.ip().octets()),
        (16, old_dst.ip().octets(), dst.ip().octets()),
    ];
    for (at, old, new) in changes {
        for i in [0, 2] {
            let (o, n) = (
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            ip_ck = checksum_update(ip_ck, o, n);
            tp_ck = tp_ck.map(|c| checksum_update(c, o, n));
        }
        p[at..at + 4].copy_from_slice(&new);
    }
    for (at, o, n) in [
        (ihl, old_src.port(), src.port()),
        (ihl + 2, old_dst.port(), dst.port()),
    ] {
        tp_ck = tp_ck.map(|c| checksum_update(c, o, n));
        p[at..at + 2].copy_from_slice(&n.to_be_bytes());
    }
    p[10..12].copy_from_slice(&ip_ck.to_be_bytes());
    if let (Some(at), Some(c)) = (l4_ck, tp_ck) {
        // RFC 768: a computed UDP checksum of zero is sent as all ones.
        let c = if p[9] == PROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        };
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    Ok(())
}

/// Lowers the MSS option of a TCP SYN to `max` (so segments fit the tunnel), patching the checksum. Returns
/// whether it changed anything.
pub fn clamp_mss(p: &mut [u8], max: u16) -> bool {
    // Only a TCP header can be patched: not another protocol's payload, nor a later fragment's data (the data
    // path drops fragments before NAT; this keeps the function safe on its own).
    let later_fragment = p.len() >= 8 && u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0;
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != PROTO_TCP || later_fragment {
        return false;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    if p.len() < ihl + 20 || p[ihl + 13] & TCP_SYN == 0 {
        return false;
    }
    let doff = usize::from(p[ihl + 12] >> 4) * 4;
    let end = (ihl + doff).min(p.len());
    let mut i = ihl + 20;
    while i < end {
        match p[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let len = usize::from(*p.get(i + 1).unwrap_or(&0));
                if len < 2 || i + len > end {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = word(p, i + 2);
                    if old <= max {
                        return false;
                    }
                    // A 16-bit field at an odd offset of the segment adds to the one's-complement sum with
                    // its bytes swapped (an MSS option after a single NOP sits there).
                    let (o, n) = if (i + 2 - ihl) % 2 == 1 {
                        (old.swap_bytes(), max.swap_bytes())
                    } else {
                        (old, max)
                    };
                    let ck = checksum_update(word(p, ihl + 16), o, n);
                    p[i + 2..i + 4].copy_from_slice(&max.to_be_bytes());
                    p[ihl + 16..ihl + 18].copy_from_slice(&ck.to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn tcp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8], syn: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
            src.port(),
            dst.port(),
            7,
            1000,
        );
        if syn {
            b = b.syn();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// IPv4 header checksum and the TCP/UDP checksum (pseudo-header + segment sums to 0xffff; UDP 0 = none).
    fn checksums_valid(p: &[u8]) -> bool {
        let h = etherparse::Ipv4HeaderSlice::from_slice(p).unwrap();
        if h.to_header().calc_header_checksum() != h.header_checksum() {
            return false;
        }
        let ihl = usize::from(p[0] & 0xf) * 4;
        let seg = &p[ihl..usize::from(h.total_len())];
        if p[9] == PROTO_UDP && word(seg, 6) == 0 {
            return true;
        }
        let mut sum: u32 = [12, 14, 16, 18]
            .iter()
            .map(|&i| u32::from(word(p, i)))
            .sum();
        sum += u32::from(p[9]) + seg.len() as u32;
        for c in seg.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    fn nat() -> UpgradeNat {
        UpgradeNat::new(
            sa("100.66.0.1:7000"),
            SlotPool::new(Ipv4Addr::new(100, 64, 0, 0), 65_534, (1024, 65_535)),
        )
    }

    proptest! {
        /// device -> namespace -> (kernel answers) -> device restores the original addressing byte for byte,
        /// and every intermediate packet has valid checksums.
        #[test]
        fn round_trip_restores_packet_and_keeps_checksums_valid(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sport in 1u16.., dport in 1u16..,
            payload in proptest::collection::vec(any::<u8>(), 0..200), udp in any::<bool>(),
        ) {
            let (src, dst) = (SocketAddrV4::new(src.into(), sport), SocketAddrV4::new(dst.into(), dport));
            let mut original = Vec::new();
            let b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64);
            if udp { b.udp(sport, dport).write(&mut original, &payload).unwrap() } else { b.tcp(sport, dport, 1, 100).write(&mut original, &payload).unwrap() }
            let mut n = nat();
            let key = NatKey { tenant: 3, protocol: if udp { PROTO_UDP } else { PROTO_TCP }, src, dst };
            let slot = n.claim(key, 0).unwrap();
            let mut p = original.clone();
            n.inbound(&mut p, slot).unwrap();
            prop_assert!(checksums_valid(&p));
            prop_assert_eq!(ports_v4(&p), Some((slot, sa("100.66.0.1:7000"))));
            // Undo with the reverse mapping applied twice (namespace reply direction, then back).
            rewrite_v4(&mut p, src, dst).unwrap();
            prop_assert_eq!(&p, &original);
            // A packet from the listener to the slot leaves as dst -> src of the original flow.
            let mut reply = original.clone();
            rewrite_v4(&mut reply, sa("100.66.0.1:7000"), slot).unwrap();
            prop_assert_eq!(n.outbound(&mut reply), Some((key, SlotState::Live)));
            prop_assert_eq!(ports_v4(&reply), Some((dst, src)));
            prop_assert!(checksums_valid(&reply));
        }

        /// Live flows never share a slot; a released slot is not reused inside the quarantine.
        #[test]
        fn slots_unique_and_quarantined(ops in proptest::collection::vec((any::<bool>(), 0u16..50, 0u64..30_000), 1..300)) {
            let mut n = UpgradeNat::new(sa("100.66.0.1:7000"), SlotPool::new(Ipv4Addr::new(100, 64, 0, 0), 1, (1024, 1100)));
            let mut now = 0;
            let mut released: HashMap<SocketAddrV4, u64> = HashMap::new();
            for (claim, port, dt) in ops {
                now += dt;
                let key = NatKey { tenant: 1, protocol: PROTO_TCP, src: SocketAddrV4::new(Ipv4Addr::new(100, 96, 0, 2), 1000 + port), dst: sa("10.0.0.1:22") };
                if claim {
                    if let Ok(slot) = n.claim(key, now) {
                        if let Some(&at) = released.get(&slot) {
                            prop_assert!(now >= at + QUARANTINE_MS, "slot reused after {} ms", now - at);
                        }
                        released.remove(&slot);
                    }
                } else if let Some(slot) = n.by_key.get(&key).copied() {
                    n.release(&key, now);
                    released.insert(slot, now);
                }
                let mut seen = std::collections::HashSet::new();
                for s in n.by_key.values() {
                    prop_assert!(seen.insert(*s), "two live flows share {s}");
                }
                prop_assert_eq!(n.by_key.len(), n.by_slot.len());
            }
        }
    }

    #[test]
    fn downgrade_round_trip_restores_both_directions() {
        let mut d = DowngradeNat::new(SlotPool::new(
            Ipv4Addr::new(100, 65, 0, 0),
            65_534,
            (1024, 65_535),
        ));
        let key = NatKey {
            tenant: 1,
            protocol: PROTO_TCP,
            src: sa("100.96.0.2:40000"),
            dst: sa("100.96.0.3:22"),
        };
        let nat_dst = d.claim(key, 0).unwrap();
        let ksrc = sa("100.66.1.1:51000");
        // The proxy's SYN, as the kernel sends it on the downgrade TUN.
        let mut syn = tcp_packet(ksrc, nat_dst, b"", true);
        assert_eq!(d.from_kernel(&mut syn), Some(key));
        assert_eq!(ports_v4(&syn), Some((key.src, key.dst)));
        assert!(checksums_valid(&syn));
        // The device's answer goes back to the kernel socket.
        let mut answer = tcp_packet(key.dst, key.src, b"hi", false);
        assert_eq!(d.to_kernel(&mut answer, &key), Some(()));
        assert_eq!(ports_v4(&answer), Some((nat_dst, ksrc)));
        assert!(checksums_valid(&answer));
        // Another kernel socket cannot hijack the mapping.
        let mut other = tcp_packet(sa("100.66.1.1:51001"), nat_dst, b"", true);
        assert_eq!(d.from_kernel(&mut other), None);
        d.release(&key, 0);
        assert_eq!(d.to_kernel(&mut answer, &key), None);
    }

    /// Found by the `nat` fuzz target: after a flow ended and the same 5-tuple started again on a new address, a
    /// SYN the old proxy socket still sent to the old address was translated as the new flow (and taught it the
    /// old socket's source, so the new proxy connection's packets were refused).
    #[test]
    fn a_closing_downgrade_address_does_not_reach_the_flow_that_started_again() {
        let mut d = DowngradeNat::new(SlotPool::new(Ipv4Addr::new(100, 65, 0, 0), 1, (1024, 1025)));
        let key = NatKey {
            tenant: 1,
            protocol: PROTO_TCP,
            src: sa("100.96.0.2:40000"),
            dst: sa("100.96.0.3:22"),
        };
        let old = d.claim(key, 0).unwrap();
        assert_eq!(d.retire(&key), Some(old));
        let new = d.claim(key, 0).unwrap();
        assert_ne!(old, new);
        // The old proxy socket, still closing, retransmits its SYN to the old address.
        let mut stale = tcp_packet(sa("100.66.1.1:51000"), old, b"", true);
        assert_eq!(d.from_kernel(&mut stale), None, "stale SYN passed");
        // Positive control: the new proxy connection's SYN to the new address goes through.
        let mut syn = tcp_packet(sa("100.66.1.1:51001"), new, b"", true);
        assert_eq!(d.from_kernel(&mut syn), Some(key));
        assert_eq!(ports_v4(&syn), Some((key.src, key.dst)));
    }

    /// Found by the `nat` fuzz target: with a header length below 20 bytes the ports were read and written
    /// inside the address fields, so a rewrite that succeeded left other addresses than it was asked for.
    #[test]
    fn a_header_shorter_than_20_bytes_is_not_rewritten() {
        let (src, dst) = (sa("100.96.0.2:40000"), sa("10.0.0.1:22"));
        let mut p = tcp_packet(src, dst, b"", true);
        assert_eq!(ports_v4(&p), Some((src, dst)), "positive control");
        let mut q = p.clone();
        assert_eq!(rewrite_v4(&mut q, dst, src), Ok(()));
        assert_eq!(ports_v4(&q), Some((dst, src)));
        p[0] = 0x43; // IHL 3: the "transport header" starts at the source address
        let before = p.clone();
        assert_eq!(ports_v4(&p), None);
        assert_eq!(rewrite_v4(&mut p, dst, src), Err(NatError::Unsupported));
        assert_eq!(p, before, "rewritten anyway");
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let mut n = UpgradeNat::new(
            sa("100.66.0.1:7000"),
            SlotPool::new(Ipv4Addr::new(100, 64, 0, 0), 1, (1024, 1025)),
        );
        let key = |p| NatKey {
            tenant: 1,
            protocol: PROTO_TCP,
            src: SocketAddrV4::new(Ipv4Addr::new(100, 96, 0, 2), p),
            dst: sa("10.0.0.1:22"),
        };
        assert!(n.claim(key(1), 0).is_ok());
        assert!(n.claim(key(2), 0).is_ok());
        assert_eq!(n.claim(key(3), 0), Err(NatError::Exhausted));
        n.release(&key(1), 0);
        assert_eq!(n.claim(key(3), 1), Err(NatError::Exhausted), "quarantined");
        assert!(n.claim(key(3), QUARANTINE_MS).is_ok());
    }

    #[test]
    fn mss_is_clamped_with_valid_checksum() {
        let mut p = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 22, 1, 64000)
            .syn()
            .options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                etherparse::TcpOptionElement::Noop,
            ])
            .unwrap()
            .write(&mut p, &[])
            .unwrap();
        assert!(clamp_mss(&mut p, 1380));
        assert!(checksums_valid(&p));
        {
            let s = SlicedPacket::from_ip(&p).unwrap();
            let Some(TransportSlice::Tcp(t)) = s.transport else {
                panic!()
            };
            assert!(t.options_iterator().any(|o| matches!(
                o,
                Ok(etherparse::TcpOptionElement::MaximumSegmentSize(1380))
            )));
        }
        assert!(!clamp_mss(&mut p, 1400), "never raised");
        let mut plain = tcp_packet(sa("1.2.3.4:5"), sa("5.6.7.8:9"), b"x", false);
        assert!(!clamp_mss(&mut plain, 1000), "only SYNs");
    }

    /// Found by the `nat` fuzz target: an MSS option after a single NOP has its value at an odd offset of the
    /// segment, where a 16-bit field adds to the checksum byte-swapped.
    #[test]
    fn mss_at_an_odd_offset_is_clamped_with_valid_checksum() {
        for pad in [
            vec![etherparse::TcpOptionElement::Noop],
            vec![
                etherparse::TcpOptionElement::Noop,
                etherparse::TcpOptionElement::Noop,
                etherparse::TcpOptionElement::Noop,
            ],
        ] {
            let mut opts = pad.clone();
            opts.push(etherparse::TcpOptionElement::MaximumSegmentSize(1460));
            let mut p = Vec::new();
            PacketBuilder::ipv4([100, 96, 0, 2], [10, 0, 0, 1], 64)
                .tcp(40000, 22, 1, 64000)
                .syn()
                .options(&opts)
                .unwrap()
                .write(&mut p, &[])
                .unwrap();
            assert!(checksums_valid(&p), "control: the built SYN is valid");
            assert!(clamp_mss(&mut p, 1380), "{} NOPs: not clamped", pad.len());
            assert!(checksums_valid(&p), "{} NOPs: checksum broken", pad.len());
        }
    }

    /// Found by the `nat` fuzz target (in its oracle): bytes that read as a SYN with an MSS option are left alone
    /// unless they are the TCP header of an unfragmented or first-fragment TCP packet.
    #[test]
    fn mss_clamp_touches_only_tcp_headers() {
        let syn = |proto: u8, frag: u16| {
            let mut p = Vec::new();
            PacketBuilder::ipv4([100, 96, 0, 2], [10, 0, 0, 1], 64)
                .tcp(40000, 22, 1, 64000)
                .syn()
                .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
                .unwrap()
                .write(&mut p, &[])
                .unwrap();
            p[9] = proto;
            p[6..8].copy_from_slice(&frag.to_be_bytes());
            p
        };
        // Positive control: the same bytes as TCP, unfragmented or a first fragment (MF set), are clamped.
        assert!(clamp_mss(&mut syn(PROTO_TCP, 0), 1380));
        assert!(clamp_mss(&mut syn(PROTO_TCP, 0x2000), 1380));
        for (proto, frag, what) in [
            (1, 0, "ICMP"),
            (PROTO_UDP, 0, "UDP"),
            (PROTO_TCP, 0x0010, "a later fragment"),
        ] {
            let mut p = syn(proto, frag);
            let before = p.clone();
            assert!(!clamp_mss(&mut p, 1380), "{what} clamped");
            assert_eq!(p, before, "{what} changed");
        }
    }
}
