//! End-to-end acceptance of the fleet's shared state (`fleet::state`) with a real PostgreSQL (`support::pg`)
//! and real wireguard-go devices through two `rampart run` nodes, each in its own namespace with its own
//! state dir: a device added on node A gets traffic through node B; a rule changed on A (`rampart reload`
//! on A) cuts a flow on B; with PostgreSQL stopped B keeps serving and catches up once it is back;
//! `rampart fleet status` shows both nodes, their applied version and lag, and marks a stopped node STALE.
//!
//! Run: `cargo test --features test-hooks --test e2e_fleet_state -- --test-threads=1` (root).

#[allow(unused_imports)]
mod support;

use std::time::Duration;

use serde_json::Value;
use support::gateway::ALLOW_ALL;
use support::pg::Postgres;
use support::wg_client::WgClient;
use support::{ping_once, wait_ping, wait_until, Lab, TenantSpec};

const TUNNEL_UP: Duration = Duration::from_secs(30);
/// Generous: a notification normally applies within a fraction of a second.
const APPLIED: Duration = Duration::from_secs(30);
const GW_ADDR: &str = "100.96.0.1";

/// Devices may ping the gateway only: traffic between devices is denied.
const PING_GATEWAY_ONLY: &str =
    "[[tenant.rule]]\nid = \"ping-gateway\"\naction = \"allow\"\ndst = [\"gateway\"]\nproto = \"icmp\"\n";

fn node_lab(pg: &Postgres, node: &str) -> Lab {
    let mut t = TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR);
    t.rules = ALLOW_ALL.to_string();
    Lab::with_settings(
        &[t],
        &format!(
            "\n[fleet]\nnode_id = \"{node}\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\nheartbeat_interval_ms = 300\n",
            pg.url(),
            pg.password_file().display()
        ),
    )
}

/// `rampart fleet status --json`, one object per node.
fn fleet_status(lab: &Lab, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    lab.gateway
        .cli(&["fleet", "status"], &args)
        .expect_ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON ({e}): {l}")))
        .collect()
}

fn node<'a>(status: &'a [Value], id: &str) -> Option<&'a Value> {
    status.iter().find(|n| n["node"] == id)
}

/// Whether `lab`'s node lists device `name` (its own or the fleet's).
fn knows(lab: &Lab, name: &str) -> bool {
    lab.gateway
        .device_list_json()
        .as_array()
        .is_some_and(|a| a.iter().any(|d| d["name"] == name))
}

/// The rules of node `lab`'s config file replaced by `rules`, then `rampart reload` on it.
fn set_rules(lab: &Lab, from: &str, to: &str) {
    let text = std::fs::read_to_string(&lab.gateway.config).unwrap();
    assert!(text.contains(from), "rules to replace in:\n{text}");
    std::fs::write(&lab.gateway.config, text.replace(from, to)).unwrap();
    let r = lab.gateway.cli(&["reload"], &[]).expect_ok();
    assert!(r.contains("reloaded"), "{r}");
}

/// Device `name` enrolled with `rampart device add` on `on`, its wireguard-go client pointed at `via` (Mode
/// A: the device's config names the node it uses; `via_key` is that node's public key).
fn client_via(on: &Lab, via: &mut Lab, via_key: &str, name: &str) -> WgClient {
    let mut config = on
        .gateway
        .device_add("acme", name, &format!("{name}@acme.example"));
    config.text = config.text.replace(&config.peer_public_key, via_key);
    config.peer_public_key = via_key.to_string();
    wait_until(
        &format!("node B knows {name}, enrolled on node A"),
        APPLIED,
        Duration::from_millis(200),
        || knows(via, name).then_some(()),
    );
    let dev = via.device_ns(name);
    via.start_device(dev, "acme", name, config)
}

#[test]
fn a_device_and_a_rule_changed_on_one_node_apply_on_the_other_which_keeps_serving_without_postgres()
{
    let mut pg = Postgres::start("state");
    let a = node_lab(&pg, "gw-a");
    let mut b = node_lab(&pg, "gw-b");
    let (both, _) = wait_until(
        "both nodes' heartbeats in `fleet status`",
        APPLIED,
        Duration::from_millis(200),
        || {
            let s = fleet_status(&a, &[]);
            (node(&s, "gw-a").is_some_and(|n| n["stale"] == false)
                && node(&s, "gw-b").is_some_and(|n| n["stale"] == false))
            .then_some(s)
        },
    );
    assert_eq!(both.len(), 2, "{both:?}");

    // carol is enrolled on B (her config carries B's key); bob on A, his client uses B.
    let carol = b.add_client("acme", "carol");
    let b_key = carol.config.peer_public_key.clone();
    let bob = client_via(&a, &mut b, &b_key, "bob");
    wait_ping(&bob.ns, GW_ADDR, TUNNEL_UP, "bob (enrolled on A) -> node B");
    wait_ping(&carol.ns, GW_ADDR, TUNNEL_UP, "carol -> node B");
    let carol_addr = carol.address().to_string();
    assert_ne!(
        bob.address(),
        carol.address(),
        "the nodes allocated one address twice"
    );
    // Control: bob reaches carol through B while the policy allows it.
    wait_ping(
        &bob.ns,
        &carol_addr,
        TUNNEL_UP,
        "bob -> carol through B (allowed)",
    );
    assert!(knows(&a, "carol"), "node A knows carol, enrolled on B");

    // The rule changed on A cuts bob -> carol on B.
    set_rules(&a, ALLOW_ALL, PING_GATEWAY_ONLY);
    wait_until(
        "bob -> carol denied on B after the rule change on A",
        APPLIED,
        Duration::from_millis(100),
        || (!ping_once(&bob.ns, &carol_addr)).then_some(()),
    );
    assert!(ping_once(&bob.ns, GW_ADDR), "bob still reaches node B");
    let s = wait_until(
        "both nodes applied the new version (lag 0)",
        APPLIED,
        Duration::from_millis(200),
        || {
            let s = fleet_status(&a, &[]);
            ["gw-a", "gw-b"]
                .iter()
                .all(|id| node(&s, id).is_some_and(|n| n["lag"] == 0))
                .then_some(s)
        },
    )
    .0;
    let version = s[0]["fleet_version"].as_i64().unwrap();
    assert!(
        version >= 3,
        "devices and the policy bumped the version: {s:?}"
    );
    // B's state file holds A's document.
    let cached = std::fs::read_to_string(b.gateway.state_dir().join("fleet_state.json")).unwrap();
    assert!(cached.contains("ping-gateway"), "{cached}");

    // PostgreSQL down: B keeps serving with what it applied, and a node can still change its own policy.
    let r = pg.stop("immediate");
    assert!(r.success(), "{r}");
    set_rules(&a, PING_GATEWAY_ONLY, ALLOW_ALL);
    for _ in 0..5 {
        assert!(
            ping_once(&bob.ns, GW_ADDR),
            "node B stopped serving without PostgreSQL"
        );
    }
    assert!(
        !ping_once(&bob.ns, &carol_addr),
        "B applied a change it cannot have heard of"
    );
    b.gateway.assert_alive();
    // Back: A publishes what changed meanwhile and B catches up.
    pg.restart();
    wait_ping(
        &bob.ns,
        &carol_addr,
        Duration::from_secs(60),
        "bob -> carol through B after PostgreSQL returned (A's change caught up)",
    );
    assert!(
        b.gateway.log().contains("applied shared config"),
        "{}",
        b.gateway.log()
    );

    // A stopped node goes STALE in `fleet status`; the running one does not.
    let mut a = a;
    a.gateway
        .terminate(Duration::from_secs(60))
        .expect("gw-a stops cleanly");
    wait_until(
        "gw-a marked stale",
        APPLIED,
        Duration::from_millis(300),
        || {
            let s = fleet_status(&b, &["--stale-after", "2"]);
            (node(&s, "gw-a").is_some_and(|n| n["stale"] == true)
                && node(&s, "gw-b").is_some_and(|n| n["stale"] == false))
            .then_some(())
        },
    );
    let table = b
        .gateway
        .cli(&["fleet", "status"], &["--stale-after", "2"])
        .expect_ok();
    assert!(
        table.contains("gw-a") && table.contains("STALE") && table.contains("gw-b"),
        "{table}"
    );
}

#[test]
fn a_shared_policy_that_does_not_validate_is_refused_and_the_running_config_stays() {
    let pg = Postgres::start("bad-doc");
    let mut lab = node_lab(&pg, "gw-a");
    let alice = lab.add_client("acme", "alice");
    let bob = lab.add_client("acme", "bob");
    wait_ping(&alice.ns, GW_ADDR, TUNNEL_UP, "alice -> gateway");
    wait_ping(&bob.ns, GW_ADDR, TUNNEL_UP, "bob -> gateway");
    let bob_addr = bob.address().to_string();
    wait_ping(&alice.ns, &bob_addr, TUNNEL_UP, "alice -> bob (allowed)");
    // The node publishes its devices after each `device add` (asynchronously): wait until both are shared and
    // the node has applied the newest version, so no publish of its own can land after the bad document.
    let (before, _) = wait_until(
        "gw-a published alice and bob and applied the newest version",
        APPLIED,
        Duration::from_millis(200),
        || {
            let shared = pg.psql(
                "SELECT count(*) FROM fleet_devices WHERE tenant = 'acme' AND name IN ('alice', 'bob') AND NOT removed",
            );
            let s = fleet_status(&lab, &[]);
            let n = node(&s, "gw-a")?;
            (shared.trim() == "2" && n["lag"] == 0)
                .then(|| n["applied_version"].as_i64())
                .flatten()
        },
    );
    // Another node (here: SQL) publishes a document with an unknown action, and notifies.
    let bad = "[[tenant]]\nid = \"acme\"\nname = \"Tenant acme\"\naddress_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n\n[[tenant.rule]]\nid = \"deny-typo\"\naction = \"dney\"\n";
    pg.psql(&format!(
        "BEGIN; UPDATE fleet_config SET version = version + 1; INSERT INTO fleet_policy (version, node_id, doc) SELECT version, 'gw-x', $doc${bad}$doc$ FROM fleet_config; SELECT pg_notify('rampart_config', version::text) FROM fleet_config; COMMIT;"
    ));
    wait_until(
        "the refusal in gw-a's log",
        APPLIED,
        Duration::from_millis(200),
        || lab.gateway.log().contains("refused").then_some(()),
    );
    let log = lab.gateway.log();
    assert!(
        log.contains("policy version") && log.contains("gw-x") && log.contains("dney"),
        "the error names the version, the node and the key:\n{log}"
    );
    // Still the old config: alice reaches bob, and the node reports its old version (lag 1).
    assert!(
        ping_once(&alice.ns, &bob_addr),
        "the running config changed"
    );
    let s = fleet_status(&lab, &[]);
    let n = node(&s, "gw-a").unwrap();
    assert_eq!(n["applied_version"].as_i64(), Some(before), "{s:?}");
    assert_eq!(n["lag"], 1, "{s:?}");
    lab.gateway.assert_alive();
}
