//! The writer thread (`rampart-audit`): the only code that writes the store. It takes records off the
//! queue, commits them in batches (one IMMEDIATE transaction across all tables, so an HTTP record and its
//! flow's row commit together or in order) at most `commit_interval` after the first of a batch arrived, at
//! once when a producer waits for a durable record, and signs checkpoints of the SSH chain.
//!
//! A failed commit is retried with the next batch; while it fails the store is marked unhealthy (fail-closed
//! gateways stop admitting new flows, inspectors refuse what must be recorded), records waiting for a
//! durable answer are told so, and at most `queue` records are held, older ones being dropped and counted.
//!
//! Every `quota_check_interval` (or [`QUOTA_CHECK_COMMITS`] commits) it measures the store's used pages and the
//! recordings directory against their quotas (`audit::quota`): fail-open evicts the oldest closed records (an
//! `eviction` record in the chain says what, signed at once); fail-closed marks the pipeline over quota, so
//! the data path refuses new flows until a later measurement finds room again.
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use russh::keys::ssh_key::PrivateKey;

use serde_json::json;

use super::counters::LossTable;
use super::quota::{self, Goal, OpenScope};
use super::tables::{chain, events};
use super::{
    tables, CheckpointSink, LossReason, Msg, PipelineOptions, Queued, Record, RecordKind, Shared,
    MAX_BATCH,
};
use crate::clock::{unix_ms, WallClock};
use crate::config::FailurePolicy;

/// The quotas are also measured after this many commits since the last measurement.
pub(crate) const QUOTA_CHECK_COMMITS: u32 = 64;

pub(crate) struct Writer {
    conn: Connection,
    key: PrivateKey,
    shared: Arc<Shared>,
    run_id: i64,
    clock: WallClock,
    interval: Duration,
    cap: usize,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    pending: VecDeque<Queued>,
    unsigned: u64,
    last_checkpoint: Instant,
    last_error_log: Option<Instant>,
    /// Losses already named by a gap record.
    recorded_losses: LossTable,
    sink: CheckpointSink,
    quota: QuotaState,
    /// This run's `run.start` entry (SSH sessions that began before it are closed).
    run_start_seq: u64,
}

struct QuotaState {
    state_dir: PathBuf,
    max_store: u64,
    max_recordings: u64,
    policy: FailurePolicy,
    interval: Duration,
    last_check: Option<Instant>,
    commits: u32,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        key: PrivateKey,
        shared: Arc<Shared>,
        opts: &PipelineOptions,
    ) -> Writer {
        Writer {
            conn,
            key,
            shared,
            run_id: crate::clock::random_id(),
            clock: WallClock::now(),
            interval: opts.commit_interval,
            cap: opts.queue.max(1),
            checkpoint_every: opts.checkpoint_every.max(1),
            checkpoint_interval: opts.checkpoint_interval,
            pending: VecDeque::new(),
            unsigned: 0,
            last_checkpoint: Instant::now(),
            last_error_log: None,
            recorded_losses: LossTable::default(),
            sink: opts.checkpoint_sink.clone(),
            quota: QuotaState {
                state_dir: opts.state_dir.clone(),
                max_store: opts.max_store_bytes,
                max_recordings: opts.max_recordings_bytes,
                policy: opts.on_failure,
                interval: opts.quota_check_interval,
                last_check: None,
                commits: 0,
            },
            run_start_seq: 0,
        }
    }

    /// The chain's first entry (on a new chain) and this run's start.
    fn start_run(&mut self) {
        let run_id = self.run_id;
        let r = self.with_tx(|tx, head| {
            if head.seq == 0 {
                let legacy = json!({
                    "flows": count(tx, "SELECT count(*) FROM flows WHERE start_chain IS NULL")?,
                    "http_requests": count(tx, "SELECT count(*) FROM http_requests WHERE chain_seq IS NULL")?,
                    "ssh_log_v1": count(tx, "SELECT count(*) FROM ssh_log_v1")?,
                });
                events::append(
                    tx,
                    head,
                    events::CHAIN_START,
                    unix_ms(),
                    &json!({ "unchained_rows": legacy }),
                )?;
            }
            // An eviction happens inside a run: last after it, it means no run.end followed.
            let previous = events::last_of(tx, &[events::RUN_START, events::RUN_END, events::EVICTION])?;
            let clean = !matches!(previous.as_deref(), Some(events::RUN_START | events::EVICTION));
            let mut body = json!({ "run_id": run_id, "previous_run_ended_cleanly": clean });
            if !clean {
                body["note"] = json!(
                    "the previous run stopped without a run.end record (crash or kill): records it had not yet committed were lost"
                );
            }
            events::append(tx, head, events::RUN_START, unix_ms(), &body)
        });
        match r {
            Ok(seq) => {
                self.run_start_seq = seq;
                self.unsigned += 1;
            }
            Err(e) => tracing::error!(error = %e, "cannot write the audit run.start record"),
        }
    }

    /// Runs `f` in one IMMEDIATE transaction with the chain's head.
    fn with_tx<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &mut chain::Head) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut head = chain::head(&tx)?;
        let out = f(&tx, &mut head)?;
        tx.commit()?;
        Ok(out)
    }

    /// Writes a gap record naming the records lost since the last one (signed at once), if any were.
    fn record_gaps(&mut self) {
        let now = self.shared.counters.losses();
        let mut lost = serde_json::Map::new();
        let mut total = 0u64;
        for kind in RecordKind::ALL {
            let mut by_reason = serde_json::Map::new();
            for reason in LossReason::ALL {
                if reason == LossReason::Evicted {
                    continue;
                }
                let n = now[kind as usize][reason as usize]
                    - self.recorded_losses[kind as usize][reason as usize];
                if n > 0 {
                    by_reason.insert(reason.as_str().into(), json!(n));
                    total += n;
                }
            }
            if !by_reason.is_empty() {
                lost.insert(kind.as_str().into(), serde_json::Value::Object(by_reason));
            }
        }
        if total == 0 {
            return;
        }
        let run_id = self.run_id;
        let body = json!({ "run_id": run_id, "records_lost": total, "lost": lost });
        match self.with_tx(|tx, head| events::append(tx, head, events::GAP, unix_ms(), &body)) {
            Ok(_) => {
                tracing::warn!(
                    records_lost = total,
                    "audit records were lost; a gap record names them"
                );
                self.recorded_losses = now;
                self.shared.counters.gap_recorded();
                self.unsigned += 1;
                self.checkpoint();
            }
            Err(e) => tracing::error!(error = %e, "cannot write an audit gap record"),
        }
    }

    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        self.start_run();
        let mut open = true;
        while open || !self.pending.is_empty() {
            if open {
                open = self.collect(&rx);
            }
            if !open {
                // Stopping: whatever is still queued goes into this last batch.
                while let Ok(Msg::Record(q)) = rx.try_recv() {
                    self.take(*q);
                }
            }
            if !self.pending.is_empty() && !self.commit() {
                if !open {
                    self.lose_all();
                    break;
                }
                std::thread::sleep(self.interval.min(Duration::from_secs(1)));
            }
            self.record_gaps();
            self.check_quota();
            if self.unsigned >= self.checkpoint_every
                || self.unsigned > 0 && self.last_checkpoint.elapsed() >= self.checkpoint_interval
            {
                self.checkpoint();
            }
        }
        self.record_gaps();
        let run_id = self.run_id;
        match self.with_tx(|tx, head| {
            events::append(
                tx,
                head,
                events::RUN_END,
                unix_ms(),
                &json!({ "run_id": run_id }),
            )
        }) {
            Ok(_) => self.unsigned += 1,
            Err(e) => tracing::error!(error = %e, "cannot write the audit run.end record"),
        }
        if self.unsigned > 0 {
            self.checkpoint();
        }
    }

    fn take(&mut self, q: Queued) {
        self.shared.dequeued(&q);
        self.pending.push_back(q);
    }

    /// Waits for records and gathers a batch; returns false once the queue is closed or stopped.
    fn collect(&mut self, rx: &Receiver<Msg>) -> bool {
        let first_wait = if !self.pending.is_empty() {
            Duration::ZERO
        } else if self.unsigned > 0 {
            self.checkpoint_interval
                .saturating_sub(self.last_checkpoint.elapsed())
        } else {
            Duration::from_secs(1)
        };
        // Idle or not, the quotas are measured when due (a fail-closed gateway learns of freed space).
        let quota_due = self.quota.last_check.map_or(Duration::ZERO, |t| {
            self.quota.interval.saturating_sub(t.elapsed())
        });
        match rx.recv_timeout(first_wait.min(quota_due)) {
            Ok(Msg::Record(q)) => self.take(*q),
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            Err(RecvTimeoutError::Timeout) => return true,
        }
        let deadline = Instant::now() + self.interval;
        let mut urgent = self.pending.iter().any(|q| q.ack.is_some());
        while self.pending.len() < MAX_BATCH {
            let msg = if urgent {
                // Someone waits: take what is already queued, without waiting for more.
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            };
            match msg {
                Msg::Record(q) => {
                    urgent |= q.ack.is_some();
                    self.take(*q);
                }
                Msg::Stop => return false,
            }
        }
        true
    }

    /// Commits everything pending in one transaction; false if it failed (records are held).
    fn commit(&mut self) -> bool {
        match write_batch(&mut self.conn, self.run_id, &self.clock, &self.pending) {
            Ok(seqs) => {
                if !self.shared.set_healthy(true) {
                    tracing::info!("audit store writable again");
                }
                self.quota.commits += 1;
                let counters = &self.shared.counters;
                for (q, seq) in self.pending.drain(..).zip(seqs) {
                    counters.written(q.record.kind(), 1);
                    self.unsigned += 1;
                    if let Some(ack) = q.ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
                true
            }
            Err(e) => {
                self.shared.set_healthy(false);
                if self
                    .last_error_log
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    self.last_error_log = Some(Instant::now());
                    tracing::error!(error = %e, held = self.pending.len(), "audit store write failed; retrying");
                }
                // A producer waiting for a durable record acts now (refuses what needed it); the record is
                // not kept, so what it describes and the store agree.
                let counters = self.shared.counters.clone();
                let msg = e.to_string();
                self.pending.retain_mut(|q| match q.ack.take() {
                    Some(ack) => {
                        counters.lost(q.record.kind(), LossReason::StoreFailed, 1);
                        let _ = ack.send(Err(msg.clone()));
                        false
                    }
                    None => true,
                });
                while self.pending.len() > self.cap {
                    if let Some(q) = self.pending.pop_front() {
                        counters.lost(q.record.kind(), LossReason::StoreFailed, 1);
                    }
                }
                false
            }
        }
    }

    /// The store still fails at shutdown: what is held is lost (and counted).
    fn lose_all(&mut self) {
        tracing::error!(
            lost = self.pending.len(),
            "audit store still failing at shutdown; records lost"
        );
        for q in self.pending.drain(..) {
            self.shared
                .counters
                .lost(q.record.kind(), LossReason::StoreFailed, 1);
        }
    }

    /// Measures the store and the recordings against their quotas when due; evicts (fail-open) and updates
    /// the over-quota state that a fail-closed gateway refuses new flows on.
    fn check_quota(&mut self) {
        let q = &self.quota;
        let due = q.last_check.is_none_or(|t| t.elapsed() >= q.interval)
            || q.commits >= QUOTA_CHECK_COMMITS;
        if !due {
            return;
        }
        self.quota.last_check = Some(Instant::now());
        self.quota.commits = 0;
        let Some((mut store, mut recordings)) = self.measure() else {
            return;
        };
        let q = &self.quota;
        let over =
            |store: u64, recordings: u64| store > q.max_store || recordings > q.max_recordings;
        if over(store, recordings) && q.policy == FailurePolicy::FailOpen {
            let target = |max: u64| max / 1000 * quota::TARGET_PER_MILLE;
            let goal = Goal {
                store_target: (store > q.max_store).then(|| target(q.max_store)),
                recordings_to_free: recordings.saturating_sub(target(q.max_recordings))
                    * u64::from(recordings > q.max_recordings),
            };
            self.evict(goal);
            (store, recordings) = self.measure().unwrap_or((store, recordings));
        }
        let q = &self.quota;
        let now_over = store > q.max_store || recordings > q.max_recordings;
        let was_over = self.shared.set_over_quota(now_over);
        self.shared.counters.set_over_quota(now_over);
        match (was_over, now_over, q.policy) {
            (false, true, FailurePolicy::FailClosed) => tracing::warn!(
                store_bytes = store,
                max_store_bytes = q.max_store,
                recordings_bytes = recordings,
                max_recordings_bytes = q.max_recordings,
                "audit store or recordings over their quota; refusing new flows (on_failure = fail_closed)"
            ),
            (false, true, FailurePolicy::FailOpen) => tracing::warn!(
                store_bytes = store,
                max_store_bytes = q.max_store,
                recordings_bytes = recordings,
                max_recordings_bytes = q.max_recordings,
                "audit store or recordings still over their quota after eviction: what is left belongs to open flows and SSH sessions"
            ),
            (true, false, _) => tracing::info!(
                store_bytes = store,
                recordings_bytes = recordings,
                "audit store and recordings back under their quotas"
            ),
            _ => {}
        }
    }

    /// The store's used bytes and the recordings' bytes.
    fn measure(&self) -> Option<(u64, u64)> {
        match quota::store_bytes(&self.conn) {
            Ok(store) => Some((
                store,
                quota::dir_bytes(&self.quota.state_dir.join("recordings")),
            )),
            Err(e) => {
                tracing::error!(error = %e, "cannot measure the audit store");
                None
            }
        }
    }

    /// Removes the oldest closed records (one transaction with the eviction record), then their recording
    /// files, and signs the new head at once.
    fn evict(&mut self, goal: Goal) {
        let scope = OpenScope {
            run_id: self.run_id,
            run_start_seq: self.run_start_seq,
        };
        let state_dir = self.quota.state_dir.clone();
        match self.with_tx(|tx, head| quota::evict(tx, head, &state_dir, scope, goal, unix_ms())) {
            Ok(Some(ev)) => {
                let files = quota::delete_files(&ev.files);
                let counters = &self.shared.counters;
                let mut total = 0;
                for (kind, n) in &ev.entries {
                    total += n;
                    if let Some(k) = record_kind(kind) {
                        counters.lost(k, LossReason::Evicted, *n);
                    }
                }
                counters.evicted(files);
                tracing::info!(
                    first_seq = ev.first_seq,
                    through_seq = ev.through_seq,
                    records = total,
                    kept_open = ev.kept,
                    recording_files = files,
                    eviction_seq = ev.seq,
                    "audit quota reached: evicted the oldest closed records; an eviction record in the chain names them"
                );
                self.unsigned += 1;
                self.checkpoint();
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot evict audit records under the quota"),
        }
    }

    /// Signs the chain's head and exports it to the checkpoint sink (outside the store).
    fn checkpoint(&mut self) {
        match chain::checkpoint(&self.conn, &self.key, unix_ms()) {
            Ok(cp) => {
                self.unsigned = 0;
                self.last_checkpoint = Instant::now();
                if let Some(cp) = cp {
                    self.shared.counters.checkpoint_signed();
                    if let Err(e) = self.sink.export(&cp) {
                        tracing::error!(error = %e, "cannot export the audit checkpoint head");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot sign an audit checkpoint"),
        }
    }
}

/// One transaction for the whole batch; returns each record's SSH chain seq (0 for other kinds).
fn write_batch(
    conn: &mut Connection,
    run_id: i64,
    clock: &WallClock,
    batch: &VecDeque<Queued>,
) -> rusqlite::Result<Vec<u64>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut head = chain::head(&tx)?;
    let mut seqs = Vec::with_capacity(batch.len());
    for q in batch {
        seqs.push(match &q.record {
            Record::Flow(ev) => {
                tables::flows::write(&tx, &mut head, run_id, clock, ev)?;
                0
            }
            Record::Http(r) => {
                tables::http::insert(&tx, &mut head, run_id, r)?;
                0
            }
            Record::Ssh(r) => tables::ssh::append(&tx, &mut head, r)?,
            Record::Enroll(r) => {
                tables::enroll::insert(&tx, &mut head, r)?;
                0
            }
            Record::Admin(r) => {
                tables::admin::insert(&tx, &mut head, r)?;
                0
            }
        });
    }
    tx.commit()?;
    Ok(seqs)
}

/// The pipeline's record kind of a chain entry kind (the writer's own events have none).
fn record_kind(chain_kind: &str) -> Option<RecordKind> {
    Some(match chain_kind {
        tables::flows::START | tables::flows::ESTABLISHED | tables::flows::END => RecordKind::Flow,
        tables::http::KIND => RecordKind::Http,
        tables::ssh::KIND => RecordKind::Ssh,
        tables::enroll::KIND => RecordKind::Enroll,
        tables::admin::KIND => RecordKind::Admin,
        _ => return None,
    })
}

fn count(conn: &Connection, sql: &str) -> rusqlite::Result<i64> {
    conn.query_row(sql, [], |r| r.get(0))
}
