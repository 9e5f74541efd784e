//! The enrollment HTTP API on the wire: request and reply bodies, the stable error codes and their HTTP
//! statuses, and the wg-quick text a device gets. Shared by the server and `rampart enroll`.
//!
//! Stability: error codes and JSON field names are an interface (stock-tool scripts match on them); add, never
//! rename.
#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::keys::PrivateKey;

/// Media type of the wg-quick reply (the config without its `[Interface]` line and `PrivateKey`).
pub const WG_QUICK: &str = "text/x-wg-quick";
/// Largest request body accepted (a real one is a few hundred bytes).
pub const MAX_BODY: usize = 4096;

/// `POST /v1/enroll`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// `rpe1_...`.
    pub token: String,
    /// The device's WireGuard public key (base64, as `wg pubkey` prints). The private key never leaves the device.
    pub public_key: String,
    /// Wanted device name (made unique within the tenant by a `-2`, `-3`, ... suffix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// A stable hardware or MDM id: enrolling again with the same id and token replaces the device's key
    /// instead of adding a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// `PUT /v1/devices/self/key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRequest {
    pub public_key: String,
}

/// Whether a device gets traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Waiting for `rampart device approve`: the gateway has no peer for it.
    Pending,
    Active,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Pending => "pending",
            DeviceState::Active => "active",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceState> {
        match s {
            "pending" => Some(DeviceState::Pending),
            "active" => Some(DeviceState::Active),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `dev_<16 hex>`.
    pub id: String,
    pub name: String,
    pub tenant: String,
    pub state: DeviceState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    pub mtu: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub public_key: String,
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: u16,
}

/// A device's configuration: the reply of `POST /v1/enroll`, `GET /v1/devices/self` and
/// `PUT /v1/devices/self/key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReply {
    pub device: DeviceInfo,
    /// `rpd1_...`: only in the replies that create it (enrollment, key rotation); keep it secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_token: Option<String>,
    pub interface: Interface,
    pub peers: Vec<Peer>,
    /// Changes whenever anything in `interface`, `peers` or `enroll_urls` changes; also the `ETag`.
    pub config_version: String,
    /// Fleet mode: the enrollment URLs (`rampart://HOST:PORT/?pin=...`) of every live node, the answering
    /// node's first; `rampart enroll --watch` moves the device to the next one when its node is gone
    /// (failover Mode A). Absent on a single gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enroll_urls: Vec<String>,
}

impl DeviceReply {
    /// The wg-quick lines after `[Interface]` and `PrivateKey`: what `Accept: text/x-wg-quick` returns, so a
    /// shell prepends those two lines itself.
    pub fn wg_quick_body(&self) -> String {
        let mut s = String::new();
        let addrs: Vec<String> = self
            .interface
            .addresses
            .iter()
            .map(|a| a.to_string())
            .collect();
        let _ = writeln!(s, "Address = {}", addrs.join(", "));
        if !self.interface.dns.is_empty() {
            let dns: Vec<String> = self.interface.dns.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(s, "DNS = {}", dns.join(", "));
        }
        let _ = writeln!(s, "MTU = {}", self.interface.mtu);
        for p in &self.peers {
            let _ = writeln!(s);
            let _ = writeln!(s, "[Peer]");
            let _ = writeln!(s, "PublicKey = {}", p.public_key);
            let _ = writeln!(s, "Endpoint = {}", p.endpoint);
            let nets: Vec<String> = p.allowed_ips.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(s, "AllowedIPs = {}", nets.join(", "));
            let _ = writeln!(s, "PersistentKeepalive = {}", p.persistent_keepalive);
        }
        s
    }

    /// Comment lines naming the device (and, when given, its device token) that go before `[Interface]`.
    pub fn header(&self) -> String {
        let mut s = format!(
            "# Rampart device {:?} ({}), tenant {:?}\n",
            self.device.name, self.device.id, self.device.tenant
        );
        if self.device.state == DeviceState::Pending {
            s.push_str(
                "# pending approval: the tunnel works once an admin runs `rampart device approve`\n",
            );
        }
        s
    }

    /// A complete wg-quick file.
    pub fn wg_quick(&self, key: &PrivateKey) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\n{}",
            key.to_base64(),
            self.wg_quick_body()
        )
    }
}

/// Stable error codes (`{"error": CODE, "message": "..."}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed token, unknown id or wrong secret (not told apart, on purpose).
    TokenInvalid,
    TokenExpired,
    TokenUsedUp,
    TokenRevoked,
    /// Too many wrong secrets for this token id: locked for a while (`Retry-After`).
    TokenLocked,
    /// Too many requests from this source (`Retry-After`).
    RateLimited,
    /// The public key belongs to another device.
    KeyInUse,
    /// The device waits for `rampart device approve`.
    PendingApproval,
    /// The `device_id` belongs to a device enrolled with another token.
    DeviceIdInUse,
    /// Missing, malformed or unknown device token.
    DeviceTokenInvalid,
    /// The tenant's address pool has no free address.
    AddressPoolFull,
    BadRequest,
    BodyTooLarge,
    BodyTimeout,
    NotFound,
    MethodNotAllowed,
    /// The gateway cannot serve enrollments right now (its config does not load, the store fails, fleet mode
    /// and the fleet's PostgreSQL is unreachable).
    Unavailable,
    /// Fleet mode: this change (key rotation, leaving) must be made on the node the device was enrolled on,
    /// which the message names.
    WrongNode,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::TokenInvalid | ErrorCode::DeviceTokenInvalid => 401,
            ErrorCode::TokenExpired | ErrorCode::TokenUsedUp | ErrorCode::TokenRevoked => 410,
            ErrorCode::TokenLocked | ErrorCode::RateLimited => 429,
            ErrorCode::KeyInUse | ErrorCode::DeviceIdInUse | ErrorCode::WrongNode => 409,
            ErrorCode::PendingApproval => 403,
            ErrorCode::AddressPoolFull | ErrorCode::Unavailable => 503,
            ErrorCode::BadRequest => 400,
            ErrorCode::BodyTooLarge => 413,
            ErrorCode::BodyTimeout => 408,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenUsedUp => "token_used_up",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::TokenLocked => "token_locked",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::KeyInUse => "key_in_use",
            ErrorCode::PendingApproval => "pending_approval",
            ErrorCode::DeviceIdInUse => "device_id_in_use",
            ErrorCode::DeviceTokenInvalid => "device_token_invalid",
            ErrorCode::AddressPoolFull => "address_pool_full",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::WrongNode => "wrong_node",
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({})", error.as_str())]
pub struct ApiError {
    pub error: ErrorCode,
    pub message: String,
    /// Seconds until a retry can succeed (429 only; also sent as `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(error: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs.max(1));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names() {
        for c in [
            ErrorCode::TokenInvalid,
            ErrorCode::TokenUsedUp,
            ErrorCode::PendingApproval,
            ErrorCode::AddressPoolFull,
            ErrorCode::Unavailable,
            ErrorCode::WrongNode,
        ] {
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.as_str().into())
            );
        }
        let e = ApiError::new(ErrorCode::RateLimited, "slow down").retry_after(0);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["error"], "rate_limited");
        assert_eq!(v["retry_after"], 1);
    }

    #[test]
    fn wg_quick_body_has_no_interface_line_or_private_key() {
        let r = DeviceReply {
            device: DeviceInfo {
                id: "dev_0123456789abcdef".into(),
                name: "laptop".into(),
                tenant: "acme".into(),
                state: DeviceState::Active,
            },
            device_token: None,
            interface: Interface {
                addresses: vec!["100.96.0.2/32".parse().unwrap()],
                dns: vec![],
                mtu: 1420,
            },
            peers: vec![Peer {
                public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
                endpoint: "198.18.0.1:51820".into(),
                allowed_ips: vec![
                    "100.96.0.0/24".parse().unwrap(),
                    "10.9.0.0/16".parse().unwrap(),
                ],
                persistent_keepalive: 25,
            }],
            enroll_urls: vec![],
            config_version: "x".into(),
        };
        let body = r.wg_quick_body();
        assert!(!body.contains("[Interface]") && !body.contains("PrivateKey"));
        assert!(body.starts_with("Address = 100.96.0.2/32\n"), "{body}");
        assert!(body.contains("AllowedIPs = 100.96.0.0/24, 10.9.0.0/16\n"));
        let k = PrivateKey::generate();
        let full = r.wg_quick(&k);
        assert!(full.starts_with(&format!(
            "[Interface]\nPrivateKey = {}\nAddress",
            k.to_base64()
        )));
    }
}
