//! `[fleet]`: this gateway as one node of several that ship their audit records to one PostgreSQL (see
//! `docs/fleet.md`). Absent: a single box, nothing changes.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::validate::resolve;
use super::Collector;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// This node's name, unique in the fleet (its audit records are keyed by it).
    pub node_id: String,
    /// `postgres://user@host:port/db` or `host=... user=... dbname=...`.
    pub postgres_url: String,
    /// A file holding the PostgreSQL password (instead of writing it into the URL).
    pub postgres_password_file: Option<String>,
    /// PEM CA certificate(s) the server's TLS certificate must chain to (besides the public web roots).
    pub postgres_ca_file: Option<String>,
    /// How often the shipper looks for new records (default 1000 ms).
    pub ship_interval_ms: Option<u64>,
    /// How often the node reports its heartbeat and re-reads the shared config version, the fallback for a
    /// missed notification (default 5000 ms).
    pub heartbeat_interval_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub node_id: String,
    pub postgres_url: String,
    pub postgres_password_file: Option<PathBuf>,
    pub postgres_ca_file: Option<PathBuf>,
    pub ship_interval: Duration,
    pub heartbeat_interval: Duration,
}

/// Whether `id` is a node id: 1 to 63 of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && id.as_bytes()[0].is_ascii_alphanumeric()
}

pub(super) fn validate_fleet(
    raw: Option<RawFleet>,
    base: &Path,
    c: &mut Collector<'_>,
) -> Option<FleetSettings> {
    let r = raw?;
    if !valid_node_id(&r.node_id) {
        c.push(
            "fleet.node_id",
            format!(
                "{:?} is not a node id; write 1 to 63 of a-z, 0-9, '-', '_', '.', unique in the fleet, like \"gw-a\"",
                r.node_id
            ),
        );
    }
    if let Err(e) = r.postgres_url.parse::<tokio_postgres::Config>() {
        c.push(
            "fleet.postgres_url",
            format!("is not a PostgreSQL connection string ({e}); write one like \"postgres://rampart@db.example:5432/rampart\""),
        );
    }
    let ship_interval = match r.ship_interval_ms {
        Some(0) => {
            c.push("fleet.ship_interval_ms", "must be at least 1 ms");
            Duration::from_secs(1)
        }
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs(1),
    };
    let heartbeat_interval = match r.heartbeat_interval_ms {
        Some(ms) if ms < 100 => {
            c.push(
                "fleet.heartbeat_interval_ms",
                "must be at least 100 ms; 5000 (the default) suits most fleets",
            );
            Duration::from_secs(5)
        }
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs(5),
    };
    Some(FleetSettings {
        node_id: r.node_id,
        postgres_url: r.postgres_url,
        postgres_password_file: r.postgres_password_file.map(|p| resolve(base, &p)),
        postgres_ca_file: r.postgres_ca_file.map(|p| resolve(base, &p)),
        ship_interval,
        heartbeat_interval,
    })
}
