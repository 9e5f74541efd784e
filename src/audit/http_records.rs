//! HTTP audit records: one per request the HTTP inspector (`crate::http`) handled, and one per TLS connection
//! it passed through or refused without decrypting. They go through the audit pipeline ([`HttpAuditSink`],
//! never blocking) into table `http_requests`, linked to their flow's row (`rampart audit http --flow ID`).
//! Each is an entry of the audit hash chain (`tables::http`), so `rampart audit verify` covers it.
//!
//! Never: update or delete a row.
#![deny(unsafe_code)]

use serde::Serialize;

use super::{AuditSink, LossReason, Record, RecordKind};

/// One request (or TLS connection) as the inspector saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpRecord {
    /// When the request started (Unix ms).
    pub at_ms: i64,
    /// Reference id shown on block pages, so a user's report finds its record.
    pub ref_id: String,
    pub flow_seq: u64,
    pub tenant: String,
    pub device: String,
    pub user: String,
    /// `ip:port` of the device side and of the original destination.
    pub src: String,
    pub dst: String,
    /// `http`, `https` (decrypted) or `tls` (not decrypted: passed through or refused on the server name).
    pub scheme: String,
    pub sni: Option<String>,
    /// `-` for TLS connections that were not decrypted.
    pub method: String,
    pub host: String,
    pub path: String,
    /// The status the device got; `None` when it got none (TLS records, aborted requests).
    pub status: Option<u16>,
    /// Body bytes from the device (after a protocol switch or for TLS not decrypted: all bytes each way).
    pub req_bytes: u64,
    /// Body bytes to the device, including the inspector's own pages.
    pub resp_bytes: u64,
    /// From the request head to the end of the response body (or of the tunnel).
    pub duration_ms: u64,
    /// The flow rule (`[[tenant.rule]]`) that sent the flow to the inspector.
    pub flow_rule: String,
    /// The deciding `[[tenant.http_rule]]` (or a built-in reason such as `upstream-cert-untrusted`); `None`:
    /// no rule matched (allowed).
    pub rule: Option<String>,
    /// `allow`, `log`, `block`, `passthrough` or `error`.
    pub decision: String,
    pub error: Option<String>,
}

/// The HTTP inspector's handle on the audit pipeline. Cloning is cheap.
#[derive(Clone)]
pub struct HttpAuditSink {
    sink: AuditSink,
}

impl HttpAuditSink {
    pub(super) fn new(sink: AuditSink) -> HttpAuditSink {
        HttpAuditSink { sink }
    }

    /// Queues a record; never blocks (a full queue drops and counts it).
    pub fn emit(&self, r: HttpRecord) {
        self.sink.emit(Record::Http(Box::new(r)));
    }

    /// Whether records are being committed (false while the store fails).
    pub fn healthy(&self) -> bool {
        self.sink.healthy()
    }

    /// HTTP records lost so far (full queue, tenant share, failing store, stopped writer).
    pub fn dropped(&self) -> u64 {
        let c = self.sink.counters();
        LossReason::ALL
            .iter()
            .map(|r| c.lost_total(RecordKind::Http, *r))
            .sum()
    }
}
