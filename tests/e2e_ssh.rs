//! Acceptance of issue 5 (SSH interception, command logging, recording, review) with real OpenSSH binaries.
//!
//! - `loopback_*`: the inspector (`rampart::ssh::intercept`) in-process between a real `ssh` client and a real
//!   `sshd` (run by the test as its own child on a free port, temp config), both on 127.0.0.1.
//! - `gateway_*`: through the real `rampart run` with wireguard-go clients in namespaces (tests/support).
//!
//! Run: `cargo test --test e2e_ssh -- --test-threads=1` (root: sshd, namespaces).

#[allow(unused_imports)]
mod support;

use std::io::Write as _;
use std::net::{SocketAddr, SocketAddrV4, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart::audit::capture::RecipientKey;
use rampart::audit::ssh_records::{self, LogRow, SshAuditWriter, SshEvent, SshLog};
use rampart::config::{Recording, SshAuth, SshRuleSettings};
use rampart::ssh::{trust, SshContext, SshLimits, SshServices};

const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

fn tempdir(tag: &str) -> PathBuf {
    let mut b = [0u8; 6];
    getrandom::getrandom(&mut b).unwrap();
    let d = std::env::temp_dir().join(format!("rampart-e2e-ssh-{tag}-{}", ssh_records::hex(&b)));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `deadline`.
fn wait_for<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
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

/// A real sshd on 127.0.0.1, trusting `user_ca_pub` for certificate logins.
struct Sshd {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Sshd {
    fn start(dir: &Path, user_ca_pub: &Path) -> Sshd {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = dir.join("sshd_host_key");
        if !host_key.exists() {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(&host_key),
            );
        }
        for _ in 0..5 {
            let port = free_port();
            let cfg = dir.join("sshd_config");
            std::fs::write(
                &cfg,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nUsePAM no\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                     AuthorizedKeysFile none\nTrustedUserCAKeys {}\nPermitRootLogin prohibit-password\n\
                     StrictModes no\nSubsystem sftp {SFTP_SERVER}\nLogLevel VERBOSE\nAllowTcpForwarding yes\n\
                     AcceptEnv LANG LC_* RAMPART_*\nMaxStartups 100:30:200\nMaxSessions 50\n",
                    host_key.display(),
                    dir.join("sshd.pid").display(),
                    user_ca_pub.display()
                ),
            )
            .unwrap();
            let log = dir.join("sshd.log");
            let child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("sshd (apt install openssh-server)");
            let mut s = Sshd { child, port, log };
            let up = wait_for(Duration::from_secs(10), "sshd to listen", || {
                if let Ok(Some(_)) = s.child.try_wait() {
                    return Some(false);
                }
                StdStream::connect(("127.0.0.1", port)).ok().map(|_| true)
            });
            if up {
                return s;
            }
            // Port taken in the meantime: try another.
            let _ = s.child.wait();
        }
        panic!("sshd did not start; see its log");
    }

    fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new([127, 0, 0, 1].into(), self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The inspector in-process: a listener on 127.0.0.1 whose connections are intercepted towards `target`.
struct Gw {
    rt: Option<tokio::runtime::Runtime>,
    port: u16,
    state: PathBuf,
    writer: Option<SshAuditWriter>,
    services: Option<Arc<SshServices>>,
    client_dir: PathBuf,
}

struct GwOpts {
    settings: SshRuleSettings,
    recipient: Option<RecipientKey>,
    limits: SshLimits,
}

impl Default for GwOpts {
    fn default() -> Self {
        GwOpts {
            settings: SshRuleSettings {
                recording: Recording::Required,
                auth: SshAuth::None,
                capture_input: false,
                allow_forwarding: false,
            },
            recipient: None,
            limits: SshLimits::default(),
        }
    }
}

impl Gw {
    /// Starts the inspector with a fresh state dir whose tenant CA the returned sshd trusts.
    fn start(opts: GwOpts) -> (Gw, Sshd) {
        let state = tempdir("state");
        let init = trust::ca_init(&state, "acme").unwrap();
        let sshd = Sshd::start(&state, &init.dir.join("user_ca.pub"));
        let gw = Gw::start_with(state, sshd.addr(), opts);
        (gw, sshd)
    }

    fn start_with(state: PathBuf, target: SocketAddrV4, opts: GwOpts) -> Gw {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (sink, writer) =
            ssh_records::start(&state.join("audit.db"), &state.join("audit_signing_key")).unwrap();
        let services = Arc::new(SshServices::new(&state, sink, opts.limits));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let svc = services.clone();
        let settings = opts.settings;
        let recipient = opts.recipient;
        rt.spawn(async move {
            loop {
                let Ok((client, peer)) = listener.accept().await else {
                    continue;
                };
                let SocketAddr::V4(src) = peer else { continue };
                let ctx = SshContext {
                    tenant: rampart::config::TenantId::parse("acme").unwrap(),
                    device: rampart::config::DeviceName::parse("alice-laptop").unwrap(),
                    user: rampart::config::UserName::parse("alice@acme.example").unwrap(),
                    src,
                    dst: target,
                    rule: Arc::from("ssh-admins"),
                    settings: settings.clone(),
                    recipient,
                    services: svc.clone(),
                };
                tokio::spawn(async move {
                    let Ok(up) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    rampart::ssh::intercept(client, up, ctx).await;
                });
            }
        });
        let client_dir = state.join("client");
        std::fs::create_dir_all(&client_dir).unwrap();
        let host_ca = std::fs::read_to_string(state.join("ssh/acme/host_ca.pub")).unwrap();
        std::fs::write(
            client_dir.join("known_hosts"),
            format!("@cert-authority * {}", host_ca.trim()),
        )
        .unwrap();
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(client_dir.join("id")),
        );
        Gw {
            rt: Some(rt),
            port,
            state,
            writer: Some(writer),
            services: Some(services),
            client_dir,
        }
    }

    /// Options every OpenSSH client invocation gets: strict host checking against the tenant host CA only.
    fn ssh_opts(&self) -> Vec<String> {
        let kh = self.client_dir.join("known_hosts");
        let id = self.client_dir.join("id");
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
            format!("UserKnownHostsFile={}", kh.display()),
            "-o".into(),
            "GlobalKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
        ]
        .to_vec()
    }

    /// `ssh -p PORT <opts> root@127.0.0.1 <args>` with `stdin`.
    fn ssh(&self, extra: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new("ssh");
        cmd.args(self.ssh_opts())
            .args(["-p", &self.port.to_string()])
            .args(extra);
        run_with_stdin(cmd, stdin)
    }

    fn log(&self) -> SshLog {
        SshLog::open_readonly(&self.state.join("audit.db")).unwrap()
    }

    /// Waits until the audit log holds `n` rows of `kind`, and returns all rows.
    fn wait_rows(&self, kind: &str, n: usize) -> Vec<LogRow> {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} {kind} records"),
            || {
                let rows = self.log().rows_after(0, 100_000).ok()?;
                (rows.iter().filter(|r| r.kind == kind).count() >= n).then_some(rows)
            },
        )
    }

    /// Stops the inspector and the audit writer (which signs its final checkpoint).
    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        self.services = None;
        if let Some(w) = self.writer.take() {
            w.finish();
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_with_stdin(mut cmd: Command, stdin: Option<&[u8]>) -> Output {
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
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn events(rows: &[LogRow], kind: &str) -> Vec<SshEvent> {
    rows.iter()
        .filter(|r| r.kind == kind)
        .filter_map(LogRow::event)
        .collect()
}

fn exec_commands(rows: &[LogRow]) -> Vec<String> {
    events(rows, "command")
        .into_iter()
        .filter_map(|e| match e {
            SshEvent::Command(c) if c.source == "exec" => c.command.text.open(None),
            _ => None,
        })
        .collect()
}

fn need_openssh() -> bool {
    Path::new(SSHD).exists() && Path::new(SFTP_SERVER).exists()
}

// ------------------------------------------------------------------------------------------- loopback ------

#[test]
fn loopback_exec_relays_output_exit_codes_and_records_commands() {
    assert!(need_openssh(), "install openssh-server (make deps)");
    let (gw, sshd) = Gw::start(GwOpts::default());
    let out = gw.ssh(&["root@127.0.0.1", "echo out; echo err >&2; exit 7"], None);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
    let ok = gw.ssh(&["root@127.0.0.1", "true"], None);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    let rows = gw.wait_rows("session.end", 2);
    assert_eq!(
        exec_commands(&rows),
        ["echo out; echo err >&2; exit 7", "true"]
    );
    // sshd logged the certificate's key id, which names the session.
    let starts = events(&rows, "session.start");
    let SshEvent::SessionStart(start) = &starts[0] else {
        unreachable!()
    };
    let session_id = &rows
        .iter()
        .find(|r| r.kind == "session.start")
        .unwrap()
        .keys
        .session_id;
    let cert = start.cert.as_ref().expect("certificate recorded");
    assert!(cert.key_id.contains(session_id.as_str()));
    let log = wait_for(
        Duration::from_secs(5),
        "sshd to log the certificate",
        || {
            let l = sshd.log();
            l.contains("Accepted certificate ID").then_some(l)
        },
    );
    assert!(
        log.contains(&format!("session={session_id}")),
        "sshd log lacks the session id {session_id}:\n{log}"
    );
    let close = events(&rows, "channel.close");
    let statuses: Vec<Option<u32>> = close
        .iter()
        .map(|e| match e {
            SshEvent::ChannelClose(c) => c.exit_status,
            _ => None,
        })
        .collect();
    assert!(
        statuses.contains(&Some(7)) && statuses.contains(&Some(0)),
        "{statuses:?}"
    );
    let row = rows.iter().find(|r| r.kind == "command").unwrap();
    assert_eq!(row.keys.tenant, "acme");
    assert_eq!(row.keys.device, "alice-laptop");
    assert_eq!(row.keys.user, "alice@acme.example");
    assert_eq!(row.keys.login, "root");
    assert_eq!(row.keys.rule, "ssh-admins");
    assert_eq!(row.keys.cert_serial, Some(cert.serial));
}
