//! The connected on-ramp's IO: `[[onramp.seqpacket]]` Unix `SOCK_SEQPACKET` listeners and their connections,
//! driven by the data-path thread (`onramp::pump`) next to the WireGuard socket.
//!
//! A connection's life:
//! 1. accept: the socket file's mode was the first gate; `SO_PEERCRED` uid/gid must be on the entry
//!    (`uids`/`gids`), and the entry must have room (`max_connections`), else it is refused;
//! 2. its first datagram is an RCX1 context ([`super::context`]) naming a tenant the entry grants, and a site
//!    and device the grant allows; the gateway answers with a [`Reply`] (unless `reply = false`, Oxy's pure
//!    protocol) and closes the connection after a refusal;
//! 3. accepted, it gets a core slot (`Gateway::open_conn`) and from then on every datagram is one raw IPv4/IPv6
//!    packet each way. Datagrams that are not IP packets are counted, and after `max_bad_packets` of them the
//!    connection is closed. A packet for a client whose socket is full is counted (`onramp_backpressure`);
//! 4. closing it (either side) ends its flows (`Gateway::close_conn`), as removing a device does. A reload
//!    re-checks every connection against the new entry and closes those it no longer allows.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};

use super::context::{Context, Reply, Status};
use crate::config::{Config, DeviceName, OnrampGrant, SeqpacketOnramp, TenantId};
use crate::core::conn::ConnGrant;
use crate::core::{DropReason, Gateway, Metrics, PeerSlot, TxQueue};

/// Datagrams read from one connection per loop turn (the others and the WireGuard socket get their turn).
const CONN_BATCH: usize = 64;
/// A client that sends no first datagram within this long is closed (refused ones get no answer then).
const CONTEXT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Refused clients waiting for their answer (`State::Refusing`), all entries together.
const MAX_REFUSING: usize = 16;
/// Socket buffers of an accepted connection.
const CONN_BUFFER: usize = 4 << 20;

/// A bound listener of one entry, made before the gateway drops its privileges.
pub struct Listener {
    pub name: String,
    fd: OwnedFd,
}

/// Creates the entry's socket (replacing a stale socket file, never any other file), sets its mode, listens.
pub fn bind(entry: &SeqpacketOnramp) -> std::io::Result<Listener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(m) = std::fs::symlink_metadata(&entry.path) {
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        std::fs::remove_file(&entry.path)?;
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(&entry.path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    std::fs::set_permissions(&entry.path, std::fs::Permissions::from_mode(entry.mode))?;
    socket::listen(&fd, socket::Backlog::new(128)?)?;
    Ok(Listener {
        name: entry.name.clone(),
        fd,
    })
}

/// Whether a grant lets a client claim `site` and `device` (absent claims are always allowed).
pub fn claims_allowed(g: &OnrampGrant, site: Option<&str>, device: Option<&str>) -> bool {
    let ok = |list: &Option<Vec<String>>, v: Option<&str>| match (list, v) {
        (Some(l), Some(v)) => l.iter().any(|x| x == v),
        _ => true,
    };
    ok(&g.sites, site) && ok(&g.devices, device)
}

/// Checks a first datagram against the entry: a whole, valid context naming a tenant it grants, and a site and
/// device the grant allows.
pub fn authorize<'a>(
    entry: &'a SeqpacketOnramp,
    first: &'a [u8],
) -> Result<(Context<'a>, &'a OnrampGrant), Status> {
    let (ctx, len) = Context::parse(first).map_err(|_| Status::Malformed)?;
    if len != first.len() {
        return Err(Status::Malformed);
    }
    let tenant = ctx.tenant.ok_or(Status::Malformed)?;
    let grant = entry.grant(tenant).ok_or(Status::TenantNotAllowed)?;
    if !claims_allowed(grant, ctx.site, ctx.device) {
        return Err(Status::ClaimNotAllowed);
    }
    Ok((ctx, grant))
}

#[allow(clippy::large_enum_variant)] // one per connection, not per packet
enum State {
    /// Waiting for the context.
    Context,
    /// Refused at accept (uid/gid, too many connections): the reason is sent in answer to the first datagram,
    /// once it has been read (closing with it unread would reset the connection before the client reads).
    Refusing(Status),
    Open {
        slot: PeerSlot,
        session: u64,
        tenant: TenantId,
        site: Option<String>,
        device: Option<String>,
        grant: OnrampGrant,
    },
}

struct Conn {
    fd: OwnedFd,
    entry: String,
    uid: u32,
    gid: u32,
    pid: i32,
    reply: bool,
    state: State,
    bad: u32,
    max_bad: u32,
    accepted_at: Instant,
}

/// Every listener and connection of the connected on-ramps.
pub struct Seqpacket {
    listeners: Vec<Listener>,
    conns: Vec<Conn>,
    by_slot: HashMap<PeerSlot, usize>,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    buf: Vec<u8>,
    next_session: u64,
    ended: Vec<PeerSlot>,
}

impl Seqpacket {
    pub fn new(listeners: Vec<Listener>, cfg: Arc<Config>, metrics: Arc<Metrics>) -> Seqpacket {
        Seqpacket {
            listeners,
            conns: Vec::new(),
            by_slot: HashMap::new(),
            cfg,
            metrics,
            // One byte more than any IP packet: a longer datagram is garbage (MSG_TRUNC reports its size).
            buf: vec![0; 65_536],
            next_session: 1,
            ended: Vec::new(),
        }
    }

    /// Descriptors to poll: the listeners, then the connections (`handle` takes readiness in this order).
    pub fn fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.listeners.iter().map(|l| l.fd.as_raw_fd()));
        out.extend(self.conns.iter().map(|c| c.fd.as_raw_fd()));
    }

    fn entry(&self, name: &str) -> Option<&SeqpacketOnramp> {
        self.cfg.seqpacket_onramps.iter().find(|e| e.name == name)
    }

    fn refuse(&self, fd: &OwnedFd, reply: bool, status: Status) {
        self.count_refusal(status);
        Self::send_refusal(fd, reply, status);
    }

    fn count_refusal(&self, status: Status) {
        let reason = if status == Status::Malformed {
            DropReason::OnrampBadContext
        } else {
            DropReason::OnrampRefused
        };
        self.metrics.global.unattributed.count_drop(reason);
    }

    fn send_refusal(fd: &OwnedFd, reply: bool, status: Status) {
        if reply {
            let _ = socket::send(
                fd.as_raw_fd(),
                &Reply { status, session: 0 }.to_bytes(),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            );
        }
    }

    /// Handles readiness (`ready` in `fds` order): accepts, contexts, packets, closes.
    pub fn handle(&mut self, gw: &mut Gateway, now: Instant, ready: &[bool], tx: &mut TxQueue) {
        let nl = self.listeners.len();
        let mut close = Vec::new();
        for (ci, _) in ready
            .iter()
            .enumerate()
            .skip(nl)
            .filter(|(_, &r)| r)
            .map(|(i, r)| (i - nl, r))
        {
            if ci < self.conns.len() && self.read_conn(gw, now, ci, tx) {
                close.push(ci);
            }
        }
        // Highest index first, so `swap_remove` never moves a connection still to be closed.
        close.sort_unstable();
        for ci in close.into_iter().rev() {
            self.close(gw, now, ci, tx);
        }
        // Clients that never sent their context (or never read their refusal) do not hold a place for ever.
        let mut stale: Vec<usize> = (0..self.conns.len())
            .filter(|&ci| {
                let c = &self.conns[ci];
                !matches!(c.state, State::Open { .. })
                    && now.saturating_duration_since(c.accepted_at) >= CONTEXT_WAIT
            })
            .collect();
        stale.sort_unstable();
        for ci in stale.into_iter().rev() {
            tracing::debug!(onramp = %self.conns[ci].entry, pid = self.conns[ci].pid, "on-ramp client sent no context in time; closing it");
            if matches!(self.conns[ci].state, State::Context) {
                self.count_refusal(Status::Malformed);
            }
            self.close(gw, now, ci, tx);
        }
        for li in (0..nl).filter(|&i| ready.get(i) == Some(&true)) {
            self.accept(li, now);
        }
    }

    fn accept(&mut self, li: usize, now: Instant) {
        for _ in 0..CONN_BATCH {
            let fd = match socket::accept4(
                self.listeners[li].fd.as_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "on-ramp accept failed");
                    return;
                }
            };
            let name = self.listeners[li].name.clone();
            let Some(entry) = self.entry(&name) else {
                // The entry was removed by a reload: nobody may use its socket any more.
                self.refuse(&fd, true, Status::NotPermitted);
                continue;
            };
            let (reply, max_bad, max_conns) =
                (entry.reply, entry.max_bad_packets, entry.max_connections);
            let (uid, gid, pid) = match socket::getsockopt(&fd, sockopt::PeerCredentials) {
                Ok(c) => (c.uid(), c.gid(), c.pid()),
                Err(_) => (u32::MAX, u32::MAX, 0),
            };
            let refusal = if !entry.admits(uid, gid) {
                tracing::warn!(onramp = %name, uid, gid, pid, "on-ramp client refused: uid/gid not allowed");
                Some(Status::NotPermitted)
            } else if self
                .conns
                .iter()
                .filter(|c| c.entry == name && !matches!(c.state, State::Refusing(_)))
                .count()
                >= max_conns
            {
                tracing::warn!(onramp = %name, uid, pid, "on-ramp client refused: too many connections");
                Some(Status::TooManyConnections)
            } else {
                None
            };
            if let Some(status) = refusal {
                self.count_refusal(status);
                // At most a few refused clients wait for their answer; beyond that they are closed unanswered.
                let waiting = self
                    .conns
                    .iter()
                    .filter(|c| matches!(c.state, State::Refusing(_)))
                    .count();
                if waiting >= MAX_REFUSING {
                    continue;
                }
            }
            let _ = socket::setsockopt(&fd, sockopt::SndBuf, &CONN_BUFFER);
            let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &CONN_BUFFER);
            self.conns.push(Conn {
                fd,
                entry: name,
                uid,
                gid,
                pid,
                reply,
                state: refusal.map_or(State::Context, State::Refusing),
                bad: 0,
                max_bad,
                accepted_at: now,
            });
        }
    }

    /// Reads what connection `ci` sent; true when it must be closed.
    fn read_conn(&mut self, gw: &mut Gateway, now: Instant, ci: usize, tx: &mut TxQueue) -> bool {
        for _ in 0..CONN_BATCH {
            let fd = self.conns[ci].fd.as_raw_fd();
            let n = match socket::recv(
                fd,
                &mut self.buf,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
            ) {
                // End of the connection (a SEQPACKET peer closing; zero-length datagrams end it too).
                Ok(0) => return true,
                Ok(n) => n,
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => return false,
                Err(_) => return true,
            };
            let truncated = n > self.buf.len();
            let c = &mut self.conns[ci];
            let slot = match c.state {
                State::Refusing(status) => {
                    Self::send_refusal(&c.fd, c.reply, status);
                    return true;
                }
                State::Context => {
                    return if truncated {
                        self.refuse(&self.conns[ci].fd, self.conns[ci].reply, Status::Malformed);
                        true
                    } else {
                        !self.open(gw, now, ci, n)
                    };
                }
                State::Open { slot, .. } => slot,
            };
            let ok = !truncated && gw.handle_conn_packet(now, slot, &mut self.buf[..n], tx);
            if !ok {
                if truncated {
                    gw.count_conn_drop(slot, DropReason::InvalidInnerPacket);
                }
                c.bad += 1;
                if c.bad >= c.max_bad {
                    tracing::warn!(onramp = %c.entry, pid = c.pid, bad = c.bad, "on-ramp connection closed: too many datagrams that are not IP packets");
                    self.metrics.global.onramp_closed_bad.add(1);
                    return true;
                }
            }
        }
        false
    }

    /// The first datagram (`self.buf[..n]`) of connection `ci`: accept it or refuse. False: close it.
    fn open(&mut self, gw: &mut Gateway, now: Instant, ci: usize, n: usize) -> bool {
        let c = &self.conns[ci];
        let Some(entry) = self.entry(&c.entry) else {
            self.refuse(&c.fd, c.reply, Status::NotPermitted);
            return false;
        };
        let (ctx, grant) = match authorize(entry, &self.buf[..n]) {
            Ok(v) => v,
            Err(status) => {
                tracing::warn!(onramp = %c.entry, uid = c.uid, pid = c.pid, %status, "on-ramp context refused");
                self.refuse(&c.fd, c.reply, status);
                return false;
            }
        };
        let grant = grant.clone();
        let (site, device) = (ctx.site.map(str::to_string), ctx.device.map(str::to_string));
        let name = DeviceName::onramp_subject(&c.entry, site.as_deref(), device.as_deref());
        let slot = gw.open_conn(
            now,
            ConnGrant {
                tenant: grant.tenant.clone(),
                prefixes: grant.prefixes.clone(),
                name: name.clone(),
                user: grant.user.clone(),
                groups: grant.groups.clone(),
                mtu: None,
            },
        );
        let Some(slot) = slot else {
            self.refuse(&c.fd, c.reply, Status::UnknownTenant);
            return false;
        };
        let session = self.next_session;
        self.next_session += 1;
        if c.reply {
            let _ = socket::send(
                c.fd.as_raw_fd(),
                &Reply {
                    status: Status::Accepted,
                    session,
                }
                .to_bytes(),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            );
        }
        tracing::info!(onramp = %c.entry, tenant = %grant.tenant, subject = %name, session, uid = c.uid, pid = c.pid, "on-ramp connection accepted");
        self.metrics.global.onramp_accepted.add(1);
        self.by_slot.insert(slot, ci);
        self.conns[ci].state = State::Open {
            slot,
            session,
            tenant: grant.tenant.clone(),
            site,
            device,
            grant,
        };
        self.metrics
            .global
            .onramp_connections
            .set(self.by_slot.len() as u64);
        true
    }

    fn close(&mut self, gw: &mut Gateway, now: Instant, ci: usize, tx: &mut TxQueue) {
        let c = self.conns.swap_remove(ci);
        if let State::Open { slot, session, .. } = c.state {
            self.by_slot.remove(&slot);
            gw.close_conn(now, slot, tx);
            tracing::info!(onramp = %c.entry, session, "on-ramp connection ended");
        }
        // The connection that moved into `ci` keeps its slot, under its new index.
        if let Some(State::Open { slot, .. }) = self.conns.get(ci).map(|c| &c.state) {
            self.by_slot.insert(*slot, ci);
        }
        self.metrics
            .global
            .onramp_connections
            .set(self.by_slot.len() as u64);
    }

    /// Writes what the core queued for connections. A full socket drops the packet, counted.
    pub fn write(&mut self, gw: &mut Gateway) {
        if gw.conn_queue().is_empty() {
            return;
        }
        let q = std::mem::take(gw.conn_queue());
        for (slot, pkt) in q.iter() {
            let Some(&ci) = self.by_slot.get(&slot) else {
                continue;
            };
            match socket::send(
                self.conns[ci].fd.as_raw_fd(),
                pkt,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(_) => {}
                Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => {
                    gw.count_conn_drop(slot, DropReason::OnrampBackpressure)
                }
                // The client is gone; its close is read on the next turn.
                Err(_) => gw.count_conn_drop(slot, DropReason::DestinationOffline),
            }
        }
        let mut q = q;
        q.clear();
        *gw.conn_queue() = q;
    }

    /// After a reload: connections the new config no longer allows are closed (and so are those whose tenant
    /// the core already ended).
    pub fn apply(&mut self, cfg: Arc<Config>, gw: &mut Gateway, now: Instant, tx: &mut TxQueue) {
        self.cfg = cfg;
        for e in &self.cfg.seqpacket_onramps {
            if !self.listeners.iter().any(|l| l.name == e.name) {
                tracing::warn!(onramp = %e.name, "new [[onramp.seqpacket]] entry: its socket is created at the next restart");
            }
        }
        gw.take_ended_conns(&mut self.ended);
        let mut close = Vec::new();
        for (ci, c) in self.conns.iter().enumerate() {
            let keep = match (&c.state, self.entry(&c.entry)) {
                (_, None) => false,
                (_, Some(e)) if !e.admits(c.uid, c.gid) => false,
                (State::Context | State::Refusing(_), Some(_)) => true,
                (
                    State::Open {
                        slot,
                        tenant,
                        site,
                        device,
                        grant,
                        ..
                    },
                    Some(e),
                ) => {
                    !self.ended.contains(slot)
                        && e.grant(tenant.as_str()) == Some(grant)
                        && claims_allowed(grant, site.as_deref(), device.as_deref())
                }
            };
            if !keep {
                tracing::info!(onramp = %c.entry, pid = c.pid, "on-ramp connection no longer allowed after the reload; closing it");
                close.push(ci);
            }
        }
        for &slot in &self.ended {
            if let Some(&ci) = self.by_slot.get(&slot) {
                if !close.contains(&ci) {
                    close.push(ci);
                }
            }
        }
        close.sort_unstable();
        for ci in close.into_iter().rev() {
            self.close(gw, now, ci, tx);
        }
        self.ended.clear();
    }

    /// Drops every connection (the core ends their flows in its own shutdown).
    pub fn shutdown(&mut self) {
        self.conns.clear();
        self.by_slot.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onramp::context::Context;

    fn entry() -> SeqpacketOnramp {
        let text = r#"
[gateway]
state_dir = "/nonexistent"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
[[tenant]]
id = "globex"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
[[onramp.seqpacket]]
name = "warp"
path = "/run/x.sock"
uids = [998]
[[onramp.seqpacket.tenant]]
id = "acme"
prefixes = "10.7.0.0/16"
sites = ["branch-7"]
"#;
        Config::from_toml(text, std::path::Path::new("/t.toml"))
            .unwrap()
            .seqpacket_onramps
            .remove(0)
    }

    fn ctx(tenant: Option<&str>, site: Option<&str>) -> Vec<u8> {
        let c = Context {
            tenant,
            site,
            ..Context::default()
        };
        let mut b = vec![0; c.buffer_len()];
        let n = c.emit(&mut b).unwrap();
        b.truncate(n);
        b
    }

    #[test]
    fn authorize_refuses_what_the_entry_does_not_grant() {
        let e = entry();
        // Positive controls.
        assert!(authorize(&e, &ctx(Some("acme"), Some("branch-7"))).is_ok());
        assert!(authorize(&e, &ctx(Some("acme"), None)).is_ok());
        // A tenant the entry may not claim (it exists in the config).
        assert_eq!(
            authorize(&e, &ctx(Some("globex"), None)).unwrap_err(),
            Status::TenantNotAllowed
        );
        assert_eq!(
            authorize(&e, &ctx(Some("acme"), Some("branch-8"))).unwrap_err(),
            Status::ClaimNotAllowed
        );
        // Malformed: no tenant, garbage, trailing bytes after the context.
        assert_eq!(
            authorize(&e, &ctx(None, None)).unwrap_err(),
            Status::Malformed
        );
        assert_eq!(
            authorize(&e, b"GET / HTTP/1.1").unwrap_err(),
            Status::Malformed
        );
        let mut long = ctx(Some("acme"), None);
        long.extend_from_slice(&[0x45, 0, 0, 20]);
        assert_eq!(authorize(&e, &long).unwrap_err(), Status::Malformed);
    }
}
