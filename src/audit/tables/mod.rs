//! The write side of the store: one module per table, each inserting inside the writer's transaction.
//! Reading is `audit::review`'s.
#![deny(unsafe_code)]

pub mod admin;
pub mod chain;
pub mod enroll;
pub mod events;
pub mod flows;
pub mod http;
pub mod ssh;
