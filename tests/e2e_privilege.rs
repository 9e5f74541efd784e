//! Least privilege (issue 13, scope item 2), attack first: the real `rampart run` with `gateway.user` set
//! starts as root, drops to that user and sandboxes itself (no-new-privs, Landlock, seccomp). The test-only
//! control requests (`test-hooks` builds) play the attacker who runs code inside the gateway: read a file
//! the gateway has no business reading, make a system call it never makes.
//!
//! The user is `nobody` (present in every test image; the appliance uses its own `rampart`).
//! Run: `cargo test --features test-hooks --test e2e_privilege -- --test-threads=1` (root).

#[allow(unused_imports)]
mod support;

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::tail;
use support::{wait_ping, Lab, TenantSpec};

const USER: &str = "nobody";
const TUNNEL_UP: Duration = Duration::from_secs(30);
const GW_ADDR: &str = "100.96.1.1";

/// A lab whose gateway drops to `nobody`, started with umask 000 (what it creates must still be private).
fn dropped_lab() -> Lab {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let lab = Lab::with_settings(
        &[TenantSpec::new("acme", "100.96.1.0/24", GW_ADDR)],
        &format!("user = \"{USER}\"\n"),
    );
    nix::sys::stat::umask(old);
    lab
}

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name(USER)
        .unwrap()
        .expect("user nobody exists")
}

/// One control request (JSON line) to the running gateway; `None` when it closed without an answer.
fn control(lab: &Lab, request: serde_json::Value) -> Option<serde_json::Value> {
    let path = lab.gateway.state_dir().join("control.sock");
    let mut s = UnixStream::connect(&path).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

fn read_file(lab: &Lab, path: &Path) -> (bool, String) {
    let r = control(
        lab,
        serde_json::json!({"op": "debug_read_file", "path": path}),
    )
    .expect("an answer to debug_read_file");
    (
        r["ok"].as_bool().unwrap_or(false),
        r["message"].as_str().unwrap_or("").to_string(),
    )
}

/// `key:` line of /proc/PID/status.
fn proc_status(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().unwrap().is_dir() {
            files_under(&p, out);
        }
    }
}

#[test]
fn serves_a_device_after_the_drop_with_private_files_and_no_privileges() {
    let mut lab = dropped_lab();
    let pid = lab.gateway.pid();
    let uid = nobody().uid.as_raw().to_string();
    // The process the device talks to is the user, with nothing left of root.
    let uids = proc_status(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid),
        "gateway uids after the drop: {uids}"
    );
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "seccomp filter mode");
    let log = lab.gateway.log();
    assert!(log.contains("dropped privileges"), "{}", tail(&log, 40));

    // A real wireguard-go device is enrolled (by root's CLI, acting as the gateway's user) and served.
    let laptop = lab.add_client("acme", "laptop");
    let phone = lab.add_client("acme", "phone");
    wait_ping(&laptop.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway address");
    wait_ping(
        &laptop.ns,
        &phone.address().to_string(),
        TUNNEL_UP,
        "laptop -> phone",
    );
    // The audit store has the flow (written after the drop; read by root's CLI as the gateway's user).
    let phone_addr = phone.address().to_string();
    let flows = support::poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let r = lab.gateway.cli(&["audit", "flows"], &[]);
        (r.success() && r.stdout.contains(&phone_addr)).then_some(r)
    });
    assert!(flows.is_some(), "no audit record of laptop -> phone");

    // Everything the gateway created is its user's and private, although it started with umask 000.
    let state = lab.gateway.state_dir();
    let mut all = vec![state.clone(), lab.dir().join("gateway.key")];
    files_under(&state, &mut all);
    assert!(
        all.iter().any(|p| p.ends_with("audit.db")),
        "no audit store in {all:?}"
    );
    for p in &all {
        let m = std::fs::symlink_metadata(p).unwrap();
        let mode = m.permissions().mode() & 0o777;
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(
            mode,
            want,
            "{} is {mode:o}, want {want:o} (umask 000 at start)",
            p.display()
        );
        assert_eq!(
            m.uid().to_string(),
            uid,
            "{} is not owned by the gateway's user",
            p.display()
        );
    }
}

#[test]
fn cannot_read_a_file_outside_its_allowed_paths() {
    let lab = dropped_lab();
    // World-readable, in a world-searchable directory: only Landlock stands between the gateway and it.
    let outside = support::tempdir(&format!("privilege-outside-{}", std::process::id()));
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "not the gateway's\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (uid, gid) = (nobody().uid.to_string(), nobody().gid.to_string());
    let as_nobody = std::process::Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "cat"])
        .arg(&secret)
        .output()
        .unwrap();
    assert!(
        as_nobody.status.success(),
        "control: {USER} outside the sandbox reads the file: {as_nobody:?}"
    );

    // Positive controls: the same request reads what the gateway may read.
    let (ok, msg) = read_file(&lab, &lab.gateway.config);
    assert!(ok, "reading the config from inside the gateway: {msg}");
    let (ok, msg) = read_file(&lab, &lab.gateway.state_dir().join("devices.json"));
    let (ok2, msg2) = read_file(&lab, &lab.gateway.state_dir().join("audit.db"));
    assert!(
        ok || ok2,
        "reading from state_dir inside the gateway: {msg} / {msg2}"
    );

    for path in [secret.as_path(), Path::new("/etc/passwd")] {
        let (ok, msg) = read_file(&lab, path);
        assert!(
            !ok,
            "the gateway read {} outside its allowed paths",
            path.display()
        );
        assert!(
            msg.contains("Permission denied"),
            "{}: {msg}",
            path.display()
        );
    }
}

#[test]
fn a_forbidden_system_call_ends_the_gateway_with_a_logged_violation() {
    let mut lab = dropped_lab();
    // Control: the gateway is alive and answers control requests before.
    let (ok, msg) = read_file(&lab, &lab.gateway.config);
    assert!(ok, "{msg}");

    let reply = control(&lab, serde_json::json!({"op": "debug_forbidden_syscall"}));
    let status = lab
        .gateway
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the gateway survived a forbidden system call (reply {reply:?}); log:\n{}",
                tail(&lab.gateway.log(), 40)
            )
        });
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "exit status {status:?}; log:\n{}",
        tail(&lab.gateway.log(), 40)
    );
    let log = lab.gateway.log();
    let line = format!(
        "rampart: seccomp violation: system call {} is not on the gateway's allowlist",
        libc::SYS_personality
    );
    assert!(log.contains(&line), "no `{line}` in:\n{}", tail(&log, 40));
}

/// The layer-4 path under the drop: the namespace helper is forked and re-executed by the unprivileged,
/// sandboxed gateway (its own uid mapped to root only inside its namespace), carries off-ramp traffic, and is
/// restarted by the unprivileged supervisor after it is killed. This container's `/dev/net/tun` is 0600, so
/// the gateway gets a 0666 node of its own (the kernel's default mode, what the appliance has).
#[test]
fn the_namespace_helper_runs_unprivileged_and_sandboxed_and_is_restarted() {
    const UPSTREAM: &str = "198.18.1.2";
    let mut t = TenantSpec::new("acme", "100.96.1.0/24", GW_ADDR);
    t.rules = "offramp = [\"198.18.1.0/24\"]\n[[tenant.rule]]\nid = \"all\"\naction = \"allow\"\n"
        .to_string();
    let mut lab = Lab::with_setup(
        &[t],
        &format!(
            "{}:{}",
            support::gateway::UNDERLAY_ADDR,
            support::gateway::PORT
        ),
        &format!("user = \"{USER}\"\n"),
        support::lab::private_tun,
    );
    let host = lab.add_host("up");
    assert_eq!(host.underlay.to_string(), UPSTREAM);
    let www = lab.dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "through the off-ramp\n").unwrap();
    let mut cmd = host.ns.exec("python3");
    cmd.args(["-m", "http.server", "--bind", UPSTREAM, "80", "--directory"])
        .arg(&www);
    let mut server = support::process::Proc::spawn("http-server", cmd, lab.dir());
    let dev = lab.add_client("acme", "laptop");
    wait_ping(&dev.ns, GW_ADDR, TUNNEL_UP, "laptop -> gateway");
    let url = format!("http://{UPSTREAM}/hello.txt");
    let fetch = |what: &str| {
        support::wait_until(
            what,
            Duration::from_secs(60),
            Duration::from_millis(500),
            || {
                let r = dev.ns.run(
                    "curl",
                    &["-sS", "--fail", "--max-time", "5", &url],
                    Duration::from_secs(10),
                );
                r.stdout.contains("through the off-ramp").then_some(())
            },
        );
    };
    fetch("a page through the off-ramp after the drop");

    let uid = nobody().uid.as_raw().to_string();
    let (old, _) = support::wait_until(
        "the namespace helper",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || lab.gateway.helper_pid(),
    );
    let uids = proc_status(old, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == uid),
        "helper uids: {uids}"
    );
    assert_eq!(proc_status(old, "NoNewPrivs"), "1");
    assert_eq!(proc_status(old, "Seccomp"), "2");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    support::wait_until(
        "a new namespace helper",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || lab.gateway.helper_pid().filter(|p| *p != old),
    );
    fetch("a page through the restarted namespace");
    lab.gateway.assert_alive();
    server.stop(Duration::from_secs(5));
}
