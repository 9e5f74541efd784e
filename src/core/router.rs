//! The layer-3 router: anti-spoofing, flow lookup, new flows (route, limits, policy), and where each packet goes.

use super::*;

/// The gateway's internal ranges (upgrade and downgrade NAT, the namespace's listener): 100.64.0.0/14.
const INTERNAL_V4: ipnet::Ipv4Net = match ipnet::Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 14) {
    Ok(n) => n,
    Err(_) => panic!("valid prefix"),
};

/// A TCP segment for the flow table; the checksum is verified only where it matters (RSTs).
pub(super) fn segment(pkt: &[u8], view: &IpView, t: &Transport) -> flow_table::Segment {
    let syn_fin =
        u32::from(t.tcp_flags & TCP_SYN != 0) + u32::from(t.tcp_flags & packet::TCP_FIN != 0);
    flow_table::Segment {
        flags: t.tcp_flags,
        seq: t.tcp_seq,
        ack: t.tcp_ack,
        len: t.tcp_seg_len,
        payload: t.tcp_seg_len > syn_fin,
        checksum_ok: t.tcp_flags & TCP_RST == 0 || packet::transport_checksum_ok(pkt, view),
    }
}

/// Where a destination is, before policy decides how to carry the flow there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Local,
    Peer(PeerSlot),
    /// An upstream network of the tenant, reached through the gateway host.
    Offramp,
}

impl Route {
    /// Whether an existing flow's target is still this route.
    pub(super) fn carries(self, target: FlowTarget) -> bool {
        match (self, target) {
            (Route::Local, FlowTarget::Local) => true,
            (Route::Peer(a), FlowTarget::Peer(b)) => a == b,
            (Route::Offramp, FlowTarget::Upgrade(_, None) | FlowTarget::Offramp) => true,
            (Route::Peer(a), FlowTarget::Upgrade(_, Some(b))) => a == b,
            _ => false,
        }
    }
}

pub(super) fn subject(p: &Peer) -> Subject<'_> {
    Subject {
        user: &p.device.user,
        groups: &p.device.groups,
        device: &p.device.name,
    }
}

impl Gateway {
    /// Where a packet from the device in `src_slot` to `dst` goes within tenant `ti`; `None`: no route.
    pub(super) fn route_of(&self, ti: TenantIdx, src_slot: PeerSlot, dst: IpAddr) -> Option<Route> {
        let t = &self.tenants[ti];
        if t.gateway_addresses.contains(&dst) {
            return Some(Route::Local);
        }
        let conn = || {
            t.conn_routes
                .iter()
                .find(|(n, _)| n.contains(&dst))
                .map(|&(_, s)| s)
        };
        match t.routes.get(&dst).copied().or_else(conn) {
            Some(slot) if slot != src_slot => Some(Route::Peer(slot)),
            Some(_) => None,
            None if t.offramp.iter().any(|n| n.contains(&dst)) => Some(Route::Offramp),
            None => None,
        }
    }

    /// Anti-spoofing, flow lookup (or a new flow: route, limits, policy), then local delivery or re-encryption
    /// towards the destination device of the same tenant.
    /// H4 of the security review: the appliance is never an off-ramp destination, whatever the tenant's
    /// off-ramp networks say: not its own addresses (`set_local_addresses`), loopback, unspecified,
    /// link-local (cloud metadata), multicast or broadcast, the gateway's internal NAT ranges, nor any
    /// tenant's device pool. A tenant's `offramp_allow_local` lists the exceptions it was explicitly given.
    pub(super) fn offramp_forbidden(&self, ti: TenantIdx, dst: IpAddr, dport: u16) -> bool {
        let t = &self.tenants[ti];
        if t.offramp_allow_local.contains(&SocketAddr::new(dst, dport)) {
            return false;
        }
        let special = match dst {
            IpAddr::V4(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.is_link_local()
                    || a.is_multicast()
                    || a.is_broadcast()
                    || a.octets()[0] == 0
                    || a.octets()[0] >= 240
                    || INTERNAL_V4.contains(&a)
            }
            IpAddr::V6(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.is_multicast()
                    || (a.segments()[0] & 0xffc0) == 0xfe80
                    || a.to_ipv4_mapped().is_some()
            }
        };
        special
            || self.local_addrs.contains(&dst)
            || self
                .tenants
                .iter()
                .any(|o| o.pools.iter().any(|p| p.contains(&dst)))
    }

    /// Decides what happens to an inner packet from the subject in `src_slot` (`decide`), then does it and
    /// counts it (`carry`).
    pub(super) fn route_inner(
        &mut self,
        now: Instant,
        src_slot: PeerSlot,
        pkt: &mut [u8],
        tx: &mut TxQueue,
    ) {
        let ti = self.peers[src_slot]
            .as_ref()
            .expect("caller holds slot")
            .tenant;
        let verdict = self.decide(now, src_slot, ti, pkt);
        self.carry(src_slot, ti, pkt, verdict, tx);
    }

    /// The verdict for one inner packet: anti-spoofing, flow lookup (or a new flow: route, limits, policy),
    /// flow accounting, and the rewrites the verdict needs (TTL, echo reply, upgrade NAT, downgrade NAT).
    fn decide(
        &mut self,
        now: Instant,
        src_slot: PeerSlot,
        ti: TenantIdx,
        pkt: &mut [u8],
    ) -> Verdict {
        let src_peer = self.peers[src_slot].as_ref().expect("caller holds slot");
        let tenant = &self.tenants[ti];
        let view = match packet::parse_ip(pkt) {
            Ok(v) => v,
            Err(packet::PacketError::ExtensionHeader) => {
                return Verdict::Drop(DropReason::Ipv6ExtensionHeader)
            }
            Err(packet::PacketError::Malformed) => {
                return Verdict::Drop(DropReason::InvalidInnerPacket)
            }
        };
        if !src_peer.sends_from(view.src) {
            return Verdict::Drop(DropReason::SpoofedSource);
        }
        if view.fragment {
            // Fragments after the first carry no ports, so port rules could not be enforced on them.
            return Verdict::Drop(DropReason::Fragment);
        }
        let Ok(t) = packet::parse_transport(pkt, &view) else {
            return Verdict::Drop(DropReason::MalformedTransport);
        };
        if let Some(quote) = packet::icmp_error(pkt, &view) {
            return self.route_icmp_error(src_slot, ti, pkt, &view, quote);
        }
        let (key, dir) = FlowKey::new(
            tenant.num,
            view.protocol,
            view.src,
            t.sport,
            view.dst,
            t.dport,
        );
        let mut existing = self.flows.find(&key);
        if let Some(i) = existing {
            // A fresh SYN on a connection that already ended (the client reused its port while the old flow
            // lingers) opens a new flow: new decision, new NAT slot, new record.
            let syn_only =
                view.protocol == PROTO_TCP && t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if syn_only && self.flows.get(i).state == flow_table::FlowState::Ended {
                let old = self.flows.remove(i);
                self.forget_flow(&old);
                existing = None;
            }
        }
        let idx = match existing {
            Some(i) => i,
            None => match self.start_flow(now, ti, src_slot, key, dir, &view, &t) {
                Ok(i) => i,
                Err(verdict) => return verdict,
            },
        };
        let now_ms = self.ms(now);
        let flow = self.flows.get_mut(idx);
        let side = flow.side(dir);
        if let (IN, FlowTarget::Upgrade(_, Some(_))) = (side, flow.target) {
            // The destination device answering the gateway's downgraded connection: back into the namespace.
            // Not counted in the flow (its counters follow the initiator's leg).
            let f = self.flows.get(idx);
            return match nat_key(f) {
                Some(key) if self.downgrade_nat.to_kernel(pkt, &key).is_some() => {
                    Verdict::Downgrade
                }
                _ => Verdict::Drop(DropReason::NatStale),
            };
        }
        // L7: within an echo flow the responder only answers; a request from it would be a new question that
        // no policy decided.
        if side == IN && packet::is_echo_request(pkt, &view) {
            return Verdict::Drop(DropReason::IcmpUnrelated);
        }
        let tcp = (view.protocol == PROTO_TCP).then(|| segment(pkt, &view, &t));
        let refused = matches!(flow.action, Action::Deny | Action::Reject);
        if !refused && !flow.admits(side, tcp.as_ref()) {
            return Verdict::Drop(DropReason::FlowEnded);
        }
        // A packet that dies at this hop changes nothing (a RST with TTL 1 ends no flow).
        if matches!(flow.target, FlowTarget::Peer(_)) && packet::ttl(pkt, &view) <= 1 {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        let transition = flow.record(side, view.len, tcp, now_ms);
        let (action, target, initiator_slot, seq) =
            (flow.action, flow.target, flow.src_slot, flow.seq);
        match transition {
            Transition::None => {}
            Transition::Established => self
                .events
                .push_back(FlowEvent::Established { seq, at: now }),
            Transition::Ended(reason) => self.record_end(idx, now, reason),
        }
        match action {
            Action::Allow | Action::Proxy | Action::InspectSsh | Action::InspectHttp => {}
            Action::Deny => return Verdict::Drop(DropReason::PolicyDenied),
            // Either side: a rejected flow's responder only sends after a reload cut the flow.
            Action::Reject => {
                return Verdict::Reject(Unreachable::Prohibited, DropReason::PolicyRejected)
            }
        }
        let dst_slot = match (side, target) {
            (OUT, FlowTarget::Local) => match packet::echo_reply_in_place(pkt, &view) {
                LocalReply::Reply(len) => {
                    // The gateway's answer is the flow's reply direction.
                    self.flows.get_mut(idx).record(IN, len, None, now_ms);
                    src_slot
                }
                LocalReply::NotHandled => return Verdict::Drop(DropReason::NoLocalService),
            },
            (OUT, FlowTarget::Peer(dst)) => dst,
            (OUT, FlowTarget::Upgrade(slot, _)) => {
                // Into the gateway's namespace: NAT to `slot -> listener`; the kernel there terminates it.
                if self.upgrade_nat.inbound(pkt, slot).is_err() {
                    return Verdict::Drop(DropReason::OfframpUnsupported);
                }
                nat::clamp_mss(pkt, UPGRADE_MSS);
                return Verdict::Upgrade;
            }
            // Replies of upgraded flows come out of the namespace (`handle_tun_packet`), never from a device.
            (_, FlowTarget::Upgrade(..) | FlowTarget::Offramp) => {
                return Verdict::Drop(DropReason::NoRoute)
            }
            (_, _) => initiator_slot,
        };
        if let Some(mtu) = self.conn_mtu(dst_slot) {
            if pkt.len() > usize::from(mtu) && dst_slot != src_slot {
                // Never fragmented on the way: the sender is told the site's MTU, as a router would.
                return Verdict::TooBig(mtu);
            }
        }
        if dst_slot != src_slot && packet::decrement_ttl(pkt, &view) == Hop::Expired {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        Verdict::Forward(dst_slot)
    }

    /// L7 of the security review: an ICMP error from a device goes only to the other device of the flow it
    /// quotes, and only when that flow exists, is carried between these two devices and quotes this device's
    /// own address; an error that quotes anything else (another connection of the peer, a forged tuple) is
    /// dropped. Errors never start flows of their own.
    fn route_icmp_error(
        &mut self,
        src_slot: PeerSlot,
        ti: TenantIdx,
        pkt: &mut [u8],
        view: &IpView,
        quote: Option<packet::Quoted>,
    ) -> Verdict {
        // The quoted packet travelled from the error's destination to its source.
        let Some(q) = quote.filter(|q| q.src == view.dst && q.dst == view.src) else {
            return Verdict::Drop(DropReason::IcmpUnrelated);
        };
        let (key, _) = FlowKey::new(
            self.tenants[ti].num,
            q.protocol,
            q.src,
            q.sport,
            q.dst,
            q.dport,
        );
        let dst_slot = self.flows.lookup(&key).and_then(|i| {
            let f = self.flows.get(i);
            let carried = !matches!(f.action, Action::Deny | Action::Reject);
            match f.target {
                FlowTarget::Peer(peer) if carried && f.src_slot == src_slot => Some(peer),
                FlowTarget::Peer(peer) if carried && peer == src_slot => Some(f.src_slot),
                _ => None,
            }
        });
        let Some(dst_slot) = dst_slot else {
            return Verdict::Drop(DropReason::IcmpUnrelated);
        };
        if packet::decrement_ttl(pkt, view) == Hop::Expired {
            return Verdict::Drop(DropReason::TtlExpired);
        }
        Verdict::Forward(dst_slot)
    }

    /// Routes, limits and decides a new flow; records its start. `Err`: no flow is created, and the verdict
    /// for the packet says why.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_flow(
        &mut self,
        now: Instant,
        ti: TenantIdx,
        src_slot: PeerSlot,
        key: FlowKey,
        dir: KeyDir,
        view: &IpView,
        t: &Transport,
    ) -> Result<u32, Verdict> {
        let Some(route) = self.route_of(ti, src_slot, view.dst) else {
            return Err(Verdict::Reject(Unreachable::NoRoute, DropReason::NoRoute));
        };
        let now_ms = self.ms(now);
        if !self.take_new_flow_token(src_slot, now_ms) {
            return Err(Verdict::Drop(DropReason::FlowRateLimited));
        }
        if route == Route::Offramp && self.offramp_forbidden(ti, view.dst, t.dport) {
            self.note_refused(src_slot, view, t, Action::Reject, None, now_ms);
            return Err(Verdict::Reject(
                Unreachable::Prohibited,
                DropReason::OfframpForbidden,
            ));
        }
        if !self.admit_new_flows {
            return Err(Verdict::Drop(DropReason::AuditUnavailable));
        }
        let peer = self.peers[src_slot].as_ref().expect("caller holds slot");
        let tenant = &self.tenants[ti];
        let dport = Transport::has_ports(view.protocol).then_some(t.dport);
        let decision = tenant.policy.evaluate(
            &subject(peer),
            &Target {
                dst: view.dst,
                protocol: view.protocol,
                dport,
            },
        );
        // H3: UDP is never carried through the namespace to another device (it would leave the appliance
        // towards the device's tenant-internal address); such a rule refuses instead.
        let udp_to_device = decision.action.is_layer4()
            && matches!(route, Route::Peer(_))
            && view.protocol != PROTO_TCP;
        if matches!(decision.action, Action::Deny | Action::Reject) || udp_to_device {
            let action = if udp_to_device {
                Action::Reject
            } else {
                decision.action
            };
            self.note_refused(src_slot, view, t, action, decision.rule, now_ms);
            return Err(if action == Action::Reject {
                Verdict::Reject(Unreachable::Prohibited, DropReason::PolicyRejected)
            } else {
                Verdict::Drop(DropReason::PolicyDenied)
            });
        }
        let tenant = &self.tenants[ti];
        let num = tenant.num as usize;
        if self.peers[src_slot]
            .as_ref()
            .is_some_and(|p| p.live_flows >= self.device_max_flows)
        {
            return Err(Verdict::Drop(DropReason::DeviceFlowLimit));
        }
        if self.flows.len() >= self.max_flows
            || tenant.max_flows.is_some_and(|m| self.flow_counts[num] >= m)
        {
            if self
                .last_limit_warn_ms
                .is_none_or(|t| now_ms >= t + LIMIT_WARN_EVERY_MS)
            {
                self.last_limit_warn_ms = Some(now_ms);
                tracing::warn!(tenant = %tenant.id, flows = self.flows.len(), tenant_flows = self.flow_counts[num], "flow limit reached; new flows are dropped until some end");
            }
            return Err(Verdict::Drop(DropReason::FlowLimit));
        }
        let peer = self.peers[src_slot].as_ref().expect("caller holds slot");
        let rule = tenant.policy.rule_id(&decision);
        let carried = decision.action == Action::Allow || decision.action.is_layer4();
        // Carried at layer 4: allowed flows to upstream networks, and `proxy`/`inspect_*` flows (also between
        // devices, by splicing the upgraded stream to a downgraded one).
        let upgrade = carried
            && (route == Route::Offramp
                || (decision.action.is_layer4() && matches!(route, Route::Peer(_))));
        let (device, user) = (peer.device.name.clone(), peer.device.user.clone());
        let peer_device = peer.device.clone();
        let peer_groups = &peer_device.groups;
        let seq = self.next_flow_seq;
        let target = match route {
            Route::Local => FlowTarget::Local,
            Route::Peer(s) if !upgrade => FlowTarget::Peer(s),
            Route::Offramp if !upgrade => FlowTarget::Offramp,
            Route::Offramp | Route::Peer(_) => {
                let (IpAddr::V4(s), IpAddr::V4(d)) = (view.src, view.dst) else {
                    return Err(Verdict::Drop(DropReason::OfframpUnsupported));
                };
                if !Transport::has_ports(view.protocol) {
                    return Err(Verdict::Drop(DropReason::OfframpUnsupported));
                }
                let (src, dst) = (SocketAddrV4::new(s, t.sport), SocketAddrV4::new(d, t.dport));
                let nat_key = NatKey {
                    tenant: tenant.num,
                    protocol: view.protocol,
                    src,
                    dst,
                };
                let Ok(slot) = self.upgrade_nat.claim(nat_key, now_ms) else {
                    return Err(Verdict::Drop(DropReason::NatExhausted));
                };
                let splice_peer = match route {
                    Route::Peer(p) => Some(p),
                    _ => None,
                };
                let downgrade = match splice_peer {
                    Some(_) => match self.downgrade_nat.claim(nat_key, now_ms) {
                        Ok(d) => Some(d),
                        Err(_) => {
                            self.upgrade_nat.release(&nat_key, now_ms);
                            return Err(Verdict::Drop(DropReason::NatExhausted));
                        }
                    },
                    None => None,
                };
                self.events
                    .push_back(FlowEvent::Upgraded(Box::new(Upgraded {
                        seq,
                        slot,
                        protocol: view.protocol,
                        src,
                        dst,
                        tenant: tenant.id.clone(),
                        device: device.clone(),
                        user: user.clone(),
                        groups: Arc::from(peer_groups.as_slice()),
                        rule: rule.clone(),
                        downgrade,
                        inspect: tenant.policy.inspect(&decision),
                    })));
                FlowTarget::Upgrade(slot, splice_peer)
            }
        };
        self.next_flow_seq = seq.next();
        let dst_device = match route {
            Route::Peer(s) => self.peers[s].as_ref().map(|p| p.device.name.clone()),
            Route::Local | Route::Offramp => None,
        };
        let tenant = &self.tenants[ti];
        // The start record goes before the `Upgraded` event in the queue so the audit trail sees it first.
        let start = FlowEvent::Start(Box::new(FlowStart {
            seq,
            tenant: tenant.id.clone(),
            device,
            user,
            protocol: view.protocol,
            src: view.src,
            sport: t.sport,
            dst: view.dst,
            dport: t.dport,
            action: decision.action,
            rule,
            dst_device,
            at: now,
        }));
        let at = if upgrade {
            self.events.len() - 1
        } else {
            self.events.len()
        };
        self.events.insert(at, start);
        tracing::trace!(%seq, action = decision.action.as_str(), "flow start");
        self.tenants[ti].counters.flows_started.add(1);
        self.flow_counts[num] += 1;
        self.gauges_dirty = true;
        if let Some(p) = self.peers[src_slot].as_mut() {
            p.live_flows += 1;
        }
        Ok(self.flows.insert(Flow::new(
            key,
            dir,
            seq,
            src_slot,
            target,
            decision.action,
            decision.rule,
            now_ms,
        )))
    }

    /// Tells the sender of `pkt` that it was refused: TCP RST for TCP, ICMP unreachable otherwise (never in
    /// answer to an ICMP error or a RST).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reject(
        &mut self,
        src_slot: PeerSlot,
        ti: TenantIdx,
        pkt: &[u8],
        v: &IpView,
        t: &Transport,
        why: Unreachable,
        tx: &mut TxQueue,
    ) {
        // The unreachable comes from the gateway's address in the packet's family.
        let Some(&gw) = self.tenants[ti]
            .gateway_addresses
            .iter()
            .find(|a| a.is_ipv4() == v.src.is_ipv4())
        else {
            return;
        };
        let n = match v.protocol {
            PROTO_TCP if t.tcp_flags & TCP_RST != 0 => return,
            PROTO_TCP => {
                let (seq, ack) = if t.tcp_flags & TCP_ACK != 0 {
                    (t.tcp_ack, None)
                } else {
                    (0, Some(t.tcp_seq.wrapping_add(t.tcp_seg_len)))
                };
                packet::build_tcp_rst(
                    v.dst,
                    t.dport,
                    v.src,
                    t.sport,
                    seq,
                    ack,
                    &mut self.build_buf,
                )
            }
            PROTO_ICMP | PROTO_ICMPV6 if !packet::is_echo_request(pkt, v) => return,
            _ => packet::build_unreachable(pkt, v, gw, why, &mut self.build_buf),
        };
        if let Some(n) = n {
            self.send_built(src_slot, n, tx);
        }
    }
}
