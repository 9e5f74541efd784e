//! Device enrollment. Two ways in:
//!
//! - an admin on the gateway: `rampart device add` (key pair made on the gateway, `registry`), using the address
//!   allocation and wg-quick rendering of `wgconf`;
//! - the device itself, WARP-style: it makes its own key pair and sends only the public key with an
//!   enrollment token to the HTTPS listener (`server`, `service`); it gets its configuration and a device token
//!   to refresh it, rotate its key and leave. `client` is that device side (`rampart enroll`), `failover` its
//!   watcher that moves a device to another node of a fleet when its node is gone (`rampart enroll --watch`).
//!
//! Tokens and self-enrolled devices live in `state_dir/enroll.db` (`store`); their credentials' wire forms are
//! in `secret`, the HTTP API's bodies and error codes in `api`, the listener's certificate and pins in `tls`,
//! the admin operations (CLI now, web UI later) in `admin`, audit records in `audit`.
//!
//! Start reading at `service::Service::enroll`. Never: generate a device's private key for self-enrollment,
//! keep a secret in clear, or let a pending device reach the data path's config.
#![deny(unsafe_code)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod client;
pub mod failover;
pub mod limit;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
mod wgconf;

pub use wgconf::{allocate_address, allowed_ips, ClientConfig, DEVICE_MTU, PERSISTENT_KEEPALIVE};

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
