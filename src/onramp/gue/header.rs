//! The GUE header (`draft-ietf-intarea-gue-09`): a zero-copy check of the UDP payload a site sent, and the
//! header the gateway writes in front of packets to a site. Pure: no IO, no allocation.
//!
//! ```text
//! variant 0:  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//!            |0 0|C|  Hlen   | Proto/ctype   |            Flags              |
//!            | extension fields named by Flags, then private data: Hlen words  |
//!            | payload (data message: an IPv4 or IPv6 packet)                  |
//! variant 1: the payload itself, an IPv4 (0100....) or IPv6 (0110....) packet: no GUE header.
//! ```
//! This gateway defines no flags: a header with any flag set is refused (its extension fields would change
//! where private data starts, and misreading them as private data is how a parser gets confused). Linux sends
//! no flags unless `encap-remcsum` is asked for. Control messages (C set) are not for the data path: they
//! are recognized, counted and ignored.

/// The first word of a variant 0 header.
pub const HEADER_LEN: usize = 4;
/// Most bytes of extension fields plus private data (`Hlen` is 5 bits of 32-bit words).
pub const MAX_EXTENSION: usize = 31 * 4;
/// `Proto` of an IPv4 payload (IPIP).
pub const PROTO_IPV4: u8 = 4;
/// `Proto` of an IPv6 payload.
pub const PROTO_IPV6: u8 = 41;

/// A checked GUE datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gue<'a> {
    /// A data message. The inner packet is `datagram[payload..]`; `private` is the private data (empty for
    /// variant 1 and for the headers Linux sends).
    Data {
        variant: u8,
        proto: u8,
        private: &'a [u8],
        payload: usize,
    },
    /// A control message (variant 0 with C set), of this control type.
    Control { ctype: u8 },
}

/// Why a datagram is not a GUE message the gateway takes. Each maps to a drop reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GueError {
    #[error("datagram shorter than its GUE header")]
    Truncated,
    #[error("GUE variant {0} is reserved")]
    Variant(u8),
    #[error("GUE flags {0:#06x} are not supported (send none)")]
    Flags(u16),
    #[error("GUE payload protocol {0} is not IPv4 (4) or IPv6 (41), or does not match the packet")]
    Proto(u8),
}

/// Checks a UDP payload. Borrows it; never reads past what the header says.
pub fn parse(d: &[u8]) -> Result<Gue<'_>, GueError> {
    let Some(&first) = d.first() else {
        return Err(GueError::Truncated);
    };
    match first >> 6 {
        0 => {}
        1 => {
            // Variant 1: the first bits are those of the IP version nibble; only 4 and 6 are packets.
            let proto = match first >> 4 {
                4 => PROTO_IPV4,
                6 => PROTO_IPV6,
                v => return Err(GueError::Proto(v)),
            };
            return Ok(Gue::Data {
                variant: 1,
                proto,
                private: &[],
                payload: 0,
            });
        }
        v => return Err(GueError::Variant(v)),
    }
    if d.len() < HEADER_LEN {
        return Err(GueError::Truncated);
    }
    let control = first & 0x20 != 0;
    let hlen = usize::from(first & 0x1f) * 4;
    let proto = d[1];
    let flags = u16::from_be_bytes([d[2], d[3]]);
    let payload = HEADER_LEN + hlen;
    if d.len() < payload {
        return Err(GueError::Truncated);
    }
    if flags != 0 {
        return Err(GueError::Flags(flags));
    }
    if control {
        return Ok(Gue::Control { ctype: proto });
    }
    let version = match proto {
        PROTO_IPV4 => 4,
        PROTO_IPV6 => 6,
        p => return Err(GueError::Proto(p)),
    };
    match d.get(payload) {
        None => return Err(GueError::Truncated),
        Some(b) if b >> 4 != version => return Err(GueError::Proto(proto)),
        Some(_) => {}
    }
    Ok(Gue::Data {
        variant: 0,
        proto,
        private: &d[HEADER_LEN..payload],
        payload,
    })
}

/// The `Proto` value of an inner packet, by its version nibble.
pub fn proto_of(inner: &[u8]) -> Option<u8> {
    match inner.first()? >> 4 {
        4 => Some(PROTO_IPV4),
        6 => Some(PROTO_IPV6),
        _ => None,
    }
}

/// The first word of a variant 0 data header for `private_len` bytes of private data (a multiple of 4, at
/// most [`MAX_EXTENSION`]; `None` otherwise).
pub fn data_header(proto: u8, private_len: usize) -> Option<[u8; HEADER_LEN]> {
    if !private_len.is_multiple_of(4) || private_len > MAX_EXTENSION {
        return None;
    }
    Some([(private_len / 4) as u8, proto, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V4: [u8; 20] = [
        0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 7, 0, 2, 10, 0, 0, 1,
    ];

    fn with(h: [u8; 4], private: &[u8], inner: &[u8]) -> Vec<u8> {
        [&h[..], private, inner].concat()
    }

    #[test]
    fn what_linux_sends_is_variant_0_without_private_data() {
        // Captured from a Debian kernel's `encap gue` tunnel (design note §2): 00 04 00 00, then IPv4.
        let d = with([0, 4, 0, 0], &[], &V4);
        assert_eq!(
            parse(&d),
            Ok(Gue::Data {
                variant: 0,
                proto: 4,
                private: &[],
                payload: 4
            })
        );
    }

    #[test]
    fn private_data_is_hlen_words() {
        let d = with([2, 4, 0, 0], &[1, 2, 3, 4, 5, 6, 7, 8], &V4);
        let Ok(Gue::Data {
            private, payload, ..
        }) = parse(&d)
        else {
            panic!("{:?}", parse(&d));
        };
        assert_eq!((private, payload), (&[1, 2, 3, 4, 5, 6, 7, 8][..], 12));
        // Hlen beyond the datagram.
        assert_eq!(parse(&[3, 4, 0, 0, 0, 0]), Err(GueError::Truncated));
        // Header only, no packet.
        assert_eq!(parse(&[0, 4, 0, 0]), Err(GueError::Truncated));
        assert_eq!(parse(&[0, 4, 0]), Err(GueError::Truncated));
        assert_eq!(parse(&[]), Err(GueError::Truncated));
    }

    #[test]
    fn variant_1_is_the_packet_itself() {
        assert_eq!(
            parse(&V4),
            Ok(Gue::Data {
                variant: 1,
                proto: 4,
                private: &[],
                payload: 0
            })
        );
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        assert!(matches!(parse(&v6), Ok(Gue::Data { proto: 41, .. })));
        // 0101 and 0111 start variant 1 but are not IP versions.
        assert_eq!(parse(&[0x50, 0, 0, 0]), Err(GueError::Proto(5)));
        assert_eq!(parse(&[0x70, 0, 0, 0]), Err(GueError::Proto(7)));
        // Variants 2 and 3 are reserved.
        assert_eq!(parse(&[0x80, 4, 0, 0, 0x45]), Err(GueError::Variant(2)));
        assert_eq!(parse(&[0xc0, 4, 0, 0, 0x45]), Err(GueError::Variant(3)));
    }

    #[test]
    fn flags_and_foreign_protocols_are_refused_control_is_recognized() {
        // Linux with encap-remcsum: the private-flags flag (and its field) is set.
        let d = with([2, 4, 0, 1], &[0x80, 0, 0, 0, 0, 0, 0, 0], &V4);
        assert_eq!(parse(&d), Err(GueError::Flags(1)));
        assert_eq!(
            parse(&with([0, 4, 0x80, 0], &[], &V4)),
            Err(GueError::Flags(0x8000))
        );
        // GRE (47) or UDP (17) payloads are not taken.
        assert_eq!(
            parse(&with([0, 47, 0, 0], &[], &V4)),
            Err(GueError::Proto(47))
        );
        // Proto says IPv6, the packet is IPv4.
        assert_eq!(
            parse(&with([0, 41, 0, 0], &[], &V4)),
            Err(GueError::Proto(41))
        );
        // Control: C bit, ctype in the proto byte, any payload.
        assert_eq!(parse(&[0x20, 9, 0, 0, 1, 2]), Ok(Gue::Control { ctype: 9 }));
        assert_eq!(parse(&[0x21, 9, 0, 0]), Err(GueError::Truncated));
    }

    #[test]
    fn data_header_round_trips() {
        let h = data_header(PROTO_IPV6, 8).unwrap();
        assert_eq!(h, [2, 41, 0, 0]);
        assert_eq!(data_header(4, 3), None);
        assert_eq!(data_header(4, 128), None);
        assert_eq!(proto_of(&V4), Some(4));
        assert_eq!(proto_of(&[0x10]), None);
    }

    proptest! {
        /// Any bytes: parse never panics, and what it accepts lies inside the datagram, with private data
        /// exactly the Hlen words after the header and a payload of the announced version.
        #[test]
        fn parse_stays_inside_the_datagram(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            match parse(&d) {
                Ok(Gue::Data { variant, proto, private, payload }) => {
                    prop_assert!(payload < d.len());
                    prop_assert_eq!(proto_of(&d[payload..]), Some(proto));
                    if variant == 0 {
                        prop_assert_eq!(private.len(), usize::from(d[0] & 0x1f) * 4);
                        prop_assert_eq!(payload, HEADER_LEN + private.len());
                        prop_assert_eq!(&d[2..4], &[0, 0]);
                    } else {
                        prop_assert!(private.is_empty() && payload == 0);
                    }
                }
                Ok(Gue::Control { .. }) => prop_assert_eq!(d[0] >> 5, 1),
                Err(_) => {}
            }
        }

        /// What the gateway writes parses back to the same protocol, private data and payload.
        #[test]
        fn emitted_headers_parse_back(words in 0usize..=31, v6 in any::<bool>(), fill in any::<u8>()) {
            let proto = if v6 { PROTO_IPV6 } else { PROTO_IPV4 };
            let private = vec![fill; words * 4];
            let mut inner = V4.to_vec();
            if v6 { inner[0] = 0x60; }
            let d = with(data_header(proto, private.len()).unwrap(), &private, &inner);
            prop_assert_eq!(parse(&d), Ok(Gue::Data { variant: 0, proto, private: &private[..], payload: 4 + words * 4 }));
        }
    }
}
