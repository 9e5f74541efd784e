//! The outbox shipper: a thread of its own (`rampart-fleet`, with a current-thread tokio runtime) that copies
//! committed chain entries from the local audit store to the fleet's PostgreSQL.
//!
//! Why a thread: it reads SQLite with blocking calls and may wait long on a PostgreSQL that is down; on its
//! own thread neither can stall the data path's or the admin API's runtimes, and the writer thread (the only
//! writer of the store) never waits for it. It only reads the store (its own read-only connection; WAL lets
//! it run beside the writer).
//!
//! Exactly once: each batch (chain entries `shipped_seq + 1 ..= hi`, their canonical records, the flows'
//! rows as of `hi`, the checkpoints up to `hi`) goes in one PostgreSQL transaction that also moves the
//! node's high-water mark (`fleet_nodes.shipped_seq`) from the value this shipper read; a crash on either
//! side leaves the whole batch shipped or not at all, and the next start resumes from the mark in
//! PostgreSQL. Rows are keyed by `(node_id, seq)` with `ON CONFLICT DO NOTHING` on top, so even a replayed
//! batch cannot make a second copy. While PostgreSQL is unreachable records simply wait in the local store
//! (which `fail_closed` alone decides on) and the shipper retries with backoff.
//!
//! Signing keys: the node publishes its audit signing public key (`state_dir/audit_signing_key.pub`) in
//! `fleet_node_keys` when it connects, and in the same transaction as the first checkpoint a key signed, so
//! `verify --fleet` can check every shipped checkpoint's signature. A new key is a new row, never an update.
#![deny(unsafe_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use russh::keys::ssh_key::{HashAlg, PublicKey};
use tokio::sync::Notify;

use super::Connector;
use crate::audit::tables::chain;
use crate::audit::AuditCounters;
use crate::config::FleetSettings;

/// Chain entries per PostgreSQL transaction.
pub const BATCH: usize = 500;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The running shipper; [`ShipperHandle::finish`] ships what is committed (bounded) and stops it.
pub struct ShipperHandle {
    thread: std::thread::JoinHandle<()>,
    stop: Arc<Stop>,
}

struct Stop {
    flag: AtomicBool,
    wake: Notify,
}

impl ShipperHandle {
    pub fn finish(self) {
        self.stop.flag.store(true, Ordering::SeqCst);
        self.stop.wake.notify_one();
        let _ = self.thread.join();
    }
}

/// Where shipping stands for this node, as PostgreSQL says.
struct Session {
    client: tokio_postgres::Client,
    shipped_seq: u64,
    shipped_hash: Option<Vec<u8>>,
    checkpoint_seq: u64,
    /// Fingerprints of this node's signing keys already in `fleet_node_keys`.
    published: HashSet<String>,
}

/// Why a batch did not ship.
#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error("PostgreSQL: {0}")]
    Pg(String),
    #[error("the local audit store: {0}")]
    Local(#[from] rusqlite::Error),
    /// Shipping as this node cannot continue safely (another process ships as it, or a replaced store).
    #[error("{0}")]
    Conflict(String),
}

impl From<tokio_postgres::Error> for ShipError {
    fn from(e: tokio_postgres::Error) -> Self {
        ShipError::Pg(super::error_text(&e))
    }
}

/// Starts the shipper for the store at `db`, whose checkpoints are signed by the key whose public half is
/// `signing_pub`. Connects, migrates the fleet schema and registers the node first, and fails (naming the
/// key to fix) if PostgreSQL is unreachable or refuses the login.
pub fn start(
    settings: &FleetSettings,
    connector: Connector,
    db: PathBuf,
    signing_pub: PathBuf,
    counters: Arc<AuditCounters>,
) -> anyhow::Result<ShipperHandle> {
    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        wake: Notify::new(),
    });
    let node = settings.node_id.clone();
    let interval = settings.ship_interval;
    let stop2 = stop.clone();
    let thread = super::start_worker("rampart-fleet", "fleet shipper", move |ready| async move {
        let session = match open_session(&connector, &node, &signing_pub).await {
            Ok(s) => {
                ready.started();
                Some(s)
            }
            Err(e) => return ready.failed(e),
        };
        let g = &counters.fleet;
        g.enabled.store(true, Ordering::Relaxed);
        g.up.store(1, Ordering::Relaxed);
        if let Some(s) = &session {
            g.shipped_seq.store(s.shipped_seq, Ordering::Relaxed);
        }
        let paths = (db, signing_pub);
        run(connector, node, paths, interval, stop2, session, &counters).await;
    })?;
    Ok(ShipperHandle { thread, stop })
}

/// Connects, migrates, reads (or creates) this node's row, and publishes its signing key.
async fn open_session(
    connector: &Connector,
    node: &str,
    signing_pub: &Path,
) -> anyhow::Result<Session> {
    let mut client = connector.connect().await?;
    super::schema::migrate(&mut client).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: fleet.postgres_url: cannot migrate the fleet schema: {e:#}",
            connector.source
        )
    })?;
    client
        .execute(
            "INSERT INTO fleet_nodes (node_id) VALUES ($1) ON CONFLICT (node_id) DO NOTHING",
            &[&node],
        )
        .await
        .map_err(|e| anyhow::anyhow!("registering node {node}: {}", super::error_text(&e)))?;
    let row = client
        .query_one(
            "SELECT shipped_seq, shipped_hash, checkpoint_seq FROM fleet_nodes WHERE node_id = $1",
            &[&node],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading node {node}: {}", super::error_text(&e)))?;
    if let Some((fp, text)) = signing_key(signing_pub) {
        client
            .execute(
                "INSERT INTO fleet_node_keys (node_id, fingerprint, public_key) VALUES ($1, $2, $3)
                 ON CONFLICT (node_id, fingerprint) DO NOTHING",
                &[&node, &fp, &text],
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "publishing node {node}'s audit signing key: {}",
                    super::error_text(&e)
                )
            })?;
    }
    let published = client
        .query(
            "SELECT fingerprint FROM fleet_node_keys WHERE node_id = $1",
            &[&node],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading node {node}'s keys: {}", super::error_text(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Session {
        client,
        shipped_seq: row.get::<_, i64>(0) as u64,
        shipped_hash: row.get(1),
        checkpoint_seq: row.get::<_, i64>(2) as u64,
        published,
    })
}

/// The node's audit signing public key as `(SHA256 fingerprint, OpenSSH text)`; `None` (logged) when it
/// cannot be read: the checkpoints still ship, and `verify --fleet` names the ones it cannot check.
fn signing_key(path: &Path) -> Option<(String, String)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the audit signing public key to publish it to the fleet");
            return None;
        }
    };
    match PublicKey::from_openssh(text.trim()) {
        Ok(k) => Some((
            k.fingerprint(HashAlg::Sha256).to_string(),
            text.trim().to_string(),
        )),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the audit signing public key is not an OpenSSH public key; not published to the fleet");
            None
        }
    }
}

async fn run(
    connector: Connector,
    node: String,
    (db, signing_pub): (PathBuf, PathBuf),
    interval: Duration,
    stop: Arc<Stop>,
    mut session: Option<Session>,
    counters: &AuditCounters,
) {
    let g = &counters.fleet;
    let mut local: Option<Connection> = None;
    let mut backoff = Duration::from_millis(250);
    let mut last_warn: Option<Instant> = None;
    let mut halted = false;
    loop {
        let stopping = stop.flag.load(Ordering::SeqCst);
        if halted {
            if stopping {
                return;
            }
            stop.wake.notified().await;
            continue;
        }
        if session.as_ref().is_some_and(|s| s.client.is_closed()) {
            // PostgreSQL went away (or restarted) since the last batch.
            g.up.store(0, Ordering::Relaxed);
            session = None;
        }
        if session.is_none() {
            match open_session(&connector, &node, &signing_pub).await {
                Ok(s) => {
                    tracing::info!(node = %node, shipped_seq = s.shipped_seq, "fleet PostgreSQL reachable again; shipping resumes");
                    g.shipped_seq.store(s.shipped_seq, Ordering::Relaxed);
                    g.up.store(1, Ordering::Relaxed);
                    session = Some(s);
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    if stopping {
                        tracing::warn!(error = %format!("{e:#}"), "stopping with audit records not yet shipped to the fleet (they ship at the next start)");
                        return;
                    }
                    g.failures.fetch_add(1, Ordering::Relaxed);
                    warn_limited(&mut last_warn, &format!("{e:#}"));
                    wait(&stop, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        if local.is_none() {
            match crate::audit::db::open_readonly(&db) {
                Ok(c) => local = Some(c),
                Err(e) => {
                    warn_limited(
                        &mut last_warn,
                        &format!("cannot open the audit store for shipping: {e}"),
                    );
                    if stopping {
                        return;
                    }
                    wait(&stop, MAX_BACKOFF).await;
                    continue;
                }
            }
        }
        let (Some(s), Some(conn)) = (session.as_mut(), local.as_ref()) else {
            continue;
        };
        let result = ship_batch(s, conn, &node, &signing_pub).await;
        g.shipped_seq.store(s.shipped_seq, Ordering::Relaxed);
        match result {
            Ok(n) if n >= BATCH => continue,
            Ok(_) => {
                if stopping {
                    return;
                }
                wait(&stop, interval).await;
            }
            Err(ShipError::Conflict(m)) => {
                tracing::error!(node = %node, "fleet shipping stopped: {m}");
                g.halted.store(1, Ordering::Relaxed);
                g.up.store(0, Ordering::Relaxed);
                halted = true;
            }
            Err(e) => {
                warn_limited(
                    &mut last_warn,
                    &format!("fleet shipping failed, retrying: {e}"),
                );
                if matches!(e, ShipError::Local(_)) {
                    local = None;
                }
                session = None;
                if stopping {
                    return;
                }
                wait(&stop, backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn warn_limited(last: &mut Option<Instant>, msg: &str) {
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
        tracing::warn!("{msg}");
        *last = Some(Instant::now());
    } else {
        tracing::debug!("{msg}");
    }
}

async fn wait(stop: &Stop, d: Duration) {
    if stop.flag.load(Ordering::SeqCst) {
        return;
    }
    let _ = tokio::time::timeout(d, stop.wake.notified()).await;
}

/// A flow's row as it stood at chain entry `hi` (later changes are left to a later batch).
struct FlowRow {
    start_chain: i64,
    id: i64,
    run_id: i64,
    seq: i64,
    tenant: String,
    device: String,
    user: String,
    protocol: i32,
    src: String,
    sport: i32,
    dst: String,
    dport: i32,
    dst_device: Option<String>,
    action: String,
    rule: String,
    started_ms: i64,
    established_ms: Option<i64>,
    ended_ms: Option<i64>,
    counters: [i64; 4],
    end_reason: Option<String>,
    est_chain: Option<i64>,
    end_chain: Option<i64>,
}

fn flows_in(conn: &Connection, lo: u64, hi: u64) -> rusqlite::Result<Vec<FlowRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT start_chain, id, run_id, seq, tenant, device, user, protocol, src, sport, dst, dport, dst_device,
                action, rule, started_ms, established_ms, est_chain, ended_ms, packets_out, bytes_out, packets_in,
                bytes_in, end_reason, end_chain
         FROM flows
         WHERE start_chain IS NOT NULL
           AND (start_chain BETWEEN ?1 AND ?2 OR est_chain BETWEEN ?1 AND ?2 OR end_chain BETWEEN ?1 AND ?2)",
    )?;
    let (lo, hi) = (lo as i64, hi as i64);
    let rows = stmt.query_map([lo, hi], |r| {
        let start_chain: i64 = r.get(0)?;
        let est_chain: Option<i64> = r.get::<_, Option<i64>>(17)?.filter(|&c| c <= hi);
        let end_chain: Option<i64> = r.get::<_, Option<i64>>(24)?.filter(|&c| c <= hi);
        let ended = end_chain.is_some();
        Ok(FlowRow {
            start_chain,
            id: r.get(1)?,
            run_id: r.get(2)?,
            seq: r.get(3)?,
            tenant: r.get(4)?,
            device: r.get(5)?,
            user: r.get(6)?,
            protocol: r.get(7)?,
            src: r.get(8)?,
            sport: r.get(9)?,
            dst: r.get(10)?,
            dport: r.get(11)?,
            dst_device: r.get(12)?,
            action: r.get(13)?,
            rule: r.get(14)?,
            started_ms: r.get(15)?,
            established_ms: if est_chain.is_some() {
                r.get(16)?
            } else {
                None
            },
            ended_ms: if ended { r.get(18)? } else { None },
            counters: if ended {
                [r.get(19)?, r.get(20)?, r.get(21)?, r.get(22)?]
            } else {
                [0; 4]
            },
            end_reason: if ended { r.get(23)? } else { None },
            est_chain,
            end_chain,
        })
    })?;
    rows.collect()
}

/// Checkpoints with `after < seq <= hi`, in order.
fn checkpoints_in(
    conn: &Connection,
    after: u64,
    hi: u64,
) -> rusqlite::Result<Vec<chain::Checkpoint>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, hash, at_ms, key_fingerprint, signature FROM checkpoints WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
    )?;
    let rows = stmt.query_map([after as i64, hi as i64], chain::Checkpoint::from_row)?;
    rows.collect()
}

/// Ships the next batch; returns how many chain entries it shipped.
async fn ship_batch(
    s: &mut Session,
    conn: &Connection,
    node: &str,
    signing_pub: &Path,
) -> Result<usize, ShipError> {
    // One read transaction: entries, records, flows and checkpoints from the same snapshot.
    let snapshot = conn.unchecked_transaction()?;
    let entries = chain::entries_after(&snapshot, s.shipped_seq, BATCH)?;
    let Some(first) = entries.first() else {
        return Ok(0);
    };
    if s.shipped_seq > 0 && first.seq == s.shipped_seq + 1 {
        if let Some(h) = &s.shipped_hash {
            if &first.prev_hash != h {
                return Err(ShipError::Conflict(format!(
                    "the local audit chain does not continue what node {node} shipped up to entry {} (another gateway \
                     uses fleet.node_id = {node:?}, or this store was replaced); give this node its own node_id",
                    s.shipped_seq
                )));
            }
        }
    }
    if first.seq != s.shipped_seq + 1 {
        tracing::warn!(
            node,
            from = s.shipped_seq + 1,
            to = first.seq - 1,
            "chain entries were removed locally before they were shipped (quota eviction); verify --fleet reports the gap"
        );
    }
    let lo = first.seq;
    let hi = entries.last().map(|e| e.seq).unwrap_or(lo);
    let mut seqs = Vec::with_capacity(entries.len());
    let mut ats = Vec::with_capacity(entries.len());
    let mut kinds = Vec::with_capacity(entries.len());
    let mut digests = Vec::with_capacity(entries.len());
    let mut prevs = Vec::with_capacity(entries.len());
    let mut hashes = Vec::with_capacity(entries.len());
    let mut records: Vec<Option<String>> = Vec::with_capacity(entries.len());
    for e in &entries {
        records.push(
            crate::audit::review::verify::canonical(&snapshot, &e.kind, e.seq)?
                .map(|v| v.to_string()),
        );
        seqs.push(e.seq as i64);
        ats.push(e.at_ms);
        kinds.push(e.kind.clone());
        digests.push(e.digest.clone());
        prevs.push(e.prev_hash.clone());
        hashes.push(e.hash.clone());
    }
    let flows = flows_in(&snapshot, lo, hi)?;
    let checkpoints = checkpoints_in(&snapshot, s.checkpoint_seq, hi)?;
    drop(snapshot);
    let last_hash = entries.last().map(|e| e.hash.clone());
    let new_cp = checkpoints
        .last()
        .map(|c| c.seq)
        .unwrap_or(s.checkpoint_seq);
    // A checkpoint signed by a key not yet published: publish it with the checkpoint (normally the key was
    // published at connect; this covers a key read only after that).
    let mut new_keys: Vec<(String, String)> = Vec::new();
    for c in &checkpoints {
        if s.published.contains(&c.key_fingerprint)
            || new_keys.iter().any(|k| k.0 == c.key_fingerprint)
        {
            continue;
        }
        match signing_key(signing_pub) {
            Some(k) if k.0 == c.key_fingerprint => new_keys.push(k),
            _ => tracing::warn!(
                node,
                checkpoint = c.seq,
                fingerprint = %c.key_fingerprint,
                "a checkpoint is signed by a key other than {}; it ships, and verify --fleet reports it",
                signing_pub.display()
            ),
        }
    }

    let tx = s.client.transaction().await?;
    tx.execute(
        "INSERT INTO fleet_chain (node_id, seq, at_ms, kind, digest, prev_hash, hash, record)
         SELECT $1, * FROM unnest($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::BYTEA[], $6::BYTEA[], $7::BYTEA[], $8::TEXT[])
         ON CONFLICT (node_id, seq) DO NOTHING",
        &[&node, &seqs, &ats, &kinds, &digests, &prevs, &hashes, &records],
    )
    .await?;
    if !flows.is_empty() {
        let stmt = tx
            .prepare(
                "INSERT INTO fleet_flows (node_id, start_chain, id, run_id, seq, tenant, device, \"user\", protocol, src,
                     sport, dst, dport, dst_device, action, rule, started_ms, established_ms, ended_ms, packets_out,
                     bytes_out, packets_in, bytes_in, end_reason, est_chain, end_chain)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                     $21, $22, $23, $24, $25, $26)
                 ON CONFLICT (node_id, start_chain) DO UPDATE SET established_ms = EXCLUDED.established_ms,
                     ended_ms = EXCLUDED.ended_ms, packets_out = EXCLUDED.packets_out, bytes_out = EXCLUDED.bytes_out,
                     packets_in = EXCLUDED.packets_in, bytes_in = EXCLUDED.bytes_in, end_reason = EXCLUDED.end_reason,
                     est_chain = EXCLUDED.est_chain, end_chain = EXCLUDED.end_chain",
            )
            .await?;
        for f in &flows {
            tx.execute(
                &stmt,
                &[
                    &node,
                    &f.start_chain,
                    &f.id,
                    &f.run_id,
                    &f.seq,
                    &f.tenant,
                    &f.device,
                    &f.user,
                    &f.protocol,
                    &f.src,
                    &f.sport,
                    &f.dst,
                    &f.dport,
                    &f.dst_device,
                    &f.action,
                    &f.rule,
                    &f.started_ms,
                    &f.established_ms,
                    &f.ended_ms,
                    &f.counters[0],
                    &f.counters[1],
                    &f.counters[2],
                    &f.counters[3],
                    &f.end_reason,
                    &f.est_chain,
                    &f.end_chain,
                ],
            )
            .await?;
        }
    }
    for (fp, text) in &new_keys {
        tx.execute(
            "INSERT INTO fleet_node_keys (node_id, fingerprint, public_key) VALUES ($1, $2, $3)
             ON CONFLICT (node_id, fingerprint) DO NOTHING",
            &[&node, fp, text],
        )
        .await?;
    }
    for c in &checkpoints {
        tx.execute(
            "INSERT INTO fleet_checkpoints (node_id, seq, hash, at_ms, key_fingerprint, signature)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (node_id, seq) DO NOTHING",
            &[
                &node,
                &(c.seq as i64),
                &c.hash,
                &c.at_ms,
                &c.key_fingerprint,
                &c.signature,
            ],
        )
        .await?;
    }
    // Last, so a batch that raced another shipper is rolled back whole.
    let moved = tx
        .execute(
            "UPDATE fleet_nodes SET shipped_seq = $2, shipped_hash = $3, checkpoint_seq = $4, last_shipped = now()
             WHERE node_id = $1 AND shipped_seq = $5",
            &[&node, &(hi as i64), &last_hash, &(new_cp as i64), &(s.shipped_seq as i64)],
        )
        .await?;
    if moved != 1 {
        return Err(ShipError::Conflict(format!(
            "node {node}'s high-water mark in PostgreSQL moved under this shipper (another gateway ships as \
             fleet.node_id = {node:?}); give each gateway its own node_id"
        )));
    }
    tx.commit().await?;
    tracing::debug!(
        node,
        from = lo,
        to = hi,
        flows = flows.len(),
        "shipped audit records to the fleet"
    );
    s.shipped_seq = hi;
    s.shipped_hash = last_hash;
    s.checkpoint_seq = new_cp;
    s.published.extend(new_keys.into_iter().map(|k| k.0));
    Ok(entries.len())
}
