//! The namespace helper: a private, unnamed user+network namespace holding two TUNs and the kernel TCP
//! stack that turns raw IP flows into sockets ("upgrade") and sockets back into raw IP packets ("downgrade").
//! Design and measurements: `shared/design/netns-upgrade-downgrade.md`.
//!
//! The gateway re-executes its own binary (`/proc/self/exe` + [`helper::HELPER_MARKER`]) as a child that
//! `unshare`s a new user and network namespace, configures it and passes file descriptors back over a
//! `SOCK_SEQPACKET` socketpair. Start reading at [`supervisor::NsSupervisor::start`]; the wire format is
//! [`proto`]; the child's side is [`helper`]. This module holds no flow state: NAT and the packet pump live
//! elsewhere and only use the descriptors handed out here.
//!
//! # Layout inside the namespace
//!
//! | what | value |
//! |---|---|
//! | `up0` (upgrade TUN) | address [`UPGRADE_ADDR`]/32, [`UPGRADE_NAT_RANGE`] routed to it |
//! | `dn0` (downgrade TUN) | address [`DOWNGRADE_ADDR`]/32, [`DOWNGRADE_NAT_RANGE`] routed to it |
//! | TCP listener (backlog 4096) and UDP socket | [`UPGRADE_LISTEN`] |
//! | both TUNs | `IFF_TUN \| IFF_NO_PI`, MTU [`TUN_MTU`], txqueuelen [`TUN_TXQUEUELEN`] |
//! | sysctls | IPv6 disabled (before the TUNs exist, so no RS/MLD noise), `rp_filter = 1`, `lo` up |
//!
//! The listener address is `up0`'s own /32: any local address of the namespace would be delivered to
//! (weak host model), keeping it on `up0` puts it next to the route its peers use. The downgrade route
//! carries `dn0`'s address as preferred source, so downgrade connections come from [`DOWNGRADE_ADDR`].
//! The helper refuses to configure anything unless it finds itself in a non-initial user namespace and a
//! network namespace with no interface but `lo`, so it can never touch the host's addresses or routes.
//!
//! # Privileges
//!
//! The gateway process itself needs no capability for this module: it forks, and the child calls
//! `unshare(CLONE_NEWUSER | CLONE_NEWNET)` and maps its own uid to 0 inside the new user namespace, which
//! gives the helper a full capability set *there* (enough for TUNSETIFF, netlink, sysctls of its own netns).
//! Two host conditions decide whether that works:
//!
//! 1. **Unprivileged user namespaces** must be allowed (`kernel.unprivileged_userns_clone`, no AppArmor
//!    `apparmor_restrict_unprivileged_userns`, `user.max_user_namespaces > 0`) — or the gateway runs as root.
//! 2. **`/dev/net/tun` must be openable by the gateway's uid**: mode 0666 (the usual udev default), or 0660
//!    with a group the gateway is in. The helper is root only inside its namespace; the host's DAC check on
//!    the device node sees the unmapped host uid. A descriptor opened before `unshare` cannot be used instead:
//!    a TUN is bound to the network namespace of the process that *opened* `/dev/net/tun` (EPERM otherwise).
//!
//! So: run as root, or as an unprivileged user with both conditions met (verified as `nobody` with mode 0666).
//! With `gateway.user` the helper is always started after the drop, by the sandboxed gateway: it inherits
//! no-new-privs, the Landlock domain and the seccomp filter (`crate::sandbox`; tested in `e2e_privilege`).
//! Each flow costs the gateway at least one descriptor; raise `RLIMIT_NOFILE` accordingly.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

pub mod helper;
mod netconf;
pub mod proto;
pub mod supervisor;
mod tun;

#[cfg(test)]
mod tests;

pub use supervisor::{
    ConnectError, Generation, NsConnector, NsError, NsEvent, NsHandle, NsInstance, NsSupervisor,
    SupervisorConfig, TunFd,
};

/// Sources of upgraded flows are NAT-ed into this range; it is routed to `up0`.
pub const UPGRADE_NAT_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 16);
/// Destinations of downgraded connections are NAT-ed into this range; it is routed to `dn0`.
pub const DOWNGRADE_NAT_RANGE: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(100, 65, 0, 0), 16);
/// `up0`'s own address, where the upgrade listener lives.
pub const UPGRADE_ADDR: Ipv4Addr = Ipv4Addr::new(100, 66, 0, 1);
/// `dn0`'s own address, the source of downgrade connections.
pub const DOWNGRADE_ADDR: Ipv4Addr = Ipv4Addr::new(100, 66, 1, 1);
/// Where the upgrade TCP listener and UDP socket are bound.
pub const UPGRADE_LISTEN: SocketAddrV4 = SocketAddrV4::new(UPGRADE_ADDR, 7000);
/// The downgrade SYN's MSS derives from `dn0`'s MTU, so it must be the WireGuard inner MTU (design pitfall 9).
pub const TUN_MTU: u32 = 1420;
/// The default 500 dropped ~8 % of packets kernel → parent under load (design pitfall 2).
pub const TUN_TXQUEUELEN: u32 = 10_000;
/// Listen backlog of the upgrade listener.
pub const LISTEN_BACKLOG: i32 = 4096;
pub const UPGRADE_TUN_NAME: &str = "up0";
pub const DOWNGRADE_TUN_NAME: &str = "dn0";
