//! The review web UI in a real browser (Debian's chromium driven by playwright-core, `tests/ui/review.mjs`)
//! against a real gateway with real SSH sessions recorded through it (wireguard-go device, OpenSSH client and
//! sshd): sign-in and lockout, filters, the command timeline next to the player, a sealed session opened with
//! the reviewer's key in the page, the ssh-log-cli vectors decrypted in the browser, a corrupted capture, live
//! view and terminate, CSRF, tenant scoping, an expired session, the CSP, and a 20 MB recording; the flows
//! of two devices and an HTTP request made with curl (filters, links between flow, request and session), and
//! verification of the chain from the page and the API (ok, then a break after a row is altered).
//!
//! One gateway and one browser for all checks (the suite's time budget); each check in the script has its
//! positive control next to it. Screenshots and the browser's results (with timings) go to `target/ui-shots/`.
#![cfg(target_os = "linux")]

#[allow(unused_imports)]
mod support;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use support::ssh::{ca_init, text, wait_rows, HostKey, SshClient, Sshd, RAMPART};
use support::{wait_ping, Lab, TenantSpec};

const GW_ADDR: &str = "100.96.0.1";
const UPSTREAM_NET: &str = "198.18.1.0/24";
const UPSTREAM: &str = "198.18.1.2";
const UI: &str = "127.0.0.1:8444";
const ROOT_PW: &str = "root password for the e2e";
const AUDITOR_PW: &str = "auditor password e2e";

fn tenants() -> Vec<TenantSpec> {
    let mut acme = TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR);
    acme.rules = format!(
        r#"offramp = ["{UPSTREAM_NET}"]
[[tenant.rule]]
id = "ping-gateway"
action = "allow"
dst = ["gateway"]
proto = "icmp"
[[tenant.rule]]
id = "ssh-upstream"
action = "inspect_ssh"
dst = ["{UPSTREAM_NET}"]
proto = "tcp"
ports = ["22"]
capture_input = true
[[tenant.rule]]
id = "web"
action = "inspect_http"
dst = ["{UPSTREAM_NET}"]
proto = "tcp"
ports = ["80"]
"#
    );
    // A second tenant with nothing in it: its auditor must see none of acme's sessions.
    let beta = TenantSpec::new("beta", "100.97.0.0/24", "100.97.0.1");
    vec![acme, beta]
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn need_browser() {
    for (what, path) in [
        (
            "Debian's chromium (make deps)",
            PathBuf::from("/usr/bin/chromium"),
        ),
        ("node", PathBuf::from("/usr/bin/node")),
        (
            "playwright-core (make ui-test-deps: npm ci in tests/ui)",
            repo().join("tests/ui/node_modules/playwright-core"),
        ),
        (
            "the UI's npm assets (make ui: npm ci in ui)",
            repo().join("ui/node_modules/asciinema-player"),
        ),
    ] {
        assert!(path.exists(), "missing {what}: {}", path.display());
    }
}

/// An interactive `ssh -tt` whose stdin the test types into.
struct Typist {
    child: Child,
    stdin: ChildStdin,
}

impl Typist {
    fn start(client: &SshClient, ns: &support::netns::Netns, dir: &Path, name: &str) -> Typist {
        let mut cmd = client.command(Some(ns), "ssh");
        cmd.args(["-tt", &format!("root@{UPSTREAM}")])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        Typist { child, stdin }
    }

    fn line(&mut self, l: &str) {
        self.stdin.write_all(l.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for the client to exit; `None` if it is still running after `limit`.
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Typist {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rampart(lab: &Lab, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(RAMPART)
        .args(args)
        .args(["-c", lab.gateway.config.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "rampart {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn newest_session(db: &Path, n: usize) -> String {
    wait_rows(db, "session.start", n);
    let ids = support::ssh::session_ids(db);
    assert_eq!(ids.len(), n, "expected {n} sessions");
    // Session ids are UUIDv7: the newest sorts last.
    ids.into_iter().max().unwrap()
}

/// Established TCP connections to the target's sshd (port 22) in its namespace.
fn target_conns(ns: &support::netns::Netns) -> usize {
    ns.sh("ss -Htn state established '( sport = :22 )'")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn review_ui_in_a_real_browser() {
    need_browser();
    let started = Instant::now();
    let mut lab = Lab::with_settings(
        &tenants(),
        // The pinned key is copied out of state_dir once the gateway has made it (below).
        &format!("ui_listen = \"{UI}\"\n[ui]\nidle_timeout_secs = 40\nlockout_failures = 3\n[audit]\nverify_key = \"pinned.pub\"\n"),
    );
    let host = lab.add_host("up");
    assert_eq!(host.underlay.to_string(), UPSTREAM);
    let ca_line = ca_init(&lab.gateway, "acme");
    let state = lab.gateway.state_dir();
    let db = state.join("audit.db");
    let _sshd = Sshd::start(
        Some(&host.ns),
        &lab.dir().join("sshd-up"),
        UPSTREAM,
        &[22],
        &state.join("ssh/acme/user_ca.pub"),
        HostKey::Plain,
    );
    let dev = lab.add_client("acme", "alice");
    wait_ping(
        &dev.ns,
        GW_ADDR,
        Duration::from_secs(30),
        "alice -> gateway",
    );
    let client = SshClient::new(&lab.dir().join("alice-ssh"), &ca_line);
    let dir = lab.dir().to_path_buf();
    // A second device of the same tenant, for the flows page's device filter.
    let bob = lab.add_client("acme", "bob");
    wait_ping(&bob.ns, GW_ADDR, Duration::from_secs(30), "bob -> gateway");
    // A plain web server on the target host; acme's `web` rule sends port 80 through the HTTP inspector.
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello through the inspector\n").unwrap();
    let mut web_cmd = host.ns.exec("python3");
    web_cmd
        .args(["-m", "http.server", "80", "--bind", UPSTREAM, "--directory"])
        .arg(&www);
    let _web = support::process::Proc::spawn("http-server", web_cmd, &dir);

    // Accounts, made on the console as a user would.
    rampart(
        &lab,
        &[
            "admin",
            "create",
            "--name",
            "root",
            "--role",
            "admin",
            "--all-tenants",
            "--password-stdin",
        ],
        &format!("{ROOT_PW}\n"),
    );
    for (name, tenant) in [
        ("aud-acme", "acme"),
        ("aud-beta", "beta"),
        ("victim", "acme"),
    ] {
        rampart(
            &lab,
            &[
                "admin",
                "create",
                "--name",
                name,
                "--role",
                "auditor",
                "--tenant",
                tenant,
                "--password-stdin",
            ],
            &format!("{AUDITOR_PW}\n"),
        );
    }

    // 1. A plain interactive session: five typed commands, 1.5 s apart, the fourth an XSS probe.
    let t0 = Instant::now();
    let mut s = Typist::start(&client, &dev.ns, &dir, "plain");
    for cmd in [
        "echo first-$((1+1))",
        "echo second-$((2+2))",
        "echo third-$((3+3))",
        "echo '<script>window.pwned=1</script><img src=x onerror=window.pwned=2>'",
        "echo fifth-$((5+5))",
    ] {
        s.line(cmd);
        std::thread::sleep(Duration::from_millis(1500));
    }
    s.line("exit 0");
    assert!(
        s.wait(Duration::from_secs(30)).is_some(),
        "plain session did not end"
    );
    let plain = newest_session(&db, 1);

    // 2. A 20 MB terminal recording (base64 of random bytes through a PTY).
    let big = client.ssh(
        &dev.ns,
        &[
            "-tt",
            &format!("root@{UPSTREAM}"),
            "head -c 15000000 /dev/urandom | base64 -w 200",
        ],
        None,
    );
    assert!(big.status.success(), "{}", text(&big.stderr));
    let big_id = newest_session(&db, 2);
    wait_rows(&db, "session.end", 2);

    // 3. A session that stays open for the live view.
    let mut live = Typist::start(&client, &dev.ns, &dir, "live");
    live.line("echo before-live-$((10+1))");
    let live_id = newest_session(&db, 3);

    // 4. Seal acme's recordings to a reviewer key (reload), then a sealed interactive session.
    let keygen = Command::new(RAMPART)
        .args(["audit", "keygen", "--out"])
        .arg(dir.join("reviewer.key"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen.stderr));
    let public = std::fs::read_to_string(dir.join("reviewer.key.pub")).unwrap();
    let cfg = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let cfg = cfg.replacen(
        "name = \"Tenant acme\"\n",
        &format!(
            "name = \"Tenant acme\"\naudit_recipient = \"{}\"\n",
            public.trim()
        ),
        1,
    );
    std::fs::write(&lab.gateway.config, cfg).unwrap();
    let reload = lab.gateway.cli(&["reload"], &[]);
    assert!(reload.success(), "{reload}");
    let mut s = Typist::start(&client, &dev.ns, &dir, "sealed");
    for cmd in [
        "echo s-one-$((1+1))",
        "echo s-two-$((2+2))",
        "echo s-three-$((3+3))",
        "echo s-four-$((4+4))",
    ] {
        s.line(cmd);
        std::thread::sleep(Duration::from_millis(1500));
    }
    s.line("exit 0");
    assert!(
        s.wait(Duration::from_secs(30)).is_some(),
        "sealed session did not end"
    );
    let sealed = newest_session(&db, 4);
    wait_rows(&db, "session.end", 3);
    // 5. A web request from alice with real curl through the gateway (the newest of alice's HTTP flows).
    support::wait_until(
        "curl through the HTTP inspector",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let r = dev.ns.run(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "10",
                    &format!("http://{UPSTREAM}/hello.txt"),
                ],
                Duration::from_secs(20),
            );
            (r.stdout == "hello through the inspector\n").then_some(())
        },
    );
    let sessions_secs = t0.elapsed().as_secs_f64();
    // The gateway made its signing key at start; the copy outside state_dir is audit.verify_key.
    std::fs::copy(state.join("audit_signing_key.pub"), dir.join("pinned.pub")).unwrap();

    // The browser, inside the gateway's namespace (where the UI listens on loopback).
    let shots = repo().join("target/ui-shots");
    std::fs::create_dir_all(&shots).unwrap();
    let recordings = support::ssh::walk(&state.join("recordings"));
    let corrupt_target = recordings
        .iter()
        .find(|p| {
            p.extension().is_some_and(|e| e == "cap") && p.to_string_lossy().contains(&sealed)
        })
        .unwrap_or_else(|| panic!("the sealed session {sealed} has no capture in {recordings:#?}"))
        .clone();
    let b0 = Instant::now();
    let mut node = Command::new("ip")
        .args(["netns", "exec", lab.gw_ns.name(), "node"])
        .arg(repo().join("tests/ui/review.mjs"))
        .env("UI_URL", format!("https://{UI}"))
        .env("ROOT_PW", ROOT_PW)
        .env("AUDITOR_PW", AUDITOR_PW)
        .env("PLAIN", &plain)
        .env("SEALED", &sealed)
        .env("BIG", &big_id)
        .env("LIVE", &live_id)
        .env("KEY_FILE", dir.join("reviewer.key"))
        .env("NOT_A_KEY", &lab.gateway.config)
        .env("VECTORS", repo().join("../shared/testdata/ssh-log-cli"))
        .env("SHOTS", &shots)
        .env("HTTP_PATH", "/hello.txt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs");
    let mut to_node = node.stdin.take().unwrap();
    let from_node = BufReader::new(node.stdout.take().unwrap());
    let mut results = None;
    let mut live_ended = None;
    let (mut target_conns_live, mut target_conns_after) = (0, usize::MAX);
    let (mut cli_before_tamper, mut tampered) = (None, None);
    for line in from_node.lines() {
        let line = line.unwrap();
        eprintln!("browser: {line}");
        match line.as_str() {
            "STEP corrupt" => {
                // Flip one byte in the middle of the stored capture.
                let mut b = std::fs::read(&corrupt_target).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x40;
                std::fs::write(&corrupt_target, b).unwrap();
                writeln!(to_node, "GO").unwrap();
            }
            "STEP live-open" => {
                target_conns_live = target_conns(&host.ns);
                live.line("echo after-live-$((20+22))");
                writeln!(to_node, "GO").unwrap();
            }
            "STEP terminated" => {
                live_ended = Some(live.wait(Duration::from_secs(30)));
                // The gateway's connection to the target ends too (nothing lingers after a terminate).
                let end = Instant::now() + Duration::from_secs(20);
                target_conns_after = target_conns(&host.ns);
                while target_conns_after > 0 && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(200));
                    target_conns_after = target_conns(&host.ns);
                }
                eprintln!(
                    "live ssh client: {:?}; stderr: {}; gateway: {:?}",
                    live_ended,
                    std::fs::read_to_string(dir.join("live.err")).unwrap_or_default(),
                    lab.gateway
                        .log()
                        .lines()
                        .filter(|l| l.contains("terminated") || l.contains("review UI"))
                        .collect::<Vec<_>>()
                );
                writeln!(to_node, "GO").unwrap();
            }
            "STEP tamper" => {
                // What the CLI says before the tamper: the capture corrupted above.
                cli_before_tamper = Some(cli_verify(&lab, &dir));
                // Rewrite who made the oldest flow, as someone with write access to the store would.
                let conn = rusqlite::Connection::open(&db).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                let seq: i64 = conn
                    .query_row("SELECT min(start_chain) FROM flows", [], |r| r.get(0))
                    .unwrap();
                let n = conn
                    .execute(
                        "UPDATE flows SET user = 'mallory@acme.example' WHERE start_chain = ?1",
                        [seq],
                    )
                    .unwrap();
                assert_eq!(n, 1);
                tampered = Some(seq);
                writeln!(to_node, "GO {seq}").unwrap();
            }
            l if l.starts_with("RESULT ") => {
                results = Some(serde_json::from_str::<serde_json::Value>(&l[7..]).unwrap());
            }
            _ => {}
        }
    }
    let status = node.wait().unwrap();
    let browser_secs = b0.elapsed().as_secs_f64();
    let results =
        results.unwrap_or_else(|| panic!("the browser script gave no RESULT (exit {status})"));
    // Kept beside the screenshots: the timings (20 MB recording load and seek, ...) quoted in docs/benchmarks.md.
    let _ = std::fs::write(
        shots.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    );
    eprintln!(
        "e2e_webui: sessions {sessions_secs:.1} s, browser {browser_secs:.1} s, total {:.1} s; results {results:#}",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "browser checks failed: {results:#}");
    let failed: Vec<_> = results["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] != true)
        .collect();
    assert!(failed.is_empty(), "failed browser checks: {failed:#?}");

    // The admin terminated the live session: its client was disconnected, and the end names who did it.
    assert!(
        target_conns_live >= 1,
        "no SSH connection to the target while the live session ran"
    );
    assert_eq!(
        target_conns_after, 0,
        "the gateway kept its connection to the target after the terminate"
    );
    let st = live_ended
        .expect("the live step ran")
        .expect("the live ssh client was disconnected");
    assert!(!st.success(), "terminated client exited successfully");
    let err = std::fs::read_to_string(dir.join("live.err")).unwrap();
    assert!(
        err.contains("terminated by an administrator"),
        "ssh client said: {err}"
    );
    let rows = wait_rows(&db, "session.end", 4);
    let end = rows
        .iter()
        .find(|r| r.kind == "session.end" && r.keys.session_id == live_id)
        .and_then(|r| r.event())
        .expect("end of the live session");
    match end {
        rampart::audit::ssh_records::SshEvent::SessionEnd(e) => {
            assert_eq!(e.reason, "terminated");
            assert!(e.error.unwrap_or_default().contains("root"));
        }
        other => panic!("{other:?}"),
    }
    // Sign-ins and recording reads are audit records, and the chain still verifies with them in it.
    let admin_log = rampart(&lab, &["audit", "admin", "--json"], "");
    for event in [
        "login_succeeded",
        "login_failed",
        "recording_read",
        "live_viewed",
        "session_terminated",
    ] {
        assert!(
            admin_log.contains(&format!("\"event\":\"{event}\"")),
            "no {event} in:\n{admin_log}"
        );
    }
    // The capture was corrupted on purpose above: verify must name it (and the rest must be fine).
    let (ok, v) = cli_before_tamper.expect("the tamper step ran");
    assert!(
        !ok && v.contains(".cap"),
        "verify after a corrupted capture: {v}"
    );
    // After the tamper the CLI breaks where the API did (the browser checked that): at the altered row.
    let seq = tampered.expect("the tamper step ran");
    let (ok, v) = cli_verify(&lab, &dir);
    let report: serde_json::Value =
        serde_json::from_str(v.lines().next().unwrap_or("")).unwrap_or_default();
    assert!(
        !ok && report["first_break"]["seq"].as_i64() == Some(seq),
        "CLI verify after the tamper of record {seq}: {v}"
    );
}

/// `rampart audit verify --json` with the pinned copy of the key: (passed, stdout + stderr).
fn cli_verify(lab: &Lab, dir: &Path) -> (bool, String) {
    let verify = Command::new(RAMPART)
        .args([
            "audit",
            "verify",
            "--json",
            "-c",
            lab.gateway.config.to_str().unwrap(),
            "--pubkey",
        ])
        .arg(dir.join("pinned.pub"))
        .output()
        .unwrap();
    (
        verify.status.success(),
        format!("{}{}", text(&verify.stdout), text(&verify.stderr)),
    )
}
