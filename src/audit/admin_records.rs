//! Review UI records: sign-ins (and refusals), reads of recordings, terminated sessions, token and device
//! changes made in the web UI. Produced by `admin::audit` inside the gateway, stored in table `admin_log`
//! (`tables::admin`, each a chain entry), reviewed with `rampart audit admin` (`review::admin`).
//!
//! Never: a password, cookie or token secret in a record.
#![deny(unsafe_code)]

use serde::{Deserialize, Serialize};

use super::{AuditSink, Record};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum AdminEvent {
    LoginSucceeded,
    LoginFailed,
    /// A session's record list, a recording (cast or sealed capture) or a live view was read.
    SessionRead,
    RecordingRead,
    LiveViewed,
    SessionTerminated,
    TokenCreated,
    TokenRevoked,
    DeviceApproved,
}

impl AdminEvent {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// One review UI record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub at_ms: i64,
    pub event: AdminEvent,
    /// The account (for a failed sign-in: the name that was tried).
    pub actor: String,
    pub tenant: Option<String>,
    pub session_id: Option<String>,
    /// The request's source address.
    pub source: Option<String>,
    /// A small JSON object: channel, reason, token id, ...
    pub detail: serde_json::Value,
}

/// The review UI's handle on the audit pipeline. Cloning is cheap.
#[derive(Clone)]
pub struct AdminAuditSink {
    sink: AuditSink,
}

impl AdminAuditSink {
    pub(super) fn new(sink: AuditSink) -> AdminAuditSink {
        AdminAuditSink { sink }
    }

    /// Queues a record; never blocks (a full queue drops and counts it).
    pub fn emit(&self, r: AdminRecord) {
        self.sink.emit(Record::Admin(Box::new(r)));
    }
}
