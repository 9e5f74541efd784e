//! Reload reconciliation and flow endings: `apply` a new config (peers, tenants, policies), re-check live flows
//! against it, cut what is no longer allowed; end flows on shutdown or when the namespace is lost.

use super::*;

impl Gateway {
    /// Reconciles tenants and devices with `cfg`: new devices get a tunnel, removed devices lose theirs at once
    /// (their packets are dropped from the next datagram on), unchanged devices keep their sessions.
    /// Live flows are re-checked against the new policy and routes: a flow that is no longer allowed ends
    /// (`PolicyRevoked` / `PeerRemoved`), and TCP connections are reset on both sides (RSTs queued in `tx`).
    pub fn apply(&mut self, cfg: &Config, now: Instant, tx: &mut TxQueue) -> ApplySummary {
        self.advance(now);
        self.gauges_dirty = true;
        let mut summary = ApplySummary::default();
        let mut wanted: HashMap<PeerKey, (TenantIdx, &Device)> = HashMap::new();
        for (ti, t) in cfg.tenants.iter().enumerate() {
            for d in &t.devices {
                wanted.insert(d.public_key, (TenantIdx::new(ti), d));
            }
        }
        // Remove peers that are gone or moved to another tenant (a tenant move gets a fresh tunnel). `peer.tenant`
        // still indexes the previous tenant list here.
        let stale: Vec<PeerKey> = self
            .by_key
            .iter()
            .filter(|(k, &slot)| {
                let peer = self.peers[slot].as_ref().expect("indexed peer exists");
                wanted
                    .get(*k)
                    .is_none_or(|(ti, _)| cfg.tenants[ti.get()].id != self.tenants[peer.tenant].id)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.remove_peer(k, now);
            summary.removed += 1;
        }
        // On-ramp connections follow their tenant by id (its index may change); `peer.tenant` still indexes
        // the previous tenant list here.
        let conn_tenants = self.conn_tenants();
        let mut nums = Vec::with_capacity(cfg.tenants.len());
        for t in &cfg.tenants {
            let next = self.tenant_nums.len() as u32;
            nums.push(*self.tenant_nums.entry(t.id.clone()).or_insert(next));
        }
        self.flow_counts.resize(self.tenant_nums.len(), 0);
        self.tenants = cfg
            .tenants
            .iter()
            .zip(nums)
            .map(|(t, num)| TenantState {
                id: t.id.clone(),
                num,
                gateway_addresses: t.gateway_addresses().collect(),
                policy: Policy::compile(t),
                max_flows: t.max_flows,
                offramp: t.offramp.clone(),
                offramp_allow_local: t.offramp_allow_local.clone(),
                pools: t.pools().collect(),
                routes: HashMap::with_capacity(t.devices.len()),
                conn_routes: Vec::new(),
                counters: self.metrics.tenant(&t.id),
            })
            .collect();
        self.tenant_by_num = vec![None; self.tenant_nums.len()];
        for (i, t) in self.tenants.iter().enumerate() {
            self.tenant_by_num[t.num as usize] = Some(TenantIdx::new(i));
        }
        self.flows.set_timeouts(&cfg.flows);
        self.max_flows = cfg.flows.max_flows;
        self.device_max_flows = cfg.flows.device_max_flows;
        self.new_flow_rate = (
            cfg.flows.device_new_flows_per_sec,
            cfg.flows.device_new_flows_burst,
        );
        self.deny_summary_ms = cfg.flows.deny_summary.as_millis() as u64;
        let mut keys: Vec<&PeerKey> = wanted.keys().collect();
        keys.sort(); // deterministic slot assignment
        for key in keys {
            let (ti, d) = wanted[key];
            if let Some(&slot) = self.by_key.get(key) {
                let peer = self.peers[slot].as_mut().expect("indexed peer exists");
                if *peer.device != *d {
                    summary.updated += 1;
                    peer.device = Arc::new(d.clone());
                }
                peer.tenant = ti;
            } else if self.add_peer(ti, d, now).is_some() {
                summary.added += 1;
            } else {
                summary.rejected += 1;
            }
        }
        self.remap_conns(conn_tenants, now);
        for (slot, p) in self.peers.iter().enumerate() {
            if let Some(p) = p.as_ref().filter(|p| matches!(p.link, Link::Wg(_))) {
                let routes = &mut self.tenants[p.tenant].routes;
                for a in p.device.addresses() {
                    routes.insert(a, PeerSlot::from_index(slot));
                }
            }
        }
        // Devices, not routes: a dual-stack device has two addresses.
        let mut devices = vec![0u64; self.tenants.len()];
        for p in self.peers.iter().flatten() {
            if matches!(p.link, Link::Wg(_)) {
                devices[p.tenant.get()] += 1;
            }
        }
        for (t, n) in self.tenants.iter().zip(devices) {
            t.counters.peers.set(n);
        }
        self.rebuild_conn_routes();
        self.recheck_flows(now, tx);
        summary
    }

    /// After a reload: ends flows whose route or decision changed; resets cut TCP connections. Every flow is
    /// re-checked, ended ones too (they still carry the tail of their connection).
    pub(super) fn recheck_flows(&mut self, now: Instant, tx: &mut TxQueue) {
        for idx in self.flows.indices() {
            let f = self.flows.get(idx);
            let (src, sport, dst, dport) = f.endpoints();
            let verdict = match (
                self.tenant_index(f.key.tenant()),
                self.peers.get(f.src_slot.index()),
            ) {
                (Some(ti), Some(Some(p))) if p.tenant == ti && p.sends_from(src) => {
                    let t = &self.tenants[ti];
                    match self.route_of(ti, f.src_slot, dst) {
                        Some(route) if route.carries(f.target) => {
                            let protocol = f.key.protocol();
                            let dport_for_policy = Transport::has_ports(protocol).then_some(dport);
                            let d = t.policy.evaluate(
                                &subject(p),
                                &Target {
                                    dst,
                                    protocol,
                                    dport: dport_for_policy,
                                },
                            );
                            if d.action == f.action {
                                Ok(d.rule)
                            } else {
                                Err(EndReason::PolicyRevoked)
                            }
                        }
                        _ => Err(EndReason::PeerRemoved),
                    }
                }
                _ => Err(EndReason::PeerRemoved),
            };
            let f = self.flows.get(idx);
            let tcp_layer3 =
                f.key.protocol() == PROTO_TCP && matches!(f.target, FlowTarget::Peer(_));
            match verdict {
                Ok(rule) => self.flows.get_mut(idx).rule = rule,
                // Already ended (and recorded): it no longer carries even its tail on the old decision.
                Err(_) if f.state == flow_table::FlowState::Ended => {
                    if tcp_layer3 {
                        self.flows.get_mut(idx).action = Action::Reject;
                    } else {
                        let f = self.flows.remove(idx);
                        self.forget_flow(&f);
                    }
                }
                Err(reason) => {
                    let carried = !matches!(f.action, Action::Deny | Action::Reject);
                    let (seq, was_open_tcp) = (f.seq, carried && f.key.protocol() == PROTO_TCP);
                    if was_open_tcp {
                        self.reset_both_sides(idx, src, sport, dst, dport, tx);
                    }
                    tracing::debug!(%seq, reason = reason.as_str(), "flow cut after reload");
                    if was_open_tcp && tcp_layer3 {
                        // Keep the cut connection as a lingering rejected flow: a segment still in flight
                        // (which the RSTs above may not match exactly) is answered with a RST built from its
                        // own ACK, which the sender always accepts.
                        let f = self.flows.get_mut(idx);
                        f.state = flow_table::FlowState::Ended;
                        f.action = Action::Reject;
                        self.record_end(idx, now, reason);
                    } else {
                        self.end_flow(idx, now, reason);
                    }
                }
            }
        }
    }

    /// Sends an acceptable RST to each end of a TCP flow, as if from the other end.
    pub(super) fn reset_both_sides(
        &mut self,
        idx: u32,
        src: IpAddr,
        sport: u16,
        dst: IpAddr,
        dport: u16,
        tx: &mut TxQueue,
    ) {
        let f = self.flows.get(idx);
        let (src_slot, target, next_seq) = (f.src_slot, f.target, f.next_seq);
        if let Some(n) = packet::build_tcp_rst(
            dst,
            dport,
            src,
            sport,
            next_seq[IN],
            None,
            &mut self.build_buf,
        ) {
            self.send_built(src_slot, n, tx);
        }
        if let FlowTarget::Peer(t) = target {
            if let Some(n) = packet::build_tcp_rst(
                src,
                sport,
                dst,
                dport,
                next_seq[OUT],
                None,
                &mut self.build_buf,
            ) {
                self.send_built(t, n, tx);
            }
        }
    }

    /// Removes a flow that has not ended yet and records its end.
    pub(super) fn end_flow(&mut self, idx: u32, now: Instant, reason: EndReason) {
        self.record_end(idx, now, reason);
        let f = self.flows.remove(idx);
        self.forget_flow(&f);
    }

    /// Queues the end record of flow `idx` (which may linger in the table). Unless the connection closed
    /// normally, its NAT slot is retired at once, so the application side cuts what it holds for the flow; a
    /// normal close (FIN both ways) keeps the slot until the flow leaves the table, so retransmissions of
    /// data sent before the FINs still get through while the proxy finishes on its own.
    pub(super) fn record_end(&mut self, idx: u32, now: Instant, reason: EndReason) {
        let f = self.flows.get(idx).clone();
        self.push_end(&f, now, reason);
        if reason != EndReason::TcpFin {
            self.retire_upgrade(&f);
        }
    }

    /// The one end record of flow `f`. From here on it no longer counts among its device's live flows
    /// (`flows.device_max_flows`): an ended flow lingers `LINGER_MS` at most, and a device opens new ones no
    /// faster than its token bucket, so closed connections cannot starve a device of new ones.
    pub(super) fn push_end(&mut self, f: &Flow, now: Instant, reason: EndReason) {
        self.events.push_back(FlowEvent::End {
            seq: f.seq,
            at: now,
            packets: f.packets,
            bytes: f.bytes,
            reason,
        });
        if let Some(Some(p)) = self.peers.get_mut(f.src_slot.index()) {
            p.live_flows = p.live_flows.saturating_sub(1);
        }
    }

    /// An upgraded flow ended: its slots stop translating payload and the application side is told to close
    /// its sockets (`FlowEvent::Released`). Idempotent.
    fn retire_upgrade(&mut self, f: &Flow) {
        let (FlowTarget::Upgrade(_, peer), Some(key)) = (f.target, nat_key(f)) else {
            return;
        };
        let Some(slot) = self.upgrade_nat.retire(&key) else {
            return;
        };
        let downgrade = peer.and_then(|_| self.downgrade_nat.retire(&key));
        self.closing.insert(
            slot,
            Closing {
                seq: f.seq,
                downgrade,
                initiator: Some(f.src_slot),
            },
        );
        self.events
            .push_back(FlowEvent::Released { seq: f.seq, slot });
    }

    /// The application side closed every socket of the flow `seq` on `slot`: the slot (and its downgrade
    /// address) go into quarantine, after which a new flow may have them.
    pub fn handle_slot_closed(&mut self, now: Instant, slot: SocketAddrV4, seq: FlowSeq) {
        if self.closing.get(&slot).is_none_or(|c| c.seq != seq) {
            return;
        }
        self.advance(now);
        self.gauges_dirty = true;
        let c = self.closing.remove(&slot).expect("checked above");
        let now_ms = self.ms(now);
        self.upgrade_nat.release_slot(slot, now_ms);
        if let Some(d) = c.downgrade {
            self.downgrade_nat.release_slot(d, now_ms);
        }
    }

    /// A flow leaves the table (its end is recorded already).
    pub(super) fn forget_flow(&mut self, f: &Flow) {
        let n = &mut self.flow_counts[f.key.tenant() as usize];
        *n = n.saturating_sub(1);
        self.gauges_dirty = true;
        self.retire_upgrade(f);
    }

    /// Ends every upgraded flow (their kernel sockets lived in a namespace that is gone); TCP devices get a RST.
    pub fn end_upgraded_flows(&mut self, now: Instant, tx: &mut TxQueue) {
        self.advance(now);
        self.gauges_dirty = true;
        for idx in self.flows.indices() {
            let f = self.flows.get(idx);
            if !matches!(f.target, FlowTarget::Upgrade(..))
                || f.state == flow_table::FlowState::Ended
            {
                continue;
            }
            if f.key.protocol() == PROTO_TCP {
                let (src, sport, dst, dport) = f.endpoints();
                let (slot, seq_in) = (f.src_slot, f.next_seq[IN]);
                if let Some(n) =
                    packet::build_tcp_rst(dst, dport, src, sport, seq_in, None, &mut self.build_buf)
                {
                    self.send_built(slot, n, tx);
                }
            }
            self.end_flow(idx, now, EndReason::UpgradeLost);
        }
        // Every socket of the old namespace is gone with it: no slot waits for a report any more.
        let now_ms = self.ms(now);
        for (slot, c) in std::mem::take(&mut self.closing) {
            self.upgrade_nat.release_slot(slot, now_ms);
            if let Some(d) = c.downgrade {
                self.downgrade_nat.release_slot(d, now_ms);
            }
        }
    }

    /// Ends every live flow (clean shutdown), so every flow record gets its end.
    pub fn shutdown(&mut self, now: Instant) {
        self.flush_refused(now);
        for idx in self.flows.indices() {
            if self.flows.get(idx).state == flow_table::FlowState::Ended {
                let f = self.flows.remove(idx);
                self.forget_flow(&f);
            } else {
                self.end_flow(idx, now, EndReason::Shutdown);
            }
        }
    }
}
