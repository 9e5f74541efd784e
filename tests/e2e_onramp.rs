//! End-to-end acceptance of issue 2 (the WireGuard on-ramp): real wireguard-go clients in
//! network namespaces, each configured only from what `rampart device add` printed, talking to
//! a real `rampart run` process. Root only; see `support/mod.rs` for the harness rules.
//!
//! Run: `cargo test --test e2e_onramp -- --test-threads=1`
//! Debug: `RAMPART_E2E_KEEP=1` keeps the temp dirs (logs, configs), `RAMPART_E2E_LOG` sets the
//! gateway's log filter (default `debug`).

mod support;

use std::time::{Duration, Instant};

use support::probe::{
    exchange, exchange_server, finish_ping, hsflood, ident_log, ident_probe, ident_server,
    parse_json_line, spawn_ping, udp_log, udp_receiver, udp_send,
};
use support::{ping, ping_once, poll_until, wait_ping, wait_until, Lab, TenantSpec};

const GW_ADDR: &str = "100.96.0.1";
/// Deadline for a fresh tunnel to pass its first packet.
const TUNNEL_UP: Duration = Duration::from_secs(30);
const DROPPED: &str = "rampart_dropped_packets_total";

fn acme() -> TenantSpec {
    TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR)
}

fn globex() -> TenantSpec {
    TenantSpec::new("globex", "100.96.0.0/24", GW_ADDR)
}

/// Does `v` (the output of `device list --json`) contain a device called `name`?
fn lists_device(v: &serde_json::Value, name: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("name").and_then(|n| n.as_str()) == Some(name)
                || m.values().any(|x| lists_device(x, name))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| lists_device(x, name)),
        _ => false,
    }
}

#[test]
fn client_pings_its_tenant_gateway_address() {
    let mut lab = Lab::new(&[acme()]);
    let laptop = lab.add_client("acme", "laptop");
    assert_eq!(
        laptop.config.allowed_ips,
        ["100.96.0.0/24"],
        "AllowedIPs should be the tenant's pool:\n{}",
        laptop.config.text
    );
    let first = wait_ping(&laptop.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway address");
    eprintln!("first echo reply after {first:?}");

    let st = ping(&laptop.ns, GW_ADDR, 5, 0.2, 3, None);
    assert!(
        st.received >= 4,
        "gateway address stopped answering: {}",
        st.output
    );
    // Nothing answers for a free address of the pool (so the replies above came from the
    // gateway's responder, not from some catch-all).
    let free = ping(&laptop.ns, "100.96.0.77", 2, 0.2, 1, None);
    assert_eq!(
        free.received, 0,
        "a free pool address answered: {}",
        free.output
    );

    assert!(
        laptop.latest_handshake() > 0,
        "wireguard-go saw no handshake"
    );
    let m = lab.gateway.metrics();
    let acme = [("tenant", "acme")];
    assert!(m.value("rampart_handshakes_total", &acme) >= 1.0);
    assert!(m.value("rampart_rx_packets_total", &acme) >= 5.0);
    assert!(m.value("rampart_tx_packets_total", &acme) >= 4.0);
    assert!(m.value("rampart_rx_bytes_total", &acme) > 0.0);
    assert!(m.value("rampart_tx_bytes_total", &acme) > 0.0);
    assert_eq!(m.value("rampart_peers", &acme), 1.0);
    // The data path's syscall counters: every receive call that returned brought at least one datagram, and
    // every datagram sent went out in some sendmmsg call.
    let (rx, rx_calls) = (
        m.value("rampart_datagrams_received_total", &[]),
        m.value("rampart_udp_receive_calls_total", &[]),
    );
    let (tx, tx_calls) = (
        m.value("rampart_datagrams_sent_total", &[]),
        m.value("rampart_udp_send_calls_total", &[]),
    );
    assert!(
        rx_calls >= 1.0 && rx >= rx_calls && tx_calls >= 1.0 && tx >= tx_calls,
        "datagrams {rx} in {rx_calls} receive calls, {tx} in {tx_calls} send calls"
    );
    assert!(m.value("rampart_datapath_wakeups_total", &[]) >= rx_calls);

    let status = lab
        .gateway
        .terminate(Duration::from_secs(10))
        .expect("gateway did not exit within 10 s of SIGTERM");
    assert!(status.success(), "gateway exited with {status} on SIGTERM");
}

#[test]
fn two_devices_of_one_tenant_exchange_50_mb_over_tcp_with_matching_sha256() {
    const BYTES: u64 = 50 * 1024 * 1024;
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "alice");
    let b = lab.add_client("acme", "bob");
    // Both devices have talked to the gateway, so it knows where they are.
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "alice -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "bob -> gateway");
    let b_addr = b.address().to_string();
    wait_ping(&a.ns, &b_addr, TUNNEL_UP, "alice -> bob through the relay");

    let dir = lab.dir().to_path_buf();
    let mut server = exchange_server(&b.ns, &dir, &b_addr, 5001, BYTES);
    let start = Instant::now();
    let (alice, bob) = exchange(
        &a.ns,
        &dir,
        &mut server,
        &b_addr,
        5001,
        BYTES,
        Duration::from_secs(180),
    );
    eprintln!(
        "exchanged {} MiB each way in {:?}",
        BYTES >> 20,
        start.elapsed()
    );
    assert_eq!((alice.sent, bob.sent), (BYTES, BYTES));
    assert_eq!(bob.recv, BYTES, "bob received a different amount");
    assert_eq!(alice.recv, BYTES, "alice received a different amount");
    assert_eq!(bob.recv_sha256, alice.sent_sha256, "alice -> bob corrupted");
    assert_eq!(alice.recv_sha256, bob.sent_sha256, "bob -> alice corrupted");

    let m = lab.gateway.metrics();
    let rx = m.value("rampart_rx_bytes_total", &[("tenant", "acme")]);
    assert!(
        rx >= 2.0 * BYTES as f64,
        "rx_bytes {rx} < the {} bytes relayed",
        2 * BYTES
    );
}

#[test]
fn tenants_with_identical_pools_reach_only_their_own_devices() {
    const PORT: u16 = 7000;
    let mut lab = Lab::new(&[acme(), globex()]);
    let a2 = lab.add_client("acme", "a2");
    let a3 = lab.add_client("acme", "a3");
    let g2 = lab.add_client("globex", "g2");
    let g3 = lab.add_client("globex", "g3");
    assert_eq!(a2.address(), g2.address(), "precondition: shared addresses");
    assert_eq!(a3.address(), g3.address(), "precondition: shared addresses");
    assert_ne!(a2.address(), a3.address());
    let all = [&a2, &a3, &g2, &g3];
    for c in all {
        wait_ping(&c.ns, GW_ADDR, TUNNEL_UP, &format!("{} -> gateway", c.name));
    }
    let dir = lab.dir().to_path_buf();
    let id = |c: &support::wg_client::WgClient| format!("{}/{}", c.tenant, c.name);
    let _servers: Vec<_> = all
        .iter()
        .map(|c| {
            ident_server(
                &c.ns,
                &dir,
                &format!("ident-{}", c.name),
                &c.address().to_string(),
                PORT,
                &id(c),
            )
        })
        .collect();

    for (src, dst) in [(&a2, &a3), (&a3, &a2), (&g2, &g3), (&g3, &g2)] {
        let to = dst.address().to_string();
        let (first, _) = wait_until(
            &format!("{} -> {to} to answer", id(src)),
            TUNNEL_UP,
            Duration::from_millis(200),
            || ident_probe(&src.ns, &to, PORT, &id(src)).ok(),
        );
        assert_eq!(first, id(dst), "{} reached the wrong host at {to}", id(src));
        for _ in 0..3 {
            let again = ident_probe(&src.ns, &to, PORT, &id(src));
            assert_eq!(again, Ok(id(dst)), "{} -> {to}", id(src));
        }
    }

    // Take acme's .3 away: acme's .2 must not fall through to globex's .3.
    lab.gateway.device_remove("acme", "a3");
    let a3_addr = a3.address().to_string();
    for _ in 0..4 {
        let r = ident_probe(&a2.ns, &a3_addr, PORT, &id(&a2));
        assert!(
            r.is_err(),
            "acme/a2 reached {r:?} at {a3_addr} after acme/a3 was removed"
        );
    }

    for c in all {
        let log = ident_log(&dir, &format!("ident-{}", c.name));
        assert!(!log.trim().is_empty(), "{} was never reached", id(c));
        for line in log.lines() {
            assert!(
                line.starts_with(&format!("from={}/", c.tenant)),
                "{} was reached from another tenant: {line}",
                id(c)
            );
        }
    }
}

#[test]
fn spoofed_source_address_is_dropped_and_counted() {
    const PORT: u16 = 9000;
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "mallory");
    let b = lab.add_client("acme", "victim");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "mallory -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "victim -> gateway");
    let dir = lab.dir().to_path_buf();
    let (a_addr, b_addr) = (a.address().to_string(), b.address().to_string());
    let _rx = udp_receiver(&b.ns, &dir, "udp-victim", "0.0.0.0", PORT);

    // Control: from the assigned address datagrams do arrive (so the check below can fail).
    udp_send(&a.ns, &a_addr, &b_addr, PORT, 5, "legit-before");
    wait_until(
        "legit datagrams to reach the victim",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || (udp_log(&dir, "udp-victim").matches("legit-before").count() == 5).then_some(()),
    );

    // Extra addresses on mallory's WireGuard interface: one unassigned inside the tenant pool,
    // one outside it.
    for spoof in ["100.96.0.200/32", "100.97.0.9/32"] {
        a.ns.ip(&["addr", "add", spoof, "dev", &a.ifname]);
    }
    let labels = [("tenant", "acme"), ("reason", "spoofed_source")];
    let before = lab.gateway.metrics().sum_or_zero(DROPPED, &labels);
    udp_send(&a.ns, "100.96.0.200", &b_addr, PORT, 10, "spoof-in-pool");
    udp_send(&a.ns, "100.97.0.9", &b_addr, PORT, 10, "spoof-outside-pool");
    let ok = ping(&a.ns, GW_ADDR, 1, 0.2, 2, Some(&a_addr));
    assert_eq!(
        ok.received, 1,
        "mallory's tunnel does not answer: {}",
        ok.output
    );
    let echo = ping(&a.ns, GW_ADDR, 3, 0.2, 1, Some("100.96.0.200"));
    assert_eq!(
        echo.received, 0,
        "gateway answered a spoofed echo: {}",
        echo.output
    );

    let sent = 23.0;
    let (after, _) = wait_until(
        "spoofed_source drops to be counted",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let v = lab.gateway.metrics().sum_or_zero(DROPPED, &labels);
            (v >= before + sent).then_some(v)
        },
    );
    eprintln!("spoofed_source drops: {before} -> {after}");

    // Datagrams from the real address sent afterwards take the same path; once they are in,
    // any spoofed datagram that got through would be too.
    udp_send(&a.ns, &a_addr, &b_addr, PORT, 5, "legit-after");
    wait_until(
        "legit datagrams after the spoofing to reach the victim",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || (udp_log(&dir, "udp-victim").matches("legit-after").count() == 5).then_some(()),
    );
    let log = udp_log(&dir, "udp-victim");
    assert!(
        !log.contains("spoof"),
        "spoofed datagrams were relayed:\n{log}"
    );
    for line in log.lines() {
        assert!(
            line.starts_with(&format!("{a_addr} ")),
            "unexpected source: {line}"
        );
    }
    let m = lab.gateway.metrics();
    assert_eq!(
        m.sum_or_zero(DROPPED, &[("tenant", ""), ("reason", "spoofed_source")]),
        0.0,
        "spoofed packets from a known device must be attributed to its tenant"
    );
}

#[test]
fn client_moving_to_a_new_underlay_address_and_port_keeps_its_session() {
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "roamer");
    let b = lab.add_client("acme", "desk");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "roamer -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "desk -> gateway");
    let a_addr = a.address().to_string();
    wait_ping(&b.ns, &a_addr, TUNNEL_UP, "desk -> roamer");
    let handshake = a.latest_handshake();
    assert!(handshake > 0);

    // Wi-Fi -> LTE: a new link with a new address becomes the way to the gateway, then the
    // old address disappears (wireguard-go drops its sticky source on EINVAL).
    let (new_addr, next_hop) = lab.add_second_link(&a);
    a.ns.ip(&[
        "route",
        "replace",
        "198.18.0.1/32",
        "via",
        &next_hop.to_string(),
        "dev",
        "eth1",
    ]);
    a.ns.ip(&["addr", "del", &format!("{}/24", a.underlay), "dev", "eth0"]);
    let t = wait_ping(
        &a.ns,
        GW_ADDR,
        Duration::from_secs(20),
        "roamer after the move",
    );
    eprintln!("roamer ({} -> {new_addr}) answered after {t:?}", a.underlay);
    // The gateway now sends to the new endpoint, also for relayed traffic.
    let t = wait_ping(
        &b.ns,
        &a_addr,
        Duration::from_secs(10),
        "desk -> moved roamer",
    );
    eprintln!("desk reached the moved roamer after {t:?}");
    let rx_new_link = lab
        .gw_ns
        .run(
            "cat",
            &[&format!("/sys/class/net/r{}/statistics/rx_packets", a.link)],
            Duration::from_secs(10),
        )
        .expect_ok();
    assert!(
        rx_new_link.trim().parse::<u64>().unwrap_or(0) > 0,
        "no traffic arrived over the new link: {rx_new_link}"
    );

    // Same client, new listen port (a NAT rebinding looks like this).
    a.wg(&["set", &a.ifname, "listen-port", "51999"])
        .expect_ok();
    let t = wait_ping(
        &a.ns,
        GW_ADDR,
        Duration::from_secs(20),
        "roamer after the port change",
    );
    eprintln!("roamer on port 51999 answered after {t:?}");
    wait_ping(
        &b.ns,
        &a_addr,
        Duration::from_secs(10),
        "desk -> roamer on its new port",
    );
    let st = ping(&b.ns, &a_addr, 5, 0.2, 2, None);
    assert!(
        st.received >= 4,
        "relay to the moved roamer is lossy: {}",
        st.output
    );

    assert_eq!(
        a.latest_handshake(),
        handshake,
        "the roamer had to handshake again: the gateway did not follow the roamed endpoint"
    );
}

#[test]
fn forged_data_packets_from_elsewhere_do_not_redirect_a_device() {
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "victim");
    let b = lab.add_client("acme", "peer");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "victim -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "peer -> gateway");
    let a_addr = a.address().to_string();
    wait_ping(&b.ns, &a_addr, TUNNEL_UP, "peer -> victim");
    let attacker = lab.add_host("atk");
    let dir = lab.dir().to_path_buf();
    let forged = |m: &support::metrics::Metrics| {
        ["decrypt_failed", "no_session"]
            .iter()
            .map(|r| m.sum_or_zero(DROPPED, &[("tenant", "acme"), ("reason", r)]))
            .sum::<f64>()
    };
    let before = forged(&lab.gateway.metrics());

    // Data messages with garbage ciphertext for every receiver index of the first peer slots:
    // if the gateway moved a peer's endpoint on an unauthenticated packet, the relayed echo
    // requests below would go to the attacker instead of the victim.
    let endpoint = lab.endpoint();
    let mut forge = hsflood(
        &attacker.ns,
        &dir,
        "forge",
        &endpoint,
        &a.config.peer_public_key,
        &["--listen", "6"],
    );
    forge.wait_stdout("SENT", Duration::from_secs(60));
    let st = ping(&b.ns, &a_addr, 3, 0.3, 2, None);
    let result = parse_json_line(&forge.finish(Duration::from_secs(60)));
    eprintln!("forge: {result}; relayed echo afterwards {}/3", st.received);
    assert_eq!(
        result["other_replies"].as_u64(),
        Some(0),
        "the gateway sent traffic to the forger: {result}"
    );
    assert!(
        st.received >= 2,
        "relay to the victim broke after forged packets: {}",
        st.output
    );
    // Some forgeries hit the victim's (or peer's) live receiver index and were rejected there.
    let m = lab.gateway.metrics();
    assert!(
        forged(&m) > before,
        "no forged packet reached a live session (decrypt_failed / no_session unchanged at {before}); the \
         attack missed:\n{}",
        m.describe(DROPPED)
    );
    lab.gateway.assert_alive();
}

#[test]
fn removed_device_loses_connectivity_within_seconds() {
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "stolen");
    let b = lab.add_client("acme", "office");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "stolen -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "office -> gateway");
    let a_addr = a.address().to_string();
    wait_ping(&b.ns, &a_addr, TUNNEL_UP, "office -> stolen");
    assert!(lists_device(&lab.gateway.device_list_json(), "stolen"));
    let handshake = a.latest_handshake();
    let initiations_before = a.log().matches("Sending handshake initiation").count();
    let unknown_before = lab
        .gateway
        .metrics()
        .sum_or_zero(DROPPED, &[("reason", "unknown_peer")]);

    lab.gateway.device_remove("acme", "stolen");
    assert!(
        !lists_device(&lab.gateway.device_list_json(), "stolen"),
        "device list still shows the removed device"
    );
    let (_, t) = wait_until(
        "the removed device's tunnel to stop passing traffic",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (!ping_once(&a.ns, GW_ADDR)).then_some(()),
    );
    eprintln!("cut after {t:?}");

    // It stays cut, also once wireguard-go tries a fresh handshake with its old key (it does
    // after ~15 s of unanswered data).
    wait_until(
        "the removed device to try a new handshake",
        Duration::from_secs(45),
        Duration::from_millis(500),
        || {
            let st = ping(&a.ns, GW_ADDR, 2, 0.5, 1, None);
            assert_eq!(
                st.received, 0,
                "removed device got an answer: {}",
                st.output
            );
            (a.log().matches("Sending handshake initiation").count() > initiations_before)
                .then_some(())
        },
    );
    let st = ping(&a.ns, GW_ADDR, 4, 0.5, 2, None);
    assert_eq!(st.received, 0, "removed device reconnected: {}", st.output);
    assert_eq!(
        a.latest_handshake(),
        handshake,
        "removed device completed a handshake"
    );
    let st = ping(&b.ns, &a_addr, 3, 0.3, 1, None);
    assert_eq!(
        st.received, 0,
        "relay still reaches the removed device: {}",
        st.output
    );
    wait_ping(
        &b.ns,
        GW_ADDR,
        Duration::from_secs(10),
        "office after the removal",
    );
    let unknown = lab
        .gateway
        .metrics()
        .sum_or_zero(DROPPED, &[("reason", "unknown_peer")]);
    assert!(
        unknown > unknown_before,
        "the removed device's handshake was not counted as unknown_peer ({unknown_before} -> {unknown})"
    );
}

#[test]
fn clients_recover_after_gateway_restart_without_manual_steps() {
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "busy");
    let b = lab.add_client("acme", "idle");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "busy -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "idle -> gateway");
    let b_addr = b.address().to_string();
    wait_ping(&a.ns, &b_addr, TUNNEL_UP, "busy -> idle");
    let (hs_a, hs_b) = (a.latest_handshake(), b.latest_handshake());

    // Give the gateway a chance to persist where its peers are (it may do so periodically).
    let endpoints = lab.gateway.state_dir().join("endpoints.json");
    let persisted = poll_until(Duration::from_secs(30), Duration::from_millis(500), || {
        let s = std::fs::read_to_string(&endpoints).unwrap_or_default();
        s.contains(&b.underlay.to_string()).then_some(())
    });
    if persisted.is_none() {
        eprintln!(
            "note: {} never mentioned {}",
            endpoints.display(),
            b.underlay
        );
    }

    let old_pid = lab.gateway.pid();
    lab.gateway.kill();
    let killed = Instant::now();
    lab.gateway.start();
    assert_ne!(lab.gateway.pid(), old_pid);
    eprintln!("gateway back after {:?}", killed.elapsed());

    // `busy` keeps sending; wireguard-go re-handshakes when its data goes unanswered.
    let deadline = Duration::from_secs(45);
    let ok = poll_until(deadline, Duration::from_millis(100), || {
        ping_once(&a.ns, GW_ADDR).then_some(())
    });
    assert!(
        ok.is_some(),
        "busy client did not recover within {deadline:?} of the restart"
    );
    eprintln!(
        "busy client recovered {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        a.latest_handshake() > hs_a,
        "recovery without a new handshake?"
    );

    // `idle` only sends persistent keepalives, which do not make wireguard-go re-handshake:
    // it is reachable again only if the gateway re-initiates to its last known endpoint.
    let left = deadline.saturating_sub(killed.elapsed()) + Duration::from_secs(5);
    let ok = poll_until(left, Duration::from_millis(100), || {
        ping_once(&a.ns, &b_addr).then_some(())
    });
    assert!(
        ok.is_some(),
        "idle device not reachable from busy within {:?} of the restart (endpoint persisted \
         before the kill: {})",
        killed.elapsed(),
        persisted.is_some()
    );
    eprintln!(
        "idle device reachable {:?} after the kill",
        killed.elapsed()
    );
    assert!(b.latest_handshake() > hs_b);
}

#[test]
fn busy_client_recovers_through_its_own_rehandshake_when_restart_lost_endpoints() {
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "busy");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "busy -> gateway");
    let hs = a.latest_handshake();

    // A crash before the gateway saved where its peers are: it cannot re-initiate, so the
    // client's own rule (data sent, nothing back for 10 s + 5 s) must bring the tunnel back.
    lab.gateway.kill();
    let killed = Instant::now();
    let endpoints = lab.gateway.state_dir().join("endpoints.json");
    if endpoints.exists() {
        std::fs::remove_file(&endpoints).unwrap();
    }
    lab.gateway.start();

    let deadline = Duration::from_secs(45);
    let ok = poll_until(deadline, Duration::from_millis(100), || {
        ping_once(&a.ns, GW_ADDR).then_some(())
    });
    assert!(
        ok.is_some(),
        "busy client did not recover within {deadline:?} of a restart without saved endpoints"
    );
    eprintln!(
        "busy client recovered {:?} after the kill",
        killed.elapsed()
    );
    assert!(a.latest_handshake() > hs);
}

#[test]
fn hostile_input_and_handshake_flood_neither_crash_the_gateway_nor_stop_tunnels() {
    let mut lab = Lab::new(&[acme()]);
    let a = lab.add_client("acme", "worker");
    let b = lab.add_client("acme", "server");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "worker -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "server -> gateway");
    let a_addr = a.address().to_string();
    wait_ping(&b.ns, &a_addr, TUNNEL_UP, "server -> worker");
    let attacker = lab.add_host("atk");
    let dir = lab.dir().to_path_buf();
    let endpoint = lab.endpoint();
    // Anyone holding a client config knows the gateway key, so mac1 can be forged.
    let gw_key = a.config.peer_public_key.clone();
    let unattributed = |m: &support::metrics::Metrics| m.sum_or_zero(DROPPED, &[("tenant", "")]);
    let m0 = lab.gateway.metrics();

    // 1. Malformed datagrams, truncated and oversized handshakes.
    let out = hsflood(&attacker.ns, &dir, "junk", &endpoint, &gw_key, &[])
        .finish(Duration::from_secs(60));
    eprintln!("junk: {}", out.trim());
    lab.gateway.assert_alive();
    assert!(lab.gateway.health(), "/health failed after junk input");
    wait_ping(
        &a.ns,
        GW_ADDR,
        Duration::from_secs(10),
        "worker after junk input",
    );
    let m1 = lab.gateway.metrics();
    assert!(
        unattributed(&m1) > unattributed(&m0),
        "junk input was not counted as dropped:\n{}",
        m1.describe(DROPPED)
    );

    // 2. A bounded flood of initiations with a valid mac1.
    let mut flood = hsflood(
        &attacker.ns,
        &dir,
        "flood",
        &endpoint,
        &gw_key,
        &["--rate", "3000", "--duration", "8"],
    );
    wait_until(
        "the gateway to answer the flood with cookie replies",
        Duration::from_secs(8),
        Duration::from_millis(200),
        || {
            (lab.gateway
                .metrics()
                .sum_or_zero("rampart_cookie_replies_total", &[])
                > 0.0)
                .then_some(())
        },
    );
    assert!(
        flood.is_running(),
        "flood ended before traffic was measured"
    );
    let mut to_gw = spawn_ping(&a.ns, &dir, "ping-gw", GW_ADDR, 10, 0.2);
    let mut relay = spawn_ping(&b.ns, &dir, "ping-relay", &a_addr, 10, 0.2);
    let gw_stats = finish_ping(&mut to_gw, 10, Duration::from_secs(30));
    let relay_stats = finish_ping(&mut relay, 10, Duration::from_secs(30));
    let flood_result = parse_json_line(&flood.finish(Duration::from_secs(60)));
    eprintln!(
        "flood: {flood_result}\nduring the flood: gateway echo {}/{}, relayed echo {}/{}",
        gw_stats.received, gw_stats.transmitted, relay_stats.received, relay_stats.transmitted
    );
    lab.gateway.assert_alive();
    assert!(lab.gateway.health(), "/health failed after the flood");
    let m2 = lab.gateway.metrics();
    assert!(m2.value("rampart_cookie_replies_total", &[]) > 0.0);
    assert!(
        flood_result["cookie_replies_matching"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the flooder received no cookie reply for its initiations: {flood_result}"
    );
    assert!(
        gw_stats.received > 0,
        "no echo from the gateway during the flood: {}",
        gw_stats.output
    );
    assert!(
        relay_stats.received > 0,
        "no relayed echo during the flood: {}",
        relay_stats.output
    );

    // 3. Afterwards a new device still gets in.
    let late = lab.add_client("acme", "late");
    wait_ping(
        &late.ns,
        GW_ADDR,
        TUNNEL_UP,
        "device enrolled after the flood",
    );
    lab.gateway.assert_alive();
}

/// The device in `list` (the output of `device list --json`) called `name`.
fn listed<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("device {name} not listed: {list}"))
}

/// Issue 10 part 5: the outer WireGuard socket serves IPv6 too. The gateway listens on `[::]:51820`
/// (dual-stack); one device reaches it over an IPv6 underlay (2001:2::/48, the IPv6 benchmarking range, only
/// inside the test's namespaces) with the Endpoint `device add --endpoint` printed, another over IPv4 (a
/// v4-mapped peer address on the same socket). Both reach the gateway and each other, the gateway records each
/// device's endpoint in its own family, and the IPv6 device then roams to IPv4 and back without a new handshake.
#[test]
fn the_outer_socket_serves_ipv6_and_ipv4_devices_and_a_device_roaming_between_them() {
    use support::gateway::PORT;
    const GW_V6: &str = "2001:2::1";
    let mut lab = Lab::with_listen(&[acme()], &format!("[::]:{PORT}"), "");
    lab.gw_ns
        .ip(&["-6", "addr", "add", &format!("{GW_V6}/128"), "dev", "lo"]);
    lab.ipv6_clients = true;
    let desk = lab.add_client("acme", "desk");

    let dev = lab.device_ns("phone");
    let (l, underlay_v4) = (dev.link, dev.underlay);
    let phone_v6 = format!("2001:2:0:{l}::2");
    dev.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{phone_v6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    lab.gw_ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("2001:2:0:{l}::1/64"),
        "dev",
        &format!("v{l}"),
        "nodad",
    ]);
    dev.ns.ip(&[
        "-6",
        "route",
        "add",
        &format!("{GW_V6}/128"),
        "via",
        &format!("2001:2:0:{l}::1"),
    ]);
    // Only the IPv6 way leads to the gateway at first.
    dev.ns.ip(&["route", "del", "198.18.0.1/32"]);
    let v6_endpoint = format!("[{GW_V6}]:{PORT}");
    let config = lab.gateway.device_add_with(
        "acme",
        "phone",
        "phone@acme.example",
        &["--endpoint", &v6_endpoint],
    );
    assert_eq!(config.endpoint, v6_endpoint, "{}", config.text);
    let phone = lab.start_device(dev, "acme", "phone", config);

    wait_ping(
        &phone.ns,
        GW_ADDR,
        TUNNEL_UP,
        "phone (IPv6 underlay) -> gateway",
    );
    wait_ping(
        &desk.ns,
        GW_ADDR,
        TUNNEL_UP,
        "desk (IPv4 underlay) -> gateway",
    );
    let phone_addr = phone.address().to_string();
    let desk_addr = desk.address().to_string();
    wait_ping(&desk.ns, &phone_addr, TUNNEL_UP, "desk -> phone");
    wait_ping(&phone.ns, &desk_addr, TUNNEL_UP, "phone -> desk");
    let st = ping(&desk.ns, &phone_addr, 5, 0.2, 2, None);
    assert!(
        st.received >= 4,
        "relay to the IPv6 device is lossy: {}",
        st.output
    );

    // Endpoints as the gateway recorded them (the clients' ports are their own).
    let endpoint_host = |list: &serde_json::Value, name: &str| {
        let ep = listed(list, name)["endpoint"]
            .as_str()
            .unwrap_or("")
            .to_string();
        ep.rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or(ep)
    };
    let list = lab.gateway.device_list_json();
    assert_eq!(
        endpoint_host(&list, "phone"),
        format!("[{phone_v6}]"),
        "the gateway did not record the phone's IPv6 endpoint: {list}"
    );
    assert_eq!(
        endpoint_host(&list, "desk"),
        desk.underlay.to_string(),
        "the IPv4 device's endpoint should read as IPv4, not v4-mapped: {list}"
    );

    // IPv6 -> IPv4: the phone's way to the gateway becomes the IPv4 underlay; the gateway follows (the
    // relayed pings from the desk reach the phone) without a new handshake.
    let handshake = phone.latest_handshake();
    phone
        .wg(&[
            "set",
            &phone.ifname,
            "peer",
            &phone.config.peer_public_key,
            "endpoint",
            &format!("198.18.0.1:{PORT}"),
        ])
        .expect_ok();
    phone.ns.ip(&[
        "route",
        "add",
        "198.18.0.1/32",
        "via",
        &format!("198.18.{l}.1"),
    ]);
    phone
        .ns
        .ip(&["-6", "route", "del", &format!("{GW_V6}/128")]);
    wait_ping(
        &phone.ns,
        GW_ADDR,
        Duration::from_secs(20),
        "phone after moving to IPv4",
    );
    wait_ping(
        &desk.ns,
        &phone_addr,
        Duration::from_secs(20),
        "desk -> phone on IPv4",
    );
    wait_until(
        "the gateway to record the phone's IPv4 endpoint",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let list = lab.gateway.device_list_json();
            (endpoint_host(&list, "phone") == underlay_v4.to_string()).then_some(())
        },
    );
    assert_eq!(
        phone.latest_handshake(),
        handshake,
        "the phone had to handshake again after moving to IPv4"
    );
    lab.gateway.assert_alive();
}
