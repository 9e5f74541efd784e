//! Fleet mode (`[fleet]`): this gateway is one node of several that share one PostgreSQL for their audit
//! trail. The local SQLite store stays the store of record and the spool; [`shipper`] copies committed
//! chain entries (every record kind, with its canonical row) and the flows' rows to PostgreSQL, keyed by
//! `(node_id, chain seq)`, so a record arrives exactly once whatever crashes. [`review`] reads the fleet's
//! records back (`rampart audit flows --fleet`, `rampart audit verify --fleet`). With `[fleet.objects]`,
//! [`uploader`] puts each finished SSH recording into an S3-compatible bucket ([`objects`]) with a manifest of
//! its hash, and [`ssh_review`] lists the fleet's SSH sessions and replays recordings fetched from there,
//! verified first (`rampart audit ssh … --fleet`). [`enrollment`] shares the enrollment tokens and the
//! self-enrolled devices' credentials, and lists the nodes' enrollment URLs for failover (Mode A).
//!
//! Must never: decide anything on the data path, or make `fail_closed` depend on PostgreSQL (only the
//! local spool decides). Start reading at [`shipper::start`].
#![deny(unsafe_code)]

use std::path::Path;
use std::time::Duration;

use crate::config::FleetSettings;

pub mod enrollment;
pub mod objects;
pub mod review;
pub mod schema;
pub mod shipper;
pub mod ssh_review;
pub mod state;
pub mod uploader;

/// What the review UI reads the fleet with: PostgreSQL and, with `[fleet.objects]`, the bucket.
#[derive(Clone)]
pub struct ReviewAccess {
    pub connector: Connector,
    pub objects: Option<objects::Objects>,
}

/// Why a connection to the fleet's PostgreSQL failed, as the admin fixes it.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Authentication refused (wrong password or user), or no password given when one is needed.
    #[error("{0}")]
    Auth(String),
    /// Not reachable, or it refused the connection for another reason (no such database, ...).
    #[error("{0}")]
    Unreachable(String),
}

/// How to reach the fleet's PostgreSQL: the parsed URL with the password from its file.
#[derive(Clone)]
pub struct Connector {
    cfg: tokio_postgres::Config,
    /// TLS over TCP when the server offers it (`sslmode=prefer`, the default) or the URL demands it
    /// (`sslmode=require`); never on a Unix socket.
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// The config file (for messages).
    source: String,
    password_from_file: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Parses `fleet.postgres_url` and reads `fleet.postgres_password_file`. Reads files: call it before the
    /// sandbox confines file access.
    pub fn new(s: &FleetSettings, source: &Path) -> anyhow::Result<Connector> {
        let src = source.display().to_string();
        let mut cfg: tokio_postgres::Config = s.postgres_url.parse().map_err(|e| {
            anyhow::anyhow!(
                "{src}: fleet.postgres_url: is not a PostgreSQL connection string ({e})"
            )
        })?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name(format!("rampart node {}", s.node_id));
        }
        let password_from_file = s.postgres_password_file.is_some();
        if let Some(p) = &s.postgres_password_file {
            let pw = std::fs::read_to_string(p).map_err(|e| {
                anyhow::anyhow!(
                    "{src}: fleet.postgres_password_file: cannot read {}: {e}; write the PostgreSQL password into it (mode 0600)",
                    p.display()
                )
            })?;
            cfg.password(pw.trim_end_matches(['\n', '\r']));
        }
        let tls = crate::http::tls::origin_client_config(s.postgres_ca_file.as_deref())
            .map_err(|e| anyhow::anyhow!("{src}: fleet.postgres_ca_file: {e}"))?;
        Ok(Connector {
            cfg,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            source: src,
            password_from_file,
        })
    }

    /// Names review sessions apart from nodes' shippers in `pg_stat_activity`.
    pub fn for_review(mut self) -> Connector {
        self.cfg.application_name("rampart review");
        self
    }

    fn where_(&self) -> String {
        let hosts: Vec<String> = self
            .cfg
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = self.cfg.get_ports().iter().map(|p| p.to_string()).collect();
        format!(
            "{} port {} as user {}",
            if hosts.is_empty() {
                "localhost".into()
            } else {
                hosts.join(",")
            },
            if ports.is_empty() {
                "5432".into()
            } else {
                ports.join(",")
            },
            self.cfg.get_user().unwrap_or("(none)")
        )
    }

    /// Connects (the connection's IO runs as a task on the current runtime).
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnectError> {
        match self.cfg.connect(self.tls.clone()).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "fleet PostgreSQL connection ended");
                    }
                });
                Ok(client)
            }
            Err(e) => Err(self.classify(&e)),
        }
    }

    fn classify(&self, e: &tokio_postgres::Error) -> ConnectError {
        use tokio_postgres::error::SqlState;
        let src = &self.source;
        let at = self.where_();
        let detail = error_text(e);
        let pw_key = if self.password_from_file {
            "fleet.postgres_password_file"
        } else {
            "fleet.postgres_url"
        };
        let code = e.code();
        if code == Some(&SqlState::INVALID_PASSWORD)
            || code == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
            || detail.contains("password missing")
        {
            return ConnectError::Auth(format!(
                "{src}: {pw_key}: PostgreSQL at {at} refused the login ({detail}); check the password in {pw_key} and the user in fleet.postgres_url"
            ));
        }
        let lower = detail.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl") {
            return ConnectError::Unreachable(format!(
                "{src}: fleet.postgres_ca_file: TLS with PostgreSQL at {at} failed ({detail}); name the CA that signed the server's certificate in fleet.postgres_ca_file, and check sslmode in fleet.postgres_url"
            ));
        }
        if code == Some(&SqlState::INVALID_CATALOG_NAME) {
            return ConnectError::Unreachable(format!(
                "{src}: fleet.postgres_url: PostgreSQL at {at} has no such database ({detail}); create it (createdb) or fix dbname"
            ));
        }
        ConnectError::Unreachable(format!(
            "{src}: fleet.postgres_url: cannot reach PostgreSQL at {at} ({detail}); check host and port, and that PostgreSQL runs and accepts connections from this node"
        ))
    }
}

/// An error with its causes (tokio-postgres puts the server's message and IO errors in `source`).
pub fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A current-thread runtime for fleet work outside the gateway's runtimes (the shipper thread, the CLI).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Tells [`start_worker`] whether the worker started; dropped unsaid, it counts as a failed start.
pub struct Ready(std::sync::mpsc::Sender<anyhow::Result<()>>);

impl Ready {
    pub fn started(&self) {
        let _ = self.0.send(Ok(()));
    }

    pub fn failed(&self, e: anyhow::Error) {
        let _ = self.0.send(Err(e));
    }
}

/// Runs `body` on a thread `name` with a current-thread runtime of its own, and waits (at most 120 s) until
/// the body says it started (`Ready::started`) or failed (`Ready::failed`: the thread is joined and the error
/// returned). `what` names the worker in errors.
pub fn start_worker<F, Fut>(
    name: &str,
    what: &str,
    body: F,
) -> anyhow::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(Ready) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match runtime() {
            Ok(rt) => rt.block_on(body(Ready(tx))),
            Err(e) => {
                let _ = tx.send(Err(e.into()));
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the {what} thread: {e}"))?;
    let first = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the {what} did not start")));
    match first {
        Ok(()) => Ok(thread),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}
