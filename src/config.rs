//! Configuration: the TOML file as written (`RawConfig`, serde with `deny_unknown_fields`) and the validated
//! `Config` the rest of the gateway sees (newtypes, resolved paths, enrolled devices merged in).
//!
//! Every error names the file, the key and what to do. Validation never touches a running gateway: a reload
//! builds a new `Config` and only a valid one is swapped in.
#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::PeerKey;
use crate::registry::{EnrolledDevice, Registry};

/// The default configuration shipped with the gateway (`configs/gateway.toml`); `rampart init` writes it.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/gateway.toml");

/// Default WireGuard UDP listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:51820";
/// Default admin (metrics, health) listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8080";

// ---------------------------------------------------------------- raw (as written) ----------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: RawGateway,
    pub flows: Option<RawFlows>,
    pub audit: Option<RawAudit>,
    #[serde(default)]
    pub tenant: Vec<RawTenant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlows {
    pub max_flows: Option<u64>,
    pub tcp_established_timeout_secs: Option<u64>,
    pub tcp_transitory_timeout_secs: Option<u64>,
    pub udp_timeout_secs: Option<u64>,
    pub icmp_timeout_secs: Option<u64>,
    pub other_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<String>,
    pub queue: Option<u64>,
    pub commit_interval_ms: Option<u64>,
    pub on_overflow: Option<String>,
    pub on_failure: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub id: String,
    pub action: String,
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    pub dst: Option<Vec<String>>,
    pub proto: Option<String>,
    pub ports: Option<Vec<String>>,
    /// `inspect_ssh` only: off | best_effort | required.
    pub recording: Option<String>,
    /// `inspect_ssh` only: none | publickey.
    pub ssh_auth: Option<String>,
    /// `inspect_ssh` only: record typed input lines (heuristic).
    pub capture_input: Option<bool>,
    /// `inspect_ssh` only: allow `direct-tcpip` (ssh -L).
    pub allow_forwarding: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub listen: Option<String>,
    pub private_key_file: Option<String>,
    pub state_dir: Option<String>,
    pub admin_listen: Option<String>,
    pub public_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    pub name: Option<String>,
    pub address_pool: String,
    pub gateway_address: String,
    pub max_flows: Option<u64>,
    pub offramp: Option<Vec<String>>,
    /// Base64 X25519 public key (as ssh-log-cli writes it): recordings and sensitive audit fields are
    /// encrypted to it.
    pub audit_recipient: Option<String>,
    #[serde(default)]
    pub rule: Vec<RawRule>,
    #[serde(default)]
    pub device: Vec<RawDevice>,
    /// HTTP rules for `inspect_http` flows (`[[tenant.http_rule]]`), evaluated per request.
    #[serde(default)]
    pub http_rule: Vec<RawHttpRule>,
    /// Decrypt TLS on `inspect_http` flows with the tenant TLS CA (`rampart ca init --tenant T --tls`).
    pub tls_decrypt: Option<bool>,
    /// Hosts (exact or `*.suffix`) and CIDRs whose TLS is never decrypted (pinned apps, banks).
    pub do_not_inspect: Option<Vec<String>>,
    /// PEM file of extra CA certificates trusted for origins (besides the built-in web roots).
    pub tls_upstream_ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRule {
    pub id: String,
    pub action: String,
    pub hosts: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub methods: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    pub name: String,
    pub public_key: String,
    pub address: String,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

// ---------------------------------------------------------------- validated -----------------------------------

/// A tenant's id as written in the config (`[[tenant]] id`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(String);

/// A device's name, unique within its tenant.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceName(String);

/// The user a device belongs to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserName(String);

macro_rules! string_newtype {
    ($t:ident) => {
        #[allow(dead_code)]
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
    };
}
string_newtype!(TenantId);
string_newtype!(DeviceName);
string_newtype!(UserName);

fn valid_ident(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with(['-', '.'])
}

impl TenantId {
    pub fn parse(s: &str) -> Result<TenantId, String> {
        if valid_ident(s, 64) {
            Ok(TenantId(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is not a valid id: use 1-64 letters, digits, '-', '_' or '.', like \"acme\""
            ))
        }
    }
}

impl DeviceName {
    pub fn parse(s: &str) -> Result<DeviceName, String> {
        if valid_ident(s, 64) {
            Ok(DeviceName(s.to_string()))
        } else {
            Err(format!("{s:?} is not a valid device name: use 1-64 letters, digits, '-', '_' or '.', like \"alice-laptop\""))
        }
    }
}

impl UserName {
    pub fn parse(s: &str) -> Result<UserName, String> {
        if !s.is_empty()
            && s.len() <= 128
            && !s.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            Ok(UserName(s.to_string()))
        } else {
            Err(format!("{s:?} is not a valid user: use a non-empty name without spaces, like \"alice@acme.example\""))
        }
    }
}

/// Where a device was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOrigin {
    /// `[[tenant.device]]` in the config file.
    Config,
    /// `rampart device add`, kept in `state_dir`.
    Enrolled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub name: DeviceName,
    pub public_key: PeerKey,
    pub address: IpAddr,
    pub user: UserName,
    pub groups: Vec<String>,
    pub origin: DeviceOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub address_pool: IpNet,
    pub gateway_address: IpAddr,
    /// Most concurrent flows of this tenant (`None`: only the global limit applies).
    pub max_flows: Option<usize>,
    /// Upstream networks reached through the gateway host (allowed TCP/UDP flows are proxied with sockets).
    pub offramp: Vec<IpNet>,
    /// Reviewer public key (base64 X25519) that recordings and sensitive audit fields are encrypted to.
    pub audit_recipient: Option<String>,
    /// Ordered policy rules; the first match decides, no match denies.
    pub rules: Vec<Rule>,
    pub devices: Vec<Device>,
    /// HTTP rules and TLS settings for `inspect_http` flows.
    pub http: TenantHttp,
}

/// What an HTTP rule does with the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAction {
    Allow,
    /// Answer with the block page (403) naming the rule; the request never reaches the origin.
    Block,
    /// Allow, and mark the request's record with this rule.
    Log,
}

impl HttpAction {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpAction::Allow => "allow",
            HttpAction::Block => "block",
            HttpAction::Log => "log",
        }
    }
}

/// A host name pattern: `example.com` (exactly) or `*.example.com` (any name below it, not the name itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot (`.example.com`).
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (suffix, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        match (ok, suffix) {
            (true, true) => Ok(HostPattern::Suffix(format!(".{name}"))),
            (true, false) => Ok(HostPattern::Exact(name.to_string())),
            (false, _) => Err(format!(
                "{s:?} is not a host name pattern; write \"example.com\" or \"*.example.com\""
            )),
        }
    }

    /// `host` must already be lower case, without port or trailing dot.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

/// A `[[tenant.http_rule]]`, as validated. Every given list must match; an empty list matches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    pub id: String,
    pub action: HttpAction,
    pub hosts: Vec<HostPattern>,
    /// Path prefixes (each starts with `/`).
    pub paths: Vec<String>,
    /// Upper-case method names.
    pub methods: Vec<String>,
    pub users: Vec<UserName>,
    pub groups: Vec<String>,
    pub devices: Vec<DeviceName>,
}

/// An entry of `do_not_inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoInspect {
    Host(HostPattern),
    Net(IpNet),
}

/// A tenant's HTTP inspection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantHttp {
    /// Ordered; the first match decides, no match allows (the flow rule already allowed the flow).
    pub rules: Vec<HttpRule>,
    pub tls_decrypt: bool,
    pub do_not_inspect: Vec<NoInspect>,
    /// Extra CA certificates (PEM) trusted for origins.
    pub tls_upstream_ca: Option<PathBuf>,
}

/// What a rule does with the flows it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Forward at layer 3.
    Allow,
    /// Drop silently.
    Deny,
    /// Drop and tell the sender (TCP RST, ICMP administratively prohibited).
    Reject,
    /// Terminate at layer 4 and re-originate: the flow is upgraded to a kernel stream and spliced to its
    /// destination (upstream socket, or a stream downgraded towards the destination device).
    Proxy,
    /// Like `Proxy`, with the SSH inspector in the middle (command logging, session recording).
    InspectSsh,
    /// Like `Proxy`, with the HTTP inspector in the middle (request log, HTTP rules).
    InspectHttp,
}

impl Action {
    /// Whether flows with this action are carried at layer 4 (upgraded), wherever they go.
    pub fn is_layer4(self) -> bool {
        matches!(
            self,
            Action::Proxy | Action::InspectSsh | Action::InspectHttp
        )
    }
}

/// Recording of inspected SSH sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Recording {
    Off,
    /// Record when possible; a failing recorder does not stop the session.
    BestEffort,
    /// A session that cannot be recorded is refused or terminated (fail-closed).
    Required,
}

/// How the gateway authenticates the SSH client (always on top of the WireGuard identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SshAuth {
    None,
    Publickey,
}

/// Settings of an `inspect_ssh` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshRuleSettings {
    pub recording: Recording,
    pub auth: SshAuth,
    pub capture_input: bool,
    pub allow_forwarding: bool,
}

/// What sits between the two legs of a layer-4 flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspect {
    None,
    Ssh(SshRuleSettings),
    Http,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Reject => "reject",
            Action::Proxy => "proxy",
            Action::InspectSsh => "inspect_ssh",
            Action::InspectHttp => "inspect_http",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// A destination a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DstMatch {
    Net(IpNet),
    /// A device of the same tenant, by name (resolved to its address when policy is compiled).
    Device(DeviceName),
    /// The tenant's gateway address.
    Gateway,
}

/// A policy rule, as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub action: Action,
    /// Empty = anyone in the tenant (for each of users, groups, devices; all given lists must match).
    pub users: Vec<UserName>,
    pub groups: Vec<String>,
    pub devices: Vec<DeviceName>,
    /// `None` = anywhere.
    pub dst: Option<Vec<DstMatch>>,
    pub proto: Proto,
    /// Destination port ranges (inclusive); empty = any port.
    pub ports: Vec<(u16, u16)>,
    /// The inspector of `inspect_*` rules.
    pub inspect: Inspect,
}

/// Flow tracking settings (`[flows]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSettings {
    pub max_flows: usize,
    pub tcp_established_timeout: Duration,
    pub tcp_transitory_timeout: Duration,
    pub udp_timeout: Duration,
    pub icmp_timeout: Duration,
    pub other_timeout: Duration,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            max_flows: 1_000_000,
            tcp_established_timeout: Duration::from_secs(3600),
            tcp_transitory_timeout: Duration::from_secs(60),
            udp_timeout: Duration::from_secs(60),
            icmp_timeout: Duration::from_secs(30),
            other_timeout: Duration::from_secs(60),
        }
    }
}

/// What the data path does when the audit queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Keep forwarding; drop the record and count it.
    Drop,
    /// Refuse new flows until the queue drains (existing flows continue).
    BlockNewFlows,
}

/// What the gateway does while the audit store cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Keep forwarding; records are lost and counted.
    FailOpen,
    /// Refuse new flows until writes succeed again.
    FailClosed,
}

/// Audit store settings (`[audit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: PathBuf,
    pub queue: usize,
    pub commit_interval: Duration,
    pub on_overflow: OverflowPolicy,
    pub on_failure: FailurePolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub private_key_file: PathBuf,
    pub state_dir: PathBuf,
    pub admin_listen: SocketAddr,
    pub public_endpoint: Option<String>,
}

/// The validated configuration. Immutable; a reload builds a new one and swaps the `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this was loaded from (for messages).
    pub source: PathBuf,
    pub gateway: GatewaySettings,
    pub flows: FlowSettings,
    pub audit: AuditSettings,
    pub tenants: Vec<Tenant>,
}

/// A configuration problem: the file, the key (a dotted path such as `tenant[1].address_pool`) and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// All problems found in one pass, so an admin fixes them in one edit.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

struct Collector<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl Collector<'_> {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            key: key.into(),
            message: message.into(),
        });
    }
}

impl Config {
    /// Reads and validates `path` and merges the devices enrolled in its `state_dir`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                key: "(file)".into(),
                message: format!("cannot read: {e}; pass an existing file with -c, or create one with `rampart init`"),
            }])
        })?;
        let mut cfg = Config::from_toml(&text, path)?;
        let registry = Registry::open(&cfg.gateway.state_dir);
        let enrolled = registry.load().map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: registry.path().display().to_string(),
                key: "(file)".into(),
                message: format!("{e:#}; fix or move the file aside (it holds devices enrolled with `rampart device add`)"),
            }])
        })?;
        cfg.merge_enrolled(&enrolled, &registry.path().display().to_string())?;
        Ok(cfg)
    }

    /// Validates TOML text; relative paths resolve against `path`'s directory. Does not read `state_dir`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let key = e
                .span()
                .map(|s| line_of(text, s.start))
                .unwrap_or_else(|| "(syntax)".into());
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                key,
                message: format!(
                    "{}; see configs/gateway.toml for every supported key",
                    e.message().trim_end()
                ),
            }])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut c = Collector {
            file: &file,
            errors: Vec::new(),
        };
        let cfg = validate(raw, &base, path, &mut c);
        if c.errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(c.errors))
        }
    }

    fn merge_enrolled(
        &mut self,
        enrolled: &[EnrolledDevice],
        file: &str,
    ) -> Result<(), ConfigErrors> {
        let mut c = Collector {
            file,
            errors: Vec::new(),
        };
        for (i, d) in enrolled.iter().enumerate() {
            let key = format!("devices[{i}] ({}/{})", d.tenant, d.name);
            let Some(t) = self.tenants.iter_mut().find(|t| t.id == d.tenant) else {
                tracing::warn!(tenant = %d.tenant, device = %d.name, "enrolled device belongs to a tenant that is no longer configured; ignoring it");
                continue;
            };
            t.devices.push(Device {
                name: d.name.clone(),
                public_key: d.public_key,
                address: d.address,
                user: d.user.clone(),
                groups: d.groups.clone(),
                origin: DeviceOrigin::Enrolled,
            });
            check_tenant_devices(t, &mut c, &key);
        }
        check_unique_keys(&self.tenants, &mut c);
        if c.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(c.errors))
        }
    }

    pub fn tenant(&self, id: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.id.as_str() == id)
    }

    pub fn device_count(&self) -> usize {
        self.tenants.iter().map(|t| t.devices.len()).sum()
    }

    /// Settings that a reload cannot change on a running gateway (they need a restart).
    pub fn restart_only_differences(&self, new: &Config) -> Vec<&'static str> {
        let (a, b) = (&self.gateway, &new.gateway);
        let mut out = Vec::new();
        if a.listen != b.listen {
            out.push("gateway.listen");
        }
        if a.admin_listen != b.admin_listen {
            out.push("gateway.admin_listen");
        }
        if a.private_key_file != b.private_key_file {
            out.push("gateway.private_key_file");
        }
        if a.state_dir != b.state_dir {
            out.push("gateway.state_dir");
        }
        if self.audit != new.audit {
            out.push("audit");
        }
        if self.flows.max_flows != new.flows.max_flows {
            out.push("flows.max_flows");
        }
        out
    }
}

fn line_of(text: &str, offset: usize) -> String {
    let line = text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1;
    format!("line {line}")
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn validate(raw: RawConfig, base: &Path, path: &Path, c: &mut Collector<'_>) -> Config {
    let g = raw.gateway;
    let listen = parse_socket(
        c,
        "gateway.listen",
        g.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        "0.0.0.0:51820",
    );
    let admin_listen = parse_socket(
        c,
        "gateway.admin_listen",
        g.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        "127.0.0.1:8080",
    );
    let Some(state_dir) = g.state_dir.as_deref() else {
        c.push(
            "gateway.state_dir",
            "missing; add `state_dir = \"/var/lib/rampart\"` (where enrolled devices are kept)",
        );
        return empty(path);
    };
    let state_dir = resolve(base, state_dir);
    let private_key_file = match g.private_key_file.as_deref() {
        Some(p) => resolve(base, p),
        None => state_dir.join("gateway.key"),
    };
    if let Some(ep) = &g.public_endpoint {
        if !valid_endpoint(ep) {
            c.push(
                "gateway.public_endpoint",
                format!("{ep:?} is not HOST:PORT; write the address clients reach, like \"vpn.example.com:51820\""),
            );
        }
    }

    let flows = validate_flows(raw.flows, c);
    let audit = validate_audit(raw.audit, &state_dir, base, c);
    let mut tenants = Vec::new();
    let mut ids = HashSet::new();
    for (i, rt) in raw.tenant.into_iter().enumerate() {
        let key = format!("tenant[{i}]");
        let id = match TenantId::parse(&rt.id) {
            Ok(id) => id,
            Err(m) => {
                c.push(format!("{key}.id"), m);
                continue;
            }
        };
        let key = format!("tenant[{i}] ({id})");
        if !ids.insert(id.clone()) {
            c.push(
                format!("{key}.id"),
                "duplicate tenant id; give every [[tenant]] its own id",
            );
            continue;
        }
        let Ok(pool) = rt.address_pool.parse::<IpNet>() else {
            c.push(
                format!("{key}.address_pool"),
                format!(
                    "{:?} is not a CIDR; write it like \"100.96.0.0/24\"",
                    rt.address_pool
                ),
            );
            continue;
        };
        let pool = pool.trunc();
        let Ok(gw) = rt.gateway_address.parse::<IpAddr>() else {
            c.push(
                format!("{key}.gateway_address"),
                format!(
                    "{:?} is not an IP address; write it like \"100.96.0.1\"",
                    rt.gateway_address
                ),
            );
            continue;
        };
        if !pool.contains(&gw) {
            c.push(
                format!("{key}.gateway_address"),
                format!("{gw} is outside address_pool {pool}; pick an address inside the pool (usually its first)"),
            );
        }
        let mut offramp = Vec::new();
        for n in rt.offramp.unwrap_or_default() {
            match n.parse::<IpNet>() {
                Ok(net) => offramp.push(net.trunc()),
                Err(_) => c.push(
                    format!("{key}.offramp"),
                    format!("{n:?} is not a CIDR; write it like \"0.0.0.0/0\" or \"10.9.0.0/16\""),
                ),
            }
        }
        if !offramp.is_empty() && !crate::OFFRAMP_AVAILABLE {
            c.push(
                format!("{key}.offramp"),
                "off-ramp routing to upstream networks is not available in this build (it needs the layer-4 \
                 upgrade path); remove the key",
            );
        }
        let audit_recipient = rt.audit_recipient.filter(|r| {
            let ok = crate::audit::capture::RecipientKey::from_base64(r).is_ok();
            if !ok {
                c.push(
                    format!("{key}.audit_recipient"),
                    "is not a base64 X25519 public key; paste the public key `rampart audit keygen` printed",
                );
            }
            ok
        });
        let max_flows = rt.max_flows.map(|n| n as usize);
        if max_flows == Some(0) {
            c.push(
                format!("{key}.max_flows"),
                "must be at least 1 (omit it for no per-tenant limit)",
            );
        }
        let mut rule_ids = HashSet::new();
        let mut rules = Vec::new();
        for (j, rr) in rt.rule.into_iter().enumerate() {
            let rkey = format!("{key}.rule[{j}]");
            if !rule_ids.insert(rr.id.clone()) {
                c.push(
                    format!("{rkey}.id"),
                    format!(
                        "duplicate rule id {:?}; rule ids are unique per tenant",
                        rr.id
                    ),
                );
            }
            if let Some(r) = validate_rule(rr, &rkey, c) {
                rules.push(r);
            }
        }
        let http = validate_tenant_http(
            rt.http_rule,
            rt.tls_decrypt,
            rt.do_not_inspect,
            rt.tls_upstream_ca,
            base,
            &key,
            c,
        );
        let mut tenant = Tenant {
            name: rt.name.unwrap_or_else(|| id.to_string()),
            id,
            address_pool: pool,
            gateway_address: gw,
            max_flows,
            offramp,
            audit_recipient,
            rules,
            devices: Vec::new(),
            http,
        };
        for (j, rd) in rt.device.into_iter().enumerate() {
            let dkey = format!("{key}.device[{j}]");
            if let Some(d) = validate_device(rd, &dkey, c) {
                tenant.devices.push(d);
                check_tenant_devices(&tenant, c, &dkey);
            }
        }
        tenants.push(tenant);
    }
    check_unique_keys(&tenants, c);
    Config {
        source: path.to_path_buf(),
        gateway: GatewaySettings {
            listen,
            private_key_file,
            state_dir,
            admin_listen,
            public_endpoint: g.public_endpoint,
        },
        flows,
        audit,
        tenants,
    }
}

fn validate_flows(raw: Option<RawFlows>, c: &mut Collector<'_>) -> FlowSettings {
    let d = FlowSettings::default();
    let Some(r) = raw else { return d };
    let mut secs = |key: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => {
            c.push(format!("flows.{key}"), "must be at least 1 second");
            default
        }
        Some(n) => Duration::from_secs(n),
        None => default,
    };
    let s = FlowSettings {
        max_flows: d.max_flows,
        tcp_established_timeout: secs(
            "tcp_established_timeout_secs",
            r.tcp_established_timeout_secs,
            d.tcp_established_timeout,
        ),
        tcp_transitory_timeout: secs(
            "tcp_transitory_timeout_secs",
            r.tcp_transitory_timeout_secs,
            d.tcp_transitory_timeout,
        ),
        udp_timeout: secs("udp_timeout_secs", r.udp_timeout_secs, d.udp_timeout),
        icmp_timeout: secs("icmp_timeout_secs", r.icmp_timeout_secs, d.icmp_timeout),
        other_timeout: secs("other_timeout_secs", r.other_timeout_secs, d.other_timeout),
    };
    match r.max_flows {
        Some(0) => {
            c.push("flows.max_flows", "must be at least 1");
            s
        }
        Some(n) if n > u64::from(u32::MAX) => {
            c.push(
                "flows.max_flows",
                format!("{n} is too large; at most {}", u32::MAX),
            );
            s
        }
        Some(n) => FlowSettings {
            max_flows: n as usize,
            ..s
        },
        None => s,
    }
}

fn validate_audit(
    raw: Option<RawAudit>,
    state_dir: &Path,
    base: &Path,
    c: &mut Collector<'_>,
) -> AuditSettings {
    let r = raw.unwrap_or(RawAudit {
        path: None,
        queue: None,
        commit_interval_ms: None,
        on_overflow: None,
        on_failure: None,
    });
    let on_overflow = match r.on_overflow.as_deref() {
        None | Some("drop") => OverflowPolicy::Drop,
        Some("block_new_flows") => OverflowPolicy::BlockNewFlows,
        Some(o) => {
            c.push(
                "audit.on_overflow",
                format!("{o:?} is not a policy; use \"drop\" or \"block_new_flows\""),
            );
            OverflowPolicy::Drop
        }
    };
    let on_failure = match r.on_failure.as_deref() {
        None | Some("fail_open") => FailurePolicy::FailOpen,
        Some("fail_closed") => FailurePolicy::FailClosed,
        Some(o) => {
            c.push(
                "audit.on_failure",
                format!("{o:?} is not a policy; use \"fail_open\" or \"fail_closed\""),
            );
            FailurePolicy::FailOpen
        }
    };
    let queue = match r.queue {
        Some(n) if !(16..=10_000_000).contains(&n) => {
            c.push(
                "audit.queue",
                format!("{n} is out of range; use 16..=10000000 records"),
            );
            65_536
        }
        Some(n) => n as usize,
        None => 65_536,
    };
    let commit_interval = match r.commit_interval_ms {
        Some(n) if !(1..=60_000).contains(&n) => {
            c.push(
                "audit.commit_interval_ms",
                format!("{n} is out of range; use 1..=60000 (milliseconds)"),
            );
            Duration::from_millis(250)
        }
        Some(n) => Duration::from_millis(n),
        None => Duration::from_millis(250),
    };
    AuditSettings {
        path: r
            .path
            .as_deref()
            .map(|p| resolve(base, p))
            .unwrap_or_else(|| state_dir.join("audit.db")),
        queue,
        commit_interval,
        on_overflow,
        on_failure,
    }
}

/// The identity part of a rule (`users`, `groups`, `devices`), shared by flow and HTTP rules.
fn validate_identity(
    users: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    devices: Option<Vec<String>>,
    key: &str,
    c: &mut Collector<'_>,
) -> (Vec<UserName>, Vec<String>, Vec<DeviceName>) {
    let users = users
        .unwrap_or_default()
        .iter()
        .filter_map(|u| {
            UserName::parse(u)
                .map_err(|m| c.push(format!("{key}.users"), m))
                .ok()
        })
        .collect();
    let devices = devices
        .unwrap_or_default()
        .iter()
        .filter_map(|d| {
            DeviceName::parse(d)
                .map_err(|m| c.push(format!("{key}.devices"), m))
                .ok()
        })
        .collect();
    let groups = groups.unwrap_or_default();
    for g in &groups {
        if !valid_ident(g, 64) {
            c.push(
                format!("{key}.groups"),
                format!("{g:?} is not a valid group name"),
            );
        }
    }
    (users, groups, devices)
}

fn validate_rule(r: RawRule, key: &str, c: &mut Collector<'_>) -> Option<Rule> {
    let n = c.errors.len();
    if !valid_ident(&r.id, 64) {
        c.push(format!("{key}.id"), format!("{:?} is not a valid rule id: use letters, digits, '-', '_' or '.', like \"eng-ssh\"", r.id));
    }
    let action = match r.action.as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        "reject" => Some(Action::Reject),
        "proxy" => Some(Action::Proxy),
        "inspect_ssh" if crate::SSH_INSPECTION_AVAILABLE => Some(Action::InspectSsh),
        "inspect_http" if crate::HTTP_INSPECTION_AVAILABLE => Some(Action::InspectHttp),
        "inspect_ssh" | "inspect_http" => {
            c.push(
                format!("{key}.action"),
                format!(
                    "{:?} is not available in this version yet; use \"proxy\" to carry the flow at layer 4, or \
                     \"allow\", \"deny\", \"reject\"",
                    r.action
                ),
            );
            None
        }
        other => {
            c.push(format!("{key}.action"), format!("{other:?} is not an action; use allow, deny, reject, proxy, inspect_ssh or inspect_http"));
            None
        }
    };
    let (users, groups, devices) = validate_identity(r.users, r.groups, r.devices, key, c);
    let dst = r.dst.map(|list| {
        list.iter()
            .filter_map(|d| {
                if d == "gateway" {
                    Some(DstMatch::Gateway)
                } else if d.contains('/') || d.parse::<IpAddr>().is_ok() {
                    let net = d
                        .parse::<IpNet>()
                        .or_else(|_| d.parse::<IpAddr>().map(IpNet::from));
                    net.map(|n| DstMatch::Net(n.trunc()))
                        .map_err(|_| {
                            c.push(
                                format!("{key}.dst"),
                                format!("{d:?} is not a CIDR; write it like \"10.1.0.0/16\""),
                            )
                        })
                        .ok()
                } else {
                    DeviceName::parse(d)
                        .map(DstMatch::Device)
                        .map_err(|_| {
                            c.push(
                                format!("{key}.dst"),
                                format!("{d:?} is neither a CIDR, a device name nor \"gateway\""),
                            )
                        })
                        .ok()
                }
            })
            .collect()
    });
    let proto = match r.proto.as_deref() {
        None | Some("any") => Proto::Any,
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        Some("icmp") => Proto::Icmp,
        Some(p) => {
            c.push(
                format!("{key}.proto"),
                format!("{p:?} is not a protocol; use tcp, udp, icmp or any"),
            );
            Proto::Any
        }
    };
    let mut ports = Vec::new();
    for p in r.ports.unwrap_or_default() {
        let range = match p.split_once('-') {
            Some((a, b)) => a
                .trim()
                .parse::<u16>()
                .ok()
                .zip(b.trim().parse::<u16>().ok()),
            None => p.trim().parse::<u16>().ok().map(|v| (v, v)),
        };
        match range {
            Some((a, b)) if a <= b => ports.push((a, b)),
            _ => c.push(
                format!("{key}.ports"),
                format!("{p:?} is not a port or range; write \"22\" or \"8000-8100\""),
            ),
        }
    }
    if !ports.is_empty() && !matches!(proto, Proto::Tcp | Proto::Udp) {
        c.push(
            format!("{key}.ports"),
            "ports need proto = \"tcp\" or \"udp\"",
        );
    }
    if c.errors.len() != n {
        return None;
    }
    let action = action?;
    let inspect = validate_inspect(
        action,
        &r.recording,
        &r.ssh_auth,
        r.capture_input,
        r.allow_forwarding,
        key,
        c,
    )?;
    Some(Rule {
        id: r.id,
        action,
        users,
        groups,
        devices,
        dst,
        proto,
        ports,
        inspect,
    })
}

/// The `inspect_ssh` keys: only on `inspect_ssh` rules, with defaults (recording required, client auth none).
fn validate_inspect(
    action: Action,
    recording: &Option<String>,
    ssh_auth: &Option<String>,
    capture_input: Option<bool>,
    allow_forwarding: Option<bool>,
    key: &str,
    c: &mut Collector<'_>,
) -> Option<Inspect> {
    if action != Action::InspectSsh {
        let given = [
            ("recording", recording.is_some()),
            ("ssh_auth", ssh_auth.is_some()),
            ("capture_input", capture_input.is_some()),
            ("allow_forwarding", allow_forwarding.is_some()),
        ];
        for (k, _) in given.iter().filter(|(_, g)| *g) {
            c.push(
                format!("{key}.{k}"),
                "only applies to action = \"inspect_ssh\"; remove it or change the action",
            );
        }
        return Some(if action == Action::InspectHttp {
            Inspect::Http
        } else {
            Inspect::None
        });
    }
    let recording = match recording.as_deref() {
        None | Some("required") => Recording::Required,
        Some("best_effort") => Recording::BestEffort,
        Some("off") => Recording::Off,
        Some(o) => {
            c.push(
                format!("{key}.recording"),
                format!(
                    "{o:?} is not a recording mode; use \"off\", \"best_effort\" or \"required\""
                ),
            );
            return None;
        }
    };
    let auth = match ssh_auth.as_deref() {
        None | Some("none") => SshAuth::None,
        Some("publickey") => SshAuth::Publickey,
        Some(o) => {
            c.push(
                format!("{key}.ssh_auth"),
                format!("{o:?} is not an SSH client authentication; use \"none\" or \"publickey\""),
            );
            return None;
        }
    };
    Some(Inspect::Ssh(SshRuleSettings {
        recording,
        auth,
        capture_input: capture_input.unwrap_or(false),
        allow_forwarding: allow_forwarding.unwrap_or(false),
    }))
}

/// The HTTP keys of a `[[tenant]]`: `http_rule`, `tls_decrypt`, `do_not_inspect`, `tls_upstream_ca`.
fn validate_tenant_http(
    raw_rules: Vec<RawHttpRule>,
    tls_decrypt: Option<bool>,
    do_not_inspect: Option<Vec<String>>,
    tls_upstream_ca: Option<String>,
    base: &Path,
    key: &str,
    c: &mut Collector<'_>,
) -> TenantHttp {
    let mut ids = HashSet::new();
    let mut rules = Vec::new();
    for (j, r) in raw_rules.into_iter().enumerate() {
        let rkey = format!("{key}.http_rule[{j}]");
        let n = c.errors.len();
        if !valid_ident(&r.id, 64) {
            c.push(
                format!("{rkey}.id"),
                format!(
                    "{:?} is not a valid rule id: use 1-64 letters, digits, '-', '_' or '.'",
                    r.id
                ),
            );
        } else if !ids.insert(r.id.clone()) {
            c.push(
                format!("{rkey}.id"),
                format!(
                    "duplicate http_rule id {:?}; ids are unique per tenant",
                    r.id
                ),
            );
        }
        let action = match r.action.as_str() {
            "allow" => HttpAction::Allow,
            "block" => HttpAction::Block,
            "log" => HttpAction::Log,
            other => {
                c.push(
                    format!("{rkey}.action"),
                    format!(
                        "{other:?} is not an HTTP rule action; use \"allow\", \"block\" or \"log\""
                    ),
                );
                HttpAction::Allow
            }
        };
        let hosts = r
            .hosts
            .unwrap_or_default()
            .iter()
            .filter_map(|h| {
                HostPattern::parse(h)
                    .map_err(|m| c.push(format!("{rkey}.hosts"), m))
                    .ok()
            })
            .collect();
        let paths = r.paths.unwrap_or_default();
        for p in &paths {
            if !p.starts_with('/') || p.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
                c.push(
                    format!("{rkey}.paths"),
                    format!("{p:?} is not a path prefix; write it like \"/admin\""),
                );
            }
        }
        let methods: Vec<String> = r
            .methods
            .unwrap_or_default()
            .iter()
            .map(|m| m.to_ascii_uppercase())
            .collect();
        for m in &methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                c.push(
                    format!("{rkey}.methods"),
                    format!("{m:?} is not an HTTP method; write it like \"POST\""),
                );
            }
        }
        let (users, groups, devices) = validate_identity(r.users, r.groups, r.devices, &rkey, c);
        if c.errors.len() == n {
            rules.push(HttpRule {
                id: r.id,
                action,
                hosts,
                paths,
                methods,
                users,
                groups,
                devices,
            });
        }
    }
    let mut no_inspect = Vec::new();
    for entry in do_not_inspect.unwrap_or_default() {
        if let Ok(net) = entry.parse::<IpNet>() {
            no_inspect.push(NoInspect::Net(net.trunc()));
        } else if let Ok(ip) = entry.parse::<IpAddr>() {
            no_inspect.push(NoInspect::Net(IpNet::from(ip)));
        } else {
            match HostPattern::parse(&entry) {
                Ok(h) => no_inspect.push(NoInspect::Host(h)),
                Err(_) => c.push(
                    format!("{key}.do_not_inspect"),
                    format!("{entry:?} is neither a host name (\"bank.example\", \"*.bank.example\") nor a CIDR (\"10.9.0.0/16\")"),
                ),
            }
        }
    }
    let tls_upstream_ca = tls_upstream_ca.map(|p| resolve(base, &p));
    if let Some(p) = &tls_upstream_ca {
        if !p.is_file() {
            c.push(
                format!("{key}.tls_upstream_ca"),
                format!(
                    "{} does not exist; point it at a PEM file of CA certificates",
                    p.display()
                ),
            );
        }
    }
    TenantHttp {
        rules,
        tls_decrypt: tls_decrypt.unwrap_or(false),
        do_not_inspect: no_inspect,
        tls_upstream_ca,
    }
}

fn empty(path: &Path) -> Config {
    Config {
        source: path.to_path_buf(),
        flows: FlowSettings::default(),
        audit: validate_audit(
            None,
            Path::new(""),
            Path::new(""),
            &mut Collector {
                file: "",
                errors: Vec::new(),
            },
        ),
        gateway: GatewaySettings {
            listen: DEFAULT_LISTEN.parse().expect("valid default"),
            private_key_file: PathBuf::new(),
            state_dir: PathBuf::new(),
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().expect("valid default"),
            public_endpoint: None,
        },
        tenants: Vec::new(),
    }
}

fn valid_endpoint(ep: &str) -> bool {
    match ep.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

fn parse_socket(c: &mut Collector<'_>, key: &str, v: &str, example: &str) -> SocketAddr {
    v.parse().unwrap_or_else(|_| {
        c.push(
            key,
            format!("{v:?} is not IP:PORT; write it like \"{example}\""),
        );
        example.parse().expect("valid example")
    })
}

fn validate_device(rd: RawDevice, key: &str, c: &mut Collector<'_>) -> Option<Device> {
    let name = DeviceName::parse(&rd.name)
        .map_err(|m| c.push(format!("{key}.name"), m))
        .ok();
    let public_key = rd
        .public_key
        .parse::<PeerKey>()
        .map_err(|e| {
            c.push(
                format!("{key}.public_key"),
                format!("{e}; paste the output of `wg pubkey`"),
            )
        })
        .ok();
    let address = rd
        .address
        .parse::<IpAddr>()
        .map_err(|_| {
            c.push(
                format!("{key}.address"),
                format!(
                    "{:?} is not an IP address; write it like \"100.96.0.2\"",
                    rd.address
                ),
            )
        })
        .ok();
    let user = UserName::parse(&rd.user)
        .map_err(|m| c.push(format!("{key}.user"), m))
        .ok();
    for g in &rd.groups {
        if !valid_ident(g, 64) {
            c.push(
                format!("{key}.groups"),
                format!("{g:?} is not a valid group name: use letters, digits, '-', '_' or '.'"),
            );
        }
    }
    Some(Device {
        name: name?,
        public_key: public_key?,
        address: address?,
        user: user?,
        groups: rd.groups,
        origin: DeviceOrigin::Config,
    })
}

/// Checks the newest device of `t` against the others: pool membership, unique name and address.
fn check_tenant_devices(t: &Tenant, c: &mut Collector<'_>, key: &str) {
    let Some((d, others)) = t.devices.split_last() else {
        return;
    };
    if !t.address_pool.contains(&d.address) {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is outside the tenant's address_pool {}; use an address inside the pool",
                d.address, t.address_pool
            ),
        );
    }
    if d.address == t.gateway_address {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is the tenant's gateway_address; pick another",
                d.address
            ),
        );
    }
    if others.iter().any(|o| o.name == d.name) {
        c.push(
            format!("{key}.name"),
            format!(
                "device name {:?} is already used in tenant {}; names are unique per tenant",
                d.name.0, t.id
            ),
        );
    }
    if let Some(o) = others.iter().find(|o| o.address == d.address) {
        c.push(
            format!("{key}.address"),
            format!(
                "{} is already assigned to device {:?}; give each device its own address",
                d.address, o.name.0
            ),
        );
    }
}

fn check_unique_keys(tenants: &[Tenant], c: &mut Collector<'_>) {
    let mut seen: HashMap<PeerKey, (&TenantId, &DeviceName)> = HashMap::new();
    for t in tenants {
        for d in &t.devices {
            if let Some((ot, od)) = seen.insert(d.public_key, (&t.id, &d.name)) {
                c.push(
                    format!("tenant {} device {}", t.id, d.name),
                    format!("public_key is also used by device {od} of tenant {ot}; every device needs its own key pair"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:51820"
state_dir = "state"

[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"

[[tenant.device]]
name = "laptop"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
address = "100.96.0.2"
user = "alice"
groups = ["eng"]

[[tenant]]
id = "globex"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
"#;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Path::new("/etc/rampart/gateway.toml"))
    }

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.gateway.state_dir, Path::new("/etc/rampart/state"));
        assert_eq!(
            c.gateway.private_key_file,
            Path::new("/etc/rampart/state/gateway.key")
        );
        assert_eq!(c.gateway.admin_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.tenants.len(), 2);
        assert_eq!(c.tenants[0].devices[0].user.as_str(), "alice");
    }

    #[test]
    fn embedded_default_config_is_valid() {
        let c = load(DEFAULT_CONFIG).unwrap();
        assert!(!c.tenants.is_empty());
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let err = load(&GOOD.replace("listen =", "lisen ="))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/etc/rampart/gateway.toml: line 3"), "{err}");
        assert!(err.contains("unknown field `lisen`"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_fix() {
        let text = GOOD.replace(
            "100.96.0.0/24\"\ngateway_address = \"100.96.0.1\"\n\n[[tenant.device]]",
            "100.96.0.0/33\"\ngateway_address = \"100.96.0.1\"\n\n[[tenant.device]]",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("tenant[0] (acme).address_pool"), "{err}");
        assert!(err.contains("write it like"), "{err}");
    }

    #[test]
    fn all_problems_reported_at_once() {
        let text = GOOD
            .replace("listen = \"127.0.0.1:51820\"", "listen = \"nowhere\"")
            .replace("user = \"alice\"", "user = \"\"");
        let err = load(&text).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn duplicate_device_key_across_tenants_is_rejected() {
        let text = format!(
            "{GOOD}\n[[tenant.device]]\nname = \"x\"\npublic_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\naddress = \"100.96.0.9\"\nuser = \"bob\"\n"
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("every device needs its own key pair"), "{err}");
    }

    #[test]
    fn ssh_keys_only_on_inspect_ssh_rules_and_recipient_checked() {
        let text = GOOD.replace(
            "[[tenant.device]]",
            "audit_recipient = \"not-a-key\"\n[[tenant.rule]]\nid = \"r\"\naction = \"allow\"\nrecording = \"off\"\n[[tenant.device]]",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("rule[0].recording: only applies to action = \"inspect_ssh\""),
            "{err}"
        );
        assert!(
            err.contains("audit_recipient: is not a base64 X25519 public key"),
            "{err}"
        );
        if !crate::SSH_INSPECTION_AVAILABLE {
            let text = GOOD.replace(
                "[[tenant.device]]",
                "[[tenant.rule]]\nid = \"s\"\naction = \"inspect_ssh\"\n[[tenant.device]]",
            );
            assert!(load(&text)
                .unwrap_err()
                .to_string()
                .contains("not available in this version yet"));
        }
    }

    #[test]
    fn http_rules_and_tls_keys_are_validated() {
        let good = GOOD.replace(
            "[[tenant.device]]",
            "tls_decrypt = true\ndo_not_inspect = [\"bank.example\", \"*.pinned.example\", \"10.9.0.0/16\"]\n\
             [[tenant.http_rule]]\nid = \"no-admin\"\naction = \"block\"\nhosts = [\"*.Example.com\"]\n\
             paths = [\"/admin\"]\nmethods = [\"post\"]\ngroups = [\"eng\"]\n[[tenant.device]]",
        );
        let c = load(&good).unwrap();
        let h = &c.tenants[0].http;
        assert!(h.tls_decrypt);
        assert_eq!(h.do_not_inspect.len(), 3);
        assert_eq!(h.rules[0].methods, ["POST"]);
        assert_eq!(
            h.rules[0].hosts,
            [HostPattern::Suffix(".example.com".into())]
        );
        assert!(h.rules[0].hosts[0].matches("a.example.com"));
        assert!(!h.rules[0].hosts[0].matches("example.com"));
        let bad = GOOD.replace(
            "[[tenant.device]]",
            "do_not_inspect = [\"not a host\"]\ntls_upstream_ca = \"/nonexistent/ca.pem\"\n\
             [[tenant.http_rule]]\nid = \"x\"\naction = \"deny\"\npaths = [\"admin\"]\n[[tenant.device]]",
        );
        let err = load(&bad).unwrap_err().to_string();
        for want in [
            "tenant[0] (acme).http_rule[0].action: \"deny\" is not an HTTP rule action",
            "http_rule[0].paths: \"admin\" is not a path prefix",
            "do_not_inspect: \"not a host\" is neither a host name",
            "tls_upstream_ca: /nonexistent/ca.pem does not exist",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
        let unknown = GOOD.replace(
            "[[tenant.device]]",
            "[[tenant.http_rule]]\nid = \"x\"\naction = \"allow\"\nhost = [\"a\"]\n[[tenant.device]]",
        );
        let err = load(&unknown).unwrap_err().to_string();
        assert!(err.contains("unknown field `host`"), "{err}");
    }

    #[test]
    fn duplicate_tenant_id_is_rejected() {
        let err = load(&GOOD.replace("id = \"globex\"", "id = \"acme\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate tenant id"), "{err}");
    }
}
