//! End-to-end acceptance of fleet mode's first slice with a real PostgreSQL (Debian's, one cluster per test,
//! `support::pg`) and real wireguard-go devices through two `rampart run` nodes: each node ships its audit
//! records to PostgreSQL exactly once (`audit flows|http|enroll --fleet` equal each node's own review,
//! `audit verify --fleet` checks chains, rows and the checkpoints' signatures), also across a
//! PostgreSQL crash (`pg_ctl stop -m immediate`) during traffic and a `kill -9` of a node in the middle of a
//! shipping transaction; a wrong password or an unreachable server at start is refused naming the key.
//!
//! Run: `cargo test --features test-hooks --test e2e_fleet -- --test-threads=1` (root).

#[allow(unused_imports)]
mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::gateway::{ALLOW_ALL, BIN};
use support::pg::Postgres;
use support::probe::{udp_log, udp_receiver, udp_send};
use support::process::{poll_until, run, Proc};
use support::wg_client::WgClient;
use support::{wait_ping, wait_until, Lab, TenantSpec};

const TUNNEL_UP: Duration = Duration::from_secs(30);
const SHIPPED: Duration = Duration::from_secs(60);

/// Allows everything; TCP to port 8000 of devices bob and dave goes through the HTTP inspector.
fn tenant() -> TenantSpec {
    let mut t = TenantSpec::new("acme", "100.96.0.0/24", "100.96.0.1");
    t.rules = format!(
        "[[tenant.rule]]\nid = \"web\"\naction = \"inspect_http\"\ndst = [\"bob\", \"dave\"]\nproto = \"tcp\"\nports = [\"8000\"]\n{ALLOW_ALL}"
    );
    t
}

/// The `[fleet]` table for node `node` of `pg`.
fn fleet_toml(pg: &Postgres, node: &str, password_file: &std::path::Path, url: &str) -> String {
    let _ = pg;
    format!(
        "\n[fleet]\nnode_id = \"{node}\"\npostgres_url = \"{url}\"\npostgres_password_file = \"{}\"\nship_interval_ms = 100\n",
        password_file.display()
    )
}

fn node_lab(pg: &Postgres, node: &str) -> Lab {
    Lab::with_settings(
        &[tenant()],
        &fleet_toml(pg, node, &pg.password_file(), &pg.url()),
    )
}

/// Sends one datagram on each of `n` new UDP flows from a to b:port and waits until b got them all.
fn udp_flows(lab: &Lab, a: &WgClient, b: &WgClient, port: u16, n: usize, tag: &str) {
    let rx = format!("{tag}-rx");
    let mut receiver: Proc = udp_receiver(&b.ns, lab.dir(), &rx, &b.address().to_string(), port);
    for _ in 0..n {
        udp_send(
            &a.ns,
            &a.address().to_string(),
            &b.address().to_string(),
            port,
            1,
            tag,
        );
    }
    wait_until(
        &format!("{n} {tag} datagrams at the receiver"),
        Duration::from_secs(30),
        Duration::from_millis(100),
        || (udp_log(lab.dir(), &rx).matches(tag).count() >= n).then_some(()),
    );
    let _ = receiver.kill();
}

/// A web server (python3 http.server) on `server`'s address, port 8000, and `n` requests to it from `client`
/// (through the node's HTTP inspector, rule `web`).
fn http_requests(lab: &Lab, client: &WgClient, server: &WgClient, n: usize, tag: &str) {
    let www = lab.dir().join(format!("{tag}-www"));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join(format!("{tag}.txt")), tag).unwrap();
    let mut cmd = server.ns.exec("python3");
    cmd.args([
        "-m",
        "http.server",
        "8000",
        "--bind",
        &server.address().to_string(),
        "--directory",
    ])
    .arg(&www);
    let mut srv = Proc::spawn(&format!("{tag}-http"), cmd, lab.dir());
    let url = format!("http://{}:8000/{tag}.txt", server.address());
    let get = || {
        client.ns.run(
            "curl",
            &["-s", "--max-time", "10", &url],
            Duration::from_secs(30),
        )
    };
    wait_until(
        &format!("{url} served through the inspector"),
        Duration::from_secs(30),
        Duration::from_millis(200),
        || (get().stdout == tag).then_some(()),
    );
    for _ in 1..n {
        assert_eq!(get().stdout, tag, "GET {url}");
    }
    let _ = srv.kill();
}

/// A record as review shows it, without the keys that differ between the local and the fleet review.
fn comparable(v: &Value, drop: &[&str]) -> Value {
    let mut v = v.clone();
    for k in drop {
        v.as_object_mut().unwrap().remove(*k);
    }
    v
}

/// The node's HTTP records in the fleet review equal its own review's, record for record.
fn assert_same_http(lab: &Lab, node: &str) -> usize {
    let local: Vec<Value> =
        json_lines(&lab.gateway.cli(&["audit", "http"], &["--json"]).expect_ok())
            .iter()
            .map(|v| comparable(v, &["id"]))
            .collect();
    let fleet: Vec<Value> = json_lines(
        &lab.gateway
            .cli(&["audit", "http"], &["--fleet", "--json", "--node", node])
            .expect_ok(),
    )
    .iter()
    .map(|v| {
        assert_eq!(v["node"], node);
        comparable(v, &["node", "chain_seq"])
    })
    .collect();
    assert!(!local.is_empty(), "node {node} recorded HTTP requests");
    assert_eq!(
        local, fleet,
        "node {node}: the fleet's HTTP records differ from the node's own review"
    );
    local.len()
}

fn two_clients(lab: &mut Lab) -> (WgClient, WgClient) {
    clients_named(lab, "alice", "bob")
}

/// Two devices with these names. Device names are fleet-wide (the nodes share their devices), so each node
/// of one fleet enrolls its own.
fn clients_named(lab: &mut Lab, x: &str, y: &str) -> (WgClient, WgClient) {
    let a = lab.add_client("acme", x);
    let b = lab.add_client("acme", y);
    wait_ping(&a.ns, "100.96.0.1", TUNNEL_UP, &format!("{x} -> gateway"));
    wait_ping(&b.ns, "100.96.0.1", TUNNEL_UP, &format!("{y} -> gateway"));
    (a, b)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect()
}

fn local_flows(lab: &Lab) -> Vec<Value> {
    json_lines(
        &lab.gateway
            .cli(&["audit", "flows"], &["--json"])
            .expect_ok(),
    )
}

fn fleet_flows(lab: &Lab, node: Option<&str>) -> Vec<Value> {
    let mut args = vec!["--fleet", "--json"];
    if let Some(n) = node {
        args.extend(["--node", n]);
    }
    json_lines(&lab.gateway.cli(&["audit", "flows"], &args).expect_ok())
}

/// The local chain's last entry.
fn local_head(lab: &Lab) -> i64 {
    let db = lab.gateway.state_dir().join("audit.db");
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT coalesce(max(seq), 0) FROM chain", [], |r| r.get(0))
        .unwrap()
}

/// `(rows, distinct seqs, min seq, max seq)` of a node's entries in PostgreSQL, and its high-water mark.
fn pg_chain(pg: &Postgres, node: &str) -> (i64, i64, i64, i64, i64) {
    let out = pg.psql(&format!(
        "SELECT count(*), count(DISTINCT seq), coalesce(min(seq), 0), coalesce(max(seq), 0), \
         (SELECT coalesce(max(shipped_seq), 0) FROM fleet_nodes WHERE node_id = '{node}') \
         FROM fleet_chain WHERE node_id = '{node}'"
    ));
    let v: Vec<i64> = out.trim().split('|').map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2], v[3], v[4])
}

/// Waits until PostgreSQL holds every entry of the node's (quiet) local chain.
fn wait_shipped(pg: &Postgres, lab: &Lab, node: &str) {
    wait_until(
        &format!("node {node}'s chain shipped to PostgreSQL"),
        SHIPPED,
        Duration::from_millis(200),
        || {
            let head = local_head(lab);
            (head > 0 && pg_chain(pg, node).4 == head).then_some(())
        },
    );
}

/// Every local entry `1..=head` is in PostgreSQL exactly once, and nothing else is.
fn assert_exactly_once(pg: &Postgres, lab: &Lab, node: &str) {
    let head = local_head(lab);
    let (rows, distinct, min, max, mark) = pg_chain(pg, node);
    assert_eq!(
        (rows, distinct, min, max, mark),
        (head, head, 1, head, head),
        "node {node}: PostgreSQL must hold entries 1..={head} once each (rows, distinct, min, max, mark)"
    );
    // Flows: the same rows as the node's own review shows, one each.
    let local: BTreeMap<i64, Value> = local_flows(lab)
        .into_iter()
        .map(|f| (f["id"].as_i64().unwrap(), f))
        .collect();
    let fleet = fleet_flows(lab, Some(node));
    let mut by_id: BTreeMap<i64, Value> = BTreeMap::new();
    for f in fleet {
        let id = f["id"].as_i64().unwrap();
        assert!(
            by_id.insert(id, f).is_none(),
            "node {node}: flow {id} listed twice"
        );
    }
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        by_id.keys().collect::<Vec<_>>(),
        "node {node}: the fleet's flows differ from the node's"
    );
    for (id, l) in &local {
        let f = &by_id[id];
        for k in [
            "src",
            "sport",
            "dst",
            "dport",
            "protocol",
            "started_ms",
            "ended_ms",
            "bytes_out",
            "end_reason",
        ] {
            assert_eq!(l[k], f[k], "node {node}: flow {id}: {k} differs");
        }
        assert_eq!(f["node"], node);
    }
}

fn verify_fleet(lab: &Lab) -> support::process::Ran {
    lab.gateway.cli(&["audit", "verify"], &["--fleet"])
}

fn udp_flow_count(flows: &[Value], dport: u16) -> usize {
    flows
        .iter()
        .filter(|f| f["protocol"] == 17 && f["dport"] == dport)
        .count()
}

#[test]
fn two_nodes_carry_traffic_and_their_flows_appear_in_the_fleet_review_exactly_once() {
    let pg = Postgres::start("two-nodes");
    let mut a_lab = node_lab(&pg, "gw-a");
    let mut b_lab = node_lab(&pg, "gw-b");
    let (a1, a2) = two_clients(&mut a_lab);
    let (b1, b2) = clients_named(&mut b_lab, "carol", "dave");
    udp_flows(&a_lab, &a1, &a2, 7001, 12, "node-a");
    udp_flows(&b_lab, &b1, &b2, 7002, 9, "node-b");
    http_requests(&a_lab, &a1, &a2, 3, "web-a");
    http_requests(&b_lab, &b1, &b2, 4, "web-b");
    // An enrollment record on each node (a token minted there).
    for lab in [&a_lab, &b_lab] {
        lab.gateway
            .cli(&["token", "create"], &["--tenant", "acme", "--json"])
            .expect_ok();
        wait_until(
            "the token_created record in the node's store",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || {
                let v = json_lines(
                    &lab.gateway
                        .cli(&["audit", "enroll"], &["--json"])
                        .expect_ok(),
                );
                v.iter()
                    .any(|r| r["event"] == "token_created" && r["spooled"] == false)
                    .then_some(())
            },
        );
    }
    // A clean stop ships what the node committed last (the flows' ends, run.end).
    a_lab
        .gateway
        .terminate(Duration::from_secs(60))
        .expect("gw-a stops cleanly");
    b_lab
        .gateway
        .terminate(Duration::from_secs(60))
        .expect("gw-b stops cleanly");
    assert_exactly_once(&pg, &a_lab, "gw-a");
    assert_exactly_once(&pg, &b_lab, "gw-b");

    // One review across the fleet: both nodes' flows, each flow once, newest first by (time, node, seq).
    let all = fleet_flows(&a_lab, None);
    let on = |node: &str, port: u16| {
        all.iter()
            .filter(|f| f["node"] == node && f["protocol"] == 17 && f["dport"] == port)
            .count()
    };
    assert_eq!(on("gw-a", 7001), 12, "node A's flows in the fleet review");
    assert_eq!(on("gw-b", 7002), 9, "node B's flows in the fleet review");
    assert_eq!(
        on("gw-a", 7002) + on("gw-b", 7001),
        0,
        "no flow under the wrong node"
    );
    let keys: Vec<(i64, String, i64)> = all
        .iter()
        .map(|f| {
            (
                f["started_ms"].as_i64().unwrap(),
                f["node"].as_str().unwrap().to_string(),
                f["chain_seq"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(
        keys, sorted,
        "fleet flows are ordered by time, node and sequence (newest first)"
    );
    let table = a_lab
        .gateway
        .cli(&["audit", "flows"], &["--fleet"])
        .expect_ok();
    assert!(
        table.contains("gw-a") && table.contains("gw-b"),
        "table names the nodes:\n{table}"
    );

    // HTTP requests: each node's records in the fleet review, equal to its own review; both in one listing,
    // ordered by (time, node, seq), newest first.
    let a_http = assert_same_http(&a_lab, "gw-a");
    let b_http = assert_same_http(&b_lab, "gw-b");
    assert!(a_http >= 3 && b_http >= 4, "{a_http} {b_http}");
    let all = json_lines(
        &b_lab
            .gateway
            .cli(&["audit", "http"], &["--fleet", "--json"])
            .expect_ok(),
    );
    assert_eq!(
        all.len(),
        a_http + b_http,
        "both nodes' requests, once each"
    );
    assert_eq!(
        all.iter()
            .filter(|r| r["node"] == "gw-a" && r["path"] == "/web-a.txt")
            .count(),
        a_http
    );
    assert_eq!(
        all.iter()
            .filter(|r| r["node"] == "gw-b" && r["path"] == "/web-b.txt")
            .count(),
        b_http
    );
    let keys: Vec<(i64, String, i64)> = all
        .iter()
        .map(|r| {
            (
                r["at_ms"].as_i64().unwrap(),
                r["node"].as_str().unwrap().to_string(),
                r["chain_seq"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(
        keys, sorted,
        "fleet HTTP records ordered by time, node, seq"
    );
    let table = a_lab
        .gateway
        .cli(&["audit", "http"], &["--fleet"])
        .expect_ok();
    assert!(
        table.contains("NODE") && table.contains("gw-a") && table.contains("/web-b.txt"),
        "{table}"
    );
    // Enrollment records: the same on both sides, for each node.
    for (lab, node) in [(&a_lab, "gw-a"), (&b_lab, "gw-b")] {
        let local: Vec<Value> = json_lines(
            &lab.gateway
                .cli(&["audit", "enroll"], &["--json"])
                .expect_ok(),
        )
        .iter()
        .map(|v| comparable(v, &["spooled"]))
        .collect();
        let fleet: Vec<Value> = json_lines(
            &lab.gateway
                .cli(&["audit", "enroll"], &["--fleet", "--json", "--node", node])
                .expect_ok(),
        )
        .iter()
        .map(|v| comparable(v, &["node"]))
        .collect();
        assert!(
            local.iter().any(|r| r["event"] == "token_created"),
            "{local:?}"
        );
        // The fleet lists by time, the local review by chain entry: compare in entry order.
        let by_seq = |mut v: Vec<Value>| {
            v.sort_by_key(|r| r["seq"].as_i64());
            v
        };
        assert_eq!(
            by_seq(local),
            by_seq(fleet),
            "node {node}: enrollment records differ"
        );
    }

    // verify --fleet passes on what was shipped (the positive control) ...
    let ok = verify_fleet(&a_lab);
    assert!(ok.success(), "verify --fleet on an intact fleet: {ok}");
    assert!(
        ok.stdout.contains("node gw-a") && ok.stdout.contains("node gw-b"),
        "{ok}"
    );
    // Every kind of chain entry ships, not only flows: the gateway's own records too.
    for kind in [
        "chain.start",
        "run.start",
        "run.end",
        "flow.start",
        "flow.end",
    ] {
        assert!(
            ok.stdout.contains(&format!("{kind} ")),
            "{kind} entries shipped: {ok}"
        );
    }
    assert!(
        !ok.stdout.contains(" 0 checkpoints"),
        "checkpoints shipped: {ok}"
    );
    assert_eq!(
        ok.stdout.matches("checkpoints signed with SHA256:").count(),
        2,
        "each node published its signing key: {ok}"
    );
    // A checkpoint's signature forged (node A's valid signature put on node B's last checkpoint): refused,
    // naming node and checkpoint; put back, it verifies again.
    pg.psql("CREATE TABLE cp_saved AS SELECT * FROM fleet_checkpoints");
    pg.psql("UPDATE fleet_checkpoints SET signature = (SELECT signature FROM fleet_checkpoints WHERE node_id = 'gw-a' ORDER BY seq DESC LIMIT 1) WHERE node_id = 'gw-b' AND seq = (SELECT max(seq) FROM fleet_checkpoints WHERE node_id = 'gw-b')");
    let last_b = pg
        .psql("SELECT max(seq) FROM fleet_checkpoints WHERE node_id = 'gw-b'")
        .trim()
        .to_string();
    let bad = verify_fleet(&a_lab);
    assert!(
        !bad.success()
            && bad.stdout.contains("node gw-b")
            && bad.stdout.contains(&format!(
                "checkpoint at entry {last_b}: its signature does not verify with node gw-b's key"
            )),
        "a forged checkpoint signature must fail: {bad}"
    );
    pg.psql("UPDATE fleet_checkpoints c SET signature = s.signature FROM cp_saved s WHERE c.node_id = s.node_id AND c.seq = s.seq");
    assert!(
        verify_fleet(&a_lab).success(),
        "restored signature verifies"
    );
    // An altered signature (one character of the base64 body changed).
    pg.psql("UPDATE fleet_checkpoints SET signature = overlay(signature placing (CASE WHEN substr(signature, 60, 1) = 'A' THEN 'B' ELSE 'A' END) from 60 for 1) WHERE node_id = 'gw-a' AND seq = (SELECT min(seq) FROM fleet_checkpoints WHERE node_id = 'gw-a')");
    let bad = verify_fleet(&a_lab);
    assert!(
        !bad.success()
            && bad.stdout.contains("node gw-a")
            && bad.stdout.contains("its signature does not verify"),
        "an altered checkpoint signature must fail: {bad}"
    );
    pg.psql("UPDATE fleet_checkpoints c SET signature = s.signature FROM cp_saved s WHERE c.node_id = s.node_id AND c.seq = s.seq");
    assert!(
        verify_fleet(&a_lab).success(),
        "restored signature verifies"
    );
    // The published key swapped for node A's (so B's checkpoints would need A's key): refused too.
    pg.psql("CREATE TABLE keys_saved AS SELECT * FROM fleet_node_keys");
    pg.psql("UPDATE fleet_node_keys SET public_key = (SELECT public_key FROM fleet_node_keys WHERE node_id = 'gw-a') WHERE node_id = 'gw-b'");
    let bad = verify_fleet(&a_lab);
    assert!(
        !bad.success() && bad.stdout.contains("does not have that fingerprint"),
        "a swapped published key must fail: {bad}"
    );
    pg.psql("UPDATE fleet_node_keys k SET public_key = s.public_key FROM keys_saved s WHERE k.node_id = s.node_id AND k.fingerprint = s.fingerprint");
    assert!(verify_fleet(&a_lab).success(), "restored key verifies");
    // ... and fails, naming the node and the entry, when a shipped flow row is altered in PostgreSQL ...
    pg.psql("UPDATE fleet_flows SET bytes_out = bytes_out + 1000 WHERE node_id = 'gw-b' AND dport = 7002 AND start_chain = (SELECT min(start_chain) FROM fleet_flows WHERE node_id = 'gw-b' AND dport = 7002)");
    let bad = verify_fleet(&a_lab);
    assert!(
        !bad.success(),
        "verify --fleet must fail on an altered flow row: {bad}"
    );
    assert!(
        bad.stdout.contains("node gw-b")
            && bad
                .stdout
                .contains("does not match its flow.end chain entry"),
        "{bad}"
    );
    assert!(
        bad.stdout.contains("node gw-a") && bad.stdout.contains("OK"),
        "node A still verifies: {bad}"
    );
    pg.psql("UPDATE fleet_flows SET bytes_out = bytes_out - 1000 WHERE node_id = 'gw-b' AND dport = 7002 AND start_chain = (SELECT min(start_chain) FROM fleet_flows WHERE node_id = 'gw-b' AND dport = 7002)");
    assert!(
        verify_fleet(&a_lab).success(),
        "restored row verifies again"
    );
    // ... and when a shipped record (any kind) is altered, or an entry deleted.
    pg.psql("UPDATE fleet_chain SET record = replace(record, 'run_id', 'run_iD') WHERE node_id = 'gw-a' AND kind = 'run.start'");
    let bad = verify_fleet(&a_lab);
    assert!(
        !bad.success() && bad.stdout.contains("record does not match its digest"),
        "{bad}"
    );
    pg.psql("UPDATE fleet_chain SET record = replace(record, 'run_iD', 'run_id') WHERE node_id = 'gw-a' AND kind = 'run.start'");
    assert!(
        verify_fleet(&a_lab).success(),
        "restored record verifies again"
    );
    pg.psql("DELETE FROM fleet_chain WHERE node_id = 'gw-a' AND seq = 3");
    let bad = verify_fleet(&a_lab);
    assert!(
        !bad.success() && bad.stdout.contains("entries 3 to 3 are missing"),
        "{bad}"
    );
}

#[test]
fn postgres_crash_during_traffic_delays_shipping_but_every_record_arrives_exactly_once() {
    let mut pg = Postgres::start("outage");
    let mut lab = node_lab(&pg, "gw-a");
    let (a, b) = two_clients(&mut lab);
    udp_flows(&lab, &a, &b, 7101, 10, "before");
    wait_shipped(&pg, &lab, "gw-a");
    let before = pg_chain(&pg, "gw-a").4;

    let fleet_metric = |lab: &Lab, name: &str| lab.gateway.metrics().value(name, &[]);
    assert_eq!(
        fleet_metric(&lab, "rampart_fleet_up"),
        1.0,
        "the shipper is connected"
    );
    let stop = pg.stop("immediate");
    assert!(stop.success(), "pg_ctl stop -m immediate: {stop}");
    // The node keeps carrying and auditing traffic while PostgreSQL is down.
    udp_flows(&lab, &a, &b, 7102, 10, "during");
    wait_until(
        "the flows made during the outage in the local store",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || (udp_flow_count(&local_flows(&lab), 7102) == 10).then_some(()),
    );
    assert!(
        lab.gateway.health(),
        "the node stays healthy while PostgreSQL is down"
    );
    wait_until(
        "/metrics showing the shipper without PostgreSQL",
        SHIPPED,
        Duration::from_millis(200),
        || (fleet_metric(&lab, "rampart_fleet_up") == 0.0).then_some(()),
    );
    assert!(fleet_metric(&lab, "rampart_fleet_shipped_seq") < local_head(&lab) as f64);
    let fleet_down = lab.gateway.cli(&["audit", "flows"], &["--fleet"]);
    assert!(
        !fleet_down.success() && fleet_down.stderr.contains("fleet.postgres_url"),
        "review says PostgreSQL is unreachable, naming the key: {fleet_down}"
    );

    pg.restart();
    udp_flows(&lab, &a, &b, 7103, 10, "after");
    wait_shipped(&pg, &lab, "gw-a");
    assert!(
        pg_chain(&pg, "gw-a").4 > before,
        "records of the outage shipped after it"
    );
    assert_eq!(
        fleet_metric(&lab, "rampart_fleet_up"),
        1.0,
        "connected again"
    );
    assert!(fleet_metric(&lab, "rampart_fleet_ship_failures_total") >= 1.0);
    assert_eq!(fleet_metric(&lab, "rampart_fleet_halted"), 0.0);
    lab.gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    assert_exactly_once(&pg, &lab, "gw-a");
    let fleet = fleet_flows(&lab, Some("gw-a"));
    for port in [7101, 7102, 7103] {
        assert_eq!(
            udp_flow_count(&fleet, port),
            10,
            "flows to port {port} in the fleet review"
        );
    }
    let v = verify_fleet(&lab);
    assert!(v.success(), "verify --fleet after the outage: {v}");
}

#[test]
fn kill_9_of_a_node_inside_a_shipping_transaction_loses_and_duplicates_nothing() {
    let pg = Postgres::start("kill9");
    let mut lab = node_lab(&pg, "gw-a");
    let (a, b) = two_clients(&mut lab);
    udp_flows(&lab, &a, &b, 7201, 10, "first");
    wait_shipped(&pg, &lab, "gw-a");

    // Hold the node table locked from another session: the shipper's next transaction inserts its batch,
    // then blocks on moving the high-water mark; the node is killed inside that transaction.
    let mut locker = Proc::spawn(
        "locker",
        {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "psql"])
                .env("PGPASSWORD", support::pg::PASSWORD)
                .arg("-h")
                .arg(pg.socket_dir())
                .args(["-p", &pg.port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
                .arg("BEGIN; LOCK TABLE fleet_nodes IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(600); COMMIT;");
            c
        },
        lab.dir(),
    );
    udp_flows(&lab, &a, &b, 7202, 10, "second");
    // Positive control: the shipper is inside its transaction, waiting on the lock.
    let waiting = poll_until(SHIPPED, Duration::from_millis(200), || {
        let n: i64 = pg
            .psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rampart node gw-a' AND wait_event_type = 'Lock'")
            .trim()
            .parse()
            .unwrap();
        (n > 0).then_some(())
    });
    assert!(
        waiting.is_some(),
        "the node's shipper never blocked inside a shipping transaction"
    );
    lab.gateway.kill();
    // Ends the locking session from PostgreSQL's side (its psql then exits on its own).
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' AND pid <> pg_backend_pid()");
    assert!(
        locker.wait_timeout(Duration::from_secs(30)).is_some(),
        "the locking psql exits"
    );
    // PostgreSQL rolls the dead node's transaction back once it notices the closed connection.
    wait_until(
        "the killed node's session gone",
        SHIPPED,
        Duration::from_millis(200),
        || {
            let n: i64 = pg
                .psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rampart node gw-a'")
                .trim()
                .parse()
                .unwrap();
            (n == 0).then_some(())
        },
    );
    lab.gateway.start();
    // The restarted node has no sessions: the devices handshake again first.
    wait_ping(
        &a.ns,
        "100.96.0.1",
        Duration::from_secs(90),
        "alice -> restarted gateway",
    );
    wait_ping(
        &b.ns,
        "100.96.0.1",
        Duration::from_secs(90),
        "bob -> restarted gateway",
    );
    udp_flows(&lab, &a, &b, 7203, 10, "third");
    wait_shipped(&pg, &lab, "gw-a");
    lab.gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    assert_exactly_once(&pg, &lab, "gw-a");
    let fleet = fleet_flows(&lab, Some("gw-a"));
    let local = local_flows(&lab);
    for port in [7201, 7202, 7203] {
        assert_eq!(
            udp_flow_count(&fleet, port),
            udp_flow_count(&local, port),
            "flows to port {port}: fleet vs the node's store"
        );
    }
    assert_eq!(udp_flow_count(&fleet, 7201), 10);
    assert_eq!(udp_flow_count(&fleet, 7203), 10);
    let v = verify_fleet(&lab);
    assert!(v.success(), "verify --fleet after the kill: {v}");
}

/// `rampart run` with the lab's config, expected to fail at start; returns what it printed.
fn run_expecting_failure(lab: &Lab) -> String {
    let r = run(
        Command::new("ip")
            .args(["netns", "exec", lab.gw_ns.name(), BIN, "run", "-c"])
            .arg(&lab.gateway.config),
        Duration::from_secs(90),
    );
    assert!(
        r.status.is_some_and(|s| !s.success()),
        "rampart run must refuse to start: {r}"
    );
    format!("{}{}", r.stdout, r.stderr)
}

#[test]
fn a_wrong_postgres_password_or_unreachable_server_at_start_is_refused_naming_the_key() {
    let pg = Postgres::start("badinput");
    // Positive control: the right password starts the node, and it registers.
    let mut lab = node_lab(&pg, "gw-a");
    wait_until(
        "node gw-a registered",
        SHIPPED,
        Duration::from_millis(200),
        || {
            (pg.psql("SELECT count(*) FROM fleet_nodes WHERE node_id = 'gw-a'")
                .trim()
                == "1")
                .then_some(())
        },
    );
    lab.gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    let good = std::fs::read_to_string(&lab.gateway.config).unwrap();

    // A wrong password: refused, naming the password file's key.
    let wrong = lab.dir().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let cfg = good.replace(
        &pg.password_file().display().to_string(),
        &wrong.display().to_string(),
    );
    std::fs::write(&lab.gateway.config, &cfg).unwrap();
    let out = run_expecting_failure(&lab);
    assert!(
        out.contains("fleet.postgres_password_file") && out.contains("refused the login"),
        "{out}"
    );

    // An unreachable server (nothing listens on that port): refused, naming the URL's key.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = good.replace(&format!("port={}", pg.port), &format!("port={closed}"));
    std::fs::write(&lab.gateway.config, &cfg).unwrap();
    let out = run_expecting_failure(&lab);
    assert!(
        out.contains("fleet.postgres_url") && out.contains("cannot reach PostgreSQL"),
        "{out}"
    );

    // Single box: the same gateway without [fleet] needs nothing of PostgreSQL (stopped here) and starts.
    let single: String = good.split("\n[fleet]").next().unwrap().to_string()
        + &good[good.find("\n[[tenant]]").unwrap()..];
    std::fs::write(&lab.gateway.config, single).unwrap();
    drop(pg);
    lab.gateway.start();
    assert!(lab.gateway.health());
}

#[test]
fn a_second_gateway_with_the_same_node_id_is_stopped_from_shipping_and_cannot_spoil_the_first_ones_records(
) {
    let pg = Postgres::start("same-id");
    let mut first = node_lab(&pg, "gw-a");
    let (a1, a2) = two_clients(&mut first);
    udp_flows(&first, &a1, &a2, 7301, 5, "first");
    first
        .gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    assert_exactly_once(&pg, &first, "gw-a");
    let shipped = local_head(&first);

    // Another gateway (its own store and chain) configured with the same node_id; it makes more records
    // than the first had shipped, so its chain reaches past the first one's high-water mark.
    let mut second = node_lab(&pg, "gw-a");
    let (b1, b2) = two_clients(&mut second);
    udp_flows(&second, &b1, &b2, 7302, 20, "second");
    assert!(
        local_head(&second) > shipped,
        "the second chain must pass the first's mark"
    );
    wait_until(
        "the second gateway's shipper halted",
        SHIPPED,
        Duration::from_millis(200),
        || (second.gateway.metrics().value("rampart_fleet_halted", &[]) == 1.0).then_some(()),
    );
    assert!(
        second
            .gateway
            .log()
            .contains("another gateway uses fleet.node_id"),
        "the log says why and what to do"
    );
    // The first gateway's records are intact and alone under its id.
    assert_eq!(
        pg_chain(&pg, "gw-a"),
        (shipped, shipped, 1, shipped, shipped)
    );
    let fleet = fleet_flows(&second, Some("gw-a"));
    assert_eq!(udp_flow_count(&fleet, 7301), 5);
    assert_eq!(udp_flow_count(&fleet, 7302), 0, "no flow of the impostor");
    let v = verify_fleet(&second);
    assert!(v.success(), "verify --fleet: {v}");
}

#[test]
fn fleet_review_over_tcp_uses_tls_verified_against_the_configured_ca() {
    let mut pg = Postgres::start("tls");
    let mut lab = node_lab(&pg, "gw-a");
    let (a, b) = two_clients(&mut lab);
    udp_flows(&lab, &a, &b, 7401, 3, "tls");
    lab.gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    let ca = pg.enable_tls();
    let good = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let review = lab.dir().join("review.toml");
    let with = |url: &str, ca: Option<&std::path::Path>| {
        let mut cfg = good.replace(&pg.url(), url);
        if let Some(ca) = ca {
            cfg = cfg.replace(
                "ship_interval_ms = 100",
                &format!(
                    "ship_interval_ms = 100\npostgres_ca_file = \"{}\"",
                    ca.display()
                ),
            );
        }
        std::fs::write(&review, cfg).unwrap();
        run(
            Command::new(BIN)
                .args(["audit", "verify", "--fleet", "-c"])
                .arg(&review),
            Duration::from_secs(60),
        )
    };
    // TLS with the CA that signed the server's certificate: works.
    let ok = with(&pg.tcp_url("require"), Some(&ca));
    assert!(ok.success() && ok.stdout.contains("node gw-a"), "{ok}");
    // Positive control that TLS was what let it in: the server refuses TCP without it.
    let plain = with(&pg.tcp_url("disable"), Some(&ca));
    assert!(
        !plain.success() && plain.stderr.contains("no encryption"),
        "{plain}"
    );
    // A server certificate from a CA nobody configured: refused, naming the key.
    let other = lab.dir().join("other-ca.pem");
    let r = run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .arg("-keyout")
            .arg(lab.dir().join("other-ca.key"))
            .arg("-out")
            .arg(&other)
            .args(["-days", "2", "-subj", "/CN=another CA"]),
        Duration::from_secs(60),
    );
    assert!(r.success(), "{r}");
    let bad = with(&pg.tcp_url("require"), Some(&other));
    assert!(
        !bad.success() && bad.stderr.contains("fleet.postgres_ca_file"),
        "an untrusted server certificate must be refused: {bad}"
    );
    let none = with(&pg.tcp_url("require"), None);
    assert!(
        !none.success(),
        "without the CA (web roots only) the test CA is not trusted: {none}"
    );
}
