//! The one place for raw syscalls: batched UDP receive/send (`recvmmsg`/`sendmmsg`, UDP GRO receive trains and
//! GSO send trains) and socket options.
//! Every `unsafe` block says why it is sound.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub const BATCH: usize = 32;

/// Receive buffers for one batch, reused across calls.
pub struct RecvBatch {
    pub bufs: Vec<Box<[u8]>>,
    /// One control buffer per message, for the `UDP_GRO` cmsg.
    cmsgs: Vec<[u64; CMSG_WORDS]>,
    /// Per received message, in order. A message whose source cannot be read is skipped without shifting the
    /// others off their buffers.
    pub meta: Vec<Received>,
}

/// Room for the control messages of one received datagram: `UDP_GRO` needs `CMSG_SPACE(4)` = 24 bytes.
const CMSG_WORDS: usize = 8;

/// One message `recv_batch` received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Index of its buffer in `RecvBatch::bufs`.
    pub buf: usize,
    pub from: SocketAddr,
    pub len: usize,
    /// Larger than its buffer: cut short, to be dropped.
    pub truncated: bool,
    /// What the message is made of: one datagram, or (on a socket with `UDP_GRO`) a coalesced train.
    pub segments: Segments,
}

/// The datagrams inside one received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segments {
    /// One datagram (no `UDP_GRO` cmsg).
    One,
    /// A train the kernel coalesced (`UDP_GRO`): datagrams of this many bytes, the last possibly shorter.
    Gro(usize),
    /// The control data could not be read (cut short, or a `UDP_GRO` cmsg of the wrong size or segment size
    /// 0): where one datagram ends is unknown, so the whole message is dropped.
    Malformed,
}

/// The most segments a coalesced message may claim. The kernel coalesces at most 64 (`UDP_GRO_CNT_MAX`);
/// more means the segment size is not what it seems.
pub const MAX_GRO_SEGMENTS: usize = 128;

/// Why a coalesced message cannot be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroError {
    #[error("segment size 0")]
    ZeroSegment,
    #[error("more than {MAX_GRO_SEGMENTS} segments")]
    TooManySegments,
}

/// Splits a message the kernel coalesced with `UDP_GRO` into its datagrams: `seg` bytes each, the last one
/// possibly shorter, in the order they were sent, without copying. An empty message has no datagrams.
pub fn split_gro(msg: &[u8], seg: usize) -> Result<std::slice::Chunks<'_, u8>, GroError> {
    if seg == 0 {
        return Err(GroError::ZeroSegment);
    }
    if msg.len().div_ceil(seg) > MAX_GRO_SEGMENTS {
        return Err(GroError::TooManySegments);
    }
    Ok(msg.chunks(seg))
}

/// Reads the segment size out of a received message's control data (the `msg_controllen` bytes the kernel
/// wrote): `Segments::Gro(size)` for a `UDP_GRO` cmsg, `Segments::One` without one. Anything that does not
/// parse (a header running past the end, a `UDP_GRO` payload that is not one `int`, a size of 0 or above
/// 65,535) is `Segments::Malformed`; other cmsgs are skipped.
pub fn gro_segments(control: &[u8]) -> Segments {
    let hdr = size_of::<libc::cmsghdr>();
    let align = |n: usize| n.next_multiple_of(size_of::<usize>());
    let mut off = 0;
    let mut found = Segments::One;
    while control.len().saturating_sub(off) >= hdr {
        // SAFETY: `hdr` bytes at `off` are in bounds (checked above); cmsghdr holds only integers, so any bit
        // pattern is a valid value, and `read_unaligned` needs no alignment.
        let c: libc::cmsghdr =
            unsafe { std::ptr::read_unaligned(control[off..].as_ptr().cast::<libc::cmsghdr>()) };
        let len = c.cmsg_len as usize;
        if len < hdr || len > control.len() - off {
            return Segments::Malformed;
        }
        if c.cmsg_level == libc::SOL_UDP && c.cmsg_type == libc::UDP_GRO {
            let data = &control[off + hdr..off + len];
            let Ok(raw) = <[u8; size_of::<libc::c_int>()]>::try_from(data) else {
                return Segments::Malformed;
            };
            let seg = libc::c_int::from_ne_bytes(raw);
            if !(1..=i32::from(u16::MAX)).contains(&seg) {
                return Segments::Malformed;
            }
            found = Segments::Gro(seg as usize);
        }
        off = off.saturating_add(align(len));
    }
    found
}

impl RecvBatch {
    /// Buffers of `buf_size` bytes; on a socket with `UDP_GRO` they must hold a whole coalesced train
    /// (`GRO_BUF_SIZE`), or the kernel cuts it short.
    pub fn new(buf_size: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; buf_size].into_boxed_slice())
                .collect(),
            cmsgs: vec![[0; CMSG_WORDS]; BATCH],
            meta: Vec::with_capacity(BATCH),
        }
    }
}

/// The receive buffer a `UDP_GRO` socket needs: the largest UDP payload (a coalesced train is at most one).
pub const GRO_BUF_SIZE: usize = 65_535;

/// Asks the kernel to coalesce datagrams for `sock` (`UDP_GRO`): a train of equal-size datagrams from one
/// source then arrives as one message with the segment size in a cmsg (`recv_batch` reads it into
/// `Received::segments`). `false` where the kernel refuses the option (older than 5.0, or not UDP): the socket
/// then receives datagram by datagram, as before. The caller remembers the answer for the socket.
pub fn enable_gro(sock: &UdpSocket) -> bool {
    match setsockopt_int(sock, libc::SOL_UDP, libc::UDP_GRO, 1) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "UDP GRO refused on the WireGuard socket: receiving datagrams one by one");
            false
        }
    }
}

fn to_socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET; sockaddr_storage is large and aligned enough.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for AF_INET6 / sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let v6 = SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            );
            // A dual-stack socket reports IPv4 peers as v4-mapped: normalise so one host has one identity.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
                None => SocketAddr::V6(v6),
            })
        }
        _ => None,
    }
}

/// Writes `addr` for a socket of family `v6_socket`, mapping IPv4 to v4-mapped IPv6 on IPv6 sockets.
fn from_socket_addr(
    addr: SocketAddr,
    v6_socket: bool,
    ss: &mut libc::sockaddr_storage,
) -> libc::socklen_t {
    let addr = match addr {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        a => a,
    };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Receives up to `BATCH` messages: blocks for the first (up to the socket's receive timeout), then takes
/// whatever else is queued without waiting. Returns `Ok(0)` on timeout. On a socket with `UDP_GRO` a message
/// may be a coalesced train (`Received::segments`; split it with `split_gro`).
pub fn recv_batch(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.meta.clear();
    let n = batch.bufs.len().min(batch.cmsgs.len()).min(BATCH);
    // SAFETY: all-zero bytes are valid for these plain C structs.
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let cmsg_len = size_of::<[u64; CMSG_WORDS]>();
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: batch.bufs[i].as_mut_ptr().cast(),
            iov_len: batch.bufs[i].len(),
        };
        hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
        hdrs[i].msg_hdr.msg_control = batch.cmsgs[i].as_mut_ptr().cast();
        hdrs[i].msg_hdr.msg_controllen = cmsg_len as _;
    }
    // SAFETY: every header points at a live iovec, buffer, address slot and control buffer owned by this frame
    // or `batch`, each valid for the lengths given; the kernel writes at most those lengths.
    let r = unsafe {
        libc::recvmmsg(
            sock.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(0)
            }
            _ => Err(e),
        };
    }
    for (i, h) in hdrs.iter().enumerate().take(r as usize) {
        let flags = h.msg_hdr.msg_flags;
        let segments = if flags & libc::MSG_CTRUNC != 0 {
            Segments::Malformed
        } else {
            #[allow(clippy::unnecessary_cast)] // size_t with glibc, socklen_t with musl
            let written = (h.msg_hdr.msg_controllen as usize).min(cmsg_len);
            // SAFETY: `cmsgs[i]` is `cmsg_len` initialised bytes (u64 words viewed as bytes, no padding).
            let control = unsafe {
                std::slice::from_raw_parts(batch.cmsgs[i].as_ptr().cast::<u8>(), cmsg_len)
            };
            gro_segments(&control[..written])
        };
        if let Some(from) = to_socket_addr(&addrs[i]) {
            batch.meta.push(Received {
                buf: i,
                from,
                len: h.msg_len as usize,
                truncated: flags & libc::MSG_TRUNC != 0,
                segments,
            });
        }
    }
    Ok(batch.meta.len())
}

/// What one `send_batch` or `UdpSender::send` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// Datagrams the kernel took (a GSO train counts its segments).
    pub sent: usize,
    /// Datagrams the kernel refused (each skipped, the rest still sent).
    pub failed: usize,
    /// `sendmmsg` calls made.
    pub calls: usize,
    /// Trains sent as one GSO message (`UDP_SEGMENT`, more than one segment).
    pub trains: usize,
    /// Datagrams that left inside those trains.
    pub train_datagrams: usize,
    /// Trains the kernel refused as GSO and that were sent again as separate datagrams.
    pub fallbacks: usize,
}

impl std::ops::AddAssign for SendStats {
    fn add_assign(&mut self, o: SendStats) {
        self.sent += o.sent;
        self.failed += o.failed;
        self.calls += o.calls;
        self.trains += o.trains;
        self.train_datagrams += o.train_datagrams;
        self.fallbacks += o.fallbacks;
    }
}

/// Sends every datagram, `BATCH` per `sendmmsg`. A datagram the kernel refuses (unreachable destination and
/// the like) is skipped and counted as failed; it never stops the rest.
pub fn send_batch<'a>(
    sock: &UdpSocket,
    v6_socket: bool,
    msgs: impl Iterator<Item = (SocketAddr, &'a [u8])>,
) -> SendStats {
    let mut st = SendStats::default();
    let mut out = Outbox::new(v6_socket);
    for (to, data) in msgs {
        if out.is_full() {
            st += out.flush(sock).0;
        }
        out.push(to, data, data.len(), 1, false);
    }
    st += out.flush(sock).0;
    st
}

/// Up to `BATCH` messages for one `sendmmsg`, each a datagram or a GSO train with its `UDP_SEGMENT` cmsg.
struct Outbox<'a> {
    v6_socket: bool,
    n: usize,
    addrs: [libc::sockaddr_storage; BATCH],
    iovs: [libc::iovec; BATCH],
    /// One control buffer per message: room for a `cmsghdr` and its u16, 8-byte aligned.
    cmsgs: [[u64; 4]; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    msgs: [Option<Msg<'a>>; BATCH],
}

/// A queued message: destination, bytes, segment size, segments, and whether it carries `UDP_SEGMENT`.
type Msg<'a> = (SocketAddr, &'a [u8], usize, usize, bool);

/// `errno` values that mean "this socket or route cannot do UDP GSO" (no checksum offload on the egress
/// device, a kernel without `UDP_SEGMENT`).
fn is_gso_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO) | Some(libc::ENOPROTOOPT) | Some(libc::EOPNOTSUPP)
    )
}

impl<'a> Outbox<'a> {
    fn new(v6_socket: bool) -> Outbox<'a> {
        Outbox {
            v6_socket,
            n: 0,
            // SAFETY: all-zero bytes are valid for these plain C structs.
            addrs: unsafe { zeroed() },
            // SAFETY: as above.
            iovs: unsafe { zeroed() },
            cmsgs: [[0; 4]; BATCH],
            // SAFETY: as above.
            hdrs: unsafe { zeroed() },
            msgs: [None; BATCH],
        }
    }

    fn is_full(&self) -> bool {
        self.n == BATCH
    }

    fn push(&mut self, to: SocketAddr, data: &'a [u8], seg: usize, segments: usize, gso: bool) {
        debug_assert!(!self.is_full());
        self.msgs[self.n] = Some((to, data, seg, segments, gso));
        self.n += 1;
    }

    /// Sends the queued messages in order and empties the box. A message the kernel refuses is skipped and
    /// its datagrams counted as failed, except a GSO train refused for lack of GSO support: that one is
    /// returned (with every message after it, unsent) for the caller to send again without GSO, together with
    /// the error.
    #[allow(clippy::type_complexity)]
    fn flush(&mut self, sock: &UdpSocket) -> (SendStats, Option<(io::Error, Vec<Msg<'a>>)>) {
        let mut st = SendStats::default();
        let n = std::mem::take(&mut self.n);
        let cmsg_space = cmsg_space_u16();
        for i in 0..n {
            let (to, data, seg, _, gso) = self.msgs[i].expect("queued");
            let namelen = from_socket_addr(to, self.v6_socket, &mut self.addrs[i]);
            self.iovs[i] = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = namelen;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            if gso {
                h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
                h.msg_controllen = cmsg_space;
                // SAFETY: `h.msg_control` points at `cmsgs[i]` (32 bytes, 8-byte aligned), at least
                // CMSG_SPACE(2) = 24 bytes on 64-bit Linux (checked by `cmsg_space_u16`), so CMSG_FIRSTHDR is
                // non-null and the header plus its u16 fit inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                }
            }
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        let mut off = 0;
        while off < n {
            st.calls += 1;
            // SAFETY: headers [off, n) point at live address slots, iovecs, control buffers (all in `self`) and
            // caller-owned data that outlive the call; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.hdrs[off..].as_mut_ptr(),
                    (n - off) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                for m in &self.msgs[off..off + r as usize] {
                    let (_, _, _, segments, gso) = m.expect("queued");
                    st.sent += segments;
                    if gso {
                        st.trains += 1;
                        st.train_datagrams += segments;
                    }
                }
                off += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let (_, _, _, segments, gso) = self.msgs[off].expect("queued");
            if gso && (is_gso_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL)) {
                let rest = self.msgs[off..n]
                    .iter_mut()
                    .filter_map(Option::take)
                    .collect();
                return (st, Some((e, rest)));
            }
            // The first remaining message was refused: skip it, keep going.
            off += 1;
            st.failed += segments;
        }
        (st, None)
    }
}

fn cmsg_space_u16() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    assert!(space <= size_of::<[u64; 4]>(), "cmsg buffer too small");
    space
}

/// Sends trains of equal-size datagrams on one UDP socket: each train of more than one segment as one GSO
/// message (`UDP_SEGMENT`), many messages per `sendmmsg`. Remembers whether the socket can do GSO: the first
/// train refused with `EIO` (no checksum offload on the way out) or `ENOPROTOOPT`/`EOPNOTSUPP` (no GSO in the
/// kernel) turns GSO off for good, and that train and every later one go out as separate datagrams instead.
/// `EINVAL` turns it off only while no train has gone out yet on this socket (afterwards it is about that
/// one train, e.g. a segment above the route's MTU, which is then sent as separate datagrams).
pub struct UdpSender {
    v6_socket: bool,
    gso: bool,
    gso_proven: bool,
}

impl UdpSender {
    /// Probes `sock` for `UDP_SEGMENT` support.
    pub fn new(sock: &UdpSocket) -> UdpSender {
        let v6_socket = sock.local_addr().is_ok_and(|a| a.is_ipv6());
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: passes a live c_int and its exact size; the kernel writes at most `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        UdpSender {
            v6_socket,
            gso: r == 0,
            gso_proven: false,
        }
    }

    /// Whether trains still go out as GSO messages on this socket.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Sends every train in order: `(destination, segment size, segments, bytes)`, the bytes being `segments`
    /// datagrams of `seg` bytes, the last one possibly shorter.
    pub fn send<'a>(
        &mut self,
        sock: &UdpSocket,
        trains: impl Iterator<Item = (SocketAddr, usize, usize, &'a [u8])>,
    ) -> SendStats {
        let mut st = SendStats::default();
        let mut out = Outbox::new(self.v6_socket);
        for (to, seg, segments, data) in trains {
            if self.gso && segments > 1 {
                if out.is_full() {
                    st += self.flush(sock, &mut out);
                }
                out.push(to, data, seg, segments, true);
                continue;
            }
            for d in data.chunks(seg.max(1)) {
                if out.is_full() {
                    st += self.flush(sock, &mut out);
                }
                out.push(to, d, d.len(), 1, false);
            }
        }
        st += self.flush(sock, &mut out);
        st
    }

    fn flush<'a>(&mut self, sock: &UdpSocket, out: &mut Outbox<'a>) -> SendStats {
        let (mut st, refused) = out.flush(sock);
        if st.trains > 0 {
            self.gso_proven = true;
        }
        let Some((e, rest)) = refused else { return st };
        if is_gso_unsupported(&e) || !self.gso_proven {
            tracing::info!(error = %e, "UDP GSO refused on the WireGuard socket: sending datagrams one by one");
            self.gso = false;
        }
        // The refused train and everything queued after it, in order, as separate datagrams.
        st.fallbacks += 1;
        st += send_batch(
            sock,
            self.v6_socket,
            rest.iter().flat_map(|&(to, data, seg, segments, gso)| {
                let seg = if gso { seg } else { data.len() };
                debug_assert!(segments == data.len().div_ceil(seg.max(1)));
                data.chunks(seg.max(1)).map(move |d| (to, d))
            }),
        );
        st
    }
}

fn setsockopt_int(
    sock: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Large socket buffers: bursts from many peers must not overflow the receive queue (the main loss cause measured
/// in the baseline). `SO_*BUFFORCE` works as root and ignores the sysctl cap; otherwise fall back to the capped
/// option.
pub fn set_socket_buffers(sock: &UdpSocket, bytes: usize) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(sock, libc::SOL_SOCKET, force, v).is_err() {
            let _ = setsockopt_int(sock, libc::SOL_SOCKET, plain, v);
        }
    }
}

/// How long a blocking receive waits before returning with nothing (drives the timer tick).
pub fn set_recv_timeout(sock: &UdpSocket, t: Duration) -> io::Result<()> {
    sock.set_read_timeout(Some(t))
}

/// Waits until one of `fds` is readable (or has an error), at most `timeout`; marks each in `ready`. Negative
/// descriptors are ignored.
pub fn poll_readable(fds: &[libc::c_int], timeout: Duration, ready: &mut [bool]) -> io::Result<()> {
    let unset = libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    };
    // The common case (the WireGuard socket and two TUNs) stays on the stack; on-ramp connections add more.
    let mut small = [unset; 8];
    let mut large = Vec::new();
    let pfds: &mut [libc::pollfd] = if fds.len() <= small.len() {
        &mut small
    } else {
        large.resize(fds.len(), unset);
        &mut large
    };
    let n = fds.len().min(pfds.len());
    for (p, &fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd;
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a live array of `n` pollfd structs; a negative fd is ignored by poll(2).
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) };
    ready.iter_mut().for_each(|r| *r = false);
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(())
        } else {
            Err(e)
        };
    }
    for (r, p) in ready.iter_mut().zip(&pfds[..n]) {
        *r = p.fd >= 0 && p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
    }
    Ok(())
}

/// Puts a file descriptor (a TUN queue) into non-blocking mode.
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Every address of every interface in this network namespace (the appliance's own addresses).
pub fn local_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| {
            let s = a.address?;
            if let Some(v4) = s.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip_over_loopback() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_recv_timeout(&b, Duration::from_secs(5)).unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 100 + usize::from(i)]).collect();
        let st = send_batch(&a, false, payloads.iter().map(|p| (to, p.as_slice())));
        assert_eq!((st.sent, st.failed), (40, 0));
        assert_eq!(st.calls, 40usize.div_ceil(BATCH), "one sendmmsg per batch");
        let mut batch = RecvBatch::new(2048);
        let mut got = Vec::new();
        while got.len() < 40 {
            let n = recv_batch(&b, &mut batch).unwrap();
            assert!(n > 0, "timed out after {} datagrams", got.len());
            for r in &batch.meta {
                assert_eq!(r.from, a.local_addr().unwrap());
                assert!(!r.truncated);
                assert_eq!(r.segments, Segments::One, "no UDP_GRO on this socket");
                got.push(batch.bufs[r.buf][..r.len].to_vec());
            }
        }
        assert_eq!(got, payloads);
    }

    /// Receives `n` datagrams on `sock` (bounded wait), with their sources.
    fn recv_n(sock: &UdpSocket, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut batch = RecvBatch::new(2048);
        let mut got = Vec::new();
        while got.len() < n {
            let k = recv_batch(sock, &mut batch).unwrap();
            assert!(k > 0, "timed out after {} of {n} datagrams", got.len());
            for r in &batch.meta {
                assert!(!r.truncated);
                got.push((r.from, batch.bufs[r.buf][..r.len].to_vec()));
            }
        }
        got
    }

    fn datagram(tag: u8, seq: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (k + seq * 7) as u8 ^ tag).collect()
    }

    #[test]
    fn gso_trains_arrive_as_separate_datagrams_in_order() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (b, c) = (
            UdpSocket::bind("127.0.0.1:0").unwrap(),
            UdpSocket::bind("127.0.0.1:0").unwrap(),
        );
        for s in [&b, &c] {
            set_recv_timeout(s, Duration::from_secs(5)).unwrap();
        }
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        // Interleaved: 20 full-size datagrams to b ending with a shorter one, 12 small ones to c.
        let mut q = crate::core::TxQueue::new();
        let (mut want_b, mut want_c) = (Vec::new(), Vec::new());
        for i in 0..21 {
            let len = if i == 20 { 333 } else { 1452 };
            let d = datagram(1, i, len);
            q.slot(to_b, len)[..len].copy_from_slice(&d);
            q.commit(len);
            want_b.push(d);
            if i < 12 {
                let d = datagram(2, i, 92);
                q.slot(to_c, 92)[..92].copy_from_slice(&d);
                q.commit(92);
                want_c.push(d);
            }
        }
        let mut sender = UdpSender::new(&a);
        assert!(sender.gso(), "this kernel has UDP_SEGMENT");
        let st = sender.send(&a, q.trains().map(|t| (t.to, t.seg, t.segments, t.data)));
        assert_eq!(
            st,
            SendStats {
                sent: 33,
                failed: 0,
                calls: 1,
                trains: 2,
                train_datagrams: 33,
                fallbacks: 0
            }
        );
        let got_b = recv_n(&b, 21);
        let got_c = recv_n(&c, 12);
        assert!(got_b
            .iter()
            .chain(&got_c)
            .all(|(from, _)| *from == a.local_addr().unwrap()));
        assert_eq!(
            got_b.into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
            want_b
        );
        assert_eq!(
            got_c.into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
            want_c
        );
    }

    /// A train the kernel refuses as GSO goes out as separate datagrams, in order, with what was queued after
    /// it. On a socket where no train has gone out yet that turns GSO off for good; after a train went out, it
    /// stays on. The refusal is real: with `SO_NO_CHECK` (no UDP checksums) the kernel refuses every GSO send
    /// with `EINVAL` but still sends single datagrams.
    #[test]
    fn a_refused_train_falls_back_to_single_datagrams() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_recv_timeout(&b, Duration::from_secs(5)).unwrap();
        let to = b.local_addr().unwrap();
        let train: Vec<u8> = (0..10).flat_map(|i| datagram(3, i, 100)).collect();
        let after = datagram(4, 0, 50);
        let mut want: Vec<Vec<u8>> = train.chunks(100).map(<[u8]>::to_vec).collect();
        want.push(after.clone());
        let both = || [(to, 100, 10, &train[..]), (to, 50, 1, &after[..])].into_iter();

        let mut proven = UdpSender::new(&a);
        let st = proven.send(&a, both());
        assert_eq!((st.sent, st.trains, st.fallbacks), (11, 1, 0));
        recv_n(&b, 11);

        setsockopt_int(&a, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let st = proven.send(&a, both());
        assert_eq!((st.sent, st.failed, st.trains, st.fallbacks), (11, 0, 0, 1));
        assert!(
            proven.gso(),
            "GSO worked for an earlier train: it stays on, the refusal was about this one"
        );
        let got: Vec<Vec<u8>> = recv_n(&b, 11).into_iter().map(|(_, d)| d).collect();
        assert_eq!(got, want);

        let mut fresh = UdpSender::new(&a);
        assert!(fresh.gso(), "the probe cannot know yet");
        let st = fresh.send(&a, both());
        assert_eq!((st.sent, st.failed, st.trains, st.fallbacks), (11, 0, 0, 1));
        assert!(
            !fresh.gso(),
            "GSO never worked on this socket: remembered off"
        );
        let got: Vec<Vec<u8>> = recv_n(&b, 11).into_iter().map(|(_, d)| d).collect();
        assert_eq!(got, want);
        let st = fresh.send(&a, both());
        assert_eq!(
            (st.sent, st.trains, st.fallbacks, st.calls),
            (11, 0, 0, 1),
            "no more GSO messages: 11 single datagrams in one sendmmsg"
        );
        recv_n(&b, 11);
    }

    /// A GSO train sent over loopback to a socket with `UDP_GRO` arrives as one coalesced message with its
    /// segment size, and splits back into exactly the datagrams sent. The control: the same train to a socket
    /// without `UDP_GRO` arrives datagram by datagram (so the probe can tell the two apart).
    #[test]
    fn gro_receives_a_gso_train_as_one_message() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&b, &plain] {
            set_recv_timeout(s, Duration::from_secs(5)).unwrap();
        }
        assert!(enable_gro(&b), "this kernel has UDP_GRO");
        let want: Vec<Vec<u8>> = (0..21)
            .map(|i| datagram(5, i, if i == 20 { 301 } else { 1000 }))
            .collect();
        let train: Vec<u8> = want.concat();
        let mut sender = UdpSender::new(&a);
        for to in [b.local_addr().unwrap(), plain.local_addr().unwrap()] {
            let st = sender.send(&a, [(to, 1000, 21, &train[..])].into_iter());
            assert_eq!((st.sent, st.trains), (21, 1));
        }

        let mut batch = RecvBatch::new(GRO_BUF_SIZE);
        assert_eq!(recv_batch(&b, &mut batch).unwrap(), 1, "one message");
        let r = batch.meta[0];
        assert_eq!(r.from, a.local_addr().unwrap());
        assert!(!r.truncated);
        assert_eq!((r.segments, r.len), (Segments::Gro(1000), train.len()));
        let got: Vec<&[u8]> = split_gro(&batch.bufs[r.buf][..r.len], 1000)
            .unwrap()
            .collect();
        assert_eq!(got, want.iter().map(Vec::as_slice).collect::<Vec<_>>());

        let got: Vec<Vec<u8>> = recv_n(&plain, 21).into_iter().map(|(_, d)| d).collect();
        assert_eq!(got, want, "without UDP_GRO: 21 separate datagrams");
    }

    /// Control data holding one cmsg of `level`/`ty` with `data`, as the kernel lays it out.
    fn cmsg(level: libc::c_int, ty: libc::c_int, data: &[u8]) -> Vec<u8> {
        // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(data.len() as u32) as usize,
                libc::CMSG_LEN(data.len() as u32) as usize,
            )
        };
        let mut out = vec![0u8; space];
        // SAFETY: all-zero is a valid cmsghdr.
        let mut h: libc::cmsghdr = unsafe { zeroed() };
        h.cmsg_len = len as _;
        h.cmsg_level = level;
        h.cmsg_type = ty;
        // SAFETY: `out` has at least size_of::<cmsghdr>() bytes (CMSG_SPACE includes the header).
        unsafe { std::ptr::write_unaligned(out.as_mut_ptr().cast::<libc::cmsghdr>(), h) };
        let hdr = size_of::<libc::cmsghdr>();
        out[hdr..hdr + data.len()].copy_from_slice(data);
        out
    }

    fn gro_cmsg(seg: libc::c_int) -> Vec<u8> {
        cmsg(libc::SOL_UDP, libc::UDP_GRO, &seg.to_ne_bytes())
    }

    #[test]
    fn gro_cmsg_is_read_and_odd_ones_are_refused() {
        assert_eq!(gro_segments(&[]), Segments::One);
        assert_eq!(gro_segments(&gro_cmsg(1420)), Segments::Gro(1420));
        assert_eq!(gro_segments(&gro_cmsg(65_535)), Segments::Gro(65_535));
        // Another cmsg first (IP_TOS, one byte padded to the alignment) is skipped.
        let mut two = cmsg(libc::IPPROTO_IP, libc::IP_TOS, &[0x10]);
        two.extend(gro_cmsg(1000));
        assert_eq!(gro_segments(&two), Segments::Gro(1000));
        assert_eq!(
            gro_segments(&cmsg(libc::IPPROTO_IP, libc::IP_TOS, &[0x10])),
            Segments::One
        );
        for bad in [0, -1, 65_536, libc::c_int::MAX] {
            assert_eq!(gro_segments(&gro_cmsg(bad)), Segments::Malformed, "{bad}");
        }
        assert_eq!(
            gro_segments(&cmsg(libc::SOL_UDP, libc::UDP_GRO, &1420u16.to_ne_bytes())),
            Segments::Malformed,
            "the kernel writes an int"
        );
        assert_eq!(split_gro(&[1, 2, 3], 0).unwrap_err(), GroError::ZeroSegment);
        assert_eq!(
            split_gro(&[0; 129], 1).unwrap_err(),
            GroError::TooManySegments
        );
        assert_eq!(split_gro(&[0; 128], 1).unwrap().count(), 128);
        assert_eq!(split_gro(&[], 1000).unwrap().count(), 0);
    }

    proptest::proptest! {
        /// Splitting a coalesced message gives exactly the datagrams that were sent, byte for byte, in order:
        /// any segment size, any number of full segments, a last one of any length up to the segment size.
        #[test]
        fn split_gro_gives_back_the_datagrams_sent(
            seg in 1usize..2000,
            full in 0usize..64,
            last in 0usize..2000,
            seed in proptest::prelude::any::<u8>(),
        ) {
            let last = last % seg + 1;
            let mut sent: Vec<Vec<u8>> = (0..full).map(|i| datagram(seed, i, seg)).collect();
            sent.push(datagram(seed ^ 0x5a, full, last));
            let msg = sent.concat();
            let got: Vec<&[u8]> = split_gro(&msg, seg).unwrap().collect();
            proptest::prop_assert_eq!(got, sent.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }

        /// Any length and segment size: refused or split into pieces that cover the message exactly, all of
        /// the segment size but the last; never a panic.
        #[test]
        fn split_gro_never_panics(len in 0usize..70_000, seg in 0usize..70_000) {
            let msg = vec![7u8; len];
            match split_gro(&msg, seg) {
                Err(GroError::ZeroSegment) => proptest::prop_assert_eq!(seg, 0),
                Err(GroError::TooManySegments) => {
                    proptest::prop_assert!(len.div_ceil(seg) > MAX_GRO_SEGMENTS)
                }
                Ok(parts) => {
                    let parts: Vec<usize> = parts.map(<[u8]>::len).collect();
                    proptest::prop_assert_eq!(parts.iter().sum::<usize>(), len);
                    if let Some((l, rest)) = parts.split_last() {
                        proptest::prop_assert!(rest.iter().all(|&p| p == seg));
                        proptest::prop_assert!(*l >= 1 && *l <= seg);
                    }
                }
            }
        }

        /// Arbitrary control bytes never panic, and a segment size read from them is a real one.
        #[test]
        fn gro_segments_never_panics(control in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96)) {
            if let Segments::Gro(s) = gro_segments(&control) {
                proptest::prop_assert!((1..=65_535).contains(&s));
            }
        }

        /// A valid `UDP_GRO` cmsg cut short anywhere, or with a length field that runs past the end or under
        /// the header, is refused (`One` only when not even a header is left).
        #[test]
        fn cut_or_lying_gro_cmsg_is_refused(
            seg in 1i32..=65_535,
            cut in 0usize..24,
            lie in proptest::prelude::any::<u16>(),
        ) {
            let full = gro_cmsg(seg);
            let hdr = size_of::<libc::cmsghdr>();
            // SAFETY: CMSG_LEN only computes a size.
            let used = unsafe { libc::CMSG_LEN(4) } as usize;
            let cut = cut.min(full.len());
            let want = if cut >= used {
                Segments::Gro(seg as usize)
            } else if cut >= hdr {
                Segments::Malformed
            } else {
                Segments::One
            };
            proptest::prop_assert_eq!(gro_segments(&full[..cut]), want);
            let lie = usize::from(lie);
            let mut lying = full.clone();
            let mut h: libc::cmsghdr =
                // SAFETY: `lying` holds a whole header; any bit pattern is a valid cmsghdr.
                unsafe { std::ptr::read_unaligned(lying.as_ptr().cast::<libc::cmsghdr>()) };
            h.cmsg_len = lie as _;
            // SAFETY: as above, writing it back.
            unsafe { std::ptr::write_unaligned(lying.as_mut_ptr().cast::<libc::cmsghdr>(), h) };
            let got = gro_segments(&lying);
            if lie < hdr || lie > lying.len() || (lie != used) {
                proptest::prop_assert_ne!(got, Segments::Gro(seg as usize) , "len {}", lie);
            } else {
                proptest::prop_assert_eq!(got, Segments::Gro(seg as usize));
            }
        }
    }

    #[test]
    fn oversized_datagram_is_flagged_truncated() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_recv_timeout(&b, Duration::from_secs(5)).unwrap();
        a.send_to(&[7u8; 3000], b.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(1024);
        assert_eq!(recv_batch(&b, &mut batch).unwrap(), 1);
        assert!(batch.meta[0].truncated);
    }
}
