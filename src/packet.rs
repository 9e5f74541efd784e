//! Zero-copy views and in-place rewrites of decapsulated (inner) IP packets.
//!
//! Everything here works on `&[u8]`/`&mut [u8]` slices the caller owns: no allocation, no IO. Checksums are
//! patched incrementally (RFC 1624: `HC' = ~(~HC + ~m + m')`) rather than recomputed.
#![deny(unsafe_code)]

use std::net::IpAddr;

/// Why an inner packet could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// Too short, wrong version, or a length field that disagrees with the buffer.
    Malformed,
    /// An IPv6 extension header the gateway does not walk (or a chain too long, or a routing header that
    /// still has segments to visit): its transport could not be read, so policy could not be enforced.
    ExtensionHeader,
}

/// The parts of an inner IP header the relay needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpView {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol / IPv6 next header.
    pub protocol: u8,
    /// Offset of the transport header.
    pub l4_offset: usize,
    /// Total packet length according to the IP header.
    pub len: usize,
    /// True for a fragment (IPv4 with MF or an offset; IPv6 with a Fragment header anywhere in its chain).
    pub fragment: bool,
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 fragment extension header.
const IPV6_HOP_BY_HOP: u8 = 0;
/// "No next header": nothing follows (an extension-only packet).
const IPV6_NO_NEXT: u8 = 59;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// Most extension headers walked before a packet is refused (real traffic carries one or two).
const IPV6_MAX_EXTENSIONS: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Parses the IP header of `p` (IPv4 or IPv6) without copying.
pub fn parse_ip(p: &[u8]) -> Result<IpView, PacketError> {
    match p.first().map(|b| b >> 4) {
        Some(4) => {
            if p.len() < 20 {
                return Err(PacketError::Malformed);
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if ihl < 20 || len < ihl || len > p.len() {
                return Err(PacketError::Malformed);
            }
            let frag = u16::from_be_bytes([p[6], p[7]]);
            Ok(IpView {
                src: IpAddr::from([p[12], p[13], p[14], p[15]]),
                dst: IpAddr::from([p[16], p[17], p[18], p[19]]),
                protocol: p[9],
                l4_offset: ihl,
                len,
                fragment: frag & 0x3fff != 0,
            })
        }
        Some(6) => {
            if p.len() < 40 {
                return Err(PacketError::Malformed);
            }
            let len = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            if len > p.len() {
                return Err(PacketError::Malformed);
            }
            let src: [u8; 16] = p[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = p[24..40].try_into().expect("16 bytes");
            let (protocol, l4_offset, fragment) = walk_ipv6_extensions(&p[..len])?;
            Ok(IpView {
                src: IpAddr::from(src),
                dst: IpAddr::from(dst),
                protocol,
                l4_offset,
                len,
                fragment,
            })
        }
        _ => Err(PacketError::Malformed),
    }
}

/// Follows the IPv6 extension-header chain (RFC 8200) to the transport: Hop-by-Hop, Destination Options and
/// a Routing header with no segments left are stepped over; a Fragment header anywhere marks the packet a
/// fragment (its first part would name a transport the rest does not carry, so fragments are refused
/// whole). Anything else that is not a transport the gateway reads, a routing header that would send the
/// packet on, or a chain longer than `IPV6_MAX_EXTENSIONS` is `ExtensionHeader`.
fn walk_ipv6_extensions(p: &[u8]) -> Result<(u8, usize, bool), PacketError> {
    let (mut next, mut at) = (p[6], 40usize);
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_DEST_OPTS | IPV6_ROUTING => {
                let h = p.get(at..at + 8).ok_or(PacketError::Malformed)?;
                if next == IPV6_ROUTING && h[3] != 0 {
                    return Err(PacketError::ExtensionHeader); // segments left: not the final destination
                }
                next = h[0];
                at += (usize::from(h[1]) + 1) * 8;
                if at > p.len() {
                    return Err(PacketError::Malformed);
                }
            }
            IPV6_FRAGMENT => {
                let h = p.get(at..at + 8).ok_or(PacketError::Malformed)?;
                return Ok((h[0], at + 8, true));
            }
            PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 | IPV6_NO_NEXT => return Ok((next, at, false)),
            _ => return Err(PacketError::ExtensionHeader),
        }
    }
    Err(PacketError::ExtensionHeader)
}

/// RFC 1624 incremental update of a 16-bit one's complement checksum when a 16-bit word changes.
#[inline]
pub fn checksum_update(hc: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn read16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn write16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The transport fields flow tracking needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transport {
    /// Ports for TCP/UDP; the echo identifier (both) for ICMP echo; zero otherwise.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (zero for other protocols).
    pub tcp_flags: u8,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// Sequence space the segment consumes (payload + SYN + FIN).
    pub tcp_seg_len: u32,
}

impl Transport {
    /// Whether the flow has ports policy can match (TCP and UDP).
    pub fn has_ports(protocol: u8) -> bool {
        protocol == PROTO_TCP || protocol == PROTO_UDP
    }
}

/// Parses the transport header after `v`. Unknown protocols carry no ports; truncated TCP/UDP/ICMP headers
/// are `Malformed`.
pub fn parse_transport(p: &[u8], v: &IpView) -> Result<Transport, PacketError> {
    let l4 = &p[v.l4_offset..v.len];
    match v.protocol {
        PROTO_TCP => {
            if l4.len() < 20 {
                return Err(PacketError::Malformed);
            }
            let off = usize::from(l4[12] >> 4) * 4;
            if off < 20 || off > l4.len() {
                return Err(PacketError::Malformed);
            }
            let flags = l4[13];
            let payload = (l4.len() - off) as u32;
            Ok(Transport {
                sport: read16(l4, 0),
                dport: read16(l4, 2),
                tcp_flags: flags,
                tcp_seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                tcp_ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
                tcp_seg_len: payload
                    + u32::from(flags & TCP_SYN != 0)
                    + u32::from(flags & TCP_FIN != 0),
            })
        }
        PROTO_UDP => {
            if l4.len() < 8 || usize::from(read16(l4, 4)) > l4.len() || read16(l4, 4) < 8 {
                return Err(PacketError::Malformed);
            }
            Ok(Transport {
                sport: read16(l4, 0),
                dport: read16(l4, 2),
                ..Transport::default()
            })
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            if l4.len() < 8 {
                return Err(PacketError::Malformed);
            }
            let echo = matches!(
                (v.protocol, l4[0]),
                (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129)
            );
            let id = if echo { read16(l4, 4) } else { 0 };
            Ok(Transport {
                sport: id,
                dport: id,
                ..Transport::default()
            })
        }
        _ => Ok(Transport::default()),
    }
}

/// The connection an ICMP error is about, read from the header it quotes (the packet that could not be
/// delivered, as the sender of the error received it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    pub protocol: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// For an ICMP or ICMPv6 error message (destination unreachable, packet too big, time exceeded, parameter
/// problem, and ICMPv4 source quench and redirect): `Some` with what it quotes, `Some(None)` when the quote is
/// unusable. `None` for every other packet, echo included.
pub fn icmp_error(p: &[u8], v: &IpView) -> Option<Option<Quoted>> {
    let l4 = p.get(v.l4_offset..v.len)?;
    let error = matches!(
        (v.protocol, l4.first()?),
        (PROTO_ICMP, 3 | 4 | 5 | 11 | 12) | (PROTO_ICMPV6, 1..=4)
    );
    error.then(|| quoted(l4.get(8..)?, v.protocol))
}

fn quoted(q: &[u8], icmp: u8) -> Option<Quoted> {
    let (protocol, src, dst, l4) = match (icmp, q.first()? >> 4) {
        (PROTO_ICMP, 4) => {
            let ihl = usize::from(q[0] & 0x0f) * 4;
            let addr = |at: usize| -> Option<IpAddr> {
                let b: [u8; 4] = q.get(at..at + 4)?.try_into().ok()?;
                Some(IpAddr::from(b))
            };
            (*q.get(9)?, addr(12)?, addr(16)?, q.get(ihl.max(20)..)?)
        }
        (PROTO_ICMPV6, 6) => {
            let addr = |at: usize| -> Option<IpAddr> {
                let b: [u8; 16] = q.get(at..at + 16)?.try_into().ok()?;
                Some(IpAddr::from(b))
            };
            (*q.get(6)?, addr(8)?, addr(24)?, q.get(40..)?)
        }
        _ => return None,
    };
    if l4.len() < 8 {
        return None; // RFC 792 and 4443: at least the first 8 bytes of the transport header are quoted
    }
    let (sport, dport) = match protocol {
        PROTO_TCP | PROTO_UDP => (read16(l4, 0), read16(l4, 2)),
        PROTO_ICMP | PROTO_ICMPV6 => {
            let echo = matches!(
                (protocol, l4[0]),
                (PROTO_ICMP, 0 | 8) | (PROTO_ICMPV6, 128 | 129)
            );
            let id = if echo { read16(l4, 4) } else { 0 };
            (id, id)
        }
        _ => (0, 0),
    };
    Some(Quoted {
        protocol,
        src,
        sport,
        dst,
        dport,
    })
}

/// An ICMP echo request (a new question, never a reply within an echo flow).
pub fn is_echo_request(p: &[u8], v: &IpView) -> bool {
    matches!(
        (v.protocol, p.get(v.l4_offset)),
        (PROTO_ICMP, Some(8)) | (PROTO_ICMPV6, Some(128))
    )
}

/// Why the gateway refuses a packet, for the ICMP error it sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No device has the address (ICMP host / ICMPv6 address unreachable).
    NoRoute,
    /// Policy rejected the flow (ICMP communication administratively prohibited).
    Prohibited,
    /// Larger than the next hop's MTU, given here (ICMP fragmentation needed / ICMPv6 packet too big).
    TooBig(u16),
}

fn write_ip_header(
    out: &mut [u8],
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    payload_len: usize,
) -> Option<usize> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + payload_len;
            let h = out.get_mut(..20)?;
            h.fill(0);
            h[0] = 0x45;
            h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            h[8] = 64;
            h[9] = protocol;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let ck = !fold(ones_sum(h, 0));
            h[10..12].copy_from_slice(&ck.to_be_bytes());
            Some(20)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = out.get_mut(..40)?;
            h.fill(0);
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
            h[6] = protocol;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            Some(40)
        }
        _ => None,
    }
}

/// Pseudo-header sum for TCP/UDP/ICMPv6 checksums.
fn pseudo_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u32 {
    let sum = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ones_sum(&d.octets(), ones_sum(&s.octets(), 0)),
        (IpAddr::V6(s), IpAddr::V6(d)) => ones_sum(&d.octets(), ones_sum(&s.octets(), 0)),
        _ => 0,
    };
    sum + len as u32 + u32::from(protocol)
}

/// Writes into `out` the ICMP/ICMPv6 destination-unreachable error for `orig`, from `from` (the gateway's
/// tenant address) back to the sender. Returns the length, or `None` if `out` is too small.
pub fn build_unreachable(
    orig: &[u8],
    v: &IpView,
    from: IpAddr,
    why: Unreachable,
    out: &mut [u8],
) -> Option<usize> {
    let (protocol, ty, code, quote) = match v.src {
        IpAddr::V4(_) => (
            PROTO_ICMP,
            3u8,
            match why {
                Unreachable::NoRoute => 1u8,
                Unreachable::Prohibited => 13,
                Unreachable::TooBig(_) => 4,
            },
            (v.l4_offset + 8).min(v.len),
        ),
        // RFC 4443: as much of the invoking packet as fits in the minimum MTU.
        IpAddr::V6(_) => (
            PROTO_ICMPV6,
            if matches!(why, Unreachable::TooBig(_)) {
                2
            } else {
                1
            },
            match why {
                Unreachable::NoRoute => 3,
                Unreachable::Prohibited => 1,
                Unreachable::TooBig(_) => 0,
            },
            v.len.min(1280 - 48),
        ),
    };
    let msg_len = 8 + quote;
    let hl = write_ip_header(out, from, v.src, protocol, msg_len)?;
    let msg = out.get_mut(hl..hl + msg_len)?;
    msg[..8].fill(0);
    msg[0] = ty;
    msg[1] = code;
    if let Unreachable::TooBig(mtu) = why {
        // RFC 1191: next-hop MTU in the low half of the second word; RFC 4443: the whole word.
        msg[6..8].copy_from_slice(&mtu.to_be_bytes());
    }
    msg[8..].copy_from_slice(&orig[..quote]);
    let init = if protocol == PROTO_ICMPV6 {
        pseudo_sum(from, v.src, protocol, msg_len)
    } else {
        0
    };
    let ck = !fold(ones_sum(msg, init));
    msg[2..4].copy_from_slice(&ck.to_be_bytes());
    Some(hl + msg_len)
}

/// Writes a TCP RST that appears to come from `src:sport` and resets the connection at `dst:dport`, whose next
/// expected sequence number is `seq`; with `ack` set, the RST also acknowledges `ack`.
#[allow(clippy::too_many_arguments)]
pub fn build_tcp_rst(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    seq: u32,
    ack: Option<u32>,
    out: &mut [u8],
) -> Option<usize> {
    let hl = write_ip_header(out, src, dst, PROTO_TCP, 20)?;
    let t = out.get_mut(hl..hl + 20)?;
    t.fill(0);
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_RST;
    if let Some(a) = ack {
        t[8..12].copy_from_slice(&a.to_be_bytes());
        t[13] |= TCP_ACK;
    }
    let ck = !fold(ones_sum(t, pseudo_sum(src, dst, PROTO_TCP, 20)));
    t[16..18].copy_from_slice(&ck.to_be_bytes());
    Some(hl + 20)
}

/// Whether the TCP or UDP checksum of a parsed packet is right (a zero UDP checksum over IPv4 means none).
pub fn transport_checksum_ok(p: &[u8], v: &IpView) -> bool {
    let Some(seg) = p.get(v.l4_offset..v.len) else {
        return false;
    };
    if v.protocol == PROTO_UDP && v.src.is_ipv4() && seg.get(6..8) == Some(&[0, 0]) {
        return true;
    }
    fold(ones_sum(
        seg,
        pseudo_sum(v.src, v.dst, v.protocol, seg.len()),
    )) == 0xffff
}

/// Outcome of forwarding one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Forward,
    /// TTL / hop limit reached zero.
    Expired,
}

/// The IPv4 TTL or IPv6 hop limit.
pub fn ttl(p: &[u8], v: &IpView) -> u8 {
    match v.src {
        IpAddr::V4(_) => p[8],
        IpAddr::V6(_) => p[7],
    }
}

/// Decrements the IPv4 TTL (patching the header checksum) or the IPv6 hop limit, as a router does.
pub fn decrement_ttl(p: &mut [u8], v: &IpView) -> Hop {
    match v.src {
        IpAddr::V4(_) => {
            if p[8] <= 1 {
                return Hop::Expired;
            }
            let old = read16(p, 8);
            p[8] -= 1;
            let new = read16(p, 8);
            let hc = checksum_update(read16(p, 10), old, new);
            write16(p, 10, hc);
        }
        IpAddr::V6(_) => {
            if p[7] <= 1 {
                return Hop::Expired;
            }
            p[7] -= 1;
        }
    }
    Hop::Forward
}

/// One's complement sum over `data` (for verifying checksums; not on the relay path).
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Result of offering a packet addressed to the gateway itself to the local responder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReply {
    /// `p[..len]` now holds the reply, addressed back to the sender.
    Reply(usize),
    /// Not an echo request the gateway answers (other protocols, fragments, bad checksums).
    NotHandled,
}

/// Turns an ICMP/ICMPv6 echo request addressed to the gateway into the echo reply, in place: addresses swapped,
/// type changed, TTL reset, checksums patched incrementally. Requests with a bad checksum are not answered.
pub fn echo_reply_in_place(p: &mut [u8], v: &IpView) -> LocalReply {
    let l4 = v.l4_offset;
    if v.fragment || v.len < l4 + 8 {
        return LocalReply::NotHandled;
    }
    let msg = &p[l4..v.len];
    match (v.src, v.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            if v.protocol != PROTO_ICMP
                || msg[0] != 8
                || msg[1] != 0
                || fold(ones_sum(msg, 0)) != 0xffff
            {
                return LocalReply::NotHandled;
            }
            // Swapping addresses leaves the header checksum unchanged; the TTL word changes.
            let (a, b) = p[12..20].split_at_mut(4);
            a.swap_with_slice(b);
            let old = read16(p, 8);
            p[8] = 64;
            let hc = checksum_update(read16(p, 10), old, read16(p, 8));
            write16(p, 10, hc);
            // Recomputed, not patched: an incremental update gives 0x0000 where the all-zero message of an
            // identifier-0, sequence-0, empty echo needs 0xffff (RFC 1624's -0/+0 case). The message was just
            // summed anyway.
            p[l4] = 0;
            write16(p, l4 + 2, 0);
            let ck = !fold(ones_sum(&p[l4..v.len], 0));
            write16(p, l4 + 2, ck);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            if v.protocol != PROTO_ICMPV6 || msg[0] != 128 || msg[1] != 0 {
                return LocalReply::NotHandled;
            }
            // Pseudo-header: addresses, upper-layer length, next header.
            let mut sum = ones_sum(&s.octets(), 0);
            sum = ones_sum(&d.octets(), sum);
            sum += (msg.len() as u32) + u32::from(PROTO_ICMPV6);
            if fold(ones_sum(msg, sum)) != 0xffff {
                return LocalReply::NotHandled;
            }
            let (a, b) = p[8..40].split_at_mut(16);
            a.swap_with_slice(b);
            p[7] = 64;
            let ck = checksum_update(read16(p, l4 + 2), 0x8000, 0x8100);
            p[l4] = 129;
            write16(p, l4 + 2, ck);
        }
        _ => return LocalReply::NotHandled,
    }
    LocalReply::Reply(v.len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    fn echo_v4(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 1], 63)
            .icmpv4_echo_request(id, seq)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    #[test]
    fn echo_reply_v4_is_valid_and_addressed_back() {
        let mut p = echo_v4(7, 9, b"hello gateway");
        let v = parse_ip(&p).unwrap();
        assert_eq!(echo_reply_in_place(&mut p, &v), LocalReply::Reply(p.len()));
        let s = SlicedPacket::from_ip(&p).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &s.net else {
            panic!("not v4")
        };
        assert_eq!(ip.header().source(), [100, 96, 0, 1]);
        assert_eq!(ip.header().destination(), [100, 96, 0, 2]);
        assert_eq!(
            ip.header().to_header().calc_header_checksum(),
            ip.header().header_checksum()
        );
        let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!("not icmp")
        };
        assert!(
            matches!(icmp.icmp_type(), etherparse::Icmpv4Type::EchoReply(e) if e.id == 7 && e.seq == 9)
        );
        assert_eq!(fold(ones_sum(&p[20..], 0)), 0xffff, "ICMP checksum valid");
    }

    #[test]
    fn echo_reply_v6_checksum_valid() {
        let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut p = Vec::new();
        PacketBuilder::ipv6(src, dst, 60)
            .icmpv6_echo_request(1, 2)
            .write(&mut p, b"abc")
            .unwrap();
        let v = parse_ip(&p).unwrap();
        assert!(matches!(
            echo_reply_in_place(&mut p, &v),
            LocalReply::Reply(_)
        ));
        let v2 = parse_ip(&p).unwrap();
        assert_eq!(v2.src, IpAddr::from(dst));
        let mut sum = ones_sum(&dst, 0);
        sum = ones_sum(&src, sum);
        sum += (p.len() - 40) as u32 + 58;
        assert_eq!(fold(ones_sum(&p[40..], sum)), 0xffff);
        assert_eq!(p[40], 129);
    }

    /// Found by the `packet` fuzz target: the reply to an echo request with identifier 0, sequence 0 and no
    /// payload got checksum 0x0000 (the incremental update's -0), which receivers reject.
    #[test]
    fn echo_reply_to_an_all_zero_request_has_a_valid_checksum() {
        let mut p = echo_v4(0, 0, b"");
        let v = parse_ip(&p).unwrap();
        assert_eq!(echo_reply_in_place(&mut p, &v), LocalReply::Reply(p.len()));
        assert_eq!(&p[20..], &[0, 0, 0xff, 0xff, 0, 0, 0, 0]);
        assert_eq!(fold(ones_sum(&p[20..], 0)), 0xffff, "ICMP checksum valid");
    }

    #[test]
    fn corrupted_echo_request_is_not_answered() {
        let mut p = echo_v4(1, 1, b"x");
        let last = p.len() - 1;
        p[last] ^= 0xff;
        let v = parse_ip(&p).unwrap();
        assert_eq!(echo_reply_in_place(&mut p, &v), LocalReply::NotHandled);
    }

    #[test]
    fn truncated_and_garbage_are_malformed() {
        let p = echo_v4(1, 1, b"payload");
        assert_eq!(parse_ip(&p[..10]), Err(PacketError::Malformed));
        assert_eq!(parse_ip(&p[..p.len() - 1]), Err(PacketError::Malformed));
        assert_eq!(parse_ip(&[0x50; 40]), Err(PacketError::Malformed));
        assert_eq!(parse_ip(&[]), Err(PacketError::Malformed));
    }

    proptest! {
        #[test]
        fn ttl_decrement_keeps_header_checksum_valid(ttl in 2u8.., src in any::<[u8;4]>(), dst in any::<[u8;4]>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut p = Vec::new();
            PacketBuilder::ipv4(src, dst, ttl).udp(1, 2).write(&mut p, &payload).unwrap();
            let v = parse_ip(&p).unwrap();
            prop_assert_eq!(decrement_ttl(&mut p, &v), Hop::Forward);
            let h = etherparse::Ipv4HeaderSlice::from_slice(&p).unwrap();
            prop_assert_eq!(h.ttl(), ttl - 1);
            prop_assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut data = data;
            if let Ok(v) = parse_ip(&data) {
                let _ = echo_reply_in_place(&mut data, &v);
            }
        }
    }

    fn tcp_syn(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 3], 64)
            .tcp(40000, 22, 1000, 64000)
            .syn()
            .write(&mut out, payload)
            .unwrap();
        out
    }

    #[test]
    fn transport_fields_of_tcp_udp_icmp() {
        let p = tcp_syn(b"");
        let v = parse_ip(&p).unwrap();
        let t = parse_transport(&p, &v).unwrap();
        assert_eq!(
            (t.sport, t.dport, t.tcp_seq, t.tcp_seg_len),
            (40000, 22, 1000, 1)
        );
        assert_ne!(t.tcp_flags & TCP_SYN, 0);
        let p = echo_v4(77, 1, b"x");
        let t = parse_transport(&p, &parse_ip(&p).unwrap()).unwrap();
        assert_eq!((t.sport, t.dport), (77, 77));
        let mut p = tcp_syn(b"");
        p[20 + 12] = 0xf0; // data offset beyond the packet
        assert_eq!(
            parse_transport(&p, &parse_ip(&p).unwrap()),
            Err(PacketError::Malformed)
        );
    }

    #[test]
    fn rst_for_a_syn_is_a_valid_tcp_packet() {
        let mut out = [0u8; 128];
        let n = build_tcp_rst(
            ip("100.96.0.3"),
            22,
            ip("100.96.0.2"),
            40000,
            0,
            Some(1001),
            &mut out,
        )
        .unwrap();
        let s = SlicedPacket::from_ip(&out[..n]).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = &s.transport else {
            panic!("not tcp")
        };
        assert!(tcp.rst() && tcp.ack());
        assert_eq!(tcp.acknowledgment_number(), 1001);
        assert_eq!(
            tcp.calc_checksum_ipv4([100, 96, 0, 3], [100, 96, 0, 2])
                .unwrap(),
            tcp.checksum()
        );
    }

    #[test]
    fn unreachable_quotes_the_original_and_checksums() {
        let orig = tcp_syn(b"0123456789");
        let v = parse_ip(&orig).unwrap();
        let mut out = [0u8; 256];
        let n = build_unreachable(
            &orig,
            &v,
            ip("100.96.0.1"),
            Unreachable::Prohibited,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let s = SlicedPacket::from_ip(&out[..n]).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = &s.transport else {
            panic!("not icmp")
        };
        assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 13));
        assert_eq!(fold(ones_sum(&out[20..n], 0)), 0xffff);
        assert_eq!(&out[28..n], &orig[..28]);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttl_one_expires() {
        let mut p = echo_v4(1, 1, b"");
        p[8] = 1;
        let v = parse_ip(&p).unwrap();
        assert_eq!(decrement_ttl(&mut p, &v), Hop::Expired);
    }
}
