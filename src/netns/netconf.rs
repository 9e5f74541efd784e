//! Configuration of the helper's namespace: safety checks, sysctls, links, addresses and routes (rtnetlink,
//! no `ip` binary).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

/// A failed setup step; sent to the parent as [`super::proto::Message::SetupFailed`].
#[derive(Debug)]
pub(crate) struct SetupError {
    pub stage: &'static str,
    pub errno: Option<i32>,
    pub message: String,
}

impl SetupError {
    pub fn io(stage: &'static str, e: io::Error) -> SetupError {
        SetupError {
            stage,
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }

    pub fn other(stage: &'static str, message: impl Into<String>) -> SetupError {
        SetupError {
            stage,
            errno: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.message)
    }
}

/// Refuses to go on unless this process is in a non-initial user namespace and a network namespace that
/// has nothing but `lo`: everything after this point changes network configuration.
pub(crate) fn check_private_namespace() -> Result<(), SetupError> {
    const STAGE: &str = "check namespace";
    let uid_map =
        std::fs::read_to_string("/proc/self/uid_map").map_err(|e| SetupError::io(STAGE, e))?;
    // The initial user namespace maps the whole range: "0 0 4294967295".
    if uid_map
        .split_whitespace()
        .nth(2)
        .is_some_and(|count| count == "4294967295")
    {
        return Err(SetupError::other(
            STAGE,
            "refusing to run in the initial user namespace: the helper is started by the gateway's \
             namespace supervisor, not by hand",
        ));
    }
    let names: Vec<String> = nix::net::if_::if_nameindex()
        .map_err(|e| SetupError::io(STAGE, e.into()))?
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    if !names.is_empty() {
        return Err(SetupError::other(
            STAGE,
            format!(
                "refusing to configure a network namespace that already has interfaces {names:?}"
            ),
        ));
    }
    Ok(())
}

/// Writes a per-namespace sysctl (`/proc/sys/net/...` shows the writer's own network namespace). A knob
/// that does not exist (IPv6 compiled out) is not an error.
pub(crate) fn sysctl(path: &'static str, value: &str) -> Result<(), SetupError> {
    match std::fs::write(path, value) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SetupError::io(path, e)),
    }
}

/// One TUN's link-level configuration.
pub(crate) struct LinkPlan {
    pub name: &'static str,
    pub mtu: u32,
    pub txqueuelen: u32,
    pub addr: Ipv4Addr,
    pub routed: Ipv4Net,
}

fn ifindex(name: &str) -> Result<u32, SetupError> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| SetupError::io("find interface", io::Error::from(e)))
}

fn nl(stage: &'static str) -> impl FnOnce(rtnetlink::Error) -> SetupError {
    move |e| {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
            _ => None,
        };
        SetupError {
            stage,
            errno,
            message: e.to_string(),
        }
    }
}

/// `lo` up; per TUN: mtu, txqueuelen, up, its /32, and its NAT range routed to it (preferred source = its
/// /32). Runs a throwaway current-thread runtime: the helper is otherwise synchronous.
pub(crate) fn configure_links(links: &[LinkPlan]) -> Result<(), SetupError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| SetupError::io("netlink runtime", e))?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| SetupError::io("netlink socket", e))?;
        let conn = tokio::spawn(conn);
        let result = async {
            let lo = ifindex("lo")?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("lo up"))?;
            for link in links {
                let index = ifindex(link.name)?;
                handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(index)
                            .mtu(link.mtu)
                            .txqueuelen(link.txqueuelen)
                            .up()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl("link set"))?;
                handle
                    .address()
                    .add(index, IpAddr::V4(link.addr), 32)
                    .execute()
                    .await
                    .map_err(nl("address add"))?;
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(link.routed.network(), link.routed.prefix_len())
                    .output_interface(index)
                    .pref_source(link.addr)
                    .scope(RouteScope::Link)
                    .build();
                handle
                    .route()
                    .add(route)
                    .execute()
                    .await
                    .map_err(nl("route add"))?;
            }
            // Read back what the kernel has, so a silently ignored attribute shows up here, not as lost packets.
            for link in links {
                let index = ifindex(link.name)?;
                let msg = handle
                    .link()
                    .get()
                    .match_index(index)
                    .execute()
                    .try_next()
                    .await
                    .map_err(nl("link get"))?
                    .ok_or_else(|| {
                        SetupError::other("link get", format!("{} vanished", link.name))
                    })?;
                use rtnetlink::packet_route::link::LinkAttribute;
                let mtu = msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(*m),
                    _ => None,
                });
                let qlen = msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::TxQueueLen(q) => Some(*q),
                    _ => None,
                });
                if mtu != Some(link.mtu) || qlen != Some(link.txqueuelen) {
                    return Err(SetupError::other(
                        "link verify",
                        format!(
                            "{}: mtu {mtu:?} txqueuelen {qlen:?}, wanted {} / {}",
                            link.name, link.mtu, link.txqueuelen
                        ),
                    ));
                }
            }
            Ok(())
        }
        .await;
        drop(handle);
        conn.abort();
        result
    })
}
