//! End-to-end acceptance of shared enrollment and failover Mode A (`fleet::enrollment`,
//! `enroll::failover`): two `rampart run` nodes, each in its own namespace with its own WireGuard key and
//! enrollment listener, one real PostgreSQL (`support::pg`), one device namespace linked to both nodes, a
//! real wireguard-go device set up by the real `rampart enroll` client.
//!
//! - a token created on node A is spent fleet-wide: its first use enrolls the device through A, its second
//!   (last) use works through B (the control), the next use is refused on B; a one-use token spent through A
//!   and B at once enrolls exactly one device; two devices enrolling into one tenant through A and B at once
//!   get two addresses; a fresh token works on B; a token revoked on B is refused
//!   through A (its sibling is not);
//! - with PostgreSQL stopped B refuses an enrollment with a clear error; restarted, the same token enrolls
//!   (the control);
//! - the device's credential works on B: its config refreshed from B names B's endpoint and key; a key
//!   rotation through B is refused naming node A (rotation stays on the node that enrolled it);
//! - `kill -9` of node A during a ping: `rampart enroll --watch` moves the device to B and the ping is
//!   answered again; the recovery time (kill -> first reply through B) is printed, never asserted.
//!
//! Run: `cargo test --features test-hooks --test e2e_fleet_failover -- --test-threads=1 --nocapture` (root).

#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::gateway::BIN;
use support::lab::DeviceNs;
use support::netns::Netns;
use support::pg::Postgres;
use support::process::{run, Proc, Ran};
use support::wg_client::ClientConfig;
use support::{wait_ping, wait_until, Lab, TenantSpec};

const TUNNEL_UP: Duration = Duration::from_secs(30);
/// Generous: a notification normally applies within a fraction of a second.
const APPLIED: Duration = Duration::from_secs(30);
/// Generous bound on the failover (the measured time is printed).
const RECOVERY_BOUND: Duration = Duration::from_secs(90);
const GW_ADDR: &str = "100.96.0.1";
const A_ADDR: &str = "198.18.0.1";
const B_ADDR: &str = "198.18.0.2";

fn node_lab(pg: &Postgres, node: &str, underlay: &str) -> Lab {
    let t = TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR);
    Lab::at_underlay(
        &[t],
        underlay,
        &format!(
            "enroll_listen = \"{underlay}:8443\"\n\n[fleet]\nnode_id = \"{node}\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\nheartbeat_interval_ms = 500\n",
            pg.url(),
            pg.password_file().display()
        ),
    )
}

/// `rampart token create --json` on `lab`: (token, enrollment URL of that node).
fn mint(lab: &Lab, uses: Option<&str>) -> (String, String) {
    let mut args = vec!["--tenant", "acme", "--json"];
    if let Some(u) = uses {
        args.extend(["--uses", u]);
    }
    let out = lab.gateway.cli(&["token", "create"], &args).expect_ok();
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("token create --json is not JSON ({e}): {out}"));
    (
        v["token"].as_str().unwrap().to_string(),
        v["url"].as_str().unwrap().to_string(),
    )
}

/// `rampart enroll ARGS` inside `ns` (the token from a file).
fn enroll(ns: &Netns, dir: &Path, url: &str, token: &str, out: &Path, name: &str) -> Ran {
    let tf = dir.join(format!("{name}.token"));
    std::fs::write(&tf, token).unwrap();
    let mut c = ns.exec(BIN);
    c.args(["enroll", url, "--token-file"])
        .arg(&tf)
        .arg("--out")
        .arg(out)
        .args(["--name", name])
        .env("RAMPART_LOG", "warn");
    run(&mut c, Duration::from_secs(90))
}

fn rampart_enroll(ns: &Netns, args: &[&str]) -> Ran {
    let mut c = ns.exec(BIN);
    c.arg("enroll").args(args).env("RAMPART_LOG", "warn");
    run(&mut c, Duration::from_secs(90))
}

/// The values of a `# rampart-...` comment line of a device file.
fn meta(path: &Path, key: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.strip_prefix('#')?.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
        .collect()
}

fn config(path: &Path) -> ClientConfig {
    let text = std::fs::read_to_string(path).unwrap();
    ClientConfig::parse(&text).unwrap_or_else(|e| panic!("unusable config ({e}):\n{text}"))
}

fn knows(lab: &Lab, name: &str) -> bool {
    lab.gateway
        .device_list_json()
        .as_array()
        .is_some_and(|a| a.iter().any(|d| d["name"] == name))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The `ping -D` reply times (unix seconds) in `out`.
fn reply_times(out: &str) -> Vec<f64> {
    out.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

#[test]
fn tokens_and_credentials_are_shared_and_a_watched_device_fails_over_when_its_node_is_killed() {
    let mut pg = Postgres::start("failover");
    let mut a = node_lab(&pg, "gw-a", A_ADDR);
    let b = node_lab(&pg, "gw-b", B_ADDR);
    wait_until(
        "both nodes' enrollment URLs in fleet_nodes",
        APPLIED,
        Duration::from_millis(200),
        || {
            (pg.psql("SELECT count(*) FROM fleet_nodes WHERE enroll_url IS NOT NULL")
                .trim()
                == "2")
                .then_some(())
        },
    );
    let dir = a.dir().to_path_buf();

    // The device namespace reaches A (its first link) and B (a second link).
    let DeviceNs {
        ns,
        underlay,
        link: l,
    } = a.device_ns("laptop");
    b.link_device(&ns, 200);

    // A token for two uses, created on A.
    let (token, a_url) = mint(&a, Some("2"));
    assert!(a_url.contains(A_ADDR), "{a_url}");
    let (_, b_url) = mint(&b, Some("1"));
    assert!(b_url.contains(B_ADDR), "{b_url}");

    // First use: the device enrolls through A's API with the real client.
    let file = dir.join("laptop.conf");
    let r = enroll(&ns, &dir, &a_url, &token, &file, "laptop");
    assert!(r.success(), "enrollment through A: {r}");
    let cfg = config(&file);
    assert_eq!(cfg.endpoint, format!("{A_ADDR}:51820"), "{}", cfg.text);
    let urls = meta(&file, "rampart-fleet-url");
    assert_eq!(urls.len(), 2, "the file lists both nodes: {urls:?}");
    assert!(
        urls[0].contains(A_ADDR) && urls[1].contains(B_ADDR),
        "A first: {urls:?}"
    );
    let a_key = cfg.peer_public_key.clone();
    // B allocates addresses against every device it knows: let it learn the laptop first.
    wait_until(
        "node B knows the laptop (enrolled on A)",
        APPLIED,
        Duration::from_millis(200),
        || knows(&b, "laptop").then_some(()),
    );

    // Second (last) use through B: works (the token is shared); the next use is refused on B.
    let other = dir.join("other.conf");
    let r = enroll(&ns, &dir, &b_url, &token, &other, "desktop");
    assert!(r.success(), "the token's last use through B: {r}");
    let r = enroll(&ns, &dir, &b_url, &token, &dir.join("third.conf"), "third");
    assert!(
        !r.success(),
        "a third use of a two-use token worked on B: {r}"
    );
    assert!(r.stderr.contains("token_used_up"), "{r}");
    let listed = b.gateway.cli(&["token", "list"], &["--json"]).expect_ok();
    assert!(
        listed.contains("\"used\":2") || listed.contains("\"used\": 2"),
        "{listed}"
    );
    // A one-use token spent through A and B at the same moment: exactly one enrollment gets it. (Addresses are
    // allocated by each node against the devices it knows: let A learn B's device first.)
    wait_until(
        "node A knows the desktop (enrolled on B)",
        APPLIED,
        Duration::from_millis(200),
        || knows(&a, "desktop").then_some(()),
    );
    let (race, _) = mint(&a, Some("1"));
    let results: Vec<Ran> = std::thread::scope(|sc| {
        let runs: Vec<_> = [(&a_url, "race-a"), (&b_url, "race-b")]
            .into_iter()
            .map(|(url, name)| {
                let (ns, dir, race) = (&ns, &dir, &race);
                sc.spawn(move || {
                    enroll(ns, dir, url, race, &dir.join(format!("{name}.conf")), name)
                })
            })
            .collect();
        runs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = results.iter().filter(|r| r.success()).count();
    assert_eq!(
        won, 1,
        "a one-use token enrolled {won} devices: {results:?}"
    );
    let lost = results.iter().find(|r| !r.success()).unwrap();
    assert!(lost.stderr.contains("token_used_up"), "{lost}");
    let winner = if results[0].success() {
        "race-a"
    } else {
        "race-b"
    };
    wait_until(
        "both nodes know the race's winner",
        APPLIED,
        Duration::from_millis(200),
        || (knows(&a, winner) && knows(&b, winner)).then_some(()),
    );
    // Two devices enrolling into one tenant through A and B at the same moment, neither node having heard of
    // the other's device: PostgreSQL places them, so they get two addresses (both enroll: the
    // control that the race ran; before the placement was one transaction both nodes picked the same free
    // address from their identical views).
    let (ta, _) = mint(&a, Some("1"));
    let (tb, _) = mint(&b, Some("1"));
    let files: Vec<std::path::PathBuf> = ["twin-a", "twin-b"]
        .iter()
        .map(|n| dir.join(format!("{n}.conf")))
        .collect();
    let twins: Vec<Ran> = std::thread::scope(|sc| {
        let runs: Vec<_> = [
            (&a_url, &ta, &files[0], "twin-a"),
            (&b_url, &tb, &files[1], "twin-b"),
        ]
        .into_iter()
        .map(|(url, token, out, name)| {
            let (ns, dir) = (&ns, &dir);
            sc.spawn(move || enroll(ns, dir, url, token, out, name))
        })
        .collect();
        runs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        twins.iter().all(Ran::success),
        "both concurrent enrollments: {twins:?}"
    );
    let (ca, cb) = (config(&files[0]), config(&files[1]));
    assert_ne!(
        ca.addresses, cb.addresses,
        "two devices enrolled at once through A and B got one address:\n{}\n{}",
        ca.text, cb.text
    );
    eprintln!(
        "concurrent enrollments through A and B: {:?} / {:?}",
        ca.addresses, cb.addresses
    );

    // A fresh token (created on A) works on B.
    let (fresh, _) = mint(&a, Some("1"));
    let r = enroll(&ns, &dir, &b_url, &fresh, &dir.join("fresh.conf"), "fresh");
    assert!(r.success(), "a fresh token through B: {r}");

    // A token revoked on B enrolls nowhere: refused through A; its sibling, not revoked, enrolls through A.
    let (revoked, _) = mint(&a, Some("1"));
    let (sibling, _) = mint(&a, Some("1"));
    let id = &revoked[5..21];
    b.gateway.cli(&["token", "revoke"], &[id]).expect_ok();
    let r = enroll(&ns, &dir, &a_url, &revoked, &dir.join("rv.conf"), "revoked");
    assert!(!r.success(), "a token revoked on B enrolled through A: {r}");
    assert!(r.stderr.contains("token_revoked"), "{r}");
    let r = enroll(
        &ns,
        &dir,
        &a_url,
        &sibling,
        &dir.join("sib.conf"),
        "sibling",
    );
    assert!(r.success(), "the sibling token through A: {r}");
    wait_until(
        "node B knows the sibling (enrolled on A)",
        APPLIED,
        Duration::from_millis(200),
        || knows(&b, "sibling").then_some(()),
    );

    // PostgreSQL down: B refuses an enrollment with a clear error; back up, the same token works (control).
    let (later, _) = mint(&a, Some("1"));
    assert!(pg.stop("immediate").success());
    let r = enroll(&ns, &dir, &b_url, &later, &dir.join("later.conf"), "later");
    assert!(!r.success(), "enrolled with PostgreSQL down: {r}");
    assert!(
        r.stderr.contains("unavailable") && r.stderr.contains("fleet's database"),
        "{r}"
    );
    pg.restart();
    let (r, _) = wait_until(
        "enrollment through B once PostgreSQL is back",
        APPLIED,
        Duration::from_millis(500),
        || {
            let r = enroll(&ns, &dir, &b_url, &later, &dir.join("later.conf"), "later");
            r.success().then_some(r)
        },
    );
    assert!(r.stderr.contains("enrolled device"), "{r}");

    // The device comes up through A.
    let dev = DeviceNs {
        ns,
        underlay,
        link: l,
    };
    let client = a.start_device(dev, "acme", "laptop", cfg);
    wait_ping(
        &client.ns,
        GW_ADDR,
        TUNNEL_UP,
        "laptop -> gateway through A",
    );

    // Its credential works on B: a refresh from B gives B's endpoint and key.
    let copy = dir.join("laptop-via-b.conf");
    let text = std::fs::read_to_string(&file).unwrap();
    let a_line = format!("# rampart-url = {}", meta(&file, "rampart-url")[0]);
    std::fs::write(
        &copy,
        text.replace(&a_line, &format!("# rampart-url = {b_url}")),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let r = rampart_enroll(&client.ns, &["--refresh", "--out", copy.to_str().unwrap()]);
    assert!(r.success(), "refresh through B: {r}");
    let via_b = config(&copy);
    assert_eq!(via_b.endpoint, format!("{B_ADDR}:51820"), "{}", via_b.text);
    assert_ne!(via_b.peer_public_key, a_key, "B has its own key (Mode A)");
    // Rotation stays on the enrolling node: refused on B, naming it.
    let r = rampart_enroll(&client.ns, &["--rotate", "--out", copy.to_str().unwrap()]);
    assert!(!r.success(), "rotated through B: {r}");
    assert!(
        r.stderr.contains("wrong_node") && r.stderr.contains("gw-a"),
        "{r}"
    );

    // The watcher, then a steady ping, then kill -9 of A.
    let mut watch_cmd = client.ns.exec(BIN);
    watch_cmd
        .args(["enroll", "--watch", "--out"])
        .arg(&file)
        .args([
            "--interface",
            &client.ifname,
            "--interval",
            "1",
            "--api-failures",
            "2",
        ])
        .env("RAMPART_LOG", "warn");
    let mut watcher = Proc::spawn("watch", watch_cmd, &dir);
    // Line-buffered, so each reply is in the file as it arrives.
    let mut ping_cmd = client.ns.exec("stdbuf");
    ping_cmd.args(["-oL", "ping", "-D", "-n", "-i", "0.2", "-W", "1", GW_ADDR]);
    let mut pinger = Proc::spawn("ping", ping_cmd, &dir);
    wait_until(
        "the steady ping answered through A",
        TUNNEL_UP,
        Duration::from_millis(200),
        || (!reply_times(&pinger.stdout()).is_empty()).then_some(()),
    );
    // A few seconds of the watcher seeing A healthy: it must not move the device.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        config(&file).endpoint,
        format!("{A_ADDR}:51820"),
        "moved while A was up"
    );
    assert!(watcher.is_running(), "watcher exited: {}", watcher.log());

    let killed_at = unix_now();
    a.gateway.kill();
    let (recovered, _) = wait_until(
        "a ping reply through B after A was killed",
        RECOVERY_BOUND,
        Duration::from_millis(100),
        || {
            reply_times(&pinger.stdout())
                .into_iter()
                .find(|t| *t > killed_at + 0.5)
        },
    );
    let moved = config(&file);
    assert_eq!(moved.endpoint, format!("{B_ADDR}:51820"), "{}", moved.text);
    assert_eq!(moved.peer_public_key, via_b.peer_public_key);
    let endpoints = client
        .wg(&["show", &client.ifname, "endpoints"])
        .expect_ok();
    assert!(endpoints.contains(B_ADDR), "{endpoints}");
    assert!(
        watcher.log().contains("failed over to"),
        "watcher log:\n{}",
        watcher.log()
    );
    // The first reply after the kill could only come through B: A is dead. A reply sent before the kill and
    // delivered just after is excluded by the 0.5 s margin above (replies take milliseconds here).
    println!(
        "failover Mode A recovery: {:.2} s (kill -9 of node A -> first ping reply through node B; \
         watcher --interval 1 --api-failures 2, ping every 0.2 s)",
        recovered - killed_at
    );
    pinger.stop(Duration::from_secs(5));
    watcher.stop(Duration::from_secs(5));
}
