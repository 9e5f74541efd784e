//! The independent oracle for packets: etherparse parses and checksums what the gateway parsed or rewrote, so a
//! shared misreading of a header cannot hide a bug.

use etherparse::{
    Icmpv4Slice, Icmpv6Slice, IpNumber, Ipv4Slice, Ipv6Slice, TcpSlice, UdpHeader, UdpSlice,
};

/// Whether every checksum of the IP packet `p` is valid: the IPv4 header checksum, and the TCP, UDP (zero means
/// none over IPv4) or ICMP/ICMPv6 checksum of an unfragmented payload. `None` when etherparse cannot parse the
/// packet (no verdict either way).
pub(crate) fn checksums_ok(p: &[u8]) -> Option<bool> {
    match p.first()? >> 4 {
        4 => {
            let ip = Ipv4Slice::from_slice(p).ok()?;
            let h = ip.header();
            if !ipv4_header_ok(h.slice()) {
                return Some(false);
            }
            if ip.is_payload_fragmented() {
                return Some(true);
            }
            let (src, dst) = (h.source(), h.destination());
            let payload = ip.payload();
            transport_ok(payload.ip_number, payload.payload, |t| match t {
                L4::Tcp(s) => s.calc_checksum_ipv4(src, dst).ok(),
                L4::Udp(u, body) => u.calc_checksum_ipv4_raw(src, dst, body).ok(),
                L4::Icmpv6(_) => None,
            })
        }
        6 => {
            let ip = Ipv6Slice::from_slice(p).ok()?;
            if ip.is_payload_fragmented() {
                return Some(true);
            }
            let h = ip.header();
            let (src, dst) = (h.source(), h.destination());
            let payload = ip.payload();
            transport_ok(payload.ip_number, payload.payload, |t| match t {
                L4::Tcp(s) => s.calc_checksum_ipv6(src, dst).ok(),
                L4::Udp(u, body) => u.calc_checksum_ipv6_raw(src, dst, body).ok(),
                L4::Icmpv6(s) => Some(if s.is_checksum_valid(src, dst) {
                    s.checksum()
                } else {
                    !s.checksum()
                }),
            })
        }
        _ => None,
    }
}

/// Whether an IPv4 header (options included) sums to all ones. Computed over the raw bytes: etherparse's
/// `Ipv4Header` drops the reserved flag bit, so its `calc_header_checksum` cannot judge every header.
pub(crate) fn ipv4_header_ok(header: &[u8]) -> bool {
    etherparse::checksum::Sum16BitWords::new()
        .add_slice(header)
        .ones_complement()
        == 0
}

enum L4<'a> {
    Tcp(&'a TcpSlice<'a>),
    Udp(UdpHeader, &'a [u8]),
    Icmpv6(&'a Icmpv6Slice<'a>),
}

/// Checks the transport checksum with `calc` (which returns what the checksum field should hold).
fn transport_ok(
    proto: IpNumber,
    payload: &[u8],
    calc: impl Fn(L4<'_>) -> Option<u16>,
) -> Option<bool> {
    match proto {
        IpNumber::TCP => {
            let s = TcpSlice::from_slice(payload).ok()?;
            Some(calc(L4::Tcp(&s))? == s.checksum())
        }
        IpNumber::UDP => {
            let s = UdpSlice::from_slice(payload).ok()?;
            if s.checksum() == 0 {
                return Some(true);
            }
            let want = calc(L4::Udp(s.to_header(), s.payload()))?;
            Some(want == s.checksum())
        }
        IpNumber::ICMP => {
            let s = Icmpv4Slice::from_slice(payload).ok()?;
            Some(s.icmp_type().calc_checksum(s.payload()) == s.checksum())
        }
        IpNumber::IPV6_ICMP => {
            let s = Icmpv6Slice::from_slice(payload).ok()?;
            Some(calc(L4::Icmpv6(&s))? == s.checksum())
        }
        _ => Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    #[test]
    fn valid_packets_pass_and_a_flipped_byte_fails() {
        let mut built: Vec<Vec<u8>> = Vec::new();
        let mut p = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 22, 1, 1000)
            .syn()
            .write(&mut p, b"abc")
            .unwrap();
        built.push(p);
        let mut p = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [10, 0, 0, 1], 64)
            .udp(5, 53)
            .write(&mut p, b"query")
            .unwrap();
        built.push(p);
        let mut p = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 1], 64)
            .icmpv4_echo_request(1, 2)
            .write(&mut p, b"ping")
            .unwrap();
        built.push(p);
        let mut p = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .icmpv6_echo_request(1, 2)
            .write(&mut p, b"ping6")
            .unwrap();
        built.push(p);
        for p in built {
            assert_eq!(checksums_ok(&p), Some(true), "{p:?}");
            let mut bad = p.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x10;
            assert_eq!(checksums_ok(&bad), Some(false), "{bad:?}");
        }
        assert_eq!(checksums_ok(&[0x45, 0]), None);
    }
}
