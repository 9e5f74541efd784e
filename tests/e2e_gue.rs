//! End-to-end acceptance of the unconnected on-ramp (issue 18, `[[onramp.gue]]`): branch sites send GUE over
//! UDP to a real `rampart run`. A userspace site (`tests/tools/gue_site.py`) makes what a kernel cannot: a
//! spoofed outer source, inner sources outside the site's networks, flags, control messages, keyed packets
//! with a bad tag or a replayed counter; each attack next to its positive control. Its TUN bridge carries
//! real ping and TCP from a site namespace to the gateway and an off-ramp host, and the flows are recorded
//! with the site as their subject. Root only; see `support/mod.rs` for the harness rules.
//!
//! Run: `cargo test --features test-hooks --test e2e_gue -- --test-threads=1`

#[allow(unused_imports)]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::netns::Netns;
use support::probe::ident_server;
use support::process::{run, Proc};
use support::{tempdir, TempDir};
use support::{wait_ping, wait_until, Lab, TenantSpec};

const GW_ADDR: &str = "100.96.0.1";
const GW_UNDERLAY: &str = "198.18.0.1";
const TOOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/gue_site.py");
/// The lab's links in the order the tests make them: upstream host, then the sites.
const UPSTREAM_NET: &str = "198.18.1.0/24";
const UPSTREAM: &str = "198.18.1.2";
const SITE_OUTER: &str = "198.18.2.2";
const KEYED_OUTER: &str = "198.18.3.2";
const GX_OUTER: &str = "198.18.4.2";
const SITE_ADDR: &str = "10.7.0.5";
const KEYED_ADDR: &str = "10.9.0.5";
const KEY: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
const DROPPED: &str = "rampart_dropped_packets_total";
const TUNNEL_UP: Duration = Duration::from_secs(30);

fn tenant(id: &str) -> TenantSpec {
    let mut t = TenantSpec::new(id, "100.96.0.0/24", GW_ADDR);
    t.rules = format!("offramp = [\"{UPSTREAM_NET}\"]\n{}", t.rules);
    t
}

/// Three sites on one socket: branch-7 (acme, unkeyed), keyed-9 (acme, keyed) and gx-1 (globex, the same
/// inner network as branch-7).
fn gue_config(key_dir: &TempDir) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let key = key_dir.path().join("keyed-9.key");
    std::fs::write(&key, format!("{KEY}\n")).expect("key file");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    format!(
        r#"
[[onramp.gue]]
listen = "{GW_UNDERLAY}"

[[onramp.gue.site]]
name = "branch-7"
tenant = "acme"
remote = "{SITE_OUTER}"
inner_prefixes = ["10.7.0.0/16"]

[[onramp.gue.site]]
name = "keyed-9"
tenant = "acme"
remote = "{KEYED_OUTER}"
inner_prefixes = ["10.9.0.0/16"]
key_file = "{key}"
key_id = 9

[[onramp.gue.site]]
name = "gx-1"
tenant = "globex"
remote = "{GX_OUTER}"
inner_prefixes = ["10.7.0.0/16"]
"#,
        key = key.display()
    )
}

struct Sites {
    lab: Lab,
    _keys: TempDir,
    up: Netns,
    site: Netns,
    keyed: Netns,
    gx: Netns,
}

fn sites() -> Sites {
    let keys = tempdir("gue-keys");
    let mut lab = Lab::with_settings(&[tenant("acme"), tenant("globex")], &gue_config(&keys));
    let up = lab.add_host("up");
    let site = lab.add_host("site");
    let keyed = lab.add_host("keyed");
    let gx = lab.add_host("gx");
    assert_eq!(
        (
            up.underlay.to_string(),
            site.underlay.to_string(),
            keyed.underlay.to_string(),
            gx.underlay.to_string()
        ),
        (
            UPSTREAM.into(),
            SITE_OUTER.into(),
            KEYED_OUTER.into(),
            GX_OUTER.into()
        )
    );
    Sites {
        lab,
        _keys: keys,
        up: up.ns,
        site: site.ns,
        keyed: keyed.ns,
        gx: gx.ns,
    }
}

/// Runs the tool's `probe` in `ns` and returns its JSON.
fn probe(ns: &Netns, args: &[&str]) -> Value {
    let r = run(
        ns.exec("python3")
            .arg(TOOL)
            .arg("probe")
            .args(["--gw", GW_UNDERLAY])
            .args(args),
        Duration::from_secs(60),
    );
    serde_json::from_str(r.stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {r}"))
}

/// Echo replies from `from` in a probe's output.
fn echo_replies(v: &Value, from: &str) -> usize {
    v["replies"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter(|r| r["src"] == from && r["icmp_type"] == 0)
                .count()
        })
        .unwrap_or(0)
}

fn dropped(lab: &Lab, tenant: &str, reason: &str) -> f64 {
    lab.gateway
        .metrics()
        .value(DROPPED, &[("tenant", tenant), ("reason", reason)])
}

/// Waits until the drop counter reaches `at_least` (the data path counts after the probe returned).
fn wait_dropped(lab: &Lab, tenant: &str, reason: &str, at_least: f64) {
    wait_until(
        &format!("{reason} drops of tenant {tenant:?} to reach {at_least}"),
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (dropped(lab, tenant, reason) >= at_least).then_some(()),
    );
}

#[test]
fn spoofed_outer_and_inner_sources_flags_and_control_are_dropped_the_site_itself_passes() {
    let s = sites();
    let bind = ["--bind", SITE_OUTER];
    // Attack first: an outer source that is no site's (a second address on the site's own link).
    s.site.ip(&["addr", "add", "198.18.2.3/24", "dev", "eth0"]);
    let spoofed = probe(
        &s.site,
        &["--bind", "198.18.2.3", "--src", SITE_ADDR, "--dst", GW_ADDR],
    );
    assert_eq!(echo_replies(&spoofed, GW_ADDR), 0, "{spoofed}");
    wait_dropped(&s.lab, "", "gue_unknown_source", 3.0);
    // Positive control: the same probe from the site's configured address is answered, in GUE, by the
    // gateway's tenant address.
    let ok = probe(
        &s.site,
        &[&bind[..], &["--src", SITE_ADDR, "--dst", GW_ADDR]].concat(),
    );
    assert_eq!(echo_replies(&ok, GW_ADDR), 3, "{ok}");
    assert_eq!(ok["bad_replies"], 0, "{ok}");
    assert!(
        ok["replies"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["dst"] == SITE_ADDR && r["from"] == GW_UNDERLAY),
        "{ok}"
    );
    // Variant 1 (a bare IP packet) is taken too.
    let v1 = probe(
        &s.site,
        &[
            &bind[..],
            &["--variant", "1", "--src", SITE_ADDR, "--dst", GW_ADDR],
        ]
        .concat(),
    );
    assert_eq!(echo_replies(&v1, GW_ADDR), 3, "{v1}");

    // An inner source outside the site's networks (another site's network of the same tenant).
    let before = dropped(&s.lab, "acme", "spoofed_source");
    let v = probe(
        &s.site,
        &[&bind[..], &["--src", KEYED_ADDR, "--dst", GW_ADDR]].concat(),
    );
    assert_eq!(echo_replies(&v, GW_ADDR), 0, "{v}");
    wait_dropped(&s.lab, "acme", "spoofed_source", before + 3.0);
    // Flags (extension fields the gateway does not read) and control messages.
    let v = probe(
        &s.site,
        &[
            &bind[..],
            &["--flags", "1", "--src", SITE_ADDR, "--dst", GW_ADDR],
        ]
        .concat(),
    );
    assert_eq!(echo_replies(&v, GW_ADDR), 0, "{v}");
    wait_dropped(&s.lab, "acme", "gue_flags", 3.0);
    let v = probe(
        &s.site,
        &[
            &bind[..],
            &["--control", "--src", SITE_ADDR, "--dst", GW_ADDR],
        ]
        .concat(),
    );
    assert_eq!(echo_replies(&v, GW_ADDR), 0, "{v}");
    wait_dropped(&s.lab, "acme", "gue_control", 3.0);

    // Another tenant's site with the same inner network is its own tenant's subject.
    let gx = probe(
        &s.gx,
        &["--bind", GX_OUTER, "--src", SITE_ADDR, "--dst", GW_ADDR],
    );
    assert_eq!(echo_replies(&gx, GW_ADDR), 3, "{gx}");
    let m = s.lab.gateway.metrics();
    assert!(m.value("rampart_rx_packets_total", &[("tenant", "globex")]) >= 3.0);
    assert!(
        m.value(
            "rampart_onramp_datagrams_total",
            &[("onramp", "gue"), ("direction", "tx")]
        ) >= 9.0,
        "{}",
        m.describe("rampart_onramp_datagrams_total")
    );
    drop(s.up);
}

#[test]
fn keyed_site_drops_bad_tags_and_replays_and_takes_good_tags() {
    let s = sites();
    let args = |extra: &[&str]| -> Vec<String> {
        [
            &["--bind", KEYED_OUTER, "--key", KEY, "--key-id", "9"][..],
            &["--src", KEYED_ADDR, "--dst", GW_ADDR],
            extra,
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let p = |extra: &[&str]| {
        let a = args(extra);
        probe(&s.keyed, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Attacks first: a tag with one bit flipped, and no private data at all (what an unkeyed sender makes).
    let v = p(&["--tamper"]);
    assert_eq!(echo_replies(&v, GW_ADDR), 0, "{v}");
    wait_dropped(&s.lab, "acme", "gue_bad_tag", 3.0);
    let v = probe(
        &s.keyed,
        &["--bind", KEYED_OUTER, "--src", KEYED_ADDR, "--dst", GW_ADDR],
    );
    assert_eq!(echo_replies(&v, GW_ADDR), 0, "{v}");
    wait_dropped(&s.lab, "acme", "gue_bad_context", 3.0);
    // Positive control: good tags; every packet sent twice, the second copy (same counter) is dropped.
    // Counters restart at 1 in each probe: the window remembers them, so the first probe uses 1..3 and
    // this one must not reuse them.
    let ok = p(&["--count", "3"]);
    assert_eq!(echo_replies(&ok, GW_ADDR), 3, "{ok}");
    let replayed_before = dropped(&s.lab, "acme", "replayed");
    let again = p(&["--count", "3"]);
    assert_eq!(
        echo_replies(&again, GW_ADDR),
        0,
        "a replay of counters 1..3 passed: {again}"
    );
    wait_dropped(&s.lab, "acme", "replayed", replayed_before + 3.0);
    let twice = p(&["--count", "6", "--replay"]);
    // Counters 1..3 are old; 4..6 pass once each, their copies are replays.
    assert_eq!(echo_replies(&twice, GW_ADDR), 3, "{twice}");
    wait_dropped(
        &s.lab,
        "acme",
        "replayed",
        replayed_before + 3.0 + 6.0 + 3.0,
    );
    drop(s.up);
}

#[test]
fn site_reaches_the_gateway_and_an_offramp_host_through_gue_and_flows_name_the_site() {
    let s = sites();
    let dir = s.lab.dir().to_path_buf();
    let _up_tcp = ident_server(&s.up, &dir, "up-tcp", UPSTREAM, 8000, "upstream");
    let mut cmd = s.site.exec("python3");
    cmd.arg(TOOL)
        .arg("bridge")
        .args(["--gw", GW_UNDERLAY, "--bind", SITE_OUTER])
        .args(["--addr", &format!("{SITE_ADDR}/32")])
        .args(["--route", "100.96.0.0/24", "--route", UPSTREAM_NET]);
    let mut bridge = Proc::spawn("gue-bridge", cmd, &dir);
    bridge.wait_stdout("READY", Duration::from_secs(30));
    wait_ping(
        &s.site,
        GW_ADDR,
        TUNNEL_UP,
        "site -> gateway address over GUE",
    );
    assert_eq!(
        support::probe::ident_probe(&s.site, UPSTREAM, 8000, "site"),
        Ok("upstream".into())
    );
    let flows = wait_until(
        "flow records of the site",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let f: Vec<Value> = s
                .lab
                .gateway
                .cli(&["audit", "flows"], &["--json"])
                .expect_ok()
                .lines()
                .map(|l| serde_json::from_str(l).expect("JSON line"))
                .collect();
            f.iter()
                .any(|f| f["device"] == "gue/branch-7" && f["dport"] == 8000)
                .then_some(f)
        },
    )
    .0;
    let site_flows: Vec<&Value> = flows
        .iter()
        .filter(|f| f["device"] == "gue/branch-7")
        .collect();
    assert!(site_flows.len() >= 2, "{flows:#?}");
    for f in &site_flows {
        assert_eq!(f["tenant"], "acme", "{f}");
        assert_eq!(f["user"], "onramp:gue/branch-7", "{f}");
        assert_eq!(f["src"], SITE_ADDR, "{f}");
    }
    assert!(
        site_flows
            .iter()
            .any(|f| f["dst"] == UPSTREAM && f["protocol"] == 6),
        "{site_flows:#?}"
    );
    bridge.stop(Duration::from_secs(10));
}

/// The VM site's addresses: the tap in the gateway's namespace, the guest behind it, its inner network.
const VM_HOP: &str = "198.18.99.1";
const VM_OUTER: &str = "198.18.99.2";
const VM_INNER: &str = "10.11.0.9";
const VM_TOOL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/gue_vm.sh");
/// The guest's kernel and initramfs, built once (the debs are cached next to them).
const VM_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/gue-vm");

/// A real kernel GUE peer: a QEMU (TCG) guest with Debian's cloud kernel (FOU + IPIP modules; this host's kernel
/// has neither) on a tap in the gateway's namespace. Its `encap gue` tunnel carries ping to the gateway's
/// tenant address and an HTTP fetch from an off-ramp host; the replies are decapsulated by the guest's kernel.
#[test]
fn kernel_gue_tunnel_in_a_vm_pings_and_fetches_a_page_through_the_gateway() {
    assert!(
        std::process::Command::new("sh")
            .args(["-c", "command -v qemu-system-x86_64 >/dev/null"])
            .status()
            .is_ok_and(|s| s.success()),
        "qemu-system-x86_64 is missing: install qemu-system-x86 (`make deps` does); this test boots a kernel GUE peer"
    );
    let built = run(
        std::process::Command::new("sh").args([VM_TOOL, "build", VM_DIR]),
        Duration::from_secs(600),
    );
    assert!(built.success(), "cannot build the GUE guest: {built}");

    let keys = tempdir("gue-keys");
    let vm_site = format!(
        "{}\n[[onramp.gue.site]]\nname = \"kvm\"\ntenant = \"acme\"\nremote = \"{VM_OUTER}\"\ninner_prefixes = [\"10.11.0.0/16\"]\n",
        gue_config(&keys)
    );
    let mut lab = Lab::with_settings(&[tenant("acme"), tenant("globex")], &vm_site);
    let up = lab.add_host("up");
    assert_eq!(up.underlay.to_string(), UPSTREAM);
    let dir = lab.dir().to_path_buf();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    std::fs::write(www.join("index.html"), "page-through-gue\n").expect("page");
    let mut cmd = up.ns.exec("python3");
    cmd.args([
        "-u",
        "-m",
        "http.server",
        "8080",
        "--bind",
        UPSTREAM,
        "--directory",
    ])
    .arg(&www);
    let mut web = Proc::spawn("up-http", cmd, &dir);
    web.wait_stdout("Serving HTTP", Duration::from_secs(30));

    let gw = &lab.gw_ns;
    gw.ip(&["tuntap", "add", "gtap0", "mode", "tap"]);
    gw.ip(&["addr", "add", &format!("{VM_HOP}/24"), "dev", "gtap0"]);
    gw.ip(&["link", "set", "gtap0", "up"]);
    let mut cmd = gw.exec("sh");
    cmd.args([VM_TOOL, "run", VM_DIR, "gtap0"]).args([
        format!("rampart.addr={VM_OUTER}/24"),
        format!("rampart.hop={VM_HOP}"),
        format!("rampart.gw={GW_UNDERLAY}"),
        format!("rampart.inner={VM_INNER}"),
        format!("rampart.routes=100.96.0.0/24,{UPSTREAM_NET}"),
        format!("rampart.ping={GW_ADDR}"),
        format!("rampart.fetch=http://{UPSTREAM}:8080/index.html"),
    ]);
    let mut vm = Proc::spawn("gue-vm", cmd, &dir);
    vm.wait_stdout("GUEST DONE", Duration::from_secs(180));
    let out = vm.stdout();
    vm.stop(Duration::from_secs(10));
    assert!(
        out.contains("RESULT ping 0"),
        "the guest's ping over GUE failed:\n{out}"
    );
    assert!(
        out.contains("RESULT fetch 0") && out.contains("PAGE page-through-gue"),
        "the guest's fetch over GUE failed:\n{out}"
    );
    wait_until(
        "the VM site's flow record",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let flows: Vec<Value> = lab
                .gateway
                .cli(&["audit", "flows"], &["--json"])
                .expect_ok()
                .lines()
                .map(|l| serde_json::from_str(l).expect("JSON line"))
                .collect();
            flows
                .iter()
                .any(|f| {
                    f["device"] == "gue/kvm"
                        && f["src"] == VM_INNER
                        && f["dst"] == UPSTREAM
                        && f["dport"] == 8080
                })
                .then_some(())
        },
    );
    web.stop(Duration::from_secs(5));
    drop(lab);
}
