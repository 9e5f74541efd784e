//! What the audit pipeline counts: records written and records lost, per record kind and per reason. Every
//! counter is an atomic bumped with `fetch_add` (several threads offer records), read by `/metrics` (a collector of
//! [`crate::metrics::MetricsRegistry`]) and by the writer, which turns new losses into a signed gap record in the chain.
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
    /// The recording uploader (`fleet::uploader`, `[fleet.objects]`).
    pub objects: ObjectGauges,
}

/// How the recording uploader is doing, for `/metrics`.
#[derive(Debug, Default)]
pub struct ObjectGauges {
    pub enabled: std::sync::atomic::AtomicBool,
    /// Recordings whose upload (object and manifest) was confirmed.
    pub uploaded: AtomicU64,
    /// Recordings waiting for their upload (the local copy is kept).
    pub pending: AtomicU64,
    /// Recordings that cannot be uploaded (another object under the key, local copy gone or changed).
    pub failed: AtomicU64,
    /// Upload attempts that failed and will be retried.
    pub retries: AtomicU64,
}

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
}

/// `/metrics`: the audit pipeline's counters, read at scrape time.
impl prometheus_client::collector::Collector for AuditCounters {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{counter, family, gauge};
        use prometheus_client::metrics::MetricType::Counter as C;
        let kinds: Vec<[(&str, &str); 1]> = RecordKind::ALL
            .iter()
            .map(|k| [("kind", k.as_str())])
            .collect();
        family(
            &mut enc,
            "rampart_audit_records_written",
            "Audit records committed, by kind.",
            C,
            RecordKind::ALL
                .iter()
                .zip(&kinds)
                .map(|(k, l)| (&l[..], self.written_total(*k))),
        )?;
        let mut lost = Vec::new();
        let mut lost_total = 0;
        for k in RecordKind::ALL {
            for r in LossReason::ALL {
                let v = self.lost_total(k, r);
                lost_total += v;
                lost.push(([("kind", k.as_str()), ("reason", r.as_str())], v));
            }
        }
        family(
            &mut enc,
            "rampart_audit_records_lost",
            "Audit records lost, by kind and reason (each loss is also a gap record in the chain).",
            C,
            lost.iter().map(|(l, v)| (&l[..], *v)),
        )?;
        counter(
            &mut enc,
            "rampart_audit_gap_records",
            "Gap records written (each names the records lost since the previous one).",
            self.gap_records(),
        )?;
        counter(
            &mut enc,
            "rampart_audit_checkpoints",
            "Audit checkpoints signed.",
            self.checkpoints(),
        )?;
        counter(
            &mut enc,
            "rampart_audit_evictions",
            "Eviction records written: the oldest closed records removed to stay under audit.max_store_mb / \
             max_recordings_mb (on_failure = fail_open; records_lost_total{reason=\"evicted\"} counts them).",
            self.evictions(),
        )?;
        counter(
            &mut enc,
            "rampart_audit_recordings_evicted",
            "SSH recording files removed by evictions.",
            self.recordings_evicted.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "rampart_audit_quota_exceeded",
            "Times the audit store or the recordings went over their quota and stayed over (fail_closed: new \
             flows refused, counted as drops reason audit_unavailable).",
            self.quota_exceeded.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "rampart_audit_over_quota",
            "1 while the audit store or the recordings are over their quota.",
            self.over_quota.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "rampart_audit_records_dropped",
            "Audit records lost, all kinds and reasons.",
            lost_total,
        )?;
        if self.fleet.enabled.load(Ordering::Relaxed) {
            let f = &self.fleet;
            gauge(
                &mut enc,
                "rampart_fleet_up",
                "1 while the fleet shipper has a working PostgreSQL session ([fleet]).",
                f.up.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "rampart_fleet_shipped_seq",
                "Audit chain entries of this node shipped to the fleet's PostgreSQL (its high-water mark).",
                f.shipped_seq.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "rampart_fleet_ship_failures",
                "Fleet shipping attempts that failed (each retried; records wait in the local store).",
                f.failures.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "rampart_fleet_halted",
                "1 when fleet shipping stopped for good (another gateway ships under this fleet.node_id; see the log).",
                f.halted.load(Ordering::Relaxed),
            )?;
        }
        let o = &self.fleet.objects;
        if o.enabled.load(Ordering::Relaxed) {
            counter(
                &mut enc,
                "rampart_fleet_recordings_uploaded",
                "SSH recordings uploaded to the fleet's object store, manifest included ([fleet.objects]).",
                o.uploaded.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "rampart_fleet_recordings_pending",
                "SSH recordings waiting for their upload (kept locally until it is confirmed).",
                o.pending.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "rampart_fleet_recordings_failed",
                "SSH recordings that cannot be uploaded (see the log: a different object under the key, or the local copy gone or changed).",
                o.failed.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "rampart_fleet_recording_upload_retries",
                "Recording upload attempts that failed and are retried (object store unreachable or erring).",
                o.retries.load(Ordering::Relaxed),
            )?;
        }
        Ok(())
    }
}
