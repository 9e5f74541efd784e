//! `rampart run`: assembles the gateway from a validated config (key, UDP socket, core, on-ramp thread, admin
//! listener, control socket, signals) and keeps it running. Reloads validate first and leave the running
//! gateway untouched when the new config is bad.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::control::{self, PeerStatusWire, Reply, Request};
use crate::core::{Gateway, Metrics, TxQueue};
use crate::handoff::ConfigHandle;
use crate::keys::{PeerKey, PrivateKey};
use crate::onramp::{Command, Onramp};
use crate::shutdown::Shutdown;

/// How often last-known device endpoints are saved (used to re-handshake right after a restart).
const ENDPOINT_SAVE_INTERVAL: Duration = Duration::from_secs(15);
/// On SIGTERM, how long sessions and connections get to end through their normal path (SSH: tell the client,
/// wait for its channels, write `session.end`) before the rest is dropped with the runtime.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Then how long the audit writer gets to commit what is queued and sign its last checkpoint.
const AUDIT_DRAIN_BOUND: Duration = Duration::from_secs(10);

struct Running {
    config_path: PathBuf,
    config: ConfigHandle,
    /// Held across load, apply and swap, so reloads (control socket, SIGHUP) apply in order: a slower,
    /// older snapshot never undoes a newer one (a device removal, say).
    reload_lock: Mutex<()>,
    egresses: Arc<crate::egress::Egresses>,
    onramp: Onramp,
    ssh: Arc<crate::ssh::SshServices>,
    http: crate::http::HttpServices,
    offramp: Arc<crate::offramp::OfframpCounters>,
    enroll_audit: crate::audit::enroll_records::EnrollAuditSink,
    admin_audit: crate::audit::admin_records::AdminAuditSink,
    /// Fleet mode: the shared state applied now, and the thread that publishes local changes.
    fleet_applied: Mutex<crate::config::shared::FleetCache>,
    fleet_sync: Mutex<Option<crate::fleet::state::SyncHandle>>,
    /// Fleet mode: the shared enrollment tokens and device credentials, for the enrollment service.
    shared_enrollment: Option<crate::fleet::enrollment::SharedEnrollment>,
    /// Fleet mode: what the review UI reads the fleet's records and recordings with.
    fleet_review: Option<Arc<crate::fleet::ReviewAccess>>,
}

impl Running {
    /// Re-reads the config and registry; applies them only if valid. In fleet mode the node's changes are
    /// then published to the fleet.
    fn reload(&self) -> Result<String, String> {
        let msg = self.reload_with(None)?;
        if let Some(s) = self
            .fleet_sync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.publish();
        }
        Ok(msg)
    }

    /// [`reload`](Self::reload) with `shared` (a newer state of the fleet) instead of the cached one, kept
    /// (`state_dir/fleet_state.json`) only if the config it makes is valid and applied.
    fn reload_with(
        &self,
        shared: Option<&crate::config::shared::FleetCache>,
    ) -> Result<String, String> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let new = Config::load_with(&self.config_path, shared).map_err(|e| {
            tracing::error!("reload rejected, gateway unchanged:\n{e}");
            format!("reload rejected, running gateway unchanged:\n{e}")
        })?;
        let old = self.config.current();
        for key in old.restart_only_differences(&new) {
            tracing::warn!(
                key,
                "changed in the config file; it takes effect after a restart"
            );
        }
        let new = Arc::new(new);
        let summary = self.onramp.apply(new.clone()).ok_or("data path stopped")?;
        self.config.store(new.clone());
        self.egresses.prepare(&new);
        if let Some(c) = shared {
            if let Err(e) = c.store(&new.gateway.state_dir) {
                tracing::error!(error = %e, "cannot save the fleet's state in state_dir; it applies until the next restart");
            }
            *self.fleet_applied.lock().unwrap_or_else(|e| e.into_inner()) = c.clone();
        }
        let msg = format!(
            "reloaded {}: {} tenants, {} devices ({} added, {} removed, {} updated)",
            self.config_path.display(),
            new.tenants.len(),
            new.device_count(),
            summary.added,
            summary.removed,
            summary.updated
        );
        tracing::info!("{msg}");
        Ok(msg)
    }
}

/// What the fleet's sync thread needs from the running gateway.
impl crate::fleet::state::Applier for Running {
    fn local(&self) -> Result<crate::fleet::state::Local, String> {
        let text = std::fs::read_to_string(&self.config_path)
            .map_err(|e| format!("cannot read {}: {e}", self.config_path.display()))?;
        let tenant_doc = crate::config::shared::tenant_doc(&text)
            .map_err(|e| format!("{}: {e}", self.config_path.display()))?;
        let state_dir = self.config.current().gateway.state_dir.clone();
        let mut devices = crate::registry::Registry::open(&state_dir)
            .load()
            .map_err(|e| format!("{e:#}"))?;
        devices.extend(
            crate::enroll::store::data_path_devices(&state_dir)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(crate::registry::EnrolledDevice::from),
        );
        let credentials = match crate::enroll::store::Store::open_readonly(&state_dir) {
            Ok(Some(store)) => store.devices().map_err(|e| e.to_string())?,
            Ok(None) => Vec::new(),
            Err(e) => return Err(e.to_string()),
        };
        Ok(crate::fleet::state::Local {
            tenant_doc,
            devices,
            credentials,
        })
    }
    fn apply_shared(
        &self,
        candidate: &crate::config::shared::FleetCache,
    ) -> Result<String, String> {
        self.reload_with(Some(candidate))
    }
    fn applied(&self) -> crate::config::shared::FleetCache {
        self.fleet_applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the enrollment listener needs from the running gateway.
impl crate::enroll::service::GatewayHandle for Running {
    fn reload(&self) -> Result<String, String> {
        Running::reload(self)
    }
    fn peers(&self) -> Vec<crate::core::PeerStatus> {
        self.onramp.status()
    }
    fn config(&self) -> Arc<Config> {
        self.config.current()
    }
}

/// Loads the gateway key, creating it (mode 0600) on first start.
fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        return PrivateKey::read_file(path);
    }
    let key = PrivateKey::generate();
    key.write_new_file(path)
        .with_context(|| format!("cannot create gateway key {}", path.display()))?;
    tracing::info!(path = %path.display(), public_key = %key.public_key(), "generated a new gateway key");
    Ok(key)
}

pub fn run(config_path: &Path) -> anyhow::Result<()> {
    // Whatever the gateway creates (audit store, recordings, keys, registry, spool, logs) is its own only,
    // whatever umask it was started with: files 0600, directories 0700.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cfg = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = Arc::new(cfg);
    let g = &cfg.gateway;
    std::fs::create_dir_all(&g.state_dir)
        .with_context(|| format!("cannot create state_dir {}", g.state_dir.display()))?;
    // Keys, the device registry and the audit store live here: the gateway's user only.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&g.state_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict state_dir {}", g.state_dir.display()))?;
    }
    let key = load_or_create_key(&g.private_key_file)?;
    // Reads the password file while files are still reachable (before the sandbox).
    let fleet = match &cfg.fleet {
        Some(f) => Some((f, crate::fleet::Connector::new(f, &cfg.source)?)),
        None => None,
    };
    // The object store's credentials too (files or environment), for the recording uploader.
    let objects = match cfg.fleet.as_ref().and_then(|f| f.objects.as_ref()) {
        Some(o) => Some(crate::fleet::objects::Objects::new(o, &cfg.source)?),
        None => None,
    };
    let fleet_sync_connector = fleet.as_ref().map(|(_, c)| c.clone());
    // Shared enrollment tokens and device credentials (the enrollment service's connections).
    let shared_enrollment = fleet.as_ref().map(|(f, c)| {
        crate::fleet::enrollment::SharedEnrollment::new(c.clone(), &f.node_id, f.heartbeat_interval)
    });
    let fleet_review = fleet.as_ref().map(|(_, c)| {
        Arc::new(crate::fleet::ReviewAccess {
            connector: c.clone().for_review(),
            objects: objects.clone(),
        })
    });
    // What the node applied last (Config::load merged it); it serves with this while PostgreSQL is down.
    let fleet_applied = crate::config::shared::FleetCache::load(&g.state_dir).unwrap_or_default();
    // On-ramp sockets are made (and their mode set) with the privileges the gateway starts with.
    let mut listeners = Vec::new();
    for e in &cfg.seqpacket_onramps {
        let l = crate::onramp::seqpacket::bind(e).with_context(|| {
            format!(
                "cannot listen on the on-ramp socket {} ([[onramp.seqpacket]] {:?} path in {}); create its directory, or pick another path",
                e.path.display(),
                e.name,
                config_path.display()
            )
        })?;
        tracing::info!(onramp = %e.name, path = %e.path.display(), "SEQPACKET on-ramp listening");
        listeners.push(l);
    }
    let mut gue_listeners = Vec::new();
    for e in &cfg.gue_onramps {
        let l = crate::onramp::gue::bind(e).with_context(|| {
            format!(
                "cannot bind the GUE on-ramp socket {} ([[onramp.gue]] {:?} listen in {}); write an address of this host, or a free port",
                e.listen,
                e.name,
                config_path.display()
            )
        })?;
        tracing::info!(onramp = %e.name, listen = %e.listen, sites = e.sites.len(), "GUE on-ramp listening");
        gue_listeners.push(l);
    }
    let egresses = crate::egress::Egresses::new();
    // Everything above may need root; from here on the gateway is `gateway.user`, sandboxed (no thread may
    // exist before this: see `sandbox`).
    match &g.user {
        Some(name) => {
            let plan = crate::sandbox::Plan::new(&cfg, name)?;
            plan.hand_over(&cfg)?;
            plan.confine_files()?;
            egresses.prepare(&cfg);
            plan.become_user()?;
            crate::sandbox::install_seccomp()?;
        }
        None => {
            if nix::unistd::geteuid().is_root() {
                tracing::warn!(
                    "running as root without a sandbox; set gateway.user (an unprivileged system user) in {}",
                    config_path.display()
                );
            }
            egresses.prepare(&cfg);
        }
    }

    let socket = UdpSocket::bind(g.listen).with_context(|| {
        format!(
            "cannot listen on udp {} (gateway.listen in {})",
            g.listen,
            config_path.display()
        )
    })?;
    let metrics = Arc::new(Metrics::default());
    let (audit, audit_writer) =
        crate::audit::start(crate::audit::PipelineOptions::from_config(&cfg))?;
    // Fleet mode: ships the committed records to PostgreSQL; refuses to start on a wrong password or an
    // unreachable server (once running, an outage only delays shipping).
    let shipper = match fleet {
        Some((f, connector)) => {
            let s = crate::fleet::shipper::start(
                f,
                connector,
                cfg.audit.path.clone(),
                g.state_dir.join("audit_signing_key.pub"),
                audit.counters().clone(),
            )?;
            tracing::info!(node = %f.node_id, "fleet: shipping audit records to PostgreSQL");
            Some(s)
        }
        None => None,
    };
    // Recordings to the object store: refuses to start on a missing bucket or refused credentials; an
    // unreachable store only delays uploads (recordings are kept here until each upload is confirmed).
    let uploader = match (objects, &cfg.fleet) {
        (Some(o), Some(f)) => {
            let u = crate::fleet::uploader::start(
                o,
                crate::fleet::uploader::UploaderConfig {
                    node: f.node_id.clone(),
                    state_dir: g.state_dir.clone(),
                    audit_db: cfg.audit.path.clone(),
                    interval: f.ship_interval,
                },
                audit.counters().clone(),
            )?;
            tracing::info!(node = %f.node_id, "fleet: uploading SSH recordings to the object store");
            Some(u)
        }
        _ => None,
    };
    let audit_counters = audit.counters().clone();
    // The run's one shutdown: every listener and session of the runtime below watches it.
    let shutdown = Shutdown::new();
    let ssh = Arc::new(
        crate::ssh::SshServices::new(&g.state_dir, audit.ssh(), crate::ssh::SshLimits::default())
            .with_shutdown(shutdown.child_token()),
    );
    let http = crate::http::HttpServices::new(audit.http()).with_shutdown(shutdown.child_token());
    let offramp = Arc::new(crate::offramp::OfframpCounters::default());
    let registry = Arc::new(metrics_registry(
        &metrics,
        &audit_counters,
        &offramp,
        &http,
        &ssh,
    ));
    let enroll_audit = audit.enroll();
    let admin_audit = audit.admin();
    let mut gateway = Gateway::new(0, &key, metrics.clone(), Instant::now());
    let public = gateway.public_key();
    let summary = gateway.apply(&cfg, Instant::now(), &mut TxQueue::new());
    if summary.rejected > 0 {
        tracing::error!(
            rejected = summary.rejected,
            "some devices could not be loaded"
        );
    }
    // The layer-4 path (off-ramp) needs the namespace helper; start it only when the config uses it.
    let mut layer4 = if needs_layer4(&cfg) {
        let ns = crate::netns::supervisor::NsSupervisor::start().map_err(|e| {
            anyhow::anyhow!(
                "cannot start the gateway's private network namespace (needed for tenant offramp networks): {e}; \
                 run as root, or make /dev/net/tun accessible and allow unprivileged user namespaces"
            )
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(crate::onramp::HANDOFF_QUEUE);
        let releases = Arc::new(crate::handoff::SlotReleases::default());
        Some((
            ns,
            crate::onramp::AppSide {
                handoffs: tx,
                releases,
            },
            rx,
        ))
    } else {
        None
    };
    let app = layer4.as_ref().map(|(_, app, _)| app.clone());
    let seqpacket =
        crate::onramp::seqpacket::Seqpacket::new(listeners, cfg.clone(), metrics.clone());
    let gue = crate::onramp::gue::Gue::new(gue_listeners, cfg.clone(), metrics.clone());
    let onramp = Onramp::spawn(socket, gateway, metrics.clone(), audit, app, seqpacket, gue)
        .context("cannot start the data path")?;
    onramp.send(Command::LocalAddresses(local_addresses(&cfg)));
    let restored = load_endpoints(&g.state_dir);
    if !restored.is_empty() {
        onramp.send(Command::RestoreEndpoints(restored));
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let running = Arc::new(Running {
        config_path: config_path.to_path_buf(),
        config: ConfigHandle::new(cfg.clone()),
        reload_lock: Mutex::new(()),
        egresses,
        onramp,
        ssh,
        http,
        offramp,
        enroll_audit,
        admin_audit,
        fleet_applied: Mutex::new(fleet_applied),
        fleet_sync: Mutex::new(None),
        shared_enrollment,
        fleet_review,
    });
    if let (Some(f), Some(connector)) = (&cfg.fleet, fleet_sync_connector) {
        let address = g
            .public_endpoint
            .clone()
            .unwrap_or_else(|| g.listen.to_string());
        // The enrollment listener's public URL with its pin, offered to devices for failover (Mode A).
        let enroll_url = match (
            cfg.enroll.listen,
            crate::enroll::admin::listener_authority(&cfg),
        ) {
            (Some(_), Some(authority)) => {
                let identity = crate::enroll::admin::listener_identity(&cfg).with_context(|| {
                    format!(
                        "enrollment listener certificate (gateway.enroll_listen, [enroll] tls_cert/tls_key in {})",
                        cfg.source.display()
                    )
                })?;
                Some(crate::enroll::admin::enrollment_url(
                    &authority,
                    &identity.pins.url_pin(),
                    None,
                ))
            }
            _ => None,
        };
        let sync = crate::fleet::state::start(f, connector, address, enroll_url, running.clone())?;
        *running.fleet_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(sync);
    }
    // The off-ramp and the inspectors get threads of their own (ARCHITECTURE.md, threads and runtimes).
    let proxy = match &layer4 {
        Some(_) => {
            let n = g.proxy_threads.unwrap_or_else(default_proxy_threads);
            let t = crate::offramp::ProxyThreads::start(n)
                .context("cannot start the off-ramp proxy threads")?;
            tracing::info!(threads = t.len(), "off-ramp proxy threads started");
            Some(t)
        }
        None => None,
    };
    let l4 = layer4
        .as_mut()
        .zip(proxy.as_ref())
        .map(|((ns, app, rx), proxy)| {
            let events = ns.take_events().expect("namespace events taken once");
            let handoffs = std::mem::replace(rx, tokio::sync::mpsc::channel(1).1);
            (
                events,
                handoffs,
                app.releases.clone(),
                ns.connector(),
                proxy.pool(),
            )
        });
    let result = rt.block_on(serve(
        running.clone(),
        cfg.clone(),
        metrics,
        registry,
        public,
        l4,
        shutdown,
    ));
    // Stops the namespace helper (and its flows) before the data path.
    drop(layer4);
    // Tasks still running past `SHUTDOWN_GRACE` are dropped here; HTTP records in progress are emitted on drop.
    drop(rt);
    drop(proxy);
    // L3 of the security review: a client task may still hold `running` here; nothing below needs it alone.
    let sync = running
        .fleet_sync
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(s) = sync {
        s.finish();
    }
    save_endpoints(&cfg.gateway.state_dir, &running.onramp.status());
    // The data path ends every flow (their end records) and stops.
    running.onramp.shutdown();
    if !audit_writer.finish_within(AUDIT_DRAIN_BOUND) {
        tracing::error!(
            bound_secs = AUDIT_DRAIN_BOUND.as_secs(),
            "the audit writer did not finish in time; records still queued are lost"
        );
    }
    // After the writer: the run's last records (run.end) ship too, if PostgreSQL is reachable.
    if let Some(s) = shipper {
        s.finish();
    }
    if let Some(u) = uploader {
        u.finish();
    }
    let _ = std::fs::remove_file(control::socket_path(&cfg.gateway.state_dir));
    tracing::info!("stopped");
    result
}

/// The one metrics registry of a gateway run: every part's metrics, served at `GET /metrics`.
fn metrics_registry(
    core: &Arc<Metrics>,
    audit: &Arc<crate::audit::AuditCounters>,
    offramp: &crate::offramp::OfframpCounters,
    http: &crate::http::HttpServices,
    ssh: &crate::ssh::SshServices,
) -> crate::metrics::MetricsRegistry {
    let mut r = crate::metrics::MetricsRegistry::new();
    r.collect(core.clone());
    offramp.register(r.registry_mut());
    http.register_metrics(r.registry_mut());
    ssh.register_metrics(r.registry_mut());
    r.collect(audit.clone());
    r
}

/// Whether any tenant off-ramps flows or proxies between devices (which needs the namespace helper).
fn needs_layer4(cfg: &Config) -> bool {
    cfg.tenants
        .iter()
        .any(|t| !t.offramp.is_empty() || t.rules.iter().any(|r| r.action.is_layer4()))
}

/// Threads of the layer-4/7 runtime when `gateway.proxy_threads` is absent: the cores left after the data
/// path's one, at least 1 (so 1 on a 2-core box: the data path and the proxy each get a core) and at most 4.
fn default_proxy_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, 4)
}

type Layer4Channels = (
    tokio::sync::mpsc::Receiver<crate::netns::supervisor::NsEvent>,
    tokio::sync::mpsc::Receiver<crate::handoff::Handoff>,
    Arc<crate::handoff::SlotReleases>,
    crate::netns::supervisor::NsConnector,
    crate::offramp::ProxyPool,
);

/// Follows the namespace helper's lifecycle: each new namespace gets its TUN handed to the data path and its
/// listener/UDP socket served by the off-ramp proxy; a dead namespace ends its flows.
async fn run_layer4(
    running: Arc<Running>,
    (mut events, handoffs, releases, connector, pool): Layer4Channels,
    shutdown: Shutdown,
) {
    use crate::netns::supervisor::NsEvent;
    let flows = Arc::new(crate::offramp::Flows::new(releases));
    let counters = running.offramp.clone();
    // Not tracked: it follows the data path's hand-offs for as long as the runtime runs.
    let tracker = crate::offramp::spawn_tracker(handoffs, flows.clone(), &pool);
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        let ev = tokio::select! {
            // The off-ramp's tasks end on the same token, sessions through their own path.
            () = shutdown.cancelled() => return,
            ev = events.recv() => ev,
        };
        let Some(ev) = ev else { break };
        for t in tasks.drain(..) {
            t.abort();
        }
        match ev {
            NsEvent::Ready(inst) => {
                tracing::info!(
                    generation = inst.generation.0,
                    helper_pid = inst.helper_pid,
                    "gateway namespace ready"
                );
                let tuns = (
                    std::fs::File::from(inst.upgrade_tun.fd),
                    std::fs::File::from(inst.downgrade_tun.fd),
                );
                running.onramp.send(Command::SetTun(Some(tuns)));
                match crate::offramp::serve(
                    inst.tcp_listener,
                    inst.udp_socket,
                    flows.clone(),
                    counters.clone(),
                    connector.clone(),
                    crate::offramp::InspectEnv::new(
                        running.config.clone(),
                        running.egresses.clone(),
                    )
                    .with_ssh(running.ssh.clone())
                    .with_http(running.http.clone()),
                    &pool,
                    &shutdown,
                ) {
                    Ok(t) => tasks = t,
                    Err(e) => tracing::error!(error = %e, "cannot serve the upgrade listener"),
                }
            }
            NsEvent::Died { generation, status } => {
                tracing::warn!(generation = generation.0, %status, "gateway namespace helper died; upgraded flows end, restarting it");
                running.onramp.send(Command::SetTun(None));
            }
        }
    }
    for t in tasks {
        t.abort();
    }
    tracker.abort();
}

async fn serve(
    running: Arc<Running>,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    registry: Arc<crate::metrics::MetricsRegistry>,
    public: PeerKey,
    layer4: Option<Layer4Channels>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let g = &cfg.gateway;
    let admin = TcpListener::bind(g.admin_listen).await.with_context(|| {
        format!(
            "cannot listen on {} (gateway.admin_listen in {})",
            g.admin_listen,
            cfg.source.display()
        )
    })?;
    let control = bind_control(&g.state_dir)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let enroll = crate::enroll::server::start(
        running.clone(),
        running.enroll_audit.clone(),
        running.shared_enrollment.clone(),
        shutdown.child_token(),
    )
    .await?;

    let ui = crate::admin::web::start(
        crate::admin::web::UiServices {
            config: running.config.clone(),
            live: running.ssh.live().clone(),
            reload: {
                let r = running.clone();
                Box::new(move || r.reload())
            },
            audit: crate::admin::audit::AdminAudit::new(running.admin_audit.clone()),
            enroll_audit: running.enroll_audit.clone(),
            shared_enrollment: running.shared_enrollment.clone(),
            fleet: running.fleet_review.clone(),
        },
        shutdown.child_token(),
    )
    .await?;
    let admin_access = match &g.admin_token {
        None => crate::admin::AdminAccess::Plain,
        Some(t) => {
            let identity = crate::enroll::admin::listener_identity(&cfg).with_context(|| {
                format!(
                    "admin listener certificate (gateway.admin_token_file turns on HTTPS with the enrollment \
                     listener's certificate; [enroll] tls_cert/tls_key in {})",
                    cfg.source.display()
                )
            })?;
            eprintln!(
                "rampart: admin https://{} (/health, /metrics; Authorization: Bearer <the token in {}>; certificate pin {})",
                g.admin_listen,
                t.file.display(),
                identity.pins.curl_pin()
            );
            crate::admin::AdminAccess::Tls {
                acceptor: tokio_rustls::TlsAcceptor::from(identity.server_config()?),
                config: running.config.clone(),
            }
        }
    };
    shutdown.spawn(crate::admin::serve(
        admin,
        admin_access,
        metrics,
        registry,
        shutdown.clone(),
    ));
    shutdown.spawn(serve_control(control, running.clone(), shutdown.clone()));
    if let Some(ch) = layer4 {
        shutdown.spawn(run_layer4(running.clone(), ch, shutdown.clone()));
    }

    let tenants: Vec<String> = cfg.tenants.iter().map(|t| t.id.to_string()).collect();
    tracing::info!(
        listen = %g.listen, admin = %g.admin_listen, public_key = %public, tenants = tenants.len(),
        devices = cfg.device_count(), "rampart gateway running"
    );
    eprintln!(
        "rampart: WireGuard on udp {}, admin {}://{} (/health, /metrics), gateway public key {}\n\
         rampart: enroll a device:  rampart device add -c {} --tenant {} --name laptop --user alice@example.com --endpoint <this-host>:{}",
        g.listen,
        if g.admin_token.is_some() { "https" } else { "http" },
        g.admin_listen,
        public,
        cfg.source.display(),
        tenants.first().map(String::as_str).unwrap_or("<tenant-id>"),
        g.listen.port()
    );

    let mut save = tokio::time::interval(ENDPOINT_SAVE_INTERVAL);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let r = running.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = save.tick() => {
                let r = running.clone();
                let dir = g.state_dir.clone();
                let _ = tokio::task::spawn_blocking(move || save_endpoints(&dir, &r.onramp.status())).await;
                running.onramp.send(Command::LocalAddresses(local_addresses(&running.config.current())));
            }
        }
    }
    tracing::info!("shutting down");
    // One token for everything: listeners stop accepting, connections close, SSH sessions end with their
    // records; the tracker says when they are done (bounded).
    let left = shutdown.run_down(SHUTDOWN_GRACE).await;
    if left > 0 {
        tracing::warn!(
            tasks = left,
            grace_secs = SHUTDOWN_GRACE.as_secs(),
            "tasks still running after the shutdown grace; dropping them"
        );
    }
    enroll.shutdown().await;
    if let Some(ui) = ui {
        ui.shutdown().await;
    }
    Ok(())
}

/// Binds `state_dir/control.sock`, refusing to steal it from another running gateway.
fn bind_control(state_dir: &Path) -> anyhow::Result<UnixListener> {
    let path = control::socket_path(state_dir);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        anyhow::bail!(
            "another rampart gateway is already running with state_dir {}; stop it first or use another state_dir",
            state_dir.display()
        );
    }
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve_control(listener: UnixListener, running: Arc<Running>, shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            c = control::accept_authorized(&listener) => c,
        };
        let Ok(conn) = accepted else {
            continue;
        };
        let running = running.clone();
        shutdown.spawn(async move {
            let (rd, mut wr) = conn.into_split();
            let mut line = String::new();
            let mut rd = BufReader::new(rd);
            if tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line))
                .await
                .is_err()
            {
                return;
            }
            let reply = match serde_json::from_str::<Request>(&line) {
                Ok(Request::Reload) => {
                    let r = running.clone();
                    match tokio::task::spawn_blocking(move || r.reload()).await {
                        Ok(Ok(message)) => Reply {
                            ok: true,
                            message,
                            peers: Vec::new(),
                        },
                        Ok(Err(message)) => Reply {
                            ok: false,
                            message,
                            peers: Vec::new(),
                        },
                        Err(e) => Reply {
                            ok: false,
                            message: e.to_string(),
                            peers: Vec::new(),
                        },
                    }
                }
                Ok(Request::Status) => {
                    let r = running.clone();
                    let peers = tokio::task::spawn_blocking(move || r.onramp.status())
                        .await
                        .unwrap_or_default();
                    Reply {
                        ok: true,
                        message: String::new(),
                        peers: peers.iter().map(PeerStatusWire::from).collect(),
                    }
                }
                #[cfg(feature = "test-hooks")]
                Ok(Request::DebugStall { secs }) => {
                    running
                        .onramp
                        .send(Command::Stall(Duration::from_secs(secs)));
                    Reply {
                        ok: true,
                        message: format!("data path stalled for {secs} s"),
                        peers: Vec::new(),
                    }
                }
                #[cfg(feature = "test-hooks")]
                Ok(Request::DebugReadFile { path }) => {
                    match tokio::task::spawn_blocking(move || std::fs::read(&path)).await {
                        Ok(Ok(bytes)) => Reply {
                            ok: true,
                            message: format!("read {} bytes", bytes.len()),
                            peers: Vec::new(),
                        },
                        Ok(Err(e)) => Reply {
                            ok: false,
                            message: format!("cannot read: {e}"),
                            peers: Vec::new(),
                        },
                        Err(e) => Reply {
                            ok: false,
                            message: e.to_string(),
                            peers: Vec::new(),
                        },
                    }
                }
                #[cfg(feature = "test-hooks")]
                Ok(Request::DebugForbiddenSyscall) => {
                    let e =
                        tokio::task::spawn_blocking(crate::sandbox::debug_forbidden_syscall).await;
                    Reply {
                        ok: false,
                        message: format!("still alive after a forbidden system call: {e:?}"),
                        peers: Vec::new(),
                    }
                }
                Err(e) => Reply {
                    ok: false,
                    message: format!("bad request: {e}"),
                    peers: Vec::new(),
                },
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let _ = wr.write_all(&out).await;
        });
    }
}

/// The appliance's own addresses: every interface's, and what the gateway listens on.
fn local_addresses(cfg: &Config) -> Vec<std::net::IpAddr> {
    let mut a = crate::sys::local_addresses();
    a.push(cfg.gateway.listen.ip());
    a.push(cfg.gateway.admin_listen.ip());
    a.sort();
    a.dedup();
    a
}

fn endpoints_path(state_dir: &Path) -> PathBuf {
    state_dir.join("endpoints.json")
}

fn save_endpoints(state_dir: &Path, peers: &[crate::core::PeerStatus]) {
    let tmp = state_dir.join("endpoints.json.tmp");
    let result = std::fs::write(&tmp, endpoints_json(peers))
        .and_then(|()| std::fs::rename(&tmp, endpoints_path(state_dir)));
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot save device endpoints");
    }
}

/// The endpoints file for `peers`: public key -> last endpoint, for those with one.
pub(crate) fn endpoints_json(peers: &[crate::core::PeerStatus]) -> String {
    let map: HashMap<String, String> = peers
        .iter()
        .filter_map(|p| Some((p.public_key.to_string(), p.endpoint?.to_string())))
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}

fn load_endpoints(state_dir: &Path) -> Vec<(PeerKey, SocketAddr)> {
    match std::fs::read_to_string(endpoints_path(state_dir)) {
        Ok(text) => parse_endpoints(&text),
        Err(_) => Vec::new(),
    }
}

/// Reads an endpoints file; it is only a hint, so what does not parse is skipped.
pub(crate) fn parse_endpoints(text: &str) -> Vec<(PeerKey, SocketAddr)> {
    let map: HashMap<String, String> = serde_json::from_str(text).unwrap_or_default();
    map.into_iter()
        .filter_map(|(k, e)| Some((k.parse().ok()?, e.parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests;
