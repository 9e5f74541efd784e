//! Flow table cost at scale: insert and lookup time per flow, and memory per flow, at 1M flows.
//!
//! `cargo bench --bench flow_table` (release profile). Prints medians over several rounds; results are recorded
//! in docs/benchmarks.md. Keys are random 5-tuples over many tenants, looked up in random order (cache-missing,
//! as on a busy gateway).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use rampart::config::{Action, FlowSettings};
use rampart::core::flow_table::{Flow, FlowKey, FlowTable, FlowTarget};
use rampart::core::{FlowSeq, PeerSlot};

const FLOWS: usize = 1_000_000;
const ROUNDS: usize = 5;

/// xorshift64*: deterministic keys without a RNG dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn keys(n: usize, seed: u64) -> Vec<(FlowKey, rampart::core::flow_table::KeyDir)> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| {
            let v = r.next();
            let src = IpAddr::V4(Ipv4Addr::from(0x6460_0000 | (v as u32 & 0xffff)));
            let dst = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | ((v >> 16) as u32 & 0xff_ffff)));
            FlowKey::new(
                (v >> 40) as u32 % 64,
                6,
                src,
                (v >> 48) as u16 | 1024,
                dst,
                443,
            )
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let ks = keys(FLOWS, 0x9e37_79b9_7f4a_7c15);
    let mut order: Vec<usize> = (0..FLOWS).collect();
    let mut r = Rng(42);
    for i in (1..order.len()).rev() {
        order.swap(i, (r.next() % (i as u64 + 1)) as usize);
    }
    let (mut inserts, mut lookups, mut hits, mut bursts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut mem = 0.0;
    for round in 0..ROUNDS {
        let mut t = FlowTable::new(&FlowSettings::default());
        let start = Instant::now();
        for (i, (k, d)) in ks.iter().enumerate() {
            if t.lookup(k).is_none() {
                t.insert(Flow::new(
                    *k,
                    *d,
                    FlowSeq::new(i as u64),
                    PeerSlot::new(0),
                    FlowTarget::Peer(PeerSlot::new(1)),
                    Action::Allow,
                    Some(0),
                    0,
                ));
            }
        }
        inserts.push(start.elapsed().as_nanos() as f64 / FLOWS as f64);
        let start = Instant::now();
        let mut found = 0usize;
        for &i in &order {
            if let Some(idx) = t.lookup(&ks[i].0) {
                found += 1;
                black_box(t.get_mut(idx).record(0, 1400, None, 1));
            }
        }
        lookups.push(start.elapsed().as_nanos() as f64 / FLOWS as f64);
        // Real traffic comes in trains: 16 packets of a flow back to back, flows in random order.
        let start = Instant::now();
        for &i in order.iter().take(FLOWS / 16) {
            for _ in 0..16 {
                if let Some(idx) = t.lookup(&ks[i].0) {
                    black_box(t.get_mut(idx).record(0, 1400, None, 1));
                }
            }
        }
        bursts.push(start.elapsed().as_nanos() as f64 / FLOWS as f64);
        hits.push(found as f64);
        if round == 0 {
            mem = t.memory_bytes() as f64 / t.len() as f64;
            println!("flows in table: {}", t.len());
        }
    }
    println!("flow_table: {FLOWS} flows, {ROUNDS} rounds (median)");
    println!(
        "  insert (lookup miss + insert): {:.1} ns/flow",
        median(inserts)
    );
    println!(
        "  lookup + per-packet update (random order): {:.1} ns/packet",
        median(lookups)
    );
    println!(
        "  lookup + per-packet update (trains of 16 packets per flow): {:.1} ns/packet",
        median(bursts)
    );
    println!("  memory: {mem:.0} bytes/flow (map + slab + expiry heap, at capacity)");
    println!("  hits per round: {}", median(hits));
}
