//! Newtype ids of the core, so its numbers (a tenant's index and its stable number, a peer's slot, a flow's
//! sequence number) cannot be mixed up with each other or with packet fields.

use std::fmt;
use std::ops::{Index, IndexMut};

use super::{Peer, TenantState};

/// A tenant's index in `Gateway::tenants`: valid until the next `apply`, which re-indexes every holder (peers,
/// connections). Flow and NAT keys carry the stable tenant number instead (`Gateway::tenant_index` maps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct TenantIdx(usize);

impl TenantIdx {
    pub(super) fn new(i: usize) -> TenantIdx {
        TenantIdx(i)
    }

    /// The index, for per-tenant tallies kept in a plain `Vec` parallel to `Gateway::tenants`.
    pub(super) fn get(self) -> usize {
        self.0
    }
}

impl Index<TenantIdx> for Vec<TenantState> {
    type Output = TenantState;

    fn index(&self, i: TenantIdx) -> &TenantState {
        &self[i.0]
    }
}

impl IndexMut<TenantIdx> for Vec<TenantState> {
    fn index_mut(&mut self, i: TenantIdx) -> &mut TenantState {
        &mut self[i.0]
    }
}

/// A subject's place in `Gateway::peers` (a device's tunnel or an on-ramp connection). It is the top of the
/// receiver index boringtun puts in every datagram, so it is stable for the peer's life; a freed slot is
/// quarantined (`SLOT_QUARANTINE`) before reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSlot(u32);

impl PeerSlot {
    /// A slot by number (benches and tests build flows by hand; the core only hands out slots it took).
    pub const fn new(i: u32) -> PeerSlot {
        PeerSlot(i)
    }

    pub(super) fn from_index(i: usize) -> PeerSlot {
        PeerSlot(i as u32)
    }

    pub const fn get(self) -> u32 {
        self.0
    }

    pub(super) fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for PeerSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Index<PeerSlot> for Vec<Option<Peer>> {
    type Output = Option<Peer>;

    fn index(&self, i: PeerSlot) -> &Option<Peer> {
        &self[i.index()]
    }
}

impl IndexMut<PeerSlot> for Vec<Option<Peer>> {
    fn index_mut(&mut self, i: PeerSlot) -> &mut Option<Peer> {
        &mut self[i.index()]
    }
}

/// A flow's number within one run of the gateway (1, 2, ...; never reused in a run). The audit trail keys
/// flows by `(run_id, seq)`; the hand-off and `Gateway::handle_slot_closed` use it to tell a slot's flows apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowSeq(u64);

impl FlowSeq {
    /// The first flow of a run.
    pub(super) const FIRST: FlowSeq = FlowSeq(1);

    /// A flow number read back from outside the core (the audit trail, the application side's slot reports).
    pub const fn new(n: u64) -> FlowSeq {
        FlowSeq(n)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The number after this one.
    pub(super) fn next(self) -> FlowSeq {
        FlowSeq(self.0 + 1)
    }
}

impl fmt::Display for FlowSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
