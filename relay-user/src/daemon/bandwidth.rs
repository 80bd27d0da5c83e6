//! The per-user bandwidth limit on the kernel fast path (issue 12 item 3).
//!
//! The socket path charges every relayed datagram of a limited user to the shared token
//! buckets of [`BandwidthLedger`]. The XDP/TC program cannot run a relay-wide token bucket
//! cheaply, so the kernel path is policed from here instead: about once a second the sampler
//! reads each limited user's kernel counters (per allocation, [`KernelSync::counters`]) and
//! what its allocations offered on the socket path, and runs the same bucket over the sum.
//! A user who overdraws it has all its allocations held on the socket path
//! ([`KernelSync::set_throttled`]), where the ledger enforces the limit datagram by datagram;
//! once the user has offered less than [`CALM_FRACTION`] of the rate for [`CALM_SAMPLES`]
//! samples in a row, its allocations go back to the path they had.
//!
//! So the kernel path overshoots by at most about one sample interval of traffic (plus the
//! burst) before the user is moved. The hold is separate from `relay ctl fastpath`: an
//! operator's per-allocation setting is kept and applies again when the hold ends; while the
//! hold lasts the limit wins.
//!
//! The KernelSync lock is taken once per allocation read or move, never across all of them,
//! so workers applying their own commands wait for one map syscall at most.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::info;

use super::{kernel_sync::KernelSync, worker::lock};
use relay_proto::server::{AllocationId, BandwidthKey, BandwidthLedger, Direction, UserUsage};

/// How often the kernel counters are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A held user must offer at most this fraction of the rate per sample...
pub const CALM_FRACTION: f64 = 0.8;
/// ...this many samples in a row before its allocations may use the kernel again.
pub const CALM_SAMPLES: u32 = 5;

/// The ledger and what the sampler reports, shared with the metrics.
#[derive(Debug)]
pub struct Shared {
    pub ledger: Arc<BandwidthLedger>,
    /// Users held on the socket path now.
    pub held_users: AtomicUsize,
}

/// One limited user in one sample.
#[derive(Clone, Debug)]
pub struct Sample {
    pub key: BandwidthKey,
    pub user: String,
    /// Its live allocations with the payload bytes the kernel relayed for each so far.
    pub kernel: Vec<(AllocationId, u64)>,
    /// Payload bytes its allocations offered on the socket path so far.
    pub socket_offered: u64,
}

/// What to do with one user's allocations after a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub user: String,
    pub allocations: Vec<AllocationId>,
    /// Hold them on the socket path (true) or let them go back (false).
    pub hold: bool,
    /// This sample changed it (logged).
    pub changed: bool,
    /// Bytes per second measured over the sample, socket and kernel together.
    pub rate: u64,
}

#[derive(Debug)]
struct UserState {
    /// The bucket over both paths, in bytes (negative: overdrawn).
    tokens: f64,
    socket_seen: u64,
    kernel_seen: HashMap<AllocationId, u64>,
    held: bool,
    /// Calm samples in a row while held.
    calm: u32,
}

/// The sampler's decisions, without IO (unit-tested).
#[derive(Debug)]
pub struct Sampler {
    rate: f64,
    burst: f64,
    users: HashMap<BandwidthKey, UserState>,
}

impl Sampler {
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate: rate as f64,
            burst: burst as f64,
            users: HashMap::new(),
        }
    }

    /// Takes one sample `elapsed` after the previous one. Returns a decision for every user
    /// that is held (every time, so allocations created since are held too) or was released
    /// now; users not in `samples` (no allocations left) are forgotten.
    pub fn step(&mut self, samples: &[Sample], elapsed: Duration) -> Vec<Decision> {
        let seconds = elapsed.as_secs_f64();
        let mut decisions = Vec::new();
        self.users
            .retain(|key, _| samples.iter().any(|s| s.key == *key));
        for sample in samples {
            let state = self.users.entry(sample.key).or_insert_with(|| UserState {
                tokens: self.burst,
                socket_seen: 0,
                kernel_seen: HashMap::new(),
                held: false,
                calm: 0,
            });
            let mut bytes = sample.socket_offered.saturating_sub(state.socket_seen);
            state.socket_seen = sample.socket_offered;
            let mut seen = HashMap::with_capacity(sample.kernel.len());
            for (id, total) in &sample.kernel {
                // A new allocation counts from zero: all it relayed is recent.
                let before = state.kernel_seen.get(id).copied().unwrap_or(0);
                bytes = bytes.saturating_add(total.saturating_sub(before));
                seen.insert(*id, *total);
            }
            state.kernel_seen = seen;
            let allowance = self.rate * seconds;
            let rate = if seconds > 0.0 {
                (bytes as f64 / seconds) as u64
            } else {
                0
            };
            let was_held = state.held;
            if state.held {
                if (bytes as f64) <= allowance * CALM_FRACTION {
                    state.calm += 1;
                } else {
                    state.calm = 0;
                }
                if state.calm >= CALM_SAMPLES {
                    state.held = false;
                    state.calm = 0;
                    state.tokens = self.burst;
                }
            } else {
                state.tokens = (state.tokens + allowance).min(self.burst) - bytes as f64;
                if state.tokens < 0.0 {
                    state.held = true;
                    state.calm = 0;
                }
            }
            if state.held || was_held {
                decisions.push(Decision {
                    user: sample.user.clone(),
                    allocations: sample.kernel.iter().map(|(id, _)| *id).collect(),
                    hold: state.held,
                    changed: state.held != was_held,
                    rate,
                });
            }
        }
        decisions
    }

    /// Users held now.
    pub fn held(&self) -> usize {
        self.users.values().filter(|u| u.held).count()
    }
}

/// Samples every [`SAMPLE_INTERVAL`] until `stop`; only started with the fast path attached
/// and a limit configured.
pub async fn run(
    shared: Arc<Shared>,
    kernel: Arc<Mutex<KernelSync>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sampler = Sampler::new(shared.ledger.rate(), shared.ledger.burst());
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let usage = shared.ledger.usage();
        let samples: Vec<Sample> = usage.iter().map(|u| sample(u, &kernel)).collect();
        let now = Instant::now();
        let decisions = sampler.step(&samples, now.duration_since(last));
        last = now;
        apply(&decisions, &kernel, shared.ledger.rate());
        shared.held_users.store(sampler.held(), Ordering::Relaxed);
    }
}

/// One user's counters: the lock is taken per allocation, for one map read.
fn sample(usage: &UserUsage, kernel: &Mutex<KernelSync>) -> Sample {
    let kernel = usage
        .allocations
        .iter()
        .map(|id| {
            let c = lock(kernel).counters(*id);
            (*id, c.to_peer_bytes.saturating_add(c.to_client_bytes))
        })
        .collect();
    Sample {
        key: usage.key,
        user: usage.user.clone(),
        kernel,
        socket_offered: usage.socket_offered,
    }
}

/// Applies the decisions, one allocation per lock; logs the changes (the user part of the
/// username and a rate, nothing secret).
fn apply(decisions: &[Decision], kernel: &Mutex<KernelSync>, limit: u64) {
    for decision in decisions {
        let mut moved = 0;
        for id in &decision.allocations {
            if lock(kernel).set_throttled(*id, decision.hold) {
                moved += 1;
            }
        }
        if decision.changed && decision.hold {
            info!(
                user = %decision.user,
                rate = decision.rate,
                limit,
                allocations = moved,
                "user over --user-bandwidth: its allocations move to the socket path, which \
                 enforces the limit"
            );
        } else if decision.changed {
            info!(
                user = %decision.user,
                rate = decision.rate,
                limit,
                allocations = moved,
                "user back under --user-bandwidth: its allocations return to their fast-path \
                 setting"
            );
        } else if moved > 0 {
            info!(
                user = %decision.user,
                allocations = moved,
                "new allocations of a user over --user-bandwidth stay on the socket path"
            );
        }
    }
}

/// `relay_bandwidth_*` metrics (no per-user labels); zeros without a limit.
pub fn metrics(out: &mut super::exposition::Exposition, shared: Option<&Shared>) {
    let directions = [Direction::ToPeer, Direction::ToClient];
    let value =
        |f: fn(&BandwidthLedger, Direction) -> u64, d| shared.map_or(0, |s| f(&s.ledger, d));
    let by_direction = |f: fn(&BandwidthLedger, Direction) -> u64| {
        directions.map(|d| (vec![("direction", d.label().to_owned())], value(f, d)))
    };
    out.counters(
        "relay_bandwidth_dropped_total",
        "Relayed datagrams dropped because their user was over --user-bandwidth, by direction.",
        by_direction(BandwidthLedger::dropped),
    );
    out.counters(
        "relay_bandwidth_dropped_bytes_total",
        "Payload bytes of those datagrams.",
        by_direction(BandwidthLedger::dropped_bytes),
    );
    let held = shared.map_or(0, |s| s.held_users.load(Ordering::Relaxed));
    out.gauge(
        "relay_bandwidth_held_users",
        "Users over --user-bandwidth whose allocations are held on the socket path.",
        u64::try_from(held).unwrap_or(u64::MAX),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn sample(key: u64, kernel: &[(u64, u64)], socket: u64) -> Sample {
        Sample {
            key: BandwidthKey(key),
            user: format!("user{key}"),
            kernel: kernel
                .iter()
                .map(|(id, b)| (AllocationId(*id), *b))
                .collect(),
            socket_offered: socket,
        }
    }

    #[test]
    fn over_the_limit_on_the_kernel_path_is_held_then_released_after_calm() {
        // 1000 B/s, burst 1000.
        let mut s = Sampler::new(1000, 1000);
        // Under the limit: nothing to do.
        assert!(s.step(&[sample(1, &[(1, 900)], 0)], SECOND).is_empty());
        assert!(s.step(&[sample(1, &[(1, 1800)], 0)], SECOND).is_empty());
        // 3000 bytes in a second on the kernel path: over (burst 1000 + 1000 refill).
        let d = s.step(&[sample(1, &[(1, 4800)], 0)], SECOND);
        assert_eq!(
            d,
            vec![Decision {
                user: "user1".into(),
                allocations: vec![AllocationId(1)],
                hold: true,
                changed: true,
                rate: 3000,
            }]
        );
        assert_eq!(s.held(), 1);
        // Held: the socket path now sees it, still flooding (offered well over the rate),
        // and a new allocation of the user is held too.
        let d = s.step(&[sample(1, &[(1, 4800), (2, 0)], 5000)], SECOND);
        assert_eq!(d.len(), 1);
        assert!(d[0].hold && !d[0].changed);
        assert_eq!(d[0].allocations, vec![AllocationId(1), AllocationId(2)]);
        // Calm samples (≤ 80 % of the rate): held until CALM_SAMPLES in a row.
        let mut socket = 5000;
        for i in 1..CALM_SAMPLES {
            socket += 700;
            let d = s.step(&[sample(1, &[(1, 4800), (2, 0)], socket)], SECOND);
            assert!(d[0].hold, "calm sample {i}");
        }
        // One busy sample resets the count.
        socket += 900;
        assert!(s.step(&[sample(1, &[(1, 4800), (2, 0)], socket)], SECOND)[0].hold);
        for _ in 1..CALM_SAMPLES {
            socket += 100;
            assert!(s.step(&[sample(1, &[(1, 4800), (2, 0)], socket)], SECOND)[0].hold);
        }
        socket += 100;
        let d = s.step(&[sample(1, &[(1, 4800), (2, 0)], socket)], SECOND);
        assert_eq!(d.len(), 1);
        assert!(!d[0].hold && d[0].changed);
        assert_eq!(s.held(), 0);
        // Released and quiet: no more decisions.
        assert!(s
            .step(&[sample(1, &[(1, 4800), (2, 0)], socket)], SECOND)
            .is_empty());
    }

    #[test]
    fn socket_and_kernel_bytes_add_up_and_users_are_separate() {
        let mut s = Sampler::new(1000, 1000);
        // User 1 relays 600 B/s on each path (each alone under the rate, together over it);
        // user 2 relays 900 B/s on the kernel path alone.
        let d = s.step(
            &[sample(1, &[(1, 600)], 600), sample(2, &[(2, 900)], 0)],
            SECOND,
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].user, "user1");
        assert!(d[0].hold && d[0].changed);
        assert_eq!(d[0].rate, 1200);
        assert!(s
            .step(
                &[sample(1, &[(1, 600)], 1800), sample(2, &[(2, 1800)], 0)],
                SECOND
            )
            .iter()
            .all(|d| d.user == "user1"));
        // A user whose allocations are gone is forgotten.
        assert!(s.step(&[sample(2, &[(2, 2700)], 0)], SECOND).is_empty());
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn a_short_burst_within_the_burst_allowance_is_not_held() {
        let mut s = Sampler::new(1000, 5000);
        // 4000 bytes at once after a quiet start: within the burst.
        assert!(s.step(&[sample(1, &[(1, 4000)], 0)], SECOND).is_empty());
        // Sustained 2000 B/s drains the rest of the bucket within a few samples.
        let mut total = 4000;
        let mut held_after = None;
        for i in 0..10 {
            total += 2000;
            if !s.step(&[sample(1, &[(1, total)], 0)], SECOND).is_empty() {
                held_after = Some(i);
                break;
            }
        }
        assert_eq!(held_after, Some(1));
    }
}
