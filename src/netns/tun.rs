//! TUN creation by ioctl (TUNs cannot be created over rtnetlink: the kernel rejects `kind tun`).

use std::ffi::c_short;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Opens `/dev/net/tun` and attaches a new `IFF_TUN | IFF_NO_PI` interface named `name`. Must run inside the
/// target network namespace: the namespace is fixed at `open()`, not at `TUNSETIFF`.
pub(crate) fn create(name: &str) -> io::Result<OwnedFd> {
    // OpenOptions opens with O_CLOEXEC.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let fd = OwnedFd::from(file);

    // SAFETY: `ifreq` is plain old data (a name array and a union of integers/arrays); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call; `fd` is an open /dev/net/tun.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
