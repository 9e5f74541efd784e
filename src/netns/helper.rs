//! The helper process: the gateway binary re-executed with [`HELPER_MARKER`] as `argv[1]`, already inside
//! its own user+network namespace (the supervisor's `pre_exec` did the `unshare`), with the control socket on
//! fd 3. It configures the namespace, sends [`Message::Ready`] with the TUN and listener descriptors, then
//! answers requests one at a time until the parent says [`Message::Shutdown`] or closes the socket.
//!
//! Single-threaded and stateless: it never blocks on the network (connects are non-blocking) and forgets
//! every descriptor as soon as it has been passed.

use std::ffi::OsStr;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};

use super::netconf::{self, LinkPlan, SetupError};
use super::proto::{self, ListenerInfo, ListenerKind, Message, Ready, Received, TunInfo, TunRole};
use super::{tun, DOWNGRADE_ADDR, DOWNGRADE_NAT_RANGE, DOWNGRADE_TUN_NAME, LISTEN_BACKLOG};
use super::{
    TUN_MTU, TUN_TXQUEUELEN, UPGRADE_ADDR, UPGRADE_LISTEN, UPGRADE_NAT_RANGE, UPGRADE_TUN_NAME,
};

/// `argv[1]` that turns the gateway binary into the helper. Not a clap subcommand: it must be recognised
/// before clap and before any thread starts.
pub const HELPER_MARKER: &str = "__rampart-netns-helper";

/// The descriptor number the supervisor places the control socket on.
pub(crate) const CONTROL_FD: i32 = 3;

/// Called first thing in `main`: if this process was started as the namespace helper, runs it to the end
/// and returns its exit code; otherwise returns `None` at once.
pub fn maybe_run_helper() -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    if args.next().as_deref() != Some(OsStr::new(HELPER_MARKER)) {
        return None;
    }
    Some(run())
}

/// The helper's main.
pub fn run() -> ExitCode {
    ExitCode::from(run_helper())
}

/// The helper's main returning a plain exit status (also the entry point of the tests' helper process).
pub(crate) fn run_helper() -> u8 {
    let ctl = match take_control_socket() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!(
                "rampart netns helper: no control socket on fd {CONTROL_FD} ({e}); this mode is started \
                 by the gateway itself"
            );
            return 2;
        }
    };
    let ns = match setup() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("rampart netns helper: setup failed: {e}");
            let msg = Message::SetupFailed {
                stage: e.stage.to_string(),
                errno: e.errno,
                message: e.message,
            };
            let _ = proto::send(ctl.as_fd(), &msg, &[], socket::MsgFlags::empty());
            return 1;
        }
    };
    let fds = [
        ns.up.as_fd(),
        ns.down.as_fd(),
        ns.tcp.as_fd(),
        ns.udp.as_fd(),
    ];
    if let Err(e) = proto::send(ctl.as_fd(), &ns.ready, &fds, socket::MsgFlags::empty()) {
        eprintln!("rampart netns helper: sending ready: {e}");
        return 1;
    }
    // The parent holds the only copies from here on: the TUNs vanish when it closes them.
    drop(ns);
    serve(ctl.as_fd())
}

fn take_control_socket() -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects our descriptor table; it tells us whether fd 3 is open at all.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd 3 is open (checked above) and, by the supervisor's contract, ours alone: it was dup2'ed
    // there without FD_CLOEXEC just before exec, and nothing in this process opened it.
    let fd = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let ty = socket::getsockopt(&fd, sockopt::SockType).map_err(io::Error::from)?;
    if ty != SockType::SeqPacket {
        // Not ours after all: give the descriptor back untouched.
        let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd 3 is not a SOCK_SEQPACKET socket",
        ));
    }
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    Ok(fd)
}

/// Everything the helper sets up; dropped (closed) once passed to the parent.
struct Namespace {
    ready: Message,
    up: OwnedFd,
    down: OwnedFd,
    tcp: OwnedFd,
    udp: OwnedFd,
}

fn setup() -> Result<Namespace, SetupError> {
    netconf::check_private_namespace()?;
    // IPv6 off before the TUNs exist, or router solicitations and MLD reports appear on them.
    netconf::sysctl("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")?;
    netconf::sysctl("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1")?;
    // Strict reverse-path filtering: only sources routed to the TUN a packet came in on are accepted.
    netconf::sysctl("/proc/sys/net/ipv4/conf/all/rp_filter", "1")?;
    netconf::sysctl("/proc/sys/net/ipv4/conf/default/rp_filter", "1")?;

    let open = |name: &'static str| {
        tun::create(name).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EACCES) {
                " (the gateway's uid cannot open /dev/net/tun: run as root, or make it mode 0666 or 0660 \
                 with a group of the gateway's)"
            } else {
                ""
            };
            SetupError {
                stage: "create TUN",
                errno: e.raw_os_error(),
                message: format!("{name}: {e}{hint}"),
            }
        })
    };
    let up = open(UPGRADE_TUN_NAME)?;
    let down = open(DOWNGRADE_TUN_NAME)?;

    let links = [
        LinkPlan {
            name: UPGRADE_TUN_NAME,
            mtu: TUN_MTU,
            txqueuelen: TUN_TXQUEUELEN,
            addr: UPGRADE_ADDR,
            routed: UPGRADE_NAT_RANGE,
        },
        LinkPlan {
            name: DOWNGRADE_TUN_NAME,
            mtu: TUN_MTU,
            txqueuelen: TUN_TXQUEUELEN,
            addr: DOWNGRADE_ADDR,
            routed: DOWNGRADE_NAT_RANGE,
        },
    ];
    netconf::configure_links(&links)?;

    let tcp = bound_socket(SockType::Stream, UPGRADE_LISTEN)
        .map_err(|e| SetupError::io("bind upgrade listener", e.into()))?;
    socket::listen(
        &tcp,
        Backlog::new(LISTEN_BACKLOG).map_err(|e| SetupError::io("listen", e.into()))?,
    )
    .map_err(|e| SetupError::io("listen", e.into()))?;
    let udp = bound_socket(SockType::Datagram, UPGRADE_LISTEN)
        .map_err(|e| SetupError::io("bind upgrade udp socket", e.into()))?;

    let ready = Message::Ready(Ready {
        proto_version: proto::PROTO_VERSION,
        tuns: links
            .iter()
            .zip([TunRole::Upgrade, TunRole::Downgrade])
            .map(|(l, role)| TunInfo {
                role,
                name: l.name.to_string(),
                mtu: l.mtu,
                addr: l.addr,
                routed: l.routed,
            })
            .collect(),
        listeners: vec![
            ListenerInfo {
                kind: ListenerKind::Tcp,
                addr: SocketAddr::V4(UPGRADE_LISTEN),
            },
            ListenerInfo {
                kind: ListenerKind::Udp,
                addr: SocketAddr::V4(UPGRADE_LISTEN),
            },
        ],
    });
    Ok(Namespace {
        ready,
        up,
        down,
        tcp,
        udp,
    })
}

fn bound_socket(ty: SockType, addr: SocketAddrV4) -> Result<OwnedFd, Errno> {
    let fd = socket::socket(AddressFamily::Inet, ty, SockFlag::SOCK_CLOEXEC, None)?;
    socket::bind(fd.as_raw_fd(), &socket::SockaddrIn::from(addr))?;
    Ok(fd)
}

/// Answers requests until Shutdown or EOF. Requests are handled in order; none of them blocks.
fn serve(ctl: BorrowedFd<'_>) -> u8 {
    loop {
        let (msg, _fds) = match proto::recv(ctl, socket::MsgFlags::empty()) {
            Ok(Received::Eof) => return 0,
            Ok(Received::Message(msg, fds)) => (msg, fds),
            Ok(Received::Invalid { error, .. }) => {
                eprintln!("rampart netns helper: ignoring a bad control message: {error}");
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("rampart netns helper: control socket: {e}");
                return 1;
            }
        };
        let sent = match msg {
            Message::Shutdown => return 0,
            Message::Ping { seq } => reply(ctl, &Message::Pong { seq }, &[]),
            Message::Connect {
                req_id,
                dst,
                bind_src,
            } => match connect(dst, bind_src) {
                Ok((fd, local)) => reply(ctl, &Message::Connected { req_id, local }, &[fd.as_fd()]),
                Err(errno) => reply(
                    ctl,
                    &Message::ConnectFailed {
                        req_id,
                        errno: errno as i32,
                    },
                    &[],
                ),
            },
            other => {
                eprintln!("rampart netns helper: ignoring unexpected {other:?}");
                Ok(())
            }
        };
        if let Err(e) = sent {
            eprintln!("rampart netns helper: replying: {e}");
            return 1;
        }
    }
}

fn reply(
    ctl: BorrowedFd<'_>,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), proto::ProtoError> {
    loop {
        match proto::send(ctl, msg, fds, socket::MsgFlags::empty()) {
            Err(proto::ProtoError::Io(Errno::EINTR)) => continue,
            other => return other,
        }
    }
}

/// Starts a non-blocking connect and returns the socket with the connect in progress, plus its local
/// address (the kernel picks the port at `connect()` unless `bind_src` fixed it).
fn connect(dst: SocketAddr, bind_src: Option<SocketAddr>) -> Result<(OwnedFd, SocketAddr), Errno> {
    let family = match dst {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if let Some(src) = bind_src {
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(src))?;
    }
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
    let local = if let Some(v4) = local.as_sockaddr_in() {
        SocketAddr::V4(SocketAddrV4::from(*v4))
    } else if let Some(v6) = local.as_sockaddr_in6() {
        SocketAddr::V6(std::net::SocketAddrV6::from(*v6))
    } else {
        return Err(Errno::EAFNOSUPPORT);
    };
    Ok((fd, local))
}
