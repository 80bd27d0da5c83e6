//! Relay-wide byte budget for answers to unauthenticated requests (RFC 8489 §6.3.1 and
//! RFC 8656 §21 "amplification": a spoofed request draws an answer several times its size
//! towards the address it names).
//!
//! Every answer the relay sends to a request it could not authenticate (401, 438, 400, 420 and
//! Binding successes) is charged, in bytes, to its destination's source key: the IPv4 address,
//! or the IPv6 /64 (one host usually owns a whole /64). A source may receive `rate` bytes per
//! second with bursts up to `burst` bytes; beyond that answers are dropped silently and
//! counted. One [`UnauthLimiter`] is shared by every worker, so a victim receives at most
//! `rate` bytes per second (plus the burst and one answer of debt) from the whole relay,
//! whichever worker the kernel hashes each spoofed request to.
//!
//! Memory is fixed: [`TRACKED_SOURCES`] entries in [`SHARDS`] mutex-protected shards (workers
//! rarely contend for one), each an 8-way set-associative table evicting the least recently
//! charged entry of a set. A source that is new, or comes back after eviction, starts from
//! [`NEW_SOURCE_BYTES`] (at most `burst`) rather than a full bucket, so flooding the table with
//! spoofed sources to evict a victim's entry buys at most that much each time.

use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Bytes per second one source may receive in unauthenticated answers unless configured:
/// about 1,100 401s a second (a 401 to Allocate is ~116 bytes), so one address (a NAT, a
/// meeting's worth of clients) sets up 500 and more allocations a second, while one spoofed
/// victim receives at most ~1 Mbit/s from the whole relay.
pub const DEFAULT_RATE_BYTES: u64 = 128 * 1024;
/// Bytes a source may receive at once unless configured.
pub const DEFAULT_BURST_BYTES: u64 = 64 * 1024;
/// Bytes a new (or evicted and returning) source starts with, at most the burst: enough for a
/// handful of answers; the rest comes from the rate.
pub const NEW_SOURCE_BYTES: u64 = 2048;
/// Sources tracked at once.
pub const TRACKED_SOURCES: usize = 65_536;
/// Independent locks the table is split into.
pub const SHARDS: usize = 64;
/// Entries per set: an arriving source evicts the least recently charged of its set.
const WAYS: usize = 8;
/// Fixed point: balances are kept in nano-bytes so refills are exact integers.
const NANO: i128 = 1_000_000_000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The source key (IPv4 as mapped IPv6, IPv6 /64), valid when `last` is set.
    key: u128,
    /// Bytes × [`NANO`]; negative after an answer larger than what was left (debt).
    balance: i128,
    /// When the balance was last refilled; `None` for a free entry.
    last: Option<Instant>,
    /// Shard-local use counter of the last charge (least recently charged is evicted).
    used: u64,
}

const FREE: Entry = Entry {
    key: 0,
    balance: 0,
    last: None,
    used: 0,
};

#[derive(Default)]
struct Shard {
    /// Allocated on first use, then fixed.
    entries: Vec<Entry>,
    clock: u64,
}

/// The shared unauthenticated-answer budget; see the module documentation.
pub struct UnauthLimiter {
    rate: i128,
    burst: i128,
    start: i128,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: RandomState,
    refused_answers: AtomicU64,
    refused_bytes: AtomicU64,
}

impl std::fmt::Debug for UnauthLimiter {
    // Not the tables: a server's Debug output must stay readable.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnauthLimiter")
            .field("rate_bytes", &self.rate)
            .field("burst_bytes", &(self.burst / NANO))
            .field("sources", &(self.per_shard * SHARDS))
            .field("refused_answers", &self.refused_answers())
            .finish()
    }
}

impl Default for UnauthLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_RATE_BYTES, DEFAULT_BURST_BYTES)
    }
}

impl UnauthLimiter {
    /// `rate` bytes per second per source, bursts of up to `burst` bytes. A burst of 0 refuses
    /// every unauthenticated answer.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self::with_capacity(rate, burst, TRACKED_SOURCES)
    }

    /// As [`UnauthLimiter::new`], tracking at most `sources` sources (rounded up to whole sets
    /// per shard).
    pub fn with_capacity(rate: u64, burst: u64, sources: usize) -> Self {
        let per_shard = sources.div_ceil(SHARDS).div_ceil(WAYS).max(1) * WAYS;
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        let burst = i128::from(burst) * NANO;
        Self {
            rate: i128::from(rate),
            burst,
            start: (i128::from(NEW_SOURCE_BYTES) * NANO).min(burst),
            shards,
            per_shard,
            hasher: RandomState::new(),
            refused_answers: AtomicU64::new(0),
            refused_bytes: AtomicU64::new(0),
        }
    }

    /// Charges an answer of `bytes` to `destination` if its source still has budget (a positive
    /// balance after refilling to `now`): true means send it. The balance may go negative by
    /// this one answer. A refusal is counted.
    pub fn try_send(&self, destination: IpAddr, bytes: usize, now: Instant) -> bool {
        let key = source_key(destination);
        let hash = self.hasher.hash_one(key);
        let shard_index = (hash as usize) % SHARDS;
        let set = ((hash >> 32) as usize) % (self.per_shard / WAYS);
        let mut shard = self.lock(shard_index);
        let per_shard = self.per_shard;
        let shard = &mut *shard;
        if shard.entries.is_empty() {
            shard.entries = vec![FREE; per_shard];
        }
        shard.clock += 1;
        let clock = shard.clock;
        let ways = &mut shard.entries[set * WAYS..(set + 1) * WAYS];
        let slot = match ways.iter().position(|e| e.last.is_some() && e.key == key) {
            Some(i) => i,
            None => {
                // A free entry, else the least recently charged one: either way the source
                // starts from the conservative balance, never a full bucket.
                let i = ways
                    .iter()
                    .position(|e| e.last.is_none())
                    .or_else(|| (0..WAYS).min_by_key(|&i| ways[i].used))
                    .unwrap_or(0);
                ways[i] = Entry {
                    key,
                    balance: self.start,
                    last: Some(now),
                    used: clock,
                };
                i
            }
        };
        let entry = &mut ways[slot];
        entry.used = clock;
        if let Some(last) = entry.last {
            // Workers pass their own `now`: time only moves forward for an entry.
            if now > last {
                let elapsed =
                    i128::try_from(now.duration_since(last).as_nanos()).unwrap_or(i128::MAX);
                entry.balance = entry
                    .balance
                    .saturating_add(elapsed.saturating_mul(self.rate))
                    .min(self.burst);
                entry.last = Some(now);
            }
        }
        if entry.balance > 0 {
            let cost = i128::try_from(bytes)
                .unwrap_or(i128::MAX)
                .saturating_mul(NANO);
            entry.balance = entry.balance.saturating_sub(cost);
            true
        } else {
            self.refused_answers.fetch_add(1, Ordering::Relaxed);
            self.refused_bytes
                .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
            false
        }
    }

    /// Answers refused so far (for metrics).
    pub fn refused_answers(&self) -> u64 {
        self.refused_answers.load(Ordering::Relaxed)
    }

    /// Bytes of the answers refused so far (for metrics).
    pub fn refused_bytes(&self) -> u64 {
        self.refused_bytes.load(Ordering::Relaxed)
    }

    /// Sources currently tracked (never more than the capacity).
    pub fn tracked(&self) -> usize {
        (0..SHARDS)
            .map(|i| {
                self.lock(i)
                    .entries
                    .iter()
                    .filter(|e| e.last.is_some())
                    .count()
            })
            .sum()
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard leaves at worst one stale balance.
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// IPv4 addresses (also in IPv4-mapped IPv6 form) as themselves, IPv6 by their /64.
fn source_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            u128::from(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Bytes `limiter` lets through to `to` when offered `answers` answers of `size` bytes at
    /// `now`.
    fn offered(
        limiter: &UnauthLimiter,
        to: IpAddr,
        answers: usize,
        size: usize,
        now: Instant,
    ) -> usize {
        (0..answers)
            .filter(|_| limiter.try_send(to, size, now))
            .count()
            * size
    }

    #[test]
    fn new_source_starts_small_then_refills_to_the_burst_at_the_rate() {
        let limiter = UnauthLimiter::new(10_000, 4_000);
        let t0 = Instant::now();
        let victim = ip("198.18.0.1");
        // The conservative start: 2048 bytes, so 21 answers of 100 bytes (the last one into
        // debt), then nothing.
        assert_eq!(offered(&limiter, victim, 100, 100, t0), 2_100);
        assert_eq!(limiter.refused_answers(), 79);
        assert_eq!(limiter.refused_bytes(), 7_900);
        // A second refills 10,000 bytes, capped at the 4,000-byte burst (from -52 bytes).
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(offered(&limiter, victim, 100, 100, t1), 4_000);
        // Over ten seconds at most rate × time (+ burst + one answer) gets through.
        let mut through = 0;
        for ms in (10..10_000).step_by(10) {
            through += offered(&limiter, victim, 10, 100, t1 + Duration::from_millis(ms));
        }
        assert!(through <= 10_000 * 10 + 4_000 + 100, "{through}");
        assert!(through >= 10_000 * 10 - 4_000, "{through}");
    }

    #[test]
    fn ipv6_sources_share_their_64_and_mapped_ipv4_is_ipv4() {
        let limiter = UnauthLimiter::new(0, 1_000);
        let t = Instant::now();
        assert_eq!(offered(&limiter, ip("2001:2::1"), 10, 500, t), 1_000);
        assert_eq!(offered(&limiter, ip("2001:2::ffff"), 10, 500, t), 0);
        assert_eq!(offered(&limiter, ip("2001:2:0:1::1"), 10, 500, t), 1_000);
        assert_eq!(offered(&limiter, ip("198.18.0.9"), 10, 500, t), 1_000);
        assert_eq!(offered(&limiter, ip("::ffff:198.18.0.9"), 10, 500, t), 0);
    }

    #[test]
    fn zero_burst_refuses_everything_and_time_going_back_refills_nothing() {
        let t = Instant::now() + Duration::from_secs(10);
        let closed = UnauthLimiter::new(1_000_000, 0);
        assert!(!closed.try_send(ip("198.18.0.1"), 1, t));
        let limiter = UnauthLimiter::new(1_000, 1_000);
        assert_eq!(offered(&limiter, ip("198.18.0.1"), 20, 100, t), 1_000);
        assert_eq!(
            offered(
                &limiter,
                ip("198.18.0.1"),
                20,
                100,
                t - Duration::from_secs(5)
            ),
            0
        );
    }

    #[test]
    fn memory_is_bounded_and_an_evicted_source_gets_no_fresh_burst() {
        let limiter = UnauthLimiter::with_capacity(0, 1_000_000, 1_024);
        let t = Instant::now();
        let victim = ip("198.18.0.1");
        // Drain the victim's starting balance.
        assert_eq!(offered(&limiter, victim, 100, 1_000, t), 3_000);
        let mut victim_bytes = 0;
        for round in 0..20u32 {
            // A spoofed flood from many sources churns the table...
            for i in 0..5_000u32 {
                let spoofed = IpAddr::from((0x0a00_0000 + round * 5_000 + i).to_be_bytes());
                limiter.try_send(spoofed, 100, t);
            }
            // ...and the victim, evicted or not, never gets more than the start balance back.
            victim_bytes += offered(&limiter, victim, 100, 1_000, t);
        }
        assert!(limiter.tracked() <= 1_024, "{}", limiter.tracked());
        assert!(victim_bytes <= 20 * 3_000, "{victim_bytes}");
    }

    #[test]
    fn debug_output_stays_small() {
        let limiter = UnauthLimiter::default();
        limiter.try_send(ip("198.18.0.1"), 100, Instant::now());
        let text = format!("{limiter:?}");
        assert!(text.len() < 200, "{text}");
        assert!(text.contains("rate_bytes: 131072"), "{text}");
    }

    #[test]
    fn workers_share_one_budget() {
        let limiter = Arc::new(UnauthLimiter::new(0, 10_000));
        let t = Instant::now();
        let victim = ip("198.18.0.1");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let limiter = Arc::clone(&limiter);
                std::thread::spawn(move || offered(&limiter, victim, 1_000, 100, t))
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // The start balance (2048) plus one answer of debt, whatever the thread count.
        assert_eq!(total, 2_100);
    }
}
