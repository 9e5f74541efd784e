//! The helper against the real kernel: namespaces, TUNs, a handshake from hand-built packets, downgrade
//! connects, restart after SIGKILL, and descriptor accounting. These need root (CI runs as root) and fail
//! without it rather than skip.
//!
//! The helper is this test binary re-executed to run only [`helper_process_entry`] (libtest's `main` does
//! not know the helper marker). Each test owns its own supervisor and helper and tears them down.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc::Receiver;

use super::*;

const HELPER_ENV: &str = "RAMPART_NETNS_TEST_HELPER";
const FD_CHILD_ENV: &str = "RAMPART_NETNS_TEST_FD_CHILD";
const WAIT: Duration = Duration::from_secs(30);

#[test]
#[ignore = "entry point of the helper process that the netns tests start"]
fn helper_process_entry() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    std::process::exit(i32::from(helper::run_helper()));
}

fn libtest_args(test: &str) -> Vec<OsString> {
    [
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

fn test_config() -> SupervisorConfig {
    let mut cfg = SupervisorConfig::current_exe();
    cfg.args = libtest_args("netns::tests::helper_process_entry");
    cfg.envs = vec![(HELPER_ENV.into(), "1".into())];
    cfg
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the netns tests need root (CI runs them as root): they create user+network namespaces and \
         TUN devices. Run them as root, e.g. `sudo -E cargo test --lib netns`"
    );
}

fn start() -> (NsHandle, Receiver<NsEvent>) {
    require_root();
    let mut handle = NsSupervisor::start_with(test_config()).expect("namespace helper starts");
    let events = handle.take_events().expect("events");
    (handle, events)
}

fn next_event(events: &mut Receiver<NsEvent>) -> NsEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        match events.try_recv() {
            Ok(ev) => return ev,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("no namespace event within {WAIT:?}: {e}"),
        }
    }
}

fn next_ready(events: &mut Receiver<NsEvent>) -> NsInstance {
    match next_event(events) {
        NsEvent::Ready(i) => i,
        other => panic!("expected Ready, got {other:?}"),
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
}

/// A TCP segment as read from a TUN.
#[derive(Debug)]
struct Segment {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    syn: bool,
    ack: bool,
    seq: u32,
    ack_no: u32,
    payload: Vec<u8>,
}

fn parse(packet: &[u8]) -> Option<Segment> {
    let s = SlicedPacket::from_ip(packet).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &s.net else {
        return None;
    };
    let Some(TransportSlice::Tcp(tcp)) = &s.transport else {
        return None;
    };
    Some(Segment {
        src: SocketAddrV4::new(ip.header().source_addr(), tcp.source_port()),
        dst: SocketAddrV4::new(ip.header().destination_addr(), tcp.destination_port()),
        syn: tcp.syn(),
        ack: tcp.ack(),
        seq: tcp.sequence_number(),
        ack_no: tcp.acknowledgment_number(),
        payload: tcp.payload().to_vec(),
    })
}

/// Reads packets from a non-blocking TUN until one is a TCP segment matching `want`.
fn read_segment(tun: &OwnedFd, what: &str, want: impl Fn(&Segment) -> bool) -> Segment {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    loop {
        match nix::unistd::read(tun.as_fd(), &mut buf) {
            Ok(n) => {
                if let Some(seg) = parse(&buf[..n]) {
                    if want(&seg) {
                        return seg;
                    }
                    seen.push(seg);
                }
                continue;
            }
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => panic!("reading the TUN: {e}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {what} on the TUN; saw {seen:?}");
        let mut fds = [PollFd::new(tun.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, PollTimeout::from(100u16));
    }
}

fn write_packet(tun: &OwnedFd, packet: &[u8]) {
    assert_eq!(
        nix::unistd::write(tun.as_fd(), packet).unwrap(),
        packet.len()
    );
}

fn tcp_packet(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    build: impl FnOnce(PacketBuilderTcp) -> PacketBuilderTcp,
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
        src.port(),
        dst.port(),
        seq,
        64240,
    );
    let b = build(b);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    out
}

type PacketBuilderTcp = etherparse::PacketBuilderStep<etherparse::TcpHeader>;

fn pid_exists(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[test]
fn upgrade_handshake_from_raw_packets_reaches_the_listener() {
    let t0 = Instant::now();
    let (handle, mut events) = start();
    let ns = next_ready(&mut events);
    assert_eq!(ns.generation, Generation(1));
    assert_eq!(ns.upgrade_tun.name, UPGRADE_TUN_NAME);
    assert_eq!(ns.upgrade_tun.routed, UPGRADE_NAT_RANGE);
    assert_eq!(
        ns.tcp_listener.local_addr().unwrap(),
        SocketAddr::V4(UPGRADE_LISTEN)
    );
    assert_eq!(
        ns.udp_socket.local_addr().unwrap(),
        SocketAddr::V4(UPGRADE_LISTEN)
    );
    let ready_after = t0.elapsed();

    let up = &ns.upgrade_tun.fd;
    set_nonblocking(up.as_fd());
    let client = SocketAddrV4::new(Ipv4Addr::new(100, 64, 1, 2), 40000);
    write_packet(
        up,
        &tcp_packet(client, UPGRADE_LISTEN, |b| b.syn(), 1000, &[]),
    );
    let syn_ack = read_segment(up, "SYN-ACK", |s| s.syn && s.ack && s.dst == client);
    assert_eq!(syn_ack.src, UPGRADE_LISTEN);
    assert_eq!(syn_ack.ack_no, 1001);
    write_packet(
        up,
        &tcp_packet(
            client,
            UPGRADE_LISTEN,
            |b| b.ack(syn_ack.seq.wrapping_add(1)),
            1001,
            &[],
        ),
    );

    ns.tcp_listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut stream, peer) = loop {
        match ns.tcp_listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    assert_eq!(
        peer,
        SocketAddr::V4(client),
        "accept() reports the NAT source"
    );

    // The accepted stream's bytes leave the namespace as a raw segment on up0.
    stream.write_all(b"SSH-2.0-from-the-namespace\r\n").unwrap();
    let data = read_segment(up, "data segment", |s| !s.payload.is_empty());
    assert_eq!(data.payload, b"SSH-2.0-from-the-namespace\r\n");
    assert_eq!((data.src, data.dst), (UPGRADE_LISTEN, client));

    let pid = ns.helper_pid;
    drop(stream);
    drop(ns);
    drop(handle);
    assert!(
        !pid_exists(pid),
        "helper {pid} still exists after the handle was dropped"
    );
    eprintln!(
        "upgrade test: ready after {ready_after:?}, total {:?}",
        t0.elapsed()
    );
}

#[test]
fn connect_request_yields_a_syn_on_the_downgrade_tun() {
    let (handle, mut events) = start();
    let ns = next_ready(&mut events);
    let dn = &ns.downgrade_tun.fd;
    set_nonblocking(dn.as_fd());

    let dst = SocketAddrV4::new(Ipv4Addr::new(100, 65, 3, 4), 9000);
    let stream = handle.connect(SocketAddr::V4(dst), None).expect("connect");
    let SocketAddr::V4(local) = stream.local_addr().unwrap() else {
        panic!("v6 local address")
    };
    assert_eq!(*local.ip(), DOWNGRADE_ADDR);
    let syn = read_segment(dn, "SYN", |s| s.syn && !s.ack && s.dst == dst);
    assert_eq!(syn.src, local);
    // In progress, not failed: no error pending on the socket.
    assert!(stream.take_error().unwrap().is_none());

    // A pinned source port.
    let dst2 = SocketAddrV4::new(Ipv4Addr::new(100, 65, 3, 5), 9001);
    let src2 = SocketAddrV4::new(DOWNGRADE_ADDR, 45000);
    let pinned = handle
        .connect(SocketAddr::V4(dst2), Some(SocketAddr::V4(src2)))
        .expect("connect with bind_src");
    assert_eq!(pinned.local_addr().unwrap(), SocketAddr::V4(src2));
    let syn2 = read_segment(dn, "SYN from the pinned port", |s| s.syn && s.dst == dst2);
    assert_eq!(syn2.src, src2);

    // The async variant.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dst3 = SocketAddrV4::new(Ipv4Addr::new(100, 65, 3, 6), 443);
    let via_async = rt
        .block_on(handle.connector().connect_async(SocketAddr::V4(dst3), None))
        .expect("connect_async");
    let syn3 = read_segment(dn, "SYN of the async connect", |s| s.syn && s.dst == dst3);
    assert_eq!(SocketAddr::V4(syn3.src), via_async.local_addr().unwrap());

    // A connect the namespace cannot make (IPv6 is disabled there) fails with the kernel's errno.
    match handle.connect("[2001:db8::1]:80".parse().unwrap(), None) {
        Err(ConnectError::Failed(errno)) => eprintln!("ipv6 connect failed as expected: {errno}"),
        other => panic!("expected ConnectError::Failed, got {other:?}"),
    }
    assert!(handle.connector().requests() >= 4);
}

#[test]
fn helper_killed_is_restarted_with_fresh_descriptors() {
    let (handle, mut events) = start();
    let first = next_ready(&mut events);
    let pid1 = first.helper_pid;
    assert_eq!(handle.helper_pid(), Some(pid1));

    let t = Instant::now();
    kill(Pid::from_raw(pid1 as i32), Signal::SIGKILL).unwrap();
    match next_event(&mut events) {
        NsEvent::Died { generation, status } => {
            assert_eq!(generation, first.generation);
            assert_eq!(status.signal(), Some(libc::SIGKILL));
        }
        other => panic!("expected Died, got {other:?}"),
    }
    let second = next_ready(&mut events);
    let restart = t.elapsed();
    assert_eq!(second.generation, Generation(first.generation.0 + 1));
    assert_ne!(second.helper_pid, pid1);
    assert!(!pid_exists(pid1), "the killed helper was reaped");
    assert_eq!(handle.generation(), Some(second.generation));

    // The new descriptors belong to the new namespace: a connect now shows up on the new dn0, not the old.
    let (old_dn, new_dn) = (&first.downgrade_tun.fd, &second.downgrade_tun.fd);
    set_nonblocking(old_dn.as_fd());
    set_nonblocking(new_dn.as_fd());
    let dst = SocketAddrV4::new(Ipv4Addr::new(100, 65, 9, 9), 22);
    let _stream = handle
        .connect(SocketAddr::V4(dst), None)
        .expect("connect after restart");
    read_segment(new_dn, "SYN on the new dn0", |s| s.syn && s.dst == dst);
    let mut buf = [0u8; 2048];
    assert_eq!(
        nix::unistd::read(old_dn.as_fd(), &mut buf).err(),
        Some(nix::errno::Errno::EAGAIN),
        "the old namespace's TUN stays silent"
    );
    eprintln!("restart test: helper back {restart:?} after SIGKILL");
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Runs in a process of its own (see [`connects_do_not_leak_fds`]) so that no other test's descriptors
/// are counted.
#[test]
#[ignore = "run in a child process by connects_do_not_leak_fds"]
fn fd_leak_child() {
    if std::env::var_os(FD_CHILD_ENV).is_none() {
        return;
    }
    let before_start = fd_count();
    let (handle, mut events) = start();
    let ns = next_ready(&mut events);
    let baseline = fd_count();
    let t = Instant::now();
    for i in 0..200u16 {
        let dst = SocketAddrV4::new(Ipv4Addr::new(100, 65, 7, (i % 250) as u8), 10_000 + i);
        let stream = handle.connect(SocketAddr::V4(dst), None).expect("connect");
        drop(stream);
    }
    let elapsed = t.elapsed();
    let after = fd_count();
    assert_eq!(after, baseline, "descriptors leaked by 200 connects");
    drop(ns);
    drop(events);
    drop(handle);
    assert_eq!(
        fd_count(),
        before_start,
        "descriptors left after the supervisor shut down"
    );
    println!("fd-leak-check passed: {before_start} fds before start, {baseline} while running, 200 connects in {elapsed:?}");
}

#[test]
fn connects_do_not_leak_fds() {
    require_root();
    let out = Command::new("/proc/self/exe")
        .args(libtest_args("netns::tests::fd_leak_child"))
        .env(FD_CHILD_ENV, "1")
        .output()
        .expect("run the fd-leak child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("fd-leak-check passed"),
        "fd-leak child failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    eprintln!(
        "{}",
        stdout
            .lines()
            .find(|l| l.contains("fd-leak-check"))
            .unwrap_or("")
    );
}

#[test]
fn a_stopped_helper_is_killed_by_the_heartbeat_and_restarted() {
    require_root();
    let mut cfg = test_config();
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.heartbeat_timeout = Duration::from_millis(500);
    let mut handle = NsSupervisor::start_with(cfg).expect("namespace helper starts");
    let mut events = handle.take_events().unwrap();
    let first = next_ready(&mut events);
    // Several heartbeats go by while it is healthy.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(handle.generation(), Some(first.generation));

    kill(Pid::from_raw(first.helper_pid as i32), Signal::SIGSTOP).unwrap();
    let t = Instant::now();
    match next_event(&mut events) {
        NsEvent::Died { generation, status } => {
            assert_eq!(generation, first.generation);
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "killed by the supervisor"
            );
        }
        other => panic!("expected Died, got {other:?}"),
    }
    let detected = t.elapsed();
    assert!(
        detected >= Duration::from_millis(300),
        "killed too early: {detected:?}"
    );
    let second = next_ready(&mut events);
    assert_eq!(second.generation, Generation(first.generation.0 + 1));
    eprintln!(
        "heartbeat test: stopped helper replaced after {:?}",
        t.elapsed()
    );
}

#[test]
fn a_helper_that_exits_at_once_is_a_start_error() {
    require_root();
    let mut cfg = test_config();
    cfg.program = "/bin/false".into();
    cfg.args.clear();
    match NsSupervisor::start_with(cfg) {
        Err(NsError::Exited(status)) => assert_eq!(status.code(), Some(1)),
        Err(e) => panic!("expected NsError::Exited, got {e}"),
        Ok(_) => panic!("a helper that exits cannot be ready"),
    }
}

#[test]
fn the_helper_refuses_to_configure_the_host_namespace() {
    // Read-only checks, run in the test process itself (initial user and network namespace).
    let err = netconf::check_private_namespace().expect_err("must refuse the initial namespaces");
    assert!(err.message.contains("refusing"), "{err}");
}

/// Runs as uid 65534 (see [`an_unprivileged_gateway_gets_a_clear_answer`]).
#[test]
#[ignore = "run in a child process by an_unprivileged_gateway_gets_a_clear_answer"]
fn unprivileged_child() {
    if std::env::var_os(FD_CHILD_ENV).is_none() {
        return;
    }
    match NsSupervisor::start_with(test_config()) {
        Ok(mut handle) => {
            let mut events = handle.take_events().unwrap();
            let ns = next_ready(&mut events);
            let dst = SocketAddrV4::new(Ipv4Addr::new(100, 65, 0, 1), 80);
            handle.connect(SocketAddr::V4(dst), None).expect("connect");
            drop(ns);
            println!("unprivileged-result: ready");
        }
        Err(NsError::Setup {
            stage,
            errno,
            message,
        }) => {
            println!("unprivileged-result: setup-failed stage={stage} errno={errno:?} {message}")
        }
        Err(e) => println!("unprivileged-result: other {e}"),
    }
}

#[test]
fn an_unprivileged_gateway_gets_a_clear_answer() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    require_root();
    // A link to this binary where uid 65534 can reach it (the build tree may be under a private home).
    let dir_tmp = tempfile::tempdir().unwrap();
    // Another user must reach the dir inside (tempfile makes it 0700).
    std::fs::set_permissions(dir_tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = dir_tmp.path().join("d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.join("rampart-tests");
    let _ = std::fs::remove_file(&exe);
    if std::fs::hard_link(std::env::current_exe().unwrap(), &exe).is_err() {
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    }
    let out = Command::new(&exe)
        .args(libtest_args("netns::tests::unprivileged_child"))
        .env(FD_CHILD_ENV, "1")
        .current_dir(&dir)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run the unprivileged child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.strip_prefix("unprivileged-result: "))
        .unwrap_or_else(|| {
            panic!(
                "no result from the child ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // The documented rule: an unprivileged gateway works iff it can open /dev/net/tun.
    let tun_open_to_others = std::fs::metadata("/dev/net/tun")
        .map(|m| m.permissions().mode() & 0o006 == 0o006)
        .unwrap_or(false);
    if tun_open_to_others {
        assert_eq!(result, "ready");
    } else {
        assert!(
            result.starts_with("setup-failed stage=create TUN errno=Some(13)")
                && result.contains("/dev/net/tun"),
            "expected a clear EACCES on /dev/net/tun, got: {result}"
        );
    }
    eprintln!("unprivileged gateway: {result}");
}
