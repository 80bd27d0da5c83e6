//! Expiry deadlines (RFC 8656 §7 allocations, §9 permissions, §12 channels) in a min-heap.
//!
//! Each allocation has at most one live entry: the earliest deadline of anything it holds,
//! remembered in the allocation's `scheduled` field. When that deadline moves (a refresh, a
//! new permission or channel, an expiry) a new entry is pushed and the old one goes stale; stale
//! entries are dropped when they reach the top. So a wake costs O(log n) per allocation that is
//! due, never a scan of all of them, and the per-datagram path never touches the heap.

use std::{cmp::Reverse, collections::BinaryHeap, time::Instant};

use super::AllocationId;

/// Deadlines of allocations, earliest first.
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, AllocationId)>>,
}

impl Timers {
    /// Adds a deadline for `id` (the caller decides when an entry is needed).
    pub(super) fn push(&mut self, at: Instant, id: AllocationId) {
        self.heap.push(Reverse((at, id)));
    }

    /// The earliest entry, possibly a stale one.
    pub(super) fn earliest(&self) -> Option<(Instant, AllocationId)> {
        self.heap.peek().map(|Reverse(entry)| *entry)
    }

    /// Drops the earliest entry (a stale one).
    pub(super) fn pop(&mut self) {
        self.heap.pop();
    }

    /// Takes the earliest entry if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, AllocationId)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(entry)| entry),
            _ => None,
        }
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_due_entries_earliest_first() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.push(t0 + Duration::from_secs(3), AllocationId(3));
        timers.push(t0 + Duration::from_secs(1), AllocationId(1));
        timers.push(t0 + Duration::from_secs(2), AllocationId(2));
        assert_eq!(
            timers.earliest(),
            Some((t0 + Duration::from_secs(1), AllocationId(1)))
        );
        assert_eq!(timers.pop_due(t0), None);
        let due: Vec<u64> = std::iter::from_fn(|| timers.pop_due(t0 + Duration::from_secs(2)))
            .map(|(_, id)| id.0)
            .collect();
        assert_eq!(due, vec![1, 2]);
        assert_eq!(timers.len(), 1);
    }
}
