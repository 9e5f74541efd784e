//! Configuration: the TOML file as written (`RawConfig`, serde with `deny_unknown_fields`) and the validated
//! `Config` the rest of the gateway sees (newtypes, resolved paths, enrolled devices merged in by
//! `Config::merge_enrolled`). `Config::load`, which also reads the enrolled devices from `state_dir`, is in
//! `crate::enrolled`: this module imports neither the registry nor the enrollment store.
//!
//! Every error names the file, the key and what to do. Validation never touches a running gateway: a reload
//! builds a new `Config` and only a valid one is swapped in.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// The default configuration shipped with the gateway (`configs/gateway.toml`); `rampart init` writes it.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/gateway.toml");

/// Default WireGuard UDP listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:51820";
/// Default admin (metrics, health) listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8080";
/// Most threads `gateway.proxy_threads` may ask for.
pub const MAX_PROXY_THREADS: u64 = 64;

mod admin;
mod devices;
mod enroll;
mod fleet;
mod gue;
mod ids;
mod model;
mod onramp;
mod raw;
mod rules;
pub mod shared;
mod ui;
mod validate;

pub use admin::{admin_listen_is_local, AdminToken, MIN_ADMIN_TOKEN_LEN};
use devices::{check_tenant_devices, check_unique_keys, parse_ssh_keys, DeviceIndex};
pub use enroll::EnrollSettings;
pub use fleet::{valid_node_id, FleetSettings, ObjectSettings, SecretSource};
pub use gue::{exposed_remotes, outer_is_local, GueKey, GueOnramp, GueSite, DEFAULT_GUE_PORT};
pub use ids::*;
pub use model::*;
pub use onramp::{OnrampGrant, SeqpacketOnramp};
pub use raw::*;
pub use rules::valid_login;
pub use ui::UiSettings;
use validate::{line_of, validate};

#[cfg(test)]
mod tests;

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

    /// Adds devices enrolled at runtime, from each source (`devices.json`, `enroll.db`) in turn, checking them
    /// like configured ones; errors name the source file.
    pub(crate) fn merge_enrolled(
        &mut self,
        sources: &[(&[EnrolledDevice], DeviceOrigin, String)],
        keys_file: &str,
    ) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut indexes: HashMap<TenantId, DeviceIndex> = HashMap::new();
        for (enrolled, origin, file) in sources {
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
                let ssh_keys = parse_ssh_keys(&d.ssh_keys, &format!("{key}.ssh_keys"), &mut c);
                t.devices.push(Device {
                    name: d.name.clone(),
                    public_key: d.public_key,
                    address: d.address,
                    address_v6: t.derived_v6(d.address),
                    user: d.user.clone(),
                    groups: d.groups.clone(),
                    ssh_keys,
                    origin: *origin,
                });
                let index = indexes
                    .entry(t.id.clone())
                    .or_insert_with(|| DeviceIndex::of(&t.devices[..t.devices.len() - 1]));
                check_tenant_devices(t, index, &mut c, &key);
            }
            errors.append(&mut c.errors);
        }
        let mut c = Collector {
            file: keys_file,
            errors,
        };
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
        if a.user != b.user {
            out.push("gateway.user");
        }
        if a.proxy_threads != b.proxy_threads {
            out.push("gateway.proxy_threads");
        }
        if self.audit != new.audit {
            out.push("audit");
        }
        if self.enroll != new.enroll {
            out.push("gateway.enroll_listen and [enroll]");
        }
        if self.ui != new.ui {
            out.push("gateway.ui_listen and [ui]");
        }
        if self.flows.max_flows != new.flows.max_flows {
            out.push("flows.max_flows");
        }
        out
    }
}
