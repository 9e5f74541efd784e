//! Enrollment records: what happened to tokens and self-enrolled devices (created, enrolled or refused,
//! approved, refreshed, rotated, proven, left, revoked, expired). Produced by `enroll` (the listener and
//! watcher inside the gateway, the admin CLI through its spool), stored in table `enroll_log`
//! (`tables::enroll`), reviewed with `rampart audit enroll` (`review::enroll`).
//!
//! Never: a secret in a record (tokens and devices are named by their public ids).
#![deny(unsafe_code)]

use serde::{Deserialize, Serialize};

use super::{AuditSink, AuditUnavailable, LossReason, Record, RecordKind};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollEvent {
    TokenCreated,
    TokenRevoked,
    /// Too many wrong secrets: the token is locked for a while.
    TokenLocked,
    /// A device enrolled (active or pending).
    DeviceEnrolled,
    /// A retry within the retry window returned the same device (with a new device token).
    DeviceEnrollRetried,
    /// The same token and `device_id` again: the device's key was replaced.
    DeviceReenrolled,
    /// An enrollment was refused (detail: the error code).
    EnrollRefused,
    DeviceApproved,
    /// A device fetched its configuration (detail: whether its copy was out of date).
    DeviceRefreshed,
    DeviceKeyRotated,
    /// The first completed handshake with the device's current key.
    DeviceProven,
    /// The device removed itself.
    DeviceLeft,
    /// An admin removed the device.
    DeviceRevoked,
    /// An ephemeral device was not seen for its timeout and was removed.
    DeviceExpired,
}

impl EnrollEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            EnrollEvent::TokenCreated => "token_created",
            EnrollEvent::TokenRevoked => "token_revoked",
            EnrollEvent::TokenLocked => "token_locked",
            EnrollEvent::DeviceEnrolled => "device_enrolled",
            EnrollEvent::DeviceEnrollRetried => "device_enroll_retried",
            EnrollEvent::DeviceReenrolled => "device_reenrolled",
            EnrollEvent::EnrollRefused => "enroll_refused",
            EnrollEvent::DeviceApproved => "device_approved",
            EnrollEvent::DeviceRefreshed => "device_refreshed",
            EnrollEvent::DeviceKeyRotated => "device_key_rotated",
            EnrollEvent::DeviceProven => "device_proven",
            EnrollEvent::DeviceLeft => "device_left",
            EnrollEvent::DeviceRevoked => "device_revoked",
            EnrollEvent::DeviceExpired => "device_expired",
        }
    }
}

/// One enrollment record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRecord {
    pub at_ms: i64,
    pub event: EnrollEvent,
    /// `device` (a request to the listener), `admin:<who>`, or `gateway` (watcher).
    pub actor: String,
    pub tenant: Option<String>,
    /// `dev_<id>`.
    pub device: Option<String>,
    pub device_name: Option<String>,
    /// The token's public id.
    pub token: Option<String>,
    /// The request's source address.
    pub source: Option<String>,
    /// A small JSON object: address, state, error code, ...
    pub detail: serde_json::Value,
}

/// The enrollment service's handle on the audit pipeline. Cloning is cheap.
#[derive(Clone)]
pub struct EnrollAuditSink {
    sink: AuditSink,
}

impl EnrollAuditSink {
    pub(super) fn new(sink: AuditSink) -> EnrollAuditSink {
        EnrollAuditSink { sink }
    }

    /// Queues a record; never blocks (a full queue drops and counts it).
    pub fn emit(&self, r: EnrollRecord) {
        self.sink.emit(Record::Enroll(Box::new(r)));
    }

    /// Queues a record and waits until it is committed.
    pub async fn emit_durable(&self, r: EnrollRecord) -> Result<u64, AuditUnavailable> {
        self.sink.emit_durable(Record::Enroll(Box::new(r))).await
    }

    /// Whether records are being committed (false while the store fails).
    pub fn healthy(&self) -> bool {
        self.sink.healthy()
    }

    /// Enrollment records lost so far.
    pub fn dropped(&self) -> u64 {
        let c = self.sink.counters();
        LossReason::ALL
            .iter()
            .map(|r| c.lost_total(RecordKind::Enroll, *r))
            .sum()
    }
}
