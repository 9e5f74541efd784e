//! End-to-end acceptance of issue 4's off-ramp: devices reach hosts on a tenant's `offramp` networks through
//! the gateway's namespace (upgrade) and its proxy, with real wireguard-go clients, a real nginx upstream and
//! the real `rampart run`.
//!
//! Run: `cargo test --test e2e_offramp -- --test-threads=1` (root).

#[allow(unused_imports)]
mod support;

use std::process::Command;
use std::time::Duration;

use support::lab::Host;
use support::process::{run, Proc};
use support::{wait_ping, wait_until, Lab, TenantSpec};

const GW_ADDR: &str = "100.96.0.1";
const TUNNEL_UP: Duration = Duration::from_secs(30);
const HTTPLOAD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/httpload.py");
/// The first underlay link of a lab is 198.18.1.0/24: the upstream host is added first, so it lives there.
const UPSTREAM_NET: &str = "198.18.1.0/24";
const UPSTREAM: &str = "198.18.1.2";

/// Tenant "acme" off-ramps 198.18.1.0/24; policy allows HTTP and UDP/5353 there and ping to the gateway.
fn acme() -> TenantSpec {
    let mut t = TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR);
    t.rules = format!(
        r#"offramp = ["{UPSTREAM_NET}"]
[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"
[[tenant.rule]]
id = "web"
action = "allow"
dst = ["{UPSTREAM_NET}"]
proto = "tcp"
ports = ["80"]
[[tenant.rule]]
id = "dns"
action = "allow"
dst = ["{UPSTREAM_NET}"]
proto = "udp"
ports = ["5353"]
"#
    );
    t
}

/// A real nginx serving `files` (name, size) from a temp dir in the upstream namespace, on port 80.
struct Nginx {
    proc: Proc,
}

impl Nginx {
    fn start(host: &Host, dir: &std::path::Path, files: &[(&str, u64)]) -> Nginx {
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        for (name, size) in files {
            let r = run(
                Command::new("sh").arg("-c").arg(format!(
                    "head -c {size} /dev/urandom > {}",
                    www.join(name).display()
                )),
                Duration::from_secs(60),
            );
            assert!(r.success(), "{r}");
        }
        let d = dir.display();
        let conf = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; \
             uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5; keepalive_timeout 0; \
             server {{ listen {UPSTREAM}:80 backlog=4096; listen {UPSTREAM}:8080; root {d}/www; }} }}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = host.ns.exec("nginx");
        cmd.arg("-c").arg(&conf_path);
        let proc = Proc::spawn("nginx", cmd, dir);
        let probe = format!("http://{UPSTREAM}/{}", files[0].0);
        wait_until(
            "nginx to serve",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let r = host.ns.run(
                    "curl",
                    &[
                        "-sS",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "5",
                        &probe,
                    ],
                    Duration::from_secs(10),
                );
                (r.stdout.trim() == "200").then_some(())
            },
        );
        Nginx { proc }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(10));
    }
}

/// A lab with the upstream host (first link) and one enrolled device whose config routes the off-ramp.
fn lab_with_upstream(files: &[(&str, u64)]) -> (Lab, Host, Nginx, support::wg_client::WgClient) {
    let mut lab = Lab::new(&[acme()]);
    let host = lab.add_host("up");
    assert_eq!(
        host.underlay.to_string(),
        UPSTREAM,
        "upstream host must be on the first link"
    );
    let nginx = Nginx::start(&host, &lab.dir().join("up"), files);
    let dev = lab.add_client("acme", "laptop");
    assert!(
        dev.config.allowed_ips.iter().any(|n| n == UPSTREAM_NET),
        "AllowedIPs lacks the off-ramp network:\n{}",
        dev.config.text
    );
    wait_ping(&dev.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway");
    (lab, host, nginx, dev)
}

fn curl(ns: &support::netns::Netns, args: &[&str]) -> support::process::Ran {
    ns.run("curl", args, Duration::from_secs(180))
}

fn sha256(path: &std::path::Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), Duration::from_secs(60)).expect_ok();
    let sum = out.split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(sum.len(), 64, "sha256sum printed {out:?}");
    sum
}

fn httpload(
    ns: &support::netns::Netns,
    url: &str,
    count: u32,
    parallel: u32,
    expect: u64,
) -> serde_json::Value {
    let r = ns.run(
        "python3",
        &[
            HTTPLOAD,
            url,
            "--count",
            &count.to_string(),
            "--parallel",
            &parallel.to_string(),
            "--expect-bytes",
            &expect.to_string(),
        ],
        Duration::from_secs(300),
    );
    serde_json::from_str(r.stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("httpload output ({e}): {r}"))
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn curl_downloads_100_mb_from_nginx_through_the_offramp_intact_and_the_flow_is_audited() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let (lab, _host, _nginx, dev) = lab_with_upstream(&[("big", SIZE), ("small", 1000)]);
    let out = lab.dir().join("big.downloaded");
    let r = curl(
        &dev.ns,
        &[
            "-sS",
            "--fail",
            "--max-time",
            "170",
            "-o",
            &out.display().to_string(),
            "-w",
            "%{http_code} %{size_download}",
            &format!("http://{UPSTREAM}/big"),
        ],
    );
    assert!(
        r.success(),
        "download failed: {r}\ngateway log:\n{}",
        support::process::tail(&lab.gateway.log(), 30)
    );
    assert_eq!(r.stdout.trim(), format!("200 {SIZE}"));
    assert_eq!(
        sha256(&out),
        sha256(&lab.dir().join("up/www/big")),
        "corrupted through the off-ramp"
    );
    let _ = std::fs::remove_file(&out);
    // A denied port on the same host fails, although nginx serves it to the gateway host.
    let port_8080 = format!("http://{UPSTREAM}:8080/small");
    let direct = lab.gw_ns.run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            &port_8080,
        ],
        Duration::from_secs(30),
    );
    assert!(direct.success(), "nginx does not serve :8080: {direct}");
    let denied = curl(&dev.ns, &["-sS", "--max-time", "5", &port_8080]);
    assert!(
        !denied.success(),
        "the device reached a denied port: {denied}"
    );
    let (flow, _) = wait_until(
        "the download's flow record",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let out = lab
                .gateway
                .cli(&["audit", "flows"], &["--json"])
                .expect_ok();
            out.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|f| f["dport"] == 80 && f["bytes_in"].as_u64().is_some_and(|b| b >= SIZE))
        },
    );
    assert_eq!(
        (
            flow["rule"].as_str(),
            flow["dst"].as_str(),
            flow["action"].as_str()
        ),
        (Some("web"), Some(UPSTREAM), Some("allow")),
        "{flow}"
    );
    // Refused attempts are summarised every `flows.deny_summary_secs` (10 s by default).
    let (denied, _) = wait_until(
        "the denied flow to :8080 in the audit store",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let out = lab
                .gateway
                .cli(&["audit", "flows"], &["--json"])
                .expect_ok();
            out.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|f| f["dport"] == 8080)
        },
    );
    assert_eq!(denied["action"], "deny", "{denied}");
}

#[test]
fn five_hundred_concurrent_connections_through_the_offramp_all_complete() {
    let (_lab, _host, _nginx, dev) = lab_with_upstream(&[("small", 2000)]);
    let v = httpload(&dev.ns, &format!("http://{UPSTREAM}/small"), 500, 500, 2000);
    assert_eq!(v["ok"], 500, "{v}");
}

#[test]
fn udp_request_response_through_the_offramp() {
    let (lab, host, _nginx, dev) = lab_with_upstream(&[("small", 10)]);
    // A UDP echo service on the upstream host (answers each datagram with "echo:" + it).
    let echo = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('198.18.1.2',5353))\nprint('LISTENING',flush=True)\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(b'echo:'+d,a)\n";
    let mut cmd = host.ns.exec("python3");
    cmd.args(["-c", echo]);
    let mut server = Proc::spawn("udp-echo", cmd, lab.dir());
    server.wait_stdout("LISTENING", Duration::from_secs(30));
    let client = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\nok=0\nfor i in range(5):\n for _ in range(3):\n  s.sendto(b'q%d'%i,('198.18.1.2',5353))\n  try:\n   d,_=s.recvfrom(2048)\n   if d==b'echo:q%d'%i: ok+=1; break\n  except OSError: pass\nprint('OK',ok)\n";
    let r = dev
        .ns
        .run("python3", &["-c", client], Duration::from_secs(120));
    assert_eq!(r.stdout.trim(), "OK 5", "{r}");
    server.stop(Duration::from_secs(5));
}

#[test]
fn killed_namespace_helper_is_restarted_and_new_flows_work() {
    let (mut lab, _host, _nginx, dev) = lab_with_upstream(&[("small", 1000)]);
    let url = format!("http://{UPSTREAM}/small");
    assert!(curl(
        &dev.ns,
        &["-sS", "--fail", "--max-time", "20", "-o", "/dev/null", &url]
    )
    .success());
    let (old, _) = wait_until(
        "the namespace helper process",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || lab.gateway.helper_pid(),
    );
    let r = run(
        Command::new("kill").args(["-9", &old.to_string()]),
        Duration::from_secs(5),
    );
    assert!(r.success(), "{r}");
    wait_until(
        "a new namespace helper",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || lab.gateway.helper_pid().filter(|p| *p != old),
    );
    wait_until(
        "new flows through the restarted namespace",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            curl(
                &dev.ns,
                &["-sS", "--fail", "--max-time", "5", "-o", "/dev/null", &url],
            )
            .success()
            .then_some(())
        },
    );
    lab.gateway.assert_alive();
}

#[test]
fn ten_thousand_short_connections_leak_no_fds_or_nat_slots() {
    let (lab, _host, _nginx, dev) = lab_with_upstream(&[("small", 100)]);
    let url = format!("http://{UPSTREAM}/small");
    // Warm up, then measure the gateway's and the helper's descriptors around the load.
    assert_eq!(httpload(&dev.ns, &url, 20, 4, 100)["ok"], 20);
    let gw = lab.gateway.pid();
    let helper = lab.gateway.helper_pid().expect("helper running");
    let settle = |what: &str| {
        wait_until(
            what,
            Duration::from_secs(90),
            Duration::from_millis(500),
            || {
                let m = lab.gateway.metrics();
                (m.value("rampart_nat_slots", &[]) == 0.0
                    && m.value("rampart_flows", &[("tenant", "acme")]) <= 2.0)
                    .then_some(())
            },
        )
    };
    settle("flows and NAT slots of the warm-up to be released");
    let (gw_fds, helper_fds) = (fd_count(gw), fd_count(helper));
    let v = httpload(&dev.ns, &url, 10_000, 32, 100);
    assert_eq!(v["ok"], 10_000, "{v}");
    settle("flows and NAT slots of the 10,000 connections to be released");
    let (gw_after, helper_after) = (fd_count(gw), fd_count(helper));
    assert!(gw_after <= gw_fds + 4, "gateway fds {gw_fds} -> {gw_after}");
    assert!(
        helper_after <= helper_fds + 2,
        "helper fds {helper_fds} -> {helper_after}"
    );
    assert_eq!(
        lab.gateway.helper_pid(),
        Some(helper),
        "the helper was restarted during the load"
    );
}

#[test]
fn proxy_between_devices_carries_50_mb_intact_through_upgrade_and_downgrade() {
    const BYTES: u64 = 50 * 1024 * 1024;
    let mut t = TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR);
    t.rules = r#"[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"
[[tenant.rule]]
id = "alice-to-bob-proxied"
action = "proxy"
devices = ["alice"]
dst = ["bob"]
proto = "tcp"
ports = ["5201"]
"#
    .to_string();
    let mut lab = Lab::new(&[t]);
    let a = lab.add_client("acme", "alice");
    let b = lab.add_client("acme", "bob");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "alice -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "bob -> gateway");
    let b_addr = b.address().to_string();
    let dir = lab.dir().to_path_buf();
    assert_eq!(
        lab.gateway.metrics().value("rampart_nat_slots", &[]),
        0.0,
        "NAT slots in use before the transfer"
    );
    let mut server = support::probe::exchange_server(&b.ns, &dir, &b_addr, 5201, BYTES);
    let mut client = support::probe::spawn_exchange_client(&a.ns, &dir, &b_addr, 5201, BYTES);
    // While the bytes flow, they go through the layer-4 path: a NAT slot is held, and the namespace
    // helper's kernel has the upgraded connection accepted on its listener.
    let mut through_namespace = false;
    let mut slots = 0.0f64;
    while client.is_running() && !(through_namespace && slots >= 1.0) {
        slots = slots.max(lab.gateway.metrics().value("rampart_nat_slots", &[]));
        let ss = run(
            lab.gateway
                .in_helper_ns("ss")
                .args(["-tn", "state", "established"]),
            Duration::from_secs(10),
        );
        through_namespace |= ss.stdout.contains("100.66.0.1:7000");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        through_namespace && slots >= 1.0,
        "the proxied transfer did not go through the layer-4 path (NAT slots held: {slots}, an \
         upgraded connection in the namespace: {through_namespace})"
    );
    let alice =
        support::probe::exchange_end(&client.finish(Duration::from_secs(240)), "exchange client");
    let bob =
        support::probe::exchange_end(&server.finish(Duration::from_secs(30)), "exchange server");
    assert_eq!((bob.recv, alice.recv), (BYTES, BYTES));
    assert_eq!(bob.recv_sha256, alice.sent_sha256, "alice -> bob corrupted");
    assert_eq!(alice.recv_sha256, bob.sent_sha256, "bob -> alice corrupted");
    // The flow is recorded as proxied.
    let (flow, _) = wait_until(
        "the proxied flow's record",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let out = lab
                .gateway
                .cli(&["audit", "flows"], &["--json"])
                .expect_ok();
            out.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .find(|f| f["dport"] == 5201)
        },
    );
    assert_eq!(
        (
            flow["action"].as_str(),
            flow["rule"].as_str(),
            flow["dst_device"].as_str()
        ),
        (Some("proxy"), Some("alice-to-bob-proxied"), Some("bob")),
        "{flow}"
    );
    lab.gateway.assert_alive();
}

/// Benchmark (not part of `make test`): throughput and connections per second of the layer-4 path against
/// the plain layer-3 relay, side by side in one run. `cargo test --release --test e2e_offramp bench -- --ignored
/// --nocapture`; results go to docs/benchmarks.md.
#[test]
#[ignore = "benchmark; run by hand"]
fn bench_layer4_vs_layer3() {
    let mut t = acme();
    t.rules.push_str(
        r#"[[tenant.rule]]
id = "l3"
action = "allow"
devices = ["alice"]
dst = ["bob"]
proto = "tcp"
ports = ["5201", "8080"]
[[tenant.rule]]
id = "l4"
action = "proxy"
devices = ["alice"]
dst = ["bob"]
proto = "tcp"
ports = ["5202", "8081"]
"#,
    );
    let mut lab = Lab::new(&[t]);
    let host = lab.add_host("up");
    let _nginx = Nginx::start(&host, &lab.dir().join("up"), &[("small", 100)]);
    let a = lab.add_client("acme", "alice");
    let b = lab.add_client("acme", "bob");
    wait_ping(&a.ns, GW_ADDR, TUNNEL_UP, "alice -> gateway");
    wait_ping(&b.ns, GW_ADDR, TUNNEL_UP, "bob -> gateway");
    let b_addr = b.address().to_string();
    let iperf = |port: u16, dst: &str, server_ns: &support::netns::Netns| -> f64 {
        let mut cmd = server_ns.exec("iperf3");
        cmd.args(["-s", "-1", "-p", &port.to_string()]);
        let mut srv = Proc::spawn("iperf3-server", cmd, lab.dir());
        std::thread::sleep(Duration::from_millis(500));
        let r = a.ns.run(
            "iperf3",
            &["-c", dst, "-p", &port.to_string(), "-t", "5", "-J"],
            Duration::from_secs(60),
        );
        srv.stop(Duration::from_secs(5));
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    };
    let gw_cpu = || -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", lab.gateway.pid()))
            .unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / 100.0
    };
    let mut rows = Vec::new();
    for (name, port, dst) in [
        ("layer 3 relay (allow)", 5201, b_addr.as_str()),
        ("layer 4 splice (proxy)", 5202, b_addr.as_str()),
    ] {
        let mut samples = Vec::new();
        for _ in 0..3 {
            let c0 = gw_cpu();
            let mbps = iperf(port, dst, &b.ns);
            samples.push((mbps, (gw_cpu() - c0) / 5.0 * 100.0));
        }
        samples.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap());
        rows.push(format!(
            "| {name} | TCP 1 stream | {:.0} Mbit/s | gw CPU {:.0} % |",
            samples[1].0, samples[1].1
        ));
    }
    let up = format!("http://{UPSTREAM}/small");
    let start = std::time::Instant::now();
    let v = httpload(&a.ns, &up, 2000, 16, 100);
    rows.push(format!("| off-ramp (upgrade + host socket) | 2000 HTTP/1.0 connections, 16 at a time | {:.0} connections/s | ok {} |", 2000.0 / start.elapsed().as_secs_f64(), v["ok"]));
    let start = std::time::Instant::now();
    let v = httpload(&host.ns, &up, 2000, 16, 100);
    rows.push(format!(
        "| direct (no gateway) | same | {:.0} connections/s | ok {} |",
        2000.0 / start.elapsed().as_secs_f64(),
        v["ok"]
    ));
    eprintln!("{}", rows.join("\n"));
}

/// Seconds of CPU (user + system, all threads) the process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The median of three or more samples (sorted by the first field).
fn median<T: Copy>(mut v: Vec<(f64, T)>) -> (f64, T) {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v[v.len() / 2]
}

/// One wrk run of `secs` with `conns` connections, a new TCP connection per request (`Connection: close`):
/// requests (= connections) per second and the number of socket errors wrk reported.
fn wrk_close(ns: &support::netns::Netns, url: &str, conns: u32, secs: u32) -> (f64, u64) {
    let r = ns.run(
        "wrk",
        &[
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "-H",
            "Connection: close",
            url,
        ],
        Duration::from_secs(secs as u64 + 60),
    );
    assert!(r.success(), "wrk (apt install wrk): {r}");
    let rps = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let errors = r
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|e| {
            e.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    assert!(!r.stdout.contains("Non-2xx"), "errors during the run: {r}");
    (rps, errors)
}

/// Benchmark (not part of `make test`) of the off-ramp proxy, issue 14 step 6: download through the upgrade
/// path (device -> WireGuard -> gateway -> namespace -> proxy -> iperf3 on the upstream host, `-R`), as Gbit/s
/// per gateway core at full speed and gateway CPU at a steady 100 Mbit/s, and new connections per second
/// (wrk, 100 concurrent, a new connection per request) against the same load from the upstream host's own
/// namespace (direct, no gateway). Medians of 3. Needs `wrk` (apt). `RAMPART_E2E_BIN` runs another build of
/// the gateway (a before/after pair in the same conditions).
/// `cargo test --release --test e2e_offramp bench_offramp -- --ignored --nocapture`; results in
/// docs/benchmarks.md.
#[test]
#[ignore = "benchmark; run by hand"]
fn bench_offramp() {
    let mut t = acme();
    t.rules.push_str(&format!(
        "[[tenant.rule]]\nid = \"iperf\"\naction = \"allow\"\ndst = [\"{UPSTREAM_NET}\"]\nproto = \"tcp\"\nports = [\"5201\"]\n"
    ));
    // The per-device new-flow limit (1,000/s by default) would be what is measured; lift it.
    t.rules.push_str(
        "[flows]\ndevice_new_flows_per_sec = 1000000\ndevice_new_flows_burst = 1000000\ndevice_max_flows = 1000000\n",
    );
    let mut lab = Lab::new(&[t]);
    let host = lab.add_host("up");
    assert_eq!(host.underlay.to_string(), UPSTREAM);
    let _nginx = Nginx::start(&host, &lab.dir().join("up"), &[("small", 100)]);
    let dev = lab.add_client("acme", "laptop");
    wait_ping(&dev.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway");
    let mut cmd = host.ns.exec("iperf3");
    cmd.args(["-s", "-B", UPSTREAM, "-p", "5201"]);
    let _iperf = Proc::spawn("iperf3-server", cmd, lab.dir());
    let pid = lab.gateway.pid();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // (Mbit/s received by the device, gateway CPU % of one core over the run, Gbit/s per gateway core)
    let download = |rate: Option<&str>| -> (f64, f64, f64) {
        let mut args = vec!["-c", UPSTREAM, "-p", "5201", "-R", "-t", "5", "-J"];
        if let Some(b) = rate {
            args.extend(["-b", b]);
        }
        wait_until(
            "iperf3 to connect through the off-ramp",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let c0 = cpu_secs(pid);
                let t0 = std::time::Instant::now();
                let r = dev.ns.run("iperf3", &args, Duration::from_secs(60));
                let (cpu, wall) = (cpu_secs(pid) - c0, t0.elapsed().as_secs_f64());
                let v: serde_json::Value = serde_json::from_str(&r.stdout).ok()?;
                let bits = v["end"]["sum_received"]["bytes"].as_f64()? * 8.0;
                let bps = v["end"]["sum_received"]["bits_per_second"].as_f64()?;
                Some((bps / 1e6, cpu / wall * 100.0, bits / 1e9 / cpu.max(0.01)))
            },
        )
        .0
    };
    let mut rows = vec![format!(
        "load average before: {}",
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )];
    let mut full = Vec::new();
    let mut light = Vec::new();
    let mut via = Vec::new();
    let mut direct = Vec::new();
    let url = format!("http://{UPSTREAM}/small");
    // Round robin, so slow drift of the machine is spread over every row.
    for _ in 0..3 {
        let (mbps, cpu, per_core) = download(None);
        full.push((per_core, (mbps, cpu)));
        let (mbps, cpu, _) = download(Some("100M"));
        light.push((cpu, mbps));
        let c0 = cpu_secs(pid);
        let t0 = std::time::Instant::now();
        let (rps, errors) = wrk_close(&dev.ns, &url, 100, 5);
        let cpu = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0;
        via.push((rps, (cpu, errors)));
        let (rps, errors) = wrk_close(&host.ns, &url, 100, 5);
        direct.push((rps, errors));
    }
    let (per_core, (mbps, cpu)) = median(full);
    rows.push(format!(
        "| off-ramp download, iperf3 -R TCP 1 stream | {mbps:.0} Mbit/s | gw CPU {cpu:.0} % | {per_core:.2} Gbit/s per gateway core |"
    ));
    let (cpu, mbps) = median(light);
    rows.push(format!(
        "| off-ramp download, steady 100 Mbit/s | {mbps:.0} Mbit/s | gw CPU {cpu:.1} % | |"
    ));
    let (rps, (cpu, errors)) = median(via);
    rows.push(format!(
        "| off-ramp, wrk -c100, new connection per request | {rps:.0} connections/s | gw CPU {cpu:.0} % | socket errors {errors} |"
    ));
    let (rps, errors) = median(direct);
    rows.push(format!(
        "| direct (upstream host to nginx, no gateway), same | {rps:.0} connections/s | | socket errors {errors} |"
    ));
    eprintln!("{}", rows.join("\n"));
    lab.gateway.assert_alive();
}
