//! End-to-end acceptance of issue 15: devices enroll themselves with a token over HTTPS, with real
//! wireguard-go devices in namespaces, the real `rampart run` (listener on 198.18.0.1:8443, self-signed
//! certificate minted on first start), `curl --pinnedpubkey` and `rampart enroll`.
//!
//! Run: `cargo test --test e2e_enroll -- --test-threads=1` (root).

#[allow(unused_imports)]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::gateway::BIN;
use support::lab::Host;
use support::netns::Netns;
use support::probe::{ident_probe, ident_server, ping, ping_once};
use support::process::{run, Ran};
use support::wg_client::{ClientConfig, WgClient};
use support::{wait_ping, wait_until, Lab, TenantSpec};

const LISTEN: &str = "198.18.0.1:8443";
const TUNNEL_UP: Duration = Duration::from_secs(30);
const SLOW_TLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/slow_tls.py");
/// The first underlay link of a lab is 198.18.1.0/24, the second 198.18.2.0/24: the off-ramp hosts are added
/// first, so they live there.
const UPSTREAM: &str = "198.18.1.2";
const UPSTREAM2: &str = "198.18.2.2";
const IDENT_PORT: u16 = 7001;

fn tenant(id: &str, pool: &str, gw: &str, offramp: &[&str]) -> TenantSpec {
    let mut t = TenantSpec::new(id, pool, gw);
    if !offramp.is_empty() {
        let nets: Vec<String> = offramp.iter().map(|n| format!("\"{n}\"")).collect();
        t.rules = format!("offramp = [{}]\n{}", nets.join(", "), t.rules);
    }
    t
}

/// A token as `rampart token create --json` printed it.
struct Token {
    token: String,
    id: String,
    url: String,
    url_with_token: String,
    pin: String,
    curl_pin: String,
}

fn mint(lab: &Lab, tenant: &str, args: &[&str]) -> Token {
    let mut a = vec!["--tenant", tenant, "--json"];
    a.extend_from_slice(args);
    let out = lab.gateway.cli(&["token", "create"], &a).expect_ok();
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("token create --json is not JSON ({e}): {out}"));
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("no {k} in {v}"))
            .to_string()
    };
    let t = Token {
        token: s("token"),
        id: s("id"),
        url: s("url"),
        url_with_token: s("url_with_token"),
        pin: s("pin"),
        curl_pin: s("curl_pin"),
    };
    assert!(
        t.token.starts_with(&format!("rpe1_{}_", t.id)),
        "{}",
        t.token
    );
    assert!(
        !t.url.contains("t="),
        "the plain URL must not carry the token: {}",
        t.url
    );
    t
}

fn token_row(lab: &Lab, id: &str) -> serde_json::Value {
    let out = lab.gateway.cli(&["token", "list"], &["--json"]).expect_ok();
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("token {id} not listed:\n{out}"))
}

fn devices(lab: &Lab) -> Vec<serde_json::Value> {
    lab.gateway
        .device_list_json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn device<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|d| d["name"] == name)
}

fn audit_events(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lab
        .gateway
        .cli(&["audit", "enroll"], &["--json"])
        .expect_ok();
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Records of `kind` committed to the audit store (the CLI's own wait in the spool until the gateway takes
/// them, within seconds).
fn count(events: &[serde_json::Value], kind: &str) -> usize {
    events
        .iter()
        .filter(|e| e["event"] == kind && e["spooled"] == false)
        .count()
}

/// Waits until the audit store has at least `n` committed records of each kind (the watcher moves the CLI's
/// records from the spool every 2 s), and returns them all.
fn wait_audit(lab: &Lab, wanted: &[(&str, usize)]) -> Vec<serde_json::Value> {
    let mut last = Vec::new();
    let got = support::poll_until(Duration::from_secs(20), Duration::from_millis(500), || {
        last = audit_events(lab);
        wanted
            .iter()
            .all(|(k, n)| count(&last, k) >= *n)
            .then_some(())
    });
    assert!(
        got.is_some(),
        "audit records missing: wanted {wanted:?} in {last:#?}"
    );
    last
}

/// An HTTPS answer as curl saw it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self:?}"))
    }
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// `curl` to the enrollment listener from `ns`, the certificate pinned by its SPKI (as the README shows).
fn https(
    ns: &Netns,
    pin: &str,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&str>,
) -> Answer {
    let url = format!("https://{LISTEN}{path}");
    let mut args: Vec<String> = [
        "-sS",
        "-i",
        "-k",
        "--max-time",
        "40",
        "--pinnedpubkey",
        pin,
        "-X",
        method,
        &url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for h in headers {
        args.push("-H".into());
        args.push(h.to_string());
    }
    if let Some(b) = body {
        args.extend([
            "-H".into(),
            "content-type: application/json".into(),
            "--data-binary".into(),
            b.into(),
        ]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = ns.run("curl", &argv, Duration::from_secs(60));
    assert!(r.success(), "curl failed: {r}");
    let text = r.stdout.replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    Answer {
        status,
        headers: head.to_string(),
        body: body.to_string(),
    }
}

fn enroll_body(token: &str, key: &str, name: &str) -> String {
    serde_json::json!({"token": token, "public_key": key, "name": name}).to_string()
}

fn pubkey() -> String {
    let r = run(
        Command::new("sh").args(["-c", "wg genkey | wg pubkey"]),
        Duration::from_secs(10),
    );
    r.expect_ok().trim().to_string()
}

/// The stock-tools path of README.md, verbatim but for the pin, the address and the paths.
fn stock_enroll(ns: &Netns, pin: &str, token_file: &Path, out: &Path) -> Ran {
    let script = format!(
        r#"umask 077; k=$(wg genkey)
{{ printf '[Interface]\nPrivateKey = %s\n' "$k"
  curl -fsS -k --pinnedpubkey '{pin}' https://{LISTEN}/v1/enroll -H 'accept: text/x-wg-quick' \
       -d "{{\"token\":\"$(cat {token})\",\"public_key\":\"$(printf %s "$k" | wg pubkey)\",\"name\":\"$(hostname)\"}}"
}} > {out}"#,
        token = token_file.display(),
        out = out.display()
    );
    ns.run("sh", &["-c", &script], Duration::from_secs(60))
}

/// `rampart enroll ARGS` inside `ns`.
fn rampart_enroll(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut c = ns.exec(BIN);
    c.arg("enroll").args(args).env("RAMPART_LOG", "warn");
    c.env_remove("RAMPART_ENROLL_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c, Duration::from_secs(90))
}

/// Parses a config file written by enrollment and checks what every such file must be.
fn config_file(path: &Path) -> ClientConfig {
    use std::os::unix::fs::PermissionsExt as _;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
    // wg-quick itself accepts it (and the harness applies it the way wg-quick does).
    let strip = run(
        Command::new("wg-quick").arg("strip").arg(path),
        Duration::from_secs(10),
    );
    assert!(
        strip.success(),
        "wg-quick rejects {}: {strip}\n{text}",
        path.display()
    );
    ClientConfig::parse(&text).unwrap_or_else(|e| panic!("unusable config ({e}):\n{text}"))
}

/// The value of a `# rampart-...` comment line.
fn meta(path: &Path, key: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.strip_prefix('#')?.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// Every secret handed out in this test, to check none reached the gateway's log (which does name tokens by
/// their id: the control that the log covers enrollments at all).
fn assert_no_secret_logged(lab: &Lab, secrets: &[&str]) {
    let log = lab.gateway.log();
    let id = &secrets[0][5..21];
    assert!(log.contains(id), "the gateway log never names token {id}");
    for s in secrets {
        let secret = &s[s.len() - 43..];
        assert!(
            !log.contains(secret),
            "a token secret is in the gateway log"
        );
    }
}

fn ident(host: &Host, dir: &Path, name: &str, addr: &str) -> support::process::Proc {
    ident_server(&host.ns, dir, name, addr, IDENT_PORT, name)
}

fn tunnel_name(c: &WgClient) -> String {
    c.ifname.clone()
}

#[test]
fn stock_tools_and_rampart_enroll_give_tunnels_that_refresh_rotate_approve_expire_and_revoke() {
    let mut lab = Lab::with_settings(
        &[
            tenant("acme", "100.96.0.0/24", "100.96.0.1", &["198.18.1.0/24"]),
            tenant("globex", "100.97.0.0/24", "100.97.0.1", &["198.18.1.0/24"]),
        ],
        &format!("enroll_listen = \"{LISTEN}\"\n"),
    );
    let dir = lab.dir().to_path_buf();
    let up = lab.add_host("up");
    let up2 = lab.add_host("up2");
    assert_eq!(
        (
            up.underlay.to_string().as_str(),
            up2.underlay.to_string().as_str()
        ),
        (UPSTREAM, UPSTREAM2)
    );
    let _id1 = ident(&up, &dir, "upstream", UPSTREAM);
    let _id2 = ident(&up2, &dir, "upstream2", UPSTREAM2);

    // Two tenants enroll at the same moment: acme with stock tools, globex with `rampart enroll`.
    let acme_t = mint(&lab, "acme", &["--groups", "eng"]);
    let globex_t = mint(&lab, "globex", &[]);
    let stock_ns = lab.device_ns("stock");
    let tool_ns = lab.device_ns("tool");
    let (acme_tok, globex_tok) = (dir.join("acme.token"), dir.join("globex.token"));
    std::fs::write(&acme_tok, &acme_t.token).unwrap();
    std::fs::write(&globex_tok, &globex_t.token).unwrap();
    let (stock_conf, tool_conf) = (
        dir.join("stock.conf"),
        dir.join("tool").join("rampart.conf"),
    );
    let (stock_run, tool_run) = std::thread::scope(|s| {
        let a = s.spawn(|| stock_enroll(&stock_ns.ns, &acme_t.curl_pin, &acme_tok, &stock_conf));
        let b = s.spawn(|| {
            rampart_enroll(
                &tool_ns.ns,
                &[
                    &globex_t.url,
                    "--out",
                    tool_conf.to_str().unwrap(),
                    "--name",
                    "tool",
                ],
                &[("RAMPART_ENROLL_TOKEN", &globex_t.token)],
            )
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(stock_run.success(), "stock-tools enrollment: {stock_run}");
    assert!(tool_run.success(), "rampart enroll: {tool_run}");
    assert!(
        !tool_run.stderr.contains("warning"),
        "no token in argv, no warning: {tool_run}"
    );
    let stock_cfg = config_file(&stock_conf);
    let tool_cfg = config_file(&tool_conf);
    assert!(
        stock_cfg.address().to_string().starts_with("100.96.0."),
        "{}",
        stock_cfg.text
    );
    assert!(
        tool_cfg.address().to_string().starts_with("100.97.0."),
        "{}",
        tool_cfg.text
    );
    for c in [&stock_cfg, &tool_cfg] {
        assert!(
            c.allowed_ips.iter().any(|n| n == "198.18.1.0/24"),
            "off-ramp routed:\n{}",
            c.text
        );
    }
    let list = devices(&lab);
    let stock_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        device(&list, &stock_name).unwrap()["tenant"],
        "acme",
        "{list:?}"
    );
    assert_eq!(device(&list, &stock_name).unwrap()["groups"][0], "eng");
    assert_eq!(
        device(&list, "tool").unwrap()["tenant"],
        "globex",
        "{list:?}"
    );

    let stock = lab.start_device(stock_ns, "acme", &stock_name, stock_cfg);
    let tool = lab.start_device(tool_ns, "globex", "tool", tool_cfg);
    wait_ping(
        &stock.ns,
        "100.96.0.1",
        TUNNEL_UP,
        "stock-tools device -> acme gateway",
    );
    wait_ping(
        &tool.ns,
        "100.97.0.1",
        TUNNEL_UP,
        "rampart-enrolled device -> globex gateway",
    );
    assert_eq!(
        ident_probe(&stock.ns, UPSTREAM, IDENT_PORT, "stock"),
        Ok("upstream".into())
    );
    assert_eq!(
        ident_probe(&tool.ns, UPSTREAM, IDENT_PORT, "tool"),
        Ok("upstream".into())
    );
    // Proven by their first handshake (the watcher looks every 2 s).
    wait_until(
        "both devices to be proven",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let l = devices(&lab);
            (device(&l, &stock_name)?["proven"] == true && device(&l, "tool")?["proven"] == true)
                .then_some(())
        },
    );

    // --refresh after an off-ramp change: the new network appears in AllowedIPs and, applied, is reached.
    assert!(
        ident_probe(&tool.ns, UPSTREAM2, IDENT_PORT, "tool").is_err(),
        "not routed yet"
    );
    let unchanged = rampart_enroll(
        &tool.ns,
        &["--refresh", "--out", tool_conf.to_str().unwrap()],
        &[],
    );
    assert!(
        unchanged.success() && unchanged.stderr.contains("up to date"),
        "{unchanged}"
    );
    let text = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let (old, new) = (
        "offramp = [\"198.18.1.0/24\"]",
        "offramp = [\"198.18.1.0/24\", \"198.18.2.0/24\"]",
    );
    let i = text.find("id = \"globex\"").unwrap();
    let j = i + text[i..].find(old).unwrap();
    let new_text = format!("{}{new}{}", &text[..j], &text[j + old.len()..]);
    std::fs::write(&lab.gateway.config, new_text).unwrap();
    lab.gateway.cli(&["reload"], &[]).expect_ok();
    let refreshed = rampart_enroll(
        &tool.ns,
        &["--refresh", "--out", tool_conf.to_str().unwrap()],
        &[],
    );
    assert!(
        refreshed.success() && refreshed.stderr.contains("updated"),
        "{refreshed}"
    );
    let after = config_file(&tool_conf);
    assert_eq!(
        after.allowed_ips,
        ["100.97.0.0/24", "198.18.1.0/24", "198.18.2.0/24"],
        "{}",
        after.text
    );
    assert_eq!(
        after.private_key, tool.config.private_key,
        "refresh keeps the key"
    );
    let ifname = tunnel_name(&tool);
    tool.wg(&[
        "set",
        &ifname,
        "peer",
        &after.peer_public_key,
        "allowed-ips",
        &after.allowed_ips.join(","),
    ])
    .expect_ok();
    tool.ns
        .ip(&["route", "add", "198.18.2.0/24", "dev", &ifname]);
    assert_eq!(
        ident_probe(&tool.ns, UPSTREAM2, IDENT_PORT, "tool"),
        Ok("upstream2".into())
    );

    // Key rotation: same device and address, new key, tunnel up again with it.
    let id_before = meta(&tool_conf, "rampart-device-token").unwrap()[..21].to_string();
    let rotated = rampart_enroll(
        &tool.ns,
        &["--rotate", "--out", tool_conf.to_str().unwrap()],
        &[],
    );
    assert!(rotated.success(), "{rotated}");
    let after = config_file(&tool_conf);
    assert_ne!(after.private_key, tool.config.private_key);
    assert_eq!(after.addresses, tool.config.addresses);
    assert_eq!(
        meta(&tool_conf, "rampart-device-token").unwrap()[..21],
        id_before
    );
    let l = devices(&lab);
    let d = device(&l, "tool").unwrap();
    assert_eq!(d["address"], tool.address().to_string());
    assert_ne!(
        d["public_key"].as_str().unwrap(),
        pubkey_of(&tool.config.private_key)
    );
    let key_file = dir.join("tool.newkey");
    std::fs::write(&key_file, &after.private_key).unwrap();
    tool.wg(&["set", &ifname, "private-key", key_file.to_str().unwrap()])
        .expect_ok();
    wait_ping(
        &tool.ns,
        "100.97.0.1",
        TUNNEL_UP,
        "tool with its rotated key",
    );
    wait_until(
        "the rotated key to be proven",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || (device(&devices(&lab), "tool")?["proven"] == true).then_some(()),
    );

    // A pending device gets no traffic until an admin approves it.
    let pending_t = mint(&lab, "acme", &["--pending"]);
    let pend_ns = lab.device_ns("pend");
    let pend_conf = dir.join("pend.conf");
    let r = rampart_enroll(
        &pend_ns.ns,
        &[
            &pending_t.url,
            "--out",
            pend_conf.to_str().unwrap(),
            "--name",
            "pend",
        ],
        &[("RAMPART_ENROLL_TOKEN", &pending_t.token)],
    );
    assert!(r.success() && r.stderr.contains("approval"), "{r}");
    assert_eq!(device(&devices(&lab), "pend").unwrap()["state"], "pending");
    let pend = lab.start_device(pend_ns, "acme", "pend", config_file(&pend_conf));
    let st = ping(&pend.ns, "100.96.0.1", 4, 0.5, 2, None);
    assert_eq!(
        (st.transmitted, st.received),
        (4, 0),
        "a pending device got traffic: {}",
        st.output
    );
    let waiting = rampart_enroll(
        &pend.ns,
        &["--refresh", "--out", pend_conf.to_str().unwrap()],
        &[],
    );
    assert!(
        !waiting.success() && waiting.stderr.contains("pending_approval"),
        "{waiting}"
    );
    lab.gateway
        .cli(
            &["device", "approve"],
            &["--tenant", "acme", "--name", "pend"],
        )
        .expect_ok();
    wait_ping(
        &pend.ns,
        "100.96.0.1",
        TUNNEL_UP,
        "approved device -> gateway",
    );

    // Headless (MDM): /etc/rampart/enroll.toml-style settings; the first run enrolls, the next ones refresh, and
    // a reinstalled machine (config gone) with the same device_id gets the same device with its new key.
    let mdm_t = mint(&lab, "acme", &["--reusable", "--groups", "laptops"]);
    let mdm_dir = dir.join("mdm");
    std::fs::create_dir_all(&mdm_dir).unwrap();
    std::fs::write(mdm_dir.join("token"), &mdm_t.token).unwrap();
    let mdm_out = mdm_dir.join("rampart.conf");
    let settings = mdm_dir.join("enroll.toml");
    std::fs::write(
        &settings,
        format!(
            "url = \"rampart://{LISTEN}\"\npin = \"{}\"\ntoken_file = \"{}\"\ndevice_id = \"SN-0001\"\nname = \"mdm\"\nout = \"{}\"\n",
            mdm_t.pin,
            mdm_dir.join("token").display(),
            mdm_out.display()
        ),
    )
    .unwrap();
    let headless = || rampart_enroll(&pend.ns, &["--config", settings.to_str().unwrap()], &[]);
    let r = headless();
    assert!(
        r.success() && r.stderr.contains("enrolled device mdm"),
        "{r}"
    );
    let first = config_file(&mdm_out);
    let r = headless();
    assert!(r.success() && r.stderr.contains("up to date"), "{r}");
    std::fs::remove_file(&mdm_out).unwrap();
    let r = headless();
    assert!(
        r.success() && r.stderr.contains("enrolled device mdm"),
        "{r}"
    );
    let second = config_file(&mdm_out);
    assert_eq!(second.addresses, first.addresses, "the same device");
    assert_ne!(second.private_key, first.private_key);
    let l = devices(&lab);
    let mdm: Vec<_> = l
        .iter()
        .filter(|d| d["name"].as_str().unwrap().starts_with("mdm"))
        .collect();
    assert_eq!(mdm.len(), 1, "{mdm:?}");
    assert_eq!(
        mdm[0]["public_key"].as_str().unwrap(),
        pubkey_of(&second.private_key)
    );
    assert_eq!(mdm[0]["groups"][0], "laptops");

    // An ephemeral device is removed once it is not seen for its timeout.
    let eph_t = mint(&lab, "acme", &["--ephemeral", "6s"]);
    let eph_ns = lab.device_ns("eph");
    let eph_conf = dir.join("eph.conf");
    let r = rampart_enroll(
        &eph_ns.ns,
        &[
            &eph_t.url,
            "--out",
            eph_conf.to_str().unwrap(),
            "--name",
            "eph",
        ],
        &[("RAMPART_ENROLL_TOKEN", &eph_t.token)],
    );
    assert!(r.success(), "{r}");
    let mut eph = lab.start_device(eph_ns, "acme", "eph", config_file(&eph_conf));
    wait_ping(
        &eph.ns,
        "100.96.0.1",
        TUNNEL_UP,
        "ephemeral device -> gateway",
    );
    // Still there while it talks (keepalives and pings count as seen) ...
    for _ in 0..8 {
        assert!(ping_once(&eph.ns, "100.96.0.1"));
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        device(&devices(&lab), "eph").is_some(),
        "removed while active"
    );
    // ... and gone once it stops.
    eph.stop();
    wait_until(
        "the silent ephemeral device to be removed",
        Duration::from_secs(40),
        Duration::from_millis(500),
        || device(&devices(&lab), "eph").is_none().then_some(()),
    );

    // Revocation: the admin removes the stock-tools device; its tunnel stops within seconds, others keep theirs.
    lab.gateway
        .cli(
            &["device", "remove"],
            &["--tenant", "acme", "--name", &stock_name],
        )
        .expect_ok();
    let (_, t) = wait_until(
        "the revoked device's tunnel to stop",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (!ping_once(&stock.ns, "100.96.0.1")).then_some(()),
    );
    eprintln!("revoked device cut after {t:?}");
    let st = ping(&stock.ns, "100.96.0.1", 3, 0.5, 1, None);
    assert_eq!(
        st.received, 0,
        "revoked device still answered: {}",
        st.output
    );
    assert!(
        ping_once(&tool.ns, "100.97.0.1"),
        "the other tenant's device lost its tunnel"
    );
    assert!(
        ping_once(&pend.ns, "100.96.0.1"),
        "the other acme device lost its tunnel"
    );
    // The stock device's token from its reply no longer works.
    let stock_token = meta(&stock_conf, "rampart-device-token").unwrap();
    let a = https(
        &stock.ns,
        &acme_t.curl_pin,
        "GET",
        "/v1/devices/self",
        &[&format!("authorization: Bearer {stock_token}")],
        None,
    );
    assert_eq!(
        (a.status, a.error().as_str()),
        (401, "device_token_invalid"),
        "{a:?}"
    );

    wait_audit(
        &lab,
        &[
            ("token_created", 5),
            ("device_enrolled", 5),
            ("device_reenrolled", 1),
            ("device_proven", 4),
            ("device_refreshed", 3),
            ("device_key_rotated", 1),
            ("device_approved", 1),
            ("device_expired", 1),
            ("device_revoked", 1),
        ],
    );
    assert_no_secret_logged(
        &lab,
        &[
            &acme_t.token,
            &globex_t.token,
            &pending_t.token,
            &eph_t.token,
            &stock_token,
        ],
    );
    drop(pend);
    drop(tool);
    drop(stock);
}

fn pubkey_of(private: &str) -> String {
    let mut c = Command::new("wg");
    c.arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn slow(ns: &Netns, mode: &str) -> serde_json::Value {
    let (host, port) = LISTEN.split_once(':').unwrap();
    let r = ns.run(
        "python3",
        &[SLOW_TLS, host, port, mode],
        Duration::from_secs(120),
    );
    assert!(r.success(), "{r}");
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r}"))
}

#[test]
fn bad_tokens_and_abuse_each_get_a_clear_error_and_create_nothing() {
    let mut lab = Lab::with_settings(
        &[
            tenant("acme", "100.96.0.0/24", "100.96.0.1", &[]),
            tenant("tiny", "100.98.0.0/30", "100.98.0.1", &[]),
        ],
        &format!("enroll_listen = \"{LISTEN}\"\n[enroll]\nrate_per_minute = 6\nrate_burst = 14\n"),
    );
    let dir = lab.dir().to_path_buf();
    let client = lab.add_host("client");
    let pin = mint(&lab, "acme", &[]).curl_pin;
    let post = |ns: &Netns, body: &str| https(ns, &pin, "POST", "/v1/enroll", &[], Some(body));

    // Malformed: not a token, not JSON.
    let a = post(&client.ns, &enroll_body("rpe1_garbage", &pubkey(), "m"));
    assert_eq!(
        (a.status, a.error().as_str()),
        (401, "token_invalid"),
        "{a:?}"
    );
    let a = post(&client.ns, "{not json");
    assert_eq!(
        (a.status, a.error().as_str()),
        (400, "bad_request"),
        "{a:?}"
    );

    // Expired.
    let expired = mint(&lab, "acme", &["--expires", "1s"]);
    std::thread::sleep(Duration::from_secs(2));
    let a = post(&client.ns, &enroll_body(&expired.token, &pubkey(), "e"));
    assert_eq!(
        (a.status, a.error().as_str()),
        (410, "token_expired"),
        "{a:?}"
    );

    // Revoked.
    let revoked = mint(&lab, "acme", &[]);
    lab.gateway
        .cli(&["token", "revoke"], &[&revoked.id])
        .expect_ok();
    let a = post(&client.ns, &enroll_body(&revoked.token, &pubkey(), "r"));
    assert_eq!(
        (a.status, a.error().as_str()),
        (410, "token_revoked"),
        "{a:?}"
    );

    // Two enrollments race for the one use of a one-off token: exactly one wins, the other is used up.
    let race = mint(&lab, "acme", &[]);
    let r1 = lab.add_host("racer1");
    let r2 = lab.add_host("racer2");
    let (a1, a2) = std::thread::scope(|s| {
        let x = s.spawn(|| post(&r1.ns, &enroll_body(&race.token, &pubkey(), "racer")));
        let y = s.spawn(|| post(&r2.ns, &enroll_body(&race.token, &pubkey(), "racer")));
        (x.join().unwrap(), y.join().unwrap())
    });
    let mut statuses = [a1.status, a2.status];
    statuses.sort();
    assert_eq!(statuses, [201, 410], "{a1:?}\n{a2:?}");
    let loser = if a1.status == 410 { &a1 } else { &a2 };
    assert_eq!(loser.error(), "token_used_up");
    assert_eq!(token_row(&lab, &race.id)["used"], 1);
    let racers: Vec<_> = devices(&lab)
        .into_iter()
        .filter(|d| d["name"].as_str().unwrap().starts_with("racer"))
        .collect();
    assert_eq!(racers.len(), 1, "{racers:?}");
    // Used up, also for a later, unhurried attempt.
    let a = post(&client.ns, &enroll_body(&race.token, &pubkey(), "late"));
    assert_eq!(
        (a.status, a.error().as_str()),
        (410, "token_used_up"),
        "{a:?}"
    );

    // A wrong pin: `rampart enroll` refuses before sending anything (the token stays unused); curl too.
    let pinned = mint(&lab, "acme", &[]);
    let tok = dir.join("pinned.token");
    std::fs::write(&tok, &pinned.token).unwrap();
    let mut wrong = pinned.url.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    let out = dir.join("pinned.conf");
    let r = rampart_enroll(
        &client.ns,
        &[
            &wrong,
            "--token-file",
            tok.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !r.success() && r.stderr.contains("does not match the pin"),
        "{r}"
    );
    assert!(!out.exists(), "a config was written");
    assert_eq!(
        token_row(&lab, &pinned.id)["used"],
        0,
        "the token was sent past a wrong pin"
    );
    let bad_spki = format!("sha256//{}", "A".repeat(43) + "=");
    let c = client.ns.run(
        "curl",
        &[
            "-sS",
            "-k",
            "--pinnedpubkey",
            &bad_spki,
            "--max-time",
            "20",
            &format!("https://{LISTEN}/v1/enroll"),
            "-d",
            "{}",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        c.status.and_then(|s| s.code()),
        Some(90),
        "curl must refuse a wrong SPKI pin: {c}"
    );
    // The right pin (positive control): the same token enrolls, with a warning for the token in argv.
    let r = rampart_enroll(
        &client.ns,
        &[&pinned.url_with_token, "--out", out.to_str().unwrap()],
        &[],
    );
    assert!(r.success() && r.stderr.contains("warning"), "{r}");
    assert_eq!(token_row(&lab, &pinned.id)["used"], 1);

    // Oversized body: 413 (control: a body under the limit is read and judged).
    let big = enroll_body("rpe1_x", "k", &"a".repeat(5000));
    let a = post(&client.ns, &big);
    assert_eq!(
        (a.status, a.error().as_str()),
        (413, "body_too_large"),
        "{a:?}"
    );
    let fits = enroll_body("rpe1_x", "k", &"a".repeat(3000));
    let a = post(&client.ns, &fits);
    assert_eq!(
        (a.status, a.error().as_str()),
        (401, "token_invalid"),
        "{a:?}"
    );

    // Slow body: answered with 408 after the body timeout (control: the same request sent at once).
    let fast = slow(&client.ns, "fast");
    assert_eq!(fast["status"], 401, "{fast}");
    let s = slow(&client.ns, "body");
    assert_eq!(s["status"], 408, "{s}");
    assert!(s["body"].as_str().unwrap().contains("body_timeout"), "{s}");
    assert!(s["closed_after"].as_f64().unwrap() < 30.0, "{s}");
    // Slow headers: the connection is closed, not held.
    let h = slow(&client.ns, "headers");
    assert!(h["closed_after"].as_f64().unwrap() < 40.0, "{h}");

    // A full address pool: refused, and the token keeps its use (tiny's /30 holds one device).
    let tiny = mint(&lab, "tiny", &["--uses", "2"]);
    let a = post(&client.ns, &enroll_body(&tiny.token, &pubkey(), "t1"));
    assert_eq!(a.status, 201, "{a:?}");
    let a = post(&client.ns, &enroll_body(&tiny.token, &pubkey(), "t2"));
    assert_eq!(
        (a.status, a.error().as_str()),
        (503, "address_pool_full"),
        "{a:?}"
    );
    assert_eq!(token_row(&lab, &tiny.id)["used"], 1);

    // A burst of wrong secrets for one token locks it, even for its right secret (429 + Retry-After); the
    // source is then rate limited; another source with another token still enrolls.
    let attacker = lab.add_host("attacker");
    let target = mint(&lab, "acme", &[]);
    // Same id, another (well-formed) secret.
    let forged = format!("{}{}", &target.token[..22], "A".repeat(43));
    assert_ne!(forged, target.token);
    for i in 0..5 {
        let a = post(&attacker.ns, &enroll_body(&forged, &pubkey(), "x"));
        assert_eq!(
            (a.status, a.error().as_str()),
            (401, "token_invalid"),
            "attempt {i}: {a:?}"
        );
    }
    let a = post(&attacker.ns, &enroll_body(&target.token, &pubkey(), "x"));
    assert_eq!(
        (a.status, a.error().as_str()),
        (429, "token_locked"),
        "{a:?}"
    );
    let wait: u64 = a
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(wait > 60, "lockout of {wait}s");
    assert_eq!(token_row(&lab, &target.id)["state"], "locked");
    let limited = (0..40).find_map(|_| {
        let a = post(&attacker.ns, &enroll_body("rpe1_flood", "k", "x"));
        (a.status == 429).then_some(a)
    });
    let limited = limited.expect("no 429 from the per-source rate limit after 40 requests");
    assert_eq!(limited.error(), "rate_limited");
    assert!(limited.header("retry-after").is_some(), "{limited:?}");
    let other = mint(&lab, "acme", &[]);
    let a = post(
        &client.ns,
        &enroll_body(&other.token, &pubkey(), "after-flood"),
    );
    assert_eq!(a.status, 201, "another source is not limited: {a:?}");

    // Nothing half-created: exactly the devices that succeeded.
    let mut names: Vec<String> = devices(&lab)
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut expected = vec!["racer".to_string(), "t1".into(), "after-flood".into()];
    expected.push(
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
            .to_string(),
    );
    expected.sort();
    assert_eq!(names, expected);
    let ev = wait_audit(&lab, &[("enroll_refused", 10), ("token_revoked", 1)]);
    for code in [
        "token_invalid",
        "token_expired",
        "token_revoked",
        "token_used_up",
        "address_pool_full",
        "token_locked",
    ] {
        assert!(
            ev.iter()
                .any(|e| e["event"] == "enroll_refused" && e["detail"]["error"] == code),
            "no enroll_refused record with {code}"
        );
    }
    assert_eq!(count(&ev, "token_locked"), 1);
    assert_no_secret_logged(
        &lab,
        &[
            &race.token,
            &expired.token,
            &revoked.token,
            &pinned.token,
            &tiny.token,
            &target.token,
            &other.token,
        ],
    );
}
