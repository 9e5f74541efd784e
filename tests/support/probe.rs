//! Traffic through the tunnels, as a user would produce it: `ping`, TCP transfers with sha256
//! on both ends, identity probes, UDP datagrams, and hostile input (the python3 tools in
//! `tests/tools/`, standard library only).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::netns::Netns;
use super::process::{poll_until, run, Proc};

pub const NETPROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/netprobe.py");
pub const HSFLOOD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/hsflood.py");

#[derive(Debug, Clone)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
    pub output: String,
}

/// Parses the summary line of iputils `ping`.
pub fn parse_ping(output: &str) -> PingStats {
    let mut st = PingStats {
        transmitted: 0,
        received: 0,
        output: output.to_string(),
    };
    if let Some(line) = output.lines().find(|l| l.contains("packets transmitted")) {
        for part in line.split(',') {
            let mut words = part.split_whitespace();
            let n = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            match words.next() {
                Some("packets") => st.transmitted = n,
                Some("received") => st.received = n,
                _ => {}
            }
        }
    }
    st
}

fn ping_args(count: u32, interval: f64, wait_s: u32, src: Option<&str>, dst: &str) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-n".into(),
        "-q".into(),
        "-c".into(),
        count.to_string(),
        "-i".into(),
        format!("{interval}"),
        "-W".into(),
        wait_s.to_string(),
    ];
    if let Some(s) = src {
        a.push("-I".into());
        a.push(s.into());
    }
    a.push(dst.into());
    a
}

/// `ping -c COUNT -i INTERVAL -W WAIT [-I SRC] DST` inside `ns`. Panics unless every echo request
/// was actually sent (a ping that never left proves nothing, least of all a "denied").
pub fn ping(
    ns: &Netns,
    dst: &str,
    count: u32,
    interval: f64,
    wait_s: u32,
    src: Option<&str>,
) -> PingStats {
    let timeout = Duration::from_secs_f64(count as f64 * interval + wait_s as f64 + 10.0);
    let r = run(
        ns.exec("ping")
            .args(ping_args(count, interval, wait_s, src, dst)),
        timeout,
    );
    let st = parse_ping(&r.stdout);
    assert_eq!(
        st.transmitted, count,
        "ping {dst} sent {} of {count} echo requests: {r}",
        st.transmitted
    );
    st
}

/// One echo request, waiting up to 1 s for the reply.
pub fn ping_once(ns: &Netns, dst: &str) -> bool {
    ping(ns, dst, 1, 1.0, 1, None).received == 1
}

/// Pings until a reply arrives; returns how long that took, or `None` at `timeout`.
pub fn ping_within(ns: &Netns, dst: &str, timeout: Duration) -> Option<Duration> {
    poll_until(timeout, Duration::from_millis(100), || {
        ping_once(ns, dst).then_some(())
    })
    .map(|(_, d)| d)
}

/// Like `ping_within` but panics naming `what`.
pub fn wait_ping(ns: &Netns, dst: &str, timeout: Duration, what: &str) -> Duration {
    ping_within(ns, dst, timeout)
        .unwrap_or_else(|| panic!("{what}: no echo reply from {dst} within {timeout:?}"))
}

/// A `ping` running in the background (e.g. during a flood); `finish` parses its summary.
pub fn spawn_ping(
    ns: &Netns,
    dir: &Path,
    name: &str,
    dst: &str,
    count: u32,
    interval: f64,
) -> Proc {
    let mut cmd = ns.exec("ping");
    cmd.args(ping_args(count, interval, 2, None, dst));
    Proc::spawn(name, cmd, dir)
}

/// Waits for a background ping and returns its statistics (loss is not an error here, but every
/// echo request must have been sent).
pub fn finish_ping(p: &mut Proc, count: u32, timeout: Duration) -> PingStats {
    if p.wait_timeout(timeout).is_none() {
        p.kill();
        panic!("ping {} did not finish within {timeout:?}", p.name());
    }
    let st = parse_ping(&p.stdout());
    assert_eq!(
        st.transmitted,
        count,
        "ping {} sent {} of {count} echo requests:\n{}\n{}",
        p.name(),
        st.transmitted,
        st.output,
        p.log()
    );
    st
}

fn python(ns: &Netns, script: &str) -> Command {
    let mut c = ns.exec("python3");
    c.arg(script);
    c
}

/// What one end of a TCP exchange sent and received, hashed on that end.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeEnd {
    pub sent: u64,
    pub sent_sha256: String,
    pub recv: u64,
    pub recv_sha256: String,
}

fn parse_exchange(out: &str, who: &str) -> ExchangeEnd {
    let line = out.lines().last().unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{who}: no JSON result ({e}): {out:?}"));
    let errors = &v["errors"];
    assert!(
        errors.as_array().is_none_or(|a| a.is_empty()),
        "{who} reported errors: {errors}"
    );
    ExchangeEnd {
        sent: v["sent"].as_u64().unwrap(),
        sent_sha256: v["sent_sha256"].as_str().unwrap().to_string(),
        recv: v["recv"].as_u64().unwrap(),
        recv_sha256: v["recv_sha256"].as_str().unwrap().to_string(),
    }
}

/// Starts the receiving end of a full-duplex TCP exchange (returns once it listens).
pub fn exchange_server(ns: &Netns, dir: &Path, bind: &str, port: u16, bytes: u64) -> Proc {
    let mut cmd = python(ns, NETPROBE);
    cmd.args([
        "exchange",
        "serve",
        "--bind",
        bind,
        "--port",
        &port.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--timeout",
        "120",
    ]);
    let mut p = Proc::spawn("exchange-server", cmd, dir);
    p.wait_stdout("LISTENING", Duration::from_secs(30));
    p
}

/// The connecting end of an exchange, in the background; `exchange_end` reads its result.
pub fn spawn_exchange_client(
    client_ns: &Netns,
    dir: &Path,
    addr: &str,
    port: u16,
    bytes: u64,
) -> Proc {
    let mut cmd = python(client_ns, NETPROBE);
    cmd.args([
        "exchange",
        "connect",
        "--addr",
        addr,
        "--port",
        &port.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--timeout",
        "30",
    ]);
    Proc::spawn("exchange-client", cmd, dir)
}

/// One end's result of an exchange (panics if that end reported errors).
pub fn exchange_end(out: &str, who: &str) -> ExchangeEnd {
    parse_exchange(out, who)
}

/// Runs the connecting end to completion and returns both ends' view (client, server).
pub fn exchange(
    client_ns: &Netns,
    dir: &Path,
    server: &mut Proc,
    addr: &str,
    port: u16,
    bytes: u64,
    timeout: Duration,
) -> (ExchangeEnd, ExchangeEnd) {
    let mut cmd = python(client_ns, NETPROBE);
    cmd.args([
        "exchange",
        "connect",
        "--addr",
        addr,
        "--port",
        &port.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--timeout",
        "30",
    ]);
    let mut c = Proc::spawn("exchange-client", cmd, dir);
    let c_out = c.finish(timeout);
    let s_out = server.finish(Duration::from_secs(30));
    (
        parse_exchange(&c_out, "exchange client"),
        parse_exchange(&s_out, "exchange server"),
    )
}

/// Starts an identity server: every TCP connection gets `name` back; the identities that
/// connected are appended to `<dir>/<proc name>.idlog`. Returns once it listens.
pub fn ident_server(
    ns: &Netns,
    dir: &Path,
    proc_name: &str,
    bind: &str,
    port: u16,
    name: &str,
) -> Proc {
    let log = dir.join(format!("{proc_name}.idlog"));
    std::fs::write(&log, "").unwrap();
    let mut cmd = python(ns, NETPROBE);
    cmd.args([
        "ident",
        "serve",
        "--bind",
        bind,
        "--port",
        &port.to_string(),
        "--name",
        name,
        "--log",
    ])
    .arg(&log);
    let mut p = Proc::spawn(proc_name, cmd, dir);
    p.wait_stdout("LISTENING", Duration::from_secs(30));
    p
}

/// The identities an identity server has seen, one line each ("from=<me> peer=<ip>").
pub fn ident_log(dir: &Path, proc_name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{proc_name}.idlog"))).unwrap_or_default()
}

/// Connects once to an identity server; `Ok(its name)` or `Err(why)`.
pub fn ident_probe(ns: &Netns, addr: &str, port: u16, me: &str) -> Result<String, String> {
    let r = run(
        python(ns, NETPROBE).args([
            "ident",
            "probe",
            "--addr",
            addr,
            "--port",
            &port.to_string(),
            "--me",
            me,
            "--timeout",
            "3",
        ]),
        Duration::from_secs(15),
    );
    if r.success() {
        Ok(r.stdout.trim().to_string())
    } else {
        Err(r.stderr.trim().to_string())
    }
}

/// Starts a UDP receiver logging "SRC_IP PAYLOAD" lines to `<dir>/<proc name>.udplog`.
pub fn udp_receiver(ns: &Netns, dir: &Path, proc_name: &str, bind: &str, port: u16) -> Proc {
    let log = dir.join(format!("{proc_name}.udplog"));
    std::fs::write(&log, "").unwrap();
    let mut cmd = python(ns, NETPROBE);
    cmd.args([
        "udp",
        "recv",
        "--bind",
        bind,
        "--port",
        &port.to_string(),
        "--log",
    ])
    .arg(&log);
    let mut p = Proc::spawn(proc_name, cmd, dir);
    p.wait_stdout("LISTENING", Duration::from_secs(30));
    p
}

pub fn udp_log(dir: &Path, proc_name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{proc_name}.udplog"))).unwrap_or_default()
}

/// Sends `count` datagrams "PAYLOAD i" from `src` (an address of the namespace) to ADDR:PORT.
pub fn udp_send(ns: &Netns, src: &str, addr: &str, port: u16, count: u32, payload: &str) {
    run(
        python(ns, NETPROBE).args([
            "udp",
            "send",
            "--src",
            src,
            "--addr",
            addr,
            "--port",
            &port.to_string(),
            "--count",
            &count.to_string(),
            "--payload",
            payload,
        ]),
        Duration::from_secs(30),
    )
    .expect_ok();
}

/// Runs `hsflood.py MODE` against the gateway from `ns`; returns its JSON summary.
pub fn hsflood(
    ns: &Netns,
    dir: &Path,
    mode: &str,
    target: &str,
    gateway_public_key: &str,
    extra: &[&str],
) -> Proc {
    let mut cmd = python(ns, HSFLOOD);
    cmd.args([mode, "--target", target, "--pubkey", gateway_public_key])
        .args(extra);
    Proc::spawn(&format!("hsflood-{mode}"), cmd, dir)
}

pub fn parse_json_line(out: &str) -> serde_json::Value {
    let line = out.lines().last().unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {out:?}"))
}

#[test]
fn parses_ping_summary() {
    let s = parse_ping(
        "PING 100.96.0.1 (100.96.0.1) 56(84) bytes of data.\n\n--- 100.96.0.1 ping statistics ---\n\
         5 packets transmitted, 4 received, 20% packet loss, time 803ms\n",
    );
    assert_eq!((s.transmitted, s.received), (5, 4));
    let s =
        parse_ping("3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2ms\n");
    assert_eq!((s.transmitted, s.received), (3, 0));
}
