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
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex, OwnedMutexGuard};

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

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

pub struct Origin {
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    reconnect: Option<Reconnect>,
    /// Set when a connection ends and none can be re-opened.
    dead: Arc<watch::Sender<bool>>,
    first: std::sync::Mutex<Option<OriginIo>>,
    sender: Arc<Mutex<Option<Sender>>>,
}

/// A connection ready for one request (HTTP/1.1: held exclusively until the request is sent).
pub struct Lease(LeaseKind);

enum LeaseKind {
    H1(OwnedMutexGuard<Option<Sender>>),
    H2(http2::SendRequest<Body>),
}

impl Lease {
    pub fn proto(&self) -> OriginProto {
        match self.0 {
            LeaseKind::H1(_) => OriginProto::Http1,
            LeaseKind::H2(_) => OriginProto::Http2,
        }
    }

    pub async fn send(self, req: Request<Body>) -> Result<Response<Incoming>, hyper::Error> {
        match self.0 {
            LeaseKind::H1(mut guard) => {
                let fut = match guard.as_mut() {
                    Some(Sender::H1(s)) => s.send_request(req),
                    _ => unreachable!("an H1 lease holds an H1 sender"),
                };
                drop(guard);
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
            sender: Arc::new(Mutex::new(None)),
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

    /// A connection ready for the next request; re-opens the leg if the origin closed it.
    pub async fn lease(&self) -> Result<Lease, OriginError> {
        let mut guard = self.sender.clone().lock_owned().await;
        for _ in 0..2 {
            if guard.as_ref().is_none_or(Sender::is_closed) {
                *guard = Some(self.connect().await?);
            }
            let ready = match guard.as_mut() {
                Some(Sender::H1(s)) => s.ready().await,
                Some(Sender::H2(s)) => s.ready().await,
                None => continue,
            };
            match ready {
                Ok(()) => {
                    return Ok(Lease(match guard.as_ref() {
                        Some(Sender::H2(s)) => LeaseKind::H2(s.clone()),
                        _ => LeaseKind::H1(guard),
                    }))
                }
                // Closed between requests (keep-alive timeout, `Connection: close`): open a new leg once.
                Err(e) => {
                    tracing::trace!(error = %e, "origin connection closed; reconnecting");
                    *guard = None;
                }
            }
        }
        Err(OriginError::Connect(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "the origin closed new connections at once",
        )))
    }
}
