//! Settings of the review web UI: `gateway.ui_listen` and the optional `[ui]` table (session expiry, login
//! lockout).
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::validate::parse_socket;
use super::Collector;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUi {
    /// A signed-in session ends after this long without a request (default 1800).
    pub idle_timeout_secs: Option<u64>,
    /// ... and this long after sign-in in any case (default 43200).
    pub absolute_timeout_secs: Option<u64>,
    /// Wrong passwords in a row that lock an account (default 5).
    pub lockout_failures: Option<u32>,
    /// How long a locked account stays locked (default 900).
    pub lockout_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiSettings {
    /// HTTPS listener of the review UI and its API; `None`: off.
    pub listen: Option<SocketAddr>,
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub lockout_failures: u32,
    pub lockout: Duration,
}

impl Default for UiSettings {
    fn default() -> Self {
        UiSettings {
            listen: None,
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(12 * 3600),
            lockout_failures: 5,
            lockout: Duration::from_secs(15 * 60),
        }
    }
}

pub(super) fn validate_ui(
    raw: Option<RawUi>,
    listen: Option<&str>,
    c: &mut Collector<'_>,
) -> UiSettings {
    let d = UiSettings::default();
    let listen = listen.map(|l| parse_socket(c, "gateway.ui_listen", l, "127.0.0.1:8444"));
    let Some(r) = raw else {
        return UiSettings { listen, ..d };
    };
    let mut secs = |key: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => {
            c.push(format!("ui.{key}"), "must be at least 1 second");
            default
        }
        Some(s) => Duration::from_secs(s),
        None => default,
    };
    let idle_timeout = secs("idle_timeout_secs", r.idle_timeout_secs, d.idle_timeout);
    let absolute_timeout = secs(
        "absolute_timeout_secs",
        r.absolute_timeout_secs,
        d.absolute_timeout,
    );
    let lockout = secs("lockout_secs", r.lockout_secs, d.lockout);
    let lockout_failures = match r.lockout_failures {
        Some(0) => {
            c.push("ui.lockout_failures", "must be at least 1");
            d.lockout_failures
        }
        Some(n) => n,
        None => d.lockout_failures,
    };
    UiSettings {
        listen,
        idle_timeout,
        absolute_timeout,
        lockout_failures,
        lockout,
    }
}
