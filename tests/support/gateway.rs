//! The `rampart` binary under test: config files, the `rampart run` process inside the gateway
//! namespace, the CLI (`device add/remove/list`, `reload`, `check-config`) and `/metrics`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use super::metrics::Metrics;
use super::netns::Netns;
use super::process::{poll_until, run, tail, Proc, Ran};
use super::wg_client::ClientConfig;

pub const BIN: &str = env!("CARGO_BIN_EXE_rampart");
/// The gateway's underlay address (on the gateway namespace's loopback, routed to by clients).
pub const UNDERLAY_ADDR: &str = "198.18.0.1";
pub const PORT: u16 = 51820;
pub const ADMIN: &str = "127.0.0.1:8080";
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `rampart run` may take to serve `/health`.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub id: String,
    pub name: String,
    /// One CIDR, or a TOML list of them (`["100.96.0.0/24", "fd00:96::/64"]`) for a dual-stack tenant.
    pub pool: String,
    /// One address, or a TOML list (one per address family of the pool).
    pub gateway_address: String,
    /// `[[tenant.rule]]` tables (TOML) for this tenant; the default allows everything within the tenant
    /// (policy is default deny).
    pub rules: String,
}

/// Policy that allows every flow within the tenant.
pub const ALLOW_ALL: &str = "[[tenant.rule]]\nid = \"allow-all\"\naction = \"allow\"\n";

impl TenantSpec {
    pub fn new(id: &str, pool: &str, gateway_address: &str) -> TenantSpec {
        TenantSpec {
            id: id.to_string(),
            name: format!("Tenant {id}"),
            pool: pool.to_string(),
            gateway_address: gateway_address.to_string(),
            rules: ALLOW_ALL.to_string(),
        }
    }
}

/// Writes `<dir>/gateway.toml` (key file and state dir relative to it) and returns its path.
pub fn write_config(dir: &Path, tenants: &[TenantSpec]) -> PathBuf {
    write_config_with(dir, tenants, "")
}

/// Like `write_config`, with `extra` (TOML: more `[gateway]` keys, then other tables such as `[enroll]`) after
/// the `[gateway]` keys.
pub fn write_config_with(dir: &Path, tenants: &[TenantSpec], extra: &str) -> PathBuf {
    write_config_listen(dir, tenants, &format!("{UNDERLAY_ADDR}:{PORT}"), extra)
}

/// Like `write_config_with`, with the WireGuard socket bound to `listen` (`public_endpoint` stays the IPv4
/// underlay address).
pub fn write_config_listen(
    dir: &Path,
    tenants: &[TenantSpec],
    listen: &str,
    extra: &str,
) -> PathBuf {
    write_config_at(dir, tenants, listen, UNDERLAY_ADDR, extra)
}

/// Like `write_config_listen`, with `public_endpoint` on `underlay` (a second node of a fleet).
pub fn write_config_at(
    dir: &Path,
    tenants: &[TenantSpec],
    listen: &str,
    underlay: &str,
    extra: &str,
) -> PathBuf {
    // `extra` may name its own admin listener.
    let admin = if extra.contains("admin_listen") {
        String::new()
    } else {
        format!("admin_listen = \"{ADMIN}\"\n")
    };
    let mut s = format!(
        "[gateway]\nlisten = \"{listen}\"\nprivate_key_file = \"gateway.key\"\n\
         state_dir = \"state\"\n{admin}public_endpoint = \"{underlay}:{PORT}\"\n{extra}\n"
    );
    // A value written as a TOML list is kept as is; anything else is a string.
    let value = |v: &str| {
        if v.trim_start().starts_with('[') {
            v.to_string()
        } else {
            format!("\"{v}\"")
        }
    };
    for t in tenants {
        s.push_str(&format!(
            "\n[[tenant]]\nid = \"{}\"\nname = \"{}\"\naddress_pool = {}\ngateway_address = {}\n",
            t.id,
            t.name,
            value(&t.pool),
            value(&t.gateway_address)
        ));
        s.push_str(&t.rules);
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, s).unwrap();
    path
}

/// The gateway: its config and (while running) its `rampart run` process.
pub struct Gateway {
    pub config: PathBuf,
    pub dir: PathBuf,
    ns: String,
    proc: Option<Proc>,
    starts: u32,
    /// A TUN device node bind-mounted over `/dev/net/tun` for the gateway only (a private mount namespace):
    /// lets an unprivileged gateway open it where the host's node is 0600.
    pub tun_node: Option<PathBuf>,
}

impl Gateway {
    pub fn new(config: PathBuf, dir: &Path, ns: &Netns) -> Gateway {
        Gateway {
            config,
            dir: dir.to_path_buf(),
            ns: ns.name().to_string(),
            proc: None,
            starts: 0,
            tun_node: None,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts `rampart run -c CONFIG` in the gateway namespace and waits until `/health`
    /// answers "ok" (panics with the gateway's log if it exits or times out).
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "gateway already running");
        self.starts += 1;
        let mut cmd = match &self.tun_node {
            None => Command::new("ip"),
            Some(node) => {
                // unshare and sh exec in place: the process is still the gateway's pid.
                let mut c = Command::new("unshare");
                c.args(["-m", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$0\" /dev/net/tun && exec ip \"$@\"")
                    .arg(node);
                c
            }
        };
        // RAMPART_E2E_BIN: another build of the gateway (benchmarks compare two builds in one setup).
        let bin = std::env::var("RAMPART_E2E_BIN").unwrap_or_else(|_| BIN.into());
        cmd.args(["netns", "exec", &self.ns, &bin, "run", "-c"])
            .arg(&self.config)
            .env(
                "RAMPART_LOG",
                std::env::var("RAMPART_E2E_LOG").unwrap_or_else(|_| "debug".into()),
            );
        let log = self.dir.join("gateway.log");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| {
                use std::io::Write;
                writeln!(f, "===== harness: gateway start #{} =====", self.starts)
            });
        self.proc = Some(Proc::spawn("gateway", cmd, &self.dir));
        let ready = poll_until(START_TIMEOUT, Duration::from_millis(100), || {
            self.assert_alive();
            self.health().then_some(())
        });
        if ready.is_none() {
            panic!(
                "gateway did not answer GET /health within {START_TIMEOUT:?}; log:\n{}",
                tail(&self.log(), 60)
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// Panics with the log if the gateway process has exited.
    pub fn assert_alive(&mut self) {
        let p = self.proc.as_mut().expect("gateway not started");
        if let Some(s) = p.exit_status() {
            panic!("gateway exited ({s}); log:\n{}", tail(&p.log(), 80));
        }
    }

    /// SIGKILL by PID (a crash, nothing is flushed).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait for the exit status (SIGKILL after `grace`, returning `None`).
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut p = self.proc.take()?;
        p.signal("TERM");
        let s = p.wait_timeout(grace);
        if s.is_none() {
            p.kill();
        }
        s
    }

    /// Waits up to `timeout` for the gateway to exit on its own; its exit status (`None`: still running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let s = self.proc.as_mut()?.wait_timeout(timeout)?;
        self.proc = None;
        Some(s)
    }

    /// Sends a signal (e.g. "HUP") to the running gateway.
    pub fn signal(&mut self, sig: &str) {
        if let Some(p) = self.proc.as_mut() {
            p.signal(sig);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// How the config file says the admin listener is reached: its URL base and, when `admin_token_file` is
    /// set (HTTPS), the token (read now, so a test may rotate it).
    pub fn admin(&self) -> (String, Option<String>) {
        let text = std::fs::read_to_string(&self.config).unwrap_or_default();
        let v: toml::Table = text.parse().unwrap_or_default();
        let g = v.get("gateway").and_then(|g| g.as_table());
        let get = |k: &str| g.and_then(|g| g.get(k)).and_then(|v| v.as_str());
        let listen = get("admin_listen").unwrap_or(ADMIN).to_string();
        match get("admin_token_file") {
            None => (format!("http://{listen}"), None),
            Some(f) => {
                let f = self.config.parent().unwrap().join(f);
                let token = std::fs::read_to_string(f).unwrap_or_default();
                (format!("https://{listen}"), Some(token.trim().to_string()))
            }
        }
    }

    /// `curl` arguments for `GET path` on the admin listener from the gateway namespace (the certificate is
    /// not checked here; tests that care pin it).
    fn admin_curl(&self, path: &str, extra: &[&str]) -> Command {
        let (base, token) = self.admin();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time", "5"])
            .args(extra);
        if let Some(t) = token {
            c.args(["-k", "-H", &format!("Authorization: Bearer {t}")]);
        }
        c.arg(format!("{base}{path}"));
        c
    }

    /// `curl` inside the gateway namespace; `None` unless HTTP 2xx.
    pub fn http_get(&self, path: &str) -> Option<String> {
        let r = run(&mut self.admin_curl(path, &["-f"]), Duration::from_secs(10));
        r.success().then_some(r.stdout)
    }

    /// The HTTP status `GET path` gets from the admin listener (`None`: no answer at all).
    pub fn http_status(&self, path: &str) -> Option<u16> {
        let r = run(
            &mut self.admin_curl(path, &["-o", "/dev/null", "-w", "%{http_code}"]),
            Duration::from_secs(10),
        );
        r.stdout.trim().parse().ok().filter(|c| *c != 0)
    }

    /// The namespace helper: the gateway's child process whose command line carries the helper
    /// marker (`None` while there is none, e.g. during a restart).
    pub fn helper_pid(&self) -> Option<u32> {
        let gateway = self.pid();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
            (ppid == gateway && cmd.contains("netns-helper")).then_some(pid)
        })
    }

    /// A `Command` for `program` inside the network namespace of the gateway's namespace helper (the
    /// upgrade TUN `up0` and the listener live there): read-only observation of the real thing.
    pub fn in_helper_ns(&self, program: &str) -> Command {
        let pid = self
            .helper_pid()
            .unwrap_or_else(|| panic!("no namespace helper; log:\n{}", tail(&self.log(), 40)));
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{pid}/ns/net")).arg(program);
        c
    }

    pub fn health(&self) -> bool {
        self.http_get("/health").is_some_and(|b| b.trim() == "ok")
    }

    pub fn metrics(&self) -> Metrics {
        let text = self
            .http_get("/metrics")
            .unwrap_or_else(|| panic!("GET /metrics failed; log:\n{}", tail(&self.log(), 40)));
        Metrics::parse(&text).unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e}"))
    }

    /// `rampart SUBCOMMAND... -c CONFIG ARGS...`, run in the root namespace (it only touches
    /// files and the control socket in the state dir, never the network).
    pub fn cli(&self, subcommand: &[&str], args: &[&str]) -> Ran {
        run(
            Command::new(BIN)
                .args(subcommand)
                .arg("-c")
                .arg(&self.config)
                .args(args),
            CLI_TIMEOUT,
        )
    }

    /// `rampart device add` and the parsed config it printed.
    pub fn device_add(&self, tenant: &str, name: &str, user: &str) -> ClientConfig {
        self.device_add_with(tenant, name, user, &[])
    }

    /// `device add` with more arguments (e.g. `--ssh-key FILE`).
    pub fn device_add_with(
        &self,
        tenant: &str,
        name: &str,
        user: &str,
        extra: &[&str],
    ) -> ClientConfig {
        let mut args = vec!["--tenant", tenant, "--name", name, "--user", user];
        args.extend_from_slice(extra);
        let out = self.cli(&["device", "add"], &args).expect_ok();
        ClientConfig::parse(&out).unwrap_or_else(|e| {
            panic!("`rampart device add` printed an unusable config ({e}):\n{out}")
        })
    }

    pub fn device_remove(&self, tenant: &str, name: &str) {
        self.cli(&["device", "remove"], &["--tenant", tenant, "--name", name])
            .expect_ok();
    }

    pub fn device_list_json(&self) -> serde_json::Value {
        let out = self.cli(&["device", "list"], &["--json"]).expect_ok();
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`device list --json` is not JSON ({e}):\n{out}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
    }
}
