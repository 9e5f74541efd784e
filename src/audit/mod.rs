//! The audit trail: typed records of what the gateway decided and carried, kept in an append-only store
//! that admins review (`rampart audit ...`). Not `tracing`: records go through a bounded queue to one writer
//! thread, with explicit policies for a full queue (`on_overflow`) and for a failing store (`on_failure`).
//!
//! Start reading at `AuditSink` (data path side) and `writer` (store side).
#![deny(unsafe_code)]

pub mod capture;
pub mod http_records;
pub mod ssh_records;
pub mod ssh_review;
pub mod store;
pub mod time;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{AuditSettings, FailurePolicy, OverflowPolicy};
use crate::core::{FlowEvent, Metrics};
use store::{Record, Store};

/// The audit store of `cfg`, for review commands; a clear error if the gateway never ran.
pub fn existing_store(cfg: &crate::config::Config) -> anyhow::Result<&std::path::Path> {
    let path = cfg.audit.path.as_path();
    if !path.exists() {
        anyhow::bail!(
            "no audit store at {} yet (it is created when the gateway first runs)",
            path.display()
        );
    }
    Ok(path)
}

/// Most records written in one transaction.
const MAX_BATCH: usize = 4096;

/// Maps the data path's monotonic `Instant`s to wall-clock milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    instant: Instant,
    unix_ms: i64,
}

impl WallClock {
    pub fn now() -> WallClock {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        WallClock {
            instant: Instant::now(),
            unix_ms,
        }
    }

    pub fn unix_ms(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.unix_ms + d.as_millis() as i64,
            None => self.unix_ms - self.instant.duration_since(at).as_millis() as i64,
        }
    }
}

struct Shared {
    queued: AtomicUsize,
    store_healthy: AtomicBool,
}

/// The data path's handle: offers records without ever blocking.
#[derive(Clone)]
pub struct AuditSink {
    tx: SyncSender<FlowEvent>,
    shared: Arc<Shared>,
    capacity: usize,
    on_overflow: OverflowPolicy,
    on_failure: FailurePolicy,
    metrics: Arc<Metrics>,
}

impl AuditSink {
    /// Queues a record; when the queue is full the record is dropped and counted.
    pub fn offer(&self, ev: FlowEvent) {
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(ev) {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            self.metrics.global.audit_records_dropped.add(1);
        }
    }

    /// Whether new flows may start now, per the overflow and failure policies.
    pub fn admits_new_flows(&self) -> bool {
        let full = self.shared.queued.load(Ordering::Relaxed) + MAX_BATCH / 4 >= self.capacity;
        let healthy = self.shared.store_healthy.load(Ordering::Relaxed);
        !(self.on_overflow == OverflowPolicy::BlockNewFlows && full
            || self.on_failure == FailurePolicy::FailClosed && !healthy)
    }
}

/// The writer thread; dropping every `AuditSink` and calling `finish` flushes and stops it.
pub struct AuditWriter {
    thread: JoinHandle<()>,
}

impl AuditWriter {
    /// Waits until everything queued before the last sink was dropped is committed.
    pub fn finish(self) {
        let _ = self.thread.join();
    }
}

/// Opens the store and starts the writer. Fails (clearly) if the store cannot be opened at all.
pub fn start(
    settings: &AuditSettings,
    clock: WallClock,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(AuditSink, AuditWriter)> {
    let store = Store::open(&settings.path).map_err(|e| {
        anyhow::anyhow!("cannot open the audit store {}: {e}; check that the directory exists and is writable (audit.path)", settings.path.display())
    })?;
    let (tx, rx) = mpsc::sync_channel(settings.queue);
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        store_healthy: AtomicBool::new(true),
    });
    let sink = AuditSink {
        tx,
        shared: shared.clone(),
        capacity: settings.queue,
        on_overflow: settings.on_overflow,
        on_failure: settings.on_failure,
        metrics: metrics.clone(),
    };
    let interval = settings.commit_interval;
    let cap = settings.queue;
    let run_id = run_id();
    let thread = std::thread::Builder::new()
        .name("rampart-audit".into())
        .spawn(move || writer(store, rx, shared, interval, cap, clock, run_id, metrics))?;
    Ok((sink, AuditWriter { thread }))
}

fn run_id() -> i64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    (u64::from_le_bytes(b) >> 1) as i64
}

fn to_record(ev: FlowEvent, clock: &WallClock) -> Option<Record> {
    Some(match ev {
        FlowEvent::Start(s) => {
            let at_ms = clock.unix_ms(s.at);
            Record::FlowStart { start: s, at_ms }
        }
        FlowEvent::Established { seq, at } => Record::FlowEstablished {
            seq,
            at_ms: clock.unix_ms(at),
        },
        FlowEvent::End {
            seq,
            at,
            packets,
            bytes,
            reason,
        } => Record::FlowEnd {
            seq,
            at_ms: clock.unix_ms(at),
            packets,
            bytes,
            reason,
        },
        FlowEvent::Upgraded(_) | FlowEvent::Released { .. } => return None,
    })
}

/// Batches records and commits them at most `interval` after the first of a batch arrived. A failed commit
/// is retried with the next batch; while it fails the store is marked unhealthy (fail-closed gateways stop
/// admitting new flows) and at most `cap` records are held, older ones being dropped and counted.
#[allow(clippy::too_many_arguments)]
fn writer(
    mut store: Store,
    rx: mpsc::Receiver<FlowEvent>,
    shared: Arc<Shared>,
    interval: Duration,
    cap: usize,
    clock: WallClock,
    run_id: i64,
    metrics: Arc<Metrics>,
) {
    let mut pending: VecDeque<Record> = VecDeque::new();
    let mut last_error_log: Option<Instant> = None;
    let mut open = true;
    while open || !pending.is_empty() {
        let deadline = Instant::now() + interval;
        while pending.len() < MAX_BATCH {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(ev) => {
                    shared.queued.fetch_sub(1, Ordering::Relaxed);
                    pending.extend(to_record(ev, &clock));
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if pending.is_empty() {
            continue;
        }
        let batch: Vec<Record> = pending.iter().cloned().collect();
        match store.write_batch(run_id, &batch) {
            Ok(()) => {
                pending.clear();
                if !shared.store_healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("audit store writable again");
                }
            }
            Err(e) => {
                shared.store_healthy.store(false, Ordering::Relaxed);
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_error_log = Some(Instant::now());
                    tracing::error!(error = %e, held = pending.len(), "audit store write failed; retrying");
                }
                while pending.len() > cap {
                    pending.pop_front();
                    metrics.global.audit_records_dropped.add(1);
                }
                if !open {
                    tracing::error!(
                        lost = pending.len(),
                        "audit store still failing at shutdown; records lost"
                    );
                    metrics
                        .global
                        .audit_records_dropped
                        .add(pending.len() as u64);
                    return;
                }
                std::thread::sleep(interval.min(Duration::from_secs(1)));
            }
        }
    }
}
