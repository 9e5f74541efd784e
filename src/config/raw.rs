//! The configuration file as written: serde structs with unknown keys rejected. Values stay as written;
//! `validate` turns them into the model.

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: RawGateway,
    pub flows: Option<RawFlows>,
    pub audit: Option<RawAudit>,
    pub enroll: Option<super::enroll::RawEnroll>,
    pub ui: Option<super::ui::RawUi>,
    pub fleet: Option<super::fleet::RawFleet>,
    pub onramp: Option<super::onramp::RawOnramps>,
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
    pub device_max_flows: Option<u64>,
    pub device_new_flows_per_sec: Option<u64>,
    pub device_new_flows_burst: Option<u64>,
    pub deny_summary_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<String>,
    pub queue: Option<u64>,
    pub commit_interval_ms: Option<u64>,
    pub on_overflow: Option<String>,
    pub on_failure: Option<String>,
    pub checkpoint_every: Option<u64>,
    pub checkpoint_interval_secs: Option<u64>,
    pub checkpoint_sink: Option<String>,
    pub verify_key: Option<String>,
    pub max_store_mb: Option<u64>,
    pub max_recordings_mb: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub id: String,
    pub action: String,
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    /// On-ramp sites (`[[onramp.gue.site]] name`, a SEQPACKET context's site) the flow's subject must be.
    pub sites: Option<Vec<String>>,
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
    /// `inspect_ssh` only: the accounts devices may log in to on the target (`{user}`: the local part of the
    /// device's user); absent: any.
    pub logins: Option<Vec<String>>,
    /// `inspect_ssh` only: a session's recordings stop at this many MB in total.
    pub max_recording_mb: Option<u64>,
    /// `inspect_ssh` only: a session's recordings stop this many seconds after it started.
    pub max_recording_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub listen: Option<String>,
    pub private_key_file: Option<String>,
    pub state_dir: Option<String>,
    pub admin_listen: Option<String>,
    /// Bearer token of the admin listener (a file of mode 0600); it then serves HTTPS. Required unless
    /// `admin_listen` is a loopback address.
    pub admin_token_file: Option<String>,
    pub public_endpoint: Option<String>,
    /// HTTPS listener of the enrollment API; absent = off.
    pub enroll_listen: Option<String>,
    /// HTTPS listener of the review web UI and its API; absent = off.
    pub ui_listen: Option<String>,
    /// The unprivileged system user `rampart run` becomes after start (and sandboxes); absent: stays root.
    pub user: Option<String>,
    /// Worker threads of the layer-4/7 runtime (off-ramp proxy, HTTP and SSH inspectors); absent: one per
    /// core beyond the data path's, at least 1 and at most 4.
    pub proxy_threads: Option<u64>,
}

/// A value written as one string or as a list of them (`"100.96.0.0/24"` or `["100.96.0.0/24", "fd00::/64"]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AddrList {
    One(String),
    Many(Vec<String>),
}

impl AddrList {
    pub fn items(&self) -> Vec<&str> {
        match self {
            AddrList::One(s) => vec![s.as_str()],
            AddrList::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

impl From<String> for AddrList {
    fn from(s: String) -> AddrList {
        AddrList::One(s)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEgress {
    pub netns: Option<String>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    pub id: String,
    pub name: Option<String>,
    /// One CIDR, or an IPv4 and an IPv6 one (dual stack).
    pub address_pool: AddrList,
    /// One address per pool.
    pub gateway_address: AddrList,
    pub max_flows: Option<u64>,
    pub offramp: Option<Vec<String>>,
    /// Where this tenant's off-ramp sockets leave: a network namespace, an interface, a firewall mark.
    pub egress: Option<RawEgress>,
    /// `host:port` destinations on the appliance itself that this tenant's devices may reach through the
    /// off-ramp (an explicit opt-in; the appliance is never an off-ramp destination otherwise).
    pub offramp_allow_local: Option<Vec<String>>,
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
    /// With `tls_decrypt`: non-HTTP ALPN protocols relayed without decryption (any other is refused).
    pub tls_passthrough_alpn: Option<Vec<String>>,
    /// `Upgrade` protocols that may switch an inspected HTTP/1.1 connection into a tunnel (default websocket).
    pub http_allow_upgrade: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRule {
    pub id: String,
    pub action: String,
    pub hosts: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    /// Match `paths` ignoring ASCII case.
    pub case_insensitive: Option<bool>,
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
    /// One address, or one per pool of a dual-stack tenant.
    pub address: AddrList,
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// SSH client keys (authorized_keys lines) `ssh_auth = "publickey"` accepts from this device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// A device enrolled at runtime, as `state_dir/devices.json` (`registry`) holds it and `enroll.db`'s
/// active devices are read; `Config::merge_enrolled` validates them like configured ones.
pub struct EnrolledDevice {
    pub tenant: super::TenantId,
    pub name: super::DeviceName,
    pub public_key: crate::keys::PeerKey,
    pub address: std::net::IpAddr,
    pub user: super::UserName,
    #[serde(default)]
    pub groups: Vec<String>,
    /// SSH client keys (authorized_keys lines, `device add --ssh-key`) for `ssh_auth = "publickey"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Unix seconds.
    pub enrolled_at: u64,
}
