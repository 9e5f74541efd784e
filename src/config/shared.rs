//! The fleet's shared state as this node last applied it (`state_dir/fleet_state.json`): the tenant policy
//! document (the config file's `[[tenant]]` tables, as some node published them), the devices other nodes
//! enrolled, and the config version. `Config::load` merges it in fleet mode, so the daemon, its reloads and
//! the CLI (`device add` picks a free address) see the same thing, also while PostgreSQL is down: this file
//! is what a node keeps serving when it cannot reach the fleet.
//!
//! The file's own `[[tenant]]` tables win over the shared document only when they changed since the node
//! last synchronised (`file_digest`): a local edit followed by `rampart reload` is then published, and
//! otherwise the newest shared document applies.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::EnrolledDevice;

/// What the fleet's PostgreSQL said at `version`, as this node applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetCache {
    /// The fleet's config version this state is (0: never synchronised).
    pub version: i64,
    pub policy: Option<SharedPolicy>,
    /// Every device of the fleet not removed, with the node that enrolled it.
    pub devices: Vec<SharedDevice>,
    /// [`tenant_doc_digest`] of the config file's `[[tenant]]` tables when this node last synchronised;
    /// `None` before the first synchronisation.
    pub file_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedPolicy {
    /// The config version that published it.
    pub version: i64,
    /// The node whose reload published it.
    pub node: String,
    /// TOML text holding only `[[tenant]]` tables ([`tenant_doc`]).
    pub doc: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDevice {
    /// The node it was enrolled on (`rampart device add`, or a token).
    pub origin: String,
    pub device: EnrolledDevice,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("fleet_state.json")
}

impl FleetCache {
    /// The cache in `state_dir`; an absent file means never synchronised.
    pub fn load(state_dir: &Path) -> Result<FleetCache, String> {
        let p = path(state_dir);
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                format!(
                    "{}: is not a fleet state file ({e}); move it aside, the node reads the fleet's state again from PostgreSQL",
                    p.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FleetCache::default()),
            Err(e) => Err(format!("{}: cannot read: {e}", p.display())),
        }
    }

    /// Replaces the cache atomically (write, fsync, rename).
    pub fn store(&self, state_dir: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = state_dir.join("fleet_state.json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path(state_dir))
    }

    /// The devices enrolled on other nodes than `node`.
    pub fn remote_devices(&self, node: &str) -> Vec<EnrolledDevice> {
        self.devices
            .iter()
            .filter(|d| d.origin != node)
            .map(|d| d.device.clone())
            .collect()
    }

    /// The shared policy document when it, not the file's tenants, applies: the file's `[[tenant]]` tables
    /// are as they were at the last synchronisation.
    pub fn policy_for(&self, file_text: &str) -> Option<&SharedPolicy> {
        let p = self.policy.as_ref()?;
        let digest = tenant_doc(file_text).ok().map(|d| tenant_doc_digest(&d))?;
        (self.file_digest.as_deref() == Some(digest.as_str())).then_some(p)
    }
}

/// The `[[tenant]]` tables of a config file's text, as a TOML document of their own (canonical: parsed and
/// written again, so comments and layout do not count as changes).
pub fn tenant_doc(file_text: &str) -> Result<String, String> {
    let table: toml::Table = toml::from_str(file_text).map_err(|e| e.message().to_string())?;
    let mut only = toml::Table::new();
    if let Some(t) = table.get("tenant") {
        only.insert("tenant".into(), t.clone());
    }
    toml::to_string(&only).map_err(|e| e.to_string())
}

pub fn tenant_doc_digest(doc: &str) -> String {
    hex::encode(Sha256::digest(doc.as_bytes()))
}

/// `file_text` with its `[[tenant]]` tables replaced by those of `doc`.
pub fn with_tenants(file_text: &str, doc: &str) -> Result<String, String> {
    let mut table: toml::Table = toml::from_str(file_text).map_err(|e| e.message().to_string())?;
    let shared: toml::Table = toml::from_str(doc).map_err(|e| e.message().to_string())?;
    table.remove("tenant");
    if let Some(t) = shared.get("tenant") {
        table.insert("tenant".into(), t.clone());
    }
    if let Some(key) = shared.keys().find(|k| *k != "tenant") {
        return Err(format!(
            "holds {key:?}; a shared policy document holds only [[tenant]] tables"
        ));
    }
    toml::to_string(&table).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[gateway]\nlisten = \"127.0.0.1:1\"\n\n# rules\n[[tenant]]\nid = \"acme\"\nrules = \"x\"\n";

    #[test]
    fn the_tenant_doc_ignores_comments_and_other_tables() {
        let a = tenant_doc(FILE).unwrap();
        let b = tenant_doc(&FILE.replace("# rules\n", "")).unwrap();
        assert_eq!(a, b);
        assert!(!a.contains("gateway"), "{a}");
        let c = tenant_doc(&FILE.replace("\"x\"", "\"y\"")).unwrap();
        assert_ne!(tenant_doc_digest(&a), tenant_doc_digest(&c));
    }

    #[test]
    fn the_shared_policy_applies_only_while_the_file_is_unchanged_since_the_last_sync() {
        let doc = tenant_doc(&FILE.replace("\"x\"", "\"shared\"")).unwrap();
        let mut cache = FleetCache {
            version: 3,
            policy: Some(SharedPolicy {
                version: 3,
                node: "gw-a".into(),
                doc: doc.clone(),
            }),
            devices: Vec::new(),
            file_digest: Some(tenant_doc_digest(&tenant_doc(FILE).unwrap())),
        };
        assert_eq!(cache.policy_for(FILE).map(|p| p.version), Some(3));
        let merged = with_tenants(FILE, &doc).unwrap();
        assert!(
            merged.contains("shared") && merged.contains("listen"),
            "{merged}"
        );
        // Edited locally since: the file wins (until the node publishes it).
        assert!(cache
            .policy_for(&FILE.replace("\"x\"", "\"edited\""))
            .is_none());
        // Never synchronised: the file.
        cache.file_digest = None;
        assert!(cache.policy_for(FILE).is_none());
    }

    #[test]
    fn a_shared_document_with_other_tables_is_refused() {
        let e = with_tenants(FILE, "[gateway]\nlisten = \"0.0.0.0:9\"\n").unwrap_err();
        assert!(e.contains("only [[tenant]]"), "{e}");
    }
}
