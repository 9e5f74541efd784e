//! The WireGuard on-ramp IO shell: one UDP socket for every peer of every tenant, pumped by a dedicated thread
//! that owns the `core::Gateway`. It receives in batches (`recvmmsg`, with UDP GRO where the kernel allows it:
//! a train of datagrams from one source arrives as one message, split back with `sys::split_gro` and handed to
//! `Gateway::handle_datagrams` in one call), hands each datagram to the core, sleeps
//! until the core's next deadline (`Gateway::poll_timeout`, at most `MAX_WAIT`) and then runs what is due
//! (`Gateway::handle_timeout`), and sends what the core queued: trains of equal-size datagrams per destination, each train one
//! UDP GSO message, many per `sendmmsg` (`sys::UdpSender`, which falls back to one datagram per message on a
//! socket without GSO). It decides nothing itself.
//!
//! When the layer-4 path is on, the same thread also owns the upgrade TUN of the gateway's namespace: it waits
//! on both descriptors (`poll`), feeds packets leaving the namespace to `Gateway::handle_tun_packet`, and writes
//! what the core queued for the namespace. `Upgraded` events go to the application side (off-ramp proxy),
//! every other flow event to the audit sink.
//!
//! Control (reloads, status queries, a new namespace) reaches the thread over a channel and is applied between
//! batches, so the core never needs a lock; each command also wakes the thread (a socket pair it polls).
#![deny(unsafe_code)]

pub mod context;
pub mod gue;
pub mod seqpacket;

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixDatagram;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::audit::AuditSink;
use crate::config::Config;
use crate::core::{
    tx::BUF_SIZE, ApplySummary, Dest, DropReason, FlowEvent, FlowSeq, Gateway, Metrics, PeerStatus,
    TxQueue, TIMER_TICK,
};
use crate::handoff::{Handoff, SlotReleases};
use crate::keys::PeerKey;
use crate::sys;

/// Flush queued output after this many datagrams even in the middle of a receive batch.
const TX_FLUSH_AT: usize = 128;
/// Most packets read from the TUN per loop turn (the UDP socket gets its turn in between).
const TUN_BATCH: usize = 64;

/// Hand-offs queued towards the application side before the data path holds them back itself.
pub const HANDOFF_QUEUE: usize = 16_384;
/// The longest the pump sleeps even when the core asks for no wakeup: it beats the data-path heartbeat
/// (`/health` wants one within 5 s) and collects the off-ramp's slot releases at least this often.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Control commands waiting for the pump (it takes them between batches; sending one wakes it); a sender
/// finding the queue full waits for room.
const COMMAND_QUEUE: usize = 64;

/// The application side of upgraded flows: hand-offs go out on a bounded channel, and closed slots come back
/// through a mailbox the pump empties every turn.
#[derive(Clone)]
pub struct AppSide {
    pub handoffs: tokio::sync::mpsc::Sender<Handoff>,
    pub releases: Arc<SlotReleases>,
}

pub enum Command {
    Apply(Arc<Config>, SyncSender<ApplySummary>),
    Status(SyncSender<Vec<PeerStatus>>),
    RestoreEndpoints(Vec<(PeerKey, SocketAddr)>),
    /// The appliance's own addresses changed (they are never off-ramp destinations).
    LocalAddresses(Vec<std::net::IpAddr>),
    /// New TUNs of the gateway's namespace (upgrade, downgrade), after the namespace helper (re)started; flows
    /// upgraded into an older namespace end. `None` detaches them.
    SetTun(Option<(File, File)>),
    /// Test builds only: the data path stops for this long (to show `/health` notices).
    #[cfg(feature = "test-hooks")]
    Stall(std::time::Duration),
    Shutdown,
}

/// Handle to the running data-path thread.
pub struct Onramp {
    commands: SyncSender<Command>,
    /// Written after each command so the pump wakes for it (it may sleep up to `MAX_WAIT` otherwise).
    waker: UnixDatagram,
    /// Taken by the first `shutdown`; shared so that a task still holding the gateway can never keep it alive.
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Onramp {
    /// Starts the pump on `socket` (already bound) with `gateway` (already configured).
    pub fn spawn(
        socket: UdpSocket,
        gateway: Gateway,
        metrics: Arc<Metrics>,
        audit: AuditSink,
        app: Option<AppSide>,
        seqpacket: seqpacket::Seqpacket,
        gue: gue::Gue,
    ) -> std::io::Result<Onramp> {
        sys::set_recv_timeout(&socket, TIMER_TICK)?;
        sys::set_socket_buffers(&socket, 8 << 20);
        let (tx, rx) = mpsc::sync_channel(COMMAND_QUEUE);
        let (waker, wake) = UnixDatagram::pair()?;
        waker.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        let thread = std::thread::Builder::new()
            .name("rampart-onramp".into())
            .spawn(move || {
                pump(
                    socket, gateway, metrics, audit, app, seqpacket, gue, rx, wake,
                )
            })?;
        Ok(Onramp {
            commands: tx,
            waker,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    pub fn send(&self, cmd: Command) -> bool {
        let sent = self.commands.send(cmd).is_ok();
        // A full socket means a wakeup is pending already.
        let _ = self.waker.send(&[0]);
        sent
    }

    /// Applies a new configuration and waits for the summary.
    pub fn apply(&self, cfg: Arc<Config>) -> Option<ApplySummary> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Apply(cfg, tx));
        rx.recv().ok()
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Command::Status(tx));
        rx.recv().unwrap_or_default()
    }

    /// Stops the pump (ending every flow, so each gets its end record) and waits for it. Idempotent.
    pub fn shutdown(&self) {
        self.send(Command::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)] // the pump owns every data-path socket
fn pump(
    socket: UdpSocket,
    mut gw: Gateway,
    metrics: Arc<Metrics>,
    audit: AuditSink,
    app: Option<AppSide>,
    mut seqpacket: seqpacket::Seqpacket,
    mut gue: gue::Gue,
    commands: Receiver<Command>,
    wake: UnixDatagram,
) {
    let mut fds = Vec::new();
    let mut ready = Vec::new();
    let mut sender = sys::UdpSender::new(&socket);
    metrics.global.gso_enabled.set(u64::from(sender.gso()));
    // Remembered for this socket: without it, every message is one datagram.
    let gro = sys::enable_gro(&socket);
    metrics.global.gro_enabled.set(u64::from(gro));
    const {
        assert!(
            BUF_SIZE >= sys::GRO_BUF_SIZE,
            "a coalesced train must fit a receive buffer"
        )
    };
    let mut rx = sys::RecvBatch::new(BUF_SIZE);
    let mut scratch = vec![0u8; BUF_SIZE];
    let mut tx = TxQueue::new();
    // The upgrade and downgrade TUNs of the gateway's namespace, when the layer-4 path is on.
    let mut tuns: Option<(File, File)> = None;
    let mut recv_errors_in_a_row = 0u32;
    // Releases the application side could not take yet (its queue was full); they are never dropped, or the
    // sockets of an ended flow would stay open.
    let mut held: std::collections::VecDeque<Handoff> = std::collections::VecDeque::new();
    let mut emit = |gw: &mut Gateway| {
        let Some(app) = &app else {
            while let Some(ev) = gw.poll_event() {
                audit.offer(ev);
            }
            return;
        };
        while let Some(h) = held.pop_front() {
            if let Err(e) = app.handoffs.try_send(h) {
                held.push_front(e.into_inner());
                break;
            }
        }
        while let Some(ev) = gw.poll_event() {
            let h = match ev {
                FlowEvent::Upgraded(u) => Handoff::Upgraded(u),
                FlowEvent::Released { seq, slot } => Handoff::Released {
                    seq: seq.get(),
                    slot,
                },
                ev => {
                    audit.offer(ev);
                    continue;
                }
            };
            let h = if held.is_empty() {
                match app.handoffs.try_send(h) {
                    Ok(()) => continue,
                    Err(e) => e.into_inner(),
                }
            } else {
                h
            };
            match h {
                // Without its hand-off the connection is refused when it arrives; the flow ends on that RST.
                Handoff::Upgraded(_) => metrics.global.handoffs_dropped.add(1),
                released => held.push_back(released),
            }
        }
    };
    let mut flush = |tx: &mut TxQueue| {
        if !tx.is_empty() {
            let st = sender.send(
                &socket,
                tx.trains().map(|t| (t.to, t.seg, t.segments, t.data)),
            );
            let g = &metrics.global;
            g.datagrams_tx.add(st.sent as u64);
            g.send_errors.add(st.failed as u64);
            g.send_calls.add(st.calls as u64);
            g.send_trains.add(st.trains as u64);
            g.send_train_datagrams.add(st.train_datagrams as u64);
            if st.fallbacks > 0 {
                g.gso_fallbacks.add(st.fallbacks as u64);
                g.gso_enabled.set(u64::from(sender.gso()));
            }
            tx.clear();
        }
    };
    let write_tuns = |gw: &mut Gateway, tuns: &mut Option<(File, File)>| {
        while let Some(t) = gw.poll_transmit() {
            let Some((up, dn)) = tuns.as_mut() else {
                continue; // no namespace: dropped
            };
            let f = match t.dest {
                Dest::UpgradeTun => up,
                Dest::DowngradeTun => dn,
            };
            for p in t.train.datagrams() {
                // A full TUN queue drops the packet; TCP in the namespace recovers.
                if f.write(p).is_err() {
                    metrics.global.tun_write_errors.add(1);
                }
            }
        }
    };
    gue.start(&mut gw, Instant::now(), &mut tx);
    flush(&mut tx);
    loop {
        let now = Instant::now();
        metrics.datapath.beat(now);
        let deadline = gw.poll_timeout().map(|(at, _)| at);
        let wait = deadline.map_or(MAX_WAIT, |at| {
            at.saturating_duration_since(now).min(MAX_WAIT)
        });
        fds.clear();
        fds.extend([
            socket.as_raw_fd(),
            tuns.as_ref().map_or(-1, |(up, _)| up.as_raw_fd()),
            tuns.as_ref().map_or(-1, |(_, dn)| dn.as_raw_fd()),
        ]);
        seqpacket.fds(&mut fds);
        let seq_end = fds.len();
        gue.fds(&mut fds);
        let woken_at = fds.len();
        fds.push(wake.as_raw_fd());
        ready.resize(fds.len(), false);
        metrics.global.wakeups.add(1);
        if let Err(e) = sys::poll_readable(&fds, wait, &mut ready) {
            tracing::error!(error = %e, "poll failed");
            std::thread::sleep(TIMER_TICK);
        }
        if ready[woken_at] {
            while wake.recv(&mut [0u8; 16]).is_ok() {}
        }
        let (udp_ready, up_ready, dn_ready) = (ready[0], ready[1], ready[2]);
        if udp_ready {
            // An error here is usually about one datagram (an ICMP error for an earlier send surfaces as
            // ECONNREFUSED): count it and go on, never sleep (that would let a remote party stall the data
            // path). Only a run of errors backs off, briefly, so a broken socket does not spin.
            match sys::recv_batch(&socket, &mut rx) {
                Ok(n) => {
                    recv_errors_in_a_row = 0;
                    if n > 0 {
                        metrics.global.recv_calls.add(1);
                    }
                }
                Err(e) => {
                    metrics.global.recv_errors.add(1);
                    recv_errors_in_a_row += 1;
                    tracing::debug!(error = %e, "UDP receive error");
                    if recv_errors_in_a_row >= 1000 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        } else {
            rx.meta.clear();
        }
        let now = Instant::now();
        gw.set_admit_new_flows(audit.admits_new_flows());
        for r in &rx.meta {
            let msg = &rx.bufs[r.buf][..r.len];
            match r.segments {
                sys::Segments::One if !r.truncated => {
                    gw.handle_datagram(now, r.from, msg, &mut scratch, &mut tx)
                }
                sys::Segments::Gro(seg) if !r.truncated => match sys::split_gro(msg, seg) {
                    Ok(train) => {
                        let n = r.len.div_ceil(seg);
                        if n > 1 {
                            metrics.global.recv_trains.add(1);
                            metrics.global.recv_train_datagrams.add(n as u64);
                        }
                        gw.handle_datagrams(now, r.from, train, &mut scratch, &mut tx);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "coalesced UDP message refused");
                        metrics
                            .global
                            .unattributed
                            .count_drop(DropReason::MalformedDatagram);
                    }
                },
                // Cut short, or where one datagram ends is unknown: dropped whole, counted once.
                _ => metrics
                    .global
                    .unattributed
                    .count_drop(DropReason::MalformedDatagram),
            }
            if tx.len() >= TX_FLUSH_AT {
                flush(&mut tx);
            }
        }
        seqpacket.handle(&mut gw, now, &ready[3..seq_end], &mut tx);
        if tx.len() >= TX_FLUSH_AT {
            flush(&mut tx);
        }
        gue.handle(&mut gw, now, &ready[seq_end..woken_at], &mut tx);
        if tx.len() >= TX_FLUSH_AT {
            flush(&mut tx);
        }
        for (downgrade, is_ready) in [(false, up_ready), (true, dn_ready)] {
            if !is_ready {
                continue;
            }
            let Some((up, dn)) = tuns.as_mut() else { break };
            let f = if downgrade { dn } else { up };
            let mut failed = false;
            for _ in 0..TUN_BATCH {
                match f.read(&mut scratch) {
                    Ok(0) => break,
                    Ok(n) if downgrade => {
                        gw.handle_downgrade_tun_packet(&mut scratch[..n], &mut tx)
                    }
                    Ok(n) => gw.handle_tun_packet(now, &mut scratch[..n], &mut tx),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::error!(error = %e, "namespace TUN read failed; detaching the TUNs");
                        failed = true;
                        break;
                    }
                }
                if tx.len() >= TX_FLUSH_AT {
                    flush(&mut tx);
                }
            }
            if failed {
                tuns = None;
            }
        }
        if deadline.is_some_and(|at| at <= now) {
            gw.handle_timeout(now, &mut tx);
        }
        if let Some(app) = &app {
            for (slot, seq) in app.releases.take() {
                gw.handle_slot_closed(now, slot, FlowSeq::new(seq));
            }
        }
        flush(&mut tx);
        // Hand-offs first: the application side knows an upgraded flow before its first packet reaches the
        // namespace.
        emit(&mut gw);
        write_tuns(&mut gw, &mut tuns);
        gue.write(&mut gw);
        seqpacket.write(&mut gw);
        loop {
            match commands.try_recv() {
                Ok(Command::Apply(cfg, reply)) => {
                    let summary = gw.apply(&cfg, Instant::now(), &mut tx);
                    gue.apply(cfg.clone(), &mut gw, Instant::now(), &mut tx);
                    seqpacket.apply(cfg, &mut gw, Instant::now(), &mut tx);
                    gue.write(&mut gw);
                    seqpacket.write(&mut gw);
                    flush(&mut tx);
                    emit(&mut gw);
                    let _ = reply.send(summary);
                }
                Ok(Command::LocalAddresses(addrs)) => gw.set_local_addresses(addrs),
                Ok(Command::Status(reply)) => {
                    let _ = reply.send(gw.peer_status());
                }
                Ok(Command::RestoreEndpoints(list)) => {
                    let n = list
                        .iter()
                        .filter(|(k, ep)| gw.handle_restored_endpoint(*k, *ep, &mut tx))
                        .count();
                    tracing::info!(
                        peers = n,
                        "sent handshake initiations to last known device endpoints"
                    );
                    flush(&mut tx);
                }
                Ok(Command::SetTun(new)) => {
                    gw.end_upgraded_flows(Instant::now(), &mut tx);
                    flush(&mut tx);
                    emit(&mut gw);
                    if let Some((up, dn)) = &new {
                        for f in [up, dn] {
                            if let Err(e) = sys::set_nonblocking(f) {
                                tracing::error!(error = %e, "cannot make a namespace TUN non-blocking");
                            }
                        }
                    }
                    tuns = new;
                }
                #[cfg(feature = "test-hooks")]
                Ok(Command::Stall(d)) => {
                    tracing::warn!(?d, "test hook: stalling the data path");
                    std::thread::sleep(d);
                }
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    seqpacket.shutdown();
                    gue.shutdown();
                    gw.shutdown(Instant::now());
                    emit(&mut gw);
                    return;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
    }
}
