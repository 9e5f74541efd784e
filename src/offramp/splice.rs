//! The plain off-ramp's byte copy: each direction moves socket -> pipe -> socket with `splice(2)`, so stream
//! bytes never enter userspace and one call moves what the pipe holds (up to 64 KiB), where a userspace copy
//! took a read and a write per 8 KiB. Semantics follow `tokio::io::copy_bidirectional`: both directions run
//! until each has seen its end of stream (passed on as a write shutdown) or one fails.
//!
//! Only for uninspected streams (an inspector must read the bytes). When a pipe cannot be made (descriptor
//! limit), the connection falls back to a userspace copy with 64 KiB buffers. The one `unsafe` block is the
//! `splice` call.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes asked of one `splice` from a socket (the pipe's default capacity; a call moves what fits).
const CHUNK: usize = 64 * 1024;
/// Buffers of the userspace fallback, per direction.
const FALLBACK_BUFFER: usize = 64 * 1024;

/// Copies both ways until both directions are done; bytes moved `(a -> b, b -> a)`.
pub async fn bidirectional(a: &mut TcpStream, b: &mut TcpStream) -> io::Result<(u64, u64)> {
    let pipes = Pipe::new().and_then(|p| Ok((p, Pipe::new()?)));
    let Ok((ab, ba)) = pipes else {
        return tokio::io::copy_bidirectional_with_sizes(a, b, FALLBACK_BUFFER, FALLBACK_BUFFER)
            .await;
    };
    let (a, b) = (&*a, &*b);
    tokio::try_join!(one_way(a, b, ab), one_way(b, a, ba))
}

/// One direction: `src` to `dst` through `pipe`, then a write shutdown of `dst` at `src`'s end of stream.
async fn one_way(src: &TcpStream, dst: &TcpStream, pipe: Pipe) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so `WouldBlock` can only mean the socket has nothing to read.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), pipe.write.as_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        // The pipe holds `n` bytes, so `WouldBlock` can only mean the socket's send buffer is full.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), dst.as_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// A non-blocking pipe, closed on drop (bytes still in it are lost with the connection).
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

/// One `splice(2)` of up to `len` bytes, never blocking (both ends are non-blocking); 0 is end of stream.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: both descriptors are open for the call (borrowed); null offsets are required for pipes and
    // sockets, and the kernel moves bytes between the two files without touching our memory.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Device <-> [proxy: a, b] <-> upstream: 3 MiB each way arrive byte for byte, and each side's end of
    /// stream reaches the other (half-close), with the byte counts returned.
    #[tokio::test]
    async fn moves_every_byte_both_ways_and_passes_on_each_end_of_stream() {
        let (mut device, mut a) = pair().await;
        let (mut b, mut upstream) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        let up: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..3u32 << 20).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let device_side = tokio::spawn(async move {
            let (mut r, mut w) = device.split();
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let ((), n) = tokio::join!(send, recv);
            n.unwrap();
            got
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert!(
            got == up,
            "upstream got {} bytes, not the device's",
            got.len()
        );
        // Only after the device's end of stream: the other direction is still open (half-close).
        upstream.write_all(&down2).await.unwrap();
        upstream.shutdown().await.unwrap();
        let at_device = device_side.await.unwrap();
        assert!(at_device == down, "device got {} bytes", at_device.len());
        let (ab, ba) = proxy.await.unwrap().unwrap();
        assert_eq!((ab, ba), (3 << 20, 3 << 20));
    }

    /// A leg reset by its peer ends the copy with an error (the connection is closed, not left half open).
    #[tokio::test]
    async fn a_reset_leg_ends_the_copy_with_an_error() {
        let (device, mut a) = pair().await;
        let (mut b, upstream) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        socket2::SockRef::from(&upstream)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(upstream);
        let r = tokio::time::timeout(std::time::Duration::from_secs(30), proxy)
            .await
            .expect("the copy ends")
            .unwrap();
        assert!(r.is_err(), "{r:?}");
        drop(device);
    }
}
