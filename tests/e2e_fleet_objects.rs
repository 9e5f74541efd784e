//! End-to-end acceptance of fleet mode's object storage (`[fleet.objects]`, issue 17): an SSH session recorded
//! through `rampart run` (real wireguard-go device, real OpenSSH client and sshd) is uploaded, sealed, to a real
//! S3 protocol server (`s3s-fs`, `support::s3`, in the gateway's namespace) with a manifest of its hash; its
//! records reach a real PostgreSQL (`support::pg`); `rampart audit ssh sessions|show|replay --fleet` list it
//! and replay the recording fetched from the bucket, verified first. A tampered object is refused (the
//! untampered one is the control). With the S3 server killed (by PID) the recording stays local and pending,
//! survives a `kill -9` of the gateway, and is uploaded exactly once when both are back; killed in the middle
//! of a multipart upload (after a part arrived), the upload is retried whole once it is back.
//!
//! Run: `make s3s-fs`, then `cargo test --features test-hooks --test e2e_fleet_objects -- --test-threads=1`
//! (root).

#[allow(unused_imports)]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::gateway::BIN;
use support::lab::Host;
use support::pg::Postgres;
use support::process::{run, Ran};
use support::s3::S3;
use support::ssh::{ca_init, text, HostKey, SshClient, Sshd};
use support::wg_client::WgClient;
use support::{wait_ping, wait_until, Lab, TenantSpec};

const GW_ADDR: &str = "100.96.0.1";
const TUNNEL_UP: Duration = Duration::from_secs(30);
const UPLOADED: Duration = Duration::from_secs(90);
/// The first underlay link of a lab is 198.18.1.0/24: the upstream host is added first, so it lives there.
const UPSTREAM_NET: &str = "198.18.1.0/24";
const UPSTREAM: &str = "198.18.1.2";

fn reviewer_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("reviewer.key");
    let out = Command::new(BIN)
        .args(["audit", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(line.starts_with("audit_recipient = \""), "{line}");
    (key, line)
}

fn tenant(recipient_line: &str) -> TenantSpec {
    let mut t = TenantSpec::new("acme", "100.96.0.0/24", GW_ADDR);
    t.rules = format!(
        r#"{recipient_line}offramp = ["{UPSTREAM_NET}"]
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
"#
    );
    t
}

struct Setup {
    lab: Lab,
    s3: S3,
    pg: Postgres,
    _host: Host,
    _sshd: Sshd,
    client: SshClient,
    dev: WgClient,
    reviewer: PathBuf,
    _keys: support::TempDir,
}

/// A gateway `gw-a` with `[fleet]` (PostgreSQL) and `[fleet.objects]` (s3s-fs in its namespace), an upstream
/// host with sshd, and device alice.
fn setup(tag: &str) -> Setup {
    setup_with(tag, "")
}

/// [`setup`] with more `[fleet.objects]` keys.
fn setup_with(tag: &str, objects_extra: &str) -> Setup {
    setup_node(tag, "gw-a", objects_extra, "127.0.0.1")
}

/// [`setup_with`] for node `node`, the S3 server listening on `s3_host`.
fn setup_node(tag: &str, node: &str, objects_extra: &str, s3_host: &str) -> Setup {
    let keys = support::tempdir(&format!("reviewer-{tag}"));
    let (reviewer, line) = reviewer_key(keys.path());
    let pg = Postgres::start(tag);
    let mut s3 = S3::prepare(tag);
    s3.host = s3_host.to_string();
    let fleet = format!(
        "\n[fleet]\nnode_id = \"{node}\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\nship_interval_ms = 100\n{}",
        pg.url(),
        pg.password_file().display(),
        s3.objects_toml() + objects_extra
    );
    // The S3 server runs in the gateway's namespace, which the lab creates: the gateway starts before it
    // (an unreachable object store only delays uploads, it does not stop the node).
    let mut lab = Lab::with_settings(&[tenant(&line)], &fleet);
    s3.start_in(&lab.gw_ns);
    let host = lab.add_host("up");
    assert_eq!(host.underlay.to_string(), UPSTREAM);
    let ca_line = ca_init(&lab.gateway, "acme");
    let state = lab.gateway.state_dir();
    let sshd = Sshd::start(
        Some(&host.ns),
        &lab.dir().join("sshd-up"),
        UPSTREAM,
        &[22],
        &state.join("ssh/acme/user_ca.pub"),
        HostKey::Plain,
    );
    let client = SshClient::new(&lab.dir().join("alice-ssh"), &ca_line);
    let dev = lab.add_client("acme", "alice");
    wait_ping(&dev.ns, GW_ADDR, TUNNEL_UP, "alice -> gateway");
    Setup {
        lab,
        s3,
        pg,
        _host: host,
        _sshd: sshd,
        client,
        dev,
        reviewer,
        _keys: keys,
    }
}

/// A PTY session that types `marker`; returns nothing (the audit log names it).
fn pty_session(s: &Setup, marker: &str) {
    let out = s.client.ssh(
        &s.dev.ns,
        &["-tt", &format!("root@{UPSTREAM}")],
        Some(format!("echo {marker}-$((6*7))\nexit 0\n").as_bytes()),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{marker}-42")));
}

/// `rampart audit ...` run inside the gateway's namespace (the S3 server listens on its loopback; PostgreSQL
/// is reached through its Unix socket).
fn review(s: &Setup, args: &[&str]) -> Ran {
    run(
        s.lab
            .gw_ns
            .exec(BIN)
            .args(args)
            .arg("-c")
            .arg(&s.lab.gateway.config),
        Duration::from_secs(120),
    )
}

fn fleet_sessions(s: &Setup) -> Vec<Value> {
    review(s, &["audit", "ssh", "sessions", "--fleet", "--json"])
        .expect_ok()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the fleet lists `n` ended sessions (the node shipped them).
fn wait_fleet_sessions(s: &Setup, n: usize) -> Vec<Value> {
    wait_until(
        &format!("{n} ended sessions in the fleet's PostgreSQL"),
        UPLOADED,
        Duration::from_millis(300),
        || {
            let v = fleet_sessions(s);
            (v.iter().filter(|x| !x["ended_ms"].is_null()).count() >= n).then_some(v)
        },
    )
    .0
}

fn uploads(s: &Setup) -> Vec<(String, String, i64)> {
    let db = rampart::fleet::uploader::outbox_path(&s.lab.gateway.state_dir());
    let Ok(c) =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let mut stmt = match c.prepare("SELECT object_key, state, attempts FROM uploads ORDER BY seq") {
        Ok(s) => s,
        Err(_) => return Vec::new(),
    };
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn wait_uploaded(s: &Setup, n: usize) -> Vec<(String, String, i64)> {
    wait_until(
        &format!("{n} recordings uploaded"),
        UPLOADED,
        Duration::from_millis(200),
        || {
            let u = uploads(s);
            (u.len() >= n && u.iter().all(|x| x.1 == "uploaded")).then_some(u)
        },
    )
    .0
}

fn local_recordings(s: &Setup) -> Vec<PathBuf> {
    support::ssh::walk(&s.lab.gateway.state_dir().join("recordings"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cap"))
        .collect()
}

#[test]
fn a_recorded_session_is_uploaded_sealed_and_replayed_from_the_bucket_and_a_tampered_object_is_refused(
) {
    let s = setup("upload");
    pty_session(&s, "typed");
    let ups = wait_uploaded(&s, 1);
    assert_eq!(ups.len(), 1, "one recording, one upload: {ups:?}");
    let key = &ups[0].0;
    assert!(key.starts_with("acme/"), "{key}");
    // In the bucket: the object and its manifest, nothing else.
    let objects = s.s3.objects();
    assert!(
        objects.contains(key) && objects.contains(&format!("{key}.manifest.json")),
        "{objects:?}"
    );
    let stored = std::fs::read(s.s3.bucket_dir().join(key)).unwrap();
    let local = local_recordings(&s);
    assert_eq!(local.len(), 1, "the local copy is kept by default");
    assert_eq!(
        stored,
        std::fs::read(&local[0]).unwrap(),
        "the bucket holds the sealed file as recorded"
    );
    assert!(
        !String::from_utf8_lossy(&stored).contains("typed-42"),
        "the stored recording is sealed, not plaintext"
    );
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(s.s3.bucket_dir().join(format!("{key}.manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["node"], "gw-a");
    assert_eq!(manifest["sha256"], support::ssh::sha256_hex(&stored));
    let m = s.lab.gateway.metrics();
    assert_eq!(
        m.value("rampart_fleet_recordings_uploaded_total", &[]),
        1.0,
        "{}",
        m.describe("rampart_fleet_recordings_uploaded_total")
    );
    assert_eq!(m.value("rampart_fleet_recordings_pending", &[]), 0.0);

    // Review from the fleet: the session from PostgreSQL, the recording from the bucket.
    let sessions = wait_fleet_sessions(&s, 1);
    let id = sessions[0]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(sessions[0]["node"], "gw-a");
    let key_arg = s.reviewer.to_str().unwrap().to_owned();
    let replay = |s: &Setup| {
        review(
            s,
            &[
                "audit",
                "ssh",
                "replay",
                &id,
                "--fleet",
                "--max-idle",
                "0.05",
                "--key",
                &key_arg,
            ],
        )
    };
    let ok = replay(&s);
    assert!(
        ok.success() && ok.stdout.contains("typed-42"),
        "replay --fleet: {ok}"
    );
    let show = review(
        &s,
        &["audit", "ssh", "show", &id, "--fleet", "--key", &key_arg],
    )
    .expect_ok();
    assert!(
        show.contains("node gw-a") && show.contains("verified against its manifest"),
        "{show}"
    );

    // Tampering in the bucket: one byte of the object changed.
    let mut bad = stored.clone();
    let i = bad.len() / 2;
    bad[i] ^= 0x55;
    std::fs::write(s.s3.bucket_dir().join(key), &bad).unwrap();
    let refused = replay(&s);
    assert!(
        !refused.success()
            && refused.stderr.contains("changed in the bucket")
            && !refused.stdout.contains("typed-42"),
        "a tampered object must be refused before anything is shown: {refused}"
    );
    let show = review(&s, &["audit", "ssh", "show", &id, "--fleet"]).expect_ok();
    assert!(show.contains("NOT VERIFIED"), "{show}");
    // Object and manifest replaced consistently: the hash in the audit record (PostgreSQL) still refuses it.
    let mpath = s.s3.bucket_dir().join(format!("{key}.manifest.json"));
    let mut forged = manifest.clone();
    forged["sha256"] = Value::from(support::ssh::sha256_hex(&bad));
    std::fs::write(&mpath, serde_json::to_vec(&forged).unwrap()).unwrap();
    let refused = replay(&s);
    assert!(
        !refused.success() && refused.stderr.contains("audit record"),
        "a forged manifest must be refused: {refused}"
    );
    // Put back: it replays again (the control for the refusals above).
    std::fs::write(s.s3.bucket_dir().join(key), &stored).unwrap();
    std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    let again = replay(&s);
    assert!(
        again.success() && again.stdout.contains("typed-42"),
        "{again}"
    );
}

#[test]
fn with_the_object_store_down_the_recording_stays_local_and_uploads_exactly_once_after_restarts() {
    let mut s = setup("down");
    s.s3.kill();
    pty_session(&s, "offline");
    // The recording is queued, its upload fails and is retried; the local copy is there.
    wait_until(
        "a failed upload attempt",
        UPLOADED,
        Duration::from_millis(200),
        || {
            let u = uploads(&s);
            (u.len() == 1 && u[0].1 == "pending" && u[0].2 >= 1).then_some(())
        },
    );
    assert_eq!(local_recordings(&s).len(), 1);
    let m = s.lab.gateway.metrics();
    assert_eq!(m.value("rampart_fleet_recordings_pending", &[]), 1.0);
    assert!(m.value("rampart_fleet_recording_upload_retries_total", &[]) >= 1.0);
    assert!(s.s3.objects().is_empty());
    // The gateway dies (kill -9) with the upload pending; the outbox survives it.
    s.lab.gateway.kill();
    s.s3.start();
    s.lab.gateway.start();
    let ups = wait_uploaded(&s, 1);
    assert_eq!(ups.len(), 1, "{ups:?}");
    let key = &ups[0].0;
    assert_eq!(
        s.s3.objects(),
        vec![key.clone(), format!("{key}.manifest.json")],
        "exactly the recording and its manifest"
    );
    assert_eq!(
        local_recordings(&s).len(),
        1,
        "kept after the upload (keep_local defaults to true)"
    );
    // Nothing uploads twice: a while later, across one more restart, the outbox and the bucket are unchanged.
    s.lab
        .gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    s.lab.gateway.start();
    let m = s.lab.gateway.metrics();
    assert_eq!(m.value("rampart_fleet_recordings_pending", &[]), 0.0);
    assert_eq!(uploads(&s), ups);
    assert_eq!(s.s3.objects().len(), 2);
    let sessions = wait_fleet_sessions(&s, 1);
    let id = sessions[0]["session_id"].as_str().unwrap().to_owned();
    let key_arg = s.reviewer.to_str().unwrap().to_owned();
    let ok = review(
        &s,
        &[
            "audit",
            "ssh",
            "replay",
            &id,
            "--fleet",
            "--max-idle",
            "0.05",
            "--key",
            &key_arg,
        ],
    );
    assert!(ok.success() && ok.stdout.contains("offline-42"), "{ok}");
    let _ = &s.pg;
}

#[test]
fn a_missing_bucket_or_refused_credentials_stop_the_gateway_naming_the_key() {
    let mut s = setup("bad");
    let good = std::fs::read_to_string(&s.lab.gateway.config).unwrap();
    s.lab
        .gateway
        .terminate(Duration::from_secs(60))
        .expect("clean stop");
    let check = |cfg: &str| -> String {
        std::fs::write(&s.lab.gateway.config, cfg).unwrap();
        let r = run(
            s.lab
                .gw_ns
                .exec(BIN)
                .args(["run", "-c"])
                .arg(&s.lab.gateway.config),
            Duration::from_secs(60),
        );
        assert!(!r.success(), "the gateway must refuse to start: {r}");
        r.stderr
    };
    let e = check(&good.replace("bucket = \"recordings\"", "bucket = \"no-such-bucket\""));
    assert!(
        e.contains("fleet.objects.bucket") && e.contains("no-such-bucket"),
        "{e}"
    );
    let (_, secret) = s.s3.credential_files();
    std::fs::write(&secret, "wrong-secret\n").unwrap();
    let e = check(&good);
    assert!(e.contains("fleet.objects.secret_access_key"), "{e}");
    // The control: the right secret starts it.
    s.s3.credential_files();
    std::fs::write(&s.lab.gateway.config, &good).unwrap();
    s.lab.gateway.start();
}

#[test]
fn a_recording_larger_than_a_part_goes_up_as_a_multipart_upload_and_replays_verified() {
    let s = setup_with("multipart", "part_size_mb = 5\n");
    // About 8 MB of output on a non-terminal channel (recorded whole): two parts.
    let out = s.client.ssh(
        &s.dev.ns,
        &[
            &format!("root@{UPSTREAM}"),
            "head -c 6000000 /dev/urandom | base64 -w 0; echo; echo big-$((6*7))",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ups = wait_uploaded(&s, 1);
    let key = &ups[0].0;
    let local = local_recordings(&s);
    let size = std::fs::metadata(&local[0]).unwrap().len();
    assert!(
        size > 5 << 20,
        "the recording must exceed one part: {size} bytes"
    );
    assert_eq!(
        std::fs::read(s.s3.bucket_dir().join(key)).unwrap(),
        std::fs::read(&local[0]).unwrap(),
        "the parts were assembled into the recorded file"
    );
    let sessions = wait_fleet_sessions(&s, 1);
    let id = sessions[0]["session_id"].as_str().unwrap().to_owned();
    let key_arg = s.reviewer.to_str().unwrap().to_owned();
    let show = review(
        &s,
        &["audit", "ssh", "show", &id, "--fleet", "--key", &key_arg],
    )
    .expect_ok();
    assert!(show.contains("verified against its manifest"), "{show}");
}

#[test]
fn with_keep_local_false_the_local_copy_goes_only_after_the_upload_is_confirmed() {
    let mut s = setup_with("prune", "keep_local = false\n");
    s.s3.kill();
    pty_session(&s, "pruned");
    wait_until(
        "a failed upload attempt",
        UPLOADED,
        Duration::from_millis(200),
        || {
            let u = uploads(&s);
            (u.len() == 1 && u[0].1 == "pending" && u[0].2 >= 1).then_some(())
        },
    );
    let local = local_recordings(&s);
    assert_eq!(local.len(), 1, "kept while the upload is not confirmed");
    let recorded = std::fs::read(&local[0]).unwrap();
    s.s3.start();
    let ups = wait_uploaded(&s, 1);
    let key = &ups[0].0;
    wait_until(
        "the local copy removed",
        UPLOADED,
        Duration::from_millis(200),
        || local_recordings(&s).is_empty().then_some(()),
    );
    assert_eq!(
        std::fs::read(s.s3.bucket_dir().join(key)).unwrap(),
        recorded,
        "the bucket holds what was removed locally"
    );
    let sessions = wait_fleet_sessions(&s, 1);
    let id = sessions[0]["session_id"].as_str().unwrap().to_owned();
    let key_arg = s.reviewer.to_str().unwrap().to_owned();
    let ok = review(
        &s,
        &[
            "audit",
            "ssh",
            "replay",
            &id,
            "--fleet",
            "--max-idle",
            "0.05",
            "--key",
            &key_arg,
        ],
    );
    assert!(ok.success() && ok.stdout.contains("pruned-42"), "{ok}");
}

/// Limits the gateway namespace's loopback (where s3s-fs listens, and nothing the session needs) to a rate at
/// which a 5 MB part takes seconds, so the test can stop the server between parts; `None` lifts it.
fn throttle_loopback(s: &Setup, rate: Option<&str>) {
    let r = match rate {
        Some(rate) => s.lab.gw_ns.run(
            "tc",
            &[
                "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", "512kb",
                "latency", "5s",
            ],
            Duration::from_secs(10),
        ),
        None => s.lab.gw_ns.run(
            "tc",
            &["qdisc", "del", "dev", "lo", "root"],
            Duration::from_secs(10),
        ),
    };
    assert!(r.success(), "tc: {r}");
}

#[test]
fn the_s3_server_killed_mid_multipart_upload_the_upload_is_retried_and_ends_whole_and_verified() {
    let mut s = setup_with("midupload", "part_size_mb = 5\n");
    throttle_loopback(&s, Some("16mbit"));
    // About 8 MB of output on a non-terminal channel (recorded whole): two parts.
    let out = s.client.ssh(
        &s.dev.ns,
        &[
            &format!("root@{UPSTREAM}"),
            "head -c 6000000 /dev/urandom | base64 -w 0; echo; echo cut-$((6*7))",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The first part has arrived whole: freeze the server in the middle of the upload, then kill it.
    let parts = wait_until(
        "a part of the multipart upload at the S3 server",
        UPLOADED,
        Duration::from_millis(20),
        || {
            let p = s.s3.upload_parts();
            (!p.is_empty()).then_some(p)
        },
    )
    .0;
    s.s3.pause();
    let ups = uploads(&s);
    assert_eq!(
        (ups.len(), ups[0].1.as_str()),
        (1, "pending"),
        "the upload was still running when the server stopped: {ups:?}"
    );
    assert!(
        s.s3.objects().is_empty(),
        "nothing completed in the bucket yet: {:?}",
        s.s3.objects()
    );
    s.s3.kill();
    // The interrupted upload fails and is retried; meanwhile the recording stays here.
    wait_until(
        "the interrupted upload counted as a failed attempt",
        UPLOADED,
        Duration::from_millis(200),
        || {
            let u = uploads(&s);
            (u[0].1 == "pending" && u[0].2 >= 1).then_some(())
        },
    );
    let local = local_recordings(&s);
    assert_eq!(
        local.len(),
        1,
        "the local copy is kept until the upload is confirmed"
    );
    let recorded = std::fs::read(&local[0]).unwrap();
    assert!(
        recorded.len() > 5 << 20,
        "more than one part: {}",
        recorded.len()
    );
    assert!(
        s.lab
            .gateway
            .metrics()
            .value("rampart_fleet_recording_upload_retries_total", &[])
            >= 1.0
    );
    // The server comes back (unthrottled): the upload is redone and completes once.
    throttle_loopback(&s, None);
    s.s3.start();
    let ups = wait_uploaded(&s, 1);
    assert_eq!(ups.len(), 1, "{ups:?}");
    let key = &ups[0].0;
    assert_eq!(
        s.s3.objects(),
        vec![key.clone(), format!("{key}.manifest.json")],
        "exactly the recording and its manifest: no second copy"
    );
    assert_eq!(
        std::fs::read(s.s3.bucket_dir().join(key)).unwrap(),
        recorded,
        "the object is byte-identical to the recording"
    );
    assert_eq!(
        local_recordings(&s).len(),
        1,
        "kept (keep_local defaults to true)"
    );
    // The parts of the interrupted upload could not be aborted while the server was dead; the completed
    // upload's parts are gone (the server assembled them).
    let left = s.s3.upload_parts();
    assert!(
        left.iter().all(|p| parts
            .iter()
            .any(|q| p.split(".part-").next() == q.split(".part-").next())),
        "only the interrupted upload's parts may remain: {left:?} (interrupted: {parts:?})"
    );
    // Reviewed from the fleet: the recording fetched from the bucket verifies against its manifest and the
    // audit record.
    let sessions = wait_fleet_sessions(&s, 1);
    let id = sessions[0]["session_id"].as_str().unwrap().to_owned();
    let key_arg = s.reviewer.to_str().unwrap().to_owned();
    let show = review(
        &s,
        &["audit", "ssh", "show", &id, "--fleet", "--key", &key_arg],
    )
    .expect_ok();
    assert!(show.contains("verified against its manifest"), "{show}");
}

const ROOT_PW: &str = "root password for the fleet e2e";
/// The review UI of node gw-a (in its own lab).
const UI: &str = "127.0.0.1:8444";
/// The link between the two nodes' namespaces: gw-a's end, and gw-b's (where gw-b's S3 server answers).
const LINK_A: &str = "198.19.200.1";
const LINK_B: &str = "198.19.200.2";

/// A veth pair between two namespaces this test created, so node A reaches node B's S3 server.
fn link(a: &support::netns::Netns, b: &support::netns::Netns) {
    let (va, vb) = (
        format!("rfa{}", std::process::id() % 100_000),
        format!("rfb{}", std::process::id() % 100_000),
    );
    a.ip(&[
        "link",
        "add",
        &va,
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", &format!("{LINK_A}/30"), "dev", &va]);
    a.ip(&["link", "set", &va, "up"]);
    b.ip(&["addr", "add", &format!("{LINK_B}/30"), "dev", &vb]);
    b.ip(&["link", "set", &vb, "up"]);
}

/// `rampart ARGS -c CONFIG` with `stdin`; its stdout.
fn rampart_with_stdin(config: &Path, args: &[&str], stdin: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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

/// `GET path` on node A's review API with an API token: the status and the body.
fn api(lab: &Lab, token: &str, path: &str) -> (u16, Vec<u8>) {
    let body = lab.dir().join("api-body");
    let _ = std::fs::remove_file(&body);
    let r = lab.gw_ns.run(
        "curl",
        &[
            "-sk",
            "--max-time",
            "60",
            "-o",
            body.to_str().unwrap(),
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("https://{UI}{path}"),
        ],
        Duration::from_secs(90),
    );
    let code = r.stdout.trim().parse().unwrap_or(0);
    (code, std::fs::read(&body).unwrap_or_default())
}

fn api_json(lab: &Lab, token: &str, path: &str) -> Value {
    let (code, body) = api(lab, token, path);
    assert_eq!(code, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn the_review_api_of_node_a_lists_a_session_of_node_b_and_serves_its_recording_verified_from_the_bucket(
) {
    // Node gw-b records (its S3 server listens on its link to gw-a too); node gw-a serves the review UI and
    // reads the fleet: PostgreSQL for the records, the bucket for the recording.
    let s = setup_node("api", "gw-b", "", "0.0.0.0");
    let b_cfg = std::fs::read_to_string(&s.lab.gateway.config).unwrap();
    let line = b_cfg
        .lines()
        .find(|l| l.starts_with("audit_recipient"))
        .unwrap()
        .to_string()
        + "\n";
    let a_extra = format!(
        "ui_listen = \"{UI}\"\n\n[fleet]\nnode_id = \"gw-a\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\nship_interval_ms = 100\n{}",
        s.pg.url(),
        s.pg.password_file().display(),
        s.s3
            .objects_toml()
            .replace(&s.s3.endpoint(), &format!("http://{LINK_B}:{}", s.s3.port)),
    );
    // Node A starts before the link exists: an unreachable object store only delays its uploads.
    let a = Lab::with_settings(&[tenant(&line)], &a_extra);
    link(&a.gw_ns, &s.lab.gw_ns);
    rampart_with_stdin(
        &a.gateway.config,
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
    let token = rampart_with_stdin(&a.gateway.config, &["admin", "token", "--name", "root"], "")
        .trim()
        .to_string();

    pty_session(&s, "fleetui");
    let ups = wait_uploaded(&s, 1);
    let key = ups[0].0.clone();
    let id = wait_fleet_sessions(&s, 1)[0]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Listed by node A with its node; node A's own store does not have it (the control: it comes from the
    // fleet); the node filter narrows.
    let fleet = api_json(&a, &token, "/api/v1/sessions?fleet=1");
    let items = fleet["items"].as_array().unwrap();
    let mine: Vec<&Value> = items.iter().filter(|x| x["session_id"] == id).collect();
    assert_eq!(mine.len(), 1, "{fleet}");
    assert_eq!(mine[0]["node"], "gw-b");
    assert_eq!(mine[0]["user"], "alice@acme.example");
    let local = api_json(&a, &token, "/api/v1/sessions");
    assert!(
        !local.to_string().contains(&id),
        "node A did not record the session itself: {local}"
    );
    let only_a = api_json(&a, &token, "/api/v1/sessions?fleet=1&node=gw-a");
    assert_eq!(only_a["items"].as_array().unwrap().len(), 0, "{only_a}");
    let only_b = api_json(&a, &token, "/api/v1/sessions?fleet=1&node=gw-b");
    assert_eq!(only_b["items"].as_array().unwrap().len(), 1, "{only_b}");
    // Flows and HTTP records of the fleet, each with its node.
    let flows = api_json(&a, &token, "/api/v1/flows?fleet=1&node=gw-b");
    assert!(
        flows["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["node"] == "gw-b" && f["dport"] == 22 && f["action"] == "inspect_ssh"),
        "{flows}"
    );
    let http = api_json(&a, &token, "/api/v1/http?fleet=1");
    assert!(http["items"].is_array(), "{http}");
    let (code, body) = api(&a, &token, "/api/v1/flows?fleet=1&bogus=1");
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));

    // The recording: the channel from the fleet's show, the bytes from the bucket, verified first.
    let show = review(&s, &["audit", "ssh", "show", &id, "--fleet"]).expect_ok();
    let ch: u32 = show
        .lines()
        .find_map(|l| l.strip_prefix("recording ch"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no recording line in {show}"));
    let blob = format!("/api/v1/sessions/{id}/channels/{ch}/blob?fleet=1");
    let stored = std::fs::read(s.s3.bucket_dir().join(&key)).unwrap();
    let (code, body) = api(&a, &token, &blob);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, stored, "node A serves the sealed recording as stored");
    let (code, _) = api(
        &a,
        &token,
        &format!("/api/v1/sessions/{id}/channels/{ch}/blob"),
    );
    assert_eq!(code, 404, "without fleet=1 node A has no such session");
    // A changed object in the bucket is refused, not served; put back, it is served again.
    let mut bad = stored.clone();
    let i = bad.len() / 2;
    bad[i] ^= 0x55;
    std::fs::write(s.s3.bucket_dir().join(&key), &bad).unwrap();
    let (code, body) = api(&a, &token, &blob);
    let text = String::from_utf8_lossy(&body);
    assert!(
        code == 409 && text.contains("recording_unverified"),
        "a tampered recording must be refused: {code} {text}"
    );
    std::fs::write(s.s3.bucket_dir().join(&key), &stored).unwrap();
    let (code, body) = api(&a, &token, &blob);
    assert_eq!((code, body == stored), (200, true));
    // The reads are node A's admin records, naming the node and the object.
    wait_until(
        "node A's admin record of the recording read",
        UPLOADED,
        Duration::from_millis(300),
        || {
            let reads = rampart_with_stdin(&a.gateway.config, &["audit", "admin", "--json"], "");
            (reads.contains("recording_read") && reads.contains("gw-b") && reads.contains(&key))
                .then_some(())
        },
    );

    // The same session detail the page shows, from the fleet, with its node; not on node A without fleet=1.
    let detail = api_json(&a, &token, &format!("/api/v1/sessions/{id}?fleet=1"));
    assert_eq!(detail["node"], "gw-b", "{detail}");
    assert!(
        detail["channels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["seq"] == ch && c["recording"]["sealed"] == true),
        "{detail}"
    );
    let (code, _) = api(&a, &token, &format!("/api/v1/sessions/{id}"));
    assert_eq!(code, 404, "without fleet=1 node A has no such session");
    assert_eq!(api_json(&a, &token, "/api/v1/me")["fleet_node"], "gw-a");

    // The pages, in a real browser on node A: listed under gw-b with "All nodes" on (not with it off), and
    // the recording plays from the bucket; a changed object shows a clear refusal.
    browser_check(&a, &s, &id, &key);
}

/// Runs `tests/ui/fleet.mjs` (playwright-core driving Debian's chromium) in node A's namespace, where its UI
/// listens; its `STEP tamper|restore` change the session's object in node B's bucket and put it back.
fn browser_check(a: &Lab, s: &Setup, id: &str, key: &str) {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for p in [
        PathBuf::from("/usr/bin/chromium"),
        PathBuf::from("/usr/bin/node"),
        repo.join("tests/ui/node_modules/playwright-core"),
    ] {
        assert!(
            p.exists(),
            "missing {} (make deps, make ui-test-deps)",
            p.display()
        );
    }
    let shots = repo.join("target/ui-shots");
    std::fs::create_dir_all(&shots).unwrap();
    let object = s.s3.bucket_dir().join(key);
    let stored = std::fs::read(&object).unwrap();
    let mut node = Command::new("ip")
        .args(["netns", "exec", a.gw_ns.name(), "node"])
        .arg(repo.join("tests/ui/fleet.mjs"))
        .env("UI_URL", format!("https://{UI}"))
        .env("ROOT_PW", ROOT_PW)
        .env("SESSION", id)
        .env("NODE", "gw-b")
        .env("MARKER", "fleetui-42")
        .env("KEY_FILE", &s.reviewer)
        .env("SHOTS", &shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs");
    let mut to_node = node.stdin.take().unwrap();
    let from_node = BufReader::new(node.stdout.take().unwrap());
    let mut result = None;
    for line in from_node.lines() {
        let line = line.unwrap();
        eprintln!("browser: {line}");
        match line.as_str() {
            "STEP tamper" => {
                let mut bad = stored.clone();
                let i = bad.len() / 2;
                bad[i] ^= 0x55;
                std::fs::write(&object, bad).unwrap();
                writeln!(to_node, "GO").unwrap();
            }
            "STEP restore" => {
                std::fs::write(&object, &stored).unwrap();
                writeln!(to_node, "GO").unwrap();
            }
            l if l.starts_with("RESULT ") => result = Some(l["RESULT ".len()..].to_owned()),
            _ => {}
        }
    }
    let status = node.wait().unwrap();
    std::fs::write(&object, &stored).unwrap();
    let result: Value =
        serde_json::from_str(&result.expect("the browser script reported")).unwrap();
    let failed: Vec<&Value> = result["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] != true)
        .collect();
    assert!(
        failed.is_empty() && status.success(),
        "browser checks failed: {failed:#?}"
    );
    assert!(result["checks"].as_array().unwrap().len() >= 10, "{result}");
}
