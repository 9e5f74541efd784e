//! End-to-end acceptance of fleet mode's object storage (`[fleet.objects]`, issue 17): an SSH session recorded
//! through `rampart run` (real wireguard-go device, real OpenSSH client and sshd) is uploaded, sealed, to a real
//! S3 protocol server (`s3s-fs`, `support::s3`, in the gateway's namespace) with a manifest of its hash; its
//! records reach a real PostgreSQL (`support::pg`); `rampart audit ssh sessions|show|replay --fleet` list it
//! and replay the recording fetched from the bucket, verified first. A tampered object is refused (the
//! untampered one is the control). With the S3 server killed (by PID) the recording stays local and pending,
//! survives a `kill -9` of the gateway, and is uploaded exactly once when both are back.
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
    let keys = support::tempdir(&format!("reviewer-{tag}"));
    let (reviewer, line) = reviewer_key(keys.path());
    let pg = Postgres::start(tag);
    let mut s3 = S3::prepare(tag);
    let fleet = format!(
        "\n[fleet]\nnode_id = \"gw-a\"\npostgres_url = \"{}\"\npostgres_password_file = \"{}\"\nship_interval_ms = 100\n{}",
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
