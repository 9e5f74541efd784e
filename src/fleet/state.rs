//! Shared state of a fleet: devices, the tenant policy document and a monotonically increasing config
//! version in PostgreSQL (`fleet_config`, `fleet_policy`, `fleet_devices`), and node membership
//! (`fleet_nodes`: address, applied version, heartbeat, enrollment URL).
//!
//! One thread per node ([`start`]) keeps the node and PostgreSQL in step:
//! - after every local reload (`rampart reload`, `device add/remove`, a token enrollment) it publishes the
//!   node's own changes: the devices enrolled on this node, and the config file's `[[tenant]]` tables when
//!   they changed since the last synchronisation; a change bumps the version and `NOTIFY rampart_config`;
//!   it also mirrors the credentials of the node's self-enrolled devices (`fleet::enrollment::mirror`);
//! - on a notification, and at every heartbeat (the fallback for a missed notification or an outage), it
//!   reads the version; a newer one goes through the node's validated reload path ([`Applier`]), and only
//!   a config that validates applies and is kept (`state_dir/fleet_state.json`, `config::shared`).
//!
//! PostgreSQL down: the node keeps its last applied state (the cache file) and keeps serving; local changes
//! apply locally and are published when it is back. Concurrent policy edits on two nodes: the last one
//! published wins (each is a whole document).
//!
//! Must never: block the data path or a reload on PostgreSQL (reloads only wake this thread).
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::Notify;

use super::Connector;
use crate::config::shared::{tenant_doc_digest, FleetCache, SharedDevice, SharedPolicy};
use crate::config::FleetSettings;
use crate::registry::EnrolledDevice;

/// The notification channel writers notify with the new version as payload.
pub const CHANNEL: &str = "rampart_config";
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What this node holds locally and publishes: its config file's `[[tenant]]` tables and the devices
/// enrolled on it.
#[derive(Debug, Clone)]
pub struct Local {
    pub tenant_doc: String,
    pub devices: Vec<EnrolledDevice>,
    /// The self-enrolled devices of this node's `enroll.db` (pending ones too), whose credentials (the hash of
    /// the device token) are mirrored to `fleet_device_credentials`.
    pub credentials: Vec<crate::enroll::store::DeviceRow>,
}

/// The running gateway, as the sync thread uses it.
pub trait Applier: Send + Sync + 'static {
    /// The node's local state now.
    fn local(&self) -> Result<Local, String>;
    /// Validates `candidate` like a local reload and applies it; on success keeps it as the node's state.
    fn apply_shared(&self, candidate: &FleetCache) -> Result<String, String>;
    /// The shared state applied now.
    fn applied(&self) -> FleetCache;
}

/// The running sync thread. [`SyncHandle::publish`] after a local change; [`SyncHandle::finish`] at stop.
pub struct SyncHandle {
    thread: std::thread::JoinHandle<()>,
    wake: Arc<Wake>,
}

#[derive(Default)]
struct Wake {
    stop: AtomicBool,
    publish: AtomicBool,
    notify: Notify,
}

impl SyncHandle {
    pub fn publish(&self) {
        self.wake.publish.store(true, Ordering::SeqCst);
        self.wake.notify.notify_one();
    }

    pub fn finish(self) {
        self.wake.stop.store(true, Ordering::SeqCst);
        self.wake.notify.notify_one();
        let _ = self.thread.join();
    }
}

/// Starts the sync thread. It never fails the start: PostgreSQL down only delays synchronisation.
pub fn start(
    settings: &FleetSettings,
    connector: Connector,
    address: String,
    enroll_url: Option<String>,
    applier: Arc<dyn Applier>,
) -> anyhow::Result<SyncHandle> {
    let wake = Arc::new(Wake::default());
    // The node's own state is published at start (what changed while it was down).
    wake.publish.store(true, Ordering::SeqCst);
    let w = wake.clone();
    let node = settings.node_id.clone();
    let interval = settings.heartbeat_interval;
    let thread = std::thread::Builder::new()
        .name("rampart-fleet-sync".into())
        .spawn(move || match super::runtime() {
            Ok(rt) => rt.block_on(run(
                connector, node, address, enroll_url, interval, applier, w,
            )),
            Err(e) => tracing::error!(error = %e, "fleet sync cannot start a runtime"),
        })
        .context("cannot start the fleet sync thread")?;
    Ok(SyncHandle { thread, wake })
}

struct Session {
    client: tokio_postgres::Client,
    notes: tokio::sync::mpsc::UnboundedReceiver<String>,
}

/// A connection of its own (not pooled) that `LISTEN`s; notifications arrive on `notes`, which closes when
/// the connection ends.
async fn listen(connector: &Connector) -> anyhow::Result<Session> {
    use futures::StreamExt as _;
    let (mut client, mut conn) = connector
        .cfg
        .connect(connector.tls.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{}", connector.classify(&e)))?;
    let (tx, notes) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "fleet sync connection ended");
                    break;
                }
            }
        }
    });
    super::schema::migrate(&mut client).await.map_err(|e| {
        anyhow::anyhow!(
            "{}: fleet.postgres_url: cannot migrate the fleet schema: {e:#}",
            connector.source
        )
    })?;
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(Session { client, notes })
}

async fn run(
    connector: Connector,
    node: String,
    address: String,
    enroll_url: Option<String>,
    interval: Duration,
    applier: Arc<dyn Applier>,
    wake: Arc<Wake>,
) {
    let beat = Beat {
        node: &node,
        address: &address,
        enroll_url: enroll_url.as_deref(),
    };
    let mut session: Option<Session> = None;
    let mut backoff = Duration::from_millis(250);
    let mut warned_down = false;
    // The newest version refused (logged once, retried when a newer one arrives).
    let mut refused: Option<i64> = None;
    let mut next_beat = Instant::now();
    loop {
        if wake.stop.load(Ordering::SeqCst) {
            if let Some(s) = &session {
                let _ = heartbeat(&s.client, &beat, applier.applied().version).await;
            }
            return;
        }
        if session.as_ref().is_some_and(|s| s.client.is_closed()) {
            session = None;
        }
        let Some(s) = session.as_mut() else {
            match listen(&connector).await {
                Ok(s) => {
                    if warned_down {
                        tracing::info!(node = %node, "fleet PostgreSQL reachable again; shared state resumes");
                    }
                    warned_down = false;
                    backoff = Duration::from_millis(250);
                    session = Some(s);
                    // Notifications sent while disconnected are lost: re-read now (and publish what the
                    // node changed meanwhile).
                    wake.publish.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    if !warned_down {
                        tracing::warn!(node = %node, error = %format!("{e:#}"), "fleet shared state unreachable; the node keeps its last applied state and retries");
                        warned_down = true;
                    }
                    sleep_or_wake(&wake, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        };
        let result = async {
            if wake.publish.swap(false, Ordering::SeqCst) {
                if let Err(e) = publish(&mut s.client, &node, &*applier).await {
                    wake.publish.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
            sync(&mut s.client, &*applier, &mut refused).await?;
            if Instant::now() >= next_beat {
                heartbeat(&s.client, &beat, applier.applied().version).await?;
                next_beat = Instant::now() + interval;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(node = %node, error = %format!("{e:#}"), "fleet shared state: PostgreSQL failed; the node keeps its last applied state and retries");
            warned_down = true;
            session = None;
            continue;
        }
        let wait = next_beat.saturating_duration_since(Instant::now());
        tokio::select! {
            n = s.notes.recv() => {
                if n.is_none() {
                    session = None;
                }
            }
            _ = wake.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn sleep_or_wake(wake: &Wake, d: Duration) {
    tokio::select! {
        _ = wake.notify.notified() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Publishes the node's own changes in one transaction; bumps the version and notifies if anything changed.
async fn publish(
    client: &mut tokio_postgres::Client,
    node: &str,
    applier: &dyn Applier,
) -> anyhow::Result<()> {
    // A local file this node cannot read is not a PostgreSQL failure: say so once, retry at the next reload.
    let local = match applier.local() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(node, "fleet: cannot publish this node's changes: {e}");
            return Ok(());
        }
    };
    let applied = applier.applied();
    let digest = tenant_doc_digest(&local.tenant_doc);
    let tx = client.transaction().await?;
    let current: i64 = tx
        .query_one(
            "SELECT version FROM fleet_config WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?
        .get(0);
    let next = current + 1;
    let mut changed = false;
    let latest: Option<String> = tx
        .query_opt(
            "SELECT doc FROM fleet_policy ORDER BY version DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    // The file's tenants are published when edited since the last sync; a node joining a fleet that has a
    // policy adopts it instead.
    let edited = applied.file_digest.as_deref() != Some(digest.as_str());
    let joining = applied.file_digest.is_none() && latest.is_some();
    if edited && !joining && latest.as_deref() != Some(local.tenant_doc.as_str()) {
        tx.execute(
            "INSERT INTO fleet_policy (version, node_id, doc) VALUES ($1, $2, $3)",
            &[&next, &node, &local.tenant_doc],
        )
        .await?;
        tracing::info!(
            node,
            version = next,
            "fleet: publishing this node's tenant policy"
        );
        changed = true;
    }
    let rows = tx
        .query(
            "SELECT tenant, name, device FROM fleet_devices WHERE origin_node = $1 AND NOT removed",
            &[&node],
        )
        .await?;
    let mut mine: Vec<(String, String, Option<EnrolledDevice>)> = rows
        .iter()
        .map(|r| {
            let text: String = r.get(2);
            (r.get(0), r.get(1), serde_json::from_str(&text).ok())
        })
        .collect();
    for d in &local.devices {
        let (tenant, name) = (d.tenant.to_string(), d.name.to_string());
        let same = mine
            .iter()
            .any(|(t, n, e)| *t == tenant && *n == name && e.as_ref() == Some(d));
        mine.retain(|(t, n, _)| !(*t == tenant && *n == name));
        if same {
            continue;
        }
        let json = serde_json::to_string(d)?;
        let n = tx
            .execute(
                "INSERT INTO fleet_devices (tenant, name, origin_node, device, removed, version)
                 VALUES ($1, $2, $3, $4, false, $5)
                 ON CONFLICT (tenant, name) DO UPDATE
                 SET origin_node = EXCLUDED.origin_node, device = EXCLUDED.device, removed = false,
                     version = EXCLUDED.version
                 WHERE fleet_devices.origin_node = EXCLUDED.origin_node OR fleet_devices.removed",
                &[&tenant, &name, &node, &json, &next],
            )
            .await?;
        if n == 0 {
            tracing::error!(tenant, device = name, "fleet: a device of this name was enrolled on another node; this node's device stays local only, remove one of them");
        } else {
            changed = true;
        }
    }
    for (tenant, name, _) in mine {
        tx.execute(
            "UPDATE fleet_devices SET removed = true, version = $4 WHERE tenant = $1 AND name = $2 AND origin_node = $3",
            &[&tenant, &name, &node, &next],
        )
        .await?;
        changed = true;
    }
    if changed {
        tx.execute(
            "UPDATE fleet_config SET version = $1 WHERE id = 1",
            &[&next],
        )
        .await?;
        tx.execute(
            &format!("SELECT pg_notify('{CHANNEL}', $1)"),
            &[&next.to_string()],
        )
        .await?;
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    super::enrollment::mirror(client, node, &local.credentials).await?;
    // The file as of now is synchronised (published, adopted or unchanged): remember it even if nothing
    // changed, so the shared document applies from now on.
    if applied.file_digest.as_deref() != Some(digest.as_str()) {
        let mut state = read(client).await?;
        state.file_digest = Some(digest);
        match applier.apply_shared(&state) {
            Ok(msg) => tracing::info!(version = state.version, "fleet: {msg}"),
            Err(e) => tracing::error!(
                version = state.version,
                "fleet: shared state refused, running config unchanged: {e}"
            ),
        }
    }
    Ok(())
}

/// Reads the shared state at the current version (one snapshot).
async fn read(client: &mut tokio_postgres::Client) -> anyhow::Result<FleetCache> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let version: i64 = tx
        .query_one("SELECT version FROM fleet_config WHERE id = 1", &[])
        .await?
        .get(0);
    let policy = tx
        .query_opt(
            "SELECT version, node_id, doc FROM fleet_policy ORDER BY version DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| SharedPolicy {
            version: r.get(0),
            node: r.get(1),
            doc: r.get(2),
        });
    let mut devices = Vec::new();
    for r in tx
        .query(
            "SELECT origin_node, device, tenant, name FROM fleet_devices WHERE NOT removed ORDER BY tenant, name",
            &[],
        )
        .await?
    {
        let text: String = r.get(1);
        match serde_json::from_str::<EnrolledDevice>(&text) {
            Ok(device) => devices.push(SharedDevice {
                origin: r.get(0),
                device,
            }),
            Err(e) => {
                let (t, n): (String, String) = (r.get(2), r.get(3));
                tracing::error!(tenant = t, device = n, error = %e, "fleet: skipping a shared device that does not parse");
            }
        }
    }
    tx.commit().await?;
    Ok(FleetCache {
        version,
        policy,
        devices,
        file_digest: None,
    })
}

/// Applies the shared state if PostgreSQL has a newer version than the one applied.
async fn sync(
    client: &mut tokio_postgres::Client,
    applier: &dyn Applier,
    refused: &mut Option<i64>,
) -> anyhow::Result<()> {
    let applied = applier.applied();
    let version: i64 = client
        .query_one("SELECT version FROM fleet_config WHERE id = 1", &[])
        .await?
        .get(0);
    if version <= applied.version || *refused == Some(version) {
        return Ok(());
    }
    let mut state = read(client).await?;
    state.file_digest = applied.file_digest.clone();
    match applier.apply_shared(&state) {
        Ok(msg) => {
            *refused = None;
            tracing::info!(
                version = state.version,
                "fleet: applied shared config: {msg}"
            );
        }
        Err(e) => {
            *refused = Some(state.version);
            tracing::error!(
                version = state.version,
                "fleet: shared config version {} refused, running config unchanged: {e}",
                state.version
            );
        }
    }
    Ok(())
}

/// What a heartbeat says about this node.
struct Beat<'a> {
    node: &'a str,
    address: &'a str,
    /// `rampart://HOST:PORT/?pin=...` of its enrollment listener, offered to devices for failover.
    enroll_url: Option<&'a str>,
}

async fn heartbeat(
    client: &tokio_postgres::Client,
    beat: &Beat<'_>,
    applied: i64,
) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO fleet_nodes (node_id, address, applied_version, last_heartbeat, software, enroll_url)
             VALUES ($1, $2, $3, now(), $4, $5)
             ON CONFLICT (node_id) DO UPDATE
             SET address = EXCLUDED.address, applied_version = EXCLUDED.applied_version,
                 last_heartbeat = now(), software = EXCLUDED.software, enroll_url = EXCLUDED.enroll_url",
            &[
                &beat.node,
                &beat.address,
                &applied,
                &env!("CARGO_PKG_VERSION"),
                &beat.enroll_url,
            ],
        )
        .await?;
    Ok(())
}

/// One node as `rampart fleet status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub node: String,
    pub address: Option<String>,
    pub applied_version: Option<i64>,
    /// The fleet's version minus the applied one.
    pub lag: Option<i64>,
    /// Seconds since the last heartbeat (PostgreSQL's clock).
    pub heartbeat_age_secs: Option<f64>,
    pub software: Option<String>,
    /// No heartbeat for longer than the threshold (or never).
    pub stale: bool,
}

/// The fleet's config version and every node's membership row.
pub async fn status(
    client: &tokio_postgres::Client,
    stale_after: Duration,
) -> anyhow::Result<(i64, Vec<NodeStatus>)> {
    let version: i64 = client
        .query_one("SELECT version FROM fleet_config WHERE id = 1", &[])
        .await?
        .get(0);
    let rows = client
        .query(
            "SELECT node_id, address, applied_version,
                    extract(epoch FROM (now() - last_heartbeat))::float8, software
             FROM fleet_nodes ORDER BY node_id",
            &[],
        )
        .await?;
    let nodes = rows
        .iter()
        .map(|r| {
            let applied: Option<i64> = r.get(2);
            let age: Option<f64> = r.get(3);
            NodeStatus {
                node: r.get(0),
                address: r.get(1),
                applied_version: applied,
                lag: applied.map(|a| version - a),
                heartbeat_age_secs: age,
                software: r.get(4),
                stale: age.is_none_or(|a| a > stale_after.as_secs_f64()),
            }
        })
        .collect();
    Ok((version, nodes))
}
