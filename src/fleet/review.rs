//! Review of the fleet's records in PostgreSQL: flows, HTTP requests and enrollment records of every node
//! (`rampart audit flows|http|enroll --fleet`), ordered by time, node and chain sequence, and
//! `rampart audit verify --fleet`, which checks every shipped entry against its node's hash chain (sequence,
//! links, each entry's hash, each record against its digest), each shipped flow row against the chain entry
//! that last described it, and each shipped checkpoint's signature against the key its node published.
//!
//! HTTP and enrollment records are read back from the canonical rows the shipper put into `fleet_chain`
//! (the exact rows the chain hashes), so what the fleet shows is what `verify --fleet` checks.
#![deny(unsafe_code)]

use std::collections::BTreeMap;

use russh::keys::ssh_key::{HashAlg, PublicKey, SshSig};
use serde::Serialize;
use serde_json::json;

use crate::audit::http_records::HttpRecord;
use crate::audit::review::enroll::EnrollRow;
use crate::audit::review::flows::FlowRow;
use crate::audit::tables::{chain, enroll, flows, http};

/// A flow of some node.
#[derive(Debug, Clone, Serialize)]
pub struct FleetFlow {
    pub node: String,
    /// The flow's start entry in its node's chain.
    pub chain_seq: i64,
    #[serde(flatten)]
    pub flow: FlowRow,
}

#[derive(Debug, Default)]
pub struct FleetFlowFilter {
    pub node: Option<String>,
    pub tenant: Option<String>,
    /// Only these tenants (the review UI caller's scope); `None` = every tenant.
    pub tenant_in: Option<Vec<String>>,
    pub user: Option<String>,
    pub device: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Flows matching `f`, newest first (by start time, then node, then chain sequence).
pub async fn flows(
    client: &tokio_postgres::Client,
    f: &FleetFlowFilter,
) -> Result<Vec<FleetFlow>, tokio_postgres::Error> {
    let limit = f.limit.min(i64::MAX as usize) as i64;
    let rows = client
        .query(
            "SELECT node_id, start_chain, id, tenant, device, \"user\", protocol, src, sport, dst, dport, dst_device,
                    action, rule, started_ms, established_ms, ended_ms, packets_out, bytes_out, packets_in, bytes_in,
                    end_reason
             FROM fleet_flows
             WHERE ($1::TEXT IS NULL OR node_id = $1) AND ($2::TEXT IS NULL OR tenant = $2)
               AND ($3::TEXT IS NULL OR \"user\" = $3) AND ($4::TEXT IS NULL OR device = $4)
               AND ($5::BIGINT IS NULL OR started_ms >= $5) AND ($7::TEXT[] IS NULL OR tenant = ANY($7))
             ORDER BY started_ms DESC, node_id DESC, start_chain DESC
             LIMIT $6",
            &[
                &f.node,
                &f.tenant,
                &f.user,
                &f.device,
                &f.since_ms,
                &limit,
                &f.tenant_in,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FleetFlow {
            node: r.get(0),
            chain_seq: r.get(1),
            flow: FlowRow {
                id: r.get(2),
                tenant: r.get(3),
                device: r.get(4),
                user: r.get(5),
                protocol: r.get::<_, i32>(6) as u8,
                src: r.get(7),
                sport: r.get::<_, i32>(8) as u16,
                dst: r.get(9),
                dport: r.get::<_, i32>(10) as u16,
                dst_device: r.get(11),
                action: r.get(12),
                rule: r.get(13),
                started_ms: r.get(14),
                established_ms: r.get(15),
                ended_ms: r.get(16),
                packets_out: r.get::<_, i64>(17) as u64,
                bytes_out: r.get::<_, i64>(18) as u64,
                packets_in: r.get::<_, i64>(19) as u64,
                bytes_in: r.get::<_, i64>(20) as u64,
                end_reason: r.get(21),
            },
        })
        .collect())
}

/// An HTTP record of some node.
#[derive(Debug, Clone, Serialize)]
pub struct FleetHttp {
    pub node: String,
    /// The record's entry in its node's chain.
    pub chain_seq: i64,
    /// The node's own flow row (the `id` of `audit flows --fleet` for that node).
    pub flow_id: Option<i64>,
    #[serde(flatten)]
    pub record: HttpRecord,
}

#[derive(Debug, Default)]
pub struct FleetHttpFilter {
    pub node: Option<String>,
    pub tenant: Option<String>,
    /// Only these tenants (the review UI caller's scope); `None` = every tenant.
    pub tenant_in: Option<Vec<String>>,
    pub user: Option<String>,
    pub device: Option<String>,
    /// Exact host (case-insensitive).
    pub host: Option<String>,
    pub decision: Option<String>,
    /// A flow of the node (with `node`; flow ids are per node).
    pub flow_id: Option<i64>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// HTTP records matching `f`, newest first (by time, then node, then chain sequence).
pub async fn http_records(
    client: &tokio_postgres::Client,
    f: &FleetHttpFilter,
) -> anyhow::Result<Vec<FleetHttp>> {
    let limit = f.limit.min(i64::MAX as usize) as i64;
    // The record is the canonical row (`audit::tables::http::canonical`): 3 flow_id, 4 tenant, 5 device,
    // 6 user, 12 host, 20 decision.
    let rows = client
        .query(
            "SELECT node_id, seq, record FROM fleet_chain
             WHERE kind = $1 AND record IS NOT NULL
               AND ($2::TEXT IS NULL OR node_id = $2) AND ($3::TEXT IS NULL OR record::jsonb ->> 4 = $3)
               AND ($4::TEXT IS NULL OR record::jsonb ->> 6 = $4) AND ($5::TEXT IS NULL OR record::jsonb ->> 5 = $5)
               AND ($6::TEXT IS NULL OR record::jsonb ->> 12 = lower($6))
               AND ($7::TEXT IS NULL OR record::jsonb ->> 20 = $7)
               AND ($8::BIGINT IS NULL OR (record::jsonb ->> 3)::BIGINT = $8)
               AND ($9::BIGINT IS NULL OR at_ms >= $9)
               AND ($11::TEXT[] IS NULL OR record::jsonb ->> 4 = ANY($11))
             ORDER BY at_ms DESC, node_id DESC, seq DESC
             LIMIT $10",
            &[
                &http::KIND,
                &f.node,
                &f.tenant,
                &f.user,
                &f.device,
                &f.host,
                &f.decision,
                &f.flow_id,
                &f.since_ms,
                &limit,
                &f.tenant_in,
            ],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading the fleet's HTTP records: {}", super::error_text(&e)))?;
    rows.iter()
        .map(|r| {
            let node: String = r.get(0);
            let seq: i64 = r.get(1);
            let text: String = r.get(2);
            let (flow_id, record) = parse_http(&text).map_err(|e| {
                anyhow::anyhow!(
                    "node {node}, entry {seq}: a shipped HTTP record is unreadable ({e})"
                )
            })?;
            Ok(FleetHttp {
                node,
                chain_seq: seq,
                flow_id,
                record,
            })
        })
        .collect()
}

/// A canonical `http_requests` row (`audit::tables::http::canonical`) back into its record.
fn parse_http(text: &str) -> Result<(Option<i64>, HttpRecord), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let a = v
        .as_array()
        .filter(|a| a.len() == 23)
        .ok_or("not a 23-column row")?;
    let s = |i: usize| {
        a[i].as_str()
            .map(str::to_owned)
            .ok_or(format!("column {i} is not text"))
    };
    let opt_s = |i: usize| a[i].as_str().map(str::to_owned);
    let n = |i: usize| a[i].as_i64().ok_or(format!("column {i} is not a number"));
    Ok((
        a[3].as_i64(),
        HttpRecord {
            at_ms: n(0)?,
            ref_id: s(1)?,
            flow_seq: n(2)? as u64,
            tenant: s(4)?,
            device: s(5)?,
            user: s(6)?,
            src: s(7)?,
            dst: s(8)?,
            scheme: s(9)?,
            sni: opt_s(10),
            method: s(11)?,
            host: s(12)?,
            path: s(13)?,
            status: a[14].as_u64().map(|x| x as u16),
            req_bytes: n(15)? as u64,
            resp_bytes: n(16)? as u64,
            duration_ms: n(17)? as u64,
            flow_rule: s(18)?,
            rule: opt_s(19),
            decision: s(20)?
                .parse()
                .map_err(|_| "column 20 is not an HTTP decision".to_string())?,
            error: opt_s(21),
        },
    ))
}

/// An enrollment record of some node (`seq` is its entry in that node's chain).
#[derive(Debug, Clone, Serialize)]
pub struct FleetEnroll {
    pub node: String,
    #[serde(flatten)]
    pub row: EnrollRow,
}

#[derive(Debug, Default)]
pub struct FleetEnrollFilter {
    pub node: Option<String>,
    pub tenant: Option<String>,
    /// Device name or `dev_<id>`.
    pub device: Option<String>,
    pub event: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: usize,
}

/// Enrollment records matching `f`, newest first (by time, then node, then chain sequence).
pub async fn enroll_records(
    client: &tokio_postgres::Client,
    f: &FleetEnrollFilter,
) -> anyhow::Result<Vec<FleetEnroll>> {
    let limit = f.limit.min(i64::MAX as usize) as i64;
    // The record is the canonical row (`audit::tables::enroll::canonical`): 1 event, 3 tenant, 4 device,
    // 5 device name.
    let rows = client
        .query(
            "SELECT node_id, seq, record FROM fleet_chain
             WHERE kind = $1 AND record IS NOT NULL
               AND ($2::TEXT IS NULL OR node_id = $2) AND ($3::TEXT IS NULL OR record::jsonb ->> 3 = $3)
               AND ($4::TEXT IS NULL OR record::jsonb ->> 4 = $4 OR record::jsonb ->> 5 = $4)
               AND ($5::TEXT IS NULL OR record::jsonb ->> 1 = $5)
               AND ($6::BIGINT IS NULL OR at_ms >= $6)
             ORDER BY at_ms DESC, node_id DESC, seq DESC
             LIMIT $7",
            &[
                &enroll::KIND,
                &f.node,
                &f.tenant,
                &f.device,
                &f.event,
                &f.since_ms,
                &limit,
            ],
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "reading the fleet's enrollment records: {}",
                super::error_text(&e)
            )
        })?;
    rows.iter()
        .map(|r| {
            let node: String = r.get(0);
            let seq: i64 = r.get(1);
            let text: String = r.get(2);
            let row = parse_enroll(seq, &text).map_err(|e| {
                anyhow::anyhow!(
                    "node {node}, entry {seq}: a shipped enrollment record is unreadable ({e})"
                )
            })?;
            Ok(FleetEnroll { node, row })
        })
        .collect()
}

/// A canonical `enroll_log` row (`audit::tables::enroll::canonical`) back into its review row.
fn parse_enroll(seq: i64, text: &str) -> Result<EnrollRow, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let a = v
        .as_array()
        .filter(|a| a.len() == 9)
        .ok_or("not a 9-column row")?;
    let s = |i: usize| {
        a[i].as_str()
            .map(str::to_owned)
            .ok_or(format!("column {i} is not text"))
    };
    let opt_s = |i: usize| a[i].as_str().map(str::to_owned);
    let detail = s(8)?;
    Ok(EnrollRow {
        seq,
        at_ms: a[0].as_i64().ok_or("column 0 is not a number")?,
        event: s(1)?,
        actor: s(2)?,
        tenant: opt_s(3),
        device: opt_s(4),
        device_name: opt_s(5),
        token: opt_s(6),
        source: opt_s(7),
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
    })
}

/// One node's part of the fleet verification.
#[derive(Debug, Default, Serialize)]
pub struct NodeReport {
    pub shipped_seq: u64,
    pub entries: u64,
    pub first_seq: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub flows: u64,
    /// Checkpoints whose signature verified with the node's published key.
    pub checkpoints: u64,
    /// Fingerprints of the node's published signing keys, oldest first; more than one: the key changed.
    pub keys: Vec<String>,
    /// Entries whose record was no longer in the local store when shipped (evicted first).
    pub records_missing: u64,
    pub first_break: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct FleetReport {
    pub nodes: BTreeMap<String, NodeReport>,
}

impl FleetReport {
    pub fn ok(&self) -> bool {
        self.nodes.values().all(|n| n.first_break.is_none())
    }
}

/// Verifies every node's shipped chain, flows and checkpoints.
pub async fn verify(client: &tokio_postgres::Client) -> Result<FleetReport, tokio_postgres::Error> {
    let mut report = FleetReport::default();
    let nodes = client
        .query(
            "SELECT node_id, shipped_seq, shipped_hash FROM fleet_nodes ORDER BY node_id",
            &[],
        )
        .await?;
    for n in nodes {
        let node: String = n.get(0);
        let shipped = n.get::<_, i64>(1) as u64;
        let shipped_hash: Option<Vec<u8>> = n.get(2);
        let mut r = NodeReport {
            shipped_seq: shipped,
            ..Default::default()
        };
        verify_chain(client, &node, shipped, shipped_hash, &mut r).await?;
        if r.first_break.is_none() {
            verify_flows(client, &node, &mut r).await?;
        }
        if r.first_break.is_none() {
            verify_checkpoints(client, &node, &mut r).await?;
        }
        report.nodes.insert(node, r);
    }
    Ok(report)
}

async fn verify_chain(
    client: &tokio_postgres::Client,
    node: &str,
    shipped: u64,
    shipped_hash: Option<Vec<u8>>,
    r: &mut NodeReport,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT seq, at_ms, kind, digest, prev_hash, hash, record FROM fleet_chain WHERE node_id = $1 ORDER BY seq",
            &[&node],
        )
        .await?;
    let mut prev: Option<(u64, Vec<u8>)> = None;
    for row in rows {
        let seq = row.get::<_, i64>(0) as u64;
        let at_ms: i64 = row.get(1);
        let kind: String = row.get(2);
        let digest: Vec<u8> = row.get(3);
        let prev_hash: Vec<u8> = row.get(4);
        let hash: Vec<u8> = row.get(5);
        let record: Option<String> = row.get(6);
        let fail = |what: String| Some(format!("entry {seq}: {what}"));
        match &prev {
            None => {
                r.first_seq = seq;
                if seq == 1 && prev_hash != chain::Head::empty().hash {
                    r.first_break =
                        fail("the first entry does not start from the empty chain".into());
                }
            }
            Some((p, ph)) => {
                if seq != p + 1 {
                    r.first_break = fail(format!("entries {} to {} are missing", p + 1, seq - 1));
                } else if &prev_hash != ph {
                    r.first_break = fail("does not link to the entry before it (prev_hash)".into());
                }
            }
        }
        if r.first_break.is_none()
            && chain::entry_hash(&prev_hash, seq, &kind, at_ms, &digest) != hash
        {
            r.first_break = fail("its hash does not match its contents".into());
        }
        if r.first_break.is_none() {
            match &record {
                None => r.records_missing += 1,
                Some(text) => {
                    let ok = chain::digest_text(text) == digest
                        || legacy_flow_matches(&kind, text, &digest);
                    if !ok {
                        r.first_break = fail(format!(
                            "the shipped {kind} record does not match its digest (altered)"
                        ));
                    }
                }
            }
        }
        if r.first_break.is_some() {
            return Ok(());
        }
        r.entries += 1;
        *r.by_kind.entry(kind).or_default() += 1;
        prev = Some((seq, hash));
    }
    let last = prev.as_ref().map(|p| p.0).unwrap_or(0);
    if last != shipped {
        r.first_break = Some(format!(
            "the node's high-water mark says {shipped} entries were shipped, the fleet holds entries up to {last}"
        ));
    } else if last > 0 && prev.map(|p| p.1) != shipped_hash {
        r.first_break = Some(format!(
            "entry {last}: its hash differs from the node's shipped head"
        ));
    } else if r.first_seq > 1 {
        r.first_break = Some(format!(
            "entries 1 to {} were never shipped",
            r.first_seq - 1
        ));
    }
    Ok(())
}

fn legacy_flow_matches(kind: &str, text: &str, digest: &[u8]) -> bool {
    matches!(kind, flows::START | flows::ESTABLISHED | flows::END)
        && serde_json::from_str::<serde_json::Value>(text)
            .map(|v| chain::digest(&flows::without_row_id(&v)) == digest)
            .unwrap_or(false)
}

/// Each shipped flow row, rebuilt as the chain hashes it, against the digest of the last entry it names.
async fn verify_flows(
    client: &tokio_postgres::Client,
    node: &str,
    r: &mut NodeReport,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT f.run_id, f.seq, f.tenant, f.device, f.\"user\", f.protocol, f.src, f.sport, f.dst, f.dport,
                    f.dst_device, f.action, f.rule, f.started_ms, f.established_ms, f.ended_ms, f.packets_out,
                    f.bytes_out, f.packets_in, f.bytes_in, f.end_reason, f.id, f.start_chain, f.est_chain,
                    f.end_chain, c.kind, c.digest
             FROM fleet_flows f
             LEFT JOIN fleet_chain c ON c.node_id = f.node_id
                 AND c.seq = COALESCE(f.end_chain, f.est_chain, f.start_chain)
             WHERE f.node_id = $1 ORDER BY f.start_chain",
            &[&node],
        )
        .await?;
    for row in rows {
        let start: i64 = row.get(22);
        let kind: Option<String> = row.get(25);
        let digest: Option<Vec<u8>> = row.get(26);
        let (Some(kind), Some(digest)) = (kind, digest) else {
            r.first_break = Some(format!(
                "flow of entry {start}: the chain entry it names was not shipped"
            ));
            return Ok(());
        };
        let mut v = vec![
            json!(row.get::<_, i64>(0)),
            json!(row.get::<_, i64>(1)),
            json!(row.get::<_, String>(2)),
            json!(row.get::<_, String>(3)),
            json!(row.get::<_, String>(4)),
            json!(row.get::<_, i32>(5) as i64),
            json!(row.get::<_, String>(6)),
            json!(row.get::<_, i32>(7) as i64),
            json!(row.get::<_, String>(8)),
            json!(row.get::<_, i32>(9) as i64),
            json!(row.get::<_, Option<String>>(10)),
            json!(row.get::<_, String>(11)),
            json!(row.get::<_, String>(12)),
            json!(row.get::<_, i64>(13)),
        ];
        if kind != flows::START {
            v.push(json!(row.get::<_, Option<i64>>(14)));
        }
        if kind == flows::END {
            v.push(json!(row.get::<_, Option<i64>>(15)));
            for i in 16..20 {
                v.push(json!(row.get::<_, i64>(i)));
            }
            v.push(json!(row.get::<_, Option<String>>(20)));
        }
        v.push(json!(row.get::<_, i64>(21)));
        let c = serde_json::Value::Array(v);
        if chain::digest(&c) != digest && chain::digest(&flows::without_row_id(&c)) != digest {
            r.first_break = Some(format!(
                "flow of entry {start}: the shipped flow row does not match its {kind} chain entry (altered)"
            ));
            return Ok(());
        }
        r.flows += 1;
    }
    Ok(())
}

/// Each shipped checkpoint names an entry's hash as the chain has it, and its signature verifies with the
/// node's published signing key of the fingerprint it names (`fleet_node_keys`, whose rows are checked
/// against their own fingerprints first).
async fn verify_checkpoints(
    client: &tokio_postgres::Client,
    node: &str,
    r: &mut NodeReport,
) -> Result<(), tokio_postgres::Error> {
    let mut keys: BTreeMap<String, PublicKey> = BTreeMap::new();
    for row in client
        .query(
            "SELECT fingerprint, public_key FROM fleet_node_keys WHERE node_id = $1 ORDER BY published_at, fingerprint",
            &[&node],
        )
        .await?
    {
        let fp: String = row.get(0);
        let text: String = row.get(1);
        match PublicKey::from_openssh(text.trim()) {
            Ok(k) if k.fingerprint(HashAlg::Sha256).to_string() == fp => {
                r.keys.push(fp.clone());
                keys.insert(fp, k);
            }
            _ => {
                r.first_break = Some(format!(
                    "signing key {fp}: the published public key does not have that fingerprint (altered)"
                ));
                return Ok(());
            }
        }
    }
    let rows = client
        .query(
            "SELECT p.seq, p.hash = c.hash, p.hash, p.key_fingerprint, p.signature FROM fleet_checkpoints p
             LEFT JOIN fleet_chain c ON c.node_id = p.node_id AND c.seq = p.seq
             WHERE p.node_id = $1 ORDER BY p.seq",
            &[&node],
        )
        .await?;
    for row in rows {
        let seq: i64 = row.get(0);
        if row.get::<_, Option<bool>>(1) != Some(true) {
            r.first_break = Some(format!(
                "checkpoint at entry {seq}: does not match the shipped chain"
            ));
            return Ok(());
        }
        let hash: Vec<u8> = row.get(2);
        let fp: String = row.get(3);
        let signature: String = row.get(4);
        let Some(key) = keys.get(&fp) else {
            r.first_break = Some(format!(
                "checkpoint at entry {seq}: signed by key {fp}, which node {node} never published (fleet_node_keys)"
            ));
            return Ok(());
        };
        let ok = SshSig::from_pem(signature.as_bytes())
            .ok()
            .is_some_and(|sig| {
                key.verify(
                    chain::CHECKPOINT_NAMESPACE,
                    &chain::checkpoint_message(seq as u64, &hash),
                    &sig,
                )
                .is_ok()
            });
        if !ok {
            r.first_break = Some(format!(
                "checkpoint at entry {seq}: its signature does not verify with node {node}'s key {fp} (forged or altered)"
            ));
            return Ok(());
        }
        r.checkpoints += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tables::chain::Head;

    /// The canonical rows the shipper sends, made by the store's own insert and `canonical`, parse back into
    /// the records that went in.
    #[test]
    fn shipped_http_and_enrollment_rows_parse_back_into_their_records() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::audit::db::migrate(&mut conn).unwrap();
        let mut head = Head::empty();
        let rec = HttpRecord {
            at_ms: 1_700_000_000_123,
            ref_id: "r-1".into(),
            flow_seq: 7,
            tenant: "acme".into(),
            device: "alice".into(),
            user: "alice@acme".into(),
            src: "100.96.0.2:40000".into(),
            dst: "100.96.0.3:8000".into(),
            scheme: "http".into(),
            sni: None,
            method: "GET".into(),
            host: "bob".into(),
            path: "/x?y=1".into(),
            status: Some(200),
            req_bytes: 0,
            resp_bytes: 12,
            duration_ms: 3,
            flow_rule: "web".into(),
            rule: Some("log-all".into()),
            decision: crate::audit::http_records::HttpDecision::Log,
            error: None,
        };
        http::insert(&conn, &mut head, 1, &rec).unwrap();
        let text = http::canonical(&conn, head.seq)
            .unwrap()
            .unwrap()
            .to_string();
        let (flow_id, back) = parse_http(&text).unwrap();
        assert_eq!(flow_id, None, "no flow row for seq 7 in this store");
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&rec).unwrap()
        );
        assert!(parse_http("[1,2]").is_err());

        let e = crate::audit::enroll_records::EnrollRecord {
            at_ms: 1_700_000_000_456,
            event: crate::audit::enroll_records::EnrollEvent::TokenCreated,
            actor: "root".into(),
            tenant: Some("acme".into()),
            device: None,
            device_name: None,
            token: Some("tok1".into()),
            source: None,
            detail: serde_json::json!({"uses": 1}),
        };
        enroll::insert(&conn, &mut head, &e).unwrap();
        let text = enroll::canonical(&conn, head.seq)
            .unwrap()
            .unwrap()
            .to_string();
        let row = parse_enroll(head.seq as i64, &text).unwrap();
        assert_eq!(
            (
                row.seq,
                row.at_ms,
                row.event.as_str(),
                row.tenant.as_deref(),
                row.token.as_deref()
            ),
            (
                head.seq as i64,
                e.at_ms,
                "token_created",
                Some("acme"),
                Some("tok1")
            )
        );
        assert_eq!(row.detail, e.detail);
    }
}
