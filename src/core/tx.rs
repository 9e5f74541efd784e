//! `TxQueue`: datagrams the core wants sent, written into reusable buffers the shell owns.

use std::net::SocketAddr;

/// Large enough for any UDP payload plus WireGuard overhead (boringtun panics on short buffers).
pub const BUF_SIZE: usize = 65_536 + 64;

/// Outgoing datagrams of one batch. Buffers are allocated on first use and reused for the life of the queue.
#[derive(Default)]
pub struct TxQueue {
    bufs: Vec<Box<[u8]>>,
    meta: Vec<(SocketAddr, usize)>,
}

impl TxQueue {
    pub fn new() -> TxQueue {
        TxQueue::default()
    }

    /// The next free buffer. Its contents become a datagram only after `commit`.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.meta.len();
        if i == self.bufs.len() {
            self.bufs.push(vec![0u8; BUF_SIZE].into_boxed_slice());
        }
        &mut self.bufs[i]
    }

    /// Queues the first `len` bytes of the buffer last returned by `slot` for `to`.
    pub fn commit(&mut self, to: SocketAddr, len: usize) {
        debug_assert!(self.meta.len() < self.bufs.len(), "commit without slot");
        self.meta.push((to, len));
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// The queued datagrams in order.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta
            .iter()
            .zip(&self.bufs)
            .map(|(&(to, len), b)| (to, &b[..len]))
    }

    /// Forgets the queued datagrams; the buffers stay for reuse.
    pub fn clear(&mut self) {
        self.meta.clear();
    }
}
