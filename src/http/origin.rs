//! The origin side of an inspected flow: a hyper client connection over the leg the off-ramp already opened
//! (plain, or TLS towards the original destination), re-opened through the off-ramp (`Reconnect`) when the
//! origin closes it between requests. Without `Reconnect` (a downgraded leg carries the device's own 5-tuple,
//! so there is exactly one), the origin closing is signalled (`Origin::closed`) so the device's connection is
//! ended gracefully too. HTTP/1.1 origins serve one request at a time (requests wait for the connection);
//! HTTP/2 origins multiplex.
#![deny(unsafe_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt as _;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex};

use super::rewrite::OriginProto;
use super::tls::ALPN_H2;

/// The body type of everything the inspector sends (to the origin and to the device).
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Opens a new leg to the original destination (the same way the off-ramp opened the first).
pub type Reconnect =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> + Send + Sync>;

/// A connected origin leg.
pub enum OriginIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("cannot reach the origin again: {0}")]
    Connect(io::Error),
    #[error("TLS towards the origin: {0}")]
    Tls(io::Error),
    #[error("HTTP towards the origin: {0}")]
    Http(#[from] hyper::Error),
}

/// Most HTTP/1.1 connections to the origin of one flow: the streams of an HTTP/2 device run in parallel on
/// them (only where the leg can be re-opened).
const MAX_H1_CONNECTIONS: usize = 6;

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// The open origin connections of a flow.
enum Conns {
    None,
    /// Idle or busy; a busy one is not ready until its exchange completes.
    H1(Vec<http1::SendRequest<Body>>),
    H2(http2::SendRequest<Body>),
}

pub struct Origin {
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    reconnect: Option<Reconnect>,
    /// Set when a connection ends and none can be re-opened.
    dead: Arc<watch::Sender<bool>>,
    first: std::sync::Mutex<Option<OriginIo>>,
    conns: Arc<Mutex<Conns>>,
}

/// A connection ready for one request (HTTP/1.1: taken out of the pool until the request is sent).
pub struct Lease(LeaseKind);

enum LeaseKind {
    H1 {
        sender: http1::SendRequest<Body>,
        pool: Arc<Mutex<Conns>>,
    },
    H2(http2::SendRequest<Body>),
}

impl Lease {
    pub fn proto(&self) -> OriginProto {
        match self.0 {
            LeaseKind::H1 { .. } => OriginProto::Http1,
            LeaseKind::H2(_) => OriginProto::Http2,
        }
    }

    pub async fn send(self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        match self.0 {
            LeaseKind::H1 { mut sender, pool } => {
                let fut = sender.send_request(req);
                // Back into the pool at once: it is not ready again until this exchange completes.
                if let Conns::H1(v) = &mut *pool.lock().await {
                    v.push(sender);
                }
                fut.await
            }
            LeaseKind::H2(mut s) => s.send_request(req).await,
        }
    }
}

async fn handshake<T>(
    io: T,
    h2: bool,
    dead: Option<Arc<watch::Sender<bool>>>,
) -> Result<Sender, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (s, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "origin h2 connection ended");
            }
            if let Some(d) = dead {
                d.send_replace(true);
            }
        });
        Ok(Sender::H2(s))
    } else {
        let (s, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!(error = %e, "origin connection ended");
            }
            if let Some(d) = dead {
                d.send_replace(true);
            }
        });
        Ok(Sender::H1(s))
    }
}

fn negotiated_h2(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(ALPN_H2)
}

impl Origin {
    /// `tls`: the client config and name used for the first leg, reused on reconnect.
    pub fn new(
        first: OriginIo,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
        reconnect: Option<Reconnect>,
    ) -> Origin {
        Origin {
            tls,
            reconnect,
            dead: Arc::new(watch::channel(false).0),
            first: std::sync::Mutex::new(Some(first)),
            conns: Arc::new(Mutex::new(Conns::None)),
        }
    }

    async fn connect(&self) -> Result<Sender, OriginError> {
        let first = self.first.lock().expect("origin first leg").take();
        let io = match first {
            Some(io) => io,
            None => {
                let Some(reconnect) = &self.reconnect else {
                    return Err(OriginError::Connect(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "the origin closed the connection (this flow cannot open another)",
                    )));
                };
                let tcp = reconnect().await.map_err(OriginError::Connect)?;
                let _ = tcp.set_nodelay(true);
                match &self.tls {
                    None => OriginIo::Plain(tcp),
                    Some((cfg, name)) => {
                        let connect = tokio_rustls::TlsConnector::from(cfg.clone())
                            .connect(name.clone(), tcp);
                        let tls = tokio::time::timeout(super::ORIGIN_TLS_TIMEOUT, connect)
                            .await
                            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
                            .map_err(OriginError::Tls)?;
                        OriginIo::Tls(Box::new(tls))
                    }
                }
            }
        };
        let dead = self.reconnect.is_none().then(|| self.dead.clone());
        Ok(match io {
            OriginIo::Plain(tcp) => handshake(tcp, false, dead).await?,
            OriginIo::Tls(tls) => {
                let h2 = negotiated_h2(&tls);
                handshake(*tls, h2, dead).await?
            }
        })
    }

    /// Resolves once the origin connection has ended for good (never, for origins that can be re-opened).
    pub async fn closed(&self) {
        let mut rx = self.dead.subscribe();
        let _ = rx.wait_for(|dead| *dead).await;
    }

    fn can_open(&self) -> bool {
        self.reconnect.is_some() || self.first.lock().expect("origin first leg").is_some()
    }

    /// Opens a connection and registers it.
    async fn open(&self) -> Result<Lease, OriginError> {
        let sender = self.connect().await?;
        let mut conns = self.conns.lock().await;
        Ok(Lease(match sender {
            Sender::H2(s) => {
                *conns = Conns::H2(s.clone());
                LeaseKind::H2(s)
            }
            Sender::H1(sender) => {
                if !matches!(*conns, Conns::H1(_)) {
                    *conns = Conns::H1(Vec::new());
                }
                LeaseKind::H1 {
                    sender,
                    pool: self.conns.clone(),
                }
            }
        }))
    }

    /// A connection ready for the next request: an idle pooled one, a new one (the leg is re-opened when the
    /// origin closed it, and up to `MAX_H1_CONNECTIONS` HTTP/1.1 connections run at once), or the first
    /// busy one once it is done.
    pub async fn lease(&self) -> Result<Lease, OriginError> {
        for _ in 0..3 {
            let mut conns = self.conns.lock().await;
            match &mut *conns {
                Conns::H2(s) if !s.is_closed() => {
                    let mut s = s.clone();
                    drop(conns);
                    match s.ready().await {
                        Ok(()) => return Ok(Lease(LeaseKind::H2(s))),
                        Err(e) => tracing::trace!(error = %e, "origin h2 connection closed"),
                    }
                    let mut conns = self.conns.lock().await;
                    if matches!(&*conns, Conns::H2(c) if c.is_closed()) {
                        *conns = Conns::None;
                    }
                }
                Conns::H1(pool) => {
                    pool.retain(|s| !s.is_closed());
                    let idle = pool
                        .iter_mut()
                        .position(|s| matches!(s.ready().now_or_never(), Some(Ok(()))));
                    if let Some(i) = idle {
                        let sender = pool.swap_remove(i);
                        let pool = self.conns.clone();
                        return Ok(Lease(LeaseKind::H1 { sender, pool }));
                    }
                    if pool.len() < MAX_H1_CONNECTIONS && self.can_open() {
                        drop(conns);
                        return self.open().await;
                    }
                    if pool.is_empty() {
                        *conns = Conns::None;
                        continue;
                    }
                    // All busy and no more may be opened: wait for the first to finish its exchange.
                    let mut sender = pool.swap_remove(0);
                    drop(conns);
                    if sender.ready().await.is_ok() {
                        let pool = self.conns.clone();
                        return Ok(Lease(LeaseKind::H1 { sender, pool }));
                    }
                }
                Conns::H2(_) | Conns::None => {
                    *conns = Conns::None;
                    drop(conns);
                    return self.open().await;
                }
            }
        }
        Err(OriginError::Connect(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the origin closed new connections at once",
        )))
    }
}
