//! `Config::load`: the configuration in force, i.e. the config file (`Config::from_toml`) with the devices
//! enrolled at runtime merged in: `state_dir/devices.json` (`registry`, `rampart device add`) and the active
//! devices of `state_dir/enroll.db` (`enroll::store`, token enrollment). Above `config`, `registry` and
//! `enroll`, so that none of them imports another in a loop.
#![deny(unsafe_code)]

use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors, DeviceOrigin, EnrolledDevice};
use crate::registry::Registry;

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
            ],
            &registry.path().display().to_string(),
        )?;
        Ok(cfg)
    }
}
