//! Starting one helper: fork it into a new user and network namespace with the control socket on fd 3
//! ([`spawn`], the `pre_exec` hook is the only code here that runs between fork and exec), then wait for its
//! `Ready` with the namespace's descriptors ([`wait_ready`], [`instance`]). The supervisor thread calls
//! [`launch`] for each generation.

use super::*;

pub(super) type Launched = (Child, OwnedFd, Ready, Vec<OwnedFd>);

pub(super) fn launch(shared: &Shared, cfg: &SupervisorConfig) -> Result<Launched, NsError> {
    let (mut child, ctl) = spawn(cfg)?;
    match wait_ready(shared, ctl.as_fd(), &mut child, cfg.ready_timeout) {
        Ok((ready, fds)) => Ok((child, ctl, ready, fds)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Forks the helper into a new user+network namespace with the control socket on fd 3 (design note §3).
fn spawn(cfg: &SupervisorConfig) -> Result<(Child, OwnedFd), NsError> {
    let (parent_end, child_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| NsError::Io(e.into()))?;
    // Everything the child needs is prepared here: between fork and exec only async-signal-safe calls.
    let uid_map = format!("0 {} 1\n", nix::unistd::geteuid()).into_bytes();
    let gid_map = format!("0 {} 1\n", nix::unistd::getegid()).into_bytes();
    let parent_pid = std::process::id() as libc::pid_t;
    let child_fd = child_end.as_raw_fd();

    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args)
        .envs(cfg.envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: the hook runs in the forked child before exec and only makes raw, async-signal-safe syscalls
    // (prctl, getppid, unshare, open/write/close, dup2, fcntl) on data prepared before the fork; it does
    // not allocate, lock, or touch anything another thread of the parent may have held at fork time.
    unsafe {
        cmd.pre_exec(move || enter_namespace(parent_pid, child_fd, &uid_map, &gid_map));
    }
    let child = cmd.spawn().map_err(NsError::Spawn)?;
    // The child has its copy on fd 3; ours must go, or EOF would never signal the helper's death.
    drop(child_end);
    Ok((child, parent_end))
}

/// The pre-exec sequence, in the forked child.
fn enter_namespace(
    parent_pid: libc::pid_t,
    control: libc::c_int,
    uid_map: &[u8],
    gid_map: &[u8],
) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers and only affects this (child) process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent_pid {
        // The parent died before the prctl took effect: nobody would ever reap or stop us.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // A gateway that dropped privileges (`sandbox`) is not dumpable, which makes its /proc/self files root's:
    // this child could not write its own uid map. Only the child (about to exec anyway) becomes dumpable.
    // SAFETY: prctl(PR_SET_DUMPABLE) takes plain integers and only affects this (child) process.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: unshare takes flags only; the child is single-threaded (as unshare(CLONE_NEWUSER) requires).
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Descriptors some library opened without O_CLOEXEC must not reach the helper (a gateway socket held
    // there would outlive the gateway). Marked, not closed: std's exec-error pipe must stay open until exec.
    // Best effort: close_range needs Linux 5.11.
    // SAFETY: close_range takes integers only and changes flags of descriptors of this child.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (CONTROL_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    write_proc(c"/proc/self/setgroups", b"deny")?;
    write_proc(c"/proc/self/uid_map", uid_map)?;
    write_proc(c"/proc/self/gid_map", gid_map)?;
    if control == CONTROL_FD {
        // SAFETY: F_SETFD on a descriptor we own in this child; clears FD_CLOEXEC so it survives exec.
        if unsafe { libc::fcntl(control, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        // SAFETY: dup2 between two integers; fd 3 in the child is replaced (whatever it was, it was
        // close-on-exec or inherited by accident) and the new fd 3 has no FD_CLOEXEC.
        if unsafe { libc::dup2(control, CONTROL_FD) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `data` is valid for `data.len()` bytes; `fd` was just opened by us.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = io::Error::last_os_error();
    // SAFETY: closes the descriptor opened above, exactly once.
    unsafe { libc::close(fd) };
    if n != data.len() as isize {
        return Err(if n < 0 {
            err
        } else {
            io::Error::from_raw_os_error(libc::EIO)
        });
    }
    Ok(())
}

fn wait_ready(
    shared: &Shared,
    ctl: BorrowedFd<'_>,
    child: &mut Child,
    timeout: Duration,
) -> Result<(Ready, Vec<OwnedFd>), NsError> {
    let deadline = Instant::now() + timeout;
    loop {
        if shared.is_closed() {
            return Err(NsError::Closed);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NsError::ReadyTimeout(timeout));
        }
        let mut fds = [
            PollFd::new(ctl, PollFlags::POLLIN),
            PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, poll_timeout(left)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(NsError::Io(e.into())),
        }
        let _ = shared.wake.read();
        match proto::recv(ctl, MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => return Err(NsError::Io(e.into())),
            Ok(Received::Eof) => {
                return Err(match reap(child, Duration::from_secs(2)) {
                    Ok(status) => NsError::Exited(status),
                    Err(e) => NsError::Io(e),
                })
            }
            Ok(Received::Message(Message::Ready(ready), fds)) => return Ok((ready, fds)),
            Ok(Received::Message(
                Message::SetupFailed {
                    stage,
                    errno,
                    message,
                },
                _,
            )) => {
                return Err(NsError::Setup {
                    stage,
                    errno,
                    message,
                })
            }
            Ok(Received::Message(other, _)) => {
                return Err(NsError::Protocol(format!("expected ready, got {other:?}")))
            }
            Ok(Received::Invalid { error, .. }) => {
                return Err(NsError::Protocol(error.to_string()))
            }
        }
    }
}

/// Matches the `Ready` message's descriptors (TUNs, then listeners, in list order) to what they are.
pub(super) fn instance(
    generation: Generation,
    helper_pid: u32,
    ready: &Ready,
    fds: Vec<OwnedFd>,
) -> Result<NsInstance, NsError> {
    if ready.proto_version != proto::PROTO_VERSION {
        return Err(NsError::Protocol(format!(
            "helper speaks protocol {}, we speak {}",
            ready.proto_version,
            proto::PROTO_VERSION
        )));
    }
    let mut fds = fds.into_iter();
    let mut upgrade = None;
    let mut downgrade = None;
    for info in &ready.tuns {
        let TunInfo {
            role,
            name,
            mtu,
            addr,
            routed,
        } = info.clone();
        let fd = fds
            .next()
            .ok_or_else(|| NsError::Protocol("missing TUN descriptor".into()))?;
        let tun = TunFd {
            name,
            mtu,
            addr,
            routed,
            fd,
        };
        match role {
            TunRole::Upgrade => upgrade = Some(tun),
            TunRole::Downgrade => downgrade = Some(tun),
        }
    }
    let mut tcp = None;
    let mut udp = None;
    for info in &ready.listeners {
        let fd = fds
            .next()
            .ok_or_else(|| NsError::Protocol("missing listener descriptor".into()))?;
        match info.kind {
            ListenerKind::Tcp => tcp = Some(TcpListener::from(fd)),
            ListenerKind::Udp => udp = Some(UdpSocket::from(fd)),
        }
    }
    let missing = |what: &str| NsError::Protocol(format!("ready message has no {what}"));
    Ok(NsInstance {
        generation,
        helper_pid,
        upgrade_tun: upgrade.ok_or_else(|| missing("upgrade TUN"))?,
        downgrade_tun: downgrade.ok_or_else(|| missing("downgrade TUN"))?,
        tcp_listener: tcp.ok_or_else(|| missing("TCP listener"))?,
        udp_socket: udp.ok_or_else(|| missing("UDP socket"))?,
    })
}
