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
    #[serde(default)]
    pub tenant: Vec<RawTenant>,
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
    #[serde(default)]
    pub device: Vec<RawDevice>,
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
    pub devices: Vec<Device>,
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
        let mut tenant = Tenant {
            name: rt.name.unwrap_or_else(|| id.to_string()),
            id,
            address_pool: pool,
            gateway_address: gw,
            devices: Vec::new(),
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
        tenants,
    }
}

fn empty(path: &Path) -> Config {
    Config {
        source: path.to_path_buf(),
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
    fn duplicate_tenant_id_is_rejected() {
        let err = load(&GOOD.replace("id = \"globex\"", "id = \"acme\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("duplicate tenant id"), "{err}");
    }
}
