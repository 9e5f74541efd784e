//! End-to-end acceptance of the connected on-ramp (issue 18, `[[onramp.seqpacket]]`): a tunnel terminator
//! (`tests/tools/seqpacket_client.py`, a TUN <-> SEQPACKET bridge in a site namespace) hands its packets to a
//! real `rampart run` over a Unix `SOCK_SEQPACKET` socket; real ping/TCP/UDP from the site reach an off-ramp
//! host and a real wireguard-go device of the tenant, replies come back over the connection, and the flows
//! are recorded with the on-ramp's identity. Refusals (uid, tenant, site, malformed context) and garbage are
//! counted. Root only; see `support/mod.rs` for the harness rules.
//!
//! Run: `cargo test --features test-hooks --test e2e_seqpacket -- --test-threads=1`

#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::netns::Netns;
use support::probe::{ident_probe, ident_server, udp_log, udp_receiver, udp_send};
use support::process::{run, Proc};
use support::{tempdir, TempDir};
use support::{wait_ping, wait_until, Lab, TenantSpec};

const GW_ADDR: &str = "100.96.0.1";
const TUNNEL_UP: Duration = Duration::from_secs(30);
const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/tools/seqpacket_client.py"
);
/// The upstream host is the lab's first link.
const UPSTREAM_NET: &str = "198.18.1.0/24";
const UPSTREAM: &str = "198.18.1.2";
const SITE_NET: &str = "10.7.0.0/16";
const SITE_ADDR: &str = "10.7.0.5";
const DROPPED: &str = "rampart_dropped_packets_total";

fn tenant(id: &str) -> TenantSpec {
    let mut t = TenantSpec::new(id, "100.96.0.0/24", GW_ADDR);
    t.rules = format!("offramp = [\"{UPSTREAM_NET}\"]\n{}", t.rules);
    t
}

/// Three entries on their own sockets: "warp" (replies, acme only, sites branch-7/branch-8, at most 5 bad
/// packets), "gx" (globex, the same prefix as acme's) and "oxy" (Oxy's no-reply protocol, acme only).
fn onramp_config(sock_dir: &Path) -> String {
    format!(
        r#"
[[onramp.seqpacket]]
name = "warp"
path = "{d}/warp.sock"
uids = [0]
max_bad_packets = 5

[[onramp.seqpacket.tenant]]
id = "acme"
prefixes = ["{SITE_NET}"]
sites = ["branch-7", "branch-8"]

[[onramp.seqpacket]]
name = "gx"
path = "{d}/gx.sock"
uids = [0]

[[onramp.seqpacket.tenant]]
id = "globex"
prefixes = ["{SITE_NET}"]

[[onramp.seqpacket]]
name = "oxy"
path = "{d}/oxy.sock"
uids = [0]
reply = false

[[onramp.seqpacket.tenant]]
id = "acme"
prefixes = ["10.8.0.0/16"]
"#,
        d = sock_dir.display()
    )
}

/// A socket directory other users may traverse (mode 0755; the socket's own mode is the first gate).
fn sock_dir(tag: &str) -> TempDir {
    tempdir(&format!("{tag}-sock"))
}

fn lab(sock: &Path) -> Lab {
    Lab::with_settings(&[tenant("acme"), tenant("globex")], &onramp_config(sock))
}

fn probe(socket: &Path, args: &[&str]) -> Value {
    let r = run(
        std::process::Command::new("python3")
            .arg(CLIENT)
            .arg("probe")
            .arg("--socket")
            .arg(socket)
            .args(args),
        Duration::from_secs(60),
    );
    serde_json::from_str(r.stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {r}"))
}

fn audit_flows(lab: &Lab) -> Vec<Value> {
    lab.gateway
        .cli(&["audit", "flows"], &["--json"])
        .expect_ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect()
}

/// The site: a namespace whose TUN is bridged to the gateway over the "warp" socket.
fn site(lab: &Lab, socket: &Path, site: &str) -> (Netns, Proc) {
    site_of(lab, socket, "acme", site, "site")
}

/// A site of `tenant` in namespace `<lab>-<role>`, bridged over `socket`.
fn site_of(lab: &Lab, socket: &Path, tenant: &str, site: &str, role: &str) -> (Netns, Proc) {
    let ns = Netns::create(&format!("{}-{role}", lab.id));
    let mut cmd = ns.exec("python3");
    cmd.arg(CLIENT)
        .arg("bridge")
        .arg("--socket")
        .arg(socket)
        .args(["--tenant", tenant, "--site", site])
        .args(["--addr", &format!("{SITE_ADDR}/32")])
        .args(["--route", "100.96.0.0/24", "--route", UPSTREAM_NET]);
    let mut p = Proc::spawn(&format!("{role}-bridge"), cmd, lab.dir());
    p.wait_stdout("READY", Duration::from_secs(30));
    (ns, p)
}

#[test]
fn site_reaches_offramp_host_and_wireguard_device_and_flows_name_the_onramp() {
    let sock = sock_dir("sp1");
    let mut lab = lab(sock.path());
    let host = lab.add_host("up");
    assert_eq!(host.underlay.to_string(), UPSTREAM);
    let dir = lab.dir().to_path_buf();
    let _up_tcp = ident_server(&host.ns, &dir, "up-tcp", UPSTREAM, 8000, "upstream");
    let _up_udp = udp_receiver(&host.ns, &dir, "up-udp", UPSTREAM, 5353);
    let dev = lab.add_client("acme", "laptop");
    assert!(
        dev.config.allowed_ips.iter().any(|n| n == SITE_NET),
        "the device config does not route the on-ramp's prefix:\n{}",
        dev.config.text
    );
    let dev_addr = dev.address().to_string();
    wait_ping(&dev.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway");
    let _dev_tcp = ident_server(&dev.ns, &dir, "dev-tcp", &dev_addr, 8001, "laptop");

    let (site_ns, mut bridge) = site(&lab, &sock.path().join("warp.sock"), "branch-7");
    assert!(
        bridge.stdout().contains("\"status\": \"accepted\""),
        "{}",
        bridge.stdout()
    );
    // ICMP echo: the gateway's address and the WireGuard device.
    wait_ping(&site_ns, GW_ADDR, TUNNEL_UP, "site -> gateway address");
    wait_ping(&site_ns, &dev_addr, TUNNEL_UP, "site -> laptop");
    // TCP to the off-ramp host (upgraded and proxied) and to the device.
    assert_eq!(
        ident_probe(&site_ns, UPSTREAM, 8000, "site"),
        Ok("upstream".into())
    );
    assert_eq!(
        ident_probe(&site_ns, &dev_addr, 8001, "site"),
        Ok("laptop".into())
    );
    // UDP to the off-ramp host.
    udp_send(&site_ns, SITE_ADDR, UPSTREAM, 5353, 3, "from-site");
    wait_until(
        "UDP from the site at the upstream host",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || udp_log(&dir, "up-udp").contains("from-site").then_some(()),
    );
    // The device reaches the site too (a flow it starts towards the on-ramp's prefix).
    wait_ping(&dev.ns, SITE_ADDR, TUNNEL_UP, "laptop -> site");

    let flows = wait_until(
        "flow records of the site",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            // Records are committed in batches: wait for the last ones (UDP, the device's ping).
            let f = audit_flows(&lab);
            let udp = f
                .iter()
                .any(|f| f["device"] == "warp/branch-7" && f["protocol"] == 17);
            let from_dev = f
                .iter()
                .any(|f| f["device"] == "laptop" && f["dst"] == SITE_ADDR);
            (udp && from_dev).then_some(f)
        },
    )
    .0;
    let site_flows: Vec<&Value> = flows
        .iter()
        .filter(|f| f["device"] == "warp/branch-7")
        .collect();
    for f in &site_flows {
        assert_eq!(f["tenant"], "acme", "{f}");
        assert_eq!(f["user"], "onramp:warp", "{f}");
        assert_eq!(f["src"], SITE_ADDR, "{f}");
    }
    assert!(
        site_flows
            .iter()
            .any(|f| f["dst"] == UPSTREAM && f["dport"] == 8000 && f["protocol"] == 6),
        "{site_flows:#?}"
    );
    assert!(
        site_flows
            .iter()
            .any(|f| f["dst"] == UPSTREAM && f["dport"] == 5353 && f["protocol"] == 17),
        "{site_flows:#?}"
    );
    assert!(
        site_flows
            .iter()
            .any(|f| f["dport"] == 8001 && f["dst_device"] == "laptop"),
        "{site_flows:#?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["device"] == "laptop" && f["dst"] == SITE_ADDR),
        "the device's flow to the site: {flows:#?}"
    );
    let m = lab.gateway.metrics();
    assert_eq!(m.value("rampart_onramp_connections", &[]), 1.0);
    assert!(m.value("rampart_onramp_accepted_total", &[]) >= 1.0);

    // Closing the connection ends its flows like removing a device (the echo flows are still open).
    bridge.stop(Duration::from_secs(10));
    wait_until(
        "the site's open flows to end with the connection",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            audit_flows(&lab)
                .iter()
                .any(|f| f["device"] == "warp/branch-7" && f["end_reason"] == "peer_removed")
                .then_some(())
        },
    );
    wait_until(
        "the connection gauge to drop",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            (lab.gateway
                .metrics()
                .value("rampart_onramp_connections", &[])
                == 0.0)
                .then_some(())
        },
    );
    // Nothing routes to the site any more.
    let r = support::ping(&dev.ns, SITE_ADDR, 2, 0.2, 1, None);
    assert_eq!(r.received, 0, "{}", r.output);
    drop(site_ns);
}

#[test]
fn refusals_malformed_contexts_and_garbage_are_counted_and_closed() {
    let sock = sock_dir("sp2");
    let lab = lab(sock.path());
    let warp = sock.path().join("warp.sock");
    let oxy = sock.path().join("oxy.sock");
    let status = |v: &Value| v["reply"]["status"].as_str().unwrap_or("").to_string();

    // Positive control: an allowed client, tenant and site; the connection stays open.
    let ok = probe(
        &warp,
        &[
            "--tenant",
            "acme",
            "--site",
            "branch-7",
            "--wait-close",
            "1",
        ],
    );
    assert_eq!(status(&ok), "accepted", "{ok}");
    assert_eq!(ok["closed"], false, "{ok}");
    assert!(ok["reply"]["session"].as_u64().unwrap() > 0, "{ok}");

    // A uid that is not allowed (gid 0 keeps the socket file's group access: SO_PEERCRED is what refuses).
    let v = probe(&warp, &["--uid", "65534", "--gid", "0", "--tenant", "acme"]);
    assert_eq!(status(&v), "not_permitted", "{v}");
    assert_eq!(v["closed"], true, "{v}");
    // A tenant the entry may not claim (it exists), and a site it may not claim.
    let v = probe(&warp, &["--tenant", "globex"]);
    assert_eq!(status(&v), "tenant_not_allowed", "{v}");
    assert_eq!(v["closed"], true, "{v}");
    let v = probe(&warp, &["--tenant", "acme", "--site", "branch-9"]);
    assert_eq!(status(&v), "claim_not_allowed", "{v}");
    assert_eq!(v["closed"], true, "{v}");
    // Malformed first datagrams: not a context, and an IPv4 header sent as if the context were implied.
    for first in ["deadbeef", "4500001c000000004011000000000000"] {
        let v = probe(&warp, &["--first", first]);
        assert_eq!(status(&v), "malformed", "{first}: {v}");
        assert_eq!(v["closed"], true, "{first}: {v}");
    }
    // Garbage after an accepted context: closed once max_bad_packets (5) is reached.
    let v = probe(&warp, &["--tenant", "acme", "--garbage", "20"]);
    assert_eq!(status(&v), "accepted", "{v}");
    assert_eq!(v["closed"], true, "{v}");

    // Oxy's protocol: no reply datagram, a good context keeps the connection, a bad one closes it.
    let v = probe(
        &oxy,
        &["--no-reply", "--tenant", "acme", "--wait-close", "1"],
    );
    assert_eq!(v["closed"], false, "{v}");
    let v = probe(&oxy, &["--no-reply", "--tenant", "globex"]);
    assert_eq!(v["closed"], true, "{v}");
    assert!(v["reply"].is_null(), "{v}");

    let m = lab.gateway.metrics();
    let un = |r: &str| m.value(DROPPED, &[("tenant", ""), ("reason", r)]);
    assert_eq!(un("onramp_refused"), 4.0, "{}", m.describe(DROPPED));
    assert_eq!(un("onramp_bad_context"), 2.0, "{}", m.describe(DROPPED));
    assert!(
        m.value(
            DROPPED,
            &[("tenant", "acme"), ("reason", "invalid_inner_packet")]
        ) >= 5.0,
        "{}",
        m.describe(DROPPED)
    );
    assert_eq!(m.value("rampart_onramp_closed_bad_packets_total", &[]), 1.0);
}

/// Two tenants with identical device addresses and identical site prefixes: each site reaches only its own
/// tenant's device and is reached only by it; a site sending from outside its prefixes is dropped.
#[test]
fn sites_of_two_tenants_with_identical_prefixes_never_cross_and_spoofing_is_dropped() {
    let sock = sock_dir("sp3");
    let mut lab = lab(sock.path());
    let dir = lab.dir().to_path_buf();
    // The off-ramp network is the first link (a device's own link must not be one of its AllowedIPs).
    let _up = lab.add_host("up");
    let a_dev = lab.add_client("acme", "laptop");
    let b_dev = lab.add_client("globex", "other");
    let dev_addr = a_dev.address().to_string();
    assert_eq!(b_dev.address().to_string(), dev_addr, "identical addresses");
    wait_ping(&a_dev.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway");
    wait_ping(&b_dev.ns, GW_ADDR, TUNNEL_UP, "other -> gateway");
    let _a_tcp = ident_server(&a_dev.ns, &dir, "a-tcp", &dev_addr, 8001, "laptop");
    let _b_tcp = ident_server(&b_dev.ns, &dir, "b-tcp", &dev_addr, 8001, "other");
    let _a_udp = udp_receiver(&a_dev.ns, &dir, "a-udp", &dev_addr, 5400);

    let (a_site, _a_bridge) = site_of(
        &lab,
        &sock.path().join("warp.sock"),
        "acme",
        "branch-7",
        "sa",
    );
    let (b_site, _b_bridge) = site_of(&lab, &sock.path().join("gx.sock"), "globex", "b1", "sb");
    let _a_site_tcp = ident_server(&a_site, &dir, "sa-tcp", SITE_ADDR, 8002, "site-a");
    let _b_site_tcp = ident_server(&b_site, &dir, "sb-tcp", SITE_ADDR, 8002, "site-b");
    wait_ping(&a_site, &dev_addr, TUNNEL_UP, "site a -> its device");
    wait_ping(&b_site, &dev_addr, TUNNEL_UP, "site b -> its device");
    for _ in 0..3 {
        assert_eq!(
            ident_probe(&a_site, &dev_addr, 8001, "sa"),
            Ok("laptop".into())
        );
        assert_eq!(
            ident_probe(&b_site, &dev_addr, 8001, "sb"),
            Ok("other".into())
        );
        assert_eq!(
            ident_probe(&a_dev.ns, SITE_ADDR, 8002, "laptop"),
            Ok("site-a".into())
        );
        assert_eq!(
            ident_probe(&b_dev.ns, SITE_ADDR, 8002, "other"),
            Ok("site-b".into())
        );
    }

    // Spoofing: site a sends from an address outside its prefixes; the positive control from its own.
    a_site.ip(&["addr", "add", "10.99.0.5/32", "dev", "onr0"]);
    udp_send(&a_site, "10.99.0.5", &dev_addr, 5400, 3, "spoofed");
    udp_send(&a_site, SITE_ADDR, &dev_addr, 5400, 3, "genuine");
    wait_until(
        "the genuine datagrams at the device",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || udp_log(&dir, "a-udp").contains("genuine").then_some(()),
    );
    assert!(
        !udp_log(&dir, "a-udp").contains("spoofed"),
        "{}",
        udp_log(&dir, "a-udp")
    );
    let m = lab.gateway.metrics();
    assert!(
        m.value(DROPPED, &[("tenant", "acme"), ("reason", "spoofed_source")]) >= 3.0,
        "{}",
        m.describe(DROPPED)
    );
}
