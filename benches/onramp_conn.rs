//! The connected (SEQPACKET) on-ramp next to WireGuard, in the core: the cost per 1,400-byte UDP packet of
//! (a) WireGuard device A -> device B (decrypt, route, encrypt), (b) an on-ramp connection -> device B (route,
//! encrypt), (c) device B -> the connection (decrypt, route, queue for the socket).
//!
//! `cargo bench --bench onramp_conn` (release profile). Sans-IO like `benches/peers.rs`: the gateway core is
//! driven directly, so the numbers leave out the sockets (one `recvmmsg`/`sendmmsg` per batch for WireGuard,
//! one `recv`/`send` per packet for a connection). Results: docs/benchmarks.md.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use rampart::config::{Config, DeviceName, TenantId, UserName};
use rampart::core::conn::ConnGrant;
use rampart::core::{tx::BUF_SIZE, Gateway, Metrics, TxQueue};
use rampart::keys::PrivateKey;

const ROUNDS: usize = 9;
const PACKETS: usize = 20_000;
const PAYLOAD: usize = 1_372; // 1,400-byte IPv4/UDP packets

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let len = 28 + PAYLOAD;
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for c in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    p
}

struct Dev {
    tunn: Tunn,
    from: SocketAddr,
}

fn connect(gw: &mut Gateway, gw_key: &PrivateKey, key: &PrivateKey, i: u8) -> Dev {
    let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, i)), 40_000);
    let mut tunn = Tunn::new(
        key.to_x25519(),
        gw_key.public_key().to_x25519(),
        None,
        None,
        u32::from(i),
        None,
    );
    let (mut out, mut back, mut scratch) =
        (vec![0; BUF_SIZE], vec![0; BUF_SIZE], vec![0; BUF_SIZE]);
    let mut tx = TxQueue::new();
    let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut out, false) else {
        panic!("initiation")
    };
    gw.handle_datagram(Instant::now(), from, init, &mut scratch, &mut tx);
    let response = tx.iter().next().expect("response").1.to_vec();
    tx.clear();
    let TunnResult::WriteToNetwork(ka) = tunn.decapsulate(None, &response, &mut back) else {
        panic!("handshake")
    };
    gw.handle_datagram(Instant::now(), from, ka, &mut scratch, &mut tx);
    Dev { tunn, from }
}

/// `n` datagrams of `pkt` encrypted by `dev`.
fn encrypt(dev: &mut Dev, pkt: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; BUF_SIZE];
    (0..n)
        .map(|_| match dev.tunn.encapsulate(pkt, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            r => panic!("encapsulate: {r:?}"),
        })
        .collect()
}

fn main() {
    let (ka, kb, gw_key) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let text = format!(
        "[gateway]\nlisten = \"198.18.0.1:51820\"\nstate_dir = \"/nonexistent\"\n\
         [[tenant]]\nid = \"acme\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n\
         [[tenant.rule]]\nid = \"all\"\naction = \"allow\"\n\
         [[tenant.device]]\nname = \"a\"\npublic_key = \"{}\"\naddress = \"100.96.0.2\"\nuser = \"a\"\n\
         [[tenant.device]]\nname = \"b\"\npublic_key = \"{}\"\naddress = \"100.96.0.3\"\nuser = \"b\"\n",
        ka.public_key(),
        kb.public_key()
    );
    let cfg = Config::from_toml(&text, Path::new("/bench/gateway.toml")).expect("config");
    let mut gw = Gateway::new(0, &gw_key, Arc::new(Metrics::default()), Instant::now());
    gw.apply(&cfg, Instant::now(), &mut TxQueue::new());
    let mut a = connect(&mut gw, &gw_key, &ka, 2);
    let mut b = connect(&mut gw, &gw_key, &kb, 3);
    let slot = gw
        .open_conn(
            Instant::now(),
            ConnGrant {
                tenant: TenantId::parse("acme").unwrap(),
                prefixes: vec!["10.7.0.0/16".parse().unwrap()],
                name: DeviceName::onramp_subject("bench", None, None),
                user: UserName::parse("onramp:bench").unwrap(),
                groups: Vec::new(),
                mtu: None,
            },
        )
        .expect("conn");
    let (dev_a, dev_b, site) = (
        Ipv4Addr::new(100, 96, 0, 2),
        Ipv4Addr::new(100, 96, 0, 3),
        Ipv4Addr::new(10, 7, 0, 5),
    );
    let mut scratch = vec![0u8; BUF_SIZE];
    let mut tx = TxQueue::new();
    let (mut wg_wg, mut conn_wg, mut wg_conn) = (Vec::new(), Vec::new(), Vec::new());
    let conn_pkt = udp(site, dev_b);
    let mut buf = conn_pkt.clone();
    for _ in 0..ROUNDS {
        // (a) device A -> device B.
        let dgs = encrypt(&mut a, &udp(dev_a, dev_b), PACKETS);
        let t = Instant::now();
        for (i, d) in dgs.iter().enumerate() {
            gw.handle_datagram(Instant::now(), a.from, d, &mut scratch, &mut tx);
            if i % 128 == 127 {
                tx.clear();
            }
        }
        wg_wg.push(t.elapsed());
        tx.clear();
        // (b) the connection -> device B.
        let t = Instant::now();
        for i in 0..PACKETS {
            buf.copy_from_slice(&conn_pkt);
            gw.handle_conn_packet(Instant::now(), slot, &mut buf, &mut tx);
            if i % 128 == 127 {
                tx.clear();
            }
        }
        conn_wg.push(t.elapsed());
        tx.clear();
        // (c) device B -> the connection.
        let dgs = encrypt(&mut b, &udp(dev_b, site), PACKETS);
        let t = Instant::now();
        for (i, d) in dgs.iter().enumerate() {
            gw.handle_datagram(Instant::now(), b.from, d, &mut scratch, &mut tx);
            if i % 128 == 127 {
                gw.conn_queue().clear();
            }
        }
        wg_conn.push(t.elapsed());
        assert!(gw.flow_count() >= 2, "flows were set up");
        gw.conn_queue().clear();
        tx.clear();
    }
    let report = |name: &str, v: Vec<Duration>| {
        let per = median(v).as_nanos() as f64 / PACKETS as f64;
        let gbps = (28 + PAYLOAD) as f64 * 8.0 / per;
        println!("{name:<34} {per:>8.0} ns/packet  {gbps:>6.2} Gbit/s of inner packets (one core)");
        per
    };
    let w = report("wireguard A -> wireguard B", wg_wg);
    let c = report("seqpacket conn -> wireguard B", conn_wg);
    let r = report("wireguard B -> seqpacket conn", wg_conn);
    println!(
        "ratios to WireGuard->WireGuard: conn->wg {:.2}, wg->conn {:.2}",
        c / w,
        r / w
    );
}
