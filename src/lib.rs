//! Rampart: a WireGuard-terminating zero-trust gateway. See ARCHITECTURE.md for the module map and the life
//! of a packet. The binary (`main.rs`) is only the CLI entry point.
#![deny(unsafe_code)]

/// Whether this build can off-ramp flows to upstream networks (`[[tenant]] offramp`).
pub const OFFRAMP_AVAILABLE: bool = true;
/// Whether `inspect_ssh` rules are accepted (the SSH inspector is wired in).
pub const SSH_INSPECTION_AVAILABLE: bool = true;
/// Whether `inspect_http` rules are accepted (the HTTP inspector is wired in).
pub const HTTP_INSPECTION_AVAILABLE: bool = true;

pub mod admin;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod egress;
pub mod enroll;
pub mod enrolled;
pub mod fleet;
/// Fuzz target bodies (`fuzz/`), also replayed over the committed corpus by `cargo test`.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handoff;
pub mod http;
pub mod keys;
pub mod metrics;
#[allow(unsafe_code)]
pub mod netns;
pub mod offramp;
pub mod onramp;
pub mod packet;
pub mod registry;
#[allow(unsafe_code)]
pub mod sandbox;
pub mod shutdown;
pub mod ssh;
#[allow(unsafe_code)]
pub mod sys;
pub mod system;
