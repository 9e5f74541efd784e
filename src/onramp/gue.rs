//! The unconnected on-ramp's IO: `[[onramp.gue]]` UDP sockets taking GUE from branch sites, driven by the
//! data-path thread (`onramp::pump`) next to the WireGuard socket and the SEQPACKET on-ramp.
//!
//! Each site is a core subject with a slot of its own (`Gateway::open_conn`, `Link::Conn`), opened when the
//! pump starts (and on reloads that add or change sites). Per datagram, in order:
//! 1. the outer source address names the site (one hash lookup; unknown -> `gue_unknown_source`);
//! 2. the GUE header is checked ([`header`]; flags -> `gue_flags`, control messages -> `gue_control`,
//!    anything else -> `gue_malformed`);
//! 3. a keyed site's private data must verify ([`auth`]: key id, tag, replay window); an unkeyed site's
//!    private data is never read (a context in it proves nothing);
//! 4. the inner packet goes to `Gateway::handle_conn_packet`: its source must be in the site's
//!    `inner_prefixes` (`spoofed_source` otherwise), then flows, policy, off-ramp as for any device.
//!
//! Packets for a site are queued by the core under its slot (`ConnOut`); [`Gue::write`] puts a variant 0
//! header without private data in front (what a Linux `encap gue` tunnel takes) and sends them to the address
//! the site last sent from, at its `port`. A packet larger than the site's `mtu` is never fragmented: the
//! core answers its sender with ICMP too big (`ConnLink::mtu`), and one that still arrives here is dropped
//! (`gue_too_big`).
//!
//! The socket is bound to the entry's address (never the wildcard), so replies leave from the address the
//! site sends to without `IP_PKTINFO`.
#![deny(unsafe_code)]

pub mod auth;
pub mod header;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Config, DeviceName, GueSite};
use crate::core::conn::ConnGrant;
use crate::core::{DropReason, Gateway, Metrics, PeerSlot, TxQueue};
use crate::sys;
use auth::{AuthError, ReplayWindow, SiteKey};
use header::Gue as Parsed;

/// Socket buffers of a GUE socket.
const SOCKET_BUFFER: usize = 4 << 20;
/// Receive batches per socket per loop turn (each up to `sys::BATCH` datagrams).
const RECV_TURNS: usize = 4;

/// A bound socket of one entry, made before the gateway drops its privileges.
pub struct Listener {
    pub name: String,
    socket: UdpSocket,
}

/// Binds the entry's UDP socket.
pub fn bind(entry: &crate::config::GueOnramp) -> std::io::Result<Listener> {
    let socket = UdpSocket::bind(entry.listen)?;
    socket.set_nonblocking(true)?;
    let fd = std::os::fd::AsFd::as_fd(&socket);
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &SOCKET_BUFFER);
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER);
    Ok(Listener {
        name: entry.name.clone(),
        socket,
    })
}

/// A site with its core slot.
struct Site {
    listener: usize,
    cfg: GueSite,
    slot: PeerSlot,
    key: Option<SiteKey>,
    window: ReplayWindow,
    /// Where the site last sent from (its first `remote` until it sends).
    reply_to: SocketAddr,
}

struct Socket {
    listener: Listener,
    sender: sys::UdpSender,
    tx: TxQueue,
    /// Outer source address -> index in `Gue::sites`.
    by_remote: HashMap<IpAddr, usize>,
}

/// Every GUE socket and site.
pub struct Gue {
    sockets: Vec<Socket>,
    sites: Vec<Site>,
    by_slot: HashMap<PeerSlot, usize>,
    cfg: Arc<Config>,
    metrics: Arc<Metrics>,
    rx: sys::RecvBatch,
}

impl Gue {
    pub fn new(listeners: Vec<Listener>, cfg: Arc<Config>, metrics: Arc<Metrics>) -> Gue {
        Gue {
            sockets: listeners
                .into_iter()
                .map(|l| Socket {
                    sender: sys::UdpSender::new(&l.socket),
                    listener: l,
                    tx: TxQueue::new(),
                    by_remote: HashMap::new(),
                })
                .collect(),
            sites: Vec::new(),
            by_slot: HashMap::new(),
            cfg,
            metrics,
            rx: sys::RecvBatch::new(65_536),
        }
    }

    /// Descriptors to poll, one per socket (`handle` takes readiness in this order).
    pub fn fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.sockets.iter().map(|s| s.listener.socket.as_raw_fd()));
    }

    /// Opens the sites of the config it was made with (the pump calls this once, before its loop).
    pub fn start(&mut self, gw: &mut Gateway, now: Instant, tx: &mut TxQueue) {
        self.apply(self.cfg.clone(), gw, now, tx);
    }

    /// Opens the configured sites (at start, and after a reload: sites whose settings changed or that are
    /// gone are closed, which ends their flows; new ones get a slot).
    pub fn apply(&mut self, cfg: Arc<Config>, gw: &mut Gateway, now: Instant, tx: &mut TxQueue) {
        self.cfg = cfg;
        let cfg = self.cfg.clone();
        let mut wanted: Vec<(usize, &GueSite)> = Vec::new();
        for e in &cfg.gue_onramps {
            match self.sockets.iter().position(|s| s.listener.name == e.name) {
                Some(li) => wanted.extend(e.sites.iter().map(|s| (li, s))),
                None => {
                    tracing::warn!(onramp = %e.name, "new [[onramp.gue]] entry: its socket is bound at the next restart")
                }
            }
        }
        let mut kept = Vec::new();
        for site in std::mem::take(&mut self.sites) {
            if wanted
                .iter()
                .any(|&(li, s)| li == site.listener && *s == site.cfg)
            {
                kept.push(site);
            } else {
                tracing::info!(site = %site.cfg.name, "GUE site removed or changed by the reload; its flows end");
                gw.close_conn(now, site.slot, tx);
            }
        }
        for (li, s) in wanted {
            if kept
                .iter()
                .any(|k| k.listener == li && k.cfg.name == s.name)
            {
                continue;
            }
            let onramp = &self.sockets[li].listener.name;
            let grant = ConnGrant {
                tenant: s.tenant.clone(),
                prefixes: s.inner_prefixes.clone(),
                name: DeviceName::onramp_subject(onramp, Some(&s.name), None),
                user: s.user.clone(),
                groups: s.groups.clone(),
                mtu: Some(s.mtu),
            };
            let Some(slot) = gw.open_conn(now, grant) else {
                tracing::error!(onramp = %onramp, site = %s.name, "no slot for a GUE site; its packets are dropped");
                continue;
            };
            tracing::info!(onramp = %onramp, site = %s.name, tenant = %s.tenant, keyed = s.key.is_some(), "GUE site open");
            kept.push(Site {
                listener: li,
                key: s.key.as_ref().map(|k| SiteKey::new(k.id, &k.secret)),
                window: ReplayWindow::default(),
                reply_to: SocketAddr::new(s.remotes[0], s.port),
                cfg: s.clone(),
                slot,
            });
        }
        self.sites = kept;
        self.by_slot.clear();
        for s in &mut self.sockets {
            s.by_remote.clear();
        }
        for (i, site) in self.sites.iter().enumerate() {
            self.by_slot.insert(site.slot, i);
            let map = &mut self.sockets[site.listener].by_remote;
            for &r in &site.cfg.remotes {
                map.insert(r, i);
            }
        }
    }

    /// Reads every ready socket (batched) and hands each datagram's inner packet to the core.
    pub fn handle(&mut self, gw: &mut Gateway, now: Instant, ready: &[bool], tx: &mut TxQueue) {
        for li in 0..self.sockets.len() {
            if ready.get(li) != Some(&true) {
                continue;
            }
            for _ in 0..RECV_TURNS {
                match sys::recv_batch(&self.sockets[li].listener.socket, &mut self.rx) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "GUE receive error");
                        break;
                    }
                }
                let n = self.rx.meta.len();
                for k in 0..n {
                    let sys::Received {
                        buf: bi,
                        from,
                        len,
                        truncated,
                        segments,
                    } = self.rx.meta[k];
                    self.metrics.global.gue_rx.add(1);
                    // GUE sockets do not ask for UDP_GRO: anything but one datagram is not understood.
                    if truncated || segments != sys::Segments::One {
                        self.metrics
                            .global
                            .unattributed
                            .count_drop(DropReason::GueMalformed);
                        continue;
                    }
                    let d = &mut self.rx.bufs[bi][..len];
                    receive(
                        gw,
                        now,
                        &self.sockets[li].by_remote,
                        &mut self.sites,
                        &self.metrics,
                        from,
                        d,
                        tx,
                    );
                }
                if n < sys::BATCH {
                    break;
                }
            }
        }
    }

    /// Sends what the core queued for sites. Leaves the queue for the SEQPACKET on-ramp, which clears it.
    pub fn write(&mut self, gw: &mut Gateway) {
        if self.sites.is_empty() || gw.conn_queue().is_empty() {
            return;
        }
        let q = std::mem::take(gw.conn_queue());
        for (slot, pkt) in q.iter() {
            let Some(&si) = self.by_slot.get(&slot) else {
                continue;
            };
            let site = &self.sites[si];
            let Some(proto) = header::proto_of(pkt) else {
                continue;
            };
            if pkt.len() > usize::from(site.cfg.mtu) {
                gw.count_conn_drop(slot, DropReason::GueTooBig);
                continue;
            }
            let h = header::data_header(proto, 0).expect("no private data");
            let sock = &mut self.sockets[site.listener];
            let buf = sock.tx.slot(site.reply_to, h.len() + pkt.len());
            buf[..h.len()].copy_from_slice(&h);
            buf[h.len()..h.len() + pkt.len()].copy_from_slice(pkt);
            sock.tx.commit(h.len() + pkt.len());
        }
        *gw.conn_queue() = q;
        for s in &mut self.sockets {
            if s.tx.is_empty() {
                continue;
            }
            let st = s.sender.send(
                &s.listener.socket,
                s.tx.trains().map(|t| (t.to, t.seg, t.segments, t.data)),
            );
            self.metrics.global.gue_tx.add(st.sent as u64);
            self.metrics.global.send_errors.add(st.failed as u64);
            s.tx.clear();
        }
    }

    /// Ends every site (the core ends their flows in its own shutdown).
    pub fn shutdown(&mut self) {
        self.sites.clear();
        self.by_slot.clear();
    }
}

/// One datagram from `from`: find the site, check the header (and the tag of a keyed site), pass the inner
/// packet on. Every refusal is counted, on the site's tenant once the site is known.
#[allow(clippy::too_many_arguments)]
fn receive(
    gw: &mut Gateway,
    now: Instant,
    by_remote: &HashMap<IpAddr, usize>,
    sites: &mut [Site],
    metrics: &Metrics,
    from: SocketAddr,
    d: &mut [u8],
    tx: &mut TxQueue,
) {
    let Some(&si) = by_remote.get(&from.ip().to_canonical()) else {
        metrics
            .global
            .unattributed
            .count_drop(DropReason::GueUnknownSource);
        return;
    };
    let site = &mut sites[si];
    let (private, payload) = match header::parse(d) {
        Ok(Parsed::Data {
            private, payload, ..
        }) => (private, payload),
        Ok(Parsed::Control { .. }) => return gw.count_conn_drop(site.slot, DropReason::GueControl),
        Err(header::GueError::Flags(_)) => {
            return gw.count_conn_drop(site.slot, DropReason::GueFlags)
        }
        Err(_) => return gw.count_conn_drop(site.slot, DropReason::GueMalformed),
    };
    if let Some(key) = &site.key {
        let hdr = if payload == 0 { &[][..] } else { &d[..4] };
        let verdict = if payload == 0 {
            Err(AuthError::BadContext)
        } else {
            key.verify(
                &mut site.window,
                site.cfg.tenant.as_str(),
                &site.cfg.name,
                hdr,
                private,
                &d[payload..],
            )
        };
        if let Err(e) = verdict {
            let reason = match e {
                AuthError::BadContext => DropReason::GueBadContext,
                AuthError::BadTag => DropReason::GueBadTag,
                AuthError::Replayed => DropReason::Replayed,
            };
            return gw.count_conn_drop(site.slot, reason);
        }
    }
    let to = SocketAddr::new(from.ip().to_canonical(), site.cfg.port);
    if site.reply_to != to {
        tracing::debug!(site = %site.cfg.name, %to, "GUE site sends from another of its addresses");
        site.reply_to = to;
    }
    gw.handle_conn_packet(now, site.slot, &mut d[payload..], tx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const CFG: &str = r#"
[gateway]
state_dir = "/nonexistent"
[[tenant]]
id = "acme"
address_pool = "100.96.0.0/24"
gateway_address = "100.96.0.1"
[[tenant.rule]]
id = "ping-gw"
action = "allow"
dst = ["gateway"]
proto = "icmp"
[[onramp.gue]]
listen = "127.0.0.1:1"
[[onramp.gue.site]]
name = "branch-7"
tenant = "acme"
remote = "127.0.0.2"
inner_prefixes = "10.7.0.0/16"
mtu = 576
"#;

    fn sum(b: &[u8]) -> u16 {
        let mut s: u32 = b
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    /// An ICMP echo request `src -> dst` with `extra` bytes of payload.
    fn echo(src: [u8; 4], dst: [u8; 4], extra: usize) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
        icmp.resize(8 + extra, 0x61);
        let ck = sum(&icmp);
        icmp[2..4].copy_from_slice(&ck.to_be_bytes());
        let total = (20 + icmp.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let ck = sum(&ip);
        ip[10..12].copy_from_slice(&ck.to_be_bytes());
        [ip, icmp].concat()
    }

    struct Harness {
        gw: Gateway,
        gue: Gue,
        metrics: Arc<Metrics>,
        site_rx: UdpSocket,
        tx: TxQueue,
    }

    /// A gateway with the site opened through `Gue::start`; the site's replies go to `site_rx` on 127.0.0.2.
    fn harness() -> Harness {
        let site_rx = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
        site_rx
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = site_rx.local_addr().unwrap().port();
        let text = format!("{CFG}port = {port}\n");
        let cfg = Arc::new(Config::from_toml(&text, std::path::Path::new("/t.toml")).unwrap());
        let metrics = Arc::new(Metrics::default());
        let now = Instant::now();
        let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            .parse()
            .unwrap();
        let mut gw = Gateway::new(0, &key, metrics.clone(), now);
        let mut tx = TxQueue::new();
        gw.apply(&cfg, now, &mut tx);
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let listener = Listener {
            name: "gue".into(),
            socket,
        };
        let mut gue = Gue::new(vec![listener], cfg, metrics.clone());
        gue.start(&mut gw, now, &mut tx);
        assert_eq!(gue.sites.len(), 1);
        Harness {
            gw,
            gue,
            metrics,
            site_rx,
            tx,
        }
    }

    impl Harness {
        fn receive(&mut self, from: &str, d: &[u8]) {
            let mut d = d.to_vec();
            receive(
                &mut self.gw,
                Instant::now(),
                &self.gue.sockets[0].by_remote,
                &mut self.gue.sites,
                &self.metrics,
                from.parse().unwrap(),
                &mut d,
                &mut self.tx,
            );
        }

        /// What the pump does after a batch: GUE writes its sites' packets, the SEQPACKET on-ramp clears.
        fn write(&mut self) {
            self.gue.write(&mut self.gw);
            self.gw.conn_queue().clear();
        }

        fn dropped(&self, tenant: &str, r: DropReason) -> u64 {
            if tenant.is_empty() {
                return self.metrics.global.unattributed.drops(r);
            }
            self.metrics
                .tenants()
                .iter()
                .find(|(t, _)| t.as_str() == tenant)
                .map_or(0, |(_, c)| c.drops(r))
        }
    }

    #[test]
    fn a_site_is_answered_in_gue_and_every_refusal_is_counted() {
        let mut h = harness();
        let ping = echo([10, 7, 0, 5], [100, 96, 0, 1], 8);
        let gue0 = [&[0u8, 4, 0, 0][..], &ping].concat();
        // Attack first: the right packet from an outer source that is no site's.
        h.receive("127.0.0.3:40000", &gue0);
        assert_eq!(h.dropped("", DropReason::GueUnknownSource), 1);
        assert!(h.gw.conn_queue().is_empty());
        // Positive control: from the site, answered by the tenant's gateway address, in GUE variant 0.
        h.receive("127.0.0.2:40000", &gue0);
        h.write();
        let mut buf = [0u8; 2048];
        let (n, from) = h
            .site_rx
            .recv_from(&mut buf)
            .expect("the reply reaches the site");
        assert_eq!(from.ip().to_string(), "127.0.0.1");
        assert_eq!(&buf[..4], &[0, 4, 0, 0]);
        let reply = &buf[4..n];
        assert_eq!(
            (&reply[12..16], &reply[16..20]),
            (&[100, 96, 0, 1][..], &[10, 7, 0, 5][..])
        );
        assert_eq!(reply[20], 0, "an echo reply");
        assert_eq!(h.metrics.global.gue_tx.get(), 1);
        // Variant 1 (the bare packet) is taken as well.
        h.receive("127.0.0.2:40000", &ping);
        h.write();
        assert!(h.site_rx.recv_from(&mut buf).is_ok());
        // An inner source outside the site's networks.
        let spoofed = [
            &[0u8, 4, 0, 0][..],
            &echo([10, 8, 0, 5], [100, 96, 0, 1], 8),
        ]
        .concat();
        h.receive("127.0.0.2:40000", &spoofed);
        assert_eq!(h.dropped("acme", DropReason::SpoofedSource), 1);
        // Flags, a control message, garbage.
        h.receive("127.0.0.2:40000", &[&[0u8, 4, 0, 1][..], &ping].concat());
        assert_eq!(h.dropped("acme", DropReason::GueFlags), 1);
        h.receive("127.0.0.2:40000", &[0x20, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(h.dropped("acme", DropReason::GueControl), 1);
        h.receive("127.0.0.2:40000", &[0x80, 4, 0, 0]);
        assert_eq!(h.dropped("acme", DropReason::GueMalformed), 1);
        // A reply larger than the site's MTU (576) is dropped, never fragmented.
        let big = [
            &[0u8, 4, 0, 0][..],
            &echo([10, 7, 0, 5], [100, 96, 0, 1], 1000),
        ]
        .concat();
        h.receive("127.0.0.2:40000", &big);
        h.write();
        assert_eq!(h.dropped("acme", DropReason::GueTooBig), 1);
        assert_eq!(h.metrics.global.gue_tx.get(), 2);
    }

    #[test]
    fn a_reload_without_the_site_ends_it() {
        let mut h = harness();
        let cfg = Arc::new(
            Config::from_toml(
                CFG.split("[[onramp.gue]]").next().unwrap(),
                std::path::Path::new("/t.toml"),
            )
            .unwrap(),
        );
        h.gw.apply(&cfg, Instant::now(), &mut h.tx);
        h.gue.apply(cfg, &mut h.gw, Instant::now(), &mut h.tx);
        assert!(h.gue.sites.is_empty() && h.gue.by_slot.is_empty());
        let ping = [
            &[0u8, 4, 0, 0][..],
            &echo([10, 7, 0, 5], [100, 96, 0, 1], 8),
        ]
        .concat();
        h.receive("127.0.0.2:40000", &ping);
        assert_eq!(h.dropped("", DropReason::GueUnknownSource), 1);
    }
}
