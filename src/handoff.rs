//! The hand-off from the data path to the layer-4/7 shells (off-ramp proxy, HTTP and SSH inspectors): what an
//! upgraded flow is (`FlowContext`) and the configuration in force (`ConfigHandle`).
//!
//! A leaf module: `offramp`, `http` and `ssh` depend on it, never on each other. The identity in a
//! `FlowContext` is the WireGuard peer's, fixed when the flow started (a device renamed or re-enrolled later
//! does not change it); the flow's end (idle timeout, policy revoked, device removed, RST) reaches every task
//! working for it through `FlowContext::ended`.
#![deny(unsafe_code)]

use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::config::{Config, DeviceName, Inspect, TenantId, UserName};
use crate::core::{FlowSeq, Upgraded};

/// Who a flow belongs to: the WireGuard peer that opened it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub tenant: TenantId,
    pub device: DeviceName,
    pub user: UserName,
    pub groups: Arc<[String]>,
}

/// One upgraded flow, as the layer-4/7 shells see it. The accepted connection's peer address is `slot`.
#[derive(Debug)]
pub struct FlowContext {
    /// The core's `FlowSeq`, as the number logs and audit records show.
    pub seq: u64,
    pub identity: Identity,
    pub protocol: u8,
    /// The NAT slot: the peer address of the connection accepted in the gateway's namespace.
    pub slot: SocketAddrV4,
    /// The device side of the original flow.
    pub src: SocketAddrV4,
    /// Where the device was going.
    pub dst: SocketAddrV4,
    /// The flow rule that decided it.
    pub rule: Arc<str>,
    /// For `proxy`/`inspect_*` between devices: the address (inside the namespace) whose connection comes out
    /// as `src -> dst` towards the destination device. `None`: off-ramp to `dst` with a host socket.
    pub downgrade: Option<SocketAddrV4>,
    /// What sits between the two legs.
    pub inspect: Inspect,
    ended: CancellationToken,
}

impl FlowContext {
    pub fn new(u: &Upgraded) -> FlowContext {
        FlowContext {
            seq: u.seq.get(),
            identity: Identity {
                tenant: u.tenant.clone(),
                device: u.device.clone(),
                user: u.user.clone(),
                groups: u.groups.clone(),
            },
            protocol: u.protocol,
            slot: u.slot,
            src: u.src,
            dst: u.dst,
            rule: u.rule.clone(),
            downgrade: u.downgrade,
            inspect: u.inspect.clone(),
            ended: CancellationToken::new(),
        }
    }

    /// Completes when the data path ended the flow; every task working for it must then close its sockets.
    pub fn ended(&self) -> WaitForCancellationFuture<'_> {
        self.ended.cancelled()
    }

    pub fn is_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Marks the flow ended (called by the off-ramp when the data path reports its end).
    pub fn end(&self) {
        self.ended.cancel();
    }
}

/// The configuration in force, swapped whole on reload; readers never block.
#[derive(Clone)]
pub struct ConfigHandle(Arc<ArcSwap<Config>>);

impl ConfigHandle {
    pub fn new(cfg: Arc<Config>) -> ConfigHandle {
        ConfigHandle(Arc::new(ArcSwap::new(cfg)))
    }

    pub fn current(&self) -> Arc<Config> {
        self.0.load_full()
    }

    pub fn store(&self, cfg: Arc<Config>) {
        self.0.store(cfg);
    }
}

/// What the data path tells the application side (in order, over one bounded channel).
#[derive(Debug)]
pub enum Handoff {
    /// A flow was upgraded: its connection or datagrams will arrive from `slot`.
    Upgraded(Box<Upgraded>),
    /// The flow on `slot` ended: close everything held for it, then report through `SlotReleases`.
    Released { seq: u64, slot: SocketAddrV4 },
}

/// Slots whose sockets the application side has closed, waiting for the data path to collect them
/// (`Gateway::handle_slot_closed`). A mailbox rather than a channel: the reports come from `Drop`, which must
/// never block or lose one, and there are at most as many as there are upgraded flows.
#[derive(Debug, Default)]
pub struct SlotReleases(Mutex<Vec<(SocketAddrV4, u64)>>);

impl SlotReleases {
    pub fn push(&self, slot: SocketAddrV4, seq: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((slot, seq));
    }

    /// Takes every report so far.
    pub fn take(&self) -> Vec<(SocketAddrV4, u64)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Held by every task working for an upgraded flow: when the last one is dropped (all its sockets closed), the
/// slot is reported closed.
#[derive(Debug)]
pub struct SlotLease {
    slot: SocketAddrV4,
    seq: u64,
    releases: Arc<SlotReleases>,
}

impl SlotLease {
    pub fn new(slot: SocketAddrV4, seq: FlowSeq, releases: Arc<SlotReleases>) -> SlotLease {
        SlotLease {
            slot,
            seq: seq.get(),
            releases,
        }
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.releases.push(self.slot, self.seq);
    }
}
