//! The validated configuration model the rest of the gateway sees: newtypes, resolved references, enums.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use super::{DeviceName, SshClientKey, TenantId, UserName};
use crate::keys::PeerKey;

/// Where a device was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceOrigin {
    /// `[[tenant.device]]` in the config file.
    Config,
    /// `rampart device add`, kept in `state_dir`.
    Enrolled,
    /// Enrolled itself with a token (`rampart enroll`, `POST /v1/enroll`), kept in `state_dir/enroll.db`.
    Token,
    /// Enrolled on another node of the fleet (`[fleet]`), known from the fleet's shared state.
    Fleet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Device {
    pub name: DeviceName,
    pub public_key: PeerKey,
    /// The device's address in the tenant's (first) pool.
    pub address: IpAddr,
    /// Its IPv6 address in a dual-stack tenant's second pool.
    pub address_v6: Option<IpAddr>,
    pub user: UserName,
    pub groups: Vec<String>,
    /// SSH client keys accepted from this device under `ssh_auth = "publickey"`.
    pub ssh_keys: Vec<SshClientKey>,
    pub origin: DeviceOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    /// The tenant's pool: the IPv4 one of a dual-stack tenant, else its only one.
    pub address_pool: IpNet,
    pub gateway_address: IpAddr,
    /// A dual-stack tenant's IPv6 pool and the gateway's address in it.
    pub address_pool_v6: Option<IpNet>,
    pub gateway_address_v6: Option<IpAddr>,
    /// Most concurrent flows of this tenant (`None`: only the global limit applies).
    pub max_flows: Option<usize>,
    /// Upstream networks reached through the gateway host (allowed TCP/UDP flows are proxied with sockets).
    pub offramp: Vec<IpNet>,
    /// Where the off-ramp's sockets for this tenant leave the appliance.
    pub egress: Egress,
    /// Appliance `host:port`s this tenant may reach through the off-ramp (explicit opt-in).
    pub offramp_allow_local: Vec<SocketAddr>,
    /// Inner networks of the tenant's on-ramps (`[[onramp.seqpacket.tenant]] prefixes`,
    /// `[[onramp.gue.site]] inner_prefixes`): devices route them into the tunnel.
    pub onramp_prefixes: Vec<IpNet>,
    /// Reviewer public key (base64 X25519) that recordings and sensitive audit fields are encrypted to.
    pub audit_recipient: Option<String>,
    /// Ordered policy rules; the first match decides, no match denies.
    pub rules: Vec<Rule>,
    pub devices: Vec<Device>,
    /// HTTP rules and TLS settings for `inspect_http` flows.
    pub http: TenantHttp,
}

/// Where a tenant's off-ramp sockets leave: created inside `netns` (a network namespace file such as
/// `/run/netns/acme`), bound to `interface` (SO_BINDTODEVICE) and marked with `fwmark` (SO_MARK, for policy
/// routing). All unset: the appliance's own namespace and main routing table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Egress {
    pub netns: Option<PathBuf>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

impl Egress {
    pub fn is_host(&self) -> bool {
        *self == Egress::default()
    }
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
    /// Path prefixes (each starts with `/`; in lower case when `case_insensitive`).
    pub paths: Vec<String>,
    /// Match `paths` ignoring ASCII case (for origins such as IIS that do).
    pub case_insensitive: bool,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantHttp {
    /// Ordered; the first match decides, no match allows (the flow rule already allowed the flow).
    pub rules: Vec<HttpRule>,
    pub tls_decrypt: bool,
    pub do_not_inspect: Vec<NoInspect>,
    /// Extra CA certificates (PEM) trusted for origins.
    pub tls_upstream_ca: Option<PathBuf>,
    /// With `tls_decrypt`: ALPN protocol names (not HTTP) whose connections are relayed without decryption;
    /// a ClientHello offering only other non-HTTP protocols is refused.
    pub passthrough_alpn: Vec<String>,
    /// Lower-case `Upgrade` protocol names that may switch a connection into a tunnel (never `h2c`).
    pub allow_upgrade: Vec<String>,
}

impl TenantHttp {
    /// Whether any HTTP rule names hosts (then TLS without a usable server name is refused).
    pub fn names_hosts(&self) -> bool {
        self.rules.iter().any(|r| !r.hosts.is_empty())
    }
}

impl Default for TenantHttp {
    fn default() -> TenantHttp {
        TenantHttp {
            rules: Vec::new(),
            tls_decrypt: false,
            do_not_inspect: Vec::new(),
            tls_upstream_ca: None,
            passthrough_alpn: Vec::new(),
            allow_upgrade: vec![DEFAULT_UPGRADE.to_string()],
        }
    }
}

/// The protocol switch allowed when a tenant does not set `http_allow_upgrade`.
pub const DEFAULT_UPGRADE: &str = "websocket";

/// What a rule does with the flows it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recording {
    Off,
    /// Record when possible; a failing recorder does not stop the session.
    // Records written before the field was typed spelled it "besteffort".
    #[serde(alias = "besteffort")]
    BestEffort,
    /// A session that cannot be recorded is refused or terminated (fail-closed).
    Required,
}

impl Recording {
    /// The name as written in the config (and in records).
    pub fn as_str(self) -> &'static str {
        match self {
            Recording::Off => "off",
            Recording::BestEffort => "best_effort",
            Recording::Required => "required",
        }
    }
}

/// How the gateway authenticates the SSH client (always on top of the WireGuard identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SshAuth {
    None,
    Publickey,
}

/// An entry of an `inspect_ssh` rule's `logins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginPattern {
    /// This account.
    Name(String),
    /// `{user}`: the local part of the device's user (`alice` for `alice@example.com`).
    UserLocalPart,
}

impl LoginPattern {
    pub fn matches(&self, login: &str, user: &UserName) -> bool {
        match self {
            LoginPattern::Name(n) => n == login,
            LoginPattern::UserLocalPart => user.as_str().split('@').next() == Some(login),
        }
    }
}

impl std::fmt::Display for LoginPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginPattern::Name(n) => f.write_str(n),
            LoginPattern::UserLocalPart => f.write_str("{user}"),
        }
    }
}

/// Settings of an `inspect_ssh` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshRuleSettings {
    pub recording: Recording,
    pub auth: SshAuth,
    pub capture_input: bool,
    pub allow_forwarding: bool,
    /// Accounts on the target devices may log in to; `None`: any.
    pub logins: Option<Vec<LoginPattern>>,
    /// A session's recordings stop at this many bytes in total (`max_recording_mb`)...
    pub max_recording_bytes: u64,
    /// ...or this long after the session started (`max_recording_secs`); under `required` the session's
    /// programs end then.
    pub max_recording_time: std::time::Duration,
}

/// Default `max_recording_mb`.
pub const DEFAULT_MAX_RECORDING_MB: u64 = 256;
/// Default `max_recording_secs` (a working day).
pub const DEFAULT_MAX_RECORDING_SECS: u64 = 8 * 3600;

impl SshRuleSettings {
    /// Whether `login` is allowed for a device of `user`.
    pub fn login_allowed(&self, login: &str, user: &UserName) -> bool {
        self.logins
            .as_ref()
            .is_none_or(|l| l.iter().any(|p| p.matches(login, user)))
    }
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
    /// On-ramp sites the subject must be one of (empty = any subject, sites or not).
    pub sites: Vec<String>,
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
    /// Most live flows one device may hold (one device never fills the table for everyone).
    pub device_max_flows: usize,
    /// New flows (allowed or not) one device may open per second, on average, and in a burst.
    pub device_new_flows_per_sec: u32,
    pub device_new_flows_burst: u32,
    /// Refused flows are not tracked one by one: one audit record per device, destination and rule per
    /// this interval, with the number of attempts.
    pub deny_summary: Duration,
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
            device_max_flows: 2048,
            device_new_flows_per_sec: 1000,
            device_new_flows_burst: 2000,
            deny_summary: Duration::from_secs(10),
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

/// Where signed checkpoint heads are exported, outside the audit store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CheckpointSink {
    #[default]
    None,
    /// Appended (one line per checkpoint) to a file, ideally on another mount or machine.
    File(PathBuf),
    /// Sent to the local syslog socket (`/dev/log`), for a syslog daemon to forward off the box.
    Syslog,
}

/// Audit store settings (`[audit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: PathBuf,
    pub queue: usize,
    pub commit_interval: Duration,
    pub on_overflow: OverflowPolicy,
    pub on_failure: FailurePolicy,
    /// A checkpoint is signed at least every this many records ...
    pub checkpoint_every: u64,
    /// ... and at least this often while records are unsigned.
    pub checkpoint_interval: Duration,
    pub checkpoint_sink: CheckpointSink,
    /// The pinned public key `rampart audit verify` checks signatures with (outside `state_dir`).
    pub verify_key: Option<PathBuf>,
    /// Size quota of the store's pages (`max_store_mb`) ...
    pub max_store_bytes: u64,
    /// ... and of `state_dir/recordings` (`max_recordings_mb`); what happens at a quota is `on_failure`'s.
    pub max_recordings_bytes: u64,
}

/// Default `audit.max_store_mb`.
pub const DEFAULT_MAX_STORE_MB: u64 = 1024;
/// Default `audit.max_recordings_mb`.
pub const DEFAULT_MAX_RECORDINGS_MB: u64 = 10 * 1024;
/// Largest `audit.max_store_mb` and `audit.max_recordings_mb` (1 PiB).
pub const MAX_QUOTA_MB: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    pub private_key_file: PathBuf,
    pub state_dir: PathBuf,
    pub admin_listen: SocketAddr,
    /// `None`: plain HTTP without authentication (only allowed on loopback); `Some`: HTTPS, and every request
    /// needs `Authorization: Bearer` with this token.
    pub admin_token: Option<super::AdminToken>,
    pub public_endpoint: Option<String>,
    /// `gateway.user`: the system user `rampart run` drops to after start, sandboxed (`sandbox`); `None`
    /// keeps it root.
    pub user: Option<String>,
    /// `gateway.proxy_threads`: worker threads of the layer-4/7 runtime; `None`: sized from the cores
    /// (`daemon`).
    pub proxy_threads: Option<usize>,
}

/// The validated configuration. Immutable; a reload builds a new one and swaps the `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this was loaded from (for messages).
    pub source: PathBuf,
    pub gateway: GatewaySettings,
    pub flows: FlowSettings,
    pub audit: AuditSettings,
    pub enroll: super::EnrollSettings,
    pub ui: super::UiSettings,
    /// `[fleet]`; `None`: a single box.
    pub fleet: Option<super::FleetSettings>,
    pub tenants: Vec<Tenant>,
    /// `[[onramp.seqpacket]]` entries.
    pub seqpacket_onramps: Vec<super::SeqpacketOnramp>,
    /// `[[onramp.gue]]` entries.
    pub gue_onramps: Vec<super::GueOnramp>,
}

impl Device {
    /// Every address the device sends from (one, or two in a dual-stack tenant).
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(self.address_v6)
    }

    pub fn has_address(&self, a: IpAddr) -> bool {
        self.address == a || self.address_v6 == Some(a)
    }
}

impl Tenant {
    pub fn pools(&self) -> impl Iterator<Item = IpNet> + '_ {
        std::iter::once(self.address_pool).chain(self.address_pool_v6)
    }

    pub fn gateway_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.gateway_address).chain(self.gateway_address_v6)
    }

    pub fn is_gateway(&self, a: IpAddr) -> bool {
        self.gateway_address == a || self.gateway_address_v6 == Some(a)
    }

    pub fn in_pools(&self, a: IpAddr) -> bool {
        self.pools().any(|p| p.contains(&a))
    }

    /// In a dual-stack tenant, the IPv6 address that goes with IPv4 address `a`: the same offset into the IPv6
    /// pool (100.96.0.3 in 100.96.0.0/24 is fd00:96::3 in fd00:96::/64). Enrolled devices get theirs this way,
    /// so the registry keeps one address per device.
    pub fn derived_v6(&self, a: IpAddr) -> Option<IpAddr> {
        let (IpNet::V4(p4), Some(IpNet::V6(p6)), IpAddr::V4(a)) =
            (self.address_pool, self.address_pool_v6, a)
        else {
            return None;
        };
        let offset = u32::from(a).checked_sub(u32::from(p4.network()))?;
        let v6 = std::net::Ipv6Addr::from(u128::from(p6.network()) + u128::from(offset));
        p6.contains(&v6).then_some(IpAddr::V6(v6))
    }
}
