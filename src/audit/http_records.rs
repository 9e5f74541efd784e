//! HTTP audit records: one per request the HTTP inspector (`crate::http`) handled, and one per TLS connection
//! it passed through or refused without decrypting. They go through the audit pipeline ([`HttpAuditSink`],
//! never blocking) into table `http_requests`, linked to their flow's row (`rampart audit http --flow ID`).
//! Each is an entry of the audit hash chain (`tables::http`), so `rampart audit verify` covers it.
//!
//! Never: update or delete a row.
#![deny(unsafe_code)]

use serde::{Deserialize, Serialize};

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
    pub decision: HttpDecision,
    pub error: Option<String>,
}

/// What the inspector did with a request or TLS connection; written as its lowercase name (`allow`, ...).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::AsRefStr,
    strum::Display,
    strum::EnumString,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum HttpDecision {
    /// No rule blocked it (also the start of every record, before a rule decides).
    #[default]
    Allow,
    /// Allowed, and a `log` rule matched.
    Log,
    /// Refused with a block page, or a TLS connection refused on its server name.
    Block,
    /// A TLS connection passed through without decryption.
    Passthrough,
    /// The upstream failed or the request was cut.
    Error,
}

impl rusqlite::ToSql for HttpDecision {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_ref().into())
    }
}

impl rusqlite::types::FromSql for HttpDecision {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let s = v.as_str()?;
        s.parse().map_err(|_| {
            rusqlite::types::FromSqlError::Other(format!("unknown HTTP decision {s:?}").into())
        })
    }
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

#[cfg(test)]
mod tests {
    use super::HttpDecision;

    /// The spelling is the wire format: JSON records, the `http_requests` table the hash chain covers, metrics
    /// labels and `--decision` filters all use it.
    #[test]
    fn decisions_keep_their_wire_spelling() {
        let all = [
            (HttpDecision::Allow, "allow"),
            (HttpDecision::Log, "log"),
            (HttpDecision::Block, "block"),
            (HttpDecision::Passthrough, "passthrough"),
            (HttpDecision::Error, "error"),
        ];
        for (d, s) in all {
            assert_eq!(serde_json::to_value(d).unwrap(), serde_json::json!(s));
            assert_eq!(d.as_ref(), s);
            assert_eq!(d.to_string(), s);
            assert_eq!(s.parse::<HttpDecision>().unwrap(), d);
        }
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let back: HttpDecision = conn
            .query_row("SELECT ?1", [HttpDecision::Passthrough], |r| r.get(0))
            .unwrap();
        assert_eq!(back, HttpDecision::Passthrough);
        let bad: rusqlite::Result<HttpDecision> =
            conn.query_row("SELECT 'logged'", [], |r| r.get(0));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown HTTP decision \"logged\""));
    }
}
