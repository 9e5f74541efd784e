//! The control protocol between the gateway (parent) and the namespace helper, over a `SOCK_SEQPACKET`
//! socketpair: one JSON message per datagram, file descriptors in `SCM_RIGHTS` of that same datagram.
//!
//! The pure part ([`Message::encode`], [`Message::decode`], [`Message::expected_fds`]) is separate from the
//! socket part ([`send`], [`recv`]) so the codec is testable without sockets. A datagram is at most
//! [`MAX_MESSAGE`] bytes and carries at most [`MAX_FDS`] descriptors (the kernel's `SCM_MAX_FD`).
//!
//! | direction | message | fds |
//! |---|---|---|
//! | helper → parent | [`Message::Ready`] | one per TUN, then one per listener, in the order listed |
//! | helper → parent | [`Message::SetupFailed`] (then the helper exits) | – |
//! | parent → helper | [`Message::Connect`] | – |
//! | helper → parent | [`Message::Connected`] (connect in progress) / [`Message::ConnectFailed`] | 1 / – |
//! | both | [`Message::Ping`] → [`Message::Pong`] | – |
//! | parent → helper | [`Message::Shutdown`] | – |
//!
//! EOF on the socket means the other side is gone.

use std::io::{IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use ipnet::Ipv4Net;
use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; the parent refuses a helper that reports another version.
pub const PROTO_VERSION: u32 = 1;
/// Largest datagram either side sends or accepts.
pub const MAX_MESSAGE: usize = 4096;
/// Most descriptors in one datagram (`SCM_MAX_FD`; 254 makes `sendmsg` fail with EINVAL).
pub const MAX_FDS: usize = 253;

/// Correlates a [`Message::Connect`] with its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReqId(pub u64);

/// What a TUN is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunRole {
    /// Raw packets of flows being upgraded are written here (sources NAT-ed into its routed range).
    Upgrade,
    /// Packets of connections the helper opened on request (destinations in its routed range) come out here.
    Downgrade,
}

/// One TUN as the helper configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunInfo {
    pub role: TunRole,
    pub name: String,
    pub mtu: u32,
    /// The TUN's own `/32` inside the namespace.
    pub addr: Ipv4Addr,
    /// The NAT range routed to this TUN inside the namespace.
    pub routed: Ipv4Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// A listening TCP socket (`accept()` yields upgraded flows).
    Tcp,
    /// A bound UDP socket.
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerInfo {
    pub kind: ListenerKind,
    pub addr: SocketAddr,
}

/// The helper is configured; the datagram carries one fd per TUN, then one per listener, in list order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    pub proto_version: u32,
    pub tuns: Vec<TunInfo>,
    pub listeners: Vec<ListenerInfo>,
}

/// One control message. Externally tagged JSON: `{"connect":{"req_id":1,...}}`, `"shutdown"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Ready(Ready),
    /// The helper could not set the namespace up and is exiting; `stage` names the step.
    SetupFailed {
        stage: String,
        errno: Option<i32>,
        message: String,
    },
    /// Open a non-blocking TCP connection to `dst` (an address routed into the namespace's downgrade TUN),
    /// optionally bound to `bind_src` first.
    Connect {
        req_id: ReqId,
        dst: SocketAddr,
        bind_src: Option<SocketAddr>,
    },
    /// The connect is in progress (`EINPROGRESS`) on the socket carried by this datagram.
    Connected {
        req_id: ReqId,
        local: SocketAddr,
    },
    ConnectFailed {
        req_id: ReqId,
        errno: i32,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("empty control message")]
    Empty,
    #[error("control message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("control message carries {got} file descriptors, expected {expected}")]
    FdCount { expected: usize, got: usize },
    #[error("control message or its descriptors were truncated by the kernel (out of fds?)")]
    Truncated,
    #[error("control socket: {0}")]
    Io(#[from] Errno),
}

impl Message {
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let bytes = serde_json::to_vec(self)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtoError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, ProtoError> {
        if bytes.is_empty() {
            return Err(ProtoError::Empty);
        }
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtoError::TooLarge(bytes.len()));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    /// How many descriptors must ride with this message.
    pub fn expected_fds(&self) -> usize {
        match self {
            Message::Ready(r) => r.tuns.len() + r.listeners.len(),
            Message::Connected { .. } => 1,
            _ => 0,
        }
    }

    /// Checks that a datagram carrying this message came with exactly the descriptors it needs.
    pub fn check_fds(&self, got: usize) -> Result<(), ProtoError> {
        let expected = self.expected_fds();
        if got != expected {
            return Err(ProtoError::FdCount { expected, got });
        }
        Ok(())
    }
}

/// Sends one message with its descriptors. `flags` is typically empty (blocking) or `MSG_DONTWAIT`;
/// `MSG_NOSIGNAL` is always added.
pub fn send(
    sock: BorrowedFd<'_>,
    msg: &Message,
    fds: &[BorrowedFd<'_>],
    flags: MsgFlags,
) -> Result<(), ProtoError> {
    let bytes = msg.encode()?;
    if fds.len() != msg.expected_fds() || fds.len() > MAX_FDS {
        return Err(ProtoError::FdCount {
            expected: msg.expected_fds(),
            got: fds.len(),
        });
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let iov = [IoSlice::new(&bytes)];
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        flags | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// What one `recv` returned.
#[derive(Debug)]
pub enum Received {
    /// A well-formed message with exactly its descriptors.
    Message(Message, Vec<OwnedFd>),
    /// A datagram that could not be used; its descriptors were closed. `msg` is the decoded message when
    /// only its descriptors were wrong or lost.
    Invalid {
        msg: Option<Message>,
        error: ProtoError,
    },
    /// The peer closed its end.
    Eof,
}

/// Receives one datagram. Descriptors arrive close-on-exec and are owned (closed on every error path).
/// `Err` is an error of the socket itself (`EAGAIN` with `MSG_DONTWAIT`, `EBADF`, …).
pub fn recv(sock: BorrowedFd<'_>, flags: MsgFlags) -> Result<Received, Errno> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let (bytes, msg_flags, fds) = {
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        // A malformed cmsg buffer yields an error here; nothing was received in that case that we could own.
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    for fd in raw {
                        // SAFETY: the kernel just installed this descriptor in our table for us (SCM_RIGHTS);
                        // nothing else refers to it, so taking ownership is sound.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if bytes == 0 && fds.is_empty() {
        return Ok(Received::Eof);
    }
    if msg_flags.contains(MsgFlags::MSG_TRUNC) {
        return Ok(Received::Invalid {
            msg: None,
            error: ProtoError::Truncated,
        });
    }
    let msg = match Message::decode(&buf[..bytes]) {
        Ok(msg) => msg,
        Err(error) => return Ok(Received::Invalid { msg: None, error }),
    };
    // MSG_CTRUNC: the kernel dropped descriptors (typically we are at RLIMIT_NOFILE). The message itself is
    // intact, so the caller can still fail the request it answers.
    if msg_flags.contains(MsgFlags::MSG_CTRUNC) {
        return Ok(Received::Invalid {
            msg: Some(msg),
            error: ProtoError::Truncated,
        });
    }
    if let Err(error) = msg.check_fds(fds.len()) {
        return Ok(Received::Invalid {
            msg: Some(msg),
            error,
        });
    }
    Ok(Received::Message(msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    fn ready() -> Message {
        Message::Ready(Ready {
            proto_version: PROTO_VERSION,
            tuns: vec![
                TunInfo {
                    role: TunRole::Upgrade,
                    name: "up0".into(),
                    mtu: 1420,
                    addr: Ipv4Addr::new(100, 66, 0, 1),
                    routed: "100.64.0.0/16".parse().unwrap(),
                },
                TunInfo {
                    role: TunRole::Downgrade,
                    name: "dn0".into(),
                    mtu: 1420,
                    addr: Ipv4Addr::new(100, 66, 1, 1),
                    routed: "100.65.0.0/16".parse().unwrap(),
                },
            ],
            listeners: vec![ListenerInfo {
                kind: ListenerKind::Tcp,
                addr: "100.66.0.1:7000".parse().unwrap(),
            }],
        })
    }

    fn all_messages() -> Vec<Message> {
        vec![
            ready(),
            Message::SetupFailed {
                stage: "open /dev/net/tun".into(),
                errno: Some(13),
                message: "permission denied".into(),
            },
            Message::Connect {
                req_id: ReqId(u64::MAX),
                dst: "100.65.1.2:9000".parse().unwrap(),
                bind_src: None,
            },
            Message::Connect {
                req_id: ReqId(7),
                dst: "[2001:db8::1]:443".parse().unwrap(),
                bind_src: Some("100.66.1.1:45000".parse().unwrap()),
            },
            Message::Connected {
                req_id: ReqId(7),
                local: "100.66.1.1:43016".parse().unwrap(),
            },
            Message::ConnectFailed {
                req_id: ReqId(8),
                errno: libc::ENETUNREACH,
            },
            Message::Ping { seq: 1 },
            Message::Pong { seq: u64::MAX },
            Message::Shutdown,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in all_messages() {
            let bytes = msg.encode().unwrap();
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(
                Message::decode(&bytes).unwrap(),
                msg,
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn garbage_is_rejected() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x00\x01\x02",
            b"not json",
            b"{}",
            b"\"bogus\"",
            b"{\"connect\":{\"req_id\":1}}",
            b"{\"connect\":{\"req_id\":-1,\"dst\":\"1.2.3.4:5\",\"bind_src\":null}}",
            b"{\"connect\":{\"req_id\":1,\"dst\":\"1.2.3.4\",\"bind_src\":null}}",
            b"{\"connect\":{\"req_id\":1,\"dst\":\"1.2.3.4:5\",\"bind_src\":null,\"extra\":1}}",
            b"{\"ping\":{\"seq\":1}} trailing",
            b"{\"ready\":{\"proto_version\":1,\"tuns\":[],\"listeners\":[],\"x\":0}}",
        ];
        for case in cases {
            assert!(
                Message::decode(case).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(case)
            );
        }
        let huge = vec![b' '; MAX_MESSAGE + 1];
        assert!(matches!(
            Message::decode(&huge),
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn fd_counts_are_enforced() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let connected = Message::Connected {
            req_id: ReqId(1),
            local: "100.66.1.1:1".parse().unwrap(),
        }
        .encode()
        .unwrap();
        let connected = Message::decode(&connected).unwrap();
        assert!(matches!(
            connected.check_fds(0),
            Err(ProtoError::FdCount {
                expected: 1,
                got: 0
            })
        ));
        assert!(connected.check_fds(1).is_ok());
        assert!(matches!(
            Message::Ping { seq: 1 }.check_fds(1),
            Err(ProtoError::FdCount {
                expected: 0,
                got: 1
            })
        ));
        // Over the socket: a Connected without its descriptor is reported with the message, so the request
        // it answers can be failed.
        socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&connected.encode().unwrap())],
            &[],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        match recv(b.as_fd(), MsgFlags::empty()).unwrap() {
            Received::Invalid {
                msg: Some(m),
                error:
                    ProtoError::FdCount {
                        expected: 1,
                        got: 0,
                    },
            } => assert_eq!(m, connected),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn messages_and_fds_cross_a_seqpacket_socketpair() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (x, y) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let connected = Message::Connected {
            req_id: ReqId(3),
            local: "100.66.1.1:40000".parse().unwrap(),
        };
        send(a.as_fd(), &connected, &[x.as_fd()], MsgFlags::empty()).unwrap();
        send(a.as_fd(), &Message::Ping { seq: 9 }, &[], MsgFlags::empty()).unwrap();
        // A garbage datagram with a descriptor attached: rejected, descriptor closed, stream stays usable.
        let raw = [y.as_raw_fd()];
        socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"garbage")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        // Sending with the wrong number of fds is refused before anything is written.
        assert!(send(
            a.as_fd(),
            &Message::Shutdown,
            &[x.as_fd()],
            MsgFlags::empty()
        )
        .is_err());
        drop(a);

        match recv(b.as_fd(), MsgFlags::empty()).unwrap() {
            Received::Message(m, fds) => {
                assert_eq!(m, connected);
                assert_eq!(fds.len(), 1);
                // The passed descriptor is the same socket: a datagram sent through it reaches `y`.
                send(
                    fds[0].as_fd(),
                    &Message::Pong { seq: 4 },
                    &[],
                    MsgFlags::empty(),
                )
                .unwrap();
                match recv(y.as_fd(), MsgFlags::empty()).unwrap() {
                    Received::Message(Message::Pong { seq: 4 }, _) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            recv(b.as_fd(), MsgFlags::empty()).unwrap(),
            Received::Message(Message::Ping { seq: 9 }, _)
        ));
        assert!(matches!(
            recv(b.as_fd(), MsgFlags::empty()).unwrap(),
            Received::Invalid {
                msg: None,
                error: ProtoError::Malformed(_)
            }
        ));
        assert!(matches!(
            recv(b.as_fd(), MsgFlags::empty()).unwrap(),
            Received::Eof
        ));
    }
}
