//! The read side of the audit store: queries behind `rampart audit ...` (and the review UI to come), the
//! rendering of SSH sessions, and verification of the chain. Read-only: opens the store and recordings,
//! never writes them. Command-line parsing and output live in `cli`.
#![deny(unsafe_code)]

pub mod flows;
pub mod http;
pub mod ssh;
pub mod verify;
