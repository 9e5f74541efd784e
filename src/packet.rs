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
    /// True for an IPv4 fragment other than a whole datagram.
    pub fragment: bool,
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

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
            Ok(IpView {
                src: IpAddr::from(src),
                dst: IpAddr::from(dst),
                protocol: p[6],
                l4_offset: 40,
                len,
                fragment: false,
            })
        }
        _ => Err(PacketError::Malformed),
    }
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

/// Outcome of forwarding one hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Forward,
    /// TTL / hop limit reached zero.
    Expired,
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
            let ck = checksum_update(read16(p, l4 + 2), 0x0800, 0x0000);
            p[l4] = 0;
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

    #[test]
    fn ttl_one_expires() {
        let mut p = echo_v4(1, 1, b"");
        p[8] = 1;
        let v = parse_ip(&p).unwrap();
        assert_eq!(decrement_ttl(&mut p, &v), Hop::Expired);
    }
}
