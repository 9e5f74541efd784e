//! What the core tells the shell: flow lifecycle events (the audit trail and the layer-4 hand-off), device
//! status, reload summaries.

use super::*;

/// A flow began: who, from which device, to where, and what policy decided.
#[derive(Debug, Clone)]
pub struct FlowStart {
    pub seq: FlowSeq,
    pub tenant: TenantId,
    pub device: DeviceName,
    pub user: UserName,
    pub protocol: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub action: Action,
    pub rule: Arc<str>,
    /// The destination device, when the flow goes to one.
    pub dst_device: Option<DeviceName>,
    pub at: Instant,
}

/// An upgraded flow: the application side (off-ramp proxy, inspectors) sees a connection from `slot` on
/// `UPGRADE_LISTENER` and uses this to know what it really is.
#[derive(Debug, Clone)]
pub struct Upgraded {
    pub seq: FlowSeq,
    pub slot: SocketAddrV4,
    pub protocol: u8,
    /// The device side of the original flow.
    pub src: SocketAddrV4,
    /// Where the device was going.
    pub dst: SocketAddrV4,
    pub tenant: TenantId,
    pub device: DeviceName,
    pub user: UserName,
    pub groups: Arc<[String]>,
    pub rule: Arc<str>,
    /// For `proxy` between devices: the address (inside the namespace) to connect to for a stream that comes
    /// out as `src -> dst` towards the destination device. `None`: off-ramp to `dst` with a host socket.
    pub downgrade: Option<SocketAddrV4>,
    /// What sits between the two legs (the deciding rule's inspector).
    pub inspect: crate::config::Inspect,
}

/// Where a `Transmit` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The upgrade TUN (`up0`): packets of upgraded flows into the namespace.
    UpgradeTun,
    /// The downgrade TUN (`dn0`): a destination device's answers to a downgraded connection.
    DowngradeTun,
}

/// Packets for one TUN of the namespace, from `Gateway::poll_transmit`: a train of datagrams in the core's
/// buffer (its `to` is unused).
#[derive(Debug, Clone, Copy)]
pub struct Transmit<'a> {
    pub dest: Dest,
    pub train: Train<'a>,
}

/// Flow lifecycle events, drained by the shell with `Gateway::poll_event`.
#[derive(Debug, Clone)]
pub enum FlowEvent {
    Start(Box<FlowStart>),
    /// A flow was handed to layer 4 (for the application side, not the audit trail).
    Upgraded(Box<Upgraded>),
    Established {
        seq: FlowSeq,
        at: Instant,
    },
    End {
        seq: FlowSeq,
        at: Instant,
        packets: [u64; 2],
        bytes: [u64; 2],
        reason: EndReason,
    },
    /// An upgraded flow ended: the application side must close whatever it holds for `slot` (namespace socket,
    /// upstream, inspector) and report it with `Gateway::handle_slot_closed`; until then the slot is never
    /// given to another flow.
    Released {
        seq: FlowSeq,
        slot: SocketAddrV4,
    },
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
