//! `TxQueue`: datagrams the core wants sent, written straight into reusable buffers the shell owns, already
//! grouped into send trains.
//!
//! Each destination gets a *lane*: a buffer its datagrams are written into back to back, so consecutive
//! datagrams for one destination are contiguous. A *train* is a run of datagrams in one lane that can leave in
//! one UDP GSO send (`UDP_SEGMENT`): all of one size, the last one possibly shorter, at most `MAX_SEGMENTS`
//! and `MAX_TRAIN_BYTES`. A datagram that does not fit the open train of its lane (larger, or the train is
//! full or ended by a shorter one) starts a new train in the same lane; nothing is copied.
//!
//! Order: datagrams for one destination stay in the order they were committed (a destination only ever
//! appends to its newest lane's newest train, and trains are listed in the order they were started).
//! Datagrams for different destinations may be reordered against each other, which UDP allows.

use std::net::SocketAddr;

/// Large enough for any UDP payload plus WireGuard overhead (boringtun panics on short buffers).
pub const BUF_SIZE: usize = 65_536 + 64;
/// Most segments in one GSO send (the kernel's `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes in one train: one UDP payload, which must stay below 64 KiB with the IPv6 and UDP headers.
pub const MAX_TRAIN_BYTES: usize = 65_000;
/// A lane holds at least one largest datagram after any number of bytes up to `BUF_SIZE`, so a slot of any
/// size is always found in a lane that is not yet half full.
const LANE_SIZE: usize = 2 * BUF_SIZE;
/// How many of the newest lanes are searched for a destination's lane. A destination not among them gets a
/// new lane (its newest), which keeps the search bounded when a batch goes to many peers.
const LANE_SEARCH: usize = 16;

struct Lane {
    to: SocketAddr,
    buf: Box<[u8]>,
    used: usize,
    /// The train at the end of this lane, while it can still take datagrams.
    open: Option<usize>,
}

/// A run of datagrams for one destination, contiguous in its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrainMeta {
    lane: usize,
    start: usize,
    /// Size of every segment but the last (which may be shorter).
    seg: usize,
    len: usize,
    segments: usize,
}

impl TrainMeta {
    fn takes(&self, len: usize) -> bool {
        len > 0
            && len <= self.seg
            && self.segments < MAX_SEGMENTS
            && self.len + len <= MAX_TRAIN_BYTES
    }
}

/// One train ready to send: `data` is `segments` datagrams of `seg` bytes each (the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Train<'a> {
    pub to: SocketAddr,
    pub seg: usize,
    pub segments: usize,
    pub data: &'a [u8],
}

impl<'a> Train<'a> {
    /// The datagrams of this train, as a receiver splitting at `seg` sees them.
    pub fn datagrams(&self) -> impl Iterator<Item = &'a [u8]> {
        self.data.chunks(self.seg.max(1))
    }
}

/// Outgoing datagrams of one batch. Lane buffers are allocated on first use and reused for the life of the
/// queue.
#[derive(Default)]
pub struct TxQueue {
    lanes: Vec<Lane>,
    /// Lanes in use this batch: `lanes[..live]`.
    live: usize,
    trains: Vec<TrainMeta>,
    /// The lane of the slot last handed out, which `commit` fills.
    pending: Option<usize>,
    datagrams: usize,
}

impl TxQueue {
    pub fn new() -> TxQueue {
        TxQueue::default()
    }

    /// Room for the next datagram to `to`, at least `max` bytes (at most `BUF_SIZE`). Its contents become a
    /// datagram only after `commit`; a slot never committed costs nothing.
    pub fn slot(&mut self, to: SocketAddr, max: usize) -> &mut [u8] {
        debug_assert!(max <= BUF_SIZE, "slot of {max} bytes");
        let max = max.min(BUF_SIZE);
        // A lane opened for a slot that was never committed (a timer tick asks every peer) is taken back, so
        // asking costs no lane.
        if let Some(i) = self.pending.take() {
            if i + 1 == self.live && self.lanes[i].used == 0 {
                self.live -= 1;
            }
        }
        let found = self.lanes[..self.live]
            .iter()
            .enumerate()
            .rev()
            .take(LANE_SEARCH)
            .find(|(_, l)| l.to == to)
            .map(|(i, l)| (i, l.buf.len() - l.used >= max));
        let i = match found {
            Some((i, true)) => i,
            // The destination's newest lane is full, or none is recent: a new lane becomes its newest.
            _ => self.new_lane(to),
        };
        self.pending = Some(i);
        let l = &mut self.lanes[i];
        &mut l.buf[l.used..l.used + max]
    }

    fn new_lane(&mut self, to: SocketAddr) -> usize {
        let i = self.live;
        if i == self.lanes.len() {
            self.lanes.push(Lane {
                to,
                buf: vec![0u8; LANE_SIZE].into_boxed_slice(),
                used: 0,
                open: None,
            });
        } else {
            let l = &mut self.lanes[i];
            l.to = to;
            l.used = 0;
            l.open = None;
        }
        self.live += 1;
        i
    }

    /// Queues the first `len` bytes of the slot last returned by `slot` (for the destination given there).
    pub fn commit(&mut self, len: usize) {
        let Some(i) = self.pending.take() else {
            debug_assert!(false, "commit without slot");
            return;
        };
        if len == 0 {
            return; // not a datagram
        }
        let lane = &mut self.lanes[i];
        debug_assert!(lane.used + len <= lane.buf.len());
        let start = lane.used;
        lane.used += len;
        self.datagrams += 1;
        if let Some(t) = lane.open {
            let train = &mut self.trains[t];
            if train.takes(len) {
                train.len += len;
                train.segments += 1;
                if len < train.seg {
                    lane.open = None; // a shorter datagram ends its train
                }
                return;
            }
        }
        lane.open = Some(self.trains.len());
        self.trains.push(TrainMeta {
            lane: i,
            start,
            seg: len,
            len,
            segments: 1,
        });
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.datagrams
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams == 0
    }

    /// The queued trains: in the order each was started, so every destination's datagrams stay in order.
    pub fn trains(&self) -> impl Iterator<Item = Train<'_>> {
        (0..self.trains.len()).filter_map(|i| self.train(i))
    }

    /// How many trains are queued.
    pub fn train_count(&self) -> usize {
        self.trains.len()
    }

    /// The `i`th queued train (in `trains` order).
    pub fn train(&self, i: usize) -> Option<Train<'_>> {
        let t = self.trains.get(i)?;
        let l = &self.lanes[t.lane];
        Some(Train {
            to: l.to,
            seg: t.seg,
            segments: t.segments,
            data: &l.buf[t.start..t.start + t.len],
        })
    }

    /// The queued datagrams one by one, train after train.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.trains()
            .flat_map(|t| t.datagrams().map(move |d| (t.to, d)))
    }

    /// Forgets the queued datagrams; the buffers stay for reuse.
    pub fn clear(&mut self) {
        self.live = 0;
        self.trains.clear();
        self.pending = None;
        self.datagrams = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, i], 51820))
    }

    /// Queues a datagram of `len` bytes for `to` whose bytes name its destination and sequence number.
    fn push(q: &mut TxQueue, to: SocketAddr, seq: u16, len: usize) -> Vec<u8> {
        let tag = match to.ip() {
            std::net::IpAddr::V4(v4) => v4.octets()[3],
            std::net::IpAddr::V6(v6) => v6.octets()[15],
        };
        let d: Vec<u8> = (0..len)
            .map(|k| match k {
                0 => seq as u8,
                1 => (seq >> 8) as u8,
                _ => (k as u8) ^ tag,
            })
            .collect();
        q.slot(to, len + 32)[..len].copy_from_slice(&d);
        q.commit(len);
        d
    }

    fn shape(q: &TxQueue) -> Vec<(SocketAddr, usize, usize, usize)> {
        q.trains()
            .map(|t| (t.to, t.seg, t.segments, t.data.len()))
            .collect()
    }

    #[test]
    fn equal_sizes_for_one_destination_form_one_train_ended_by_a_shorter_one() {
        let mut q = TxQueue::new();
        for s in 0..5 {
            push(&mut q, addr(1), s, 1452);
        }
        push(&mut q, addr(1), 5, 100);
        push(&mut q, addr(1), 6, 1452);
        assert_eq!(
            shape(&q),
            vec![(addr(1), 1452, 6, 5 * 1452 + 100), (addr(1), 1452, 1, 1452)]
        );
        assert_eq!(q.len(), 7);
    }

    #[test]
    fn a_larger_datagram_starts_a_new_train() {
        let mut q = TxQueue::new();
        push(&mut q, addr(1), 0, 148);
        push(&mut q, addr(1), 1, 1452);
        push(&mut q, addr(1), 2, 1452);
        assert_eq!(
            shape(&q),
            vec![(addr(1), 148, 1, 148), (addr(1), 1452, 2, 2904)]
        );
    }

    #[test]
    fn trains_are_capped_by_segments_and_bytes() {
        let mut q = TxQueue::new();
        for s in 0..100 {
            push(&mut q, addr(1), s, 200);
        }
        let segs: Vec<usize> = q.trains().map(|t| t.segments).collect();
        assert_eq!(segs, vec![64, 36]);
        q.clear();
        for s in 0..50 {
            push(&mut q, addr(2), s, 1452);
        }
        let segs: Vec<usize> = q.trains().map(|t| t.segments).collect();
        assert_eq!(
            segs,
            vec![44, 6],
            "44 * 1452 = 63,888 <= 65,000 < 45 * 1452"
        );
    }

    #[test]
    fn interleaved_destinations_each_get_their_own_train() {
        let mut q = TxQueue::new();
        for s in 0..10 {
            push(&mut q, addr(1), s, 1452);
            push(&mut q, addr(2), s, 92);
        }
        assert_eq!(
            shape(&q),
            vec![(addr(1), 1452, 10, 14520), (addr(2), 92, 10, 920)]
        );
    }

    #[test]
    fn an_uncommitted_slot_queues_nothing_and_buffers_are_reused() {
        let mut q = TxQueue::new();
        let _ = q.slot(addr(1), BUF_SIZE);
        assert!(q.is_empty());
        push(&mut q, addr(1), 0, 1000);
        q.clear();
        push(&mut q, addr(3), 1, 10);
        assert_eq!(q.iter().count(), 1);
        assert_eq!(q.lanes.len(), 1, "the lane was reused");
    }

    #[test]
    fn slots_never_committed_take_no_lanes() {
        let mut q = TxQueue::new();
        for i in 0..100 {
            let _ = q.slot(addr(i), 256);
        }
        push(&mut q, addr(7), 0, 92);
        assert_eq!(q.lanes.len(), 1);
        assert_eq!(shape(&q), vec![(addr(7), 92, 1, 92)]);
    }

    #[test]
    fn a_full_lane_moves_the_destination_to_a_new_one_in_order() {
        let mut q = TxQueue::new();
        let mut sent = Vec::new();
        for s in 0..200 {
            sent.push(push(&mut q, addr(1), s, 1452));
        }
        let got: Vec<&[u8]> = q.iter().map(|(_, d)| d).collect();
        assert_eq!(got, sent.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert!(q.lanes.len() > 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the mix of destinations and sizes: every train obeys the GSO rules, and splitting each
        /// train at its segment size gives back every destination's datagrams byte for byte, in order.
        #[test]
        fn trains_split_at_their_segment_size_give_back_every_datagram_in_order(
            seq in proptest::collection::vec((0u8..40, prop_oneof![4 => Just(1452usize), 2 => Just(92), 2 => 1usize..2000, 1 => 1usize..BUF_SIZE - 32]), 1..200)
        ) {
            let mut q = TxQueue::new();
            let mut want: std::collections::HashMap<SocketAddr, Vec<Vec<u8>>> = Default::default();
            for (s, &(dest, len)) in seq.iter().enumerate() {
                let to = addr(dest);
                let d = push(&mut q, to, s as u16, len);
                want.entry(to).or_default().push(d);
            }
            prop_assert_eq!(q.len(), seq.len());
            let mut got: std::collections::HashMap<SocketAddr, Vec<Vec<u8>>> = Default::default();
            for t in q.trains() {
                prop_assert!(t.segments >= 1 && t.segments <= MAX_SEGMENTS);
                prop_assert!(t.segments == 1 || t.data.len() <= MAX_TRAIN_BYTES);
                prop_assert_eq!(t.data.len().div_ceil(t.seg), t.segments);
                let parts: Vec<&[u8]> = t.datagrams().collect();
                for p in &parts[..parts.len() - 1] {
                    prop_assert_eq!(p.len(), t.seg);
                }
                prop_assert!(parts[parts.len() - 1].len() <= t.seg);
                got.entry(t.to).or_default().extend(parts.iter().map(|p| p.to_vec()));
            }
            prop_assert_eq!(got, want);
        }
    }
}
