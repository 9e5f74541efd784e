//! Where off-ramp sockets leave the appliance, per tenant (`[[tenant]] egress`): created inside a network
//! namespace, bound to an interface (SO_BINDTODEVICE) and/or marked for policy routing (SO_MARK). Two tenants
//! with the same off-ramp CIDR thus reach two different networks.
//!
//! A socket belongs to the network namespace of the thread that created it, so each egress namespace gets a
//! thread of its own that entered it once (`setns`, which needs CAP_SYS_ADMIN then, not later) and creates
//! sockets on request; connecting and all IO happen on the runtime as for any socket. Must never: decide
//! which destinations are allowed (the core did), or block the runtime.
#![deny(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::config::Egress;

type Reply = tokio::sync::oneshot::Sender<io::Result<OwnedFd>>;
/// A request to an egress namespace's worker: a socket of this domain and type.
type Request = (Domain, Type, Reply);

/// Socket requests waiting for a namespace worker (each takes microseconds); beyond this an off-ramp connect
/// fails at once instead of queueing without bound.
const SOCKET_QUEUE: usize = 1024;

/// Sockets of the tenants' egresses; one worker thread per egress namespace, started on first use.
#[derive(Default)]
pub struct Egresses {
    workers: Mutex<HashMap<PathBuf, mpsc::SyncSender<Request>>>,
}

impl Egresses {
    pub fn new() -> Arc<Egresses> {
        Arc::new(Egresses::default())
    }

    /// Starts the workers of every egress namespace `cfg` names (at start and on reload, while the gateway
    /// may still enter namespaces), so the runtime never waits for one to start.
    pub fn prepare(&self, cfg: &crate::config::Config) {
        for t in &cfg.tenants {
            if let Some(ns) = &t.egress.netns {
                if let Err(e) = self.worker(ns) {
                    tracing::error!(tenant = %t.id, error = %e, "egress namespace unusable; the tenant's off-ramp connections will fail");
                }
            }
        }
    }

    /// A TCP connection to `dst` through `egress`.
    pub async fn connect_tcp(&self, egress: &Egress, dst: SocketAddr) -> io::Result<TcpStream> {
        if egress.is_host() {
            return TcpStream::connect(dst).await;
        }
        let s = self
            .socket(egress, Domain::for_address(dst), Type::STREAM)
            .await?;
        TcpSocket::from_std_stream(std::net::TcpStream::from(s))
            .connect(dst)
            .await
    }

    /// A UDP socket connected to `dst` through `egress`.
    pub async fn connect_udp(&self, egress: &Egress, dst: SocketAddr) -> io::Result<UdpSocket> {
        let s = self
            .socket(egress, Domain::for_address(dst), Type::DGRAM)
            .await?;
        let any: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        s.bind(&any.into())?;
        let u = UdpSocket::from_std(std::net::UdpSocket::from(s))?;
        u.connect(dst).await?;
        Ok(u)
    }

    /// A fresh non-blocking socket in `egress`'s namespace, bound to its interface and carrying its mark.
    async fn socket(&self, egress: &Egress, domain: Domain, ty: Type) -> io::Result<Socket> {
        let s = match &egress.netns {
            None => Socket::new(domain, ty, None)?,
            Some(ns) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.worker(ns)?
                    .try_send((domain, ty, tx))
                    .map_err(|e| match e {
                        mpsc::TrySendError::Full(_) => io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "egress namespace worker is saturated; connection refused",
                        ),
                        mpsc::TrySendError::Disconnected(_) => {
                            io::Error::other("egress namespace worker stopped")
                        }
                    })?;
                Socket::from(
                    rx.await
                        .map_err(|_| io::Error::other("egress namespace worker stopped"))??,
                )
            }
        };
        if let Some(i) = &egress.interface {
            s.bind_device(Some(i.as_bytes()))?;
        }
        if let Some(m) = egress.fwmark {
            s.set_mark(m)?;
        }
        s.set_nonblocking(true)?;
        s.set_cloexec(true)?;
        Ok(s)
    }

    fn worker(&self, ns: &Path) -> io::Result<mpsc::SyncSender<Request>> {
        let mut w = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = w.get(ns) {
            return Ok(tx.clone());
        }
        let file = std::fs::File::open(ns)?;
        let (tx, rx) = mpsc::sync_channel::<Request>(SOCKET_QUEUE);
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let path = ns.to_path_buf();
        std::thread::Builder::new()
            .name("rampart-egress".into())
            .spawn(move || {
                if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(io::Error::other(format!(
                        "cannot enter egress namespace {}: {e} (the gateway needs CAP_SYS_ADMIN to \
                         enter a namespace the first time a tenant uses it)",
                        path.display()
                    ))));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                while let Ok((domain, ty, reply)) = rx.recv() {
                    let s = Socket::new(domain, ty, Some(protocol_of(ty)));
                    let _ = reply.send(s.map(OwnedFd::from));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("egress namespace worker failed to start"))??;
        w.insert(ns.to_path_buf(), tx.clone());
        Ok(tx)
    }
}

fn protocol_of(ty: Type) -> Protocol {
    if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    }
}
