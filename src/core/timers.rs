//! The core's timers: why the core wants to be woken (`TimerKind`) and a keyed min-heap of deadlines
//! (`TimerHeap`) behind `Gateway::poll_timeout` / `Gateway::handle_timeout`.
//!
//! The shell sleeps until the earliest deadline (bounded above by its own reasons to wake), so an idle core asks
//! for no wakeup at all, and `handle_timeout` runs only what is due. A timer is (re)armed or cancelled by key;
//! superseded heap entries stay in the heap and are skipped when they reach the top (lazy deletion, as the flow
//! table's deadline heap does), and the heap is rebuilt when stale entries outnumber live ones.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use super::{EndReason, Gateway, TxQueue, EXPIRY_BUDGET, TIMER_TICK};

/// Why the core asked to be woken (the second half of `Gateway::poll_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    /// boringtun's timers (handshake retries, keepalives, key expiry) of the armed peers. boringtun exposes no
    /// deadline of its own, only `update_timers` to be called periodically, so every armed peer is due on each
    /// `TIMER_TICK` while any is armed; an idle peer is not armed and costs nothing.
    PeerTimers,
    /// The earliest idle-flow deadline of the flow table (rounded up to the tick, so expiries coalesce).
    FlowExpiry,
    /// The handshake gate's once-a-second reset, while initiations were seen in the last two seconds.
    HandshakeGate,
    /// The end of the refused-flow summary interval, while attempts are tallied (not rounded).
    DenySummary,
    /// The flow, NAT and peer gauges, one tick after they changed.
    Gauges,
}

impl TimerKind {
    pub const ALL: [TimerKind; 5] = [
        TimerKind::PeerTimers,
        TimerKind::FlowExpiry,
        TimerKind::HandshakeGate,
        TimerKind::DenySummary,
        TimerKind::Gauges,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Deadlines keyed by `TimerKind`: at most one live deadline per key.
#[derive(Debug)]
pub struct TimerHeap {
    /// (deadline, generation, key); an entry is live while its generation is its key's current one.
    heap: BinaryHeap<Reverse<(Instant, u64, TimerKind)>>,
    /// Per key: its deadline and the generation of its live entry.
    armed: [Option<(Instant, u64)>; TimerKind::ALL.len()],
    next_gen: u64,
}

impl Default for TimerHeap {
    fn default() -> Self {
        TimerHeap {
            heap: BinaryHeap::new(),
            armed: [None; TimerKind::ALL.len()],
            next_gen: 0,
        }
    }
}

impl TimerHeap {
    /// Arms `key` for `at`, replacing any deadline it had.
    pub fn arm(&mut self, key: TimerKind, at: Instant) {
        if self.armed[key.index()].is_some_and(|(d, _)| d == at) {
            return;
        }
        let generation = self.next_gen;
        self.next_gen += 1;
        self.armed[key.index()] = Some((at, generation));
        self.heap.push(Reverse((at, generation, key)));
        if self.heap.len() > 4 * TimerKind::ALL.len() {
            self.compact();
        }
    }

    /// Arms `key` for `at` unless it is armed for an earlier (or the same) deadline already.
    pub fn arm_by(&mut self, key: TimerKind, at: Instant) {
        if self.deadline(key).is_none_or(|d| at < d) {
            self.arm(key, at);
        }
    }

    pub fn cancel(&mut self, key: TimerKind) {
        self.armed[key.index()] = None;
    }

    pub fn deadline(&self, key: TimerKind) -> Option<Instant> {
        self.armed[key.index()].map(|(d, _)| d)
    }

    fn live(&self, &Reverse((_, generation, key)): &Reverse<(Instant, u64, TimerKind)>) -> bool {
        self.armed[key.index()].is_some_and(|(_, g)| g == generation)
    }

    /// The earliest armed deadline and its key.
    pub fn next(&mut self) -> Option<(Instant, TimerKind)> {
        while let Some(top) = self.heap.peek() {
            if self.live(top) {
                let Reverse((at, _, key)) = *top;
                return Some((at, key));
            }
            self.heap.pop();
        }
        None
    }

    /// Disarms and returns a key whose deadline is at or before `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<TimerKind> {
        let (at, key) = self.next()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        self.armed[key.index()] = None;
        Some(key)
    }

    /// Drops stale entries (keys re-armed to a later deadline or cancelled leave theirs behind).
    fn compact(&mut self) {
        let armed = self.armed;
        self.heap
            .retain(|Reverse((_, g, k))| armed[k.index()].is_some_and(|(_, a)| a == *g));
    }

    #[cfg(test)]
    fn entries(&self) -> usize {
        self.heap.len()
    }
}

/// How long the handshake gate keeps being reset after the last initiation: two of boringtun's one-second reset
/// periods, so the count of the last burst is always cleared.
pub(super) const GATE_BUSY: Duration = Duration::from_secs(2);

impl Gateway {
    /// Time only moves forward: an earlier `now` than one seen before is taken as that one.
    #[inline]
    pub(super) fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    /// The first tick boundary (multiples of `TIMER_TICK` since the core's epoch) at or after `ms`: deadlines
    /// are rounded up to it so that wakeups coalesce (a tick late at most, as with the fixed sweep before).
    fn tick_at_or_after(&self, ms: u64) -> Instant {
        let tick = TIMER_TICK.as_millis() as u64;
        self.epoch + Duration::from_millis(ms.div_ceil(tick) * tick)
    }

    /// The first tick boundary strictly after `now`.
    fn tick_after(&self, now: Instant) -> Instant {
        self.tick_at_or_after(self.ms(now) + 1)
    }

    /// Arms or cancels every timer from the state it serves (called before the heap is read).
    fn sync_timers(&mut self) {
        use TimerKind::*;
        let next = self.tick_after(self.now);
        if self.timed.is_empty() {
            self.timers.cancel(PeerTimers);
        } else {
            self.timers.arm_by(PeerTimers, next);
        }
        match self.flows.next_deadline() {
            Some(ms) => self.timers.arm(FlowExpiry, self.tick_at_or_after(ms)),
            None => self.timers.cancel(FlowExpiry),
        }
        if self.gate_busy_until.is_some_and(|until| self.now < until) {
            self.timers.arm_by(HandshakeGate, next);
        } else {
            self.gate_busy_until = None;
            self.timers.cancel(HandshakeGate);
        }
        if self.refused.is_empty() {
            self.timers.cancel(DenySummary);
        } else {
            let due = self.epoch + Duration::from_millis(self.refused.next_flush_ms());
            self.timers.arm(DenySummary, due);
        }
        if self.gauges_dirty {
            self.timers.arm_by(Gauges, next);
        } else {
            self.timers.cancel(Gauges);
        }
    }

    /// When the core next needs `handle_timeout`, and why; `None`: not until new input arrives.
    pub fn poll_timeout(&mut self) -> Option<(Instant, TimerKind)> {
        self.sync_timers();
        self.timers.next()
    }

    /// Runs the timers due at `now` (and nothing else): peer timers of the armed peers, idle-flow expiry (bounded
    /// work per call: if more is due, `poll_timeout` says so at once), the handshake gate's reset, the refused-flow
    /// summaries, the gauges.
    pub fn handle_timeout(&mut self, now: Instant, tx: &mut TxQueue) {
        self.advance(now);
        let now = self.now;
        self.sync_timers();
        let mut ran = false;
        while let Some(kind) = self.timers.pop_due(now) {
            ran = true;
            match kind {
                TimerKind::PeerTimers => self.run_peer_timers(tx),
                TimerKind::FlowExpiry => self.expire_flows(now),
                TimerKind::HandshakeGate => self.gate.reset_count(),
                TimerKind::DenySummary => self.flush_refused_due(now),
                TimerKind::Gauges => {}
            }
        }
        if ran {
            self.refresh_gauges();
        }
        self.sync_timers();
    }

    fn expire_flows(&mut self, now: Instant) {
        let mut expired = Vec::new();
        self.flows.expire(self.ms(now), EXPIRY_BUDGET, &mut expired);
        for e in expired {
            if e.idle {
                self.push_end(&e.flow, now, EndReason::IdleTimeout);
            }
            self.forget_flow(&e.flow);
        }
    }

    /// The flow and NAT gauges (the peer gauges are set where peer timers run, or zeroed with no peer armed).
    fn refresh_gauges(&mut self) {
        self.gauges_dirty = false;
        for t in &self.tenants {
            t.counters
                .flows
                .set(self.flow_counts[t.num as usize] as u64);
        }
        let g = &self.metrics.global;
        g.nat_slots.set(self.upgrade_nat.len() as u64);
        g.nat_slots_closing.set(self.closing.len() as u64);
        if self.timed.is_empty() {
            g.peers_timed.set(0);
            for t in &self.tenants {
                t.counters.peers_connected.set(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TimerKind::*;
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn keys_come_due_in_deadline_order_and_only_once() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.arm(Gauges, at(t0, 300));
        h.arm(PeerTimers, at(t0, 100));
        h.arm(FlowExpiry, at(t0, 200));
        assert_eq!(h.next(), Some((at(t0, 100), PeerTimers)));
        assert_eq!(h.pop_due(at(t0, 99)), None, "nothing is due early");
        assert_eq!(h.pop_due(at(t0, 250)), Some(PeerTimers));
        assert_eq!(h.pop_due(at(t0, 250)), Some(FlowExpiry));
        assert_eq!(h.pop_due(at(t0, 250)), None);
        assert_eq!(h.next(), Some((at(t0, 300), Gauges)));
        assert_eq!(h.pop_due(at(t0, 300)), Some(Gauges), "due at its deadline");
        assert_eq!(h.next(), None);
        assert_eq!(h.deadline(Gauges), None, "a key that came due is disarmed");
    }

    #[test]
    fn re_arming_moves_a_deadline_either_way_and_leaves_no_stale_wakeup() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.arm(PeerTimers, at(t0, 100));
        h.arm(PeerTimers, at(t0, 500)); // later: the entry at 100 is stale
        assert_eq!(h.next(), Some((at(t0, 500), PeerTimers)));
        assert_eq!(
            h.pop_due(at(t0, 200)),
            None,
            "the stale entry does not fire"
        );
        h.arm(PeerTimers, at(t0, 50)); // earlier
        assert_eq!(h.pop_due(at(t0, 60)), Some(PeerTimers));
        assert_eq!(
            h.pop_due(at(t0, 1_000)),
            None,
            "the superseded entry at 500 does not fire"
        );
        assert_eq!(h.next(), None);
    }

    #[test]
    fn arm_by_only_moves_a_deadline_earlier() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.arm_by(DenySummary, at(t0, 300));
        h.arm_by(DenySummary, at(t0, 400));
        assert_eq!(h.deadline(DenySummary), Some(at(t0, 300)));
        h.arm_by(DenySummary, at(t0, 200));
        assert_eq!(h.deadline(DenySummary), Some(at(t0, 200)));
    }

    #[test]
    fn a_cancelled_key_never_fires_and_can_be_armed_again() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        h.arm(HandshakeGate, at(t0, 100));
        h.arm(Gauges, at(t0, 200));
        h.cancel(HandshakeGate);
        assert_eq!(h.next(), Some((at(t0, 200), Gauges)));
        assert_eq!(h.pop_due(at(t0, 1_000)), Some(Gauges));
        assert_eq!(h.pop_due(at(t0, 1_000)), None);
        h.arm(HandshakeGate, at(t0, 1_100));
        assert_eq!(h.pop_due(at(t0, 1_100)), Some(HandshakeGate));
    }

    #[test]
    fn stale_entries_are_bounded_under_endless_re_arming() {
        let t0 = Instant::now();
        let mut h = TimerHeap::default();
        for i in 0..10_000u64 {
            // Earlier each time: every older entry is stale but never reaches the top by itself.
            h.arm(FlowExpiry, at(t0, 1_000_000 - i));
            h.arm(PeerTimers, at(t0, 2_000_000 + i));
        }
        assert!(
            h.entries() <= 4 * TimerKind::ALL.len() + 1,
            "{}",
            h.entries()
        );
        assert_eq!(h.pop_due(at(t0, 3_000_000)), Some(FlowExpiry));
        assert_eq!(h.pop_due(at(t0, 3_000_000)), Some(PeerTimers));
        assert_eq!(h.pop_due(at(t0, 3_000_000)), None);
    }
}
