//! Counters the data path bumps and `/metrics` reads (the `Collector` at the end of this file). Each worker
//! owns its counter sets and is their only writer, so a bump is a relaxed load + store (a plain `mov`), not a
//! locked read-modify-write; readers may see a value a few packets old, never a torn one.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a datagram or inner packet was dropped. Closed: metrics and tests name these exactly.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::EnumCount, strum::EnumIter, strum::IntoStaticStr,
)]
#[strum(serialize_all = "snake_case")]
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
    /// New data on a TCP connection that already ended (after a RST, or beyond a FIN).
    FlowEnded,
    /// An off-ramp destination that is never allowed: the appliance itself (its addresses, loopback),
    /// unspecified, link-local, multicast or broadcast addresses, the gateway's internal ranges.
    OfframpForbidden,
    /// The device has as many live flows as `flows.device_max_flows` allows.
    DeviceFlowLimit,
    /// The device (or its tenant) opens new flows faster than `flows.device_new_flows_per_sec` allows.
    FlowRateLimited,
    /// An IPv6 extension header the gateway does not walk (or too many of them).
    Ipv6ExtensionHeader,
    /// An ICMP error that quotes no flow carried between this device and its peer, or an echo request from
    /// the responder of an echo flow.
    IcmpUnrelated,
    /// A connected on-ramp's first datagram was not a valid context (the client is told and disconnected).
    OnrampBadContext,
    /// A connected on-ramp client was refused: its uid/gid, or a tenant, site or device it may not claim.
    OnrampRefused,
    /// A packet for an on-ramp connection whose socket was full (the client does not read fast enough).
    OnrampBackpressure,
    /// A GUE datagram from an outer source address that is no configured site's.
    GueUnknownSource,
    /// A GUE datagram that is not a data message of variant 0 or 1 carrying IPv4/IPv6 (truncated, reserved
    /// variant, another payload protocol, or longer than any packet).
    GueMalformed,
    /// A GUE header with flags set (extension fields this gateway does not read; Linux `encap-remcsum`).
    GueFlags,
    /// A GUE control message (C bit): not for the data path, ignored.
    GueControl,
    /// A keyed site's packet without a valid context: no or malformed private data, another key id, or a
    /// tenant or site name that is not the site's.
    GueBadContext,
    /// A keyed site's packet whose authentication tag does not verify.
    GueBadTag,
    /// A packet for a GUE site larger than the site's `mtu` (never fragmented; its sender gets ICMP too big).
    GueTooBig,
}

impl DropReason {
    pub fn all() -> impl Iterator<Item = DropReason> {
        <DropReason as strum::IntoEnumIterator>::iter()
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// When the data-path thread last went round its loop, for `/health`: a thread that died or hangs stops
/// beating, and the gateway reports itself unhealthy so its supervisor restarts it.
#[derive(Debug)]
pub struct Heartbeat {
    epoch: std::time::Instant,
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat {
            epoch: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self, now: std::time::Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ms.store(ms, Relaxed);
    }

    /// Time since the last beat (since creation, before the first).
    pub fn age(&self, now: std::time::Instant) -> std::time::Duration {
        let last = self.epoch + std::time::Duration::from_millis(self.last_ms.load(Relaxed));
        now.saturating_duration_since(last)
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
#[derive(Debug)]
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
    drops: [Counter; <DropReason as strum::EnumCount>::COUNT],
}

impl Default for TrafficCounters {
    fn default() -> TrafficCounters {
        TrafficCounters {
            handshakes: Counter::default(),
            rx_packets: Counter::default(),
            rx_bytes: Counter::default(),
            tx_packets: Counter::default(),
            tx_bytes: Counter::default(),
            peers: Counter::default(),
            peers_connected: Counter::default(),
            flows: Counter::default(),
            flows_started: Counter::default(),
            drops: std::array::from_fn(|_| Counter::default()),
        }
    }
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
    /// `recvmmsg` calls that returned datagrams (datagrams_rx / recv_calls = datagrams per call).
    pub recv_calls: Counter,
    /// `sendmmsg` calls (each carries single datagrams and GSO trains).
    pub send_calls: Counter,
    /// GSO trains sent (one message with `UDP_SEGMENT`, more than one datagram each).
    pub send_trains: Counter,
    /// Datagrams that left inside GSO trains (send_train_datagrams / send_trains = mean train length).
    pub send_train_datagrams: Counter,
    /// Trains the kernel refused as GSO and that were sent again as separate datagrams.
    pub gso_fallbacks: Counter,
    /// 1 while the WireGuard socket sends trains with GSO, 0 once it fell back for good (gauge).
    pub gso_enabled: Counter,
    /// Coalesced messages received (UDP GRO): more than one datagram each.
    pub recv_trains: Counter,
    /// Datagrams that arrived inside those (recv_train_datagrams / recv_trains = mean train length).
    pub recv_train_datagrams: Counter,
    /// 1 while the WireGuard socket receives with UDP GRO, 0 where the kernel refused it (gauge).
    pub gro_enabled: Counter,
    /// Turns of the data-path loop (each one `poll` return: traffic, or the timer tick when idle).
    pub wakeups: Counter,
    pub cookie_replies: Counter,
    pub send_errors: Counter,
    /// Receive calls on the UDP socket that failed (usually an ICMP error for an earlier send).
    pub recv_errors: Counter,
    /// NAT slots held by upgraded flows (gauge, refreshed every timer tick; quarantined slots not included).
    pub nat_slots: Counter,
    /// NAT slots whose flow ended, waiting for the application side to close their sockets (gauge).
    pub nat_slots_closing: Counter,
    /// Peers whose WireGuard timers run on each tick (gauge): the active ones, not every configured device.
    pub peers_timed: Counter,
    /// Upgraded flows the application side's full queue could not take (their connection is refused).
    pub handoffs_dropped: Counter,
    /// Refused attempts not recorded because too many distinct ones arrived within one summary interval.
    pub refusals_unrecorded: Counter,
    /// Packets for the gateway's namespace the upgrade TUN refused (queue full).
    pub tun_write_errors: Counter,
    /// Connected on-ramp connections accepted (context accepted) and open now (gauge).
    pub onramp_accepted: Counter,
    pub onramp_connections: Counter,
    /// On-ramp connections closed by the gateway after `max_bad_packets` non-IP datagrams.
    pub onramp_closed_bad: Counter,
    /// GUE datagrams received and sent on the `[[onramp.gue]]` sockets.
    pub gue_rx: Counter,
    pub gue_tx: Counter,
    /// Drops that cannot be attributed to a tenant.
    pub unattributed: TrafficCounters,
}

/// `/metrics`: the data path's counters, read at scrape time (the data path never waits for a scrape).
impl prometheus_client::collector::Collector for super::Metrics {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{counter, family, gauge};
        use prometheus_client::metrics::MetricType::{Counter as C, Gauge as G};
        let tenants = self.tenants();
        let ids: Vec<String> = tenants.iter().map(|(id, _)| id.to_string()).collect();
        let labels: Vec<[(&str, &str); 1]> =
            ids.iter().map(|id| [("tenant", id.as_str())]).collect();
        type Get = fn(&TrafficCounters) -> u64;
        let per_tenant: [(&str, &str, _, Get); 9] = [
            (
                "rampart_handshakes",
                "Completed WireGuard handshakes.",
                C,
                |c| c.handshakes.get(),
            ),
            (
                "rampart_rx_packets",
                "Inner packets received from devices.",
                C,
                |c| c.rx_packets.get(),
            ),
            (
                "rampart_rx_bytes",
                "Inner bytes received from devices.",
                C,
                |c| c.rx_bytes.get(),
            ),
            (
                "rampart_tx_packets",
                "Inner packets sent to devices.",
                C,
                |c| c.tx_packets.get(),
            ),
            ("rampart_tx_bytes", "Inner bytes sent to devices.", C, |c| {
                c.tx_bytes.get()
            }),
            ("rampart_peers", "Devices configured or enrolled.", G, |c| {
                c.peers.get()
            }),
            (
                "rampart_peers_connected",
                "Devices with a handshake in the last 180 s.",
                G,
                |c| c.peers_connected.get(),
            ),
            ("rampart_flows", "Live flows.", G, |c| c.flows.get()),
            (
                "rampart_flows_started",
                "Flows started (any decision).",
                C,
                |c| c.flows_started.get(),
            ),
        ];
        for (name, help, kind, get) in per_tenant {
            let samples = tenants
                .iter()
                .zip(&labels)
                .map(|((_, c), l)| (&l[..], get(c)));
            family(&mut enc, name, help, kind, samples)?;
        }
        let g = &self.global;
        // Every reason, for traffic of no tenant (tenant="") and for each tenant, zeros included.
        let mut drops =
            Vec::with_capacity((ids.len() + 1) * <DropReason as strum::EnumCount>::COUNT);
        for r in DropReason::all() {
            drops.push((
                [("tenant", ""), ("reason", r.as_str())],
                g.unattributed.drops(r),
            ));
            for ((_, c), id) in tenants.iter().zip(&ids) {
                drops.push((
                    [("tenant", id.as_str()), ("reason", r.as_str())],
                    c.drops(r),
                ));
            }
        }
        family(
            &mut enc,
            "rampart_dropped_packets",
            "Datagrams and inner packets dropped, by reason.",
            C,
            drops.iter().map(|(l, v)| (&l[..], *v)),
        )?;
        for (name, help, v) in [
            ("rampart_datagrams_received", "UDP datagrams received.", g.datagrams_rx.get()),
            ("rampart_datagrams_sent", "UDP datagrams sent.", g.datagrams_tx.get()),
            (
                "rampart_udp_receive_calls",
                "recvmmsg calls on the WireGuard socket that returned datagrams (datagrams per call = \
                 rampart_datagrams_received_total / this).",
                g.recv_calls.get(),
            ),
            (
                "rampart_udp_send_calls",
                "sendmmsg calls on the WireGuard socket (datagrams per call = rampart_datagrams_sent_total / this).",
                g.send_calls.get(),
            ),
            (
                "rampart_udp_send_trains",
                "GSO trains sent on the WireGuard socket: one UDP_SEGMENT message of several equal-size datagrams.",
                g.send_trains.get(),
            ),
            (
                "rampart_udp_send_train_datagrams",
                "Datagrams sent inside GSO trains (mean train length = this / rampart_udp_send_trains_total).",
                g.send_train_datagrams.get(),
            ),
            (
                "rampart_udp_receive_trains",
                "Coalesced messages received on the WireGuard socket (UDP GRO): several datagrams from one source each.",
                g.recv_trains.get(),
            ),
            (
                "rampart_udp_receive_train_datagrams",
                "Datagrams received inside coalesced messages (mean train length = this / rampart_udp_receive_trains_total).",
                g.recv_train_datagrams.get(),
            ),
            (
                "rampart_udp_gso_fallbacks",
                "GSO trains the kernel refused and that were sent again as separate datagrams.",
                g.gso_fallbacks.get(),
            ),
            (
                "rampart_datapath_wakeups",
                "Turns of the data-path loop: each poll return, for traffic or the idle timer tick.",
                g.wakeups.get(),
            ),
            (
                "rampart_cookie_replies",
                "Cookie replies sent to handshake initiators while under load.",
                g.cookie_replies.get(),
            ),
            ("rampart_send_errors", "UDP datagrams the kernel refused to send.", g.send_errors.get()),
            (
                "rampart_tun_write_errors",
                "Packets for the gateway's namespace that the upgrade TUN refused.",
                g.tun_write_errors.get(),
            ),
            (
                "rampart_udp_receive_errors",
                "Failed receive calls on the WireGuard socket (usually ICMP errors for earlier sends).",
                g.recv_errors.get(),
            ),
            (
                "rampart_refusals_unrecorded",
                "Refused flow attempts not recorded (too many distinct ones within one summary interval).",
                g.refusals_unrecorded.get(),
            ),
            (
                "rampart_handoffs_dropped",
                "Upgraded flows refused because the application side's queue was full.",
                g.handoffs_dropped.get(),
            ),
            (
                "rampart_onramp_accepted",
                "Connected (SEQPACKET) on-ramp connections whose context was accepted.",
                g.onramp_accepted.get(),
            ),
            (
                "rampart_onramp_closed_bad_packets",
                "On-ramp connections the gateway closed after too many datagrams that were not IP packets.",
                g.onramp_closed_bad.get(),
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        family(
            &mut enc,
            "rampart_onramp_datagrams",
            "Datagrams received and sent by the unconnected (GUE) on-ramp's sockets.",
            C,
            [
                (
                    &[("onramp", "gue"), ("direction", "rx")][..],
                    g.gue_rx.get(),
                ),
                (
                    &[("onramp", "gue"), ("direction", "tx")][..],
                    g.gue_tx.get(),
                ),
            ],
        )?;
        for (name, help, v) in [
            (
                "rampart_udp_gso_enabled",
                "1 while the WireGuard socket sends GSO trains, 0 after it fell back to single datagrams.",
                g.gso_enabled.get(),
            ),
            (
                "rampart_udp_gro_enabled",
                "1 while the WireGuard socket receives with UDP GRO, 0 where the kernel refused it.",
                g.gro_enabled.get(),
            ),
            ("rampart_nat_slots", "NAT slots held by upgraded flows.", g.nat_slots.get()),
            (
                "rampart_nat_slots_closing",
                "NAT slots whose flow ended, waiting for their sockets to close.",
                g.nat_slots_closing.get(),
            ),
            (
                "rampart_peers_timed",
                "Peers whose WireGuard timers run on each tick (with a session, a handshake or queued packets).",
                g.peers_timed.get(),
            ),
            (
                "rampart_onramp_connections",
                "Connected (SEQPACKET) on-ramp connections open now.",
                g.onramp_connections.get(),
            ),
        ] {
            gauge(&mut enc, name, help, v)?;
        }
        Ok(())
    }
}
