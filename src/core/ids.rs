//! Newtype ids of the core, so the two tenant numbers (an index that changes on reload, a number that does
//! not) cannot be mixed up.

use std::ops::{Index, IndexMut};

use super::TenantState;

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
