//! Packets leaving the gateway's namespace (the upgrade and downgrade TUNs): un-NAT and encrypt them to the
//! device the flow belongs to.

use super::*;

/// The NAT key of an upgraded flow (IPv4 only).
pub(super) fn nat_key(f: &Flow) -> Option<NatKey> {
    match f.endpoints() {
        (IpAddr::V4(s), sport, IpAddr::V4(d), dport) => Some(NatKey {
            tenant: f.key.tenant(),
            protocol: f.key.protocol(),
            src: SocketAddrV4::new(s, sport),
            dst: SocketAddrV4::new(d, dport),
        }),
        _ => None,
    }
}

impl Gateway {
    /// A packet the gateway's namespace sent out of the upgrade TUN (a reply on an upgraded flow): un-NAT it to
    /// `dst -> src` of the original flow and encrypt it to the device that opened the flow.
    pub fn handle_tun_packet(&mut self, now: Instant, pkt: &mut [u8], tx: &mut TxQueue) {
        self.advance(now);
        let unattributed = &self.metrics.global.unattributed;
        let Some((_, slot)) = nat::ports_v4(pkt) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let Some((nat_key, state)) = self.upgrade_nat.outbound(pkt) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let Some(ti) = self.tenant_index(nat_key.tenant) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let (key, dir) = FlowKey::new(
            nat_key.tenant,
            nat_key.protocol,
            IpAddr::V4(*nat_key.dst.ip()),
            nat_key.dst.port(),
            IpAddr::V4(*nat_key.src.ip()),
            nat_key.src.port(),
        );
        let counters = self.tenants[ti].counters.clone();
        let Some(idx) = self.flows.lookup(&key) else {
            // The flow is gone but its socket is closing: the close handshake (no payload) still reaches the
            // device, so it learns the connection is over.
            return match (state, self.closing.get(&slot)) {
                (
                    nat::SlotState::Closing,
                    Some(&Closing {
                        initiator: Some(to),
                        ..
                    }),
                ) => self.send_to_peer(to, pkt, &counters, tx),
                _ => unattributed.count_drop(DropReason::NatStale),
            };
        };
        let Ok(view) = packet::parse_ip(pkt) else {
            return unattributed.count_drop(DropReason::InvalidInnerPacket);
        };
        let t = packet::parse_transport(pkt, &view).unwrap_or_default();
        let now_ms = self.ms(now);
        let flow = self.flows.get_mut(idx);
        let side = flow.side(dir);
        let tcp = (view.protocol == PROTO_TCP).then(|| router::segment(pkt, &view, &t));
        let transition = flow.record(side, view.len, tcp, now_ms);
        let (seq, initiator) = (flow.seq, flow.src_slot);
        match transition {
            Transition::None => {}
            Transition::Established => self
                .events
                .push_back(FlowEvent::Established { seq, at: now }),
            Transition::Ended(reason) => self.record_end(idx, now, reason),
        }
        self.send_to_peer(initiator, pkt, &counters, tx);
    }

    /// A packet the gateway's namespace sent out of the downgrade TUN (the proxy's connection towards a device):
    /// un-NAT it to `src -> dst` of the spliced flow and encrypt it to the destination device.
    pub fn handle_downgrade_tun_packet(&mut self, pkt: &mut [u8], tx: &mut TxQueue) {
        let unattributed = &self.metrics.global.unattributed;
        let Some(key) = self.downgrade_nat.from_kernel(pkt) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let (fkey, _) = FlowKey::new(
            key.tenant,
            key.protocol,
            IpAddr::V4(*key.src.ip()),
            key.src.port(),
            IpAddr::V4(*key.dst.ip()),
            key.dst.port(),
        );
        let Some(FlowTarget::Upgrade(_, Some(peer))) =
            self.flows.lookup(&fkey).map(|i| self.flows.get(i).target)
        else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        let Some(ti) = self.tenant_index(key.tenant) else {
            return unattributed.count_drop(DropReason::NatStale);
        };
        nat::clamp_mss(pkt, UPGRADE_MSS);
        let counters = self.tenants[ti].counters.clone();
        self.send_to_peer(peer, pkt, &counters, tx);
    }
}
