//! A device that misbehaves on purpose, and servers that make leaks visible: wrappers around
//! `tests/tools/rawtcp.py` (raw IPv4/IPv6 TCP/UDP through a device's WireGuard interface) and
//! `tests/tools/marker.py` (servers and clients whose bytes carry recognisable markers, with JSON
//! logs of what they accepted, received and how their connections ended).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::netns::Netns;
use super::process::{run, Proc, Ran};
use super::wg_client::WgClient;

pub const RAWTCP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/rawtcp.py");
pub const MARKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/marker.py");

/// `rawtcp.py MODE --iface <wg> --src <device address> ARGS...` as a command in the device's
/// namespace (`src` picks the address family: the device's IPv4 or IPv6 tunnel address).
pub fn rawtcp_cmd(dev: &WgClient, mode: &str, src: &str, args: &[&str]) -> Command {
    let mut c = dev.exec("python3");
    c.args([RAWTCP, mode, "--iface", &dev.ifname, "--src", src])
        .args(args);
    c
}

/// Runs a rawtcp mode to completion and returns its JSON summary (panics if it fails).
pub fn rawtcp(dev: &WgClient, mode: &str, src: &str, args: &[&str], timeout: Duration) -> Value {
    let r = run(&mut rawtcp_cmd(dev, mode, src, args), timeout);
    json_summary(&r)
}

/// Starts a rawtcp mode in the background (e.g. a sniffer, or connections held open).
pub fn spawn_rawtcp(
    dev: &WgClient,
    dir: &Path,
    name: &str,
    mode: &str,
    src: &str,
    args: &[&str],
) -> Proc {
    Proc::spawn(name, rawtcp_cmd(dev, mode, src, args), dir)
}

/// A sniffer on the device's WireGuard interface counting received packets that carry each of
/// `markers`; returns once it listens. `finish_json` reads its summary.
pub fn sniff(dev: &WgClient, dir: &Path, name: &str, secs: u32, markers: &[&str]) -> Proc {
    let mut c = dev.exec("python3");
    c.args([
        RAWTCP,
        "sniff",
        "--iface",
        &dev.ifname,
        "--secs",
        &secs.to_string(),
    ]);
    for m in markers {
        c.args(["--marker", m]);
    }
    let mut p = Proc::spawn(name, c, dir);
    p.wait_stdout("LISTENING", Duration::from_secs(30));
    p
}

/// Waits for a self-terminating tool and parses the JSON line it printed last.
pub fn finish_json(p: &mut Proc, timeout: Duration) -> Value {
    let out = p.finish(timeout);
    parse_last_json(&out, p.name())
}

/// Stops a sniffer early (SIGTERM makes it print its summary and exit) and parses the summary.
pub fn stop_json(p: &mut Proc) -> Value {
    p.signal("TERM");
    finish_json(p, Duration::from_secs(30))
}

fn json_summary(r: &Ran) -> Value {
    assert!(r.success(), "{r}");
    parse_last_json(&r.stdout, &r.desc)
}

pub fn parse_last_json(out: &str, who: &str) -> Value {
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{who}: no JSON summary ({e}): {out:?}"))
}

/// Starts `marker.py MODE ARGS... --log <dir>/<name>.jsonl` in `ns` and waits until it listens.
pub fn marker_server(ns: &Netns, dir: &Path, name: &str, mode: &str, args: &[&str]) -> Proc {
    let log = dir.join(format!("{name}.jsonl"));
    std::fs::write(&log, "").unwrap();
    let mut c = ns.exec("python3");
    c.args([MARKER, mode]).args(args).arg("--log").arg(&log);
    let mut p = Proc::spawn(name, c, dir);
    p.wait_stdout("LISTENING", Duration::from_secs(30));
    p
}

/// The events a marker server logged so far.
pub fn marker_log(dir: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(dir.join(format!("{name}.jsonl")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Events of one kind ("accept", "recv", "closed", "request") in a marker server's log.
pub fn marker_events(dir: &Path, name: &str, event: &str) -> Vec<Value> {
    marker_log(dir, name)
        .into_iter()
        .filter(|e| e["event"] == event)
        .collect()
}

/// Everything a marker server received, concatenated.
pub fn marker_received(dir: &Path, name: &str) -> String {
    marker_events(dir, name, "recv")
        .iter()
        .filter_map(|e| e["data"].as_str().map(str::to_string))
        .collect()
}

/// A `marker.py` client (`tcp-hold`, `udp-hold`) in `ns`, in the background.
pub fn marker_client(ns: &Netns, dir: &Path, name: &str, mode: &str, args: &[&str]) -> Proc {
    let mut c = ns.exec("python3");
    c.args([MARKER, mode]).args(args);
    Proc::spawn(name, c, dir)
}
