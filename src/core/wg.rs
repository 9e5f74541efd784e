//! The one module that talks to boringtun: peers and their slots, the WireGuard datagram front (demux by
//! receiver index, handshake gate), decapsulation, encryption towards a peer, peer timers.

use super::tx::BUF_SIZE;
use super::*;

/// Room for any WireGuard message that is not data (initiation 148 bytes, response 92, cookie reply 64).
const CONTROL_MAX: usize = 256;

/// Room for encrypting an inner packet of `len` bytes: the packet plus WireGuard's 32 bytes, and never less
/// than a handshake initiation (boringtun writes one into the same buffer when it has no session yet).
fn data_slot(len: usize) -> usize {
    (len + 32).clamp(CONTROL_MAX, BUF_SIZE)
}

/// Joins the peer in `slot` (whose `timed` flag is `flag`) to `timed` (the peers whose timers run on every
/// `TimerKind::PeerTimers` tick), once.
fn arm_timers(flag: &mut bool, slot: PeerSlot, timed: &mut Vec<PeerSlot>) {
    if !*flag {
        *flag = true;
        timed.push(slot);
    }
}

impl Gateway {
    /// A slot for a new subject (device or on-ramp connection): the oldest freed one once its quarantine is
    /// over, else a new one; `None` when the worker has `MAX_SLOTS`.
    pub(super) fn take_slot(&mut self, now: Instant) -> Option<PeerSlot> {
        match self.free_slots.front() {
            Some(&(slot, freed)) if now.saturating_duration_since(freed) >= SLOT_QUARANTINE => {
                self.free_slots.pop_front();
                Some(slot)
            }
            _ if self.peers.len() < MAX_SLOTS => {
                self.peers.push(None);
                Some(PeerSlot::from_index(self.peers.len() - 1))
            }
            _ => None,
        }
    }

    pub(super) fn add_peer(
        &mut self,
        tenant: TenantIdx,
        d: &Device,
        now: Instant,
    ) -> Option<PeerSlot> {
        let Some(slot) = self.take_slot(now) else {
            tracing::error!(device = %d.name, "no free peer slot ({MAX_SLOTS} per worker); device not connected");
            return None;
        };
        let index = (slot.get() << WORKER_BITS) | u32::from(self.worker);
        debug_assert!(index < 1 << 24);
        let tunn = Tunn::new(
            self.secret.clone(),
            d.public_key.to_x25519(),
            None,
            None,
            index,
            Some(self.mac1_only.clone()),
        );
        self.peers[slot] = Some(Peer {
            link: Link::Wg(tunn),
            key: d.public_key,
            tenant,
            device: Arc::new(d.clone()),
            endpoint: None,
            live_flows: 0,
            timed: false,
            tokens_milli: u64::from(self.new_flow_rate.1) * 1000,
            refilled_ms: self.ms(now),
        });
        self.by_key.insert(d.public_key, slot);
        tracing::debug!(device = %d.name, %slot, "peer added");
        Some(slot)
    }

    pub(super) fn remove_peer(&mut self, key: PeerKey, now: Instant) {
        if let Some(slot) = self.by_key.remove(&key) {
            if let Some(p) = self.peers[slot].take() {
                tracing::info!(device = %p.device.name, "device removed; tunnel closed");
            }
            self.free_slots.push_back((slot, now));
            self.timed.retain(|&s| s != slot);
            self.gauges_dirty = true;
            for c in self.closing.values_mut() {
                if c.initiator == Some(slot) {
                    c.initiator = None;
                }
            }
        }
    }

    /// Handles one UDP datagram from `from`. `scratch` must hold any datagram (65,536 bytes is enough).
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        self.advance(now);
        self.handle_one_datagram(now, from, datagram, scratch, tx);
    }

    /// Handles the datagrams of one received message from `from`, in order: a train the kernel coalesced
    /// (UDP GRO, split by the shell with `sys::split_gro`), or a single datagram. Each datagram is still
    /// authenticated, decrypted and routed on its own, so a bad one in the middle drops only itself (counted);
    /// what consecutive datagrams share is not done again: the clock moves once per train, the peer comes from
    /// the receiver index by a `Vec` index (no hash), and the flow table answers the next packet of the flow it
    /// found last without hashing (`FlowTable::find`).
    pub fn handle_datagrams<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagrams: impl IntoIterator<Item = &'a [u8]>,
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        self.advance(now);
        for d in datagrams {
            self.handle_one_datagram(now, from, d, scratch, tx);
        }
    }

    fn handle_one_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        let g = &self.metrics.global;
        g.datagrams_rx.add(1);
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return g.unattributed.count_drop(DropReason::MalformedDatagram),
        };
        let slot = match packet {
            Packet::HandshakeInit(_) => {
                // The gate's count must be reset (once a second) for a while after every initiation.
                self.gate_busy_until = Some(now + super::timers::GATE_BUSY);
                // Gate before any DH: under load this answers with a cookie reply instead.
                let half = match self.gate.verify_packet(
                    Some(from.ip()),
                    datagram,
                    tx.slot(from, CONTROL_MAX),
                ) {
                    Ok(Packet::HandshakeInit(init)) => {
                        parse_handshake_anon(&self.secret, &self.public, &init)
                    }
                    Ok(_) => return g.unattributed.count_drop(DropReason::MalformedDatagram),
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let len = cookie.len();
                        tx.commit(len);
                        g.cookie_replies.add(1);
                        return g.unattributed.count_drop(DropReason::UnderLoad);
                    }
                    Err(_) => return g.unattributed.count_drop(DropReason::HandshakeInvalid),
                };
                let Ok(half) = half else {
                    return g.unattributed.count_drop(DropReason::HandshakeInvalid);
                };
                match self.by_key.get(&PeerKey(half.peer_static_public)) {
                    Some(&slot) => slot,
                    None => return g.unattributed.count_drop(DropReason::UnknownPeer),
                }
            }
            Packet::HandshakeResponse(p) => match self.slot_of(p.receiver_idx) {
                Some(s) => s,
                None => return g.unattributed.count_drop(DropReason::UnknownReceiver),
            },
            Packet::PacketCookieReply(p) => match self.slot_of(p.receiver_idx) {
                Some(s) => s,
                None => return g.unattributed.count_drop(DropReason::UnknownReceiver),
            },
            Packet::PacketData(p) => match self.slot_of(p.receiver_idx) {
                Some(s) => s,
                None => return g.unattributed.count_drop(DropReason::UnknownReceiver),
            },
        };
        let is_data = datagram.first() == Some(&4);
        self.decapsulate(now, slot, from, datagram, is_data, scratch, tx);
    }

    /// The peer slot a receiver index names, if it belongs to this worker and is occupied.
    pub(super) fn slot_of(&self, receiver_idx: u32) -> Option<PeerSlot> {
        let slot = PeerSlot::new(receiver_idx >> (8 + WORKER_BITS));
        let worker = (receiver_idx >> 8) & (MAX_WORKERS as u32 - 1);
        // On-ramp connections have slots too, but no receiver index: a datagram naming one is unknown.
        (worker == u32::from(self.worker)
            && matches!(
                self.peers.get(slot.index()),
                Some(Some(Peer {
                    link: Link::Wg(_),
                    ..
                }))
            ))
        .then_some(slot)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn decapsulate(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        from: SocketAddr,
        datagram: &[u8],
        is_data: bool,
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        let peer = self.peers[slot].as_mut().expect("slot_of checked");
        let counters = &self.tenants[peer.tenant].counters;
        let Link::Wg(tunn) = &mut peer.link else {
            return counters.count_drop(DropReason::MalformedDatagram);
        };
        // Only a handshake's log line needs it, and it reads the clock: not per data packet.
        let had_session = !is_data && tunn.time_since_last_handshake().is_some();
        let result = tunn.decapsulate(Some(from.ip()), datagram, scratch);
        // Only what boringtun authenticated arms the peer's timers: forged datagrams naming a receiver index
        // must not make every configured peer cost a timer run per tick.
        if !matches!(result, TunnResult::Err(_)) {
            arm_timers(&mut peer.timed, slot, &mut self.timed);
        }
        let inner_len = match result {
            TunnResult::WriteToNetwork(out) => {
                // Authenticated (a handshake answered, or a response completed): the endpoint is proven.
                let len = out.len();
                tx.slot(from, len)[..len].copy_from_slice(out);
                tx.commit(len);
                peer.endpoint = Some(from);
                if !is_data {
                    counters.handshakes.add(1);
                    if had_session {
                        tracing::debug!(tenant = %self.tenants[peer.tenant].id, device = %peer.device.name, "rekeyed");
                    } else {
                        tracing::info!(tenant = %self.tenants[peer.tenant].id, device = %peer.device.name, user = %peer.device.user, "tunnel up");
                    }
                }
                // Flush packets boringtun queued while there was no session.
                while let TunnResult::WriteToNetwork(out) =
                    tunn.decapsulate(None, &[], tx.slot(from, BUF_SIZE))
                {
                    let len = out.len();
                    tx.commit(len);
                }
                return;
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => p.len(),
            TunnResult::Done => {
                if is_data {
                    peer.endpoint = Some(from); // authenticated keepalive
                }
                return;
            }
            TunnResult::Err(e) => {
                return counters.count_drop(match e {
                    WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
                        DropReason::Replayed
                    }
                    WireGuardError::NoCurrentSession | WireGuardError::WrongIndex => {
                        DropReason::NoSession
                    }
                    WireGuardError::InvalidAeadTag => DropReason::DecryptFailed,
                    WireGuardError::ConnectionExpired => DropReason::ConnectionExpired,
                    WireGuardError::UnderLoad => DropReason::UnderLoad,
                    WireGuardError::InvalidMac
                    | WireGuardError::WrongKey
                    | WireGuardError::InvalidTai64nTimestamp
                    | WireGuardError::WrongTai64nTimestamp => DropReason::HandshakeInvalid,
                    _ => DropReason::MalformedDatagram,
                });
            }
        };
        peer.endpoint = Some(from);
        counters.rx_packets.add(1);
        counters.rx_bytes.add(inner_len as u64);
        self.route_inner(now, slot, &mut scratch[..inner_len], tx);
    }

    /// Encrypts the first `n` bytes of `build_buf` to the peer in `slot`.
    pub(super) fn send_built(&mut self, slot: PeerSlot, n: usize, tx: &mut TxQueue) {
        let Some(p) = self.peers[slot].as_mut() else {
            return;
        };
        let tunn = match &mut p.link {
            Link::Wg(t) => t,
            Link::Conn(_) => return self.conn_out.push(slot, &self.build_buf[..n]),
        };
        let Some(endpoint) = p.endpoint else { return };
        arm_timers(&mut p.timed, slot, &mut self.timed);
        let buf = tx.slot(endpoint, data_slot(n));
        if let TunnResult::WriteToNetwork(out) = tunn.encapsulate(&self.build_buf[..n], buf) {
            let len = out.len();
            tx.commit(len);
        }
    }

    /// Encrypts an inner packet to the peer in `slot` and queues it for its endpoint.
    pub(super) fn send_to_peer(
        &mut self,
        slot: PeerSlot,
        pkt: &[u8],
        counters: &TrafficCounters,
        tx: &mut TxQueue,
    ) {
        // A flow may outlive its peer until the next reload re-checks it: never trust the slot.
        let Some(peer) = self.peers.get_mut(slot.index()).and_then(Option::as_mut) else {
            return counters.count_drop(DropReason::DestinationOffline);
        };
        let tunn = match &mut peer.link {
            Link::Wg(t) => t,
            Link::Conn(_) => {
                self.conn_out.push(slot, pkt);
                counters.tx_packets.add(1);
                counters.tx_bytes.add(pkt.len() as u64);
                return;
            }
        };
        let Some(endpoint) = peer.endpoint else {
            return counters.count_drop(DropReason::DestinationOffline);
        };
        arm_timers(&mut peer.timed, slot, &mut self.timed);
        // Encrypted straight into the destination's send train.
        match tunn.encapsulate(pkt, tx.slot(endpoint, data_slot(pkt.len()))) {
            TunnResult::WriteToNetwork(out) => {
                let n = out.len();
                tx.commit(n);
                counters.tx_packets.add(1);
                counters.tx_bytes.add(pkt.len() as u64);
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                counters.count_drop(DropReason::ConnectionExpired)
            }
            // Queued inside boringtun until the handshake it started completes.
            _ => {}
        }
    }

    /// Drives the timers of every armed peer (handshake retries, keepalives, expiry); from `handle_timeout`.
    pub(super) fn run_peer_timers(&mut self, tx: &mut TxQueue) {
        let mut connected = vec![0u64; self.tenants.len()];
        let mut i = 0;
        while i < self.timed.len() {
            let slot = self.timed[i];
            let Some(p) = self.peers[slot].as_mut().filter(|p| p.timed) else {
                self.timed.swap_remove(i);
                continue;
            };
            let to = p.endpoint.unwrap_or(UNADDRESSED);
            let Link::Wg(tunn) = &mut p.link else {
                p.timed = false;
                self.timed.swap_remove(i);
                continue;
            };
            match tunn.update_timers(tx.slot(to, CONTROL_MAX)) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    if p.endpoint.is_some() {
                        tx.commit(len);
                    }
                }
                // Keys zeroed, retries given up, nothing queued: idle until the next datagram or packet.
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    p.timed = false;
                    self.timed.swap_remove(i);
                    continue;
                }
                TunnResult::Done => {}
                TunnResult::Err(e) => tracing::trace!(device = %p.device.name, ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
            // A peer outside `timed` has no session younger than REJECT_AFTER_TIME * 3 > CONNECTED_WINDOW.
            if tunn
                .time_since_last_handshake()
                .is_some_and(|t| t < CONNECTED_WINDOW)
            {
                connected[p.tenant.get()] += 1;
            }
            i += 1;
        }
        self.metrics.global.peers_timed.set(self.timed.len() as u64);
        for (t, n) in self.tenants.iter().zip(connected) {
            t.counters.peers_connected.set(n);
        }
    }

    /// Restores a device's last known endpoint (after a restart) and sends it a handshake initiation, so the
    /// device does not have to notice the restart by itself.
    pub fn handle_restored_endpoint(
        &mut self,
        key: PeerKey,
        endpoint: SocketAddr,
        tx: &mut TxQueue,
    ) -> bool {
        let Some(&slot) = self.by_key.get(&key) else {
            return false;
        };
        let p = self.peers[slot].as_mut().expect("indexed peer exists");
        let Link::Wg(tunn) = &mut p.link else {
            return false;
        };
        if p.endpoint.is_some() {
            return false;
        }
        p.endpoint = Some(endpoint);
        arm_timers(&mut p.timed, slot, &mut self.timed);
        match tunn.format_handshake_initiation(tx.slot(endpoint, CONTROL_MAX), false) {
            TunnResult::WriteToNetwork(out) => {
                let len = out.len();
                tx.commit(len);
                true
            }
            _ => false,
        }
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .flatten()
            .filter_map(|p| {
                let Link::Wg(tunn) = &p.link else {
                    return None;
                };
                let (last, tx_bytes, rx_bytes, _, _) = tunn.stats();
                Some(PeerStatus {
                    tenant: self.tenants[p.tenant].id.clone(),
                    name: p.device.name.clone(),
                    public_key: p.key,
                    endpoint: p.endpoint,
                    last_handshake_secs: last.map(|d| d.as_secs()),
                    rx_bytes: rx_bytes as u64,
                    tx_bytes: tx_bytes as u64,
                })
            })
            .collect()
    }
}
