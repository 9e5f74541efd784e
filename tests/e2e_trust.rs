//! The trust boundary of the data plane (issue 10), attack first: an enrolled device that misbehaves on
//! purpose (raw packets through its own WireGuard interface, `tests/tools/rawtcp.py`) against the real
//! `rampart run`, real wireguard-go devices and real upstream servers whose bytes carry markers
//! (`tests/tools/marker.py`), so a leak is something a test can see.
//!
//! One test per finding of the security review (`../shared/reviews/code-review-0c07d1e-security.md`):
//! a device sees only its own tenant, only what policy allows right now, never the appliance itself,
//! and one device cannot take the gateway or other tenants down.
//!
//! Run: `cargo test --features test-hooks --test e2e_trust -- --test-threads=1` (root).

#[allow(unused_imports)]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::attack::{
    finish_json, marker_client, marker_events, marker_received, marker_server, parse_last_json,
    rawtcp, sniff, spawn_rawtcp, stop_json, MARKER, RAWTCP,
};
use support::gateway::ALLOW_ALL;
use support::lab::Host;
use support::netns::{link, Netns};
use support::probe::{exchange, exchange_server, finish_ping, spawn_ping, NETPROBE};
use support::process::{tail, Proc};
use support::wg_client::WgClient;
use support::{ping, wait_ping, wait_until, Lab, TenantSpec};

const TUNNEL_UP: Duration = Duration::from_secs(30);
const DROPPED: &str = "rampart_dropped_packets_total";
/// The first underlay link of a lab is 198.18.1.0/24: an upstream host added first lives at .2.
const UPSTREAM: &str = "198.18.1.2";
const UPSTREAM_NET: &str = "198.18.1.0/24";

fn tenant(id: &str, pool: &str, gw: &str, rules: &str) -> TenantSpec {
    let mut t = TenantSpec::new(id, pool, gw);
    t.rules = rules.to_string();
    t
}

/// Adds the upstream host (it must be the lab's first link) and returns it.
fn upstream_host(lab: &mut Lab) -> Host {
    let host = lab.add_host("up");
    assert_eq!(
        host.underlay.to_string(),
        UPSTREAM,
        "the upstream host must be on the lab's first link"
    );
    host
}

/// A device enrolled in `tenant` with a working tunnel.
fn device(lab: &mut Lab, tenant: &str, name: &str, gw: &str) -> WgClient {
    let c = lab.add_client(tenant, name);
    wait_ping(
        &c.ns,
        gw,
        TUNNEL_UP,
        &format!("{name} -> its gateway address"),
    );
    c
}

/// Finding H4: off-ramp connections were made from the gateway's own namespace with no destination filter, so
/// a tenant with `offramp = ["0.0.0.0/0"]` reached the appliance's loopback (the admin `/metrics` of every
/// tenant), its own underlay address and link-local metadata. None of them may be reached, and each attempt is
/// counted as `offramp_forbidden`; the same device still reaches an upstream host through the same off-ramp.
#[test]
fn offramp_never_reaches_the_appliance_itself() {
    let rules = format!("offramp = [\"0.0.0.0/0\"]\n{ALLOW_ALL}");
    let mut lab = Lab::new(&[tenant("acme", "100.96.0.0/24", "100.96.0.1", &rules)]);
    let dir = lab.dir().to_path_buf();
    let up = upstream_host(&mut lab);
    let _page = marker_server(
        &up.ns,
        &dir,
        "upstream-page",
        "http-serve",
        &[
            "--bind",
            UPSTREAM,
            "--port",
            "80",
            "--body",
            "UPSTREAM-PAGE",
        ],
    );
    // Services of the appliance itself (the gateway's namespace stands for the appliance).
    lab.gw_ns
        .ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let listeners = [
        ("loopback", "127.0.0.1", 7301, "LISTENER-LOOPBACK"),
        ("underlay", "198.18.0.1", 7302, "LISTENER-UNDERLAY"),
        ("metadata", "169.254.169.254", 7303, "LISTENER-METADATA"),
    ];
    let _servers: Vec<_> = listeners
        .iter()
        .map(|(name, addr, port, banner)| {
            marker_server(
                &lab.gw_ns,
                &dir,
                name,
                "tcp-serve",
                &[
                    "--bind",
                    addr,
                    "--port",
                    &port.to_string(),
                    "--marker",
                    banner,
                    "--banner",
                ],
            )
        })
        .collect();
    let _udp = marker_server(
        &lab.gw_ns,
        &dir,
        "loopback-udp",
        "udp-serve",
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            "7304",
            "--marker",
            "LISTENER-UDP",
            "--echo",
        ],
    );
    let dev = device(&mut lab, "acme", "laptop", "100.96.0.1");
    assert!(
        dev.config.allowed_ips.iter().any(|n| n == "0.0.0.0/0"),
        "AllowedIPs lacks the off-ramp:\n{}",
        dev.config.text
    );
    let src = dev.address().to_string();

    // Positive controls: every service answers from inside the appliance, and the device's raw connections
    // reach an upstream host through this very off-ramp.
    for (name, addr, port, banner) in listeners {
        let r = lab.gw_ns.run(
            "python3",
            &[
                MARKER,
                "tcp-hold",
                "--addr",
                addr,
                "--port",
                &port.to_string(),
                "--secs",
                "2",
            ],
            Duration::from_secs(20),
        );
        assert!(
            r.stdout.contains(banner),
            "{name} listener is not live: {r}"
        );
    }
    let r = lab.gw_ns.run(
        "python3",
        &[
            MARKER,
            "udp-hold",
            "--addr",
            "127.0.0.1",
            "--port",
            "7304",
            "--src",
            "127.0.0.1",
            "--send",
            "control",
            "--secs",
            "2",
        ],
        Duration::from_secs(20),
    );
    assert!(
        r.stdout.contains("LISTENER-UDP control"),
        "UDP listener is not live: {r}"
    );
    assert!(lab.gateway.metrics().text.contains("rampart_"));
    let page = dev.run(
        "curl",
        &["-sS", "--max-time", "10", &format!("http://{UPSTREAM}/")],
        Duration::from_secs(30),
    );
    assert_eq!(page.stdout.trim(), "UPSTREAM-PAGE", "{page}");
    let raw = rawtcp(
        &dev,
        "connect",
        &src,
        &[
            "--dst",
            UPSTREAM,
            "--dport",
            "80",
            "--send",
            "GET / HTTP/1.0\r\n\r\n",
            "--hold",
            "3",
        ],
        Duration::from_secs(60),
    );
    let conn = &raw["conns"][0];
    assert!(
        conn["received"].as_str().unwrap_or("").contains("UPSTREAM-PAGE"),
        "a raw connection through the off-ramp does not work, so the checks below prove nothing: {raw}"
    );
    let accepted = |name: &str| marker_events(&dir, name, "accept").len();
    let before: Vec<usize> = listeners.iter().map(|l| accepted(l.0)).collect();
    let forbidden = [("tenant", "acme"), ("reason", "offramp_forbidden")];
    let counted_before = lab.gateway.metrics().sum_or_zero(DROPPED, &forbidden);

    // The attack: raw connections to the appliance's own addresses (the device's kernel could not even route
    // 127.0.0.1 or the gateway's underlay address into the tunnel).
    let mut attempts = 0.0;
    let mut reached = Vec::new();
    for (dst, port, send, leak) in [
        ("127.0.0.1", "7301", "hello", "LISTENER-LOOPBACK"),
        ("0.0.0.0", "7301", "hello", "LISTENER-LOOPBACK"),
        ("198.18.0.1", "7302", "hello", "LISTENER-UNDERLAY"),
        ("169.254.169.254", "7303", "hello", "LISTENER-METADATA"),
        (
            "127.0.0.1",
            "8080",
            "GET /metrics HTTP/1.0\r\n\r\n",
            "rampart_",
        ),
    ] {
        let v = rawtcp(
            &dev,
            "connect",
            &src,
            &["--dst", dst, "--dport", port, "--send", send, "--hold", "3"],
            Duration::from_secs(60),
        );
        let got = v["conns"][0]["received"].as_str().unwrap_or("");
        if got.contains(leak) {
            let head: String = got.chars().take(80).collect();
            reached.push(format!("tcp {dst}:{port} answered {head:?}"));
        }
        attempts += 1.0;
    }
    let v = rawtcp(
        &dev,
        "udp",
        &src,
        &[
            "--dst",
            "127.0.0.1",
            "--dport",
            "7304",
            "--send",
            "probe {i}",
            "--hold",
            "3",
        ],
        Duration::from_secs(60),
    );
    attempts += 1.0;
    if v["flows"][0]["replies"] != serde_json::json!([])
        || marker_received(&dir, "loopback-udp").contains("probe")
    {
        reached.push(format!(
            "udp 127.0.0.1:7304 answered {}",
            v["flows"][0]["replies"][0]
        ));
    }
    for (l, n) in listeners.iter().zip(before) {
        let now = accepted(l.0);
        if now != n {
            reached.push(format!(
                "the {} listener accepted {} connection(s)",
                l.0,
                now - n
            ));
        }
    }
    assert!(
        reached.is_empty(),
        "the device reached the appliance through the off-ramp:\n{}",
        reached.join("\n")
    );
    let (counted, _) = wait_until(
        "offramp_forbidden drops to be counted",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let n = lab.gateway.metrics().sum_or_zero(DROPPED, &forbidden);
            (n >= counted_before + attempts).then_some(n)
        },
    );
    eprintln!("offramp_forbidden: {counted_before} -> {counted} for {attempts} attempts");
    lab.gateway.assert_alive();
}

/// `rampart audit flows --json [ARGS]` as parsed objects (newest first).
fn audit_flows(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json", "--limit", "1000000"];
    all.extend_from_slice(args);
    let out = lab.gateway.cli(&["audit", "flows"], &all).expect_ok();
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect()
}

/// Rewrites the config without the rule `id` (its `[[tenant.rule]]` table up to the next table) and applies it
/// with `rampart reload`.
fn reload_without_rule(lab: &Lab, id: &str) {
    let config = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let start = config
        .find(&format!("[[tenant.rule]]\nid = \"{id}\"\n"))
        .unwrap_or_else(|| panic!("rule {id} not in the config:\n{config}"));
    let rest = &config[start + 1..];
    let end = rest
        .find("\n[")
        .map(|i| start + 1 + i + 1)
        .unwrap_or(config.len());
    std::fs::write(
        &lab.gateway.config,
        format!("{}{}", &config[..start], &config[end..]),
    )
    .unwrap();
    let r = lab.gateway.cli(&["reload"], &[]).expect_ok();
    assert!(r.contains("reloaded"), "{r}");
}

/// The connecting end of a netprobe exchange from a fixed source port, in the background (so the test knows the
/// 5-tuple); its idle timeout is far longer than any wait of the tests, so a cut can only be a reset.
fn exchange_client(
    dev: &WgClient,
    dir: &std::path::Path,
    to: &str,
    port: u16,
    sport: u16,
    bytes: u64,
) -> Proc {
    let mut c = dev.exec("python3");
    c.args([
        NETPROBE,
        "exchange",
        "connect",
        "--addr",
        to,
        "--port",
        &port.to_string(),
        "--sport",
        &sport.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--timeout",
        "30",
        "--idle-timeout",
        "600",
    ]);
    Proc::spawn(&format!("exchange-{}-{sport}", dev.name), c, dir)
}

/// Inner bytes the gateway received from a tenant's devices so far.
fn rx_bytes(lab: &Lab, tenant: &str) -> f64 {
    lab.gateway
        .metrics()
        .value("rampart_rx_bytes_total", &[("tenant", tenant)])
}

const ALICE_TO_BOB: &str = r#"[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"

[[tenant.rule]]
id = "alice-to-bob"
action = "allow"
devices = ["alice"]
dst = ["bob"]
proto = "tcp"
ports = ["5201"]
"#;

/// Finding H1 (policy and audit): a RST was accepted without any sequence check, marked the flow ended while it
/// kept forwarding on its memoized decision, reload re-checks skipped ended flows, and later bytes were never
/// audited. A device forges a RST with an out-of-window sequence number into its own allowed transfer (the peer
/// ignores it, the transfer goes on); revoking the rule must still cut the transfer with a reset, and the
/// flow's record must count every byte that crossed, also those after the forged RST.
#[test]
fn a_forged_rst_neither_ends_a_flow_nor_shelters_it_from_a_revoke_or_the_audit() {
    const BIG: u64 = 2 << 30;
    const SPORT: u16 = 40123;
    let mut lab = Lab::new(&[tenant("acme", "100.96.0.0/24", "100.96.0.1", ALICE_TO_BOB)]);
    let a = device(&mut lab, "acme", "alice", "100.96.0.1");
    let b = device(&mut lab, "acme", "bob", "100.96.0.1");
    let (a_addr, b_addr) = (a.address().to_string(), b.address().to_string());
    let dir = lab.dir().to_path_buf();
    let mut server = exchange_server(&b.ns, &dir, &b_addr, 5201, BIG);
    let mut client = exchange_client(&a, &dir, &b_addr, 5201, SPORT, BIG);
    wait_until(
        "the transfer's flow in the audit store",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            audit_flows(&lab, &[])
                .into_iter()
                .find(|f| f["sport"] == SPORT && f["dport"] == 5201)
        },
    );
    let progressing = |what: &str, from: f64| {
        wait_until(
            what,
            Duration::from_secs(60),
            Duration::from_millis(300),
            || (rx_bytes(&lab, "acme") > from + 4.0 * 1024.0 * 1024.0).then_some(()),
        );
    };
    progressing("the transfer to move", rx_bytes(&lab, "acme"));

    // The forged RST: a sequence number 2^31 away from the connection's own.
    let v = rawtcp(
        &a,
        "rst",
        &a_addr,
        &[
            "--dst",
            &b_addr,
            "--dport",
            "5201",
            "--sport",
            &SPORT.to_string(),
            "--learn",
            "10",
        ],
        Duration::from_secs(60),
    );
    eprintln!("forged RST: {v}");
    progressing(
        "the transfer to go on after the forged RST (the peer ignores it)",
        rx_bytes(&lab, "acme"),
    );
    assert!(
        client.is_running(),
        "the forged RST ended the transfer:\n{}",
        client.stdout()
    );

    reload_without_rule(&lab, "alice-to-bob");
    let cut = client.wait_timeout(Duration::from_secs(20));
    let out = client.stdout();
    assert!(
        cut.is_some(),
        "the transfer was not cut within 20 s of revoking its rule (the forged RST sheltered it from the \
         reload)"
    );
    assert!(
        out.contains("reset"),
        "the transfer was cut without a reset: {out}"
    );
    server.wait_timeout(Duration::from_secs(30));
    let (alice, bob) = (
        parse_last_json(&out, "exchange client"),
        parse_last_json(&server.stdout(), "exchange server"),
    );
    let (sent_through, recv_back) = (
        bob["recv"].as_u64().unwrap(),
        alice["recv"].as_u64().unwrap(),
    );
    let (flow, _) = wait_until(
        "the revoked flow's end record",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            audit_flows(&lab, &[]).into_iter().find(|f| {
                f["sport"] == SPORT && f["dport"] == 5201 && f["end_reason"] == "policy_revoked"
            })
        },
    );
    let records: Vec<Value> = audit_flows(&lab, &[])
        .into_iter()
        .filter(|f| f["sport"] == SPORT && f["dport"] == 5201)
        .collect();
    assert_eq!(records.len(), 1, "one connection, one record: {records:?}");
    // The audit counts IP bytes, so it is at least the payload each end received.
    assert!(
        flow["bytes_out"].as_u64().unwrap() >= sent_through,
        "the record misses bytes sent after the forged RST: bytes_out {} < {sent_through} received by bob: {flow}",
        flow["bytes_out"]
    );
    assert!(
        flow["bytes_in"].as_u64().unwrap() >= recv_back,
        "bytes_in {} < {recv_back} received by alice: {flow}",
        flow["bytes_in"]
    );
    lab.gateway.assert_alive();
}

/// Finding H1 (crash): after a device-to-device TCP connection closed normally and the peer device was removed,
/// a few bare ACKs on the old 5-tuple reached `send_to_peer` for an empty slot and panicked the data-path
/// thread, stopping every tenant's traffic while the process (and `/health`) stayed up. The gateway must go on
/// serving: another tenant's device and the attacker's own tunnel keep answering, and nothing panics.
#[test]
fn bare_acks_after_an_ended_flow_and_its_peer_removal_do_not_stop_the_data_path() {
    const SPORT: u16 = 40124;
    let mut lab = Lab::new(&[
        tenant("acme", "100.96.0.0/24", "100.96.0.1", ALLOW_ALL),
        tenant("globex", "100.96.1.0/24", "100.96.1.1", ALLOW_ALL),
    ]);
    let a = device(&mut lab, "acme", "alice", "100.96.0.1");
    let b = device(&mut lab, "acme", "bob", "100.96.0.1");
    let other = device(&mut lab, "globex", "bystander", "100.96.1.1");
    let (a_addr, b_addr) = (a.address().to_string(), b.address().to_string());
    let dir = lab.dir().to_path_buf();
    let mut bystander = spawn_ping(&other.ns, &dir, "bystander-ping", "100.96.1.1", 75, 0.2);

    // A connection that ends normally (FIN both ways); the gateway keeps it as a lingering ended flow.
    let mut server = exchange_server(&b.ns, &dir, &b_addr, 5201, 64 * 1024);
    let mut client = exchange_client(&a, &dir, &b_addr, 5201, SPORT, 64 * 1024);
    client.finish(Duration::from_secs(60));
    server.finish(Duration::from_secs(30));
    // Bare ACKs on the old 5-tuple keep the ended flow lingering while the peer is removed, and go on after.
    let mut acks = spawn_rawtcp(
        &a,
        &dir,
        "bare-acks",
        "acks",
        &a_addr,
        &[
            "--dst",
            &b_addr,
            "--dport",
            "5201",
            "--sport",
            &SPORT.to_string(),
            "--count",
            "40",
            "--every",
            "0.25",
        ],
    );
    lab.gateway.device_remove("acme", "bob");
    let sent = finish_json(&mut acks, Duration::from_secs(60));
    eprintln!("bare ACKs: {sent}");

    // The data path still serves everyone.
    wait_ping(
        &other.ns,
        "100.96.1.1",
        Duration::from_secs(10),
        "another tenant's device after the ACKs",
    );
    wait_ping(
        &a.ns,
        "100.96.0.1",
        Duration::from_secs(10),
        "the attacker's own tunnel after the ACKs",
    );
    let st = finish_ping(&mut bystander, 75, Duration::from_secs(90));
    assert!(
        st.received * 2 >= st.transmitted,
        "another tenant's device lost its pings during the attack: {}",
        st.output
    );
    let log = lab.gateway.log();
    assert!(
        !log.contains("panicked"),
        "a gateway thread panicked:\n{}",
        tail(&log, 40)
    );
    lab.gateway.assert_alive();
    assert!(lab.gateway.health());
}

/// Finding L2: `/health` answered a constant "ok", also after the data-path thread died. With the data path
/// stalled on purpose (`rampart debug stall-datapath`, compiled only with the cargo feature `test-hooks`),
/// `/health` must fail within seconds, and recover once the data path runs again. Needs the binary built with
/// `--features test-hooks` (the Makefile builds the end-to-end tests with it).
#[test]
fn health_fails_while_the_data_path_is_stalled_and_recovers_after() {
    const STALL: u64 = 20;
    let mut lab = Lab::new(&[tenant("acme", "100.96.0.0/24", "100.96.0.1", ALLOW_ALL)]);
    let dev = device(&mut lab, "acme", "laptop", "100.96.0.1");
    assert_eq!(lab.gateway.http_status("/health"), Some(200));
    let mut stall = std::process::Command::new(support::gateway::BIN);
    stall
        .args([
            "debug",
            "stall-datapath",
            "--secs",
            &STALL.to_string(),
            "-c",
        ])
        .arg(&lab.gateway.config);
    let mut stall = Proc::spawn("stall", stall, lab.dir());
    let started = std::time::Instant::now();
    let (status, after) = wait_until(
        "/health to fail while the data path is stalled",
        Duration::from_secs(STALL - 5),
        Duration::from_millis(200),
        || lab.gateway.http_status("/health").filter(|s| *s != 200),
    );
    eprintln!("/health answered {status} {after:?} into the stall");
    // The stall is real: the tunnel does not answer meanwhile.
    if started.elapsed() < Duration::from_secs(STALL - 4) {
        let p = ping(&dev.ns, "100.96.0.1", 1, 1.0, 1, None);
        assert_eq!(p.received, 0, "the data path answered during the stall");
    }
    let stalled = stall.wait_timeout(Duration::from_secs(STALL + 30));
    assert!(
        stalled.is_some_and(|s| s.success()),
        "`rampart debug stall-datapath` failed: {}\n{}",
        stall.stdout(),
        stall.log()
    );
    wait_until(
        "/health to recover after the stall",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || (lab.gateway.http_status("/health") == Some(200)).then_some(()),
    );
    wait_ping(&dev.ns, "100.96.0.1", TUNNEL_UP, "laptop after the stall");
}

/// Size of the audit store on disk (the database and its write-ahead log).
fn audit_store_bytes(lab: &Lab) -> u64 {
    ["audit.db", "audit.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(lab.gateway.state_dir().join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

const PING_GATEWAY_ONLY: &str = r#"[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"
"#;

/// Finding H5: every new 5-tuple was a flow table entry and an audit record, whatever the decision, with no
/// per-device limit, so one device sending to random ports of its gateway address filled the global table,
/// the audit queue and the disk for every tenant. For 20 s one device floods denied flows (TCP SYNs and UDP
/// datagrams to random ports of its gateway address) while a device of another tenant runs a transfer, pings
/// and a third device of that tenant enrolls: the transfer is intact, the pings and the new handshake get
/// through, every flow of that tenant is in the audit store, the flooding tenant stays under the per-device
/// flow limit (`[flows] device_max_flows`, default 2048) with its drops counted, and `audit.db` grows by less
/// than 8 MiB (denied flows are aggregated: one record per device, destination and rule per interval).
#[test]
fn a_flooding_device_leaves_another_tenants_traffic_handshakes_and_audit_intact() {
    const BYTES: u64 = 20 * 1024 * 1024;
    const FLOOD_SECS: u32 = 20;
    const DEVICE_MAX_FLOWS: f64 = 2048.0;
    const AUDIT_GROWTH_BOUND: u64 = 8 << 20;
    let mut lab = Lab::new(&[
        tenant("noisy", "100.96.0.0/24", "100.96.0.1", PING_GATEWAY_ONLY),
        tenant("quiet", "100.96.1.0/24", "100.96.1.1", ALLOW_ALL),
    ]);
    let n = device(&mut lab, "noisy", "flooder", "100.96.0.1");
    let q1 = device(&mut lab, "quiet", "q1", "100.96.1.1");
    let q2 = device(&mut lab, "quiet", "q2", "100.96.1.1");
    let dir = lab.dir().to_path_buf();
    let q2_addr = q2.address().to_string();
    // The set-up's flow records reach the store before it is measured.
    wait_until(
        "the set-up's flow records in the audit store",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let started = lab
                .gateway
                .metrics()
                .sum_or_zero("rampart_flows_started_total", &[]);
            (audit_flows(&lab, &[]).len() as f64 >= started).then_some(())
        },
    );
    let store_before = audit_store_bytes(&lab);

    let mut flood = spawn_rawtcp(
        &n,
        &dir,
        "flood",
        "flood",
        &n.address().to_string(),
        &[
            "--dst",
            "100.96.0.1",
            "--secs",
            &FLOOD_SECS.to_string(),
            "--rate",
            "5000",
        ],
    );
    let started = std::time::Instant::now();
    let mut pings = spawn_ping(&q1.ns, &dir, "quiet-ping", "100.96.1.1", 60, 0.25);
    let mut server = exchange_server(&q2.ns, &dir, &q2_addr, 5201, BYTES);
    let mut client = {
        let mut c = q1.exec("python3");
        c.args([
            NETPROBE,
            "exchange",
            "connect",
            "--addr",
            &q2_addr,
            "--port",
            "5201",
            "--bytes",
            &BYTES.to_string(),
            "--timeout",
            "30",
            "--idle-timeout",
            "120",
        ]);
        Proc::spawn("quiet-transfer", c, &dir)
    };
    let mut max_noisy_flows = 0.0f64;
    let mut sample = |lab: &Lab| {
        let v = lab
            .gateway
            .metrics()
            .sum_or_zero("rampart_flows", &[("tenant", "noisy")]);
        max_noisy_flows = max_noisy_flows.max(v);
    };
    // A device enrolled in the middle of the flood gets its handshake through.
    while started.elapsed() < Duration::from_secs(5) {
        sample(&lab);
        std::thread::sleep(Duration::from_millis(500));
    }
    let late = lab.add_client("quiet", "q3");
    wait_ping(
        &late.ns,
        "100.96.1.1",
        TUNNEL_UP,
        "a device enrolled during the flood",
    );
    while flood.is_running() && started.elapsed() < Duration::from_secs(FLOOD_SECS as u64 + 30) {
        sample(&lab);
        std::thread::sleep(Duration::from_millis(500));
    }
    let flooded = finish_json(&mut flood, Duration::from_secs(30));
    let out = client.finish(Duration::from_secs(240));
    let alice = parse_last_json(&out, "quiet transfer client");
    let bob = parse_last_json(
        &server.finish(Duration::from_secs(30)),
        "quiet transfer server",
    );
    let st = finish_ping(&mut pings, 60, Duration::from_secs(60));
    eprintln!(
        "flood {flooded}; quiet ping {}/{}; max rampart_flows{{tenant=noisy}} {max_noisy_flows}",
        st.received, st.transmitted
    );
    assert_eq!(
        (bob["recv"].as_u64(), bob["recv_sha256"].as_str()),
        (Some(BYTES), alice["sent_sha256"].as_str()),
        "the other tenant's transfer was damaged"
    );
    assert_eq!(alice["recv_sha256"], bob["sent_sha256"]);
    assert!(
        st.received * 2 >= st.transmitted,
        "the other tenant's pings were starved during the flood: {}",
        st.output
    );

    // Every flow of the quiet tenant is in the audit store.
    let (records, _) = wait_until(
        "every flow of the quiet tenant in the audit store",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let started = lab
                .gateway
                .metrics()
                .value("rampart_flows_started_total", &[("tenant", "quiet")]);
            let records = audit_flows(&lab, &["--tenant", "quiet"]);
            (records.len() as f64 >= started).then_some(records)
        },
    );
    let transfer = records
        .iter()
        .find(|f| f["dport"] == 5201)
        .expect("the transfer's record");
    assert!(
        transfer["bytes_out"].as_u64().unwrap_or(0) >= BYTES,
        "{transfer}"
    );
    // The flooding tenant's state and audit stayed bounded.
    let m = lab.gateway.metrics();
    let limited = m.sum_or_zero(
        DROPPED,
        &[("tenant", "noisy"), ("reason", "device_flow_limit")],
    ) + m.sum_or_zero(
        DROPPED,
        &[("tenant", "noisy"), ("reason", "flow_rate_limited")],
    );
    let growth = audit_store_bytes(&lab).saturating_sub(store_before);
    let noisy_records = audit_flows(&lab, &["--tenant", "noisy"]).len();
    eprintln!("audit store grew by {growth} bytes; {noisy_records} records of the flooding tenant");
    let mut violations = Vec::new();
    if max_noisy_flows > DEVICE_MAX_FLOWS {
        violations.push(format!(
            "the flooding tenant held {max_noisy_flows} flows (per-device limit {DEVICE_MAX_FLOWS})"
        ));
    }
    if limited == 0.0 {
        violations.push(format!(
            "the flood's refused flows were not counted (device_flow_limit / flow_rate_limited):\n{}",
            m.describe(DROPPED)
        ));
    }
    if growth >= AUDIT_GROWTH_BOUND {
        violations.push(format!(
            "audit.db grew by {growth} bytes ({noisy_records} records of the flooding tenant) during a \
             {FLOOD_SECS} s flood of denied flows (bound {AUDIT_GROWTH_BOUND})"
        ));
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    lab.gateway.assert_alive();
}

/// The address every egress network of the per-tenant egress test gives its web host.
const SITE: &str = "198.19.77.5";
const SITE_NET: &str = "198.19.77.0/24";

/// A host at `SITE` serving `body` over HTTP, linked to `egress` (which gets 198.19.77.1/24 on `egress_if`).
fn site(lab: &Lab, name: &str, egress: &Netns, egress_if: &str, body: &str) -> (Netns, Proc) {
    let host = Netns::create(&format!("{}-{name}", lab.id));
    link(
        &host,
        "eth0",
        &format!("{SITE}/24"),
        egress,
        egress_if,
        "198.19.77.1/24",
    );
    let server = marker_server(
        &host,
        lab.dir(),
        name,
        "http-serve",
        &["--bind", SITE, "--port", "80", "--body", body],
    );
    (host, server)
}

fn fetch(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    all.push("http://198.19.77.5/");
    let r = ns.run("curl", &all, Duration::from_secs(30));
    format!("{}{}", r.stdout.trim(), r.stderr.trim())
}

/// Finding H4 (egress): every tenant's off-ramp sockets left through the gateway host's one routing table, so two
/// tenants with the same off-ramp CIDR could not reach two different networks (and a broad off-ramp of one
/// reached the other's sites). With per-tenant egress (`egress = { netns = ... }`, `{ interface = ... }`,
/// `{ fwmark = N }`), four tenants with the same off-ramp CIDR each reach the host at 198.19.77.5 of their own
/// egress, where the gateway host's main table would have led somewhere else.
#[test]
fn tenants_with_the_same_offramp_cidr_reach_their_own_egress_networks() {
    let id = format!("rpt{}eg", std::process::id());
    // Egress namespaces exist before the gateway reads its config.
    let eg1 = Netns::create(&format!("{id}1"));
    let eg2 = Netns::create(&format!("{id}2"));
    let spec = |t: &str, egress: &str| {
        tenant(
            t,
            "100.96.0.0/24",
            "100.96.0.1",
            &format!("offramp = [\"{SITE_NET}\"]\negress = {egress}\n{ALLOW_ALL}"),
        )
    };
    let mut lab = Lab::new(&[
        spec(
            "one",
            &format!("{{ netns = \"/run/netns/{}\" }}", eg1.name()),
        ),
        spec(
            "two",
            &format!("{{ netns = \"/run/netns/{}\" }}", eg2.name()),
        ),
        spec("three", "{ interface = \"x3\" }"),
        spec("four", "{ fwmark = 77 }"),
    ]);
    let _s1 = site(&lab, "site-one", &eg1, "e0", "SITE-ONE");
    let _s2 = site(&lab, "site-two", &eg2, "e0", "SITE-TWO");
    // Two more sites behind interfaces of the gateway's own namespace: its main table prefers x4; x3 is there
    // for a socket bound to it, and table 77 (fwmark 77) leads to x3 as well.
    let _s3 = site(&lab, "site-three", &lab.gw_ns, "x3", "SITE-THREE");
    let _s4 = site(&lab, "site-four", &lab.gw_ns, "x4", "SITE-FOUR");
    for (dev, metric) in [("x4", "100"), ("x3", "200")] {
        lab.gw_ns.ip(&["route", "del", SITE_NET, "dev", dev]);
        lab.gw_ns
            .ip(&["route", "add", SITE_NET, "dev", dev, "metric", metric]);
    }
    lab.gw_ns
        .ip(&["rule", "add", "fwmark", "77", "lookup", "77"]);
    lab.gw_ns
        .ip(&["route", "add", SITE_NET, "dev", "x3", "table", "77"]);

    // Positive controls: each egress leads to its own site, the main table to SITE-FOUR.
    assert_eq!(fetch(&eg1, &[]), "SITE-ONE");
    assert_eq!(fetch(&eg2, &[]), "SITE-TWO");
    assert_eq!(fetch(&lab.gw_ns, &[]), "SITE-FOUR");
    assert_eq!(fetch(&lab.gw_ns, &["--interface", "x3"]), "SITE-THREE");

    let mut got = Vec::new();
    for (t, want) in [
        ("one", "SITE-ONE"),
        ("two", "SITE-TWO"),
        ("three", "SITE-THREE"),
        ("four", "SITE-THREE"),
    ] {
        let dev = device(&mut lab, t, &format!("{t}-laptop"), "100.96.0.1");
        let page = fetch(&dev.ns, &[]);
        got.push(format!("{t}: {page}"));
        assert_eq!(
            page, want,
            "tenant {t}'s device did not reach its own egress network (all so far: {got:?})"
        );
    }
}

/// Dual-stack tenant: reject TCP/22 anywhere in the tenant, deny bob's v6 address on TCP/7002, allow the rest.
const V6_RULES: &str = r#"[[tenant.rule]]
id = "no-ssh"
action = "reject"
dst = ["100.96.0.0/24", "fd00:96::/64"]
proto = "tcp"
ports = ["22"]

[[tenant.rule]]
id = "no-7002-on-bob-v6"
action = "deny"
dst = ["fd00:96::3/128"]
proto = "tcp"
ports = ["7002"]

[[tenant.rule]]
id = "allow-any"
action = "allow"
"#;

/// Finding M3 and the IPv6 gaps of issue 10: IPv6 inside the tunnel. A dual-stack tenant's devices get both
/// addresses from `rampart device add`; ping6 reaches the gateway's v6 address; TCP over v6 works between two
/// devices; a rule by IPv6 CIDR denies one port of one device's v6 address while the same port on its v4
/// address works (a live listener on both); and a TCP SYN to port 22 behind a Hop-by-Hop header is rejected
/// by the tcp/22 `reject` rule that comes before `allow any` (the protocol used to be read from the fixed
/// header, so it matched only `allow any`): a plain SYN to 22 is rejected too, and an HBH SYN to another port
/// is answered.
#[test]
fn ipv6_inside_the_tunnel_ping_tcp_rules_by_v6_cidr_and_extension_headers() {
    let mut lab = Lab::new(&[tenant(
        "acme",
        r#"["100.96.0.0/24", "fd00:96::/64"]"#,
        r#"["100.96.0.1", "fd00:96::1"]"#,
        V6_RULES,
    )]);
    lab.ipv6_clients = true;
    let a = device(&mut lab, "acme", "alice", "100.96.0.1");
    let b = device(&mut lab, "acme", "bob", "100.96.0.1");
    let dir = lab.dir().to_path_buf();
    let (a6, b6) = (a.address_v6().to_string(), b.address_v6().to_string());
    let (b4, b6s) = (b.address().to_string(), b6.as_str());
    assert_eq!(b6, "fd00:96::3", "bob's v6 address (the rules name it)");

    wait_ping(
        &a.ns,
        "fd00:96::1",
        TUNNEL_UP,
        "alice -> the gateway's v6 address",
    );

    // TCP over v6 between two devices, intact.
    let mut server = exchange_server(&b.ns, &dir, b6s, 7001, 1 << 20);
    let (alice, bob) = exchange(
        &a.ns,
        &dir,
        &mut server,
        b6s,
        7001,
        1 << 20,
        Duration::from_secs(120),
    );
    assert_eq!((bob.recv, alice.recv), (1 << 20, 1 << 20));
    assert_eq!(bob.recv_sha256, alice.sent_sha256);

    // A rule by IPv6 CIDR: bob's 7002 is denied on its v6 address and reachable on its v4 address.
    let _v4 = marker_server(
        &b.ns,
        &dir,
        "bob-7002-v4",
        "tcp-serve",
        &[
            "--bind", &b4, "--port", "7002", "--marker", "BOB-7002", "--banner",
        ],
    );
    let _v6 = marker_server(
        &b.ns,
        &dir,
        "bob-7002-v6",
        "tcp-serve",
        &[
            "--bind", b6s, "--port", "7002", "--marker", "BOB-7002", "--banner",
        ],
    );
    let hold = |addr: &str| {
        a.run(
            "python3",
            &[
                MARKER, "tcp-hold", "--addr", addr, "--port", "7002", "--secs", "2",
            ],
            Duration::from_secs(30),
        )
    };
    let v4 = hold(&b4);
    assert!(
        v4.stdout.contains("BOB-7002"),
        "bob:7002 over v4 (positive control): {v4}"
    );
    let v6 = hold(b6s);
    assert!(
        !v6.stdout.contains("BOB-7002"),
        "the v6 CIDR rule did not deny [{b6s}]:7002: {v6}"
    );
    assert!(
        marker_events(&dir, "bob-7002-v6", "accept").is_empty(),
        "bob's v6 listener accepted a denied connection"
    );

    // Port 22 behind a Hop-by-Hop header: a live listener on bob, and the reject rule must see the TCP port.
    let _ssh = marker_server(
        &b.ns,
        &dir,
        "bob-22",
        "tcp-serve",
        &[
            "--bind", "::", "--port", "22", "--marker", "BOB-22", "--banner",
        ],
    );
    let syn = |port: &str, hbh: bool| {
        let mut args = vec!["--dst", b6s, "--dport", port, "--wait", "3"];
        if hbh {
            args.push("--hbh");
        }
        rawtcp(&a, "syn", &a6, &args, Duration::from_secs(30))["answer"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let _open = marker_server(
        &b.ns,
        &dir,
        "bob-7003",
        "tcp-serve",
        &[
            "--bind", "::", "--port", "7003", "--marker", "BOB-7003", "--banner",
        ],
    );
    assert_eq!(
        syn("7003", true),
        "synack",
        "an HBH SYN to an allowed port is not answered, so the checks below prove nothing"
    );
    assert_eq!(syn("22", false), "rst", "a plain SYN to 22 is not rejected");
    let hbh22 = syn("22", true);
    assert_eq!(
        hbh22, "rst",
        "a SYN to 22 behind a Hop-by-Hop header escaped the tcp/22 reject rule"
    );
    assert!(
        marker_events(&dir, "bob-22", "accept").is_empty(),
        "bob's port 22 accepted a connection"
    );
    // Refused attempts are summarised every `flows.deny_summary_secs` (10 s by default).
    wait_until(
        "the refused flow to [fd00:96::3]:22 in the audit trail, under the no-ssh rule",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            audit_flows(&lab, &["--dst", "fd00:96::3/128"])
                .iter()
                .any(|f| f["dport"] == 22 && f["rule"] == "no-ssh")
                .then_some(())
        },
    );
}

/// Tenant A of the slot-reuse test: each cause of a flow end has its own rule or device.
fn slot_reuse_tenant_a() -> TenantSpec {
    let rules = format!(
        r#"offramp = ["{UPSTREAM_NET}"]
[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"

[[tenant.rule]]
id = "idle"
action = "allow"
devices = ["a-idle"]
dst = ["{UPSTREAM_NET}"]

[[tenant.rule]]
id = "rev-tcp"
action = "allow"
devices = ["a-rev"]
dst = ["{UPSTREAM_NET}"]
proto = "tcp"

[[tenant.rule]]
id = "rev-udp"
action = "allow"
devices = ["a-rev"]
dst = ["{UPSTREAM_NET}"]
proto = "udp"

[[tenant.rule]]
id = "rm"
action = "allow"
devices = ["a-rm-t", "a-rm-u"]
dst = ["{UPSTREAM_NET}"]
"#
    );
    tenant("ta", "100.96.0.0/24", "100.96.0.1", &rules)
}

/// Source slots (`addr:port` in the upgrade NAT range) of the packets that carried `marker` into the
/// namespace, from a sniffer's summary.
fn slots(sniffed: &Value, marker: &str) -> std::collections::BTreeSet<String> {
    sniffed["tuples"][marker]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str()?.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// A sniffer on the upgrade TUN inside the gateway's namespace helper: which NAT slot carried which marker.
fn sniff_slots(lab: &Lab, name: &str, secs: u32, markers: &[&str]) -> Proc {
    let mut c = lab.gateway.in_helper_ns("python3");
    c.args([
        RAWTCP,
        "sniff",
        "--iface",
        "up0",
        "--secs",
        &secs.to_string(),
    ]);
    for m in markers {
        c.args(["--marker", m]);
    }
    let mut p = Proc::spawn(name, c, lab.dir());
    p.wait_stdout("LISTENING", Duration::from_secs(30));
    p
}

/// Finding C1: when a core flow ended (idle timeout, a reload revoking its rule, its device removed) its NAT
/// slot was released but nothing told the off-ramp, so the namespace socket, the splice and the upstream
/// connection stayed open; 120 s later the slot went to a new flow of any tenant, whose device then received
/// the old connection's segments and could inject into it (UDP: the next flow's datagrams went to the old
/// destination). Tenant A's devices hold TCP and UDP off-ramp flows (a silent server for the idle case, servers
/// sending a marker every 200 ms for revoke and remove); each cause ends one TCP flow, whose upstream must see
/// its connection closed, then one UDP flow. Past the NAT quarantine, a device of tenant B opens TCP and UDP
/// flows that take over exactly A's slots (the pool hands out the oldest freed slot first), hijacking like an
/// attacker would (it takes the numbers of a challenge ACK): it must see only its own markers, its bytes must
/// reach only its own destinations, and A's upstreams must receive nothing from it.
#[test]
fn a_reused_nat_slot_never_hands_one_tenants_connection_to_another() {
    const CLOSE_BOUND: Duration = Duration::from_secs(20);
    let mut tb = tenant(
        "tb",
        "100.96.0.0/24",
        "100.96.0.1",
        &format!("offramp = [\"{UPSTREAM_NET}\"]\n{ALLOW_ALL}"),
    );
    tb.rules
        .push_str("\n[flows]\ntcp_established_timeout_secs = 6\nudp_timeout_secs = 6\n");
    let mut lab = Lab::new(&[slot_reuse_tenant_a(), tb]);
    let dir = lab.dir().to_path_buf();
    let up = upstream_host(&mut lab);
    // (server name, protocol, port, marker, chatty)
    let servers = [
        ("up-idle-tcp", "tcp-serve", 7101, "A-IDLE-TCP", false),
        ("up-rev-tcp", "tcp-serve", 7102, "A-REV-TCP", true),
        ("up-rm-tcp", "tcp-serve", 7103, "A-RM-TCP", true),
        ("up-b-tcp", "tcp-serve", 7104, "B-TCP", true),
        ("up-idle-udp", "udp-serve", 7201, "A-IDLE-UDP", false),
        ("up-rev-udp", "udp-serve", 7202, "A-REV-UDP", true),
        ("up-rm-udp", "udp-serve", 7203, "A-RM-UDP", true),
        ("up-b-udp", "udp-serve", 7204, "B-UDP", true),
    ];
    let _servers: Vec<Proc> = servers
        .iter()
        .map(|(name, mode, port, marker, chatty)| {
            let every = if *chatty { "0.2" } else { "0" };
            marker_server(
                &up.ns,
                &dir,
                name,
                mode,
                &[
                    "--bind",
                    UPSTREAM,
                    "--port",
                    &port.to_string(),
                    "--marker",
                    marker,
                    "--every",
                    every,
                ],
            )
        })
        .collect();
    let a_idle = device(&mut lab, "ta", "a-idle", "100.96.0.1");
    let a_rev = device(&mut lab, "ta", "a-rev", "100.96.0.1");
    let a_rm_t = device(&mut lab, "ta", "a-rm-t", "100.96.0.1");
    let a_rm_u = device(&mut lab, "ta", "a-rm-u", "100.96.0.1");
    let b = device(&mut lab, "tb", "b", "100.96.0.1");

    let a_markers = [
        "A-IDLE-TCP-HELLO",
        "A-REV-TCP-HELLO",
        "A-RM-TCP-HELLO",
        "A-IDLE-UDP-HELLO",
        "A-REV-UDP-HELLO",
        "A-RM-UDP-HELLO",
    ];
    let mut a_sniff = sniff_slots(&lab, "a-slots", 600, &a_markers);
    let mut a_clients = Vec::new();
    let tcp_hold = |dev: &WgClient, port: u16, hello: &str| {
        marker_client(
            &dev.ns,
            &dir,
            &format!("{}-{port}", dev.name),
            "tcp-hold",
            &[
                "--addr",
                UPSTREAM,
                "--port",
                &port.to_string(),
                "--send",
                &format!("{hello}\n"),
                "--secs",
                "900",
            ],
        )
    };
    let udp_once = |dev: &WgClient, port: u16, hello: &str| {
        marker_client(
            &dev.ns,
            &dir,
            &format!("{}-{port}", dev.name),
            "udp-hold",
            &[
                "--addr",
                UPSTREAM,
                "--port",
                &port.to_string(),
                "--src",
                &dev.address().to_string(),
                "--send",
                hello,
                "--secs",
                "900",
            ],
        )
    };
    let received_by = |server: &str, what: &str| {
        wait_until(
            &format!("{what} to reach {server}"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            || marker_received(&dir, server).contains(what).then_some(()),
        );
    };
    // Slots are claimed in this order: idle/rev/rm TCP, rev/rm UDP (idle UDP comes later).
    a_clients.push(tcp_hold(&a_idle, 7101, "A-IDLE-TCP-HELLO"));
    received_by("up-idle-tcp", "A-IDLE-TCP-HELLO");
    a_clients.push(tcp_hold(&a_rev, 7102, "A-REV-TCP-HELLO"));
    received_by("up-rev-tcp", "A-REV-TCP-HELLO");
    a_clients.push(tcp_hold(&a_rm_t, 7103, "A-RM-TCP-HELLO"));
    received_by("up-rm-tcp", "A-RM-TCP-HELLO");
    a_clients.push(udp_once(&a_rev, 7202, "A-REV-UDP-HELLO"));
    received_by("up-rev-udp", "A-REV-UDP-HELLO");
    a_clients.push(udp_once(&a_rm_u, 7203, "A-RM-UDP-HELLO"));
    received_by("up-rm-udp", "A-RM-UDP-HELLO");

    let mut violations: Vec<String> = Vec::new();
    let closed_within = |server: &str, cause: &str, violations: &mut Vec<String>| {
        let r = support::poll_until(CLOSE_BOUND, Duration::from_millis(200), || {
            (!marker_events(&dir, server, "closed").is_empty()).then_some(())
        });
        if r.is_none() {
            violations.push(format!(
                "{cause}: the upstream connection of {server} was still open {CLOSE_BOUND:?} later"
            ));
        }
    };
    let ended = |port: u16, reason: &str| {
        wait_until(
            &format!("the flow to port {port} to end by {reason}"),
            Duration::from_secs(60),
            Duration::from_millis(300),
            || {
                audit_flows(&lab, &["--tenant", "ta"])
                    .into_iter()
                    .find(|f| f["dport"] == port && f["end_reason"] == reason)
            },
        )
    };

    // Idle: the silent TCP connection outlives tcp_established_timeout_secs.
    ended(7101, "idle_timeout");
    closed_within("up-idle-tcp", "idle timeout", &mut violations);
    // Revoke: a reload drops a-rev's TCP rule.
    reload_without_rule(&lab, "rev-tcp");
    ended(7102, "policy_revoked");
    closed_within("up-rev-tcp", "rule revoked", &mut violations);
    // Remove: the device goes.
    lab.gateway.device_remove("ta", "a-rm-t");
    ended(7103, "peer_removed");
    closed_within("up-rm-tcp", "device removed", &mut violations);
    // The same three causes for UDP, in the same order.
    a_clients.push(udp_once(&a_idle, 7201, "A-IDLE-UDP-HELLO"));
    received_by("up-idle-udp", "A-IDLE-UDP-HELLO");
    ended(7201, "idle_timeout");
    reload_without_rule(&lab, "rev-udp");
    ended(7202, "policy_revoked");
    lab.gateway.device_remove("ta", "a-rm-u");
    ended(7203, "peer_removed");
    // A slot's quarantine starts once its sockets are closed.
    wait_until(
        "the NAT slots of A's ended flows to be closed",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            (lab.gateway
                .metrics()
                .sum_or_zero("rampart_nat_slots_closing", &[])
                == 0.0)
                .then_some(())
        },
    );
    let last_release = std::time::Instant::now();
    let a_seen = stop_json(&mut a_sniff);
    let a_tcp: std::collections::BTreeSet<String> =
        ["A-IDLE-TCP-HELLO", "A-REV-TCP-HELLO", "A-RM-TCP-HELLO"]
            .iter()
            .flat_map(|m| slots(&a_seen, m))
            .collect();
    let a_udp: std::collections::BTreeSet<String> =
        ["A-IDLE-UDP-HELLO", "A-REV-UDP-HELLO", "A-RM-UDP-HELLO"]
            .iter()
            .flat_map(|m| slots(&a_seen, m))
            .collect();
    assert_eq!(
        (a_tcp.len(), a_udp.len()),
        (3, 3),
        "could not see the NAT slots of A's flows in the namespace: {a_seen}"
    );

    // Past the quarantine of the last slot released, B opens three TCP then three UDP flows.
    let quarantine = Duration::from_secs(125);
    eprintln!("waiting {quarantine:?} for the NAT quarantine of A's slots to pass");
    std::thread::sleep(quarantine.saturating_sub(last_release.elapsed()));
    let b_addr = b.address().to_string();
    let mut b_slots = sniff_slots(&lab, "b-slots", 25, &["B-TCP-HELLO", "B-UDP-HELLO"]);
    let mut b_sniff = sniff(
        &b,
        &dir,
        "b-sniff",
        22,
        &[
            "A-IDLE",
            "A-REV-TCP",
            "A-RM-TCP",
            "A-REV-UDP",
            "A-RM-UDP",
            "B-TCP",
            "B-UDP",
        ],
    );
    let mut b_tcp = spawn_rawtcp(
        &b,
        &dir,
        "b-tcp",
        "connect",
        &b_addr,
        &[
            "--dst",
            UPSTREAM,
            "--dport",
            "7104",
            "--count",
            "3",
            "--adopt",
            "--send",
            "B-TCP-HELLO-{i}\n",
            "--hold",
            "12",
        ],
    );
    b_tcp.wait_stdout("OPENED", Duration::from_secs(60));
    let mut b_udp = spawn_rawtcp(
        &b,
        &dir,
        "b-udp",
        "udp",
        &b_addr,
        &[
            "--dst",
            UPSTREAM,
            "--dport",
            "7204",
            "--flows",
            "4",
            "--send",
            "B-UDP-HELLO-{i}",
            "--hold",
            "8",
        ],
    );
    b_udp.wait_stdout("OPENED", Duration::from_secs(60));
    // A's slots are all taken now: this one gets a fresh slot, so B's own upstream is reached whatever the
    // gateway did with the others (the positive control of B's sniffer).
    let fresh = rawtcp(
        &b,
        "connect",
        &b_addr,
        &[
            "--dst",
            UPSTREAM,
            "--dport",
            "7104",
            "--sport",
            "39000",
            "--send",
            "B-TCP-HELLO-fresh\n",
            "--hold",
            "3",
        ],
        Duration::from_secs(60),
    );
    let b_udp = finish_json(&mut b_udp, Duration::from_secs(60));
    let b_tcp = finish_json(&mut b_tcp, Duration::from_secs(60));
    let b_seen = finish_json(&mut b_sniff, Duration::from_secs(60));
    let b_ns = finish_json(&mut b_slots, Duration::from_secs(60));
    let brief = |c: &Value| {
        let got: String = c["received"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(40)
            .collect();
        format!("{} {} {got:?}", c["sport"], c["state"])
    };
    eprintln!(
        "B's TCP: {:?} + {}\nB's UDP replies: {:?}\nB saw: {}",
        b_tcp["conns"]
            .as_array()
            .unwrap()
            .iter()
            .map(brief)
            .collect::<Vec<_>>(),
        brief(&fresh["conns"][0]),
        b_udp["flows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| format!(
                "{}: {} {}",
                f["sport"],
                f["replies"].as_array().map_or(0, |r| r.len()),
                f["replies"][0]
            ))
            .collect::<Vec<_>>(),
        b_seen["counts"]
    );

    // Positive controls: B's own flows worked and carried its markers both ways.
    for c in b_tcp["conns"].as_array().unwrap() {
        assert!(
            c["state"] == "established" || c["state"] == "adopted",
            "B's connection did not open: {}",
            brief(c)
        );
    }
    assert_eq!(
        fresh["conns"][0]["state"],
        "established",
        "{}",
        brief(&fresh["conns"][0])
    );
    for m in ["B-TCP", "B-UDP"] {
        assert!(
            b_seen["counts"][m].as_u64().unwrap_or(0) > 0,
            "B never saw its own upstream's {m} markers, so its sniffer proves nothing: {b_seen}"
        );
    }
    received_by("up-b-tcp", "B-TCP-HELLO-fresh");
    received_by("up-b-udp", "B-UDP-HELLO-3");
    // B took over A's slots (otherwise nothing below was tested).
    let (b_tcp_slots, b_udp_slots) = (slots(&b_ns, "B-TCP-HELLO"), slots(&b_ns, "B-UDP-HELLO"));
    assert!(
        a_tcp.is_subset(&b_tcp_slots) && a_udp.is_subset(&b_udp_slots),
        "B's flows did not reuse A's NAT slots (A: tcp {a_tcp:?} udp {a_udp:?}; B: tcp {b_tcp_slots:?} udp \
         {b_udp_slots:?}); the test no longer exercises slot reuse"
    );

    for m in ["A-IDLE", "A-REV-TCP", "A-RM-TCP", "A-REV-UDP", "A-RM-UDP"] {
        let n = b_seen["counts"][m].as_u64().unwrap_or(0);
        if n > 0 {
            violations.push(format!(
                "tenant B's device received {n} packet(s) of tenant A's {m} session (on {})",
                b_seen["tuples"][m]
            ));
        }
    }
    // B's bytes reach B's destinations, all of them.
    for (server, hello) in [
        ("up-b-tcp", "B-TCP-HELLO-0"),
        ("up-b-tcp", "B-TCP-HELLO-1"),
        ("up-b-tcp", "B-TCP-HELLO-2"),
        ("up-b-udp", "B-UDP-HELLO-0"),
        ("up-b-udp", "B-UDP-HELLO-1"),
        ("up-b-udp", "B-UDP-HELLO-2"),
    ] {
        if !marker_received(&dir, server).contains(hello) {
            violations.push(format!(
                "{hello} of tenant B never reached B's destination {server}"
            ));
        }
    }
    for (server, mine) in [
        ("up-idle-tcp", "B-TCP"),
        ("up-rev-tcp", "B-TCP"),
        ("up-rm-tcp", "B-TCP"),
        ("up-idle-udp", "B-UDP"),
        ("up-rev-udp", "B-UDP"),
        ("up-rm-udp", "B-UDP"),
    ] {
        let got: Vec<String> = marker_events(&dir, server, "recv")
            .iter()
            .filter_map(|e| e["data"].as_str().map(str::to_string))
            .filter(|d| d.contains(mine))
            .collect();
        if let Some(first) = got.first() {
            violations.push(format!(
                "tenant A's upstream {server} received tenant B's bytes {} time(s), first {first:?}",
                got.len()
            ));
        }
    }
    assert!(
        violations.is_empty(),
        "the trust boundary was crossed:\n{}",
        violations.join("\n")
    );
    lab.gateway.assert_alive();
}

/// The admin listener's address when it is not on loopback (the gateway's underlay address).
const ADMIN_OUTSIDE: &str = "198.18.0.1:9090";

/// `curl` from `ns`: the HTTP status (0: no HTTP answer) and the body.
fn admin_fetch(ns: &Netns, url: &str, args: &[&str]) -> (u16, String) {
    let mut a = vec!["-sS", "--max-time", "10", "-w", "\n%{http_code}"];
    a.extend_from_slice(args);
    a.push(url);
    let r = ns.run("curl", &a, Duration::from_secs(20));
    let (body, code) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `rampart check-config` on `text` written next to the lab's config.
fn check_config(lab: &Lab, name: &str, text: &str) -> support::process::Ran {
    let path = lab.dir().join(name);
    std::fs::write(&path, text).unwrap();
    support::process::run(
        std::process::Command::new(support::gateway::BIN)
            .args(["check-config", "-c"])
            .arg(&path),
        Duration::from_secs(30),
    )
}

fn write_token(path: &std::path::Path, token: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn the_admin_listener_off_loopback_serves_only_https_with_the_bearer_token() {
    const TOKEN: &str = "e2e-admin-token-0123456789abcdef";
    let acme = || tenant("acme", "100.96.0.0/24", "100.96.0.1", ALLOW_ALL);
    // Loopback, no token: plain HTTP as before (the positive control of "no token needed").
    let lab = Lab::new(&[acme()]);
    assert_eq!(lab.gateway.admin().1, None);
    assert_eq!(lab.gateway.http_status("/metrics"), Some(200));

    // A network address without a token: refused, naming the key and the fix (the attack before this change:
    // another namespace read all of /metrics over plain HTTP).
    let base = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let open = base.replace(
        "admin_listen = \"127.0.0.1:8080\"",
        &format!("admin_listen = \"{ADMIN_OUTSIDE}\""),
    );
    assert_ne!(open, base);
    let r = check_config(&lab, "open.toml", &open);
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        !r.success()
            && out.contains("gateway.admin_listen")
            && out.contains("not a loopback address")
            && out.contains("admin_token_file"),
        "{r}"
    );
    drop(lab);

    // The token lives outside the lab's directory, which exists only once the lab has checked its config.
    let dir = support::tempdir(&format!("admin-token-{}", std::process::id()));
    let token_file = dir.path().join("admin.token");
    write_token(&token_file, TOKEN, 0o600);
    let mut lab = Lab::with_settings(
        &[acme()],
        &format!(
            "admin_listen = \"{ADMIN_OUTSIDE}\"\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    );
    let outside = lab.add_host("outside");
    let pin: Value =
        serde_json::from_str(&lab.gateway.cli(&["token", "pin"], &["--json"]).expect_ok()).unwrap();
    let pin = pin["curl_pin"].as_str().unwrap().to_string();
    let https = format!("https://{ADMIN_OUTSIDE}/metrics");
    let pinned = ["-k", "--pinnedpubkey", pin.as_str()];
    let bearer = |t: &str| format!("Authorization: Bearer {t}");

    // From another namespace: plain HTTP gets no metrics, HTTPS without or with a wrong token gets 401.
    let (code, body) = admin_fetch(&outside.ns, &format!("http://{ADMIN_OUTSIDE}/metrics"), &[]);
    assert!(
        code != 200 && !body.contains("rampart_"),
        "plain HTTP: {code} {body}"
    );
    for (what, extra) in [
        ("no token", vec![]),
        (
            "a wrong token",
            vec!["-H".to_string(), bearer("e2e-admin-token-0123456789abcdeX")],
        ),
        (
            "another scheme",
            vec!["-H".to_string(), format!("Authorization: Basic {TOKEN}")],
        ),
    ] {
        let mut args: Vec<&str> = pinned.to_vec();
        args.extend(extra.iter().map(String::as_str));
        for path in ["/metrics", "/health"] {
            let (code, body) = admin_fetch(
                &outside.ns,
                &format!("https://{ADMIN_OUTSIDE}{path}"),
                &args,
            );
            assert!(
                code == 401 && !body.contains("rampart_") && body.contains("bearer token"),
                "{what} {path}: {code} {body}"
            );
        }
    }
    // The positive control: the token works from the same namespace, over the pinned certificate.
    let mut args: Vec<String> = pinned.iter().map(|s| s.to_string()).collect();
    args.extend(["-H".to_string(), bearer(TOKEN)]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, body) = admin_fetch(&outside.ns, &https, &argv);
    assert!(
        code == 200 && body.contains("rampart_handshakes_total{tenant=\"acme\"}"),
        "with the token: {code} {body}"
    );

    // A reload (and check-config) refuses to drop the token or to use a file others can read; the running
    // gateway keeps its token.
    let with_token = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let without: String = with_token
        .lines()
        .filter(|l| !l.starts_with("admin_token_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&lab.gateway.config, &without).unwrap();
    let r = lab.gateway.cli(&["reload"], &[]);
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        !r.success() && out.contains("gateway.admin_listen") && out.contains("admin_token_file"),
        "{r}"
    );
    std::fs::write(&lab.gateway.config, &with_token).unwrap();
    write_token(&token_file, TOKEN, 0o644);
    let r = lab.gateway.cli(&["reload"], &[]);
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        !r.success() && out.contains("gateway.admin_token_file") && out.contains("chmod 600"),
        "{r}"
    );
    let r = lab.gateway.cli(&["check-config"], &[]);
    assert!(!r.success(), "{r}");
    let (code, _) = admin_fetch(&outside.ns, &https, &argv);
    assert_eq!(code, 200, "the running gateway kept its token");

    // A reload with a new token rotates it: the old one is refused from then on.
    write_token(&token_file, "e2e-rotated-token-fedcba9876543210", 0o600);
    lab.gateway.cli(&["reload"], &[]).expect_ok();
    let (code, _) = admin_fetch(&outside.ns, &https, &argv);
    assert_eq!(code, 401, "the old token after a rotation");
    let mut rotated: Vec<&str> = pinned.to_vec();
    let h = bearer("e2e-rotated-token-fedcba9876543210");
    rotated.extend(["-H", h.as_str()]);
    let (code, _) = admin_fetch(&outside.ns, &https, &rotated);
    assert_eq!(code, 200, "the new token after a rotation");
    assert!(
        lab.gateway.health(),
        "the harness reads the rotated token too"
    );
}
