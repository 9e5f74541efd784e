//! New flows a device may not open: the per-device new-flow rate (a token bucket per peer) and the tally of
//! refused attempts. A refused attempt creates no flow: policy is evaluated again for the next packet, and the
//! audit trail gets one summary record per device, destination and rule per interval with the number of
//! attempts, so a device spraying packets at random ports fills neither the flow table nor the audit store.

use super::*;

/// Most distinct (device, destination, rule) keys tallied between two summaries; further attempts are
/// counted (`refusals_unrecorded`) but not recorded.
const MAX_KEYS: usize = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    slot: PeerSlot,
    protocol: u8,
    dst: IpAddr,
    action: Action,
    rule: Option<u16>,
}

#[derive(Debug)]
struct Attempts {
    tenant: TenantId,
    device: Arc<Device>,
    rule: Arc<str>,
    src: IpAddr,
    /// The first attempt's ports (a summary may cover many).
    sport: u16,
    dport: u16,
    first_ms: u64,
    last_ms: u64,
    count: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
pub(super) struct Tally {
    by_key: HashMap<Key, Attempts>,
    next_flush_ms: u64,
}

impl Tally {
    pub(super) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// When the tallied attempts are summarized (ms since the core's epoch).
    pub(super) fn next_flush_ms(&self) -> u64 {
        self.next_flush_ms
    }
}

impl Gateway {
    /// Takes one token from the device's new-flow bucket (refilled at `flows.device_new_flows_per_sec`, up to
    /// the burst); `false` when it is empty.
    pub(super) fn take_new_flow_token(&mut self, slot: PeerSlot, now_ms: u64) -> bool {
        let (rate, burst) = self.new_flow_rate;
        let Some(p) = self.peers.get_mut(slot.index()).and_then(Option::as_mut) else {
            return false;
        };
        let elapsed = now_ms.saturating_sub(p.refilled_ms);
        // `rate` tokens per second is `rate` thousandths of a token per millisecond.
        p.tokens_milli = (p.tokens_milli + elapsed * u64::from(rate)).min(u64::from(burst) * 1000);
        p.refilled_ms = now_ms;
        if p.tokens_milli < 1000 {
            return false;
        }
        p.tokens_milli -= 1000;
        true
    }

    /// Tallies a refused attempt of the device in `slot`.
    pub(super) fn note_refused(
        &mut self,
        slot: PeerSlot,
        view: &IpView,
        t: &Transport,
        action: Action,
        rule: Option<u16>,
        now_ms: u64,
    ) {
        let key = Key {
            slot,
            protocol: view.protocol,
            dst: view.dst,
            action,
            rule,
        };
        if let Some(a) = self.refused.by_key.get_mut(&key) {
            a.last_ms = now_ms;
            a.count += 1;
            a.bytes += view.len as u64;
            return;
        }
        let Some(p) = self.peers.get(slot.index()).and_then(Option::as_ref) else {
            return;
        };
        if self.refused.by_key.len() >= MAX_KEYS {
            return self.metrics.global.refusals_unrecorded.add(1);
        }
        let tenant = &self.tenants[p.tenant];
        let rule_id = match (rule, action) {
            (None, Action::Reject) => Arc::from("offramp-forbidden"),
            _ => tenant.policy.rule_id(&policy::Decision { action, rule }),
        };
        if self.refused.by_key.is_empty() {
            self.refused.next_flush_ms = now_ms + self.deny_summary_ms;
        }
        self.refused.by_key.insert(
            key,
            Attempts {
                tenant: tenant.id.clone(),
                device: p.device.clone(),
                rule: rule_id,
                src: view.src,
                sport: t.sport,
                dport: t.dport,
                first_ms: now_ms,
                last_ms: now_ms,
                count: 1,
                bytes: view.len as u64,
            },
        );
    }

    /// Emits the summaries when their interval is over (`TimerKind::DenySummary`).
    pub(super) fn flush_refused_due(&mut self, now: Instant) {
        if !self.refused.by_key.is_empty() && self.ms(now) >= self.refused.next_flush_ms {
            self.flush_refused(now);
        }
    }

    /// Emits one start and one end record per tallied key: the start at the first attempt, the end at the
    /// last, with the number of attempts as its packet count.
    pub(super) fn flush_refused(&mut self, _now: Instant) {
        let mut keys: Vec<(Key, Attempts)> = self.refused.by_key.drain().collect();
        keys.sort_by_key(|(_, a)| a.first_ms); // records in the order the attempts began
        for (k, a) in keys {
            let seq = self.next_flow_seq;
            self.next_flow_seq = seq.next();
            let at = |ms: u64| self.epoch + Duration::from_millis(ms);
            self.events.push_back(FlowEvent::Start(Box::new(FlowStart {
                seq,
                tenant: a.tenant,
                device: a.device.name.clone(),
                user: a.device.user.clone(),
                protocol: k.protocol,
                src: a.src,
                sport: a.sport,
                dst: k.dst,
                dport: a.dport,
                action: k.action,
                rule: a.rule,
                dst_device: None,
                at: at(a.first_ms),
            })));
            self.events.push_back(FlowEvent::End {
                seq,
                at: at(a.last_ms),
                packets: [a.count, 0],
                bytes: [a.bytes, 0],
                reason: EndReason::Refused,
            });
        }
    }
}
