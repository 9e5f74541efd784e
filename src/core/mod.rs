//! The sans-IO gateway core: tenants, devices (each a boringtun `Tunn`), and the verdict for every datagram.
//!
//! It never touches sockets, files or threads. The IO shell (`onramp`) drives it:
//! 1. `Gateway::apply` with a validated `Config` at start and on every reload;
//! 2. for each received UDP datagram, `Gateway::handle_datagram(from, datagram, scratch, tx)`;
//! 3. every `TIMER_TICK`, `Gateway::handle_timers(tx)`;
//! 4. after each batch, send every datagram in the `TxQueue` (one `sendmmsg`) and `TxQueue::clear` it.
//!
//! Output is written into buffers the caller owns (`TxQueue` slots are reused, never freed), so the hot path
//! does not allocate. A bad datagram is never an error: it is dropped and counted by `DropReason`.
//!
//! Clock: boringtun reads `Instant::now()` internally; the core itself takes `now` only where it keeps time of
//! its own (slot quarantine).
#![deny(unsafe_code)]

pub mod counters;
pub mod tx;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use crate::config::{Config, Device, DeviceName, TenantId};
use crate::keys::{PeerKey, PrivateKey};
use crate::packet::{self, Hop, LocalReply};
pub use counters::{DropReason, GlobalCounters, TrafficCounters};
pub use tx::TxQueue;

/// How often the shell must call `handle_timers`.
pub const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake initiations per second (all peers together) before cookies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// A freed peer slot is reused only after this long, so late packets for an old receiver index never reach a
/// new peer (3 × REJECT_AFTER_TIME).
pub const SLOT_QUARANTINE: Duration = Duration::from_secs(540);
/// Receiver index layout: `(slot << 16) | (worker << 8) | boringtun's 8-bit counter`.
pub const MAX_SLOTS: usize = 1 << 16;
/// A peer counts as connected while its last handshake is younger than this (REJECT_AFTER_TIME).
const CONNECTED_WINDOW: Duration = Duration::from_secs(180);

/// Counters shared between the data path (writer) and the admin endpoint (reader).
#[derive(Debug, Default)]
pub struct Metrics {
    pub global: GlobalCounters,
    tenants: RwLock<BTreeMap<TenantId, Arc<TrafficCounters>>>,
}

impl Metrics {
    /// The counters of `tenant`, created on first use and kept across reloads.
    pub fn tenant(&self, tenant: &TenantId) -> Arc<TrafficCounters> {
        if let Some(c) = self.tenants.read().expect("metrics lock").get(tenant) {
            return c.clone();
        }
        self.tenants
            .write()
            .expect("metrics lock")
            .entry(tenant.clone())
            .or_default()
            .clone()
    }

    pub fn tenants(&self) -> Vec<(TenantId, Arc<TrafficCounters>)> {
        self.tenants
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One device's tunnel.
struct Peer {
    tunn: Tunn,
    key: PeerKey,
    tenant: usize,
    device: Device,
    /// Where the device was last seen sending authenticated traffic from.
    endpoint: Option<SocketAddr>,
}

struct TenantState {
    id: TenantId,
    gateway_address: IpAddr,
    /// Device address -> peer slot. Addresses are per tenant: two tenants may use the same ones.
    routes: HashMap<IpAddr, u32>,
    counters: Arc<TrafficCounters>,
}

/// What `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    pub added: usize,
    pub removed: usize,
    pub updated: usize,
    /// Devices that could not be given a peer slot (more than `MAX_SLOTS`).
    pub rejected: usize,
}

/// A device's live state, for `rampart device list` and endpoint persistence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub tenant: TenantId,
    pub name: DeviceName,
    pub public_key: PeerKey,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last completed handshake.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The gateway state of one data-path worker.
pub struct Gateway {
    worker: u8,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Consulted before any DH on handshake initiations; demands cookies above `HANDSHAKE_RATE_LIMIT`.
    gate: Arc<RateLimiter>,
    /// Given to every `Tunn` so its own re-check validates mac1 without counting the handshake twice.
    mac1_only: Arc<RateLimiter>,
    peers: Vec<Option<Peer>>,
    free_slots: VecDeque<(u32, Instant)>,
    by_key: HashMap<PeerKey, u32>,
    tenants: Vec<TenantState>,
    metrics: Arc<Metrics>,
}

/// What to do with a decrypted packet after routing.
enum Route {
    /// Answer locally; the reply is in the scratch buffer and goes back to the source peer.
    Reply(usize),
    /// Re-encrypt towards the peer in this slot.
    Peer(u32),
}

impl Gateway {
    pub fn new(worker: u8, key: &PrivateKey, metrics: Arc<Metrics>) -> Gateway {
        let secret = key.to_x25519();
        let public = x25519::PublicKey::from(&secret);
        Gateway {
            worker,
            gate: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            mac1_only: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
            peers: Vec::new(),
            free_slots: VecDeque::new(),
            by_key: HashMap::new(),
            tenants: Vec::new(),
            metrics,
        }
    }

    pub fn public_key(&self) -> PeerKey {
        PeerKey(self.public.to_bytes())
    }

    /// Reconciles tenants and devices with `cfg`: new devices get a tunnel, removed devices lose theirs at once
    /// (their packets are dropped from the next datagram on), unchanged devices keep their sessions.
    pub fn apply(&mut self, cfg: &Config, now: Instant) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let mut wanted: HashMap<PeerKey, (usize, &Device)> = HashMap::new();
        for (ti, t) in cfg.tenants.iter().enumerate() {
            for d in &t.devices {
                wanted.insert(d.public_key, (ti, d));
            }
        }
        // Remove peers that are gone or moved to another tenant (a tenant move gets a fresh tunnel). `peer.tenant`
        // still indexes the previous tenant list here.
        let stale: Vec<PeerKey> = self
            .by_key
            .iter()
            .filter(|(k, &slot)| {
                let peer = self.peers[slot as usize]
                    .as_ref()
                    .expect("indexed peer exists");
                wanted
                    .get(*k)
                    .is_none_or(|(ti, _)| cfg.tenants[*ti].id != self.tenants[peer.tenant].id)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.remove_peer(k, now);
            summary.removed += 1;
        }
        self.tenants = cfg
            .tenants
            .iter()
            .map(|t| TenantState {
                id: t.id.clone(),
                gateway_address: t.gateway_address,
                routes: HashMap::with_capacity(t.devices.len()),
                counters: self.metrics.tenant(&t.id),
            })
            .collect();
        let mut keys: Vec<&PeerKey> = wanted.keys().collect();
        keys.sort(); // deterministic slot assignment
        for key in keys {
            let (ti, d) = wanted[key];
            if let Some(&slot) = self.by_key.get(key) {
                let peer = self.peers[slot as usize]
                    .as_mut()
                    .expect("indexed peer exists");
                if peer.device != *d {
                    summary.updated += 1;
                }
                peer.tenant = ti;
                peer.device = d.clone();
            } else if self.add_peer(ti, d, now).is_some() {
                summary.added += 1;
            } else {
                summary.rejected += 1;
            }
        }
        for (slot, p) in self.peers.iter().enumerate() {
            if let Some(p) = p {
                self.tenants[p.tenant]
                    .routes
                    .insert(p.device.address, slot as u32);
            }
        }
        for t in &self.tenants {
            t.counters.peers.set(t.routes.len() as u64);
        }
        summary
    }

    fn add_peer(&mut self, tenant: usize, d: &Device, now: Instant) -> Option<u32> {
        let slot = match self.free_slots.front() {
            Some(&(slot, freed)) if now.saturating_duration_since(freed) >= SLOT_QUARANTINE => {
                self.free_slots.pop_front();
                slot
            }
            _ if self.peers.len() < MAX_SLOTS => {
                self.peers.push(None);
                (self.peers.len() - 1) as u32
            }
            _ => {
                tracing::error!(device = %d.name, "no free peer slot ({MAX_SLOTS} per worker); device not connected");
                return None;
            }
        };
        let index = (slot << 8) | u32::from(self.worker);
        debug_assert!(index < 1 << 24);
        let tunn = Tunn::new(
            self.secret.clone(),
            d.public_key.to_x25519(),
            None,
            None,
            index,
            Some(self.mac1_only.clone()),
        );
        self.peers[slot as usize] = Some(Peer {
            tunn,
            key: d.public_key,
            tenant,
            device: d.clone(),
            endpoint: None,
        });
        self.by_key.insert(d.public_key, slot);
        tracing::debug!(device = %d.name, slot, "peer added");
        Some(slot)
    }

    fn remove_peer(&mut self, key: PeerKey, now: Instant) {
        if let Some(slot) = self.by_key.remove(&key) {
            if let Some(p) = self.peers[slot as usize].take() {
                tracing::info!(device = %p.device.name, "device removed; tunnel closed");
            }
            self.free_slots.push_back((slot, now));
        }
    }

    /// Handles one UDP datagram from `from`. `scratch` must hold any datagram (65,536 bytes is enough).
    pub fn handle_datagram(
        &mut self,
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
                // Gate before any DH: under load this answers with a cookie reply instead.
                let half = match self
                    .gate
                    .verify_packet(Some(from.ip()), datagram, tx.slot())
                {
                    Ok(Packet::HandshakeInit(init)) => {
                        parse_handshake_anon(&self.secret, &self.public, &init)
                    }
                    Ok(_) => return g.unattributed.count_drop(DropReason::MalformedDatagram),
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let len = cookie.len();
                        tx.commit(from, len);
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
        self.decapsulate(slot, from, datagram, is_data, scratch, tx);
    }

    /// The peer slot a receiver index names, if it belongs to this worker and is occupied.
    fn slot_of(&self, receiver_idx: u32) -> Option<u32> {
        let slot = receiver_idx >> 16;
        let worker = (receiver_idx >> 8) & 0xff;
        (worker == u32::from(self.worker) && matches!(self.peers.get(slot as usize), Some(Some(_))))
            .then_some(slot)
    }

    fn decapsulate(
        &mut self,
        slot: u32,
        from: SocketAddr,
        datagram: &[u8],
        is_data: bool,
        scratch: &mut [u8],
        tx: &mut TxQueue,
    ) {
        let peer = self.peers[slot as usize].as_mut().expect("slot_of checked");
        let counters = &self.tenants[peer.tenant].counters;
        let had_session = peer.tunn.time_since_last_handshake().is_some();
        let inner_len = match peer.tunn.decapsulate(Some(from.ip()), datagram, scratch) {
            TunnResult::WriteToNetwork(out) => {
                // Authenticated (a handshake answered, or a response completed): the endpoint is proven.
                let len = out.len();
                tx.slot()[..len].copy_from_slice(out);
                tx.commit(from, len);
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
                    peer.tunn.decapsulate(None, &[], tx.slot())
                {
                    let len = out.len();
                    tx.commit(from, len);
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
        self.route_inner(slot, &mut scratch[..inner_len], tx);
    }

    /// Anti-spoofing, then local delivery or re-encryption towards the destination device of the same tenant.
    fn route_inner(&mut self, src_slot: u32, pkt: &mut [u8], tx: &mut TxQueue) {
        let src_peer = self.peers[src_slot as usize]
            .as_ref()
            .expect("caller holds slot");
        let tenant = &self.tenants[src_peer.tenant];
        let Ok(view) = packet::parse_ip(pkt) else {
            return tenant.counters.count_drop(DropReason::InvalidInnerPacket);
        };
        if view.src != src_peer.device.address {
            return tenant.counters.count_drop(DropReason::SpoofedSource);
        }
        let route = if view.dst == tenant.gateway_address {
            match packet::echo_reply_in_place(pkt, &view) {
                LocalReply::Reply(len) => Route::Reply(len),
                LocalReply::NotHandled => {
                    return tenant.counters.count_drop(DropReason::NoLocalService)
                }
            }
        } else {
            match tenant.routes.get(&view.dst) {
                Some(&dst) if dst != src_slot => {
                    if packet::decrement_ttl(pkt, &view) == Hop::Expired {
                        return tenant.counters.count_drop(DropReason::TtlExpired);
                    }
                    Route::Peer(dst)
                }
                _ => return tenant.counters.count_drop(DropReason::NoRoute),
            }
        };
        let (dst_slot, len) = match route {
            Route::Reply(len) => (src_slot, len),
            Route::Peer(dst) => (dst, pkt.len()),
        };
        let counters = tenant.counters.clone();
        let dst_peer = self.peers[dst_slot as usize]
            .as_mut()
            .expect("routes name live slots");
        let Some(endpoint) = dst_peer.endpoint else {
            return counters.count_drop(DropReason::DestinationOffline);
        };
        match dst_peer.tunn.encapsulate(&pkt[..len], tx.slot()) {
            TunnResult::WriteToNetwork(out) => {
                let n = out.len();
                tx.commit(endpoint, n);
                counters.tx_packets.add(1);
                counters.tx_bytes.add(len as u64);
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                counters.count_drop(DropReason::ConnectionExpired)
            }
            // Queued inside boringtun until the handshake it started completes.
            _ => {}
        }
    }

    /// Drives every peer's timers (handshake retries, keepalives, expiry) and resets the handshake gate.
    pub fn handle_timers(&mut self, tx: &mut TxQueue) {
        self.gate.reset_count();
        let mut connected = vec![0u64; self.tenants.len()];
        for p in self.peers.iter_mut().flatten() {
            match p.tunn.update_timers(tx.slot()) {
                TunnResult::WriteToNetwork(out) => {
                    let len = out.len();
                    if let Some(ep) = p.endpoint {
                        tx.commit(ep, len);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::trace!(device = %p.device.name, ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
            if p.tunn
                .time_since_last_handshake()
                .is_some_and(|t| t < CONNECTED_WINDOW)
            {
                connected[p.tenant] += 1;
            }
        }
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
        let p = self.peers[slot as usize]
            .as_mut()
            .expect("indexed peer exists");
        if p.endpoint.is_some() {
            return false;
        }
        p.endpoint = Some(endpoint);
        match p.tunn.format_handshake_initiation(tx.slot(), false) {
            TunnResult::WriteToNetwork(out) => {
                let len = out.len();
                tx.commit(endpoint, len);
                true
            }
            _ => false,
        }
    }

    pub fn peer_status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .flatten()
            .map(|p| {
                let (last, tx_bytes, rx_bytes, _, _) = p.tunn.stats();
                PeerStatus {
                    tenant: self.tenants[p.tenant].id.clone(),
                    name: p.device.name.clone(),
                    public_key: p.key,
                    endpoint: p.endpoint,
                    last_handshake_secs: last.map(|d| d.as_secs()),
                    rx_bytes: rx_bytes as u64,
                    tx_bytes: tx_bytes as u64,
                }
            })
            .collect()
    }

    #[cfg(test)]
    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests;
