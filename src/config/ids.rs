//! Identity newtypes shared by the config, the registry and every record: tenant, device and user names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A tenant's id as written in the config (`[[tenant]] id`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(String);

/// A device's name, unique within its tenant.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceName(String);

/// The user a device belongs to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserName(String);

macro_rules! string_newtype {
    ($t:ident) => {
        #[allow(dead_code)]
        impl $t {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
    };
}
string_newtype!(TenantId);
string_newtype!(DeviceName);
string_newtype!(UserName);

pub(crate) fn valid_ident(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with(['-', '.'])
}

impl TenantId {
    pub fn parse(s: &str) -> Result<TenantId, String> {
        if valid_ident(s, 64) {
            Ok(TenantId(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is not a valid id: use 1-64 letters, digits, '-', '_' or '.', like \"acme\""
            ))
        }
    }
}

impl DeviceName {
    pub fn parse(s: &str) -> Result<DeviceName, String> {
        if valid_ident(s, 64) {
            Ok(DeviceName(s.to_string()))
        } else {
            Err(format!("{s:?} is not a valid device name: use 1-64 letters, digits, '-', '_' or '.', like \"alice-laptop\""))
        }
    }
}

impl DeviceName {
    /// The subject name of a connected on-ramp's connection: `onramp`, `onramp/site`, `onramp/site/device` or
    /// `onramp/-/device` (each part already a valid name). The `/` no device name has keeps it apart from
    /// WireGuard devices in records and policy.
    /// The site of an on-ramp subject (`onramp/site[/device]`; a device's own name never holds a '/').
    pub fn onramp_site(&self) -> Option<&str> {
        self.0.split('/').nth(1).filter(|s| *s != "-")
    }

    /// Any subject name, on-ramp ones included (tests).
    #[cfg(test)]
    pub fn onramp_subject_for_test(name: &str) -> DeviceName {
        DeviceName(name.to_string())
    }

    pub fn onramp_subject(onramp: &str, site: Option<&str>, device: Option<&str>) -> DeviceName {
        let mut s = onramp.to_string();
        if site.is_some() || device.is_some() {
            s.push('/');
            s.push_str(site.unwrap_or("-"));
        }
        if let Some(d) = device {
            s.push('/');
            s.push_str(d);
        }
        DeviceName(s)
    }
}

impl UserName {
    pub fn parse(s: &str) -> Result<UserName, String> {
        if !s.is_empty()
            && s.len() <= 128
            && !s.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            Ok(UserName(s.to_string()))
        } else {
            Err(format!("{s:?} is not a valid user: use a non-empty name without spaces, like \"alice@acme.example\""))
        }
    }
}

/// An SSH client key registered for a device, one `authorized_keys` line without options
/// (`ssh-ed25519 AAAA... comment`): what `ssh_auth = "publickey"` lets in.
#[derive(Clone)]
pub struct SshClientKey {
    line: String,
    key: russh::keys::ssh_key::PublicKey,
}

impl SshClientKey {
    /// Parses one line in `authorized_keys` syntax. Options (`from=`, `command=` ...) are refused: the gateway
    /// would not honour them.
    pub fn parse(line: &str) -> Result<SshClientKey, String> {
        use russh::keys::ssh_key::authorized_keys::Entry;
        let line = line.trim();
        let options = |opts: &str| {
            format!(
                "{line:?} has authorized_keys options ({opts}), which the gateway does not apply; list the key \
                 without them"
            )
        };
        let entry: Entry = match line.parse() {
            Ok(e) => e,
            Err(e) => {
                // `options key` with a comment-less key is not recognised as options by the parser.
                if let Some((opts, rest)) = line.split_once(' ') {
                    if rest.parse::<russh::keys::ssh_key::PublicKey>().is_ok() {
                        return Err(options(opts));
                    }
                }
                return Err(format!(
                    "{line:?} is not an SSH public key ({e}); paste one line of an id_*.pub file, like \
                     \"ssh-ed25519 AAAA... alice@laptop\""
                ));
            }
        };
        if !entry.config_opts().is_empty() {
            return Err(options(entry.config_opts().as_str()));
        }
        let key = entry.public_key().clone();
        let line = key.to_openssh().map_err(|e| format!("{line:?}: {e}"))?;
        Ok(SshClientKey { line, key })
    }

    /// Parses a file's worth of `authorized_keys` lines (blank lines and `#` comments skipped).
    pub fn parse_lines(text: &str) -> Result<Vec<SshClientKey>, String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(SshClientKey::parse)
            .collect()
    }

    pub fn key(&self) -> &russh::keys::ssh_key::PublicKey {
        &self.key
    }

    /// `type base64 comment`, as registered.
    pub fn as_str(&self) -> &str {
        &self.line
    }

    /// The `SHA256:...` fingerprint (what `ssh-keygen -l` prints and records name).
    pub fn fingerprint(&self) -> String {
        self.key
            .fingerprint(russh::keys::ssh_key::HashAlg::Sha256)
            .to_string()
    }

    /// Whether `key` is this key (comments aside).
    pub fn matches(&self, key: &russh::keys::ssh_key::PublicKey) -> bool {
        self.key.key_data() == key.key_data()
    }
}

impl PartialEq for SshClientKey {
    fn eq(&self, other: &Self) -> bool {
        self.key.key_data() == other.key.key_data()
    }
}

impl Eq for SshClientKey {}

impl fmt::Debug for SshClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SshClientKey({})", self.fingerprint())
    }
}

impl Serialize for SshClientKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.line)
    }
}
