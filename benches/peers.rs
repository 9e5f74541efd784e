//! Scale in devices: memory per configured device, the time to apply a config of 100,000 devices, the time
//! from the first handshake initiation of the last device enrolled to its first decrypted packet, and the cost
//! of a timer tick with 100,000 configured devices of which few are active.
//!
//! `cargo bench --bench peers` (release profile; `make bench-peers`); `RAMPART_BENCH_DEVICES=N` changes the
//! count. Results are recorded in docs/benchmarks.md. Sans-IO: the gateway core is driven directly, as the
//! pump thread drives it, so the numbers are the core's, without sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use rampart::config::Config;
use rampart::core::{tx::BUF_SIZE, Gateway, Metrics, TxQueue};
use rampart::keys::PrivateKey;

const ROUNDS: usize = 7;
const ACTIVE: usize = 1_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm resident");
    pages * 4096
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn device_addr(i: usize) -> Ipv4Addr {
    // 100.96.0.0/12: the gateway is .1, devices from .2 up.
    Ipv4Addr::from(0x6460_0000u32 + 2 + i as u32)
}

fn config(keys: &[PrivateKey]) -> Config {
    let mut text = String::with_capacity(keys.len() * 160);
    text += "[gateway]\nlisten = \"198.18.0.1:51820\"\nstate_dir = \"/nonexistent\"\n";
    text += "[[tenant]]\nid = \"acme\"\naddress_pool = \"100.96.0.0/12\"\ngateway_address = \"100.96.0.1\"\n";
    text += "[[tenant.rule]]\nid = \"all\"\naction = \"allow\"\n";
    for (i, k) in keys.iter().enumerate() {
        text += &format!(
            "[[tenant.device]]\nname = \"d{i}\"\npublic_key = \"{}\"\naddress = \"{}\"\nuser = \"u{i}@example.com\"\n",
            k.public_key(),
            device_addr(i)
        );
    }
    Config::from_toml(&text, Path::new("/bench/gateway.toml")).expect("bench config")
}

/// Runs the core's timers at their next deadline (what the pump does when it wakes for it).
fn run_due(gw: &mut Gateway, tx: &mut TxQueue) {
    let now = Instant::now();
    let at = gw.poll_timeout().map_or(now, |(at, _)| at.max(now));
    gw.handle_timeout(at, tx);
}

/// One device's handshake and its first packet through the gateway: initiation -> response -> a ping to the
/// gateway's address, decrypted and answered. Returns the time from the initiation to the gateway's answer.
fn connect(
    gw: &mut Gateway,
    gw_key: &PrivateKey,
    key: &PrivateKey,
    i: usize,
    scratch: &mut [u8],
    tx: &mut TxQueue,
) -> Duration {
    let from = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)),
        20_000 + (i % 40_000) as u16,
    );
    let mut client = Tunn::new(
        key.to_x25519(),
        gw_key.public_key().to_x25519(),
        None,
        None,
        (i as u32) & 0xff_ffff,
        None,
    );
    let mut out = vec![0u8; BUF_SIZE];
    let mut back = vec![0u8; BUF_SIZE];
    let started = Instant::now();
    // Under load (more than 200 initiations a second) the gateway answers with a cookie reply; the client
    // then retries with the cookie, as a real one does.
    for attempt in 0..3 {
        let TunnResult::WriteToNetwork(init) =
            client.format_handshake_initiation(&mut out, attempt > 0)
        else {
            panic!("device {i}: client initiation");
        };
        let init = init.to_vec();
        tx.clear();
        gw.handle_datagram(Instant::now(), from, &init, scratch, tx);
        let (_, response) = tx
            .iter()
            .next()
            .expect("a handshake response or cookie reply");
        let response = response.to_vec();
        match client.decapsulate(None, &response, &mut back) {
            TunnResult::WriteToNetwork(keepalive) => {
                let keepalive = keepalive.to_vec();
                tx.clear();
                gw.handle_datagram(Instant::now(), from, &keepalive, scratch, tx);
                let elapsed = started.elapsed();
                tx.clear();
                return elapsed;
            }
            TunnResult::Done => continue, // a cookie reply
            other => panic!("device {i}: the client did not complete the handshake: {other:?}"),
        }
    }
    panic!("device {i}: no session after three initiations");
}

fn main() {
    let n: usize = std::env::var("RAMPART_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let t = Instant::now();
    let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate()).collect();
    let keygen = t.elapsed();
    let t = Instant::now();
    let cfg = config(&keys);
    let parse = t.elapsed();

    let gw_key = PrivateKey::generate();
    let metrics = Arc::new(Metrics::default());
    let before = rss_bytes();
    let mut gw = Gateway::new(0, &gw_key, metrics.clone(), Instant::now());
    let mut tx = TxQueue::new();
    let t = Instant::now();
    let summary = gw.apply(&cfg, Instant::now(), &mut tx);
    let apply = t.elapsed();
    let after = rss_bytes();
    assert_eq!(summary.added, n, "{summary:?}");

    let mut scratch = vec![0u8; BUF_SIZE];
    // The last devices enrolled, one at a time (the gate allows 200 handshakes a second: reset by the tick).
    let mut handshakes = Vec::new();
    for r in 0..ROUNDS {
        let i = n - 1 - r;
        handshakes.push(connect(
            &mut gw,
            &gw_key,
            &keys[i],
            i,
            &mut scratch,
            &mut tx,
        ));
        run_due(&mut gw, &mut tx);
        tx.clear();
    }

    // Tick cost with only the few connected devices active, then with ACTIVE more.
    let tick = |gw: &mut Gateway, tx: &mut TxQueue| {
        median(
            (0..ROUNDS)
                .map(|_| {
                    let t = Instant::now();
                    run_due(gw, tx);
                    let e = t.elapsed();
                    tx.clear();
                    e
                })
                .collect(),
        )
    };
    let idle_tick = tick(&mut gw, &mut tx);
    let active = ACTIVE.min(n.saturating_sub(ROUNDS));
    for (i, key) in keys.iter().enumerate().take(active) {
        connect(&mut gw, &gw_key, key, i, &mut scratch, &mut tx);
        if i % 100 == 99 {
            run_due(&mut gw, &mut tx);
            tx.clear();
        }
    }
    let active_tick = tick(&mut gw, &mut tx);
    let timed = metrics.global.peers_timed.get();

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!("devices configured:              {n}");
    println!("key generation (bench setup):    {keygen:?}");
    println!("config parse + validate:         {parse:?}");
    println!("apply to the core:               {apply:?}");
    println!(
        "RSS: {:.1} MiB before the gateway, {:.1} MiB after apply: {:.0} bytes per device (config kept too)",
        mib(before),
        mib(after),
        (after.saturating_sub(before)) as f64 / n as f64
    );
    println!(
        "first handshake of the last enrolled (median of {ROUNDS}): {:?} (all: {handshakes:?})",
        median(handshakes.clone())
    );
    println!("timer tick, {ROUNDS} active:   median {idle_tick:?}");
    println!("timer tick, {timed} active: median {active_tick:?}");
}
