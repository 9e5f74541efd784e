//! How the generated part of the seed corpus was made: `RAMPART_WRITE_SEEDS=1 cargo test --lib
//! fuzzing::seeds -- --ignored` rewrites `fuzz/corpus/<target>/seed-*`. Captured seeds (`real-*`: ClientHellos
//! of openssl and curl) and the ssh-log-cli vectors (`vector-*`) are committed as they are; minimized finds of
//! fuzz runs are `run-*`, regression inputs of fixed crashes `crash-*`.
//!
//! Each seed is laid out the way its target's [`Input`](super::Input) reads it, so the fuzzer starts from
//! scenarios that reach deep: established flows, upgraded connections, decrypted TLS, sealed captures.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use boringtun::noise::{Tunn, TunnResult};
use etherparse::{PacketBuilder, TcpOptionElement};

use super::gateway::{config_text, fixed_key};
use crate::core::PeerStatus;
use crate::netns::proto::{
    ListenerInfo, ListenerKind, Message, Ready, ReqId, TunInfo, TunRole, PROTO_VERSION,
};

/// Named seeds of one target.
type Seeds = Vec<(String, Vec<u8>)>;

/// Writes bytes the way [`Input`](super::Input) reads them.
#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn short(&mut self, b: &[u8]) -> &mut Self {
        self.u8(b.len() as u8).raw(b)
    }
    fn chunk(&mut self, b: &[u8]) -> &mut Self {
        self.u16(b.len() as u16).raw(b)
    }
    /// A port from the table (`PORTS[i]`) in `packet::port`'s encoding.
    fn port(&mut self, i: u8) -> &mut Self {
        self.u8(i << 1)
    }
    /// `packet::build`'s encoding: kind, ttl, sport, dport (table indexes), flags, seq, ack, options, payload.
    #[allow(clippy::too_many_arguments)]
    fn packet(
        &mut self,
        kind: u8,
        sport: u8,
        dport: u8,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: &[u8],
    ) -> &mut Self {
        self.u8(kind)
            .u8(64)
            .port(sport)
            .port(dport)
            .u8(flags)
            .u32(seq)
            .u32(ack)
            .u8(0)
            .short(payload)
    }
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

// Table indexes (`packet::PORTS`, `gateway::DESTINATIONS`) and `build` kinds and TCP flags.
const P22: u8 = 0;
const P23: u8 = 1;
const P80: u8 = 2;
const P443: u8 = 3;
const P9: u8 = 4;
const P53: u8 = 5;
const P7000: u8 = 6;
const P1024: u8 = 9;
const TCP: u8 = 0;
const TCP_MSS: u8 = 0x10;
const UDP: u8 = 1;
const ECHO: u8 = 2;
const V6_HBH: u8 = 0x80;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const GW: u8 = 0;
const DEV1: u8 = 2;
const OFFLINE_DEV: u8 = 3;
const UPSTREAM_WEB: u8 = 5;
const UPSTREAM_REJECTED: u8 = 7;
const V6_GW: u8 = 8;

fn real_packets() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let linux_syn_opts = [
        TcpOptionElement::MaximumSegmentSize(1460),
        TcpOptionElement::SelectiveAcknowledgementPermitted,
        TcpOptionElement::Timestamp(2_847_561_239, 0),
        TcpOptionElement::Noop,
        TcpOptionElement::WindowScale(7),
    ];
    let mut p = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 3], 64)
        .tcp(48_214, 22, 3_512_334_871, 64_240)
        .syn()
        .options(&linux_syn_opts)
        .expect("options fit")
        .write(&mut p, &[])
        .expect("builds");
    out.push(("tcp-syn-linux", p));
    let mut p = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 3], [100, 96, 0, 2], 64)
        .tcp(22, 48_214, 91_002, 65_160)
        .syn()
        .ack(3_512_334_872)
        .options(&linux_syn_opts)
        .expect("options fit")
        .write(&mut p, &[])
        .expect("builds");
    out.push(("tcp-synack", p));
    let mut p = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 2], [10, 20, 0, 5], 64)
        .tcp(48_216, 80, 7, 502)
        .ack(1)
        .psh()
        .write(&mut p, b"GET / HTTP/1.1\r\nHost: intranet.example\r\n\r\n")
        .expect("builds");
    out.push(("tcp-http-get", p));
    let mut p = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 3], 64)
        .tcp(48_214, 22, 9, 502)
        .fin()
        .ack(77)
        .write(&mut p, &[])
        .expect("builds");
    out.push(("tcp-fin", p));
    let mut p = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 1], 64)
        .udp(53_001, 53)
        .write(&mut p, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01")
        .expect("builds");
    out.push(("udp-dns", p));
    let mut p = Vec::new();
    let ping: Vec<u8> = (0u8..56).collect();
    PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 1], 64)
        .icmpv4_echo_request(0x1c2b, 1)
        .write(&mut p, &ping)
        .expect("builds");
    out.push(("icmp-echo-linux", p));
    let (s6, d6) = (
        "fd00::2"
            .parse::<std::net::Ipv6Addr>()
            .expect("literal")
            .octets(),
        "fd00::1"
            .parse::<std::net::Ipv6Addr>()
            .expect("literal")
            .octets(),
    );
    let mut p = Vec::new();
    PacketBuilder::ipv6(s6, d6, 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut p, &ping)
        .expect("builds");
    out.push(("icmpv6-echo", p));
    let mut p = Vec::new();
    PacketBuilder::ipv6(s6, d6, 64)
        .tcp(40_000, 23, 1, 64_800)
        .syn()
        .write(&mut p, &[])
        .expect("builds");
    out.push(("ipv6-tcp-syn", p.clone()));
    let next = p[6];
    p[6] = 0;
    p[5] += 8;
    p.splice(40..40, [next, 0, 1, 4, 0, 0, 0, 0]);
    out.push(("ipv6-hop-by-hop-tcp", p));
    let mut p = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 3], 64)
        .udp(5000, 9)
        .write(&mut p, &[7; 64])
        .expect("builds");
    let mut frag = p.clone();
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&frag).expect("parses");
    h.more_fragments = true;
    h.header_checksum = h.calc_header_checksum();
    frag[..20].copy_from_slice(&h.to_bytes());
    out.push(("udp-first-fragment", frag));
    out.push(("udp-discard", p.clone()));
    p.truncate(24);
    p[2..4].copy_from_slice(&24u16.to_be_bytes());
    out.push(("udp-truncated", p));
    out
}

fn packet_seeds() -> Seeds {
    let mut e = Enc::default();
    let mut out: Vec<(String, Vec<u8>)> = real_packets()
        .into_iter()
        .map(|(n, p)| {
            let seed = e
                .u8(0)
                .u8(1)
                .u32(1000)
                .u32(2000)
                .u8(1)
                .u8(4)
                .u16(0x4000)
                .raw(&p)
                .take();
            (n.to_string(), seed)
        })
        .collect();
    for (name, kind, flags) in [
        ("built-syn-mss", TCP | TCP_MSS, SYN),
        ("built-udp", UDP, 0),
        ("built-echo", ECHO, 0),
        ("built-v6-hbh-tcp", TCP | V6_HBH, SYN | ACK),
    ] {
        let v6 = kind & V6_HBH != 0;
        e.u8(1)
            .u8(0)
            .u32(5)
            .u32(6)
            .u8(0)
            .u8(3)
            .u16(1)
            .u8(u8::from(v6));
        if v6 {
            e.raw(&[0xfd; 16]).raw(&[0xfe; 16]);
        } else {
            e.u32(0x6460_0002).u32(0x0a14_0005);
        }
        out.push((
            name.to_string(),
            e.packet(kind, P1024, P443, flags, 1, 2, b"payload").take(),
        ));
    }
    out
}

fn nat_seeds() -> Seeds {
    let mut e = Enc::default();
    // Pool of 2 hosts x 3 ports; claim, traffic both ways, release, claim in quarantine, time, claim again.
    e.u8(1).u8(2);
    for k in [0u8, 2, 4] {
        e.u8(0).u8(k);
    }
    e.u8(3)
        .u8(0)
        .short(b"syn")
        .u32(1)
        .u8(1)
        .short(b"")
        .u32(9)
        .u8(3);
    e.u8(1).u8(0).u8(0).u8(0x20);
    e.u8(2).u16(20_000).u8(0).u8(0x20);
    e.u8(4)
        .u8(2)
        .u8(6)
        .u8(2)
        .u8(0)
        .short(b"")
        .u32(5)
        .u8(1)
        .short(b"ok")
        .u32(6)
        .u8(2);
    let ops = e.take();
    let mut e2 = Enc::default();
    e2.u8(0).u8(0);
    e2.u8(7)
        .u32(0x6440_0001)
        .u16(1024)
        .u32(0x6442_0001)
        .u16(7000)
        .u8(0)
        .u32(0x6460_0002)
        .u32(0x0a14_0005);
    e2.packet(TCP | TCP_MSS, P1024, P80, SYN, 1, 0, b"");
    e2.u8(8)
        .u16(1380)
        .u8(0)
        .u32(0x6460_0002)
        .u32(0x0a14_0005)
        .packet(TCP | TCP_MSS, P1024, P80, SYN, 1, 0, b"");
    vec![
        ("claim-traffic-release".into(), ops),
        ("rewrite-and-clamp".into(), e2.take()),
    ]
}

pub(super) fn core_seeds() -> Seeds {
    let mut out = Vec::new();
    let mut e = Enc::default();
    // dev0 pings the gateway (v4 and v6 from the wrong family, refused), then the gateway address on UDP.
    e.u8(0)
        .u8(0)
        .u8(GW)
        .packet(ECHO, P22, P23, 0, 0, 0, b"ping");
    e.u8(0)
        .u8(0)
        .u8(V6_GW)
        .packet(ECHO, P22, P23, 0, 0, 0, b"ping6");
    e.u8(1)
        .u8(0)
        .u8(GW)
        .packet(UDP, P1024, P53, 0, 0, 0, b"dns?");
    out.push(("ping-gateway".into(), e.take()));
    // dev0 <-> dev1 TCP: handshake, data, FIN both ways; then deny (23) and reject (UDP 9) and an offline device.
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P443, SYN, 100, 0, b"");
    e.u8(0)
        .u8(1)
        .u8(1)
        .packet(TCP, P443, P1024, SYN | ACK, 500, 101, b"");
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P443, ACK | PSH, 101, 501, b"hello");
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P443, ACK | FIN, 106, 501, b"");
    e.u8(0)
        .u8(1)
        .u8(1)
        .packet(TCP, P443, P1024, ACK | FIN, 501, 107, b"");
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P23, SYN, 1, 0, b"");
    e.u8(1)
        .u8(1)
        .u8(1)
        .packet(UDP, P1024, P9, 0, 0, 0, b"discard me");
    e.u8(2)
        .u8(0)
        .u8(OFFLINE_DEV)
        .packet(TCP, P1024, P443, SYN, 1, 0, b"");
    out.push(("device-to-device".into(), e.take()));
    // dev0 -> upstream web (inspect_http: upgraded), the namespace answers, time passes, a reload cuts it.
    e.u8(0)
        .u8(0)
        .u8(UPSTREAM_WEB)
        .packet(TCP | TCP_MSS, P1024, P80, SYN, 7, 0, b"");
    e.u8(4)
        .u8(0)
        .u8(1)
        .packet(TCP, P80, P1024, SYN | ACK, 900, 8, b"");
    e.u8(0).u8(0).u8(UPSTREAM_WEB).packet(
        TCP,
        P1024,
        P80,
        ACK | PSH,
        8,
        901,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    e.u8(4)
        .u8(0)
        .u8(0)
        .chunk(b"\x45\x00\x00\x14garbage-from-namespace");
    e.u8(6).u16(100);
    e.u8(7).u8(1);
    e.u8(0)
        .u8(0)
        .u8(UPSTREAM_WEB)
        .packet(TCP, P1024, P80, ACK, 26, 901, b"");
    out.push(("upstream-upgrade-reload".into(), e.take()));
    // dev0 -> dev1:22 (inspect_ssh between devices: upgraded and downgraded), the proxy's SYN reaches dev1.
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P22, SYN, 1, 0, b"");
    e.u8(5)
        .u8(0)
        .u8(0)
        .packet(TCP | TCP_MSS, P1024, P22, SYN, 40, 0, b"");
    e.u8(0)
        .u8(1)
        .u8(1)
        .packet(TCP, P22, P1024, SYN | ACK, 70, 41, b"");
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P7000, SYN, 1, 0, b"");
    out.push(("device-splice".into(), e.take()));
    // globex devices: https between them, and UDP upstream; then the audit trail refuses new flows.
    e.u8(0)
        .u8(2)
        .u8(DEV1)
        .packet(TCP, P1024, P443, SYN, 1, 0, b"");
    e.u8(0)
        .u8(2)
        .u8(UPSTREAM_WEB)
        .packet(UDP, P1024, P53, 0, 0, 0, b"q");
    e.u8(0)
        .u8(2)
        .u8(UPSTREAM_REJECTED)
        .packet(TCP, P1024, P80, SYN, 1, 0, b"");
    e.u8(7 | 0x10);
    e.u8(0)
        .u8(3)
        .u8(GW)
        .packet(ECHO, P22, P23, 0, 0, 0, b"late");
    out.push(("globex-and-fail-closed".into(), e.take()));
    // Spoofed source, raw IPv6 with a Hop-by-Hop header, a reload that moves a device, a removed device.
    e.u8(0x80)
        .u8(0)
        .u8(OFFLINE_DEV)
        .u8(DEV1)
        .packet(TCP, P1024, P443, SYN, 1, 0, b"");
    e.u8(3).u8(0).chunk(&real_packets()[8].1);
    e.u8(7).u8(3);
    e.u8(0)
        .u8(0)
        .u8(DEV1)
        .packet(TCP, P1024, P443, SYN, 1, 0, b"");
    out.push(("spoof-v6-move".into(), e.take()));
    out
}

/// A real handshake initiation of device 0 (the gateway's fixed key), and a real data packet after it.
fn datagram_seeds() -> Seeds {
    let mut out = Vec::new();
    let mut t = Tunn::new(
        fixed_key(1).to_x25519(),
        fixed_key(0).public_key().to_x25519(),
        None,
        None,
        1 << 12,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = t.format_handshake_initiation(&mut buf, false) else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    let mut e = Enc::default();
    out.push((
        "real-handshake-init".into(),
        e.u8(0).u8(0).chunk(&init).take(),
    ));
    e.u8(3).u8(0).u8(3).u8(1);
    e.u8(4).u8(0).chunk(&real_packets()[5].1);
    e.u8(1).u8(1).short(&real_packets()[5].1).u16(20).u8(0x40);
    e.u8(2).u8(0).chunk(&[9; 40]);
    e.u8(0x81).u8(0).short(b"a").u16(0).u8(1);
    out.push(("handshakes-data-mutations".into(), e.take()));
    out
}

fn endpoints_seeds() -> Seeds {
    let status: Vec<PeerStatus> = (1..4u8)
        .map(|i| PeerStatus {
            tenant: crate::config::TenantId::parse("acme").expect("literal"),
            name: crate::config::DeviceName::parse(&format!("dev{i}")).expect("literal"),
            public_key: fixed_key(i).public_key(),
            endpoint: Some(if i == 2 {
                "[2001:db8::7]:51820".parse().expect("literal")
            } else {
                ([198, 18, 1, i], 40000).into()
            }),
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
        })
        .collect();
    let json = crate::daemon::endpoints_json(&status);
    vec![
        ("saved".into(), json.into_bytes()),
        (
            "unknown-and-bad".into(),
            b"{\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\":\"1.2.3.4:5\",\"x\":\"y\"}"
                .to_vec(),
        ),
    ]
}

fn config_seeds() -> Seeds {
    let mut out = vec![(
        "configs-gateway-toml".to_string(),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gateway.toml"))
            .expect("default config"),
    )];
    for v in 0..5 {
        out.push((format!("harness-variant-{v}"), config_text(v).into_bytes()));
    }
    out.push((
        "http-tenant".into(),
        super::inspect::HTTP_TENANT.as_bytes().to_vec(),
    ));
    let v6 = "[gateway]\nstate_dir = \"/x\"\n[flows]\nmax_flows = 10\n[audit]\non_overflow = \"block_new_flows\"\n\
              [[tenant]]\nid = \"six\"\naddress_pool = \"fd00::/120\"\ngateway_address = \"fd00::1\"\nmax_flows = 2\n\
              [[tenant.rule]]\nid = \"a\"\naction = \"allow\"\ndst = [\"fd00::/64\", \"gateway\"]\nproto = \"any\"\n";
    out.push(("ipv6-tenant".into(), v6.as_bytes().to_vec()));
    out
}

fn registry_seeds() -> Seeds {
    let dev = |n: &str, tenant: &str, key: u8, addr: &str| crate::registry::EnrolledDevice {
        tenant: crate::config::TenantId::parse(tenant).expect("literal"),
        name: crate::config::DeviceName::parse(n).expect("literal"),
        public_key: fixed_key(key).public_key(),
        address: addr.parse().expect("literal"),
        user: crate::config::UserName::parse("bob@example.com").expect("literal"),
        groups: vec!["eng".into()],
        ssh_keys: vec![],
        enrolled_at: 1_700_000_000,
    };
    let ok = crate::registry::render(&[
        dev("phone", "acme", 9, "100.96.0.20"),
        dev("tab", "globex", 10, "100.96.0.21"),
    ]);
    let gone = crate::registry::render(&[dev("old", "initech", 11, "100.96.0.20")]);
    let clash = crate::registry::render(&[dev("dup", "acme", 12, "100.96.0.2")]);
    vec![
        ("two-tenants".into(), ok.expect("renders").into_bytes()),
        ("tenant-gone".into(), gone.expect("renders").into_bytes()),
        ("address-clash".into(), clash.expect("renders").into_bytes()),
    ]
}

fn netns_seeds() -> Seeds {
    let ready = Message::Ready(Ready {
        proto_version: PROTO_VERSION,
        tuns: vec![
            TunInfo {
                role: TunRole::Upgrade,
                name: "up0".into(),
                mtu: 1420,
                addr: Ipv4Addr::new(100, 66, 0, 1),
                routed: "100.64.0.0/16".parse().expect("literal"),
            },
            TunInfo {
                role: TunRole::Downgrade,
                name: "dn0".into(),
                mtu: 1420,
                addr: Ipv4Addr::new(100, 66, 1, 1),
                routed: "100.65.0.0/16".parse().expect("literal"),
            },
        ],
        listeners: vec![
            ListenerInfo {
                kind: ListenerKind::Tcp,
                addr: "100.66.0.1:7000".parse().expect("literal"),
            },
            ListenerInfo {
                kind: ListenerKind::Udp,
                addr: "100.66.0.1:7000".parse().expect("literal"),
            },
        ],
    });
    let msgs = [
        ("ready", ready),
        (
            "setup-failed",
            Message::SetupFailed {
                stage: "open /dev/net/tun".into(),
                errno: Some(13),
                message: "permission denied".into(),
            },
        ),
        (
            "connect",
            Message::Connect {
                req_id: ReqId(7),
                dst: "100.65.1.2:9000".parse().expect("literal"),
                bind_src: Some("100.66.1.1:45000".parse().expect("literal")),
            },
        ),
        (
            "connected-v6",
            Message::Connected {
                req_id: ReqId(u64::MAX),
                local: "[2001:db8::1]:443".parse().expect("literal"),
            },
        ),
        (
            "connect-failed",
            Message::ConnectFailed {
                req_id: ReqId(8),
                errno: 101,
            },
        ),
        ("ping", Message::Ping { seq: 1 }),
        ("shutdown", Message::Shutdown),
    ];
    msgs.into_iter()
        .map(|(n, m)| (n.to_string(), m.encode().expect("encodes")))
        .collect()
}

fn rustls_hellos() -> Seeds {
    use rustls::pki_types::ServerName;
    let mut out = Vec::new();
    for (name, sni, alpn) in [
        (
            "rustls-h2",
            "www.intranet.example",
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        ),
        ("rustls-pinned", "app.pinned.example", vec![]),
        ("rustls-alpn-foo", "bank.example", vec![b"foo".to_vec()]),
    ] {
        let mut cfg = rustls::ClientConfig::builder_with_provider(crate::http::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn;
        let mut c =
            rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from(sni).expect("name"))
                .expect("client");
        let mut hello = Vec::new();
        c.write_tls(&mut hello).expect("hello");
        let mut e = Enc::default();
        out.push((name.to_string(), e.u8(0).u8(0).raw(&hello).take()));
    }
    out
}

fn http_request_seeds() -> Seeds {
    let heads: [(&str, &[u8]); 13] = [
        ("curl-get", b"GET /index.html HTTP/1.1\r\nHost: www.intranet.example\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"),
        ("post-admin", b"POST /public/../admin/users HTTP/1.1\r\nHost: app.intranet.example:8080\r\nContent-Length: 3\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\n\r\n"),
        ("connect", b"CONNECT proxy.example:443 HTTP/1.1\r\nHost: proxy.example:443\r\nProxy-Authorization: Basic eA==\r\n\r\n"),
        ("connect-other", b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n"),
        ("options-star", b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        ("websocket", b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
        ("h2c", b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
        ("absolute-form", b"GET http://Other.Example./%2e%2e/admin?x=1 HTTP/1.1\r\nHost: www.intranet.example\r\n\r\n"),
        ("semicolon", b"GET /public/..;/admin HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        ("encoded-slash", b"GET /%2fadmin HTTP/1.1\r\nHost: a.example\r\nTE: trailers, gzip\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("http10-no-host", b"GET /Admin HTTP/1.0\r\n\r\n"),
        ("http10-upgrade", b"GET /chat HTTP/1.0\r\nHost: ws.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocketVersion: 13\r\n\r\n"),
        ("ipv6-host", b"DELETE /x HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\nKeep-Alive: 5\r\nTrailer: X\r\n\r\n"),
    ];
    let mut out: Vec<(String, Vec<u8>)> = heads
        .iter()
        .map(|(n, h)| (n.to_string(), [&[2u8][..], h].concat()))
        .collect();
    let mut e = Enc::default();
    e.u8(1)
        .short(b"WWW.Intranet.Example.")
        .raw(b"GET / HTTP/1.1\r\n\r\n");
    out.push(("sni-only".into(), e.take()));
    out
}

fn http_path_seeds() -> Seeds {
    [
        ("dots", "/a/./b/../c/"),
        ("double-slash", "//admin//x"),
        ("encoded-dots", "/%2e%2e/%2E%2e/admin"),
        ("encoded-letter", "/%61dmin"),
        ("encoded-slash", "/%2fadmin"),
        ("semicolon", "/public/..;/admin"),
        ("backslash", "/public\\..\\admin"),
        ("query", "/x?y=/admin#frag"),
        ("utf8", "/caf\u{e9}/%C3%A9"),
    ]
    .iter()
    .map(|(n, p)| (n.to_string(), p.as_bytes().to_vec()))
    .collect()
}

fn ssh_line_seeds() -> Seeds {
    let sessions: [(&str, &[u8]); 5] = [
        ("typing", b"ls -la /etc\rcat /etc/hostname\r"),
        (
            "editing",
            b"rm -rf /\x15echo safe\rcat foo bar\x17baz\rlsx\x7f\r",
        ),
        (
            "escapes",
            b"\x1b[A\x1b[B\x1bOAcat /etc/passwd\r\x1b[200~pasted text\x1b[201~\r",
        ),
        ("sudo-password", b"sudo -i\rhunter2\rwhoami\r"),
        ("utf8-erase", b"echo h\xc3\xa9\x7f\x7fllo\r\x03exit\n"),
    ];
    sessions
        .iter()
        .map(|(n, s)| (n.to_string(), [&[3u8, 1, 5, 2][..], s].concat()))
        .collect()
}

fn sftp_packet(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&((body.len() + 5) as u32).to_be_bytes());
    p.push(kind);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(body);
    p
}

fn sftp_string(s: &[u8]) -> Vec<u8> {
    [&(s.len() as u32).to_be_bytes()[..], s].concat()
}

fn sftp_seeds() -> Seeds {
    // draft-02 as OpenSSH's sftp client sends it: INIT (version 3), then requests.
    let mut s = vec![0, 0, 0, 5, 1, 0, 0, 0, 3];
    s.extend(sftp_packet(
        3,
        1,
        &[sftp_string(b"/etc/hosts"), vec![0, 0, 0, 1, 0, 0, 0, 0]].concat(),
    ));
    s.extend(sftp_packet(
        3,
        2,
        &[sftp_string(b"upload.bin"), vec![0, 0, 0, 0x1a, 0, 0, 0, 0]].concat(),
    ));
    s.extend(sftp_packet(11, 3, &sftp_string(b"/var/log")));
    s.extend(sftp_packet(13, 4, &sftp_string(b"old.txt")));
    s.extend(sftp_packet(
        14,
        5,
        &[sftp_string(b"newdir"), vec![0, 0, 0, 0]].concat(),
    ));
    s.extend(sftp_packet(15, 6, &sftp_string(b"newdir")));
    s.extend(sftp_packet(
        18,
        7,
        &[sftp_string(b"a"), sftp_string(b"b")].concat(),
    ));
    s.extend(sftp_packet(
        9,
        8,
        &[sftp_string(b"f"), vec![0, 0, 0, 4, 0, 0, 1, 0xed]].concat(),
    ));
    s.extend(sftp_packet(
        20,
        9,
        &[sftp_string(b"link"), sftp_string(b"target")].concat(),
    ));
    s.extend(sftp_packet(
        200,
        10,
        &[
            sftp_string(b"posix-rename@openssh.com"),
            sftp_string(b"x"),
            sftp_string(b"y"),
        ]
        .concat(),
    ));
    s.extend(sftp_packet(
        200,
        11,
        &[
            sftp_string(b"hardlink@openssh.com"),
            sftp_string(b"x"),
            sftp_string(b"y"),
        ]
        .concat(),
    ));
    let mut split = vec![6u8, 3, 9, 1, 13, 4, 200];
    split.extend_from_slice(&s);
    let mut too_big = vec![0u8];
    too_big.extend_from_slice(&[0, 0x10, 0, 0, 3]);
    vec![
        ("openssh-session".into(), [&[0u8][..], &s].concat()),
        ("openssh-session-split".into(), split),
        ("oversized".into(), too_big),
    ]
}

fn capture_seeds() -> Seeds {
    let mut out = Vec::new();
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/ssh-log-cli");
    for v in [
        "pty_session",
        "exec_nopty",
        "edge_split_records",
        "edge_empty_block",
        "edge_no_exit_zero_len",
        "edge_out_of_order",
        "edge_f32_timing",
        "trailer_error",
        "trailer_core_dumped",
        "trailer_signal_only",
    ] {
        let bytes = std::fs::read(vectors.join(v).join("capture.bin")).expect("ssh-log-cli vector");
        out.push((format!("vector-{v}"), [&[0u8][..], &bytes].concat()));
    }
    let mut e = Enc::default();
    e.u8(1 | 2 | 4).u32(1_700_000_000).u16(64);
    e.u8(0).u32(10).chunk(b"ls\r");
    e.u8(4).u32(20).chunk(b"file1  file2\r\n");
    e.u8(2);
    e.u8(4).u32(5).chunk(&[0x1b, b'[', b'0', b'm']);
    out.push(("sealed-pty".into(), e.take()));
    e.u8(1).u32(1).u16(0);
    e.u8(0).u32(1).chunk(b"x");
    e.u8(3).chunk(&[0, 0, 0, 20, 0]);
    e.u8(3).chunk(b"");
    out.push(("sealed-broken-blocks".into(), e.take()));
    out
}

fn context_seeds() -> Seeds {
    use crate::onramp::context::{Context, MAX_LEN};
    let contexts = [
        (
            "tenant",
            Context {
                tenant: Some("acme"),
                ..Context::default()
            },
        ),
        (
            "device",
            Context {
                tenant: Some("acme"),
                device: Some("warp-7"),
                correlation: Some([7; 16]),
                labels: Some("pop=fra;rack=3"),
                ..Context::default()
            },
        ),
        (
            "gue-keyed",
            Context {
                tenant: Some("acme"),
                site: Some("branch-7"),
                vnet: Some(12),
                key_id: Some(7),
                auth_tag: Some([0xa5; 16]),
                counter: Some(1 << 40),
                ..Context::default()
            },
        ),
    ];
    let mut out: Seeds = contexts
        .iter()
        .map(|(name, c)| {
            let mut b = vec![0u8; MAX_LEN];
            let n = c.emit(&mut b).expect("seed emits");
            b.truncate(n);
            (name.to_string(), b)
        })
        .collect();
    // An optional type the gateway skips, then padding.
    out.push((
        "optional-skipped".into(),
        vec![1, 0, 0, 12, 0x81, 2, 9, 9, 1, 1, b'a', 0],
    ));
    out
}

/// GUE datagrams: what Linux sends, variant 1, private data, a keyed site's sealed packet, flags, control.
fn gue_seeds() -> Seeds {
    use crate::onramp::gue::auth::SiteKey;
    let v4 = vec![
        0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 7, 0, 2, 10, 0, 0, 1,
    ];
    let mut v6 = vec![0u8; 40];
    v6[0] = 0x60;
    let with = |h: &[u8], p: &[u8], i: &[u8]| [h, p, i].concat();
    let key = SiteKey::new(7, &[0x5a; 32]);
    let len = SiteKey::sealed_len();
    let h = crate::onramp::gue::header::data_header(4, len).expect("fits");
    let mut private = vec![0u8; len];
    key.seal(1, &h, &v4, &mut private).expect("seals");
    vec![
        ("linux-v4".into(), with(&[0, 4, 0, 0], &[], &v4)),
        ("linux-v6".into(), with(&[0, 41, 0, 0], &[], &v6)),
        ("variant1".into(), v4.clone()),
        ("private".into(), with(&[1, 4, 0, 0], &[1, 2, 3, 4], &v4)),
        ("keyed".into(), with(&h, &private, &v4)),
        (
            "remcsum-flag".into(),
            with(&[2, 4, 0, 1], &[0x80, 0, 0, 0, 0, 0, 0, 0], &v4),
        ),
        ("control".into(), vec![0x20, 1, 0, 0, 0, 0, 0, 0]),
    ]
}

/// Every generated seed, by target.
fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("packet", packet_seeds()),
        ("nat", nat_seeds()),
        ("core_inner", core_seeds()),
        ("datagram", datagram_seeds()),
        ("endpoints", endpoints_seeds()),
        ("config", config_seeds()),
        ("registry", registry_seeds()),
        ("netns_proto", netns_seeds()),
        ("onramp_context", context_seeds()),
        ("onramp_gue", gue_seeds()),
        ("tls_client_hello", rustls_hellos()),
        ("http_request", http_request_seeds()),
        ("http_path", http_path_seeds()),
        ("ssh_input_line", ssh_line_seeds()),
        ("sftp", sftp_seeds()),
        ("capture", capture_seeds()),
    ]
}

#[test]
#[ignore = "writes fuzz/corpus; run with RAMPART_WRITE_SEEDS=1 after changing a target's input layout"]
fn write_seed_corpus() {
    assert!(
        std::env::var_os("RAMPART_WRITE_SEEDS").is_some(),
        "set RAMPART_WRITE_SEEDS=1 to rewrite the seeds"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, seeds) in all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for e in std::fs::read_dir(&dir).expect("corpus dir") {
            let p = e.expect("entry").path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
            {
                std::fs::remove_file(p).expect("old seed");
            }
        }
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
        }
    }
}

/// The generated seeds are valid inputs of their targets (and the layouts above still match the targets).
#[test]
fn generated_seeds_run() {
    let mut failed = Vec::new();
    for (target, seeds) in all() {
        for (name, bytes) in seeds {
            if std::panic::catch_unwind(|| super::run(target, &bytes)).is_err() {
                failed.push(format!("{target}/{name}"));
            }
        }
    }
    assert!(failed.is_empty(), "seeds that fail: {failed:?}");
}
