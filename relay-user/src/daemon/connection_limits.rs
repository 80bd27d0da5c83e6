//! How many TCP/TLS client connections the relay holds, in total and per source address.
//!
//! Shared by every worker (the kernel spreads one source's connections over all of them), so a
//! cap is relay-wide. Connections come and go far less often than datagrams, so a mutex over a
//! map is fine. A slot is given back when its [`ConnectionSlot`] drops, whatever ends the
//! connection.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

/// The relay-wide connection caps and counts.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<Counts>,
    refused_total: AtomicU64,
    refused_per_source: AtomicU64,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The relay holds `--max-connections`.
    Total,
    /// The source holds `--max-connections-per-ip`.
    PerSource,
}

/// One held connection; dropping it gives the slot back.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    source: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        Self {
            max_total,
            max_per_source,
            state: Mutex::new(Counts::default()),
            refused_total: AtomicU64::new(0),
            refused_per_source: AtomicU64::new(0),
        }
    }

    /// A slot for a connection from `ip`, or why not (counted).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, Refused> {
        let source = source_key(ip);
        let mut counts = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.max_total {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Total);
        }
        let held = counts.per_source.entry(source).or_insert(0);
        if *held >= self.max_per_source {
            self.refused_per_source.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::PerSource);
        }
        *held += 1;
        counts.total += 1;
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            source,
        })
    }

    /// Connections held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Connections refused so far: over the total cap, over the per-source cap.
    pub fn refused(&self) -> (u64, u64) {
        (
            self.refused_total.load(Ordering::Relaxed),
            self.refused_per_source.load(Ordering::Relaxed),
        )
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.limits.state.lock().unwrap_or_else(|e| e.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.per_source.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                counts.per_source.remove(&self.source);
            }
        }
    }
}

/// IPv4 addresses count alone; IPv6 by /64, the block one subscriber usually holds (so a
/// client cannot dodge the cap by hopping addresses of its own prefix).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_source_and_total_and_slots_come_back() {
        let limits = Arc::new(ConnectionLimits::new(3, 2));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        let a1 = limits.try_acquire(a).expect("first");
        let _a2 = limits.try_acquire(a).expect("second");
        assert_eq!(limits.try_acquire(a).unwrap_err(), Refused::PerSource);
        let _b1 = limits.try_acquire(b).expect("b");
        assert_eq!(limits.try_acquire(same_64).unwrap_err(), Refused::Total);
        assert_eq!(limits.held(), 3);
        drop(a1);
        assert_eq!(limits.held(), 2);
        // A v4-mapped IPv6 source is the IPv4 source.
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        let _a3 = limits.try_acquire(mapped).expect("slot given back");
        assert_eq!(limits.try_acquire(a).unwrap_err(), Refused::Total);
        assert_eq!(limits.refused(), (2, 1));
    }
}
