//! The device registry: devices enrolled at runtime with `rampart device add`, kept in
//! `state_dir/devices.json`. Writers take an exclusive lock on `state_dir/devices.lock` and replace the file
//! atomically (write, fsync, rename), so concurrent CLI invocations and a crash never leave a torn file.
#![deny(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub use crate::config::EnrolledDevice;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    version: u32,
    devices: Vec<EnrolledDevice>,
}

pub struct Registry {
    dir: PathBuf,
}

/// Held while a read-modify-write of the registry is in progress.
pub struct RegistryLock {
    _file: File,
}

impl Registry {
    pub fn open(state_dir: &Path) -> Registry {
        Registry {
            dir: state_dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("devices.json")
    }

    /// Takes the registry's exclusive lock (blocks until other writers are done).
    pub fn lock(&self) -> anyhow::Result<RegistryLock> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create state_dir {}", self.dir.display()))?;
        let path = self.dir.join("devices.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.lock()
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(RegistryLock { _file: file })
    }

    /// The enrolled devices; an absent file means none.
    pub fn load(&self) -> anyhow::Result<Vec<EnrolledDevice>> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        parse(&text).with_context(|| format!("{} is not a valid device registry", path.display()))
    }

    /// Replaces the registry atomically. Call with the lock held.
    pub fn store(&self, _lock: &RegistryLock, devices: &[EnrolledDevice]) -> anyhow::Result<()> {
        let path = self.path();
        let tmp = self.dir.join("devices.json.tmp");
        let body = render(devices)?;
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(body.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// The devices in a registry file's text.
pub fn parse(text: &str) -> Result<Vec<EnrolledDevice>, serde_json::Error> {
    serde_json::from_str::<RegistryFile>(text).map(|f| f.devices)
}

/// A registry file's text for `devices` (without the final newline `store` adds).
pub fn render(devices: &[EnrolledDevice]) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&RegistryFile {
        version: 1,
        devices: devices.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeviceName, TenantId, UserName};

    #[test]
    fn store_then_load_round_trips() {
        let dir_tmp = tempfile::tempdir().unwrap();
        let dir = dir_tmp.path().join("d");
        let reg = Registry::open(&dir);
        assert!(reg.load().unwrap().is_empty());
        let d = EnrolledDevice {
            tenant: TenantId::parse("acme").unwrap(),
            name: DeviceName::parse("laptop").unwrap(),
            public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
                .parse()
                .unwrap(),
            address: "100.96.0.2".parse().unwrap(),
            user: UserName::parse("alice").unwrap(),
            groups: vec!["eng".into()],
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHGRUo1dqQEtZp6C7PgcoS0Xw5Ouvzq4DUf8SfUjqYcz alice".into()],
            enrolled_at: 1,
        };
        let lock = reg.lock().unwrap();
        reg.store(&lock, std::slice::from_ref(&d)).unwrap();
        assert_eq!(reg.load().unwrap(), vec![d]);
    }
}
