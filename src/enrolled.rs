//! `Config::load`: the configuration in force, i.e. the config file (`Config::from_toml`) with the devices
//! enrolled at runtime merged in: `state_dir/devices.json` (`registry`, `rampart device add`) and the active
//! devices of `state_dir/enroll.db` (`enroll::store`, token enrollment), and in fleet mode the fleet's shared
//! devices and policy as last applied (`config::shared`, `state_dir/fleet_state.json`). Above `config`, `registry` and
//! `enroll`, so that none of them imports another in a loop.
#![deny(unsafe_code)]

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors, DeviceOrigin, EnrolledDevice};
use crate::registry::Registry;

impl Config {
    /// Reads and validates `path` and merges the devices enrolled in its `state_dir` (in fleet mode also the
    /// fleet's shared state as last applied, `state_dir/fleet_state.json`).
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with(path, None)
    }

    /// Like [`load`](Self::load); in fleet mode with `shared` instead of the cached shared state (a newer
    /// version from PostgreSQL, validated here before it applies).
    pub fn load_with(
        path: &Path,
        shared: Option<&crate::config::shared::FleetCache>,
    ) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.clone(),
                key: "(file)".into(),
                message: format!("cannot read: {e}; pass an existing file with -c, or create one with `rampart init`"),
            }])
        })?;
        let mut cfg = Config::from_toml(&text, path)?;
        let mut fleet_devices = Vec::new();
        if let Some(f) = cfg.fleet.clone() {
            let cached;
            let cache = match shared {
                Some(c) => c,
                None => {
                    cached = crate::config::shared::FleetCache::load(&cfg.gateway.state_dir)
                        .map_err(|message| {
                            ConfigErrors(vec![ConfigError {
                                file: crate::config::shared::path(&cfg.gateway.state_dir)
                                    .display()
                                    .to_string(),
                                key: "(file)".into(),
                                message,
                            }])
                        })?;
                    &cached
                }
            };
            if let Some(p) = cache.policy_for(&text) {
                let label = format!(
                    "{file} with the fleet's policy version {} (published by node {})",
                    p.version, p.node
                );
                let merged =
                    crate::config::shared::with_tenants(&text, &p.doc).map_err(|message| {
                        ConfigErrors(vec![ConfigError {
                            file: label.clone(),
                            key: "tenant".into(),
                            message,
                        }])
                    })?;
                cfg = Config::from_toml(&merged, path).map_err(|mut e| {
                    for x in &mut e.0 {
                        x.file = label.clone();
                        x.message.push_str("; the running config stays; fix the policy on the node that published it and reload there");
                    }
                    e
                })?;
            }
            fleet_devices = cache.remote_devices(&f.node_id);
        }
        let registry = Registry::open(&cfg.gateway.state_dir);
        let enrolled = registry.load().map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: registry.path().display().to_string(),
                key: "(file)".into(),
                message: format!("{e:#}; fix or move the file aside (it holds devices enrolled with `rampart device add`)"),
            }])
        })?;
        let by_token =
            crate::enroll::store::data_path_devices(&cfg.gateway.state_dir).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    file: crate::enroll::store::path(&cfg.gateway.state_dir)
                        .display()
                        .to_string(),
                    key: "(file)".into(),
                    message: format!("{e}; it holds the devices enrolled with tokens"),
                }])
            })?;
        let by_token: Vec<EnrolledDevice> = by_token.into_iter().map(|d| d.into()).collect();
        cfg.merge_enrolled(
            &[
                (
                    &enrolled[..],
                    DeviceOrigin::Enrolled,
                    registry.path().display().to_string(),
                ),
                (
                    &by_token[..],
                    DeviceOrigin::Token,
                    crate::enroll::store::path(&cfg.gateway.state_dir)
                        .display()
                        .to_string(),
                ),
                (
                    &fleet_devices[..],
                    DeviceOrigin::Fleet,
                    crate::config::shared::path(&cfg.gateway.state_dir)
                        .display()
                        .to_string(),
                ),
            ],
            &registry.path().display().to_string(),
        )?;
        Ok(cfg)
    }
}
