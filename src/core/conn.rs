//! Connected on-ramp subjects (a Unix `SOCK_SEQPACKET` connection per subject, `onramp::seqpacket`): each
//! accepted connection gets a peer slot like a WireGuard device, with a `Link::Conn` instead of a tunnel. Its
//! packets go through the same `route_inner` (anti-spoofing against the prefixes its grant names, flows,
//! policy, off-ramp, delivery to devices of the same tenant); packets for it are queued in `ConnOut` by slot
//! and the shell writes them to the connection. Closing it ends its flows as removing a device does.
//!
//! Sans-IO like the rest of the core: the shell authorizes the client (`SO_PEERCRED`, the entry's grants) and
//! owns the socket; the core only sees slots and packets.

use super::*;

/// What a connection is: the grant it was accepted under.
#[derive(Debug)]
pub struct ConnLink {
    /// Inner source networks it may send from (and that route to it).
    pub prefixes: Vec<ipnet::IpNet>,
    /// Order of acceptance: a newer connection wins the routes of prefixes it shares with an older one.
    pub seq: u64,
    /// Largest packet it takes (a GUE site's `mtu`); larger ones are answered with ICMP too big.
    pub mtu: Option<u16>,
}

/// What the shell hands the core for an accepted connection.
#[derive(Debug, Clone)]
pub struct ConnGrant {
    pub tenant: TenantId,
    pub prefixes: Vec<ipnet::IpNet>,
    /// The subject's name in flow records and policy (`devices = [...]`): `onramp[/site[/device]]`.
    pub name: DeviceName,
    pub user: UserName,
    pub groups: Vec<String>,
    /// Largest packet the subject takes (`None`: any).
    pub mtu: Option<u16>,
}

/// Packets for on-ramp connections, back to back in one reusable buffer, each tagged with its slot.
#[derive(Debug, Default)]
pub struct ConnOut {
    buf: Vec<u8>,
    items: Vec<(PeerSlot, usize, usize)>,
}

impl ConnOut {
    pub(super) fn push(&mut self, slot: PeerSlot, pkt: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(pkt);
        self.items.push((slot, start, pkt.len()));
    }

    /// `(slot, packet)` in the order they were queued.
    pub fn iter(&self) -> impl Iterator<Item = (PeerSlot, &[u8])> + '_ {
        self.items
            .iter()
            .map(|&(slot, start, len)| (slot, &self.buf[start..start + len]))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }
}

impl Peer {
    /// Whether this subject may send from `a`: a device from its addresses, a connection from its prefixes.
    pub(super) fn sends_from(&self, a: IpAddr) -> bool {
        match &self.link {
            Link::Wg(_) => self.device.has_address(a),
            Link::Conn(c) => c.prefixes.iter().any(|n| n.contains(&a)),
        }
    }
}

impl Gateway {
    /// The largest packet the subject in `slot` takes, when it has a limit (a GUE site).
    pub(super) fn conn_mtu(&self, slot: PeerSlot) -> Option<u16> {
        match self.peers.get(slot.index()) {
            Some(Some(Peer {
                link: Link::Conn(c),
                ..
            })) => c.mtu,
            _ => None,
        }
    }

    /// Gives an accepted connection a slot. `None`: the tenant is not configured, or no slot is free.
    pub fn open_conn(&mut self, now: Instant, grant: ConnGrant) -> Option<PeerSlot> {
        self.advance(now);
        let ti = TenantIdx::new(self.tenants.iter().position(|t| t.id == grant.tenant)?);
        let address = grant.prefixes.first()?.network();
        let slot = self.take_slot(now)?;
        let seq = self.next_conn_seq;
        self.next_conn_seq += 1;
        self.peers[slot] = Some(Peer {
            link: Link::Conn(Box::new(ConnLink {
                prefixes: grant.prefixes,
                seq,
                mtu: grant.mtu,
            })),
            key: PeerKey([0; 32]),
            tenant: ti,
            device: Arc::new(Device {
                name: grant.name,
                public_key: PeerKey([0; 32]),
                address,
                address_v6: None,
                user: grant.user,
                groups: grant.groups,
                ssh_keys: Vec::new(),
                origin: crate::config::DeviceOrigin::Config,
            }),
            endpoint: None,
            live_flows: 0,
            timed: false,
            tokens_milli: u64::from(self.new_flow_rate.1) * 1000,
            refilled_ms: self.ms(now),
        });
        self.rebuild_conn_routes();
        Some(slot)
    }

    /// One datagram from the connection in `slot`. Returns false when it was not an IP packet (the shell
    /// closes a connection after too many); every drop is counted on the tenant.
    pub fn handle_conn_packet(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        pkt: &mut [u8],
        tx: &mut TxQueue,
    ) -> bool {
        self.advance(now);
        let Some(Some(p)) = self.peers.get(slot.index()) else {
            return false;
        };
        if !matches!(p.link, Link::Conn(_)) {
            return false;
        }
        let counters = &self.tenants[p.tenant].counters;
        if packet::parse_ip(pkt).is_err() {
            counters.count_drop(DropReason::InvalidInnerPacket);
            return false;
        }
        counters.rx_packets.add(1);
        counters.rx_bytes.add(pkt.len() as u64);
        self.route_inner(now, slot, pkt, tx);
        true
    }

    /// A packet for the connection in `slot` could not be written (its socket is full): counted, never silent.
    pub fn count_conn_drop(&self, slot: PeerSlot, reason: DropReason) {
        match self.peers.get(slot.index()) {
            Some(Some(p)) => self.tenants[p.tenant].counters.count_drop(reason),
            _ => self.metrics.global.unattributed.count_drop(reason),
        }
    }

    /// The connection in `slot` closed: its slot is freed and its flows end as a removed device's do (TCP
    /// connections to devices are reset).
    pub fn close_conn(&mut self, now: Instant, slot: PeerSlot, tx: &mut TxQueue) {
        if !matches!(
            self.peers.get(slot.index()),
            Some(Some(Peer {
                link: Link::Conn(_),
                ..
            }))
        ) {
            return;
        }
        self.drop_conn_slot(slot, now);
        self.rebuild_conn_routes();
        self.recheck_flows(now, tx);
    }

    fn drop_conn_slot(&mut self, slot: PeerSlot, now: Instant) {
        if let Some(p) = self.peers[slot].take() {
            tracing::info!(subject = %p.device.name, "on-ramp connection closed");
        }
        self.free_slots.push_back((slot, now));
        self.timed.retain(|&s| s != slot);
        for c in self.closing.values_mut() {
            if c.initiator == Some(slot) {
                c.initiator = None;
            }
        }
    }

    /// Packets the core wants written to on-ramp connections; the shell writes and clears them after each batch.
    pub fn conn_queue(&mut self) -> &mut ConnOut {
        &mut self.conn_out
    }

    /// Connections the core ended by itself (a reload removed their tenant): the shell closes them.
    pub fn take_ended_conns(&mut self, out: &mut Vec<PeerSlot>) {
        out.append(&mut self.conns_ended);
    }

    /// Before a reload replaces the tenant list: each connection's slot and tenant id.
    pub(super) fn conn_tenants(&self) -> Vec<(PeerSlot, TenantId)> {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(s, p)| match p {
                Some(
                    p @ Peer {
                        link: Link::Conn(_),
                        ..
                    },
                ) => Some((PeerSlot::from_index(s), self.tenants[p.tenant].id.clone())),
                _ => None,
            })
            .collect()
    }

    /// After a reload: each connection follows its tenant to its new index, or ends when the tenant is gone.
    pub(super) fn remap_conns(&mut self, conns: Vec<(PeerSlot, TenantId)>, now: Instant) {
        for (slot, id) in conns {
            match self.tenants.iter().position(|t| t.id == id) {
                Some(ti) => {
                    if let Some(p) = self.peers[slot].as_mut() {
                        p.tenant = TenantIdx::new(ti);
                    }
                }
                None => {
                    self.drop_conn_slot(slot, now);
                    self.conns_ended.push(slot);
                }
            }
        }
    }

    /// Each tenant's prefix routes to its connections, newest connection first.
    pub(super) fn rebuild_conn_routes(&mut self) {
        for t in &mut self.tenants {
            t.conn_routes.clear();
        }
        let mut conns: Vec<(u64, PeerSlot, TenantIdx)> = Vec::new();
        for (slot, p) in self.peers.iter().enumerate() {
            if let Some(Peer {
                link: Link::Conn(c),
                tenant,
                ..
            }) = p
            {
                conns.push((c.seq, PeerSlot::from_index(slot), *tenant));
            }
        }
        conns.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        for (_, slot, ti) in conns {
            if let Some(Some(Peer {
                link: Link::Conn(c),
                ..
            })) = self.peers.get(slot.index())
            {
                let routes = &mut self.tenants[ti].conn_routes;
                routes.extend(c.prefixes.iter().map(|&n| (n, slot)));
            }
        }
    }
}
