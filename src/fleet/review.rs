//! Review of the fleet's records in PostgreSQL: flows of every node (`rampart audit flows --fleet`), ordered
//! by time, node and chain sequence, and `rampart audit verify --fleet`, which checks every shipped entry
//! against its node's hash chain (sequence, links, each entry's hash, each record against its digest) and
//! each shipped flow row against the chain entry that last described it.
#![deny(unsafe_code)]

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use crate::audit::review::flows::FlowRow;
use crate::audit::tables::{chain, flows};

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
               AND ($5::BIGINT IS NULL OR started_ms >= $5)
             ORDER BY started_ms DESC, node_id DESC, start_chain DESC
             LIMIT $6",
            &[&f.node, &f.tenant, &f.user, &f.device, &f.since_ms, &limit],
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

/// One node's part of the fleet verification.
#[derive(Debug, Default, Serialize)]
pub struct NodeReport {
    pub shipped_seq: u64,
    pub entries: u64,
    pub first_seq: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub flows: u64,
    pub checkpoints: u64,
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

/// Each shipped checkpoint names an entry's hash as the chain has it (signatures: `rampart audit verify` on
/// the node, with its pinned key).
async fn verify_checkpoints(
    client: &tokio_postgres::Client,
    node: &str,
    r: &mut NodeReport,
) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT p.seq, p.hash = c.hash FROM fleet_checkpoints p
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
        r.checkpoints += 1;
    }
    Ok(())
}
