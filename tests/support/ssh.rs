//! SSH harness: a real OpenSSH `sshd` (on loopback or inside a test namespace), OpenSSH client identities,
//! the SSH inspector in-process on a loopback listener configured from a real config file ([`Inspector`]),
//! and readers of the SSH audit log.
//!
//! `Inspector` runs what `rampart run` runs for an `inspect_ssh` flow (`rampart::ssh::intercept` with the
//! context `intercept_flow` builds) without WireGuard, so the inspector's own behaviour is quick to test;
//! what only the daemon wires up (rules from the config, enrolled devices, the tenant's reviewer key) is
//! tested through `rampart run` with [`super::Lab`].

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart::audit::ssh_records::{self, LogRow, SshAuditWriter, SshEvent, SshLog};
use rampart::config::{Config, Inspect};
use rampart::handoff::{ConfigHandle, Identity};
use rampart::ssh::{trust, SshContext, SshLimits, SshServices};

use super::netns::Netns;
use super::process::Proc;

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
pub const RAMPART: &str = env!("CARGO_BIN_EXE_rampart");

pub fn need_openssh() -> bool {
    Path::new(SSHD).exists() && Path::new(SFTP_SERVER).exists()
}

/// A fresh temp dir, removed when the returned guard drops (see [`super::tmp`]).
pub fn tempdir(tag: &str) -> super::TempDir {
    super::tempdir(&format!("ssh-{tag}"))
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` feeding it `stdin`; kills it after 3 minutes (a hung test fails instead of hanging).
pub fn run_with_stdin(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(data) = stdin {
        let mut sin = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = sin.write_all(&data);
        });
    }
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read + Send>),
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn sha256_hex(data: &[u8]) -> String {
    ssh_records::sha256_hex(data)
}

pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// `ssh-keygen`: a new Ed25519 key pair at `path` (and `path.pub`), no passphrase.
pub fn keygen(path: &Path) {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "rampart-e2e", "-f"])
            .arg(path),
    );
}

/// `ssh-keygen -lf`: the SHA256 fingerprint of a public key file, as the gateway records it.
pub fn fingerprint(pub_file: &Path) -> String {
    let out = run_ok(Command::new("ssh-keygen").arg("-lf").arg(pub_file));
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Every file below `dir`, sorted.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

// ------------------------------------------------------------------------------------------------- sshd ----

/// How the target presents itself.
#[derive(Clone, Debug)]
pub enum HostKey {
    /// A plain Ed25519 host key.
    Plain,
    /// The host key plus a host certificate from the CA private key at `ca`, naming `principals` (none: a
    /// certificate "valid for any host", which OpenSSH clients refuse).
    Certificate {
        ca: PathBuf,
        principals: Vec<String>,
    },
}

/// A real sshd trusting a user CA for certificate logins.
pub struct Sshd {
    proc: Proc,
    pub addr: String,
    pub ports: Vec<u16>,
    log: PathBuf,
}

impl Sshd {
    /// sshd on 127.0.0.1 (root namespace) on a free port, with a plain host key.
    pub fn loopback(dir: &Path, user_ca_pub: &Path) -> Sshd {
        Sshd::start(None, dir, "127.0.0.1", &[], user_ca_pub, HostKey::Plain)
    }

    /// sshd in `ns` (or the root namespace) listening on `addr` at `ports` (none: one free port, retried if
    /// another process takes it first). Its files live in `dir` (a new host key unless one is there).
    pub fn start(
        ns: Option<&Netns>,
        dir: &Path,
        addr: &str,
        ports: &[u16],
        user_ca_pub: &Path,
        host_key: HostKey,
    ) -> Sshd {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let key = dir.join("sshd_host_key");
        if !key.exists() {
            keygen(&key);
        }
        let mut cert_line = String::new();
        if let HostKey::Certificate { ca, principals } = &host_key {
            let mut cmd = Command::new("ssh-keygen");
            cmd.args(["-q", "-s"])
                .arg(ca)
                .args(["-h", "-I", "e2e-target", "-V", "-5m:+1h"]);
            if !principals.is_empty() {
                cmd.args(["-n", &principals.join(",")]);
            }
            run_ok(cmd.arg(format!("{}.pub", key.display())));
            cert_line = format!("HostCertificate {}-cert.pub\n", key.display());
        }
        let chosen = ports.is_empty();
        for _ in 0..5 {
            let ports: Vec<u16> = if chosen {
                vec![free_port()]
            } else {
                ports.to_vec()
            };
            let cfg = dir.join("sshd_config");
            let port_lines: String = ports.iter().map(|p| format!("Port {p}\n")).collect();
            std::fs::write(
                &cfg,
                format!(
                    "{port_lines}ListenAddress {addr}\nHostKey {}\n{cert_line}PidFile {}\nUsePAM no\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                     AuthorizedKeysFile none\nTrustedUserCAKeys {}\nPermitRootLogin prohibit-password\n\
                     StrictModes no\nSubsystem sftp {SFTP_SERVER}\nLogLevel VERBOSE\nAllowTcpForwarding yes\n\
                     AcceptEnv LANG LC_* RAMPART_*\nMaxStartups 100:30:200\nMaxSessions 50\n",
                    key.display(),
                    dir.join("sshd.pid").display(),
                    user_ca_pub.display()
                ),
            )
            .unwrap();
            let log = dir.join("sshd.log");
            let _ = std::fs::remove_file(&log);
            let mut cmd = match ns {
                Some(ns) => ns.exec(SSHD),
                None => Command::new(SSHD),
            };
            cmd.args(["-D", "-E"]).arg(&log).arg("-f").arg(&cfg);
            let mut s = Sshd {
                proc: Proc::spawn("sshd", cmd, dir),
                addr: addr.to_string(),
                ports: ports.clone(),
                log,
            };
            let up = wait_for(Duration::from_secs(20), "sshd to listen", || {
                if s.proc.exit_status().is_some() {
                    return Some(false);
                }
                let log = s.log();
                ports
                    .iter()
                    .all(|p| log.contains(&format!("Server listening on {addr} port {p}")))
                    .then_some(true)
            });
            if up {
                return s;
            }
            // A port was taken in the meantime: try others (only when we chose them).
            assert!(chosen, "sshd did not start:\n{}", s.log());
        }
        panic!("sshd did not start; see its log in {}", dir.display());
    }

    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// The first listening address (loopback sshd).
    pub fn sockaddr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr.parse().unwrap(), self.port())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
    }
}

// ------------------------------------------------------------------------------------------- ssh client ----

/// An OpenSSH client: its key (`id`) and a known_hosts that trusts only the tenant host CA.
pub struct SshClient {
    pub dir: PathBuf,
}

impl SshClient {
    /// A new identity in `dir`; `cert_authority_line` is the `@cert-authority * ...` line `ca init` printed.
    pub fn new(dir: &Path, cert_authority_line: &str) -> SshClient {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("known_hosts"), format!("{cert_authority_line}\n")).unwrap();
        keygen(&dir.join("id"));
        SshClient {
            dir: dir.to_path_buf(),
        }
    }

    pub fn id(&self) -> PathBuf {
        self.dir.join("id")
    }

    pub fn id_pub(&self) -> PathBuf {
        self.dir.join("id.pub")
    }

    /// Options for every invocation: this identity only, strict host checking against the tenant host CA.
    pub fn opts(&self) -> Vec<String> {
        self.opts_with_key(&self.id())
    }

    pub fn opts_with_key(&self, id: &Path) -> Vec<String> {
        [
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-i".into(),
            id.display().to_string(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.dir.join("known_hosts").display()
            ),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "ConnectTimeout=30".into(),
        ]
        .to_vec()
    }

    /// `program` (ssh, scp, sftp) with this client's options, in `ns` if given.
    pub fn command(&self, ns: Option<&Netns>, program: &str) -> Command {
        let mut cmd = match ns {
            Some(ns) => ns.exec(program),
            None => Command::new(program),
        };
        cmd.args(self.opts());
        cmd
    }

    /// `ssh <opts> ARGS` in `ns`, fed `stdin`.
    pub fn ssh(&self, ns: &Netns, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.command(Some(ns), "ssh");
        cmd.args(args);
        run_with_stdin(cmd, stdin)
    }
}

// ----------------------------------------------------------------------------------------- audit log ----

pub fn events(rows: &[LogRow], kind: &str) -> Vec<SshEvent> {
    rows.iter()
        .filter(|r| r.kind == kind)
        .filter_map(LogRow::event)
        .collect()
}

/// Exec commands in plaintext (sealed ones are left out).
pub fn exec_commands(rows: &[LogRow]) -> Vec<String> {
    events(rows, "command")
        .into_iter()
        .filter_map(|e| match e {
            SshEvent::Command(c) if c.source == ssh_records::CommandSource::Exec => {
                c.command.text.open(None)
            }
            _ => None,
        })
        .collect()
}

/// Waits until the SSH audit log in `db` holds `n` records of `kind`; returns all records.
pub fn wait_rows(db: &Path, kind: &str, n: usize) -> Vec<LogRow> {
    wait_for(
        Duration::from_secs(30),
        &format!("{n} {kind} records"),
        || {
            let rows = SshLog::open_readonly(db)
                .ok()?
                .rows_after(0, 1_000_000)
                .ok()?;
            (rows.iter().filter(|r| r.kind == kind).count() >= n).then_some(rows)
        },
    )
}

/// Session ids, newest first.
pub fn session_ids(db: &Path) -> Vec<String> {
    SshLog::open_readonly(db)
        .unwrap()
        .rows_of_kind("session.start", 0)
        .unwrap()
        .into_iter()
        .rev()
        .map(|r| r.keys.session_id)
        .collect()
}

/// `rampart ca init --tenant TENANT` through the CLI of `gateway`; returns the `@cert-authority` line it printed.
pub fn ca_init(gateway: &super::gateway::Gateway, tenant: &str) -> String {
    let out = gateway
        .cli(&["ca", "init"], &["--tenant", tenant])
        .expect_ok();
    assert!(
        !out.contains("PRIVATE KEY"),
        "ca init printed a private key"
    );
    out.lines()
        .find(|l| l.starts_with("@cert-authority * ssh-ed25519 "))
        .unwrap_or_else(|| panic!("no @cert-authority line in:\n{out}"))
        .to_string()
}

// ------------------------------------------------------------------------------------------ inspector ----

/// Tenant `acme` with device `alice-laptop` (user `alice@acme.example` unless changed) and the
/// `inspect_ssh` rule `ssh-admins` every connection of an [`Inspector`] is decided by.
#[derive(Clone)]
pub struct GwOpts {
    /// TOML keys of the rule `ssh-admins` besides id and action (e.g. `recording = "best_effort"`).
    pub rule: String,
    /// TOML keys of the tenant (e.g. `audit_recipient = "..."`).
    pub tenant: String,
    /// `[[tenant.rule]]` tables after `ssh-admins` (the flow policy forwarded channels are checked against).
    pub more_rules: String,
    /// TOML keys of the device (e.g. `ssh_keys = [...]`).
    pub device: String,
    pub user: String,
    pub limits: SshLimits,
    /// Also tenant `beta` (own CAs) with a device of the same name `alice-laptop` and its own `ssh-admins`
    /// rule, whose connections arrive on [`Inspector::beta_port`] (towards the same target).
    pub second_tenant: bool,
}

impl Default for GwOpts {
    fn default() -> Self {
        GwOpts {
            rule: String::new(),
            tenant: String::new(),
            more_rules: String::new(),
            device: String::new(),
            user: "alice@acme.example".into(),
            limits: SshLimits::default(),
            second_tenant: false,
        }
    }
}

/// The inspector in-process: a listener on 127.0.0.1 whose connections are intercepted towards the target.
pub struct Inspector {
    rt: Option<tokio::runtime::Runtime>,
    pub port: u16,
    /// With [`GwOpts::second_tenant`]: the listener whose connections are tenant `beta`'s.
    pub beta_port: Option<u16>,
    pub state: PathBuf,
    /// The state dir when the inspector made it ([`Inspector::start`]); else the caller's guard removes it.
    _dir: Option<super::TempDir>,
    writer: Option<SshAuditWriter>,
    services: Option<Arc<SshServices>>,
    target: Arc<Mutex<SocketAddrV4>>,
    pub config: PathBuf,
    config_handle: ConfigHandle,
    audit_db: PathBuf,
    pub client: SshClient,
}

fn render_config(state: &Path, audit_db: &Path, opts: &GwOpts) -> String {
    let beta = if opts.second_tenant {
        "[[tenant]]\nid = \"beta\"\naddress_pool = \"100.97.0.0/24\"\ngateway_address = \"100.97.0.1\"\n\
         [[tenant.rule]]\nid = \"ssh-admins\"\naction = \"inspect_ssh\"\nproto = \"tcp\"\n\
         [[tenant.device]]\nname = \"alice-laptop\"\n\
         public_key = \"mBpYmcMP7SsRj0kdEVmiV6Qk7qjZK0dYo0KwvQKr0Xk=\"\n\
         address = \"100.97.0.2\"\nuser = \"alice@beta.example\"\n"
    } else {
        ""
    };
    format!(
        "[gateway]\nstate_dir = \"{}\"\n\n[audit]\npath = \"{}\"\n\n[[tenant]]\nid = \"acme\"\n\
         address_pool = \"100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n{}\n\
         [[tenant.rule]]\nid = \"ssh-admins\"\naction = \"inspect_ssh\"\nproto = \"tcp\"\n{}\n{}\n\
         [[tenant.device]]\nname = \"alice-laptop\"\n\
         public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\n\
         address = \"100.96.0.2\"\nuser = \"{}\"\n{}\n{beta}",
        state.display(),
        audit_db.display(),
        opts.tenant,
        opts.rule,
        opts.more_rules,
        opts.user,
        opts.device
    )
}

/// Accepts on `listener` and intercepts each connection as `identity` under `settings`, towards `target`.
fn serve(
    rt: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    identity: Identity,
    settings: rampart::config::SshRuleSettings,
    handle: ConfigHandle,
    services: Arc<SshServices>,
    target: Arc<Mutex<SocketAddrV4>>,
) {
    rt.spawn(async move {
        loop {
            let Ok((client, peer)) = listener.accept().await else {
                continue;
            };
            let SocketAddr::V4(src) = peer else { continue };
            let dst = *target.lock().unwrap();
            let ctx = SshContext::new(
                &identity,
                src,
                dst,
                Arc::from("ssh-admins"),
                settings.clone(),
                handle.clone(),
                services.clone(),
            );
            tokio::spawn(async move {
                let Ok(up) = tokio::net::TcpStream::connect(dst).await else {
                    return;
                };
                rampart::ssh::intercept(client, up, ctx).await;
            });
        }
    });
}

/// The identity and `ssh-admins` settings of `tenant`'s first device.
fn identity_of(cfg: &Config, tenant: &str) -> (Identity, rampart::config::SshRuleSettings) {
    let tenant = cfg.tenant(tenant).unwrap();
    let rule = tenant.rules.iter().find(|r| r.id == "ssh-admins").unwrap();
    let Inspect::Ssh(settings) = rule.inspect.clone() else {
        panic!("ssh-admins is not an inspect_ssh rule")
    };
    let device = tenant.devices[0].clone();
    let identity = Identity {
        tenant: tenant.id.clone(),
        device: device.name.clone(),
        user: device.user.clone(),
        groups: device.groups.clone().into(),
    };
    (identity, settings)
}

impl Inspector {
    /// A fresh state dir with tenant CAs, an sshd trusting the tenant user CA, and the inspector in front of it.
    pub fn start(opts: GwOpts) -> (Inspector, Sshd) {
        let state = tempdir("state");
        let init = trust::ca_init(&state, "acme").unwrap();
        let sshd = Sshd::loopback(&state.join("sshd"), &init.dir.join("user_ca.pub"));
        let mut gw = Inspector::start_with(state.to_path_buf(), sshd.sockaddr(), opts);
        gw._dir = Some(state);
        (gw, sshd)
    }

    /// The inspector on `state` (with tenant CAs made by `trust::ca_init`) towards `target`.
    pub fn start_with(state: PathBuf, target: SocketAddrV4, opts: GwOpts) -> Inspector {
        Inspector::start_with_audit_db(state.clone(), &state.join("audit.db"), target, opts)
    }

    /// Like [`start_with`](Self::start_with) with the SSH audit log at `audit_db`.
    pub fn start_with_audit_db(
        state: PathBuf,
        audit_db: &Path,
        target: SocketAddrV4,
        opts: GwOpts,
    ) -> Inspector {
        let config = state.join("gateway.toml");
        std::fs::write(&config, render_config(&state, audit_db, &opts)).unwrap();
        let cfg = Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
        let (identity, settings) = identity_of(&cfg, "acme");
        let beta = opts.second_tenant.then(|| {
            if !state.join("ssh/beta/user_ca").exists() {
                trust::ca_init(&state, "beta").unwrap();
            }
            identity_of(&cfg, "beta")
        });
        let handle = ConfigHandle::new(Arc::new(cfg));
        let config_handle = handle.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (sink, writer) =
            ssh_records::start(audit_db, &state.join("audit_signing_key")).unwrap();
        let services = Arc::new(SshServices::new(&state, sink, opts.limits));
        let target = Arc::new(Mutex::new(target));
        let bind = || {
            rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap()
        };
        let listener = bind();
        let port = listener.local_addr().unwrap().port();
        serve(
            &rt,
            listener,
            identity,
            settings,
            handle.clone(),
            services.clone(),
            target.clone(),
        );
        let beta_port = beta.map(|(identity, settings)| {
            let listener = bind();
            let port = listener.local_addr().unwrap().port();
            serve(
                &rt,
                listener,
                identity,
                settings,
                handle.clone(),
                services.clone(),
                target.clone(),
            );
            port
        });
        let host_ca = std::fs::read_to_string(state.join("ssh/acme/host_ca.pub")).unwrap();
        let client = SshClient::new(
            &state.join("client"),
            &format!("@cert-authority * {}", host_ca.trim()),
        );
        Inspector {
            rt: Some(rt),
            port,
            beta_port,
            state,
            _dir: None,
            writer: Some(writer),
            services: Some(services),
            target,
            config,
            config_handle,
            audit_db: audit_db.to_path_buf(),
            client,
        }
    }

    /// Rewrites the config file from `opts` and puts it in force for new sessions (like `rampart reload`;
    /// the rule's settings stay those of the running listener, as a flow keeps its rule).
    pub fn reload(&self, opts: &GwOpts) {
        std::fs::write(
            &self.config,
            render_config(&self.state, &self.audit_db, opts),
        )
        .unwrap();
        let cfg = Config::load(&self.config).unwrap_or_else(|e| panic!("{e}"));
        self.config_handle.store(Arc::new(cfg));
    }

    /// Where the next connections go.
    pub fn set_target(&self, target: SocketAddrV4) {
        *self.target.lock().unwrap() = target;
    }

    /// `ssh -p PORT <opts> ARGS` with `stdin` (from the root namespace).
    pub fn ssh(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.ssh_with_key(&self.client.id(), args, stdin)
    }

    /// Like [`ssh`](Self::ssh) with another identity.
    pub fn ssh_with_key(&self, id: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(self.client.opts_with_key(id))
            .args(["-p", &self.port.to_string()])
            .args(args);
        run_with_stdin(cmd, stdin)
    }

    pub fn audit_db(&self) -> PathBuf {
        self.audit_db.clone()
    }

    pub fn log(&self) -> SshLog {
        SshLog::open_readonly(&self.audit_db).unwrap()
    }

    /// Waits until the audit log holds `n` rows of `kind`, and returns all rows.
    pub fn wait_rows(&self, kind: &str, n: usize) -> Vec<LogRow> {
        wait_rows(&self.audit_db, kind, n)
    }

    pub fn session_ids(&self) -> Vec<String> {
        session_ids(&self.audit_db)
    }

    /// `rampart ARGS -c <this inspector's config>` (the review CLI).
    pub fn rampart(&self, args: &[&str]) -> Output {
        Command::new(RAMPART)
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// Stops the inspector and the audit writer (which signs its final checkpoint).
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        self.services = None;
        if let Some(w) = self.writer.take() {
            w.finish();
        }
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        // Stopped before the state dir's guard (a field, or the caller's) removes the dir.
        self.stop();
    }
}

/// Whether the peer closed `s` (EOF or reset) before `deadline`.
pub fn closed_within(mut s: StdStream, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A tiny tmpfs mounted on a directory (unmounted on drop): a store that fills up mid-session.
pub struct TinyFs(PathBuf);

impl TinyFs {
    pub fn mount(dir: &Path, size: &str) -> TinyFs {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "rampart-e2e"])
                .arg(dir),
        );
        TinyFs(dir.to_path_buf())
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
