//! Starts the namespace helper, hands its descriptors to the data path, serves connect requests, and
//! restarts the helper when it dies.
//!
//! One dedicated, long-lived std thread (`rampart-netns`) owns the helper: it forks it (so
//! `PR_SET_PDEATHSIG`, which is tied to the *forking thread*, only fires when the gateway dies or the
//! supervisor is dropped), owns the control socket, and is the only reader and writer of it. Callers queue
//! requests and wake it through an eventfd, so [`NsConnector::connect_async`] never blocks a runtime thread.
//!
//! Lifecycle as seen by the data path, through [`NsHandle::take_events`]:
//! `Ready(gen 1)`, then on helper death `Died(gen 1)` and, after a backoff, `Ready(gen 2)` with new TUNs
//! and listeners. Every flow of a generation dies with it: drop that generation's descriptors on `Died`.
//! Requests in flight when the helper dies fail with [`ConnectError::HelperDied`]; a helper that stops
//! answering pings is killed, so no request waits forever.
//!
//! Three parts: this file is the supervisor thread (restart loop `supervise`, control-socket loop `serve`);
//! `spawn` starts one helper (fork, `pre_exec`, the wait for `Ready`); `connect` is the request side
//! ([`NsConnector`]) and the matching of replies to requests.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use tokio::sync::mpsc::{error::TrySendError, Receiver, Sender};

mod connect;
mod spawn;

pub use connect::NsConnector;
use connect::{flush, handle_reply};
use spawn::{instance, launch};

use super::helper::{CONTROL_FD, HELPER_MARKER};
use super::proto::{self, ListenerKind, Message, Ready, Received, ReqId, TunInfo, TunRole};

/// Counts helper incarnations; starts at 1 and grows by one per restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How to run the helper and how patient to be with it.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub envs: Vec<(OsString, OsString)>,
    /// From spawn to `Ready`.
    pub ready_timeout: Duration,
    /// Bound of the blocking [`NsConnector::connect`].
    pub connect_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// A helper whose ping stays unanswered this long is killed (and restarted).
    pub heartbeat_timeout: Duration,
    /// Delay before a restart; doubles per quick death up to `restart_backoff_max`.
    pub restart_backoff_min: Duration,
    pub restart_backoff_max: Duration,
    /// A helper that lived this long resets the backoff.
    pub restart_backoff_reset: Duration,
}

impl SupervisorConfig {
    /// The production setup: re-execute this very binary with [`HELPER_MARKER`].
    pub fn current_exe() -> SupervisorConfig {
        SupervisorConfig {
            program: PathBuf::from("/proc/self/exe"),
            args: vec![OsString::from(HELPER_MARKER)],
            envs: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            restart_backoff_min: Duration::from_millis(100),
            restart_backoff_max: Duration::from_secs(5),
            restart_backoff_reset: Duration::from_secs(30),
        }
    }
}

/// Why the helper could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error(
        "could not start the namespace helper: {0}. The gateway needs root, or unprivileged user \
         namespaces enabled and a /dev/net/tun it can open (see the rampart::netns docs)"
    )]
    Spawn(io::Error),
    #[error("namespace helper setup failed at {stage}: {message}")]
    Setup {
        stage: String,
        errno: Option<i32>,
        message: String,
    },
    #[error("namespace helper exited before it was ready ({0})")]
    Exited(ExitStatus),
    #[error("namespace helper sent nothing within {0:?}")]
    ReadyTimeout(Duration),
    #[error("namespace helper protocol error: {0}")]
    Protocol(String),
    #[error("namespace supervisor: {0}")]
    Io(io::Error),
    #[error("the namespace supervisor was shut down")]
    Closed,
}

/// Why a connect request did not produce a socket.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the namespace helper is restarting; retry later")]
    Unavailable,
    #[error("the namespace helper died before answering")]
    HelperDied,
    #[error("connect failed inside the namespace: {0}")]
    Failed(Errno),
    #[error("the socket was lost on its way from the helper (gateway out of file descriptors?)")]
    FdLost,
    #[error("no answer from the namespace helper within {0:?}")]
    Timeout(Duration),
    #[error("the namespace supervisor has shut down")]
    Closed,
}

/// A TUN of the namespace. The descriptor is blocking as created; set `O_NONBLOCK` before using it with
/// an event loop (the flag is shared with nobody: the helper closed its copy).
#[derive(Debug)]
pub struct TunFd {
    pub name: String,
    pub mtu: u32,
    /// The TUN's own address inside the namespace.
    pub addr: Ipv4Addr,
    /// The NAT range routed to it.
    pub routed: Ipv4Net,
    pub fd: OwnedFd,
}

/// Everything one helper generation hands out. Blocking descriptors, owned by the receiver.
#[derive(Debug)]
pub struct NsInstance {
    pub generation: Generation,
    pub helper_pid: u32,
    /// `up0`: write NAT-ed packets of upgraded flows, read what the namespace's TCP stack answers.
    pub upgrade_tun: TunFd,
    /// `dn0`: read packets of downgrade connections, write what their peers answer.
    pub downgrade_tun: TunFd,
    /// Listening on [`super::UPGRADE_LISTEN`]; `accept()`'s peer address is the flow's NAT source.
    pub tcp_listener: TcpListener,
    /// Bound to [`super::UPGRADE_LISTEN`].
    pub udp_socket: UdpSocket,
}

#[derive(Debug)]
pub enum NsEvent {
    Ready(NsInstance),
    /// The helper of `generation` is gone (already reaped); every flow of that generation is dead.
    Died {
        generation: Generation,
        status: ExitStatus,
    },
}

type Reply = Box<dyn FnOnce(Result<(OwnedFd, SocketAddr), ConnectError>) + Send>;

#[derive(Debug, Clone, Copy)]
struct Live {
    generation: Generation,
    pid: u32,
}

struct State {
    live: Option<Live>,
    closed: bool,
    next_req: u64,
    outbox: VecDeque<Message>,
    pending: HashMap<ReqId, Reply>,
}

struct Shared {
    state: Mutex<State>,
    wake: EventFd,
    requests: AtomicU64,
}

impl Shared {
    fn new(wake: EventFd) -> Shared {
        Shared {
            state: Mutex::new(State {
                live: None,
                closed: false,
                next_req: 0,
                outbox: VecDeque::new(),
                pending: HashMap::new(),
            }),
            wake,
            requests: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        // EAGAIN only if the counter is saturated, which still wakes the reader.
        let _ = self.wake.write(1);
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Fails everything queued or in flight.
    fn fail_all(&self, error: fn() -> ConnectError) {
        let pending: Vec<Reply> = {
            let mut st = self.lock();
            st.outbox.clear();
            st.pending.drain().map(|(_, r)| r).collect()
        };
        for reply in pending {
            reply(Err(error()));
        }
    }
}

pub struct NsSupervisor;

impl NsSupervisor {
    /// Starts the helper for this binary (see [`SupervisorConfig::current_exe`]) and waits until it is
    /// ready. The first `Ready` event is already queued when this returns.
    pub fn start() -> Result<NsHandle, NsError> {
        Self::start_with(SupervisorConfig::current_exe())
    }

    pub fn start_with(cfg: SupervisorConfig) -> Result<NsHandle, NsError> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| NsError::Io(e.into()))?;
        let shared = Arc::new(Shared::new(wake));
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
        let (started_tx, started_rx) = mpsc::sync_channel(1);
        let connect_timeout = cfg.connect_timeout;
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("rampart-netns".into())
                .spawn(move || supervise(&shared, &cfg, &events_tx, started_tx))
                .map_err(NsError::Io)?
        };
        match started_rx.recv() {
            Ok(Ok(())) => Ok(NsHandle {
                connector: NsConnector {
                    shared,
                    connect_timeout,
                },
                events: Some(events_rx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(NsError::Io(io::Error::other(
                    "the supervisor thread ended without reporting",
                )))
            }
        }
    }
}

/// Owns the supervisor thread; dropping it shuts the helper down (Shutdown message, then SIGKILL if it
/// lingers) and reaps it.
pub struct NsHandle {
    connector: NsConnector,
    events: Option<Receiver<NsEvent>>,
    thread: Option<JoinHandle<()>>,
}

impl NsHandle {
    /// The lifecycle events, starting with the first `Ready`. Once.
    pub fn take_events(&mut self) -> Option<Receiver<NsEvent>> {
        self.events.take()
    }

    /// A cheap, cloneable handle for connect requests (usable after this handle is gone: it then fails
    /// with [`ConnectError::Closed`]).
    pub fn connector(&self) -> NsConnector {
        self.connector.clone()
    }

    /// The generation currently serving requests, if any.
    pub fn generation(&self) -> Option<Generation> {
        self.connector.shared.lock().live.map(|l| l.generation)
    }

    pub fn helper_pid(&self) -> Option<u32> {
        self.connector.shared.lock().live.map(|l| l.pid)
    }

    /// See [`NsConnector::connect`].
    pub fn connect(
        &self,
        dst: SocketAddr,
        bind_src: Option<SocketAddr>,
    ) -> Result<TcpStream, ConnectError> {
        self.connector.connect(dst, bind_src)
    }
}

impl Drop for NsHandle {
    fn drop(&mut self) {
        self.connector.shared.lock().closed = true;
        self.connector.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.connector.shared.fail_all(|| ConnectError::Closed);
    }
}

// ---- the supervisor thread ----

/// Lifecycle events waiting for the consumer (two per helper life; restarts back off, so a few suffice).
const EVENT_QUEUE: usize = 16;

/// Queues `event`, waiting for room while the consumer catches up; gives up once the handle is closed or the
/// consumer is gone (nobody is left to act on it), so a consumer that stopped reading never blocks shutdown.
fn deliver(shared: &Shared, events: &Sender<NsEvent>, mut event: NsEvent) {
    loop {
        match events.try_send(event) {
            Ok(()) | Err(TrySendError::Closed(_)) => return,
            Err(TrySendError::Full(back)) => {
                let open = sleep_unless_closed(shared, Duration::from_millis(20));
                // The sleep may have taken a wake-up meant for the serving loop (a queued request): give it back.
                shared.wake();
                if !open {
                    return;
                }
                event = back;
            }
        }
    }
}

fn supervise(
    shared: &Shared,
    cfg: &SupervisorConfig,
    events: &Sender<NsEvent>,
    started: mpsc::SyncSender<Result<(), NsError>>,
) {
    let mut started = Some(started);
    let mut backoff = cfg.restart_backoff_min;
    let mut generation = Generation(0);
    loop {
        if shared.is_closed() {
            return;
        }
        let (mut child, ctl, ready, fds) = match launch(shared, cfg) {
            Ok(launched) => launched,
            Err(NsError::Closed) => return,
            Err(e) => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, ?backoff, "namespace helper failed to start; retrying");
                if !sleep_unless_closed(shared, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(cfg.restart_backoff_max);
                continue;
            }
        };
        generation = Generation(generation.0 + 1);
        let pid = child.id();
        let instance = match instance(generation, pid, &ready, fds) {
            Ok(i) => i,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                if let Some(tx) = started.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, "namespace helper sent an unusable ready message");
                if !sleep_unless_closed(shared, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(cfg.restart_backoff_max);
                continue;
            }
        };
        shared.lock().live = Some(Live { generation, pid });
        let up_since = Instant::now();
        tracing::info!(%generation, pid, "namespace helper ready");
        deliver(shared, events, NsEvent::Ready(instance));
        if let Some(tx) = started.take() {
            let _ = tx.send(Ok(()));
        }

        let end = serve(shared, ctl.as_fd(), &mut child, cfg);

        let closed = {
            let mut st = shared.lock();
            st.live = None;
            st.closed
        };
        shared.fail_all(if closed {
            || ConnectError::Closed
        } else {
            || ConnectError::HelperDied
        });
        let status = match end {
            End::Shutdown => {
                let _ = proto::send(ctl.as_fd(), &Message::Shutdown, &[], MsgFlags::MSG_DONTWAIT);
                reap(&mut child, Duration::from_secs(2))
            }
            End::HelperGone => reap(&mut child, Duration::from_secs(2)),
        };
        drop(ctl);
        match status {
            Ok(status) => {
                if closed {
                    tracing::debug!(%generation, %status, "namespace helper stopped");
                } else {
                    tracing::warn!(%generation, %status, "namespace helper died; restarting it");
                }
                deliver(shared, events, NsEvent::Died { generation, status });
            }
            Err(e) => {
                tracing::warn!(%generation, error = %e, "could not reap the namespace helper")
            }
        }
        if closed {
            return;
        }
        if up_since.elapsed() >= cfg.restart_backoff_reset {
            backoff = cfg.restart_backoff_min;
        }
        if !sleep_unless_closed(shared, backoff) {
            return;
        }
        backoff = (backoff * 2).min(cfg.restart_backoff_max);
    }
}

/// Sleeps `d` unless the handle is dropped meanwhile; `false` if it was.
fn sleep_unless_closed(shared: &Shared, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if shared.is_closed() {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        let mut fds = [PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, poll_timeout(left));
        let _ = shared.wake.read();
    }
}

fn poll_timeout(d: Duration) -> PollTimeout {
    // Round up so a short remainder does not become a busy zero-timeout loop.
    let ms = d.as_millis().saturating_add(1).min(i32::MAX as u128);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// Waits until `child` has exited, killing it if it takes longer than `grace`.
fn reap(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

enum End {
    /// The handle was dropped.
    Shutdown,
    /// EOF on the control socket: the helper exited or was killed.
    HelperGone,
}

/// Moves requests to the helper and replies back until the helper goes away or the handle is dropped.
fn serve(shared: &Shared, ctl: BorrowedFd<'_>, child: &mut Child, cfg: &SupervisorConfig) -> End {
    let mut ping_seq = 0u64;
    let mut outstanding_ping: Option<(u64, Instant)> = None;
    let mut next_ping = Instant::now() + cfg.heartbeat_interval;
    let mut killed = false;
    loop {
        let now = Instant::now();
        let want_out = {
            let mut st = shared.lock();
            if st.closed {
                return End::Shutdown;
            }
            if outstanding_ping.is_none() && now >= next_ping {
                ping_seq += 1;
                st.outbox.push_back(Message::Ping { seq: ping_seq });
                outstanding_ping = Some((ping_seq, now));
                next_ping = now + cfg.heartbeat_interval;
            }
            !st.outbox.is_empty()
        };
        let wait = match outstanding_ping {
            Some((_, sent)) => {
                let overdue = sent + cfg.heartbeat_timeout;
                if now >= overdue && !killed {
                    tracing::warn!(
                        pid = child.id(),
                        "namespace helper stopped answering; killing it"
                    );
                    let _ = child.kill();
                    killed = true;
                }
                overdue
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(100))
            }
            None => next_ping.saturating_duration_since(now),
        };
        let out_flags = if want_out {
            PollFlags::POLLIN | PollFlags::POLLOUT
        } else {
            PollFlags::POLLIN
        };
        let mut fds = [
            PollFd::new(ctl, out_flags),
            PollFd::new(shared.wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, poll_timeout(wait)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                tracing::warn!(error = %e, "poll on the namespace control socket failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let ctl_events = fds[0].revents().unwrap_or(PollFlags::empty());
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            let _ = shared.wake.read();
        }
        if ctl_events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            loop {
                match proto::recv(ctl, MsgFlags::MSG_DONTWAIT) {
                    Ok(Received::Eof) => return End::HelperGone,
                    Ok(Received::Message(msg, fds)) => {
                        handle_reply(shared, msg, fds, &mut outstanding_ping)
                    }
                    Ok(Received::Invalid { msg, error }) => {
                        tracing::warn!(%error, "bad message from the namespace helper");
                        if let Some(Message::Connected { req_id, .. }) = msg {
                            let reply = shared.lock().pending.remove(&req_id);
                            if let Some(reply) = reply {
                                reply(Err(ConnectError::FdLost));
                            }
                        }
                    }
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "namespace control socket failed; killing the helper");
                        let _ = child.kill();
                        break;
                    }
                }
            }
        }
        if want_out && ctl_events.contains(PollFlags::POLLOUT) {
            flush(shared, ctl, child);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn died(n: u64) -> NsEvent {
        NsEvent::Died {
            generation: Generation(n),
            status: ExitStatus::from_raw(0),
        }
    }

    /// The lifecycle queue is bounded without losing events while the handle is open: a full queue makes the
    /// supervisor wait for the consumer; once the handle is closed it stops waiting (shutdown never hangs on a
    /// consumer that stopped reading).
    #[test]
    fn lifecycle_events_wait_for_room_and_give_up_once_closed() {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).unwrap();
        let shared = Arc::new(Shared::new(wake));
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        deliver(&shared, &tx, died(1));
        let waiting = std::thread::spawn({
            let (shared, tx) = (shared.clone(), tx.clone());
            move || deliver(&shared, &tx, died(2))
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !waiting.is_finished(),
            "the second event did not wait for room"
        );
        let got = |rx: &mut Receiver<NsEvent>| match rx.try_recv() {
            Ok(NsEvent::Died { generation, .. }) => Some(generation.0),
            _ => None,
        };
        assert_eq!(got(&mut rx), Some(1));
        waiting.join().unwrap();
        assert_eq!(got(&mut rx), Some(2), "the waiting event was lost");

        // Full again, then closed: the supervisor gives up instead of waiting forever.
        deliver(&shared, &tx, died(3));
        let stuck = std::thread::spawn({
            let (shared, tx) = (shared.clone(), tx.clone());
            move || deliver(&shared, &tx, died(4))
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!stuck.is_finished());
        shared.lock().closed = true;
        shared.wake();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stuck.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            stuck.is_finished(),
            "delivery kept waiting after the handle closed"
        );
    }
}
