//! Counters the data path bumps and the admin endpoint reads. Each worker owns its counter sets and is their
//! only writer, so a bump is a relaxed load + store (a plain `mov`), not a locked read-modify-write; readers may
//! see a value a few packets old, never a torn one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a datagram or inner packet was dropped. Closed: metrics and tests name these exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a WireGuard message, or a truncated/oversized one.
    MalformedDatagram,
    /// Data/response/cookie for a receiver index that is not (or no longer) a peer of this gateway.
    UnknownReceiver,
    /// A handshake initiation that decrypted but whose static key is not an enrolled device.
    UnknownPeer,
    /// A handshake initiation with a bad mac1 or one that does not decrypt for this gateway's key.
    HandshakeInvalid,
    /// Handshake initiation refused while under load without a valid cookie (a cookie reply was sent instead).
    UnderLoad,
    /// Authentication of a data packet failed.
    DecryptFailed,
    /// Replayed or too-old counter.
    Replayed,
    /// Data for a session that no longer exists (the peer must handshake again).
    NoSession,
    /// The device sent from an address it was not assigned.
    SpoofedSource,
    /// The decrypted packet is not a valid IPv4/IPv6 packet.
    InvalidInnerPacket,
    /// No device of the tenant has the destination address.
    NoRoute,
    /// The destination device is enrolled but has never connected (no endpoint known).
    DestinationOffline,
    /// Addressed to the gateway, but nothing on the gateway serves it (only ICMP echo is answered).
    NoLocalService,
    /// TTL / hop limit reached zero.
    TtlExpired,
    /// The peer's handshake or rekey timed out; traffic to it is dropped until it reconnects.
    ConnectionExpired,
    /// An IP fragment (ports unknown, so policy cannot be enforced on it).
    Fragment,
    /// A TCP/UDP/ICMP header that is truncated or has inconsistent lengths.
    MalformedTransport,
    /// Policy denied the flow.
    PolicyDenied,
    /// Policy rejected the flow (the sender was told with a RST or ICMP error).
    PolicyRejected,
    /// The global or tenant flow limit is reached.
    FlowLimit,
    /// New flows are refused while the audit trail cannot record them (fail-closed policy).
    AuditUnavailable,
    /// No NAT slot is free for a flow that must be upgraded.
    NatExhausted,
    /// Only IPv4 TCP and UDP can be off-ramped (ICMP and IPv6 to upstream networks are not carried yet).
    OfframpUnsupported,
    /// A packet from the gateway's namespace for a NAT slot that no longer has a flow.
    NatStale,
}

impl DropReason {
    pub const ALL: [DropReason; 24] = [
        DropReason::MalformedDatagram,
        DropReason::UnknownReceiver,
        DropReason::UnknownPeer,
        DropReason::HandshakeInvalid,
        DropReason::UnderLoad,
        DropReason::DecryptFailed,
        DropReason::Replayed,
        DropReason::NoSession,
        DropReason::SpoofedSource,
        DropReason::InvalidInnerPacket,
        DropReason::NoRoute,
        DropReason::DestinationOffline,
        DropReason::NoLocalService,
        DropReason::TtlExpired,
        DropReason::ConnectionExpired,
        DropReason::Fragment,
        DropReason::MalformedTransport,
        DropReason::PolicyDenied,
        DropReason::PolicyRejected,
        DropReason::FlowLimit,
        DropReason::AuditUnavailable,
        DropReason::NatExhausted,
        DropReason::OfframpUnsupported,
        DropReason::NatStale,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MalformedDatagram => "malformed_datagram",
            DropReason::UnknownReceiver => "unknown_receiver",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::HandshakeInvalid => "handshake_invalid",
            DropReason::UnderLoad => "under_load",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replayed => "replayed",
            DropReason::NoSession => "no_session",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::InvalidInnerPacket => "invalid_inner_packet",
            DropReason::NoRoute => "no_route",
            DropReason::DestinationOffline => "destination_offline",
            DropReason::NoLocalService => "no_local_service",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::ConnectionExpired => "connection_expired",
            DropReason::Fragment => "fragment",
            DropReason::MalformedTransport => "malformed_transport",
            DropReason::PolicyDenied => "policy_denied",
            DropReason::PolicyRejected => "policy_rejected",
            DropReason::FlowLimit => "flow_limit",
            DropReason::AuditUnavailable => "audit_unavailable",
            DropReason::NatExhausted => "nat_exhausted",
            DropReason::OfframpUnsupported => "offramp_unsupported",
            DropReason::NatStale => "nat_stale",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A counter with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

/// Counters of one tenant (or of traffic not attributable to any tenant).
#[derive(Debug, Default)]
pub struct TrafficCounters {
    pub handshakes: Counter,
    /// Inner packets and bytes received from devices (after decryption).
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    /// Inner packets and bytes sent to devices (before encryption).
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    pub peers: Counter,
    pub peers_connected: Counter,
    /// Live flows (gauge, refreshed every timer tick).
    pub flows: Counter,
    pub flows_started: Counter,
    drops: [Counter; DropReason::ALL.len()],
}

impl TrafficCounters {
    #[inline]
    pub fn count_drop(&self, r: DropReason) {
        self.drops[r.index()].add(1);
    }
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r.index()].get()
    }
}

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct GlobalCounters {
    pub datagrams_rx: Counter,
    pub datagrams_tx: Counter,
    pub cookie_replies: Counter,
    pub send_errors: Counter,
    /// NAT slots held by upgraded flows (gauge, refreshed every timer tick; quarantined slots not included).
    pub nat_slots: Counter,
    /// NAT slots whose flow ended, waiting for the application side to close their sockets (gauge).
    pub nat_slots_closing: Counter,
    /// Upgraded flows the application side's full queue could not take (their connection is refused).
    pub handoffs_dropped: Counter,
    /// Packets for the gateway's namespace the upgrade TUN refused (queue full).
    pub tun_write_errors: Counter,
    /// Drops that cannot be attributed to a tenant.
    pub unattributed: TrafficCounters,
}
