//! The one place for raw syscalls: batched UDP receive/send (`recvmmsg`/`sendmmsg`) and socket options.
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
    /// Per received datagram: the index of its buffer, source, length, and whether it was cut short
    /// (larger than its buffer). A datagram whose source cannot be read is skipped without shifting the
    /// others off their buffers.
    pub meta: Vec<(usize, SocketAddr, usize, bool)>,
}

impl RecvBatch {
    pub fn new(buf_size: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; buf_size].into_boxed_slice())
                .collect(),
            meta: Vec::with_capacity(BATCH),
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

/// Receives up to `BATCH` datagrams: blocks for the first (up to the socket's receive timeout), then takes
/// whatever else is queued without waiting. Returns `Ok(0)` on timeout.
pub fn recv_batch(sock: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    batch.meta.clear();
    let n = batch.bufs.len().min(BATCH);
    // SAFETY: all-zero bytes are valid for these plain C structs.
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: batch.bufs[i].as_mut_ptr().cast(),
            iov_len: batch.bufs[i].len(),
        };
        hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
        hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at a live iovec, buffer and address slot owned by this frame or `batch`,
    // each valid for the lengths given; the kernel writes at most those lengths.
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
    for i in 0..r as usize {
        let len = hdrs[i].msg_len as usize;
        let truncated = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        if let Some(from) = to_socket_addr(&addrs[i]) {
            batch.meta.push((i, from, len, truncated));
        }
    }
    Ok(batch.meta.len())
}

/// Sends every datagram, `BATCH` per `sendmmsg`. A datagram the kernel refuses (unreachable destination and
/// the like) is skipped and counted in the returned error count; it never stops the rest.
/// What one `send_batch` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    pub sent: usize,
    /// Datagrams the kernel refused (each skipped, the rest still sent).
    pub failed: usize,
    /// `sendmmsg` calls made.
    pub calls: usize,
}

pub fn send_batch<'a>(
    sock: &UdpSocket,
    v6_socket: bool,
    msgs: impl Iterator<Item = (SocketAddr, &'a [u8])>,
) -> SendStats {
    let (mut sent, mut failed, mut calls) = (0, 0, 0);
    // SAFETY: all-zero bytes are valid for these plain C structs.
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let mut msgs = msgs.peekable();
    while msgs.peek().is_some() {
        let mut n = 0;
        while n < BATCH {
            let Some((to, data)) = msgs.next() else { break };
            let namelen = from_socket_addr(to, v6_socket, &mut addrs[n]);
            iovs[n] = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            hdrs[n] = libc::mmsghdr {
                // SAFETY: all-zero is a valid msghdr.
                msg_hdr: unsafe { zeroed() },
                msg_len: 0,
            };
            hdrs[n].msg_hdr.msg_name = (&mut addrs[n] as *mut libc::sockaddr_storage).cast();
            hdrs[n].msg_hdr.msg_namelen = namelen;
            hdrs[n].msg_hdr.msg_iov = &mut iovs[n];
            hdrs[n].msg_hdr.msg_iovlen = 1;
            n += 1;
        }
        let mut off = 0;
        while off < n {
            calls += 1;
            // SAFETY: headers [off, n) point at live address slots, iovecs and caller-owned data that outlive
            // the call; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    hdrs[off..].as_mut_ptr(),
                    (n - off) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                off += r as usize;
                sent += r as usize;
            } else if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                // The first remaining datagram was refused: skip it, keep going.
                off += 1;
                failed += 1;
            }
        }
    }
    SendStats {
        sent,
        failed,
        calls,
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
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 4];
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
            for &(i, from, len, trunc) in &batch.meta {
                assert_eq!(from, a.local_addr().unwrap());
                assert!(!trunc);
                got.push(batch.bufs[i][..len].to_vec());
            }
        }
        assert_eq!(got, payloads);
    }

    #[test]
    fn oversized_datagram_is_flagged_truncated() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        set_recv_timeout(&b, Duration::from_secs(5)).unwrap();
        a.send_to(&[7u8; 3000], b.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(1024);
        assert_eq!(recv_batch(&b, &mut batch).unwrap(), 1);
        assert!(batch.meta[0].3);
    }
}
