//! Targets `packet` (parsers, in-place rewrites and builders of `crate::packet`) and `nat` (`core::nat`: slot
//! tables, address rewrites, MSS clamp). Property: a rewrite of a packet whose checksums etherparse accepts
//! leaves checksums etherparse accepts; parsed fields agree with etherparse's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};

use etherparse::{IpNumber, Ipv4Header, PacketBuilder, TcpHeaderSlice, UdpHeaderSlice};

use super::oracle::{checksums_ok, ipv4_header_ok};
use super::Input;
use crate::core::nat::{
    self, DowngradeNat, NatKey, SlotPool, SlotState, UpgradeNat, QUARANTINE_MS,
};
use crate::packet::{
    self, Hop, LocalReply, Unreachable, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK,
    TCP_RST, TCP_SYN,
};

/// Ports that rules, NAT and the local responder care about; drawn half the time so flows hit them.
const PORTS: [u16; 10] = [22, 23, 80, 443, 9, 53, 7000, 8000, 8100, 1024];

pub(crate) fn port(inp: &mut Input<'_>) -> u16 {
    let b = inp.u8();
    if b & 1 == 0 {
        PORTS[usize::from(b >> 1) % PORTS.len()]
    } else {
        inp.u16()
    }
}

/// A well-formed packet from `src` to `dst` (same family) whose shape the input chooses: TCP with any flags and
/// options, UDP, ICMP echo request/reply, an ICMP error, or another protocol; IPv6 optionally behind a
/// Hop-by-Hop header. Checksums are valid.
pub(crate) fn build(inp: &mut Input<'_>, src: IpAddr, dst: IpAddr) -> Vec<u8> {
    let kind = inp.u8();
    let ttl = inp.u8();
    let (sport, dport) = (port(inp), port(inp));
    let flags = inp.u8();
    let (seq, ack) = (inp.u32(), inp.u32());
    let opts = {
        let n = inp_len(inp);
        let raw = inp.bytes(usize::from(n));
        let mut o = Vec::with_capacity(44);
        if kind & 0x10 != 0 {
            o.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460, as real SYNs carry
        }
        o.extend_from_slice(raw);
        o.truncate(40);
        o.truncate(o.len() / 4 * 4);
        o
    };
    let payload = inp.short();
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), ttl),
        _ => return Vec::new(),
    };
    let v6 = src.is_ipv6();
    let mut out = Vec::new();
    let written = match kind % 6 {
        0 => {
            let mut t = b.tcp(sport, dport, seq, inp_window(flags));
            if flags & 0x01 != 0 {
                t = t.fin();
            }
            if flags & 0x02 != 0 {
                t = t.syn();
            }
            if flags & 0x04 != 0 {
                t = t.rst();
            }
            if flags & 0x08 != 0 {
                t = t.psh();
            }
            if flags & 0x10 != 0 {
                t = t.ack(ack);
            }
            if flags & 0x20 != 0 {
                t = t.urg(1);
            }
            match t.options_raw(&opts) {
                Ok(t) => t.write(&mut out, payload).is_ok(),
                Err(_) => false,
            }
        }
        1 => b.udp(sport, dport).write(&mut out, payload).is_ok(),
        2 | 3 if v6 => {
            let (id, sq) = (sport, dport);
            if kind % 6 == 2 {
                b.icmpv6_echo_request(id, sq)
                    .write(&mut out, payload)
                    .is_ok()
            } else {
                b.icmpv6_echo_reply(id, sq).write(&mut out, payload).is_ok()
            }
        }
        2 => b
            .icmpv4_echo_request(sport, dport)
            .write(&mut out, payload)
            .is_ok(),
        3 => b
            .icmpv4_echo_reply(sport, dport)
            .write(&mut out, payload)
            .is_ok(),
        4 if v6 => b
            .icmpv6_raw(1, flags % 5, [0; 4])
            .write(&mut out, payload)
            .is_ok(),
        4 => b
            .icmpv4_raw(3, flags % 16, [0; 4])
            .write(&mut out, payload)
            .is_ok(),
        _ => {
            // Another protocol (GRE, SCTP, ...): header and payload only.
            let proto = match flags {
                PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 47,
                p => p,
            };
            return other_protocol(src, dst, ttl, proto, payload);
        }
    };
    if !written {
        return Vec::new();
    }
    if v6 && kind & 0x80 != 0 {
        insert_hop_by_hop(&mut out);
    }
    out
}

fn inp_len(inp: &mut Input<'_>) -> u8 {
    inp.u8() % 44
}

fn inp_window(flags: u8) -> u16 {
    u16::from(flags) << 8 | 0xff
}

fn other_protocol(src: IpAddr, dst: IpAddr, ttl: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let Ok(h) = Ipv4Header::new(
                payload.len() as u16,
                ttl,
                IpNumber(proto),
                s.octets(),
                d.octets(),
            ) else {
                return out;
            };
            if h.write(&mut out).is_err() {
                return Vec::new();
            }
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            out.extend_from_slice(&[proto, ttl]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => return out,
    }
    out.extend_from_slice(payload);
    out
}

/// Puts an 8-byte Hop-by-Hop header (PadN) between the IPv6 header and its payload. Transport checksums do not
/// change (the pseudo-header holds the upper-layer length).
fn insert_hop_by_hop(p: &mut Vec<u8>) {
    if p.len() < 40 {
        return;
    }
    let next = p[6];
    p[6] = 0;
    let len = u16::from_be_bytes([p[4], p[5]]) + 8;
    p[4..6].copy_from_slice(&len.to_be_bytes());
    p.splice(40..40, [next, 0, 1, 4, 0, 0, 0, 0]);
}

fn v4(inp: &mut Input<'_>) -> Ipv4Addr {
    Ipv4Addr::from(inp.u32())
}

fn addr_pair(inp: &mut Input<'_>) -> (IpAddr, IpAddr) {
    if inp.bool() {
        let mut s = [0u8; 16];
        let mut d = [0u8; 16];
        s.copy_from_slice(&padded::<16>(inp.bytes(16)));
        d.copy_from_slice(&padded::<16>(inp.bytes(16)));
        (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
    } else {
        (v4(inp).into(), v4(inp).into())
    }
}

fn padded<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out[..b.len()].copy_from_slice(b);
    out
}

/// `packet`: `[mode][params][packet]`. Mode bit 0 picks raw bytes or a packet built from the input; the
/// parsers, the echo responder, the TTL decrement and both builders then run on it.
pub(crate) fn packet(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let why = if inp.bool() {
        Unreachable::NoRoute
    } else {
        Unreachable::Prohibited
    };
    let (rst_seq, rst_ack, with_ack) = (inp.u32(), inp.u32(), inp.bool());
    let edit = (inp.u8(), inp.u16());
    let p = if mode & 1 == 0 {
        inp.rest().to_vec()
    } else {
        let (s, d) = addr_pair(&mut inp);
        build(&mut inp, s, d)
    };
    check_packet(&p, why, (rst_seq, rst_ack, with_ack), edit);
}

fn check_packet(p: &[u8], why: Unreachable, rst: (u32, u32, bool), edit: (u8, u16)) {
    let Ok(v) = packet::parse_ip(p) else {
        return;
    };
    assert!(
        v.l4_offset <= v.len && v.len <= p.len(),
        "{v:?} for {} bytes",
        p.len()
    );
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (v.src, v.dst) {
        if let Ok(h) = etherparse::Ipv4HeaderSlice::from_slice(p) {
            assert_eq!((h.source_addr(), h.destination_addr()), (s, d));
            assert_eq!(h.protocol().0, v.protocol);
            assert_eq!(h.slice().len(), v.l4_offset);
        }
    }
    let pkt = &p[..v.len];
    let valid = checksums_ok(pkt) == Some(true);
    let l4 = &pkt[v.l4_offset..];
    match packet::parse_transport(pkt, &v) {
        Ok(t) if !v.fragment => match v.protocol {
            PROTO_TCP => {
                let h = TcpHeaderSlice::from_slice(l4).expect("a TCP header we accepted");
                assert_eq!((t.sport, t.dport), (h.source_port(), h.destination_port()));
                assert_eq!(
                    (t.tcp_seq, t.tcp_ack),
                    (h.sequence_number(), h.acknowledgment_number())
                );
                assert_eq!(t.tcp_flags & 0x3f, l4[13] & 0x3f);
                let payload = (l4.len() - h.slice().len()) as u32;
                assert_eq!(
                    t.tcp_seg_len,
                    payload + u32::from(h.syn()) + u32::from(h.fin())
                );
            }
            PROTO_UDP => {
                let h = UdpHeaderSlice::from_slice(l4).expect("a UDP header we accepted");
                assert_eq!((t.sport, t.dport), (h.source_port(), h.destination_port()));
            }
            _ => {}
        },
        Ok(_) => {}
        Err(_) => {
            // Whatever etherparse reads as a whole TCP header, we read too.
            if v.protocol == PROTO_TCP && !v.fragment {
                assert!(
                    TcpHeaderSlice::from_slice(l4).is_err(),
                    "TCP header refused: {l4:?}"
                );
            }
        }
    }

    // The echo responder: answers exactly the valid echo requests, with valid checksums, addressed back.
    let mut reply = pkt.to_vec();
    let echo_request = !v.fragment
        && l4.len() >= 8
        && matches!(
            (v.protocol, l4[0], l4[1]),
            (PROTO_ICMP, 8, 0) | (PROTO_ICMPV6, 128, 0)
        )
        && v.src.is_ipv4() == (v.protocol == PROTO_ICMP);
    match packet::echo_reply_in_place(&mut reply, &v) {
        LocalReply::Reply(n) => {
            assert_eq!(n, v.len);
            let r = packet::parse_ip(&reply).expect("reply parses");
            assert_eq!((r.src, r.dst), (v.dst, v.src));
            if valid {
                assert_eq!(
                    checksums_ok(&reply[..n]),
                    Some(true),
                    "echo reply checksum: {pkt:?} -> {:?}",
                    &reply[..n]
                );
            }
        }
        LocalReply::NotHandled => {
            assert!(!(valid && echo_request), "valid echo request not answered")
        }
    }

    // TTL / hop limit.
    let mut fwd = pkt.to_vec();
    let ttl_at = if v.src.is_ipv4() { 8 } else { 7 };
    let ttl = pkt[ttl_at];
    match packet::decrement_ttl(&mut fwd, &v) {
        Hop::Forward => {
            assert_eq!(fwd[ttl_at], ttl - 1);
            if valid {
                assert_eq!(
                    checksums_ok(&fwd),
                    Some(true),
                    "checksum after TTL decrement"
                );
            }
        }
        Hop::Expired => assert!(ttl <= 1),
    }

    // RFC 1624: changing any other 16-bit word of the IPv4 header with `checksum_update` keeps it valid.
    if let (IpAddr::V4(_), true) = (v.src, valid) {
        let at = usize::from(edit.0) % (v.l4_offset / 2) * 2;
        if at != 10 {
            let mut e = pkt.to_vec();
            let old = u16::from_be_bytes([e[at], e[at + 1]]);
            e[at..at + 2].copy_from_slice(&edit.1.to_be_bytes());
            let ck = packet::checksum_update(u16::from_be_bytes([e[10], e[11]]), old, edit.1);
            e[10..12].copy_from_slice(&ck.to_be_bytes());
            assert!(ipv4_header_ok(&e[..v.l4_offset]), "RFC 1624 update at {at}");
        }
    }

    // ICMP errors quote the offending packet; RSTs are valid TCP.
    let gw: IpAddr = if v.src.is_ipv4() {
        Ipv4Addr::new(100, 96, 0, 1).into()
    } else {
        "fd00::1".parse().expect("literal")
    };
    let mut out = vec![0u8; 2048];
    let n = packet::build_unreachable(pkt, &v, gw, why, &mut out).expect("room for an ICMP error");
    let e = &out[..n];
    assert_eq!(checksums_ok(e), Some(true), "ICMP error checksum: {e:?}");
    let r = packet::parse_ip(e).expect("ICMP error parses");
    assert_eq!((r.src, r.dst), (gw, v.src));
    assert_eq!(
        &e[r.l4_offset + 8..],
        &pkt[..n - r.l4_offset - 8],
        "quote of the original"
    );
    let (seq, ack, with_ack) = rst;
    let n = packet::build_tcp_rst(v.dst, 7, v.src, 9, seq, with_ack.then_some(ack), &mut out)
        .expect("room for a RST");
    let e = &out[..n];
    assert_eq!(checksums_ok(e), Some(true), "RST checksum");
    let r = packet::parse_ip(e).expect("RST parses");
    let t = packet::parse_transport(e, &r).expect("RST transport parses");
    assert_eq!(
        t.tcp_flags,
        if with_ack { TCP_RST | TCP_ACK } else { TCP_RST }
    );
    assert_eq!(
        (r.src, r.dst, t.sport, t.dport, t.tcp_seq),
        (v.dst, v.src, 7, 9, seq)
    );
}

/// `nat`: a sequence of operations on an upgrade and a downgrade table with small pools (so exhaustion and
/// quarantine happen), checked against a model of the slot life (live -> closing -> quarantined -> reused);
/// plus address rewrites and MSS clamps of raw or built packets.
pub(crate) fn nat(data: &[u8]) {
    let mut inp = Input::new(data);
    let listener = SocketAddrV4::new(Ipv4Addr::new(100, 66, 0, 1), 7000);
    let hosts = u32::from(inp.u8() % 3) + 1;
    let ports = (1024, 1024 + u16::from(inp.u8() % 8));
    let mut up = UpgradeNat::new(
        listener,
        SlotPool::new(Ipv4Addr::new(100, 64, 0, 0), hosts, ports),
    );
    let mut down = DowngradeNat::new(SlotPool::new(Ipv4Addr::new(100, 65, 0, 0), hosts, ports));
    // The model: live flows, slots whose flow ended but whose namespace side is not closed yet, and when each
    // quarantined slot was released.
    let mut live: HashMap<NatKey, SocketAddrV4> = HashMap::new();
    let mut closing: HashMap<SocketAddrV4, NatKey> = HashMap::new();
    let mut released: HashMap<SocketAddrV4, u64> = HashMap::new();
    let mut down_live: HashMap<NatKey, SocketAddrV4> = HashMap::new();
    let mut down_closing: HashMap<SocketAddrV4, NatKey> = HashMap::new();
    let mut down_released: HashMap<SocketAddrV4, u64> = HashMap::new();
    let mut now = 0u64;
    let key = |inp: &mut Input<'_>| {
        let b = inp.u8();
        NatKey {
            tenant: u32::from(b & 1),
            protocol: if b & 2 == 0 { PROTO_TCP } else { PROTO_UDP },
            src: SocketAddrV4::new(
                Ipv4Addr::new(100, 96, 0, 2 + (b >> 2 & 1)),
                40000 + u16::from(b >> 3 & 3),
            ),
            dst: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 22 + u16::from(b >> 5)),
        }
    };
    let check_state = |up: &UpgradeNat,
                       live: &HashMap<NatKey, SocketAddrV4>,
                       closing: &HashMap<SocketAddrV4, NatKey>| {
        for (k, s) in live {
            assert_eq!(up.original(*s), Some((*k, SlotState::Live)));
        }
        for (s, k) in closing {
            assert_eq!(up.original(*s), Some((*k, SlotState::Closing)));
        }
        assert_eq!(up.len(), live.len());
        assert_eq!(up.closing(), closing.len());
    };
    let mut ops = 0;
    while !inp.is_empty() && ops < 200 {
        ops += 1;
        match inp.u8() % 11 {
            0 => {
                let k = key(&mut inp);
                match up.claim(k, now) {
                    Ok(slot) => {
                        if let Some(&s) = live.get(&k) {
                            assert_eq!(s, slot, "a live flow keeps its slot");
                        } else {
                            assert!(
                                !live.values().any(|&s| s == slot),
                                "{slot} handed out twice"
                            );
                            assert!(
                                !closing.contains_key(&slot),
                                "{slot} reused before its socket closed"
                            );
                            if let Some(at) = released.remove(&slot) {
                                assert!(
                                    now >= at + QUARANTINE_MS,
                                    "{slot} reused after {} ms",
                                    now - at
                                );
                            }
                            live.insert(k, slot);
                        }
                    }
                    Err(_) => assert!(!live.contains_key(&k), "a live flow cannot be exhausted"),
                }
            }
            1 => {
                // The flow ends and its namespace socket is already closed.
                let k = key(&mut inp);
                up.release(&k, now);
                if let Some(s) = live.remove(&k) {
                    released.insert(s, now);
                }
            }
            2 => now += u64::from(inp.u16()) * 8,
            3 => {
                // Device -> namespace and the namespace's answer back, for a live or closing flow.
                let k = key(&mut inp);
                let proto = if k.protocol == PROTO_TCP { 0 } else { 1 };
                let (slot, state) = match (live.get(&k), closing.iter().find(|(_, c)| **c == k)) {
                    (Some(&s), _) => (s, SlotState::Live),
                    (None, Some((&s, _))) => (s, SlotState::Closing),
                    _ => continue,
                };
                let mut p = build_kind(
                    &mut inp,
                    proto,
                    *k.src.ip(),
                    k.src.port(),
                    *k.dst.ip(),
                    k.dst.port(),
                );
                if p.is_empty() {
                    continue;
                }
                up.inbound(&mut p, slot)
                    .expect("TCP/UDP over IPv4 translates");
                assert_eq!(nat::ports_v4(&p), Some((slot, listener)));
                assert_eq!(checksums_ok(&p), Some(true), "checksum after inbound NAT");
                let mut r = build_kind(
                    &mut inp,
                    proto,
                    *listener.ip(),
                    listener.port(),
                    *slot.ip(),
                    slot.port(),
                );
                if r.is_empty() {
                    continue;
                }
                let bare = proto == 0 && r.len() == 40 && r[33] & TCP_SYN == 0;
                match up.outbound(&mut r) {
                    Some(got) => {
                        assert_eq!(got, (k, state));
                        assert!(
                            state == SlotState::Live || bare,
                            "payload of an ended flow passed"
                        );
                        assert_eq!(nat::ports_v4(&r), Some((k.dst, k.src)));
                        assert_eq!(checksums_ok(&r), Some(true), "checksum after outbound NAT");
                    }
                    None => assert!(
                        state == SlotState::Closing && !bare,
                        "namespace reply of a live flow dropped"
                    ),
                }
            }
            4 => {
                let k = key(&mut inp);
                match down.claim(k, now) {
                    Ok(d) => {
                        if let Some(&s) = down_live.get(&k) {
                            assert_eq!(s, d, "a live downgrade keeps its address");
                        } else {
                            assert!(!down_live.values().any(|&s| s == d), "{d} shared");
                            assert!(
                                !down_closing.contains_key(&d),
                                "{d} reused before the proxy's connection closed"
                            );
                            if let Some(at) = down_released.remove(&d) {
                                assert!(
                                    now >= at + QUARANTINE_MS,
                                    "{d} reused after {} ms",
                                    now - at
                                );
                            }
                            down_live.insert(k, d);
                        }
                    }
                    Err(_) => assert!(
                        !down_live.contains_key(&k),
                        "a live downgrade cannot be exhausted"
                    ),
                }
            }
            5 => {
                let k = key(&mut inp);
                match inp.pick(3) {
                    0 => {
                        down.release(&k, now);
                        if let Some(s) = down_live.remove(&k) {
                            down_released.insert(s, now);
                        }
                    }
                    1 => {
                        // The flow ends; the proxy's connection is still open.
                        let got = down.retire(&k);
                        assert_eq!(got, down_live.remove(&k));
                        if let Some(s) = got {
                            down_closing.insert(s, k);
                        }
                    }
                    _ => {
                        let slot =
                            match down_closing.keys().nth(inp.pick(down_closing.len().max(1))) {
                                Some(&s) if inp.bool() => s,
                                _ => SocketAddrV4::new(
                                    Ipv4Addr::new(100, 65, 0, 1 + inp.u8() % 3),
                                    1024 + u16::from(inp.u8() % 8),
                                ),
                            };
                        down.release_slot(slot, now);
                        if down_closing.remove(&slot).is_some() {
                            down_released.insert(slot, now);
                        } else if let Some((&k, _)) = down_live.iter().find(|(_, s)| **s == slot) {
                            down_live.remove(&k);
                            down_released.insert(slot, now);
                        }
                    }
                }
            }
            6 => {
                // The kernel's packet to a downgrade address leaves as the original flow; answers go back. A
                // packet to the address of an ended flow (a socket still closing) goes nowhere, even when the
                // same flow has started again on a new address.
                let k = key(&mut inp);
                let closing_slot = down_closing.iter().find(|(_, c)| **c == k).map(|(&s, _)| s);
                let (nat_dst, stale) = match (down_live.get(&k), closing_slot) {
                    (Some(_), Some(s)) if inp.bool() => (s, true),
                    (Some(&s), _) => (s, false),
                    (None, Some(s)) => (s, true),
                    (None, None) => continue,
                };
                let ksrc = SocketAddrV4::new(
                    Ipv4Addr::new(100, 66, 1, 1),
                    50000 + u16::from(inp.u8() % 2),
                );
                let mut p = build_kind(
                    &mut inp,
                    0,
                    *ksrc.ip(),
                    ksrc.port(),
                    *nat_dst.ip(),
                    nat_dst.port(),
                );
                if p.is_empty() {
                    continue;
                }
                let got = down.from_kernel(&mut p);
                if stale {
                    assert_eq!(
                        got, None,
                        "a packet to the closing {nat_dst} passed as {k:?}"
                    );
                } else if got == Some(k) {
                    assert_eq!(nat::ports_v4(&p), Some((k.src, k.dst)));
                    assert_eq!(checksums_ok(&p), Some(true), "checksum after downgrade NAT");
                    let mut a = build_kind(
                        &mut inp,
                        0,
                        *k.dst.ip(),
                        k.dst.port(),
                        *k.src.ip(),
                        k.src.port(),
                    );
                    if !a.is_empty() && down.to_kernel(&mut a, &k).is_some() {
                        assert_eq!(nat::ports_v4(&a), Some((nat_dst, ksrc)));
                        assert_eq!(checksums_ok(&a), Some(true), "checksum after answer NAT");
                    }
                } else {
                    assert_eq!(got, None, "{nat_dst} translated as another flow");
                }
            }
            7 => {
                // Any bytes through the rewrite: valid checksums stay valid.
                let src = SocketAddrV4::new(v4(&mut inp), inp.u16());
                let dst = SocketAddrV4::new(v4(&mut inp), inp.u16());
                let mut p = if inp.bool() {
                    inp.chunk(1500).to_vec()
                } else {
                    let (s, d) = (v4(&mut inp), v4(&mut inp));
                    build(&mut inp, s.into(), d.into())
                };
                let before = checksums_ok(&p);
                let parsed = packet::parse_ip(&p).is_ok_and(|v| v.len == p.len());
                if nat::rewrite_v4(&mut p, src, dst).is_ok() {
                    assert_eq!(nat::ports_v4(&p), Some((src, dst)));
                    if before == Some(true) && parsed {
                        assert_eq!(checksums_ok(&p), Some(true), "checksum after rewrite_v4");
                    }
                }
            }
            8 => {
                // MSS clamp: lowers only, keeps checksums.
                let max = inp.u16();
                let mut p = if inp.bool() {
                    inp.chunk(1500).to_vec()
                } else {
                    let (s, d) = (v4(&mut inp), v4(&mut inp));
                    build(&mut inp, s.into(), d.into())
                };
                let before_ok = checksums_ok(&p) == Some(true);
                let before = mss(&p);
                let clean = options_clean(&p);
                let changed = nat::clamp_mss(&mut p, max);
                if changed && !clean {
                    // Past an option etherparse rejects (an unknown kind, a known kind of another size) the
                    // clamp goes on by the option's length, as the kernel's parser does; only checksums to check.
                    if before_ok {
                        assert_eq!(
                            checksums_ok(&p),
                            Some(true),
                            "checksum after MSS clamp: {p:02x?}"
                        );
                    }
                } else if changed && tcp_flags(&p).is_some() {
                    assert_eq!(mss(&p), Some(max));
                    assert!(before.is_some_and(|m| m > max), "raised or invented an MSS");
                    if before_ok {
                        assert_eq!(checksums_ok(&p), Some(true), "checksum after MSS clamp");
                    }
                } else if !changed
                    && before_ok
                    && packet::parse_ip(&p).is_ok_and(|v| v.len == p.len())
                {
                    if let (Some(m), Some(syn)) = (before, tcp_flags(&p).map(|f| f & TCP_SYN != 0))
                    {
                        assert!(!syn || m <= max, "SYN with MSS {m} > {max} not clamped");
                    }
                }
            }
            9 => {
                // The flow ends; its namespace socket is still open (the slot is closing).
                let k = key(&mut inp);
                let got = up.retire(&k);
                assert_eq!(got, live.remove(&k));
                if let Some(s) = got {
                    closing.insert(s, k);
                }
            }
            _ => {
                // The application side reports a namespace socket closed.
                let slot = match closing.keys().nth(inp.pick(closing.len().max(1))) {
                    Some(&s) if inp.bool() => s,
                    _ => SocketAddrV4::new(
                        Ipv4Addr::new(100, 64, 0, 1 + inp.u8() % 3),
                        1024 + u16::from(inp.u8() % 8),
                    ),
                };
                up.release_slot(slot, now);
                if closing.remove(&slot).is_some() {
                    released.insert(slot, now);
                } else if let Some((&k, _)) = live.iter().find(|(_, s)| **s == slot) {
                    // A live flow's socket closed: the slot goes to quarantine with the flow's mapping.
                    live.remove(&k);
                    released.insert(slot, now);
                }
            }
        }
        check_state(&up, &live, &closing);
        assert_eq!(down.len(), down_live.len());
    }
}

/// A TCP (`proto` 0, with any flags) or UDP packet between the given endpoints.
fn build_kind(
    inp: &mut Input<'_>,
    proto: u8,
    s: Ipv4Addr,
    sp: u16,
    d: Ipv4Addr,
    dp: u16,
) -> Vec<u8> {
    let b = PacketBuilder::ipv4(s.octets(), d.octets(), 64);
    let payload = inp.short();
    let mut out = Vec::new();
    let ok = if proto == 0 {
        let mut t = b.tcp(sp, dp, inp.u32(), 1000);
        let f = inp.u8();
        if f & 1 != 0 {
            t = t.syn();
        }
        if f & 2 != 0 {
            t = t.ack(1);
        }
        t.write(&mut out, payload).is_ok()
    } else {
        b.udp(sp, dp).write(&mut out, payload).is_ok()
    };
    if ok {
        out
    } else {
        Vec::new()
    }
}

/// The TCP segment of an unfragmented IPv4 TCP packet. Only those are clamped: the payload of another protocol
/// may parse as TCP too (the fuzzer found an ICMP packet whose body reads as a SYN with an MSS option).
fn tcp_of(p: &[u8]) -> Option<(etherparse::Ipv4Slice<'_>, etherparse::TcpSlice<'_>)> {
    let ip = etherparse::Ipv4Slice::from_slice(p).ok()?;
    if ip.payload().ip_number != etherparse::IpNumber::TCP || ip.is_payload_fragmented() {
        return None;
    }
    let t = etherparse::TcpSlice::from_slice(ip.payload().payload).ok()?;
    Some((ip, t))
}

/// The MSS option of an IPv4 TCP packet, as etherparse reads it.
fn mss(p: &[u8]) -> Option<u16> {
    let (_, t) = tcp_of(p)?;
    t.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
        _ => None,
    })
}

/// Whether etherparse reads every TCP option of `p` (it stops at the first it rejects).
fn options_clean(p: &[u8]) -> bool {
    tcp_of(p).is_some_and(|(_, t)| t.options_iterator().all(|o| o.is_ok()))
}

fn tcp_flags(p: &[u8]) -> Option<u8> {
    let (ip, t) = tcp_of(p)?;
    ip.payload()
        .payload
        .get(13)
        .copied()
        .filter(|_| t.slice().len() >= 20)
}
