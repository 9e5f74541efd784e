//! The connect side of the supervisor: [`NsConnector`] queues a downgrade connect request for the supervisor
//! thread (which owns the control socket) and waits for its reply; [`flush`] sends the queued requests and
//! [`handle_reply`] matches each answer of the helper to its waiting caller by request id.

use super::*;

/// Asks the helper for downgrade connections.
#[derive(Clone)]
pub struct NsConnector {
    pub(super) shared: Arc<Shared>,
    pub(super) connect_timeout: Duration,
}

impl NsConnector {
    /// Opens a TCP connection from inside the namespace to `dst` (normally an address in
    /// [`super::DOWNGRADE_NAT_RANGE`]), optionally bound to `bind_src` first. Returns as soon as the helper
    /// has started the connect: the socket is **non-blocking with the connect in progress** — its SYN is
    /// waiting on the downgrade TUN. Wait for writability and check `take_error()` before using it.
    /// Blocks the calling thread for the round trip to the helper (bounded by the connect timeout).
    pub fn connect(
        &self,
        dst: SocketAddr,
        bind_src: Option<SocketAddr>,
    ) -> Result<TcpStream, ConnectError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let id = self.submit(
            dst,
            bind_src,
            Box::new(move |r| {
                // The caller may have timed out; the socket is then dropped (closed) here.
                let _ = tx.send(r);
            }),
        )?;
        match rx.recv_timeout(self.connect_timeout) {
            Ok(r) => r.map(|(fd, _local)| TcpStream::from(fd)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.shared.lock().pending.remove(&id);
                Err(ConnectError::Timeout(self.connect_timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ConnectError::Closed),
        }
    }

    /// [`Self::connect`] without blocking the thread. Every request is answered, failed when the helper
    /// dies, or failed at shutdown; put a `tokio::time::timeout` around it for a tighter bound.
    pub async fn connect_async(
        &self,
        dst: SocketAddr,
        bind_src: Option<SocketAddr>,
    ) -> Result<TcpStream, ConnectError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            dst,
            bind_src,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        match rx.await {
            Ok(r) => r.map(|(fd, _local)| TcpStream::from(fd)),
            Err(_) => Err(ConnectError::Closed),
        }
    }

    /// Connect requests sent since start, across generations.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    fn submit(
        &self,
        dst: SocketAddr,
        bind_src: Option<SocketAddr>,
        reply: Reply,
    ) -> Result<ReqId, ConnectError> {
        let id = {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(ConnectError::Closed);
            }
            if st.live.is_none() {
                return Err(ConnectError::Unavailable);
            }
            st.next_req += 1;
            let req_id = ReqId(st.next_req);
            st.outbox.push_back(Message::Connect {
                req_id,
                dst,
                bind_src,
            });
            st.pending.insert(req_id, reply);
            req_id
        };
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        self.shared.wake();
        Ok(id)
    }
}

/// Sends queued messages until the socket is full.
pub(super) fn flush(shared: &Shared, ctl: BorrowedFd<'_>, child: &mut Child) {
    loop {
        let Some(msg) = shared.lock().outbox.pop_front() else {
            return;
        };
        match proto::send(ctl, &msg, &[], MsgFlags::MSG_DONTWAIT) {
            Ok(()) => {}
            Err(proto::ProtoError::Io(Errno::EAGAIN | Errno::EINTR)) => {
                shared.lock().outbox.push_front(msg);
                return;
            }
            Err(e) => {
                // The helper is gone or the message cannot be encoded; either way this request is over.
                tracing::warn!(error = %e, "sending to the namespace helper failed");
                if let Message::Connect { req_id, .. } = msg {
                    let reply = shared.lock().pending.remove(&req_id);
                    if let Some(reply) = reply {
                        reply(Err(ConnectError::HelperDied));
                    }
                }
                if matches!(e, proto::ProtoError::Io(_)) {
                    let _ = child.kill();
                    return;
                }
            }
        }
    }
}

pub(super) fn handle_reply(
    shared: &Shared,
    msg: Message,
    mut fds: Vec<OwnedFd>,
    outstanding_ping: &mut Option<(u64, Instant)>,
) {
    match msg {
        Message::Connected { req_id, local } => {
            let reply = shared.lock().pending.remove(&req_id);
            // `recv` checked there is exactly one descriptor.
            if let (Some(reply), Some(fd)) = (reply, fds.pop()) {
                reply(Ok((fd, local)));
            }
        }
        Message::ConnectFailed { req_id, errno } => {
            let reply = shared.lock().pending.remove(&req_id);
            if let Some(reply) = reply {
                reply(Err(ConnectError::Failed(Errno::from_raw(errno))));
            }
        }
        Message::Pong { seq } => {
            if outstanding_ping.is_some_and(|(s, _)| s == seq) {
                *outstanding_ping = None;
            }
        }
        other => tracing::warn!(message = ?other, "unexpected message from the namespace helper"),
    }
}
