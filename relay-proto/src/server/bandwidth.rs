//! Per-user bandwidth limit on the socket path (issue 12 item 3): relayed payload bytes per
//! second of one user, both directions together, relay-wide.
//!
//! A user is the quota user ([`crate::auth::Credentials::quota_user`]): REST usernames
//! (`expiry:user`) count under their user part, so minting credentials buys no bandwidth. A
//! user's allocations live on several workers, so the budget is shared: one
//! [`UserBandwidth`] behind every worker's server, as [`super::AllocationQuota`] is.
//!
//! Cost per datagram: the server asks the ledger for a [`BandwidthKey`] once per allocation
//! (when it is created) and keeps it with the allocation's channel routes, so a relayed
//! datagram costs one shard lock and one hashed lookup of an integer, nothing allocated. With
//! no limit configured the server has no ledger at all and the per-datagram path is unchanged
//! (one `Option` test).
//!
//! Over the budget a datagram is dropped (UDP semantics, RFC 8656 §11/§12 do not promise
//! delivery) and counted by direction, never by user.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::AllocationId;

/// Independent locks the ledger is split into (users hash to a shard).
pub const BANDWIDTH_SHARDS: usize = 32;
/// Fixed point: balances are kept in nano-bytes so refills are exact integers.
const NANO: i128 = 1_000_000_000;

/// Which way a relayed datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to peer: ChannelData from the client, Send indications.
    ToPeer,
    /// Peer to client: ChannelData to the client, Data indications.
    ToClient,
}

impl Direction {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Direction::ToPeer => "to_peer",
            Direction::ToClient => "to_client",
        }
    }

    fn index(self) -> usize {
        match self {
            Direction::ToPeer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// A user's place in a ledger, handed out per allocation by [`UserBandwidth::register`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BandwidthKey(pub u64);

/// A relay-wide per-user byte budget as the core uses it. `&self` because it is shared
/// between servers; `Send + Sync` because each server runs on a worker thread of its own.
pub trait UserBandwidth: fmt::Debug + Send + Sync {
    /// Allocation `id` of `user` (the quota user) starts: its key, or `None` when the user is
    /// not limited (nothing is then charged for it).
    fn register(&self, user: &str, id: AllocationId) -> Option<BandwidthKey>;

    /// Allocation `id` registered under `key` is gone.
    fn release(&self, key: BandwidthKey, id: AllocationId);

    /// Charges `bytes` of relayed payload going `direction` at `now`: true means forward it,
    /// false means drop it (counted by the ledger).
    fn admit(&self, key: BandwidthKey, bytes: usize, direction: Direction, now: Instant) -> bool;
}

/// One user's bucket and what the daemon's kernel-path sampler reads.
#[derive(Debug)]
struct Bucket {
    /// The quota user, for logs (a username, never a credential).
    user: Box<str>,
    /// Live allocations registered under this user.
    allocations: Vec<AllocationId>,
    /// Bytes × [`NANO`]; negative after a datagram larger than what was left (debt).
    balance: i128,
    /// When the balance was last refilled.
    last: Option<Instant>,
    /// Bytes offered on the socket path so far (admitted and dropped).
    offered: u64,
}

/// One limited user as the sampler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserUsage {
    /// The user's key.
    pub key: BandwidthKey,
    /// The quota user (for logs).
    pub user: String,
    /// Its live allocations.
    pub allocations: Vec<AllocationId>,
    /// Payload bytes offered on the socket path since the user's first allocation (admitted
    /// and dropped): a monotonic counter while the user has allocations.
    pub socket_offered: u64,
}

/// The shared token-bucket ledger: `rate` bytes per second per user, bursts of `burst` bytes,
/// in [`BANDWIDTH_SHARDS`] mutex-protected shards (held for one bucket update). A user's entry
/// exists while it has allocations, so memory follows the allocation count.
pub struct BandwidthLedger {
    rate: i128,
    burst: i128,
    shards: Box<[Mutex<HashMap<u64, Bucket>>]>,
    hasher: RandomState,
    /// Dropped datagrams and bytes, by [`Direction::index`].
    dropped: [AtomicU64; 2],
    dropped_bytes: [AtomicU64; 2],
}

impl fmt::Debug for BandwidthLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BandwidthLedger")
            .field("rate_bytes", &self.rate)
            .field("burst_bytes", &(self.burst / NANO))
            .finish()
    }
}

impl BandwidthLedger {
    /// `rate` bytes per second per user (both directions together), bursts of up to `burst`
    /// bytes. A user starts with a full burst.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate: i128::from(rate),
            burst: i128::from(burst) * NANO,
            shards: (0..BANDWIDTH_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
            dropped: [AtomicU64::new(0), AtomicU64::new(0)],
            dropped_bytes: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// Bytes per second per user.
    pub fn rate(&self) -> u64 {
        u64::try_from(self.rate).unwrap_or(u64::MAX)
    }

    /// Burst bytes per user.
    pub fn burst(&self) -> u64 {
        u64::try_from(self.burst / NANO).unwrap_or(u64::MAX)
    }

    /// Datagrams dropped over a user's budget going `direction` (for metrics).
    pub fn dropped(&self, direction: Direction) -> u64 {
        self.dropped[direction.index()].load(Ordering::Relaxed)
    }

    /// Bytes of those datagrams (for metrics).
    pub fn dropped_bytes(&self, direction: Direction) -> u64 {
        self.dropped_bytes[direction.index()].load(Ordering::Relaxed)
    }

    /// Every user with live allocations: for the daemon's kernel-path sampler. One shard
    /// locked at a time.
    pub fn usage(&self) -> Vec<UserUsage> {
        let mut out = Vec::new();
        for shard in 0..BANDWIDTH_SHARDS {
            let buckets = self.lock(shard);
            out.extend(buckets.iter().map(|(key, bucket)| UserUsage {
                key: BandwidthKey(*key),
                user: bucket.user.to_string(),
                allocations: bucket.allocations.clone(),
                socket_offered: bucket.offered,
            }));
        }
        out.sort_by_key(|u| u.key);
        out
    }

    fn shard_of(key: u64) -> usize {
        (key % BANDWIDTH_SHARDS as u64) as usize
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, HashMap<u64, Bucket>> {
        // A panic while holding a shard leaves at worst one stale balance.
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl UserBandwidth for BandwidthLedger {
    fn register(&self, user: &str, id: AllocationId) -> Option<BandwidthKey> {
        // A keyed 64-bit hash: two users share a bucket only by a collision an outsider
        // cannot aim for (the key is random per process).
        let key = self.hasher.hash_one(user);
        let mut shard = self.lock(Self::shard_of(key));
        let bucket = shard.entry(key).or_insert_with(|| Bucket {
            user: user.into(),
            allocations: Vec::new(),
            balance: self.burst,
            last: None,
            offered: 0,
        });
        bucket.allocations.push(id);
        Some(BandwidthKey(key))
    }

    fn release(&self, key: BandwidthKey, id: AllocationId) {
        let mut shard = self.lock(Self::shard_of(key.0));
        if let Some(bucket) = shard.get_mut(&key.0) {
            bucket.allocations.retain(|a| *a != id);
            if bucket.allocations.is_empty() {
                shard.remove(&key.0);
            }
        }
    }

    fn admit(&self, key: BandwidthKey, bytes: usize, direction: Direction, now: Instant) -> bool {
        let admitted = {
            let mut shard = self.lock(Self::shard_of(key.0));
            // A key without an entry: its allocations are gone (a datagram in flight).
            let Some(bucket) = shard.get_mut(&key.0) else {
                return true;
            };
            bucket.offered = bucket
                .offered
                .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX));
            let last = bucket.last.get_or_insert(now);
            // Workers pass their own `now`: time only moves forward for a bucket.
            if now > *last {
                let elapsed =
                    i128::try_from(now.duration_since(*last).as_nanos()).unwrap_or(i128::MAX);
                bucket.balance = bucket
                    .balance
                    .saturating_add(elapsed.saturating_mul(self.rate))
                    .min(self.burst);
                *last = now;
            }
            // Positive balance admits a whole datagram, possibly into debt by it: the long-run
            // rate is exact and a datagram larger than the burst still passes now and then.
            if bucket.balance > 0 {
                let cost = i128::try_from(bytes)
                    .unwrap_or(i128::MAX)
                    .saturating_mul(NANO);
                bucket.balance = bucket.balance.saturating_sub(cost);
                true
            } else {
                false
            }
        };
        if !admitted {
            let i = direction.index();
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
            self.dropped_bytes[i]
                .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate_then_release() {
        let ledger = BandwidthLedger::new(1000, 3000);
        let t0 = Instant::now();
        let key = ledger.register("alice", AllocationId(1)).unwrap();
        // The burst: 3 datagrams of 1000 bytes, then nothing.
        let passed = (0..10)
            .filter(|_| ledger.admit(key, 1000, Direction::ToPeer, t0))
            .count();
        assert_eq!(passed, 3);
        assert_eq!(ledger.dropped(Direction::ToPeer), 7);
        assert_eq!(ledger.dropped_bytes(Direction::ToPeer), 7000);
        // One second refills 1000 bytes: one more datagram.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..10)
            .filter(|_| ledger.admit(key, 1000, Direction::ToClient, t1))
            .count();
        assert_eq!(passed, 1);
        // The same user on another worker shares the bucket.
        let again = ledger.register("alice", AllocationId(2)).unwrap();
        assert_eq!(again, key);
        assert!(!ledger.admit(again, 1, Direction::ToPeer, t1));
        let usage = ledger.usage();
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].allocations, vec![AllocationId(1), AllocationId(2)]);
        assert_eq!(usage[0].socket_offered, 20_001);
        ledger.release(key, AllocationId(1));
        ledger.release(key, AllocationId(2));
        assert!(ledger.usage().is_empty());
    }

    #[test]
    fn users_are_independent() {
        let ledger = BandwidthLedger::new(0, 100);
        let now = Instant::now();
        let a = ledger.register("a", AllocationId(1)).unwrap();
        let b = ledger.register("b", AllocationId(2)).unwrap();
        assert!(ledger.admit(a, 100, Direction::ToPeer, now));
        assert!(!ledger.admit(a, 100, Direction::ToPeer, now));
        assert!(ledger.admit(b, 100, Direction::ToPeer, now));
    }
}
