//! What the router decided for one inner packet (`Verdict`), and the one place a verdict is carried out and
//! counted (`Gateway::carry`): the router (`decide`, `start_flow`, `route_icmp_error`) only decides and
//! rewrites the packet in place; it neither sends nor counts drops.

use super::*;

/// The fate of one inner packet from a subject (a device's tunnel or an on-ramp connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// To the peer in this slot (encrypted to a device, queued for a connection); the packet is already
    /// rewritten for the hop (TTL decremented, or turned into the gateway's echo reply to its sender).
    Forward(PeerSlot),
    /// Into the upgrade TUN: already NAT-ed to its slot and the listener, MSS clamped.
    Upgrade,
    /// Into the downgrade TUN: a destination device's answer on a downgraded connection, already NAT-ed.
    Downgrade,
    /// Refused with an answer to the sender (a TCP RST, or ICMP unreachable of this kind), counted as the reason.
    Reject(Unreachable, DropReason),
    /// Larger than the destination connection's MTU (a GUE site): never fragmented; counted as `gue_too_big`
    /// and answered with ICMP Fragmentation Needed / Packet Too Big carrying this MTU (unless it is an ICMP
    /// error itself).
    TooBig(u16),
    /// Dropped silently, counted as the reason.
    Drop(DropReason),
}

impl Gateway {
    /// Carries out `verdict` for `pkt` from the subject in `src_slot` (tenant index `ti`), and counts it.
    pub(super) fn carry(
        &mut self,
        src_slot: PeerSlot,
        ti: TenantIdx,
        pkt: &[u8],
        verdict: Verdict,
        tx: &mut TxQueue,
    ) {
        let counters = &self.tenants[ti].counters;
        match verdict {
            Verdict::Forward(to) => {
                let counters = counters.clone();
                self.send_to_peer(to, pkt, &counters, tx);
            }
            Verdict::Upgrade => {
                self.tun_out.slot(UNADDRESSED, pkt.len())[..pkt.len()].copy_from_slice(pkt);
                self.tun_out.commit(pkt.len());
            }
            Verdict::Downgrade => {
                self.dn_out.slot(UNADDRESSED, pkt.len())[..pkt.len()].copy_from_slice(pkt);
                self.dn_out.commit(pkt.len());
            }
            Verdict::Reject(why, reason) => {
                counters.count_drop(reason);
                // Parsed again: refusals are not the hot path, and the router hands over only the verdict.
                if let Ok(view) = packet::parse_ip(pkt) {
                    if let Ok(t) = packet::parse_transport(pkt, &view) {
                        self.reject(src_slot, ti, pkt, &view, &t, why, tx);
                    }
                }
            }
            Verdict::TooBig(mtu) => {
                counters.count_drop(DropReason::GueTooBig);
                let Ok(view) = packet::parse_ip(pkt) else {
                    return;
                };
                let gw = self.tenants[ti]
                    .gateway_addresses
                    .iter()
                    .find(|a| a.is_ipv4() == view.src.is_ipv4())
                    .copied();
                if let (Some(gw), None) = (gw, packet::icmp_error(pkt, &view)) {
                    let why = Unreachable::TooBig(mtu);
                    if let Some(n) =
                        packet::build_unreachable(pkt, &view, gw, why, &mut self.build_buf)
                    {
                        self.send_built(src_slot, n, tx);
                    }
                }
            }
            Verdict::Drop(reason) => counters.count_drop(reason),
        }
    }
}
