//! Shared harness for Rampart's end-to-end tests (`mod support;` from a file in `tests/`).
//!
//! Real peers in real network namespaces: wireguard-go clients configured from what
//! `rampart device add` prints, the `rampart run` process, traffic from `ping` and the python3
//! tools in `tests/tools/`. Start reading at [`lab::Lab`].
//!
//! Rules the harness keeps (see STYLE.md section 7 and the brief of issue 2):
//! - root only; it fails (never skips) otherwise, and names the apt packages it needs;
//! - every namespace, interface and temp dir it creates carries the test process's PID, and
//!   is removed by a drop guard, also on panic; only PIDs it started are ever signalled;
//! - underlay 198.18.0.0/15, tunnels 100.96.0.0/12, nothing touches the root namespace;
//! - readiness by polling with generous deadlines, every load bounded in time, no speed
//!   assertions.

#![allow(dead_code)] // each test file uses a different subset

pub mod attack;
pub mod gateway;
pub mod lab;
pub mod metrics;
pub mod netns;
pub mod pg;
pub mod probe;
pub mod process;
pub mod s3;
pub mod ssh;
pub mod tmp;
pub mod wg_client;

pub use gateway::TenantSpec;
pub use lab::Lab;
pub use probe::{ping, ping_once, wait_ping};
pub use process::{poll_until, wait_until};
pub use tmp::{tempdir, TempDir};
