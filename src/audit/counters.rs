//! What the audit pipeline counts: records written and records lost, per record kind and per reason. Every
//! counter is an atomic bumped with `fetch_add` (several threads offer records), read by `/metrics` and by the
//! writer, which turns new losses into a signed gap record in the chain.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The kinds of records the pipeline carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Flow,
    Http,
    Ssh,
    Enroll,
    Admin,
}

impl RecordKind {
    pub const ALL: [RecordKind; 5] = [
        RecordKind::Flow,
        RecordKind::Http,
        RecordKind::Ssh,
        RecordKind::Enroll,
        RecordKind::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Flow => "flow",
            RecordKind::Http => "http",
            RecordKind::Ssh => "ssh",
            RecordKind::Enroll => "enroll",
            RecordKind::Admin => "admin",
        }
    }
}

/// Why a record was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The queue towards the writer was full.
    QueueFull,
    /// The record's tenant had used its share of the queue (another tenant's records keep theirs).
    TenantShare,
    /// The store could not be written for longer than the queue could hold records.
    StoreFailed,
    /// Offered after the writer stopped (shutdown).
    WriterStopped,
    /// Removed from the store to stay under its size quota (`on_failure = "fail_open"`).
    Evicted,
}

impl LossReason {
    pub const ALL: [LossReason; 5] = [
        LossReason::QueueFull,
        LossReason::TenantShare,
        LossReason::StoreFailed,
        LossReason::WriterStopped,
        LossReason::Evicted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::QueueFull => "queue_full",
            LossReason::TenantShare => "tenant_share",
            LossReason::StoreFailed => "store_failed",
            LossReason::WriterStopped => "writer_stopped",
            LossReason::Evicted => "evicted",
        }
    }
}

const KINDS: usize = RecordKind::ALL.len();
const REASONS: usize = LossReason::ALL.len();

/// Counters of one gateway run (they start at zero).
#[derive(Debug, Default)]
pub struct AuditCounters {
    written: [AtomicU64; KINDS],
    lost: [[AtomicU64; REASONS]; KINDS],
    gap_records: AtomicU64,
    checkpoints: AtomicU64,
    evictions: AtomicU64,
    recordings_evicted: AtomicU64,
    quota_exceeded: AtomicU64,
    over_quota: AtomicU64,
    /// Fleet mode's shipper (`fleet::shipper`); exported only when it runs.
    pub fleet: FleetGauges,
}

/// How the fleet shipper is doing, for `/metrics`.
#[derive(Debug, Default)]
pub struct FleetGauges {
    pub enabled: std::sync::atomic::AtomicBool,
    /// 1 while the shipper has a working PostgreSQL session.
    pub up: AtomicU64,
    /// The node's high-water mark: chain entries shipped (PostgreSQL's value).
    pub shipped_seq: AtomicU64,
    /// Shipping attempts that failed (PostgreSQL unreachable or erring), each retried.
    pub failures: AtomicU64,
    /// 1 when shipping stopped for good (another gateway ships under this node id).
    pub halted: AtomicU64,
}

/// One exported counter: name, labels, value.
pub type Sample = (&'static str, Vec<(&'static str, &'static str)>, u64);

/// Losses by kind and reason.
pub type LossTable = [[u64; REASONS]; KINDS];

impl AuditCounters {
    pub fn lost(&self, kind: RecordKind, reason: LossReason, n: u64) {
        self.lost[kind as usize][reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn written(&self, kind: RecordKind, n: u64) {
        self.written[kind as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn written_total(&self, kind: RecordKind) -> u64 {
        self.written[kind as usize].load(Ordering::Relaxed)
    }

    pub fn lost_total(&self, kind: RecordKind, reason: LossReason) -> u64 {
        self.lost[kind as usize][reason as usize].load(Ordering::Relaxed)
    }

    pub fn losses(&self) -> LossTable {
        let mut t = [[0; REASONS]; KINDS];
        for k in RecordKind::ALL {
            for r in LossReason::ALL {
                t[k as usize][r as usize] = self.lost_total(k, r);
            }
        }
        t
    }

    pub fn gap_recorded(&self) {
        self.gap_records.fetch_add(1, Ordering::Relaxed);
    }

    pub fn gap_records(&self) -> u64 {
        self.gap_records.load(Ordering::Relaxed)
    }

    pub fn checkpoint_signed(&self) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    /// An eviction record was written; `files` recording files went with it.
    pub fn evicted(&self, files: u64) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.recordings_evicted.fetch_add(files, Ordering::Relaxed);
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// The store or the recordings went over their quota (and stayed over after any eviction).
    pub fn set_over_quota(&self, over: bool) {
        if self.over_quota.swap(over as u64, Ordering::Relaxed) == 0 && over {
            self.quota_exceeded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every counter as `(name, labels, value)`, for a metrics exporter.
    pub fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        for k in RecordKind::ALL {
            out.push((
                "rampart_audit_records_written_total",
                vec![("kind", k.as_str())],
                self.written_total(k),
            ));
            for r in LossReason::ALL {
                out.push((
                    "rampart_audit_records_lost_total",
                    vec![("kind", k.as_str()), ("reason", r.as_str())],
                    self.lost_total(k, r),
                ));
            }
        }
        out.push((
            "rampart_audit_gap_records_total",
            Vec::new(),
            self.gap_records(),
        ));
        out.push((
            "rampart_audit_checkpoints_total",
            Vec::new(),
            self.checkpoints(),
        ));
        out.push((
            "rampart_audit_evictions_total",
            Vec::new(),
            self.evictions(),
        ));
        out.push((
            "rampart_audit_recordings_evicted_total",
            Vec::new(),
            self.recordings_evicted.load(Ordering::Relaxed),
        ));
        out.push((
            "rampart_audit_quota_exceeded_total",
            Vec::new(),
            self.quota_exceeded.load(Ordering::Relaxed),
        ));
        out.push((
            "rampart_audit_over_quota",
            Vec::new(),
            self.over_quota.load(Ordering::Relaxed),
        ));
        if self.fleet.enabled.load(Ordering::Relaxed) {
            let f = &self.fleet;
            out.push(("rampart_fleet_up", Vec::new(), f.up.load(Ordering::Relaxed)));
            out.push((
                "rampart_fleet_shipped_seq",
                Vec::new(),
                f.shipped_seq.load(Ordering::Relaxed),
            ));
            out.push((
                "rampart_fleet_ship_failures_total",
                Vec::new(),
                f.failures.load(Ordering::Relaxed),
            ));
            out.push((
                "rampart_fleet_halted",
                Vec::new(),
                f.halted.load(Ordering::Relaxed),
            ));
        }
        out
    }
}
