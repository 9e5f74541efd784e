//! Sessions in progress, for the review UI's live view and its "terminate session": each authenticated
//! session registers here ([`LiveSessions::register`]); its channels' target output is offered to viewers
//! ([`LiveTap::send`], a broadcast that drops for slow viewers rather than slowing the relay), with the last
//! [`BACKLOG`] bytes kept so a viewer that joins late sees the current screen; an admin's terminate request
//! wakes the session's run loop ([`LiveGuard::terminated`]), which disconnects the client and records who did.
//!
//! Sessions of tenants with a reviewer key (`audit_recipient`) are registered without output: their plaintext
//! is for the reviewer's key only, so the gateway never serves it.
//!
//! Never: forward anything from a viewer to the session (the view is read-only).
#![deny(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

/// Output kept per session for viewers that join late.
pub const BACKLOG: usize = 64 * 1024;
const VIEWER_QUEUE: usize = 1024;

/// Output of one channel of a live session.
#[derive(Debug, Clone)]
pub struct LiveChunk {
    pub channel: u32,
    pub data: Bytes,
}

struct Entry {
    tenant: String,
    output: Option<broadcast::Sender<LiveChunk>>,
    backlog: Arc<Mutex<VecDeque<u8>>>,
    terminate: watch::Sender<Option<String>>,
    /// Dropped when the session ends: viewers' receivers see it at once (channel tasks may hold taps a little
    /// longer).
    _ended: watch::Sender<()>,
    ended: watch::Receiver<()>,
}

/// The registry of sessions in progress (one per gateway, shared by the SSH inspector and the review UI).
#[derive(Default)]
pub struct LiveSessions {
    sessions: Mutex<HashMap<String, Entry>>,
}

/// What [`LiveSessions::terminate`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminate {
    Requested,
    NotLive,
}

/// A viewer's subscription.
pub struct Viewer {
    pub backlog: Vec<u8>,
    pub output: broadcast::Receiver<LiveChunk>,
    /// `changed()` fails once the session has ended.
    pub ended: watch::Receiver<()>,
}

/// Why a session cannot be viewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewError {
    NotLive,
    /// The tenant's output is sealed to its reviewer key.
    Sealed,
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session; `viewable` is false for sealed tenants. Dropping the guard unregisters it.
    pub fn register(self: &Arc<Self>, id: &str, tenant: &str, viewable: bool) -> LiveGuard {
        let (terminate, terminated) = watch::channel(None);
        let output = viewable.then(|| broadcast::channel(VIEWER_QUEUE).0);
        let backlog = Arc::new(Mutex::new(VecDeque::new()));
        let (ended_tx, ended) = watch::channel(());
        let tap = LiveTap {
            output: output.clone(),
            backlog: backlog.clone(),
        };
        self.lock().insert(
            id.to_owned(),
            Entry {
                tenant: tenant.to_owned(),
                output,
                backlog,
                terminate,
                _ended: ended_tx,
                ended,
            },
        );
        LiveGuard {
            hub: self.clone(),
            id: id.to_owned(),
            tap,
            terminated,
        }
    }

    /// The tenant of a session in progress.
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        self.lock().get(id).map(|e| e.tenant.clone())
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Ids of the sessions in progress.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn view(&self, id: &str) -> Result<Viewer, ViewError> {
        let map = self.lock();
        let e = map.get(id).ok_or(ViewError::NotLive)?;
        let output = e.output.as_ref().ok_or(ViewError::Sealed)?.subscribe();
        let backlog = e
            .backlog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        Ok(Viewer {
            backlog,
            output,
            ended: e.ended.clone(),
        })
    }

    /// Asks the session to end; `by` is recorded as the reason's detail.
    pub fn terminate(&self, id: &str, by: &str) -> Terminate {
        match self.lock().get(id) {
            Some(e) => {
                e.terminate.send_replace(Some(by.to_owned()));
                Terminate::Requested
            }
            None => Terminate::NotLive,
        }
    }
}

/// Held by the session while it runs.
pub struct LiveGuard {
    hub: Arc<LiveSessions>,
    id: String,
    tap: LiveTap,
    terminated: watch::Receiver<Option<String>>,
}

impl LiveGuard {
    /// The session is over: it leaves the registry and its viewers' streams end.
    pub fn end(&self) {
        self.hub.lock().remove(&self.id);
    }

    pub fn tap(&self) -> LiveTap {
        self.tap.clone()
    }

    /// Resolves with the terminating admin's name once one asks the session to end.
    pub async fn terminated(&self) -> String {
        let mut rx = self.terminated.clone();
        loop {
            if let Some(by) = rx.borrow_and_update().clone() {
                return by;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.id);
    }
}

/// Where a channel's recorder offers target output.
#[derive(Clone)]
pub struct LiveTap {
    output: Option<broadcast::Sender<LiveChunk>>,
    backlog: Arc<Mutex<VecDeque<u8>>>,
}

impl LiveTap {
    pub fn send(&self, channel: u32, data: &[u8]) {
        let Some(tx) = &self.output else { return };
        {
            let mut b = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
            b.extend(data.iter().copied());
            let over = b.len().saturating_sub(BACKLOG);
            b.drain(..over);
        }
        if tx.receiver_count() > 0 {
            let _ = tx.send(LiveChunk {
                channel,
                data: Bytes::copy_from_slice(data),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn viewers_get_backlog_and_output_and_terminate_wakes_the_session() {
        let hub = Arc::new(LiveSessions::default());
        let g = hub.register("s1", "acme", true);
        let tap = g.tap();
        tap.send(1, b"before ");
        let mut v = hub.view("s1").unwrap();
        assert_eq!(v.backlog, b"before ");
        tap.send(1, b"after");
        assert_eq!(&v.output.recv().await.unwrap().data[..], b"after");
        // The session ends while a channel task still holds its tap: the viewer learns it at once.
        g.end();
        assert!(v.ended.changed().await.is_err());
        assert!(!hub.is_live("s1"));
        let g = hub.register("s1", "acme", true);
        assert_eq!(hub.terminate("s1", "root"), Terminate::Requested);
        assert_eq!(g.terminated().await, "root");
        let sealed = hub.register("s2", "beta", false);
        assert!(matches!(hub.view("s2"), Err(ViewError::Sealed)));
        sealed.tap().send(1, b"secret");
        drop(g);
        assert!(!hub.is_live("s1"));
        assert_eq!(hub.terminate("s1", "root"), Terminate::NotLive);
        assert!(matches!(hub.view("nope"), Err(ViewError::NotLive)));
        drop(sealed);
    }
}
