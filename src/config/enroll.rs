//! Settings of the enrollment listener: `gateway.enroll_listen` and the optional `[enroll]` table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::validate::{parse_socket, resolve};
use super::Collector;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnroll {
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub public_host: Option<String>,
    pub rate_per_minute: Option<u32>,
    pub rate_burst: Option<u32>,
    pub lockout_failures: Option<u32>,
    pub lockout_secs: Option<u64>,
}

/// The enrollment listener, as validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollSettings {
    /// `None`: no listener (devices are only added with `rampart device add`).
    pub listen: Option<SocketAddr>,
    /// Operator-provided certificate chain and key (PEM); `None`: a self-signed certificate minted on first
    /// start under `state_dir/enroll/tls`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Host (or `host:port`) written into enrollment URLs; `None`: the host of `gateway.public_endpoint`.
    pub public_host: Option<String>,
    /// Enrollment requests per minute from one source address, and the burst allowed above that.
    pub rate_per_minute: u32,
    pub rate_burst: u32,
    /// Wrong secrets for one token before it is locked, and for how long.
    pub lockout_failures: u32,
    pub lockout: Duration,
}

impl Default for EnrollSettings {
    fn default() -> Self {
        EnrollSettings {
            listen: None,
            tls: None,
            public_host: None,
            rate_per_minute: 10,
            rate_burst: 20,
            lockout_failures: 5,
            lockout: Duration::from_secs(15 * 60),
        }
    }
}

pub(super) fn validate_enroll(
    raw: Option<RawEnroll>,
    listen: Option<&str>,
    base: &Path,
    c: &mut Collector<'_>,
) -> EnrollSettings {
    let d = EnrollSettings::default();
    let listen = listen.map(|l| parse_socket(c, "gateway.enroll_listen", l, "0.0.0.0:8443"));
    let Some(r) = raw else {
        return EnrollSettings { listen, ..d };
    };
    let tls = match (r.tls_cert, r.tls_key) {
        (Some(cert), Some(key)) => Some((resolve(base, &cert), resolve(base, &key))),
        (None, None) => None,
        _ => {
            c.push(
                "enroll.tls_cert",
                "tls_cert and tls_key go together; give both (PEM chain and its key) or neither (self-signed)",
            );
            None
        }
    };
    let mut positive = |key: &str, v: Option<u32>, default: u32| match v {
        Some(0) => {
            c.push(format!("enroll.{key}"), "must be at least 1");
            default
        }
        Some(n) => n,
        None => default,
    };
    let rate_per_minute = positive("rate_per_minute", r.rate_per_minute, d.rate_per_minute);
    let rate_burst = positive("rate_burst", r.rate_burst, d.rate_burst);
    let lockout_failures = positive("lockout_failures", r.lockout_failures, d.lockout_failures);
    let lockout = match r.lockout_secs {
        Some(0) => {
            c.push("enroll.lockout_secs", "must be at least 1 second");
            d.lockout
        }
        Some(s) => Duration::from_secs(s),
        None => d.lockout,
    };
    if let Some(h) = &r.public_host {
        if h.is_empty() || h.contains(['/', '?', '#', ' ', '@']) {
            c.push(
                "enroll.public_host",
                format!("{h:?} is not a host name; write it like \"vpn.example.com\" or \"vpn.example.com:8443\""),
            );
        }
    }
    EnrollSettings {
        listen,
        tls,
        public_host: r.public_host,
        rate_per_minute,
        rate_burst,
        lockout_failures,
        lockout,
    }
}
