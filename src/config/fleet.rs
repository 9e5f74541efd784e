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
    /// `[fleet.objects]`: SSH recordings uploaded to S3-compatible object storage.
    pub objects: Option<RawObjects>,
}

/// `[fleet.objects]`. Credentials come from files or environment variables, never from the config itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObjects {
    /// `https://s3.example:9000` for an S3-compatible server (path-style requests); absent: AWS S3.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Default `us-east-1`.
    pub region: Option<String>,
    /// Prepended to every object key (`rampart/`).
    pub prefix: Option<String>,
    pub access_key_id_file: Option<String>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key_file: Option<String>,
    pub secret_access_key_env: Option<String>,
    /// Keep the local copy of a recording once its upload is confirmed (default true).
    pub keep_local: Option<bool>,
    /// Recordings larger than this go up in parts of this size (default 8 MiB, at least 5).
    pub part_size_mb: Option<u64>,
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    /// The name of an environment variable of the gateway's process.
    Env(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSettings {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    pub access_key_id: SecretSource,
    pub secret_access_key: SecretSource,
    pub keep_local: bool,
    pub part_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub node_id: String,
    pub postgres_url: String,
    pub postgres_password_file: Option<PathBuf>,
    pub postgres_ca_file: Option<PathBuf>,
    pub ship_interval: Duration,
    /// `[fleet.objects]`; `None`: recordings stay on the node only.
    pub objects: Option<ObjectSettings>,
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
    let objects = r.objects.map(|o| validate_objects(o, base, c));
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
        objects,
        node_id: r.node_id,
        postgres_url: r.postgres_url,
        postgres_password_file: r.postgres_password_file.map(|p| resolve(base, &p)),
        postgres_ca_file: r.postgres_ca_file.map(|p| resolve(base, &p)),
        ship_interval,
        heartbeat_interval,
    })
}

/// Whether `b` is an S3 bucket name: 3 to 63 of `a-z 0-9 . -`, starting and ending with a letter or digit.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'.' || x == b'-')
        && b.as_bytes()[0].is_ascii_alphanumeric()
        && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric()
}

fn valid_env_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !n.as_bytes()[0].is_ascii_digit()
}

fn secret_source(
    what: &str,
    file: Option<String>,
    env: Option<String>,
    base: &Path,
    c: &mut Collector<'_>,
) -> SecretSource {
    let (fk, ek) = (
        format!("fleet.objects.{what}_file"),
        format!("fleet.objects.{what}_env"),
    );
    match (file, env) {
        (Some(f), None) => SecretSource::File(resolve(base, &f)),
        (None, Some(e)) => {
            if !valid_env_name(&e) {
                c.push(
                    ek,
                    format!("{e:?} is not an environment variable name; write one like \"RAMPART_S3_SECRET\" (A-Z, 0-9, _)"),
                );
            }
            SecretSource::Env(e)
        }
        (Some(_), Some(_)) => {
            c.push(fk, format!("is set together with {ek}; keep one of them"));
            SecretSource::Env(String::new())
        }
        (None, None) => {
            c.push(
                fk,
                format!("is missing; name a file holding it (mode 0600), or an environment variable with {ek} (never the secret itself)"),
            );
            SecretSource::Env(String::new())
        }
    }
}

fn validate_objects(o: RawObjects, base: &Path, c: &mut Collector<'_>) -> ObjectSettings {
    if let Some(e) = &o.endpoint {
        let ok = e
            .parse::<http::Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
            .filter(|u| {
                u.path_and_query()
                    .is_none_or(|p| p.as_str() == "/" || p.as_str().is_empty())
            });
        if ok.is_none() {
            c.push(
                "fleet.objects.endpoint",
                format!("{e:?} is not an object store URL; write one like \"https://s3.example:9000\" (scheme, host, port; no path), or leave it out for AWS S3"),
            );
        }
    }
    if !valid_bucket(&o.bucket) {
        c.push(
            "fleet.objects.bucket",
            format!("{:?} is not a bucket name; write 3 to 63 of a-z, 0-9, '.', '-', like \"rampart-recordings\"", o.bucket),
        );
    }
    let region = o.region.unwrap_or_else(|| "us-east-1".into());
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        c.push(
            "fleet.objects.region",
            format!("{region:?} is not a region; write one like \"us-east-1\""),
        );
    }
    let prefix = o.prefix.unwrap_or_default();
    if prefix.starts_with('/')
        || prefix.contains("//")
        || prefix.split('/').any(|s| s == "." || s == "..")
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        c.push(
            "fleet.objects.prefix",
            format!("{prefix:?} is not a key prefix; write a-z, 0-9, '-', '_', '.', '/' without a leading '/', like \"rampart/\""),
        );
    }
    let prefix = if prefix.is_empty() || prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    };
    let part_size = match o.part_size_mb {
        Some(mb) if !(5..=1024).contains(&mb) => {
            c.push(
                "fleet.objects.part_size_mb",
                "must be 5 to 1024 (S3 parts are at least 5 MiB)",
            );
            8 << 20
        }
        Some(mb) => (mb as usize) << 20,
        None => 8 << 20,
    };
    ObjectSettings {
        access_key_id: secret_source(
            "access_key_id",
            o.access_key_id_file,
            o.access_key_id_env,
            base,
            c,
        ),
        secret_access_key: secret_source(
            "secret_access_key",
            o.secret_access_key_file,
            o.secret_access_key_env,
            base,
            c,
        ),
        endpoint: o.endpoint.map(|e| e.trim_end_matches('/').to_owned()),
        bucket: o.bucket,
        region,
        prefix,
        keep_local: o.keep_local.unwrap_or(true),
        part_size,
    }
}
