//! Deterministic scenario tests: the core driven by real boringtun client peers in memory (no sockets).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use boringtun::noise::{Tunn, TunnResult};
use etherparse::PacketBuilder;
use proptest::prelude::*;

use super::*;
use crate::config::Config;
use crate::keys::PrivateKey;

const GW_UNDERLAY: &str = "198.18.0.1:51820";

/// Policy used by the scenario tests unless a test replaces it: device 1 ("dev1"/"dev3") may not receive UDP
/// on port 9 (rejected) nor TCP on 23 (denied); everything else within the tenant is allowed.
const RULES: &str = r#"
[[tenant.rule]]
id = "no-discard"
action = "reject"
proto = "udp"
ports = ["9"]
[[tenant.rule]]
id = "no-telnet"
action = "deny"
proto = "tcp"
ports = ["23"]
[[tenant.rule]]
id = "all"
action = "allow"
"#;

struct Client {
    tunn: Tunn,
    key: PrivateKey,
    underlay: SocketAddr,
    inner: IpAddr,
    /// Decrypted packets delivered to this device.
    inbox: Vec<Vec<u8>>,
}

struct Net {
    gw_key: PrivateKey,
    gw: Gateway,
    metrics: Arc<Metrics>,
    scratch: Vec<u8>,
    tx: TxQueue,
    clients: Vec<Client>,
    /// Datagrams from the gateway to addresses with no client (lost on the wire).
    lost: usize,
    /// Added to the wall clock for the core's `now` (boringtun keeps its own clock).
    skew: Duration,
}

fn client(gw_key: &PrivateKey, underlay: &str, inner: &str) -> Client {
    let key = PrivateKey::generate();
    let tunn = Tunn::new(
        key.to_x25519(),
        gw_key.public_key().to_x25519(),
        None,
        None,
        rand_index(),
        None,
    );
    Client {
        tunn,
        key,
        underlay: underlay.parse().unwrap(),
        inner: inner.parse().unwrap(),
        inbox: Vec::new(),
    }
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    u32::from_le_bytes(b) >> 8
}

/// Two tenants with identical pools: "acme" (clients 0, 1) and "globex" (clients 2, 3).
fn config_for(clients: &[Client], tenant_of: &[&str]) -> Config {
    let mut text =
        String::from("[gateway]\nlisten = \"198.18.0.1:51820\"\nstate_dir = \"/nonexistent\"\n");
    for t in ["acme", "globex"] {
        text += &format!("[[tenant]]\nid = \"{t}\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n{RULES}");
        for (i, c) in clients.iter().enumerate() {
            if tenant_of[i] == t {
                text += &format!(
                    "[[tenant.device]]\nname = \"dev{i}\"\npublic_key = \"{}\"\naddress = \"{}\"\nuser = \"user{i}\"\n",
                    c.key.public_key(),
                    c.inner
                );
            }
        }
    }
    Config::from_toml(&text, Path::new("/test/gateway.toml")).unwrap()
}

impl Net {
    fn new(specs: &[(&str, &str, &str)]) -> Net {
        let gw_key = PrivateKey::generate();
        let clients: Vec<Client> = specs
            .iter()
            .map(|(_, u, a)| client(&gw_key, u, a))
            .collect();
        let tenants: Vec<&str> = specs.iter().map(|(t, _, _)| *t).collect();
        let metrics = Arc::new(Metrics::default());
        let mut gw = Gateway::new(0, &gw_key, metrics.clone(), Instant::now());
        gw.apply(
            &config_for(&clients, &tenants),
            Instant::now(),
            &mut TxQueue::new(),
        );
        Net {
            gw_key,
            gw,
            metrics,
            scratch: vec![0; tx::BUF_SIZE],
            tx: TxQueue::new(),
            clients,
            lost: 0,
            skew: Duration::ZERO,
        }
    }

    fn now(&self) -> Instant {
        Instant::now() + self.skew
    }

    fn gw_addr() -> SocketAddr {
        GW_UNDERLAY.parse().unwrap()
    }

    /// Feeds one datagram from `from` to the gateway and delivers everything that results until quiet.
    fn deliver(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.gw
            .handle_datagram(self.now(), from, datagram, &mut self.scratch, &mut self.tx);
        self.settle();
    }

    /// Time passes to the core's next deadline (if it asked for one) and the timers due then run.
    fn run_timers(&mut self) {
        let now = self.now();
        if let Some((at, _)) = self.gw.poll_timeout() {
            self.skew += at.saturating_duration_since(now);
        }
        let now = self.now();
        self.gw.handle_timeout(now, &mut self.tx);
    }

    fn settle(&mut self) {
        for _ in 0..64 {
            if self.tx.is_empty() {
                return;
            }
            let out: Vec<(SocketAddr, Vec<u8>)> =
                self.tx.iter().map(|(a, d)| (a, d.to_vec())).collect();
            self.tx.clear();
            for (to, data) in out {
                let Some(ci) = self.clients.iter().position(|c| c.underlay == to) else {
                    self.lost += 1;
                    continue;
                };
                let replies = self.client_receive(ci, &data);
                for r in replies {
                    let from = self.clients[ci].underlay;
                    let now = self.now();
                    self.gw
                        .handle_datagram(now, from, &r, &mut self.scratch, &mut self.tx);
                }
            }
        }
        panic!("traffic did not settle");
    }

    /// The client decrypts a datagram from the gateway; returns datagrams it sends back.
    fn client_receive(&mut self, ci: usize, data: &[u8]) -> Vec<Vec<u8>> {
        let c = &mut self.clients[ci];
        let mut buf = vec![0u8; tx::BUF_SIZE];
        let mut replies = Vec::new();
        match c
            .tunn
            .decapsulate(Some(Net::gw_addr().ip()), data, &mut buf)
        {
            TunnResult::WriteToNetwork(out) => {
                replies.push(out.to_vec());
                while let TunnResult::WriteToNetwork(out) = c.tunn.decapsulate(None, &[], &mut buf)
                {
                    replies.push(out.to_vec());
                }
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                c.inbox.push(p.to_vec())
            }
            _ => {}
        }
        replies
    }

    fn handshake(&mut self, ci: usize) {
        let mut buf = vec![0u8; 256];
        let init = match self.clients[ci]
            .tunn
            .format_handshake_initiation(&mut buf, false)
        {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("no initiation: {r:?}"),
        };
        let from = self.clients[ci].underlay;
        self.deliver(from, &init);
        assert!(
            self.clients[ci].tunn.time_since_last_handshake().is_some(),
            "client {ci} has no session"
        );
    }

    /// The client encrypts an inner packet and sends it.
    fn send(&mut self, ci: usize, inner: &[u8]) {
        let mut buf = vec![0u8; tx::BUF_SIZE];
        let dg = match self.clients[ci].tunn.encapsulate(inner, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("encapsulate: {r:?}"),
        };
        let from = self.clients[ci].underlay;
        self.deliver(from, &dg);
    }

    fn tenant(&self, id: &str) -> Arc<TrafficCounters> {
        self.metrics.tenant(&TenantId::parse(id).unwrap())
    }
}

fn udp(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .udp(4000, 5000)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn ping(src: IpAddr, dst: IpAddr, seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .icmpv4_echo_request(1, seq)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn two_tenants() -> Net {
    Net::new(&[
        ("acme", "198.18.1.2:40000", "100.96.0.2"),
        ("acme", "198.18.1.3:40000", "100.96.0.3"),
        ("globex", "198.18.2.2:40000", "100.96.0.2"),
        ("globex", "198.18.2.3:40000", "100.96.0.3"),
    ])
}

#[test]
fn device_handshakes_and_gateway_answers_ping() {
    let mut net = two_tenants();
    net.handshake(0);
    net.send(0, &ping(ip("100.96.0.2"), ip("100.96.0.1"), 7));
    let reply = net.clients[0].inbox.pop().expect("echo reply");
    let v = packet::parse_ip(&reply).unwrap();
    assert_eq!((v.src, v.dst), (ip("100.96.0.1"), ip("100.96.0.2")));
    assert_eq!(reply[20], 0, "ICMP echo reply type");
    assert_eq!(net.tenant("acme").handshakes.get(), 1);
    assert_eq!(net.tenant("acme").rx_packets.get(), 1);
    net.gw.shutdown(Instant::now());
    let ends: Vec<_> = events(&mut net)
        .into_iter()
        .filter_map(|e| {
            if let FlowEvent::End { packets, .. } = e {
                Some(packets)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        ends,
        vec![[1, 1]],
        "the gateway's reply is counted as the flow's reply direction"
    );
}

#[test]
fn same_tenant_devices_relay_with_ttl_decremented() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let pkt = udp(ip("100.96.0.2"), ip("100.96.0.3"), b"hello b");
    net.send(0, &pkt);
    let got = net.clients[1].inbox.pop().expect("relayed to device 1");
    assert_eq!(&got[28..], b"hello b");
    assert_eq!(got[8], 63, "TTL decremented by one hop");
    assert!(
        net.clients[3].inbox.is_empty(),
        "other tenant's .3 got nothing"
    );
}

#[test]
fn identical_pools_never_cross_tenants() {
    let mut net = two_tenants();
    for i in 0..4 {
        net.handshake(i);
    }
    net.send(0, &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"from acme"));
    net.send(2, &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"from globex"));
    assert_eq!(net.clients[1].inbox.len(), 1);
    assert_eq!(&net.clients[1].inbox[0][28..], b"from acme");
    assert_eq!(net.clients[3].inbox.len(), 1);
    assert_eq!(&net.clients[3].inbox[0][28..], b"from globex");
    assert!(net.clients[0].inbox.is_empty() && net.clients[2].inbox.is_empty());
}

#[test]
fn spoofed_source_is_dropped_and_counted() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    net.send(0, &udp(ip("100.96.0.9"), ip("100.96.0.3"), b"spoof"));
    net.send(0, &udp(ip("100.96.0.3"), ip("100.96.0.3"), b"spoof as b"));
    assert!(net.clients[1].inbox.is_empty());
    assert_eq!(net.tenant("acme").drops(DropReason::SpoofedSource), 2);
}

/// A batch of equal-size packets from one device to another leaves as one send train; a bad packet in the
/// middle of it (spoofed source, or a datagram that fails authentication) is dropped and counted alone, and the
/// others still arrive, in order.
#[test]
fn a_bad_packet_in_the_middle_of_a_train_drops_only_that_packet() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let from = net.clients[0].underlay;
    let mut buf = vec![0u8; tx::BUF_SIZE];
    for i in 0..8u8 {
        let src = if i == 3 { "100.96.0.9" } else { "100.96.0.2" };
        let inner = udp(ip(src), ip("100.96.0.3"), &[b'a' + i; 1000]);
        let mut dg = match net.clients[0].tunn.encapsulate(&inner, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("encapsulate: {r:?}"),
        };
        if i == 5 {
            dg[40] ^= 1; // fails authentication
        }
        let now = net.now();
        net.gw
            .handle_datagram(now, from, &dg, &mut net.scratch, &mut net.tx);
    }
    let trains: Vec<(SocketAddr, usize, usize)> =
        net.tx.trains().map(|t| (t.to, t.seg, t.segments)).collect();
    assert_eq!(trains, vec![(net.clients[1].underlay, 1028 + 32, 6)]);
    net.settle();
    let got: Vec<u8> = net.clients[1].inbox.iter().map(|p| p[28]).collect();
    assert_eq!(got, b"abcegh");
    let acme = net.tenant("acme");
    assert_eq!(acme.drops(DropReason::SpoofedSource), 1);
    assert_eq!(acme.drops(DropReason::DecryptFailed), 1);
}

/// A GRO train (one coalesced message, split by `sys::split_gro`) is handled as its datagrams one by one: a
/// spoofed packet, one that fails authentication and one of garbage in the middle are each dropped and counted
/// alone; the rest arrive in order, the shorter last one included, and two flows interleaved in the train
/// each keep their packets.
#[test]
fn a_gro_train_is_handled_datagram_by_datagram() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let from = net.clients[0].underlay;
    let mut buf = vec![0u8; tx::BUF_SIZE];
    let mut msg = Vec::new();
    let seg = 1028 + 32;
    for i in 0..10u8 {
        let src = if i == 3 { "100.96.0.9" } else { "100.96.0.2" };
        let payload = if i == 9 { 500 } else { 1000 };
        let (IpAddr::V4(s), IpAddr::V4(d)) = (ip(src), ip("100.96.0.3")) else {
            unreachable!()
        };
        // Odd packets from source port 4001: a second flow.
        let mut inner = Vec::new();
        PacketBuilder::ipv4(s.octets(), d.octets(), 64)
            .udp(4000 + u16::from(i % 2), 5000)
            .write(&mut inner, &vec![b'a' + i; payload])
            .unwrap();
        let mut dg = match net.clients[0].tunn.encapsulate(&inner, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("encapsulate: {r:?}"),
        };
        if i == 5 {
            dg[40] ^= 1; // fails authentication
        }
        if i == 7 {
            dg = vec![0; seg]; // not WireGuard at all
        }
        msg.extend_from_slice(&dg);
    }
    let train = crate::sys::split_gro(&msg, seg).unwrap();
    let now = net.now();
    net.gw
        .handle_datagrams(now, from, train, &mut net.scratch, &mut net.tx);
    net.settle();
    let got: Vec<u8> = net.clients[1].inbox.iter().map(|p| p[28]).collect();
    assert_eq!(got, b"abcegij");
    assert_eq!(net.clients[1].inbox.last().unwrap().len(), 528);
    let acme = net.tenant("acme");
    assert_eq!(acme.drops(DropReason::SpoofedSource), 1);
    assert_eq!(acme.drops(DropReason::DecryptFailed), 1);
    assert_eq!(
        net.metrics
            .global
            .unattributed
            .drops(DropReason::MalformedDatagram),
        1
    );
    assert_eq!(acme.flows_started.get(), 2, "two flows, each started once");
}

#[test]
fn unknown_destination_and_offline_device_are_counted() {
    let mut net = two_tenants();
    net.handshake(0);
    net.send(0, &udp(ip("100.96.0.2"), ip("100.96.0.77"), b"x"));
    net.send(0, &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"x")); // device 1 never connected
    net.send(
        0,
        &udp(ip("100.96.0.2"), ip("100.96.0.1"), b"udp to gateway"),
    );
    let c = net.tenant("acme");
    assert_eq!(c.drops(DropReason::NoRoute), 1);
    assert_eq!(c.drops(DropReason::DestinationOffline), 1);
    assert_eq!(c.drops(DropReason::NoLocalService), 1);
}

#[test]
fn roaming_device_keeps_session_and_receives_at_new_address() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    net.clients[1].underlay = "198.18.1.99:41000".parse().unwrap();
    // Device 1 sends from its new address (no new handshake); the gateway learns it.
    net.send(1, &udp(ip("100.96.0.3"), ip("100.96.0.2"), b"moved"));
    assert_eq!(net.clients[0].inbox.len(), 1);
    net.send(
        0,
        &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"reply to new address"),
    );
    assert_eq!(net.clients[1].inbox.len(), 1);
    assert_eq!(
        net.tenant("acme").handshakes.get(),
        2,
        "no re-handshake needed"
    );
}

#[test]
fn unauthenticated_datagram_never_moves_an_endpoint() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    // Forge a data packet with device 1's receiver index from an attacker address.
    let status = net.gw.peer_status();
    let before = status
        .iter()
        .find(|p| p.name.as_str() == "dev1")
        .unwrap()
        .endpoint;
    let mut forged = vec![4u8, 0, 0, 0];
    // Device 1's slot, worker 0, session counter 0: the receiver index the gateway demultiplexes on.
    let index = 1u32 << (8 + WORKER_BITS);
    assert_eq!(
        net.gw.slot_of(index),
        Some(PeerSlot::new(1)),
        "the forgery names dev1's slot"
    );
    forged.extend_from_slice(&index.to_le_bytes());
    forged.extend_from_slice(&[0u8; 40]);
    net.deliver("198.18.9.9:666".parse().unwrap(), &forged);
    let after = net
        .gw
        .peer_status()
        .into_iter()
        .find(|p| p.name.as_str() == "dev1")
        .unwrap()
        .endpoint;
    assert_eq!(before, after);
}

#[test]
fn removed_device_loses_its_tunnel_immediately() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    // New config without device 0.
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].devices.retain(|d| d.name.as_str() != "dev0");
    let s = net.gw.apply(&cfg, Instant::now(), &mut TxQueue::new());
    assert_eq!((s.added, s.removed), (0, 1));
    net.send(
        0,
        &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"after removal"),
    );
    assert!(net.clients[1].inbox.is_empty());
    assert_eq!(
        net.metrics
            .global
            .unattributed
            .drops(DropReason::UnknownReceiver),
        1
    );
    // A fresh handshake from the removed key is refused too.
    let mut buf = vec![0u8; 256];
    let init = match net.clients[0]
        .tunn
        .format_handshake_initiation(&mut buf, true)
    {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        r => panic!("{r:?}"),
    };
    let from = net.clients[0].underlay;
    net.deliver(from, &init);
    assert_eq!(
        net.metrics
            .global
            .unattributed
            .drops(DropReason::UnknownPeer),
        1
    );
    // The remaining device still works.
    net.send(1, &ping(ip("100.96.0.3"), ip("100.96.0.1"), 1));
    assert_eq!(net.clients[1].inbox.len(), 1);
}

#[test]
fn unenrolled_key_is_refused() {
    let mut net = two_tenants();
    let mut stranger = client(&net.gw_key, "198.18.5.5:1000", "100.96.0.50");
    let mut buf = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) =
        stranger.tunn.format_handshake_initiation(&mut buf, false)
    else {
        panic!()
    };
    let init = init.to_vec();
    net.deliver(stranger.underlay, &init);
    assert_eq!(
        net.metrics
            .global
            .unattributed
            .drops(DropReason::UnknownPeer),
        1
    );
    assert_eq!(net.lost, 0, "no response sent to a stranger");
    stranger.inbox.clear();
}

#[test]
fn handshake_flood_gets_cookie_replies_and_real_clients_still_connect() {
    let mut net = two_tenants();
    net.handshake(1); // established before the flood
                      // A flood of valid-looking initiations (valid mac1, unknown keys) from one address.
    let attacker = "198.18.7.7:9999".parse().unwrap();
    for _ in 0..(HANDSHAKE_RATE_LIMIT as usize + 50) {
        let mut c = client(&net.gw_key, "198.18.7.7:9999", "100.96.0.99");
        let mut buf = vec![0u8; 256];
        let TunnResult::WriteToNetwork(init) = c.tunn.format_handshake_initiation(&mut buf, false)
        else {
            panic!()
        };
        let init = init.to_vec();
        net.gw.handle_datagram(
            Instant::now(),
            attacker,
            &init,
            &mut net.scratch,
            &mut net.tx,
        );
        net.tx.clear();
    }
    assert!(
        net.metrics.global.cookie_replies.get() >= 40,
        "cookies: {}",
        net.metrics.global.cookie_replies.get()
    );
    // The established tunnel keeps working under load (data bypasses the gate).
    net.send(1, &ping(ip("100.96.0.3"), ip("100.96.0.1"), 1));
    assert_eq!(net.clients[1].inbox.len(), 1);
    // A legitimate new client gets a cookie reply, and its retry (with mac2) completes the handshake.
    let mut buf = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) = net.clients[0]
        .tunn
        .format_handshake_initiation(&mut buf, false)
    else {
        panic!()
    };
    let init = init.to_vec();
    let from = net.clients[0].underlay;
    net.deliver(from, &init); // cookie reply consumed by the client
    assert!(net.clients[0].tunn.time_since_last_handshake().is_none());
    let TunnResult::WriteToNetwork(retry) = net.clients[0]
        .tunn
        .format_handshake_initiation(&mut buf, true)
    else {
        panic!()
    };
    let retry = retry.to_vec();
    net.deliver(from, &retry);
    assert!(
        net.clients[0].tunn.time_since_last_handshake().is_some(),
        "handshake with cookie completed"
    );
}

#[test]
fn restarted_gateway_reconnects_known_endpoints_itself() {
    let mut net = two_tenants();
    net.handshake(0);
    let endpoints: Vec<(PeerKey, SocketAddr)> = net
        .gw
        .peer_status()
        .iter()
        .filter_map(|p| Some((p.public_key, p.endpoint?)))
        .collect();
    // "Restart": a new core with the same key and config, no sessions.
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut fresh = Gateway::new(0, &net.gw_key, net.metrics.clone(), Instant::now());
    fresh.apply(
        &config_for(&net.clients, &tenants),
        Instant::now(),
        &mut TxQueue::new(),
    );
    net.gw = fresh;
    // The client's old session is unknown to the new gateway.
    net.send(0, &ping(ip("100.96.0.2"), ip("100.96.0.1"), 1));
    assert!(net.clients[0].inbox.is_empty());
    // The gateway initiates towards the persisted endpoint; the client answers; traffic flows again.
    for (k, ep) in endpoints {
        assert!(net.gw.handle_restored_endpoint(k, ep, &mut net.tx));
    }
    net.settle();
    net.send(0, &ping(ip("100.96.0.2"), ip("100.96.0.1"), 2));
    assert_eq!(net.clients[0].inbox.len(), 1);
}

#[test]
fn garbage_is_counted_never_fatal() {
    let mut net = two_tenants();
    let from: SocketAddr = "198.18.3.3:1".parse().unwrap();
    let gate_key = net.gw.public_key();
    assert_eq!(gate_key, net.gw_key.public_key());
    for dg in [
        &[][..],
        &[1u8][..],
        &[1, 0, 0, 0][..],
        &[4u8; 16][..],
        &[2u8; 92][..],
        &[1u8; 148][..],
        &[9u8; 200][..],
    ] {
        net.deliver(from, dg);
    }
    let u = &net.metrics.global.unattributed;
    let total: u64 = DropReason::all().map(|r| u.drops(r)).sum();
    assert_eq!(total, 7);
    assert!(u.drops(DropReason::MalformedDatagram) >= 3);
    assert_eq!(net.lost, 0);
}

#[test]
fn slots_are_quarantined_before_reuse() {
    let mut net = two_tenants();
    let t0 = Instant::now();
    let tenants = ["acme", "acme", "globex", "globex"];
    let full = config_for(&net.clients, &tenants);
    let acme_slots: Vec<PeerSlot> = net.clients[..2]
        .iter()
        .map(|c| net.gw.by_key[&c.key.public_key()])
        .collect();
    let mut cfg = full.clone();
    cfg.tenants[0].devices.clear();
    net.gw.apply(&cfg, t0, &mut TxQueue::new());
    assert_eq!(net.gw.peer_count(), 2);
    // Re-adding right away must not reuse the freed slots (late packets could reach the new peer).
    net.gw
        .apply(&full, t0 + Duration::from_secs(1), &mut TxQueue::new());
    let slots: Vec<PeerSlot> = net.clients[..2]
        .iter()
        .map(|c| net.gw.by_key[&c.key.public_key()])
        .collect();
    assert!(
        slots.iter().all(|s| !acme_slots.contains(s)),
        "{slots:?} reused {acme_slots:?}"
    );
    // After the quarantine they are reused.
    net.gw
        .apply(&cfg, t0 + Duration::from_secs(2), &mut TxQueue::new());
    net.gw.apply(
        &full,
        t0 + SLOT_QUARANTINE + Duration::from_secs(5),
        &mut TxQueue::new(),
    );
    let slots: Vec<PeerSlot> = net.clients[..2]
        .iter()
        .map(|c| net.gw.by_key[&c.key.public_key()])
        .collect();
    assert!(
        slots.iter().any(|s| acme_slots.contains(s)),
        "{slots:?} vs {acme_slots:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary datagrams never panic the core and each is accounted once: raw bytes, mutated real ones, bytes
    /// behind each message type, and authenticated datagrams carrying arbitrary or real inner packets (so inputs
    /// also reach anti-spoofing, flows, policy and the local responder).
    #[test]
    fn arbitrary_datagrams_never_panic(seq in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300), any::<u16>()), 1..40)) {
        let mut net = two_tenants();
        net.handshake(0);
        net.handshake(1);
        let from = net.clients[0].underlay;
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(real) = net.clients[0].tunn.encapsulate(&ping(ip("100.96.0.2"), ip("100.96.0.1"), 1), &mut buf) else { panic!() };
        let real = real.to_vec();
        let counted = |net: &Net| {
            let mut drops: u64 = DropReason::all().map(|r| net.metrics.global.unattributed.drops(r)).sum();
            let (mut rx, mut hs) = (0, 0);
            for (_, t) in net.metrics.tenants() {
                drops += DropReason::all().map(|r| t.drops(r)).sum::<u64>();
                rx += t.rx_packets.get();
                hs += t.handshakes.get();
            }
            (drops, rx, hs, net.metrics.global.datagrams_rx.get())
        };
        for (kind, bytes, flip) in seq {
            let mut authentic = true;
            let dg = match kind % 5 {
                0 => { authentic = false; bytes }
                1 => { authentic = false; let mut r = real.clone(); let i = usize::from(flip) % r.len(); r[i] ^= 0x5a; r }
                2 => { authentic = false; let mut b = bytes; if !b.is_empty() { b[0] = kind % 5; } b }
                3 => {
                    // Arbitrary bytes as the inner packet, behind a valid IPv4 header from the device's address.
                    let dst = [ip("100.96.0.1"), ip("100.96.0.3"), ip("100.96.0.9"), ip("10.0.0.1")][usize::from(flip) % 4];
                    let mut p = udp(ip("100.96.0.2"), dst, &bytes);
                    p[9] = kind; // any protocol
                    let TunnResult::WriteToNetwork(d) = net.clients[0].tunn.encapsulate(&p, &mut buf) else { panic!() };
                    d.to_vec()
                }
                _ => {
                    let p = tcp(ip("100.96.0.2"), flip, ip("100.96.0.3"), [22, 23, 9, 443][usize::from(kind) % 4], 1, "S", &bytes);
                    let TunnResult::WriteToNetwork(d) = net.clients[0].tunn.encapsulate(&p, &mut buf) else { panic!() };
                    d.to_vec()
                }
            };
            let before = counted(&net);
            net.gw.handle_datagram(Instant::now(), from, &dg, &mut net.scratch, &mut net.tx);
            let emitted = !net.tx.is_empty() || net.gw.poll_transmit().is_some();
            let after = counted(&net);
            let (drops, rx, hs) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
            prop_assert_eq!(after.3 - before.3, 1, "datagram not counted");
            prop_assert!(rx <= 1 && drops <= 1, "counted as {} packets and {} drops", rx, drops);
            if authentic {
                prop_assert_eq!(rx, 1, "an authenticated datagram was not decrypted");
                prop_assert!(drops == 1 || emitted, "an inner packet was neither dropped (counted) nor forwarded");
            } else {
                prop_assert!(drops + rx + hs == 1 || emitted, "a datagram was not accounted: {:?}", dg);
            }
            net.tx.clear();
            while net.gw.poll_transmit().is_some() {}
        }
    }
}

fn tcp(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    seq: u32,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    let mut b = PacketBuilder::ipv4(s.octets(), d.octets(), 64).tcp(sport, dport, seq, 64000);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(1),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn events(net: &mut Net) -> Vec<FlowEvent> {
    std::iter::from_fn(|| net.gw.poll_event()).collect()
}

/// The packets `poll_transmit` gives for `dest`; every other transmit is drained too.
fn transmits(gw: &mut Gateway, dest: Dest) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(t) = gw.poll_transmit() {
        if t.dest == dest {
            out.extend(t.train.datagrams().map(<[u8]>::to_vec));
        }
    }
    out
}

fn starts(evs: &[FlowEvent]) -> Vec<(String, Action)> {
    evs.iter()
        .filter_map(|e| match e {
            FlowEvent::Start(s) => Some((s.rule.to_string(), s.action)),
            _ => None,
        })
        .collect()
}

#[test]
fn denied_port_is_dropped_and_recorded_with_its_rule() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 23, 1, "S", b""));
    net.send(0, &tcp(a, 40000, b, 23, 1, "S", b"")); // a retransmission
    net.send(0, &tcp(a, 40001, b, 23, 1, "S", b"")); // another port: the same summary
    assert!(net.clients[1].inbox.is_empty());
    assert!(net.clients[0].inbox.is_empty(), "deny is silent");
    assert_eq!(net.gw.flow_count(), 0, "a refused attempt is no flow");
    assert!(
        starts(&events(&mut net)).is_empty(),
        "summarised, not one record each"
    );
    let evs = summarise_refusals(&mut net);
    assert_eq!(starts(&evs), vec![("no-telnet".to_string(), Action::Deny)]);
    let ends: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            FlowEvent::End {
                packets, reason, ..
            } => Some((*reason, packets[0])),
            _ => None,
        })
        .collect();
    assert_eq!(ends, vec![(EndReason::Refused, 3)], "three attempts");
    assert_eq!(net.tenant("acme").drops(DropReason::PolicyDenied), 3);
}

/// Moves the clock past the refusal summary interval and drains the summaries.
fn summarise_refusals(net: &mut Net) -> Vec<FlowEvent> {
    net.skew += FlowSettings::default().deny_summary + Duration::from_millis(1);
    let now = net.now();
    net.gw.handle_timeout(now, &mut net.tx);
    events(net)
}

#[test]
fn rejected_flow_gets_icmp_prohibited_and_no_route_gets_unreachable() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    net.send(0, &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"to port 9")); // udp() uses dport 5000
    assert_eq!(net.clients[1].inbox.len(), 1, "port 5000 allowed");
    let mut p = udp(ip("100.96.0.2"), ip("100.96.0.3"), b"discard me");
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[26..28].copy_from_slice(&[0, 0]); // no UDP checksum
    net.send(0, &p);
    assert_eq!(net.clients[1].inbox.len(), 1, "port 9 not delivered");
    let err = net.clients[0]
        .inbox
        .pop()
        .expect("ICMP error back to the sender");
    assert_eq!(
        (err[9], err[20], err[21]),
        (1, 3, 13),
        "ICMP admin prohibited"
    );
    net.send(0, &udp(ip("100.96.0.2"), ip("100.96.0.200"), b"nobody"));
    let err = net.clients[0]
        .inbox
        .pop()
        .expect("ICMP error back to the sender");
    assert_eq!((err[20], err[21]), (3, 1), "ICMP host unreachable");
    assert_eq!(net.tenant("acme").drops(DropReason::PolicyRejected), 1);
    assert_eq!(net.tenant("acme").drops(DropReason::NoRoute), 1);
}

#[test]
fn tcp_flow_lifecycle_is_recorded_with_counters() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 5201, 100, "S", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 900, "SA", b""));
    net.send(0, &tcp(a, 40000, b, 5201, 101, "A", b"0123456789"));
    net.send(0, &tcp(a, 40000, b, 5201, 111, "FA", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 901, "FA", b""));
    net.send(0, &tcp(a, 40000, b, 5201, 112, "A", b"")); // late ACK: absorbed by the lingering flow
    assert_eq!(net.clients[1].inbox.len(), 4);
    assert_eq!(net.clients[0].inbox.len(), 2);
    let evs = events(&mut net);
    assert_eq!(starts(&evs), vec![("all".to_string(), Action::Allow)]);
    assert!(evs
        .iter()
        .any(|e| matches!(e, FlowEvent::Established { .. })));
    let ends: Vec<_> = evs
        .iter()
        .filter_map(|e| {
            if let FlowEvent::End {
                packets,
                bytes,
                reason,
                ..
            } = e
            {
                Some((*packets, *bytes, *reason))
            } else {
                None
            }
        })
        .collect();
    assert_eq!(ends.len(), 1);
    let (packets, bytes, reason) = ends[0];
    assert_eq!(reason, EndReason::TcpFin);
    assert_eq!(packets, [3, 2]);
    assert_eq!(bytes, [40 + 50 + 40, 80]);
}

#[test]
fn reload_cuts_a_flow_the_new_policy_denies_with_rsts_both_ways() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 5201, 100, "S", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 900, "SA", b""));
    net.send(0, &tcp(a, 40000, b, 5201, 101, "A", b"data"));
    let _ = events(&mut net);
    net.clients[0].inbox.clear();
    net.clients[1].inbox.clear();
    // New policy: tcp/5201 is denied.
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    let mut deny = cfg.tenants[0].rules[1].clone();
    deny.id = "no-iperf".into();
    deny.ports = vec![(5201, 5201)];
    cfg.tenants[0].rules.insert(0, deny);
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    net.settle();
    let evs = events(&mut net);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            FlowEvent::End {
                reason: EndReason::PolicyRevoked,
                ..
            }
        )),
        "{evs:?}"
    );
    for c in 0..2 {
        let rst = net.clients[c]
            .inbox
            .pop()
            .unwrap_or_else(|| panic!("client {c} got no RST"));
        assert_ne!(rst[33] & 0x04, 0, "RST flag");
    }
    // Segments still in flight get a RST built from their own ACK (always acceptable), and reach nobody.
    net.send(0, &tcp(a, 40000, b, 5201, 105, "A", b"more"));
    assert!(net.clients[1].inbox.is_empty());
    let rst = net.clients[0]
        .inbox
        .pop()
        .expect("a RST for the late segment");
    assert_ne!(rst[33] & 0x04, 0, "RST flag");
    assert!(
        starts(&events(&mut net)).is_empty(),
        "no new flow for the cut connection's segments"
    );
    // A new connection on the same ports is a new flow, decided by the new policy.
    net.send(0, &tcp(a, 40000, b, 5201, 7000, "S", b""));
    assert_eq!(
        starts(&summarise_refusals(&mut net)),
        vec![("no-iperf".to_string(), Action::Deny)]
    );
}

#[test]
fn tenant_flow_limit_drops_new_flows_only() {
    let mut net = two_tenants();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].max_flows = Some(2);
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    net.handshake(0);
    net.handshake(1);
    net.handshake(2);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    for port in [1000, 1001, 1002] {
        net.send(0, &tcp(a, port, b, 5201, 1, "S", b""));
    }
    assert_eq!(net.clients[1].inbox.len(), 2);
    assert_eq!(net.tenant("acme").drops(DropReason::FlowLimit), 1);
    net.send(0, &tcp(a, 1000, b, 5201, 2, "A", b"x")); // existing flow unaffected
    assert_eq!(net.clients[1].inbox.len(), 3);
    net.send(2, &ping(ip("100.96.0.2"), ip("100.96.0.1"), 1)); // other tenant unaffected
    assert_eq!(net.clients[2].inbox.len(), 1);
}

#[test]
fn fail_closed_audit_refuses_new_flows_but_keeps_existing() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 1000, b, 5201, 1, "S", b""));
    net.gw.set_admit_new_flows(false);
    net.send(0, &tcp(a, 1001, b, 5201, 1, "S", b""));
    net.send(0, &tcp(a, 1000, b, 5201, 2, "A", b"x"));
    assert_eq!(net.clients[1].inbox.len(), 2);
    assert_eq!(net.tenant("acme").drops(DropReason::AuditUnavailable), 1);
}

#[test]
fn idle_flows_end_by_timeout_and_shutdown_ends_the_rest() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &udp(a, b, b"one"));
    net.send(0, &tcp(a, 1000, b, 5201, 1, "S", b""));
    let _ = events(&mut net);
    let later = Instant::now() + Duration::from_secs(61);
    net.gw.handle_timeout(later, &mut net.tx);
    net.tx.clear();
    let evs = events(&mut net);
    assert_eq!(
        evs.iter()
            .filter(|e| matches!(
                e,
                FlowEvent::End {
                    reason: EndReason::IdleTimeout,
                    ..
                }
            ))
            .count(),
        2,
        "udp 60 s, tcp SYN-only 60 s"
    );
    net.send(0, &tcp(a, 1001, b, 5201, 1, "S", b""));
    net.gw.shutdown(Instant::now());
    let evs = events(&mut net);
    assert!(evs.iter().any(|e| matches!(
        e,
        FlowEvent::End {
            reason: EndReason::Shutdown,
            ..
        }
    )));
    assert_eq!(net.gw.flow_count(), 0);
}

#[test]
fn removed_device_ends_its_flows() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    net.send(0, &udp(ip("100.96.0.2"), ip("100.96.0.3"), b"x"));
    let _ = events(&mut net);
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].devices.retain(|d| d.name.as_str() != "dev1");
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    let evs = events(&mut net);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            FlowEvent::End {
                reason: EndReason::PeerRemoved,
                ..
            }
        )),
        "{evs:?}"
    );
}

fn offramp_net() -> Net {
    let mut net = two_tenants();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].offramp = vec!["198.51.100.0/24".parse().unwrap()];
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    net
}

fn take_tun(net: &mut Net) -> Vec<Vec<u8>> {
    transmits(&mut net.gw, Dest::UpgradeTun)
}

#[test]
fn offramp_tcp_flow_is_upgraded_into_the_namespace_and_replies_reach_the_device() {
    let mut net = offramp_net();
    net.handshake(0);
    let (a, web) = (ip("100.96.0.2"), ip("198.51.100.7"));
    let mut syn = Vec::new();
    PacketBuilder::ipv4([100, 96, 0, 2], [198, 51, 100, 7], 64)
        .tcp(40000, 80, 100, 64000)
        .syn()
        .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)])
        .unwrap()
        .write(&mut syn, &[])
        .unwrap();
    net.send(0, &syn);
    let tun = take_tun(&mut net);
    assert_eq!(tun.len(), 1, "the SYN goes into the namespace");
    let (src, dst) = nat::ports_v4(&tun[0]).unwrap();
    assert_eq!(dst, UPGRADE_LISTENER);
    assert!(
        src.ip().octets()[..2] == [100, 64],
        "NAT source {src} from the upgrade range"
    );
    let s = etherparse::SlicedPacket::from_ip(&tun[0]).unwrap();
    let Some(etherparse::TransportSlice::Tcp(tcp_h)) = &s.transport else {
        panic!()
    };
    assert!(tcp_h.options_iterator().any(
        |o| matches!(o, Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) if m == UPGRADE_MSS)
    ));
    assert_eq!(
        tcp_h
            .calc_checksum_ipv4(
                [
                    src.ip().octets()[0],
                    src.ip().octets()[1],
                    src.ip().octets()[2],
                    src.ip().octets()[3]
                ],
                [100, 66, 0, 1]
            )
            .unwrap(),
        tcp_h.checksum()
    );
    let evs = events(&mut net);
    let upgraded: Vec<&Upgraded> = evs
        .iter()
        .filter_map(|e| {
            if let FlowEvent::Upgraded(u) = e {
                Some(&**u)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(upgraded.len(), 1);
    assert_eq!(
        (upgraded[0].slot, upgraded[0].dst.to_string()),
        (src, "198.51.100.7:80".to_string())
    );
    assert!(
        matches!(evs[0], FlowEvent::Start(_)),
        "start record precedes the upgrade event"
    );
    // The namespace kernel answers the SYN: listener -> slot.
    let mut synack = Vec::new();
    PacketBuilder::ipv4([100, 66, 0, 1], src.ip().octets(), 64)
        .tcp(7000, src.port(), 900, 64000)
        .syn()
        .ack(101)
        .write(&mut synack, &[])
        .unwrap();
    net.gw
        .handle_tun_packet(Instant::now(), &mut synack, &mut net.tx);
    net.settle();
    let got = net.clients[0]
        .inbox
        .pop()
        .expect("SYN-ACK delivered to the device");
    let v = packet::parse_ip(&got).unwrap();
    assert_eq!(
        (v.src, v.dst),
        (web, a),
        "the device sees the upstream host, not the namespace"
    );
    let tp = packet::parse_transport(&got, &v).unwrap();
    assert_eq!((tp.sport, tp.dport), (80, 40000));
    assert!(events(&mut net)
        .iter()
        .any(|e| matches!(e, FlowEvent::Established { .. })));
    // Stale packets (no slot) are counted, not delivered.
    let mut stray = synack.clone();
    nat::rewrite_v4(
        &mut stray,
        UPGRADE_LISTENER,
        "100.64.200.200:9".parse().unwrap(),
    )
    .unwrap();
    net.gw
        .handle_tun_packet(Instant::now(), &mut stray, &mut net.tx);
    assert_eq!(
        net.metrics.global.unattributed.drops(DropReason::NatStale),
        1
    );
}

#[test]
fn offramp_denied_and_unsupported_flows_never_enter_the_namespace() {
    let mut net = offramp_net();
    net.handshake(0);
    net.send(
        0,
        &tcp(ip("100.96.0.2"), 40000, ip("198.51.100.7"), 23, 1, "S", b""),
    ); // no-telnet: deny
    net.send(0, &ping(ip("100.96.0.2"), ip("198.51.100.7"), 1)); // ICMP to upstream: not carried yet
    assert!(take_tun(&mut net).is_empty());
    let c = net.tenant("acme");
    assert_eq!(c.drops(DropReason::PolicyDenied), 1);
    assert_eq!(c.drops(DropReason::OfframpUnsupported), 1);
    // Without an offramp network the same destination has no route.
    net.send(
        2,
        &tcp(ip("100.96.0.2"), 40000, ip("198.51.100.7"), 80, 1, "S", b""),
    );
    assert_eq!(net.tenant("globex").drops(DropReason::NoRoute), 1);
}

#[test]
fn a_syn_reusing_the_ports_of_an_ended_connection_starts_a_new_flow() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 5201, 100, "S", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 900, "SA", b""));
    net.send(0, &tcp(a, 40000, b, 5201, 101, "FA", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 901, "FA", b""));
    let _ = events(&mut net);
    net.send(0, &tcp(a, 40000, b, 5201, 5000, "S", b"")); // same ports, new connection
    let evs = events(&mut net);
    assert_eq!(starts(&evs).len(), 1, "a new flow record: {evs:?}");
    assert_eq!(net.clients[1].inbox.len(), 3);
}

#[test]
fn proxy_between_devices_splices_an_upgraded_and_a_downgraded_leg() {
    let mut net = two_tenants();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    let mut proxy = cfg.tenants[0].rules[2].clone();
    proxy.id = "ssh-proxy".into();
    proxy.action = Action::Proxy;
    proxy.proto = crate::config::Proto::Tcp;
    proxy.ports = vec![(22, 22)];
    cfg.tenants[0].rules.insert(0, proxy);
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 22, 100, "S", b""));
    assert!(
        net.clients[1].inbox.is_empty(),
        "B never sees A's own packets"
    );
    assert_eq!(take_tun(&mut net).len(), 1, "A's SYN is upgraded");
    let evs = events(&mut net);
    let up = evs
        .iter()
        .find_map(|e| {
            if let FlowEvent::Upgraded(u) = e {
                Some(u.clone())
            } else {
                None
            }
        })
        .expect("upgraded");
    let nat_dst = up
        .downgrade
        .expect("a downgrade address for the device leg");
    assert_eq!(nat_dst.ip().octets()[..2], [100, 65]);
    // The proxy connects inside the namespace; its SYN leaves the downgrade TUN and reaches B as A -> B.
    let ksrc: SocketAddrV4 = "100.66.1.1:51000".parse().unwrap();
    let mut syn = Vec::new();
    PacketBuilder::ipv4(ksrc.ip().octets(), nat_dst.ip().octets(), 64)
        .tcp(51000, nat_dst.port(), 7, 64000)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    net.gw.handle_downgrade_tun_packet(&mut syn, &mut net.tx);
    net.settle();
    let got = net.clients[1]
        .inbox
        .pop()
        .expect("B gets the downgraded SYN");
    let v = packet::parse_ip(&got).unwrap();
    let tp = packet::parse_transport(&got, &v).unwrap();
    assert_eq!(
        (v.src, tp.sport, v.dst, tp.dport),
        (a, 40000, b, 22),
        "transparent: B sees A's address and port"
    );
    // B answers; the answer goes back into the namespace to the proxy's socket.
    net.send(1, &tcp(b, 22, a, 40000, 900, "SA", b""));
    let back = transmits(&mut net.gw, Dest::DowngradeTun);
    assert_eq!(back.len(), 1);
    assert_eq!(nat::ports_v4(&back[0]), Some((nat_dst, ksrc)));
    assert!(
        net.clients[0].inbox.is_empty(),
        "B's answer is not sent to A directly"
    );
}

#[test]
fn client_initiated_rekey_keeps_traffic_flowing_on_the_new_session() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &udp(a, b, b"before rekey"));
    // The client starts a new handshake (as its REKEY_AFTER_TIME timer would) while the old session is live.
    let mut buf = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) = net.clients[0]
        .tunn
        .format_handshake_initiation(&mut buf, true)
    else {
        panic!()
    };
    let init = init.to_vec();
    let from = net.clients[0].underlay;
    net.deliver(from, &init);
    assert_eq!(
        net.tenant("acme").handshakes.get(),
        3,
        "the rekey is a completed handshake"
    );
    net.send(0, &udp(a, b, b"after rekey"));
    net.send(1, &udp(b, a, b"reply on the new session"));
    let got: Vec<&[u8]> = net.clients[1].inbox.iter().map(|p| &p[28..]).collect();
    assert_eq!(got, [&b"before rekey"[..], &b"after rekey"[..]]);
    assert_eq!(
        &net.clients[0].inbox.last().unwrap()[28..],
        b"reply on the new session"
    );
}

/// Packets the namespace kernel sends for the flow on `slot` (listener -> slot), as `handle_tun_packet` sees them.
fn from_namespace(slot: SocketAddrV4, flags: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ipv4(UPGRADE_LISTENER.ip().octets(), slot.ip().octets(), 64).tcp(
        UPGRADE_LISTENER.port(),
        slot.port(),
        5000,
        64000,
    );
    let b = if flags.contains('R') { b.rst() } else { b };
    let b = if flags.contains('A') { b.ack(200) } else { b };
    b.write(&mut out, payload).unwrap();
    out
}

fn released(evs: &[FlowEvent]) -> Vec<(FlowSeq, SocketAddrV4)> {
    evs.iter()
        .filter_map(|e| match e {
            FlowEvent::Released { seq, slot } => Some((*seq, *slot)),
            _ => None,
        })
        .collect()
}

fn upgraded_slot(evs: &[FlowEvent]) -> Option<(FlowSeq, SocketAddrV4)> {
    evs.iter().find_map(|e| match e {
        FlowEvent::Upgraded(u) => Some((u.seq, u.slot)),
        _ => None,
    })
}

/// C1 of the security review: an upgraded flow that ends (here: its device is removed) retires its NAT slot.
/// Nothing the namespace still sends for the old connection carries payload to anyone, and the slot goes to no
/// other flow (of any tenant) until the application side reports its sockets closed, and then only after the
/// quarantine.
#[test]
fn an_ended_upgraded_flow_keeps_its_slot_until_the_application_side_closed_it() {
    let mut net = two_tenants();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    for t in &mut cfg.tenants {
        t.offramp = vec!["198.51.100.0/24".parse().unwrap()];
    }
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    net.handshake(0);
    net.handshake(2);
    let web = ip("198.51.100.7");
    net.send(0, &tcp(ip("100.96.0.2"), 40000, web, 80, 1, "S", b""));
    let (seq, slot) = upgraded_slot(&events(&mut net)).expect("upgraded");
    take_tun(&mut net);
    // The namespace answers while the flow lives: delivered.
    net.gw.handle_tun_packet(
        net.now(),
        &mut from_namespace(slot, "A", b"live"),
        &mut net.tx,
    );
    net.settle();
    assert_eq!(net.clients[0].inbox.len(), 1);

    // Acme's device 0 is removed: its flow ends and the slot is released to the application side.
    let mut smaller = cfg.clone();
    smaller.tenants[0]
        .devices
        .retain(|d| d.name.as_str() != "dev0");
    net.gw.apply(&smaller, net.now(), &mut net.tx);
    net.settle();
    assert_eq!(released(&events(&mut net)), vec![(seq, slot)]);
    // Payload the old socket still sends reaches no one; a UDP datagram to the TCP slot neither.
    let stale = net.metrics.global.unattributed.drops(DropReason::NatStale);
    net.gw.handle_tun_packet(
        net.now(),
        &mut from_namespace(slot, "A", b"secret"),
        &mut net.tx,
    );
    let mut udp_to_slot = Vec::new();
    PacketBuilder::ipv4(UPGRADE_LISTENER.ip().octets(), slot.ip().octets(), 64)
        .udp(UPGRADE_LISTENER.port(), slot.port())
        .write(&mut udp_to_slot, b"secret")
        .unwrap();
    net.gw
        .handle_tun_packet(net.now(), &mut udp_to_slot, &mut net.tx);
    net.settle();
    assert_eq!(
        net.metrics.global.unattributed.drops(DropReason::NatStale),
        stale + 2
    );

    // Long past the quarantine, globex's new flows never get the slot while the application side holds it.
    net.skew = Duration::from_millis(nat::QUARANTINE_MS * 3);
    for port in 0..4 {
        net.send(
            2,
            &tcp(ip("100.96.0.2"), 41000 + port, web, 80, 1, "S", b""),
        );
        let (_, s) = upgraded_slot(&events(&mut net)).expect("upgraded");
        assert_ne!(s, slot, "a closing slot was handed to another tenant");
    }
    // Reported closed: after its quarantine the slot serves again.
    net.gw.handle_slot_closed(net.now(), slot, seq);
    net.send(2, &tcp(ip("100.96.0.2"), 42000, web, 80, 1, "S", b""));
    assert_ne!(
        upgraded_slot(&events(&mut net)).unwrap().1,
        slot,
        "quarantined"
    );
    net.skew += Duration::from_millis(nat::QUARANTINE_MS + 1);
    net.send(2, &tcp(ip("100.96.0.2"), 42001, web, 80, 1, "S", b""));
    assert_eq!(upgraded_slot(&events(&mut net)).unwrap().1, slot);
}

fn end_of(evs: &[FlowEvent]) -> Option<(EndReason, [u64; 2])> {
    evs.iter().find_map(|e| match e {
        FlowEvent::End { reason, bytes, .. } => Some((*reason, *bytes)),
        _ => None,
    })
}

/// H1 of the security review: a device "ends" its own connection with a RST the peer ignores (wrong
/// sequence number), then keeps sending. The flow must stay live (so a reload revoking the rule still cuts it)
/// and every byte after the forged RST must be counted in its end record. On the old code the forged RST ended
/// the flow in the table, later data kept flowing on the memoized Allow, the reload skipped the flow and the
/// bytes after the RST were never recorded.
#[test]
fn a_forged_rst_ends_nothing_and_the_revoke_still_cuts_the_flow() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 5201, 100, "S", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 900, "SA", b""));
    net.send(0, &tcp(a, 40000, b, 5201, 101, "A", b"data"));
    net.send(0, &tcp(a, 40000, b, 5201, 9_999_999, "R", b"")); // the peer would ignore it
    assert!(
        end_of(&events(&mut net)).is_none(),
        "the forged RST ended the flow"
    );
    net.clients[1].inbox.clear();
    net.send(0, &tcp(a, 40000, b, 5201, 105, "A", &[7u8; 1000]));
    assert_eq!(net.clients[1].inbox.len(), 1, "the connection goes on");
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    let mut deny = cfg.tenants[0].rules[1].clone();
    deny.id = "no-iperf".into();
    deny.ports = vec![(5201, 5201)];
    cfg.tenants[0].rules.insert(0, deny);
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    net.settle();
    let (reason, bytes) = end_of(&events(&mut net)).expect("the revoke cut the flow");
    assert_eq!(reason, EndReason::PolicyRevoked);
    assert!(
        bytes[OUT] > 1000,
        "bytes after the forged RST are counted: {bytes:?}"
    );
    net.clients[1].inbox.clear();
    net.send(0, &tcp(a, 40000, b, 5201, 1105, "A", b"after the cut"));
    assert!(
        net.clients[1].inbox.is_empty(),
        "nothing passes after the cut"
    );
}

/// H1 of the security review: a connection between two devices closes normally, the peer device is removed,
/// then the first device sends bare ACKs on the old 5-tuple. On the old code this panicked the data-path
/// thread (`expect("flows name live slots")`), stopping every tenant's traffic.
#[test]
fn bare_acks_after_the_peer_is_removed_are_dropped_not_a_panic() {
    let mut net = two_tenants();
    for i in [0, 1, 2, 3] {
        net.handshake(i);
    }
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 5201, 100, "S", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 900, "SA", b""));
    net.send(0, &tcp(a, 40000, b, 5201, 101, "FA", b""));
    net.send(1, &tcp(b, 5201, a, 40000, 901, "FA", b""));
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].devices.retain(|d| d.name.as_str() != "dev1");
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    for seq in 102..106 {
        net.send(0, &tcp(a, 40000, b, 5201, seq, "A", b""));
    }
    // Every tenant's traffic still flows.
    net.send(2, &udp(a, b, b"globex still works"));
    assert_eq!(
        &net.clients[3].inbox.last().unwrap()[28..],
        b"globex still works"
    );
}

/// H4 of the security review: with `offramp = ["0.0.0.0/0"]` a device must still not reach the appliance
/// itself (its addresses, loopback, link-local metadata, the internal NAT ranges) through the off-ramp; an
/// explicitly listed `offramp_allow_local` host:port is the only exception.
#[test]
fn the_appliance_is_never_an_offramp_destination() {
    let mut net = two_tenants();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].offramp = vec!["0.0.0.0/0".parse().unwrap()];
    cfg.tenants[0].offramp_allow_local = vec!["198.18.0.1:53".parse().unwrap()];
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    net.gw
        .set_local_addresses(vec![ip("198.18.0.1"), ip("127.0.0.1")]);
    net.handshake(0);
    let me = ip("100.96.0.2");
    let forbidden = [
        ("127.0.0.1", 8080),
        ("127.1.2.3", 22),
        ("198.18.0.1", 51820),
        ("169.254.169.254", 80),
        ("100.64.0.1", 7000),
        ("224.0.0.251", 5353),
        ("0.0.0.0", 80),
    ];
    for (i, (dst, port)) in forbidden.iter().enumerate() {
        net.send(0, &tcp(me, 40000 + i as u16, ip(dst), *port, 1, "S", b""));
    }
    assert!(
        take_tun(&mut net).is_empty(),
        "nothing entered the namespace"
    );
    assert_eq!(
        net.tenant("acme").drops(DropReason::OfframpForbidden),
        forbidden.len() as u64
    );
    // Each sender was told (a RST per SYN).
    assert_eq!(net.clients[0].inbox.len(), forbidden.len());
    // Positive controls: an upstream host, and the listed exception, are off-ramped.
    net.send(0, &tcp(me, 41000, ip("198.51.100.7"), 80, 1, "S", b""));
    net.send(0, &tcp(me, 41001, ip("198.18.0.1"), 53, 1, "S", b""));
    assert_eq!(take_tun(&mut net).len(), 2);
}

/// H5 of the security review: one device spraying new flows (allowed ones to random UDP ports, and refused
/// ones) is held by its own limits: its live flows stop at `device_max_flows`, its new flows at the token
/// bucket, refused attempts become one summary record; another device of another tenant is unaffected.
#[test]
fn one_device_cannot_fill_the_table_or_the_audit_trail() {
    let mut net = two_tenants();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.flows.device_max_flows = 50;
    cfg.flows.device_new_flows_per_sec = 100;
    cfg.flows.device_new_flows_burst = 80;
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    for i in 0..4 {
        net.handshake(i);
    }
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    let udp_to = |port: u16| {
        let mut out = Vec::new();
        PacketBuilder::ipv4([100, 96, 0, 2], [100, 96, 0, 1], 64)
            .udp(4000, port)
            .write(&mut out, b"x")
            .unwrap();
        out
    };
    // 100 allowed UDP flows to the gateway's random ports, then 100 refused ones, within an instant.
    for p in 0..100u16 {
        net.send(0, &udp_to(10_000 + p));
    }
    for p in 0..100u16 {
        net.send(0, &tcp(a, 30_000 + p, b, 23, 1, "S", b""));
    }
    let acme = net.tenant("acme");
    assert!(net.gw.flow_count() <= 50, "{} flows", net.gw.flow_count());
    assert!(acme.drops(DropReason::DeviceFlowLimit) > 0);
    assert!(acme.drops(DropReason::FlowRateLimited) > 0);
    let evs = summarise_refusals(&mut net);
    let refused = evs
        .iter()
        .filter(|e| {
            matches!(
                e,
                FlowEvent::End {
                    reason: EndReason::Refused,
                    ..
                }
            )
        })
        .count();
    assert!(
        refused <= 1,
        "{refused} summary records for one device, destination and rule"
    );
    // The other tenant's device opens its flows as usual.
    net.send(2, &udp(a, b, b"globex"));
    assert_eq!(&net.clients[3].inbox.last().unwrap()[28..], b"globex");
    // Once its flows expire and its bucket refills, the device opens flows again.
    net.skew += FlowSettings::default().udp_timeout + Duration::from_secs(1);
    let now = net.now();
    net.gw.handle_timeout(now, &mut net.tx);
    net.send(0, &tcp(a, 50_000, b, 5201, 1, "S", b""));
    assert!(net.clients[1]
        .inbox
        .iter()
        .any(|p| p.len() >= 40 && p[20..22] == 50_000u16.to_be_bytes()));
}

/// A device that opens and closes connections quickly is not held by `device_max_flows`: closed connections
/// linger for their tail but no longer count among its live flows (the 10,000-connection e2e test hit this).
#[test]
fn closed_connections_do_not_count_against_the_device_flow_limit() {
    let mut net = two_tenants();
    let mut cfg = config_for(&net.clients, &["acme", "acme", "globex", "globex"]);
    cfg.flows.device_max_flows = 5;
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    for i in 0..20u16 {
        let sport = 40_000 + i;
        net.send(0, &tcp(a, sport, b, 5201, 100, "S", b""));
        net.send(1, &tcp(b, 5201, a, sport, 900, "SA", b""));
        net.send(0, &tcp(a, sport, b, 5201, 101, "FA", b""));
        net.send(1, &tcp(b, 5201, a, sport, 901, "FA", b""));
    }
    assert_eq!(net.tenant("acme").drops(DropReason::DeviceFlowLimit), 0);
    assert_eq!(
        net.clients[1].inbox.len(),
        40,
        "every SYN and FIN reached bob"
    );
    // Open connections still count: five held open, the sixth is refused.
    for i in 0..6u16 {
        net.send(0, &tcp(a, 50_000 + i, b, 5201, 100, "S", b""));
    }
    assert_eq!(net.tenant("acme").drops(DropReason::DeviceFlowLimit), 1);
}

fn icmp_v4(src: IpAddr, dst: IpAddr, ty: etherparse::Icmpv4Type, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    let mut out = Vec::new();
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .icmpv4(ty)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// L7 of the security review: an allowed ICMP flow let a device send ICMP errors quoting any connection (say
/// a forged port unreachable for its peer's other connections) and echo requests back on the responder's side
/// of an echo flow, none of which any policy decided. Now an error reaches only the other device of the flow
/// it quotes, and the responder of an echo flow only answers.
#[test]
fn icmp_errors_reach_only_the_flow_they_quote_and_echo_responders_only_answer() {
    use etherparse::{icmpv4::DestUnreachableHeader, IcmpEchoHeader, Icmpv4Type};
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    // A datagram a -> b, and b's port unreachable quoting it: delivered to a (the positive control).
    let dgram = udp(a, b, b"hello");
    net.send(0, &dgram);
    assert_eq!(net.clients[1].inbox.len(), 1);
    net.send(1, &icmp_v4(b, a, unreachable.clone(), &dgram[..28]));
    assert_eq!(
        net.clients[0].inbox.len(),
        1,
        "the genuine error was not delivered"
    );
    // The same error quoting a TCP connection a <-> b that does not exist: dropped.
    let forged = tcp(a, 41_000, b, 80, 1, "S", b"");
    net.send(1, &icmp_v4(b, a, unreachable.clone(), &forged[..28]));
    // ... or quoting a packet that b (not a) sent.
    let reversed = udp(b, a, b"x");
    net.send(1, &icmp_v4(b, a, unreachable, &reversed[..28]));
    assert_eq!(net.clients[0].inbox.len(), 1, "a forged error reached a");
    assert_eq!(net.tenant("acme").drops(DropReason::IcmpUnrelated), 2);
    // An echo flow a -> b: b's reply passes, b's own echo request on the same identifier does not.
    net.send(0, &ping(a, b, 1));
    let echo = IcmpEchoHeader { id: 1, seq: 1 };
    net.send(1, &icmp_v4(b, a, Icmpv4Type::EchoReply(echo), b"ping"));
    assert_eq!(
        net.clients[0].inbox.len(),
        2,
        "the echo reply was not delivered"
    );
    net.send(1, &icmp_v4(b, a, Icmpv4Type::EchoRequest(echo), b"ping"));
    assert_eq!(
        net.clients[0].inbox.len(),
        2,
        "b's echo request rode a's echo flow"
    );
    assert_eq!(net.tenant("acme").drops(DropReason::IcmpUnrelated), 3);
}

/// Rule sets the simulation switches tenants between on reload.
const SIM_RULES: [&str; 5] = [
    "[[tenant.rule]]\nid = \"all\"\naction = \"allow\"\n",
    RULES,
    "[[tenant.rule]]\nid = \"udp-only\"\naction = \"allow\"\nproto = \"udp\"\n",
    "[[tenant.rule]]\nid = \"from-dev0-dev3\"\naction = \"allow\"\ndevices = [\"dev0\", \"dev3\"]\n",
    "",
];

/// A small deterministic generator (xorshift64*), so a failing seed replays exactly.
struct SimRng(u64);

impl SimRng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The simulation's configuration: which clients are present, and each tenant's rule set.
fn sim_config(clients: &[Client], present: &[bool], rules: [usize; 2]) -> Config {
    let mut text =
        String::from("[gateway]\nlisten = \"198.18.0.1:51820\"\nstate_dir = \"/nonexistent\"\n");
    for (ti, t) in ["acme", "globex"].iter().enumerate() {
        text += &format!(
            "[[tenant]]\nid = \"{t}\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n{}",
            SIM_RULES[rules[ti]]
        );
        for (i, c) in clients.iter().enumerate() {
            if i / 3 == ti && present[i] {
                text += &format!(
                    "[[tenant.device]]\nname = \"dev{i}\"\npublic_key = \"{}\"\naddress = \"{}\"\nuser = \"user{i}\"\n",
                    c.key.public_key(),
                    c.inner
                );
            }
        }
    }
    Config::from_toml(&text, Path::new("/test/gateway.toml")).unwrap()
}

/// The flow a delivered packet belongs to: tenant number of its sender and its endpoints in canonical order.
type SimKey = (usize, u8, (IpAddr, u16), (IpAddr, u16));

fn sim_key(tenant: usize, protocol: u8, a: (IpAddr, u16), b: (IpAddr, u16)) -> SimKey {
    if a <= b {
        (tenant, protocol, a, b)
    } else {
        (tenant, protocol, b, a)
    }
}

/// One simulated packet from client `from`: a tagged payload names its sender and a unique id.
fn sim_packet(rng: &mut SimRng, from: &Client, from_idx: usize, to: IpAddr, id: u64) -> Vec<u8> {
    let mut payload = b"SIM".to_vec();
    payload.push(from_idx as u8);
    payload.extend_from_slice(&id.to_be_bytes());
    let (IpAddr::V4(s), IpAddr::V4(d)) = (from.inner, to) else {
        panic!("v4 only")
    };
    // Few ports, so that packets often fall into flows opened before the last reload.
    let ports = [22u16, 23, 9, 5201];
    let (sport, dport) = (40_000 + rng.below(2) as u16, ports[rng.below(ports.len())]);
    // Either direction of a connection: the simulated device plays client or server.
    let (sport, dport) = if rng.below(3) == 0 {
        (dport, sport)
    } else {
        (sport, dport)
    };
    let b = PacketBuilder::ipv4(s.octets(), d.octets(), 64);
    let mut out = Vec::new();
    match rng.below(4) {
        0 => b.udp(sport, dport).write(&mut out, &payload).unwrap(),
        1 => b
            .icmpv4_echo_request(rng.below(2) as u16, 1)
            .write(&mut out, &payload)
            .unwrap(),
        _ => {
            let seq = rng.next() as u32;
            let mut t = b.tcp(sport, dport, seq, 64_000);
            let (flags, data) = match rng.below(6) {
                0 => ("S", false),
                1 => ("SA", false),
                2 => ("FA", false),
                3 => ("R", false),
                _ => ("A", true),
            };
            for f in flags.chars() {
                t = match f {
                    'S' => t.syn(),
                    'A' => t.ack(rng.next() as u32),
                    'F' => t.fin(),
                    _ => t.rst(),
                };
            }
            t.write(&mut out, if data { &payload } else { &[] })
                .unwrap()
        }
    }
    out
}

/// Issue 10: a deterministic in-memory simulation of the core. Six devices in two tenants with the same
/// address pool send random TCP, UDP and ICMP to each other's addresses (so to same-address devices of the
/// other tenant too), while reloads switch rule sets, devices are removed and come back, and the virtual clock
/// jumps past timeouts. After every step: no tagged packet crossed tenants; every delivered packet belongs to a
/// flow whose *current* policy allows it and whose initiator still exists; at the end every flow has exactly
/// one end record, counting at least the packets the devices received on it. Nothing panics.
#[test]
fn simulation_keeps_tenants_apart_and_flows_within_current_policy() {
    for seed in 1..=6u64 {
        simulate(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 600);
    }
}

fn simulate(seed: u64, steps: usize) {
    let specs = [
        ("acme", "198.18.1.1:4000", "100.96.0.2"),
        ("acme", "198.18.1.2:4000", "100.96.0.3"),
        ("acme", "198.18.1.3:4000", "100.96.0.4"),
        ("globex", "198.18.2.1:4000", "100.96.0.2"),
        ("globex", "198.18.2.2:4000", "100.96.0.3"),
        ("globex", "198.18.2.3:4000", "100.96.0.4"),
    ];
    let mut net = Net::new(&specs);
    let mut rng = SimRng(seed | 1);
    let mut present = [true; 6];
    let mut rules = [0usize, 0];
    let mut cfg = sim_config(&net.clients, &present, rules);
    net.gw.apply(&cfg, net.now(), &mut net.tx);
    for i in 0..6 {
        net.handshake(i);
    }
    let mut seen = [0usize; 6];
    let mut flows: HashMap<SimKey, FlowSeq> = HashMap::new();
    let mut starts: HashMap<FlowSeq, FlowStart> = HashMap::new();
    let mut delivered: HashMap<FlowSeq, u64> = HashMap::new();
    let mut ends: HashMap<FlowSeq, u64> = HashMap::new();
    let mut next_id = 0u64;
    let mut end_packets: HashMap<FlowSeq, u64> = HashMap::new();
    for step in 0..steps {
        match rng.below(20) {
            0 => {
                rules = [rng.below(SIM_RULES.len()), rng.below(SIM_RULES.len())];
                cfg = sim_config(&net.clients, &present, rules);
                net.gw.apply(&cfg, net.now(), &mut net.tx);
                net.settle();
            }
            1 => {
                // Removed devices come back soon, so that most of the time most devices talk.
                let absent: Vec<usize> = (0..6).filter(|&i| !present[i]).collect();
                let i = if !absent.is_empty() && rng.below(3) > 0 {
                    absent[rng.below(absent.len())]
                } else {
                    rng.below(6)
                };
                present[i] = !present[i];
                cfg = sim_config(&net.clients, &present, rules);
                net.gw.apply(&cfg, net.now(), &mut net.tx);
                net.settle();
                if present[i] {
                    net.handshake(i);
                }
            }
            2 => {
                net.skew += Duration::from_secs(rng.below(90) as u64);
                let now = net.now();
                net.gw.handle_timeout(now, &mut net.tx);
                net.settle();
            }
            _ => {
                let from = rng.below(6);
                let to = net.clients[rng.below(6)].inner;
                next_id += 1;
                let pkt = sim_packet(&mut rng, &net.clients[from], from, to, next_id);
                if net.clients[from].inner != to {
                    net.send(from, &pkt);
                }
            }
        }
        // Events first: a packet's flow starts in the same step that delivers it.
        let evs = events(&mut net);
        for e in evs {
            match e {
                FlowEvent::Start(s) => {
                    let t = usize::from(s.tenant.as_str() == "globex");
                    flows.insert(
                        sim_key(t, s.protocol, (s.src, s.sport), (s.dst, s.dport)),
                        s.seq,
                    );
                    starts.insert(s.seq, *s);
                }
                FlowEvent::End { seq, packets, .. } => {
                    let n = ends.entry(seq).or_default();
                    *n += 1;
                    assert_eq!(*n, 1, "seed {seed} step {step}: flow {seq} ended twice");
                    end_packets.insert(seq, packets[0] + packets[1]);
                }
                _ => {}
            }
        }
        for (ci, c) in net.clients.iter().enumerate() {
            for p in &c.inbox[seen[ci]..] {
                let Some((sender, key)) = sim_tagged(p, ci / 3) else {
                    continue;
                };
                assert_eq!(
                    sender / 3,
                    ci / 3,
                    "seed {seed} step {step}: dev{sender}'s packet reached dev{ci} of another tenant"
                );
                let Some(&seq) = flows.get(&key) else {
                    panic!("seed {seed} step {step}: dev{ci} got a packet of no flow: {key:?}")
                };
                let s = &starts[&seq];
                let t = &cfg.tenants[ci / 3];
                let Some(dev) = t.devices.iter().find(|d| d.name == s.device) else {
                    panic!(
                        "seed {seed} step {step}: a packet of flow {seq} reached dev{ci} after its initiator {} left",
                        s.device
                    )
                };
                let decision = Policy::compile(t).evaluate(
                    &Subject {
                        user: &dev.user,
                        groups: &dev.groups,
                        device: &dev.name,
                    },
                    &Target {
                        dst: s.dst,
                        protocol: s.protocol,
                        dport: packet::Transport::has_ports(s.protocol).then_some(s.dport),
                    },
                );
                assert_eq!(
                    decision.action,
                    Action::Allow,
                    "seed {seed} step {step}: flow {seq} ({key:?}, rule {}) forwarded under rules {rules:?}",
                    s.rule
                );
                *delivered.entry(seq).or_default() += 1;
            }
            seen[ci] = c.inbox.len();
        }
    }
    net.gw.shutdown(net.now());
    let evs = events(&mut net);
    for e in evs {
        if let FlowEvent::End { seq, packets, .. } = e {
            let n = ends.entry(seq).or_default();
            *n += 1;
            assert_eq!(*n, 1, "seed {seed}: flow {seq} ended twice");
            end_packets.insert(seq, packets[0] + packets[1]);
        }
    }
    for seq in starts.keys() {
        assert_eq!(
            ends.get(seq),
            Some(&1),
            "seed {seed}: flow {seq} has no end"
        );
    }
    for (seq, n) in &delivered {
        assert!(
            end_packets[seq] >= *n,
            "seed {seed}: flow {seq} delivered {n} packets but counted {}",
            end_packets[seq]
        );
    }
    assert!(
        delivered.values().sum::<u64>() > steps as u64 / 30,
        "seed {seed}: too few packets delivered ({}) for the checks to mean anything",
        delivered.values().sum::<u64>()
    );
}

/// The sender and flow of a simulated packet delivered to a device of tenant `tenant`.
fn sim_tagged(p: &[u8], tenant: usize) -> Option<(usize, SimKey)> {
    let v = packet::parse_ip(p).ok()?;
    let t = packet::parse_transport(p, &v).ok()?;
    let l4 = &p[v.l4_offset..v.len];
    let payload = match v.protocol {
        packet::PROTO_TCP => &l4[usize::from(l4[12] >> 4) * 4..],
        _ => &l4[8..],
    };
    if payload.len() != 12 || &payload[..3] != b"SIM" {
        return None;
    }
    let key = sim_key(tenant, v.protocol, (v.src, t.sport), (v.dst, t.dport));
    Some((usize::from(payload[3]), key))
}

/// Idle devices cost nothing per tick: only peers with a session (or a handshake, or packets queued) have their
/// timers run, and a removed device leaves the set at once.
#[test]
fn timers_run_only_for_active_peers() {
    let mut net = two_tenants();
    let timed = |net: &mut Net| {
        net.run_timers();
        net.metrics.global.peers_timed.get()
    };
    assert_eq!(
        timed(&mut net),
        0,
        "four devices configured, none connected"
    );
    // A forged data packet naming device 1's receiver index arms nothing: only what boringtun authenticates.
    let mut forged = vec![4u8, 0, 0, 0];
    forged.extend_from_slice(&(1u32 << (8 + WORKER_BITS)).to_le_bytes());
    forged.extend_from_slice(&[0u8; 40]);
    net.deliver("198.18.9.9:666".parse().unwrap(), &forged);
    assert_eq!(timed(&mut net), 0, "a forgery armed a peer");
    net.handshake(0);
    assert_eq!(timed(&mut net), 1);
    net.handshake(2);
    assert_eq!(timed(&mut net), 2);
    // A packet to a device without an endpoint arms nothing (it is dropped as offline).
    let (a, b) = (ip("100.96.0.2"), ip("100.96.0.3"));
    net.send(0, &tcp(a, 40000, b, 5201, 100, "S", b""));
    assert_eq!(timed(&mut net), 2);
    // The connected devices still get their timers' keepalives and rekeys: the set is what runs, not a count.
    assert_eq!(net.gw.timed.len(), 2);
    // Device 0 removed by a reload: it leaves the set without waiting for its session to expire.
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    cfg.tenants[0].devices.retain(|d| d.name.as_str() != "dev0");
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    assert_eq!(timed(&mut net), 1);
}

// ---- connected on-ramp subjects (SEQPACKET connections) ----

fn grant(tenant: &str, prefix: &str, site: Option<&str>) -> conn::ConnGrant {
    conn::ConnGrant {
        tenant: TenantId::parse(tenant).unwrap(),
        prefixes: vec![prefix.parse().unwrap()],
        name: DeviceName::onramp_subject("warp", site, None),
        user: UserName::parse("onramp:warp").unwrap(),
        groups: vec!["sites".into()],
        mtu: None,
    }
}

#[test]
fn a_packet_larger_than_a_sites_mtu_is_answered_with_fragmentation_needed() {
    let mut net = two_tenants();
    net.handshake(0);
    let now = net.now();
    let site = net
        .gw
        .open_conn(
            now,
            conn::ConnGrant {
                mtu: Some(576),
                ..grant("acme", "10.7.0.0/16", Some("branch-7"))
            },
        )
        .unwrap();
    // Positive control: a packet that fits reaches the site.
    net.send(0, &udp(ip("100.96.0.2"), ip("10.7.0.5"), &[7; 500]));
    let out = conn_out(&mut net);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, site);
    // Too big: not sent (never fragmented), the device is told the site's MTU.
    net.send(0, &udp(ip("100.96.0.2"), ip("10.7.0.5"), &[7; 1000]));
    assert!(conn_out(&mut net).is_empty());
    let icmp = net.clients[0]
        .inbox
        .last()
        .expect("an ICMP error to the device");
    assert_eq!((icmp[9], icmp[20], icmp[21]), (1, 3, 4), "{icmp:?}");
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 576);
    assert_eq!(
        &icmp[12..16],
        &[100, 96, 0, 1],
        "from the tenant's gateway address"
    );
    assert_eq!(&icmp[16..20], &[100, 96, 0, 2]);
    assert_eq!(net.tenant("acme").drops(DropReason::GueTooBig), 1);
}

/// Packets the core queued for connections, drained.
fn conn_out(net: &mut Net) -> Vec<(PeerSlot, Vec<u8>)> {
    let q = net.gw.conn_queue();
    let out = q.iter().map(|(s, p)| (s, p.to_vec())).collect();
    q.clear();
    out
}

fn conn_send(net: &mut Net, slot: PeerSlot, mut pkt: Vec<u8>) -> bool {
    let now = net.now();
    let ok = net.gw.handle_conn_packet(now, slot, &mut pkt, &mut net.tx);
    net.settle();
    ok
}

fn echo_reply(src: IpAddr, dst: IpAddr, seq: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .icmpv4_echo_reply(1, seq)
        .write(&mut out, b"ping")
        .unwrap();
    out
}

#[test]
fn conn_reaches_a_device_of_its_tenant_and_the_reply_comes_back_on_the_connection() {
    let mut net = two_tenants();
    net.handshake(0);
    let now = net.now();
    let slot = net
        .gw
        .open_conn(now, grant("acme", "10.7.0.0/16", Some("branch-7")))
        .unwrap();
    assert!(conn_send(
        &mut net,
        slot,
        ping(ip("10.7.0.5"), ip("100.96.0.2"), 1)
    ));
    assert_eq!(net.clients[0].inbox.len(), 1, "the device got the ping");
    net.send(0, &echo_reply(ip("100.96.0.2"), ip("10.7.0.5"), 1));
    let out = conn_out(&mut net);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, slot);
    assert_eq!(&out[0].1[12..16], &[100, 96, 0, 2]);
    // The flow names the on-ramp subject and its policy identity.
    let evs = events(&mut net);
    let start = evs
        .iter()
        .find_map(|e| match e {
            FlowEvent::Start(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(start.device.as_str(), "warp/branch-7");
    assert_eq!(start.user.as_str(), "onramp:warp");
    assert_eq!(start.dst_device.as_ref().unwrap().as_str(), "dev0");
    // A device may start a flow to the connection's prefix too.
    net.send(0, &udp(ip("100.96.0.2"), ip("10.7.1.1"), b"to site"));
    let out = conn_out(&mut net);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0].1[28..], b"to site");
}

#[test]
fn conn_with_identical_prefixes_in_two_tenants_never_crosses() {
    let mut net = two_tenants();
    for i in 0..4 {
        net.handshake(i);
    }
    let now = net.now();
    let acme = net
        .gw
        .open_conn(now, grant("acme", "10.7.0.0/16", None))
        .unwrap();
    let globex = net
        .gw
        .open_conn(now, grant("globex", "10.7.0.0/16", None))
        .unwrap();
    // Both connections send to the same inner address: each reaches its own tenant's device only.
    assert!(conn_send(
        &mut net,
        acme,
        udp(ip("10.7.0.5"), ip("100.96.0.2"), b"acme")
    ));
    assert!(conn_send(
        &mut net,
        globex,
        udp(ip("10.7.0.5"), ip("100.96.0.2"), b"globex")
    ));
    assert_eq!(net.clients[0].inbox.len(), 1);
    assert_eq!(&net.clients[0].inbox[0][28..], b"acme");
    assert_eq!(net.clients[2].inbox.len(), 1);
    assert_eq!(&net.clients[2].inbox[0][28..], b"globex");
    // Each tenant's device reaches its own tenant's connection only.
    net.send(0, &udp(ip("100.96.0.2"), ip("10.7.9.9"), b"to acme site"));
    net.send(2, &udp(ip("100.96.0.2"), ip("10.7.9.9"), b"to globex site"));
    let out = conn_out(&mut net);
    assert_eq!(out.len(), 2, "{out:?}");
    for (slot, p) in out {
        let want: &[u8] = if slot == acme {
            b"to acme site"
        } else {
            assert_eq!(slot, globex);
            b"to globex site"
        };
        assert_eq!(&p[28..], want);
    }
}

#[test]
fn conn_spoofing_a_device_address_or_sending_garbage_is_dropped_and_counted() {
    let mut net = two_tenants();
    net.handshake(0);
    net.handshake(1);
    let now = net.now();
    let slot = net
        .gw
        .open_conn(now, grant("acme", "10.7.0.0/16", None))
        .unwrap();
    // Attack: a source outside the grant (the address of device 1).
    assert!(conn_send(
        &mut net,
        slot,
        udp(ip("100.96.0.3"), ip("100.96.0.2"), b"spoof")
    ));
    assert!(net.clients[0].inbox.is_empty());
    assert_eq!(net.tenant("acme").drops(DropReason::SpoofedSource), 1);
    // Garbage: reported to the shell (which closes after a bound) and counted.
    assert!(!conn_send(&mut net, slot, b"not an ip packet".to_vec()));
    assert!(!conn_send(&mut net, slot, vec![]));
    assert_eq!(net.tenant("acme").drops(DropReason::InvalidInnerPacket), 2);
    // Positive control: its own source goes through.
    assert!(conn_send(
        &mut net,
        slot,
        udp(ip("10.7.0.5"), ip("100.96.0.2"), b"ok")
    ));
    assert_eq!(net.clients[0].inbox.len(), 1);
    // A WireGuard datagram naming the connection's slot as receiver index is unknown.
    assert!(net.gw.slot_of(slot.get() << (8 + WORKER_BITS)).is_none());
}

#[test]
fn closing_a_conn_ends_its_flows_and_its_routes() {
    let mut net = two_tenants();
    net.handshake(0);
    let now = net.now();
    let slot = net
        .gw
        .open_conn(now, grant("acme", "10.7.0.0/16", None))
        .unwrap();
    assert!(conn_send(
        &mut net,
        slot,
        udp(ip("10.7.0.5"), ip("100.96.0.2"), b"x")
    ));
    let _ = events(&mut net);
    let now = net.now();
    net.gw.close_conn(now, slot, &mut net.tx);
    let evs = events(&mut net);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            FlowEvent::End {
                reason: EndReason::PeerRemoved,
                ..
            }
        )),
        "{evs:?}"
    );
    // Nothing routes to the closed connection any more, and its slot takes no packets.
    net.send(0, &udp(ip("100.96.0.2"), ip("10.7.0.5"), b"late"));
    assert!(conn_out(&mut net).is_empty());
    assert_eq!(net.tenant("acme").drops(DropReason::NoRoute), 1);
    assert!(!conn_send(
        &mut net,
        slot,
        udp(ip("10.7.0.5"), ip("100.96.0.2"), b"x")
    ));
}

#[test]
fn reload_keeps_conns_of_remaining_tenants_and_ends_those_of_removed_ones() {
    let mut net = two_tenants();
    net.handshake(0);
    let now = net.now();
    let acme = net
        .gw
        .open_conn(now, grant("acme", "10.7.0.0/16", None))
        .unwrap();
    let globex = net
        .gw
        .open_conn(now, grant("globex", "10.7.0.0/16", None))
        .unwrap();
    let tenants = ["acme", "acme", "globex", "globex"];
    let mut cfg = config_for(&net.clients, &tenants);
    // globex goes, and acme moves to index 1 (after a new tenant).
    cfg.tenants.retain(|t| t.id.as_str() == "acme");
    let mut other = cfg.tenants[0].clone();
    other.id = TenantId::parse("initech").unwrap();
    other.devices.clear();
    cfg.tenants.insert(0, other);
    net.gw.apply(&cfg, Instant::now(), &mut net.tx);
    let mut ended = Vec::new();
    net.gw.take_ended_conns(&mut ended);
    assert_eq!(ended, vec![globex]);
    assert!(conn_send(
        &mut net,
        acme,
        udp(ip("10.7.0.5"), ip("100.96.0.2"), b"still")
    ));
    assert_eq!(net.clients[0].inbox.len(), 1);
    assert!(net
        .gw
        .open_conn(net.now(), grant("globex", "10.7.0.0/16", None))
        .is_none());
}

/// `rampart_peers` counts devices, not their routes: a dual-stack device has two addresses and is one peer.
#[test]
fn peers_gauge_counts_dual_stack_devices_once() {
    let keys: Vec<PrivateKey> = (0..2).map(|_| PrivateKey::generate()).collect();
    let mut text =
        String::from("[gateway]\nlisten = \"198.18.0.1:51820\"\nstate_dir = \"/nonexistent\"\n");
    text += "[[tenant]]\nid = \"acme\"\naddress_pool = [\"100.96.0.0/24\", \"fd00:96::/64\"]\n\
             gateway_address = [\"100.96.0.1\", \"fd00:96::1\"]\n";
    for (i, k) in keys.iter().enumerate() {
        text += &format!(
            "[[tenant.device]]\nname = \"dev{i}\"\npublic_key = \"{}\"\naddress = \"100.96.0.{}\"\nuser = \"u\"\n",
            k.public_key(),
            i + 2
        );
    }
    let cfg = Config::from_toml(&text, Path::new("/test/gateway.toml")).unwrap();
    assert!(
        cfg.tenants[0]
            .devices
            .iter()
            .all(|d| d.address_v6.is_some()),
        "control: the devices are dual stack"
    );
    let metrics = Arc::new(Metrics::default());
    let mut gw = Gateway::new(0, &PrivateKey::generate(), metrics.clone(), Instant::now());
    gw.apply(&cfg, Instant::now(), &mut TxQueue::new());
    let peers: Vec<u64> = metrics
        .tenants()
        .iter()
        .map(|(_, c)| c.peers.get())
        .collect();
    assert_eq!(peers, vec![2], "two devices, four routes");
}
