//! The audit trail: typed records of what the gateway decided and carried (flows, HTTP requests, SSH
//! sessions), kept in an append-only SQLite store that admins review (`rampart audit ...`). Not `tracing`.
//!
//! One pipeline for every kind of record: [`Record`]s are offered to one bounded queue ([`AuditSink`]; the
//! HTTP and SSH inspectors hold typed handles on it, `HttpAuditSink` and `SshAuditSink`), one writer thread
//! (`writer`) commits them in batches through one SQLite connection (`db`, `tables`), with one policy:
//! `audit.queue`, `commit_interval_ms`, `on_overflow` (full queue) and `on_failure` (failing store). The queue
//! is shared fairly: each tenant has a reserved share, so one tenant's flood cannot crowd out another's
//! records. Every lost record is counted ([`AuditCounters`]).
//!
//! Start reading at [`AuditSink`] (producers) and `writer` (the store side); review is in [`review`].
//! Never: block a producer (a full queue drops and counts; only `emit_durable` waits, and only for its own
//! record), write the store from another thread, update or delete a committed record.
#![deny(unsafe_code)]

pub mod admin_records;
pub mod capture;
pub mod counters;
pub mod db;
pub mod enroll_records;
pub mod http_records;
pub mod quota;
pub mod review;
pub mod ssh_records;
pub mod tables;
mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

pub use crate::config::CheckpointSink;
use crate::config::{Config, FailurePolicy, OverflowPolicy};
use crate::core::FlowEvent;
pub use counters::{AuditCounters, LossReason, RecordKind};
use http_records::HttpRecord;
use ssh_records::SshRecord;

/// The audit store of `cfg`, for review commands; a clear error if the gateway never ran.
pub fn existing_store(cfg: &Config) -> anyhow::Result<&std::path::Path> {
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

/// One record on its way to the store.
#[derive(Debug)]
pub enum Record {
    /// A flow event from the data path (start, established, end).
    Flow(FlowEvent),
    Http(Box<HttpRecord>),
    Ssh(Box<SshRecord>),
    Enroll(Box<enroll_records::EnrollRecord>),
    Admin(Box<admin_records::AdminRecord>),
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Flow(_) => RecordKind::Flow,
            Record::Http(_) => RecordKind::Http,
            Record::Ssh(_) => RecordKind::Ssh,
            Record::Enroll(_) => RecordKind::Enroll,
            Record::Admin(_) => RecordKind::Admin,
        }
    }

    /// The tenant whose queue share the record uses. Flow updates (established, end) have none: their flow's
    /// start was admitted, and they are bounded by it.
    fn tenant(&self) -> Option<&str> {
        match self {
            Record::Flow(FlowEvent::Start(s)) => Some(s.tenant.as_str()),
            Record::Flow(_) => None,
            Record::Http(r) => Some(&r.tenant),
            Record::Ssh(r) => Some(&r.keys.tenant),
            // Admin and gateway records without a tenant are few; they share the common places.
            Record::Enroll(r) => r.tenant.as_deref(),
            Record::Admin(r) => r.tenant.as_deref(),
        }
    }
}

/// How the pipeline runs; [`PipelineOptions::from_config`] is what `rampart run` uses.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub db: PathBuf,
    /// The gateway's audit signing key (created on first start).
    pub signing_key: PathBuf,
    pub queue: usize,
    pub commit_interval: Duration,
    pub on_overflow: OverflowPolicy,
    pub on_failure: FailurePolicy,
    /// Tenants known at start: each gets `queue / (2 × tenants)` reserved places in the queue.
    pub tenants: usize,
    /// A checkpoint is signed at least every this many records ...
    pub checkpoint_every: u64,
    /// ... and at least this often while some records are not signed.
    pub checkpoint_interval: Duration,
    /// Where each checkpoint's head is exported, outside the store.
    pub checkpoint_sink: CheckpointSink,
    /// The gateway's state directory: SSH recordings are under `recordings/` (their paths in the store are
    /// relative to it).
    pub state_dir: PathBuf,
    /// Quotas of the store's pages and of `state_dir/recordings`; `on_failure` decides what happens at one.
    pub max_store_bytes: u64,
    pub max_recordings_bytes: u64,
    /// How often the writer measures both (also after every `QUOTA_CHECK_COMMITS` commits).
    pub quota_check_interval: Duration,
}

impl PipelineOptions {
    /// Defaults for a store at `db` with the signing key at `signing_key`.
    pub fn new(db: PathBuf, signing_key: PathBuf) -> PipelineOptions {
        PipelineOptions {
            queue: 65_536,
            commit_interval: Duration::from_millis(250),
            on_overflow: OverflowPolicy::Drop,
            on_failure: FailurePolicy::FailOpen,
            tenants: 1,
            checkpoint_every: 256,
            checkpoint_interval: Duration::from_secs(30),
            checkpoint_sink: CheckpointSink::None,
            state_dir: db.parent().map(PathBuf::from).unwrap_or_default(),
            max_store_bytes: crate::config::DEFAULT_MAX_STORE_MB << 20,
            max_recordings_bytes: crate::config::DEFAULT_MAX_RECORDINGS_MB << 20,
            quota_check_interval: Duration::from_secs(1),
            db,
            signing_key,
        }
    }

    pub fn from_config(cfg: &Config) -> PipelineOptions {
        PipelineOptions {
            queue: cfg.audit.queue,
            commit_interval: cfg.audit.commit_interval,
            on_overflow: cfg.audit.on_overflow,
            on_failure: cfg.audit.on_failure,
            tenants: cfg.tenants.len().max(1),
            checkpoint_every: cfg.audit.checkpoint_every,
            checkpoint_interval: cfg.audit.checkpoint_interval,
            checkpoint_sink: cfg.audit.checkpoint_sink.clone(),
            state_dir: cfg.gateway.state_dir.clone(),
            max_store_bytes: cfg.audit.max_store_bytes,
            max_recordings_bytes: cfg.audit.max_recordings_bytes,
            ..PipelineOptions::new(
                cfg.audit.path.clone(),
                cfg.gateway.state_dir.join("audit_signing_key"),
            )
        }
    }
}

impl CheckpointSink {
    /// Appends the checkpoint's head line (`rampart-audit-head {json}`) to the sink.
    pub fn export(&self, cp: &tables::chain::Checkpoint) -> std::io::Result<()> {
        let line = tables::chain::HeadLine::format(cp);
        match self {
            CheckpointSink::None => Ok(()),
            CheckpointSink::File(path) => {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)?;
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            }
            CheckpointSink::Syslog => {
                // RFC 3164 to the local socket: facility local0, severity notice.
                let sock = std::os::unix::net::UnixDatagram::unbound()?;
                sock.send_to(format!("<133>rampart: {line}").as_bytes(), "/dev/log")
                    .map(|_| ())
            }
        }
    }
}

/// Why a record offered with [`AuditSink::emit_durable`] is not durable.
#[derive(Debug, thiserror::Error)]
pub enum AuditUnavailable {
    #[error("the audit queue is full")]
    QueueFull,
    #[error("this tenant's share of the audit queue is full")]
    TenantShare,
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the audit store failed: {0}")]
    Store(String),
}

/// A committed durable record's position: the SSH chain's sequence number, 0 for other kinds.
pub type Ack = Result<u64, String>;

pub(crate) struct Queued {
    pub record: Record,
    pub ack: Option<oneshot::Sender<Ack>>,
    slot: Slot,
}

pub(crate) enum Msg {
    Record(Box<Queued>),
    /// Commit what is queued, sign a final checkpoint, stop (producers may still be alive).
    Stop,
}

/// Where an admitted record counts against the queue: its tenant's reserved share, or the shared half.
enum Slot {
    Untracked,
    Reserved(Arc<AtomicUsize>),
    Shared(Arc<AtomicUsize>),
}

/// Queue places per tenant: `reserved` each, then `shared_cap` first come, first served.
struct Fairness {
    reserved: usize,
    shared_cap: usize,
    shared: AtomicUsize,
    tenants: RwLock<HashMap<String, Arc<AtomicUsize>>>,
}

impl Fairness {
    fn new(capacity: usize, tenants: usize) -> Fairness {
        let reserved = (capacity / (2 * tenants.max(1))).max(1);
        Fairness {
            reserved,
            shared_cap: capacity.saturating_sub(reserved * tenants.max(1)),
            shared: AtomicUsize::new(0),
            tenants: RwLock::new(HashMap::new()),
        }
    }

    fn counter(&self, tenant: &str) -> Arc<AtomicUsize> {
        if let Some(c) = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            return c.clone();
        }
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.to_owned())
            .or_default()
            .clone()
    }

    fn admit(&self, tenant: Option<&str>) -> Option<Slot> {
        let Some(tenant) = tenant else {
            return Some(Slot::Untracked);
        };
        let c = self.counter(tenant);
        let n = c.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= self.reserved {
            return Some(Slot::Reserved(c));
        }
        if self.shared.fetch_add(1, Ordering::Relaxed) < self.shared_cap {
            return Some(Slot::Shared(c));
        }
        self.shared.fetch_sub(1, Ordering::Relaxed);
        c.fetch_sub(1, Ordering::Relaxed);
        None
    }

    fn release(&self, slot: &Slot) {
        match slot {
            Slot::Untracked => {}
            Slot::Reserved(c) => {
                c.fetch_sub(1, Ordering::Relaxed);
            }
            Slot::Shared(c) => {
                c.fetch_sub(1, Ordering::Relaxed);
                self.shared.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

pub(crate) struct Shared {
    queued: AtomicUsize,
    store_healthy: AtomicBool,
    /// The store or the recordings are over their quota (and eviction, if fail-open, could not help).
    over_quota: AtomicBool,
    fairness: Fairness,
    pub counters: Arc<AuditCounters>,
}

impl Shared {
    /// The writer took `q` off the queue.
    pub(crate) fn dequeued(&self, q: &Queued) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.fairness.release(&q.slot);
    }

    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.store_healthy.swap(healthy, Ordering::Relaxed)
    }

    pub(crate) fn set_over_quota(&self, over: bool) -> bool {
        self.over_quota.swap(over, Ordering::Relaxed)
    }
}

/// The producers' handle on the pipeline: the data path offers flow events, the inspectors their records
/// (through [`AuditSink::http`] and [`AuditSink::ssh`]). Never blocks. Cloning is cheap.
#[derive(Clone)]
pub struct AuditSink {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    capacity: usize,
    on_overflow: OverflowPolicy,
    on_failure: FailurePolicy,
}

impl AuditSink {
    /// Queues a flow event (the data path's call); a full queue drops and counts it.
    pub fn offer(&self, ev: FlowEvent) {
        if matches!(ev, FlowEvent::Upgraded(_) | FlowEvent::Released { .. }) {
            return;
        }
        let _ = self.submit(Record::Flow(ev), None);
    }

    /// Queues any record; a full queue (or tenant share) drops and counts it.
    pub fn emit(&self, record: Record) {
        let _ = self.submit(record, None);
    }

    /// Queues a record and waits until it is committed.
    pub async fn emit_durable(&self, record: Record) -> Result<u64, AuditUnavailable> {
        let (ack, done) = oneshot::channel();
        self.submit(record, Some(ack))?;
        match done.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(AuditUnavailable::Store(e)),
            Err(_) => Err(AuditUnavailable::Stopped),
        }
    }

    fn submit(
        &self,
        record: Record,
        ack: Option<oneshot::Sender<Ack>>,
    ) -> Result<(), AuditUnavailable> {
        let kind = record.kind();
        let counters = &self.shared.counters;
        let Some(slot) = self.shared.fairness.admit(record.tenant()) else {
            counters.lost(kind, LossReason::TenantShare, 1);
            return Err(AuditUnavailable::TenantShare);
        };
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        let q = Box::new(Queued { record, ack, slot });
        match self.tx.try_send(Msg::Record(q)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let (q, why, reason) = match e {
                    TrySendError::Full(m) => {
                        (m, AuditUnavailable::QueueFull, LossReason::QueueFull)
                    }
                    TrySendError::Disconnected(m) => {
                        (m, AuditUnavailable::Stopped, LossReason::WriterStopped)
                    }
                };
                if let Msg::Record(q) = q {
                    self.shared.dequeued(&q);
                }
                counters.lost(kind, reason, 1);
                Err(why)
            }
        }
    }

    /// Whether new flows may start now, per the overflow and failure policies (a fail-closed gateway refuses
    /// them while the store fails or is over its quota).
    pub fn admits_new_flows(&self) -> bool {
        let headroom = (self.capacity / 4).min(MAX_BATCH / 4);
        let full = self.shared.queued.load(Ordering::Relaxed) + headroom >= self.capacity;
        !(self.on_overflow == OverflowPolicy::BlockNewFlows && full
            || self.on_failure == FailurePolicy::FailClosed
                && (!self.healthy() || self.over_quota()))
    }

    /// Whether the store or the recordings are over their quota (after eviction, when fail-open).
    pub fn over_quota(&self) -> bool {
        self.shared.over_quota.load(Ordering::Relaxed)
    }

    /// Whether the last commit succeeded.
    pub fn healthy(&self) -> bool {
        self.shared.store_healthy.load(Ordering::Relaxed)
    }

    /// What was written and lost, for `/metrics`.
    pub fn counters(&self) -> &Arc<AuditCounters> {
        &self.shared.counters
    }

    /// The HTTP inspector's handle.
    pub fn http(&self) -> http_records::HttpAuditSink {
        http_records::HttpAuditSink::new(self.clone())
    }

    /// The SSH inspector's handle.
    pub fn ssh(&self) -> ssh_records::SshAuditSink {
        ssh_records::SshAuditSink::new(self.clone())
    }

    /// The enrollment service's handle.
    pub fn enroll(&self) -> enroll_records::EnrollAuditSink {
        enroll_records::EnrollAuditSink::new(self.clone())
    }

    pub fn admin(&self) -> admin_records::AdminAuditSink {
        admin_records::AdminAuditSink::new(self.clone())
    }
}

/// The writer thread; [`AuditWriter::finish`] commits what is queued, signs a final checkpoint and stops it.
pub struct AuditWriter {
    thread: JoinHandle<()>,
    tx: SyncSender<Msg>,
}

impl AuditWriter {
    /// Commits everything queued before this call, then stops the writer (later records are dropped and
    /// counted as `writer_stopped`).
    pub fn finish(self) {
        let _ = self.tx.send(Msg::Stop);
        let _ = self.thread.join();
    }

    /// [`finish`](Self::finish), waiting at most `bound` (a store that hangs must not hold up a stop
    /// forever); returns whether the writer finished. Past the bound the thread is left to the process's exit.
    pub fn finish_within(self, bound: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + bound;
        // `send` waits while the queue is full: a bounded wait for a free place, else the stop is not sent.
        let mut stop = Msg::Stop;
        loop {
            match self.tx.try_send(stop) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    stop = m;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(TrySendError::Full(_)) => return false,
            }
        }
        while !self.thread.is_finished() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.thread.join();
        true
    }
}

/// Opens the store (migrating its schema), loads or creates the signing key, and starts the writer. Fails
/// (clearly) if the store cannot be opened or the key cannot be read.
pub fn start(opts: PipelineOptions) -> anyhow::Result<(AuditSink, AuditWriter)> {
    let conn = db::open_rw(&opts.db).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the audit store {}: {e}; check that the directory exists and is writable (audit.path)",
            opts.db.display()
        )
    })?;
    let key = ssh_records::load_or_create_signing_key(&opts.signing_key)?;
    let capacity = opts.queue.max(1);
    let (tx, rx) = mpsc::sync_channel(capacity);
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        store_healthy: AtomicBool::new(true),
        over_quota: AtomicBool::new(false),
        fairness: Fairness::new(capacity, opts.tenants),
        counters: Arc::new(AuditCounters::default()),
    });
    let sink = AuditSink {
        tx: tx.clone(),
        shared: shared.clone(),
        capacity,
        on_overflow: opts.on_overflow,
        on_failure: opts.on_failure,
    };
    let w = writer::Writer::new(conn, key, shared, &opts);
    let thread = std::thread::Builder::new()
        .name("rampart-audit".into())
        .spawn(move || w.run(rx))?;
    Ok((sink, AuditWriter { thread, tx }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tenant_cannot_take_another_tenants_share() {
        let f = Fairness::new(100, 2);
        assert_eq!(f.reserved, 25);
        let mut held = Vec::new();
        // Tenant a floods: its reserved 25 plus the shared 50, then nothing.
        while let Some(s) = f.admit(Some("a")) {
            held.push(s);
        }
        assert_eq!(held.len(), 75);
        // Tenant b still gets its reserved share.
        let b: Vec<Slot> = (0..25).map_while(|_| f.admit(Some("b"))).collect();
        assert_eq!(b.len(), 25);
        assert!(f.admit(Some("b")).is_none());
        // Shared places come back when the writer takes records.
        for s in held.split_off(65) {
            f.release(&s);
        }
        assert!(f.admit(Some("b")).is_some());
        assert!(
            f.admit(None).is_some(),
            "flow updates are never refused here"
        );
    }
}

#[cfg(test)]
mod pipeline_tests;

#[cfg(test)]
mod verify_tests;

#[cfg(test)]
mod quota_tests;

#[cfg(test)]
mod verify_http_tests;
