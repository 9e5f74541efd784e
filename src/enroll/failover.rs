//! Failover Mode A, the device side (`rampart enroll --watch --out FILE --interface IF`): every node of a
//! fleet has its own WireGuard key, so when the device's node dies the device must be told another node's
//! endpoint and key. The watcher keeps the enrollment file current and moves the device when its node is gone.
//!
//! Every `interval` it refreshes the file from the node it names (`GET /v1/devices/self` with the ETag; a
//! changed config is applied at once). The node counts as **gone** when
//! - its enrollment API failed `api_failures` times in a row (connection refused or timed out, TLS failure,
//!   `503`), or
//! - the tunnel has had no handshake for `handshake_timeout` (`wg show IF latest-handshakes`; with
//!   `PersistentKeepalive` a working tunnel handshakes at least every two minutes, so the default is
//!   WireGuard's own 180 s reject-after time).
//!
//! Then it asks the other nodes of the file's `rampart-fleet-url` lines, in order, for the device's config; the
//! first that answers is written to the file (with that node's URL) and applied with `wg syncconf`. Nothing
//! answers: it tries again after the next interval. One request at a time, each bounded by the client's
//! timeouts; no busy loop.
//!
//! Never: touch the interface's addresses or routes (the tenant's networks are the same on every node), or
//! move to a node whose certificate does not match its pin.
#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::api::{DeviceReply, ErrorCode};
use super::client::{self, ClientError, EnrollUrl, FileMeta, Refreshed};

/// How the watcher decides and how often it looks.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// The WireGuard interface the file configures.
    pub interface: String,
    pub interval: Duration,
    /// No handshake for this long: the node is gone.
    pub handshake_timeout: Duration,
    /// This many failed refreshes in a row: the node is gone.
    pub api_failures: u32,
}

/// What one look found (for the log and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The node answered; `true` when the config changed (and was applied).
    Current(bool),
    /// The node did not answer; failures in a row so far.
    Unreachable(u32),
    /// Moved to the node of this URL.
    Moved(String),
    /// The node is gone and no other node answered.
    Stranded,
}

/// The watcher's state between looks.
pub struct Watcher {
    path: PathBuf,
    settings: WatchSettings,
    failures: u32,
    /// When the current peer was configured (a peer that never completed a handshake is judged from here).
    since: Instant,
}

impl Watcher {
    pub fn new(path: &Path, settings: WatchSettings) -> Watcher {
        Watcher {
            path: path.to_path_buf(),
            settings,
            failures: 0,
            since: Instant::now(),
        }
    }

    /// Runs until an error that a retry cannot fix (the file unreadable, `wg` missing).
    pub fn run(mut self) -> Result<(), ClientError> {
        loop {
            match self.step()? {
                Step::Current(false) => {}
                Step::Current(true) => eprintln!(
                    "rampart enroll --watch: {} changed on the gateway; applied to {}",
                    self.path.display(),
                    self.settings.interface
                ),
                Step::Unreachable(n) => eprintln!(
                    "rampart enroll --watch: the gateway did not answer ({n} of {} before failing over)",
                    self.settings.api_failures
                ),
                Step::Moved(url) => eprintln!(
                    "rampart enroll --watch: failed over to {url}; applied to {}",
                    self.settings.interface
                ),
                Step::Stranded => eprintln!(
                    "rampart enroll --watch: the gateway is gone and no other node of the fleet answered; retrying"
                ),
            }
            std::thread::sleep(self.settings.interval);
        }
    }

    /// One look: refresh from the current node, fail over if it is gone.
    pub fn step(&mut self) -> Result<Step, ClientError> {
        let refreshed = client::refresh(&self.path);
        let mut step = match refreshed {
            Ok(Refreshed::Unchanged) => {
                self.failures = 0;
                Step::Current(false)
            }
            Ok(Refreshed::Updated(reply)) => {
                self.failures = 0;
                self.apply(&reply)?;
                Step::Current(true)
            }
            Err(e) if node_down(&e) => {
                self.failures += 1;
                Step::Unreachable(self.failures)
            }
            Err(e @ ClientError::File { .. }) => return Err(e),
            Err(e) => {
                // The node answered but refused (device removed, pending): not a failover case.
                eprintln!("rampart enroll --watch: {e}");
                self.failures = 0;
                Step::Current(false)
            }
        };
        let stale = self
            .handshake_age()?
            .is_some_and(|a| a > self.settings.handshake_timeout);
        if self.failures >= self.settings.api_failures || stale {
            step = match self.fail_over()? {
                Some(url) => {
                    self.failures = 0;
                    Step::Moved(url)
                }
                None => Step::Stranded,
            };
        }
        Ok(step)
    }

    /// Asks the file's other nodes, in order; the first that answers becomes the device's node.
    fn fail_over(&mut self) -> Result<Option<String>, ClientError> {
        let meta = read_meta(&self.path)?;
        let current = meta.url.clone().unwrap_or_default();
        for u in meta.fleet_urls.iter().filter(|u| **u != current) {
            let url = match EnrollUrl::parse(u) {
                Ok(url) => url,
                Err(e) => {
                    eprintln!("rampart enroll --watch: skipping fleet URL {u}: {e}");
                    continue;
                }
            };
            match client::refresh_from(&self.path, &url) {
                Ok(reply) => {
                    self.apply(&reply)?;
                    return Ok(Some(u.clone()));
                }
                Err(e @ ClientError::File { .. }) => return Err(e),
                Err(e) => eprintln!("rampart enroll --watch: {u}: {e}"),
            }
        }
        Ok(None)
    }

    /// `wg syncconf IF` with the file's WireGuard settings (the wg-quick-only lines left out).
    fn apply(&mut self, reply: &DeviceReply) -> Result<(), ClientError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| file_err(&self.path, e))?;
        let conf = wg_conf(&text);
        let tmp = self.path.with_extension("wg-syncconf");
        client::write_private(&tmp, &conf)?;
        let out = Command::new("wg")
            .arg("syncconf")
            .arg(&self.settings.interface)
            .arg(&tmp)
            .output();
        let _ = std::fs::remove_file(&tmp);
        let out =
            out.map_err(|e| file_err(Path::new("wg"), format!("cannot run `wg syncconf`: {e}")))?;
        if !out.status.success() {
            return Err(file_err(
                Path::new("wg"),
                format!(
                    "`wg syncconf {}` failed: {}",
                    self.settings.interface,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        if let Some(p) = reply.peers.first() {
            tracing::debug!(peer = %p.public_key, endpoint = %p.endpoint, "applied");
        }
        self.since = Instant::now();
        Ok(())
    }

    /// Seconds since the current peer's latest handshake; a peer without one counts from when it was set.
    fn handshake_age(&self) -> Result<Option<Duration>, ClientError> {
        let meta = read_meta(&self.path)?;
        let Some(peer) = meta.peer_public_key else {
            return Ok(None);
        };
        let out = Command::new("wg")
            .args(["show", &self.settings.interface, "latest-handshakes"])
            .output()
            .map_err(|e| file_err(Path::new("wg"), format!("cannot run `wg show`: {e}")))?;
        if !out.status.success() {
            // The interface is not up (yet): nothing to judge.
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let at = latest_handshake(&text, &peer);
        let now = crate::enroll::unix_now();
        Ok(Some(match at {
            Some(t) if t > 0 => Duration::from_secs(now.saturating_sub(t).max(0) as u64),
            _ => self.since.elapsed(),
        }))
    }
}

/// Whether a refresh failed because the node is not there (as opposed to refusing this device).
fn node_down(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::BadReply { .. } => true,
        ClientError::Api { error, .. } => error.error == ErrorCode::Unavailable,
        ClientError::PinMismatch(_) | ClientError::Url(_) | ClientError::File { .. } => false,
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn read_meta(path: &Path) -> Result<FileMeta, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    Ok(FileMeta::parse(&text))
}

/// The unix time of `peer`'s latest handshake in `wg show IF latest-handshakes` output.
fn latest_handshake(text: &str, peer: &str) -> Option<i64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == peer).then(|| f.next()?.parse().ok())?
    })
}

/// The wg(8) config of a wg-quick file: without the comment lines and the wg-quick-only keys.
fn wg_conf(text: &str) -> String {
    const WG_QUICK_ONLY: [&str; 7] = [
        "address",
        "dns",
        "mtu",
        "table",
        "preup",
        "postup",
        "saveconfig",
    ];
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            continue;
        }
        let key = t
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if t.contains('=') && WG_QUICK_ONLY.contains(&key.as_str()) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_conf_keeps_only_what_wg_understands() {
        let text = "[Interface]\n# rampart-url = rampart://h:1/?pin=sha256:00\nPrivateKey = k\nAddress = 100.96.0.2/32\nMTU = 1420\n\n[Peer]\nPublicKey = p\nEndpoint = 198.18.0.1:51820\nAllowedIPs = 100.96.0.0/24\nPersistentKeepalive = 25\n";
        let c = wg_conf(text);
        assert!(c.contains("PrivateKey = k") && c.contains("Endpoint = 198.18.0.1:51820"));
        assert!(
            !c.contains("Address") && !c.contains("MTU") && !c.contains('#'),
            "{c}"
        );
    }

    #[test]
    fn latest_handshake_of_the_peer() {
        let out = "AAA=\t1700000000\nBBB=\t0\n";
        assert_eq!(latest_handshake(out, "AAA="), Some(1_700_000_000));
        assert_eq!(latest_handshake(out, "BBB="), Some(0));
        assert_eq!(latest_handshake(out, "CCC="), None);
    }

    #[test]
    fn only_a_missing_node_counts_as_down() {
        let api = |code| ClientError::Api {
            status: 503,
            error: crate::enroll::api::ApiError::new(code, "x"),
        };
        assert!(node_down(&ClientError::Connect {
            target: "h:1".into(),
            message: "refused".into()
        }));
        assert!(node_down(&api(ErrorCode::Unavailable)));
        assert!(!node_down(&api(ErrorCode::DeviceTokenInvalid)));
        assert!(!node_down(&ClientError::PinMismatch("x".into())));
    }
}
