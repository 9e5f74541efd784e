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

pub(super) fn valid_ident(s: &str, max: usize) -> bool {
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
