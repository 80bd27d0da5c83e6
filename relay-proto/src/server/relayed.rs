//! The relayed transport addresses of every live allocation of this relay, shared by every
//! worker's [`super::Server`].
//!
//! Client-to-client through the relay (RFC 8656 §9: permissions are per IP address) makes the
//! relay's own addresses valid peers, but only their live relayed ports: a datagram towards any
//! other port of a relay address would reach a service on the host. Allocations of other
//! workers count, so the set is relay-wide.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{RwLock, RwLockReadGuard, RwLockWriteGuard},
};

/// Live relayed transport addresses; cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct LiveRelayed {
    addresses: RwLock<HashSet<SocketAddr>>,
}

impl LiveRelayed {
    fn read(&self) -> RwLockReadGuard<'_, HashSet<SocketAddr>> {
        // Each update is one insert or remove: a panic elsewhere cannot leave it half-done.
        self.addresses.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashSet<SocketAddr>> {
        self.addresses.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `relayed` as the address of a live allocation.
    pub fn insert(&self, relayed: SocketAddr) {
        self.write().insert(canonical(relayed));
    }

    /// Forgets `relayed` (its allocation ended).
    pub fn remove(&self, relayed: SocketAddr) {
        self.write().remove(&canonical(relayed));
    }

    /// Whether `addr` is the relayed transport address of a live allocation.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.read().contains(&canonical(addr))
    }
}

/// Compares IPv4-mapped IPv6 forms as their IPv4 address; flow info and scope never count.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_live_addresses_by_ip_and_port() {
        let live = LiveRelayed::default();
        let a: SocketAddr = "198.18.2.1:50000".parse().unwrap();
        live.insert(a);
        assert!(live.contains(a));
        assert!(live.contains("[::ffff:198.18.2.1]:50000".parse().unwrap()));
        assert!(!live.contains("198.18.2.1:50001".parse().unwrap()));
        live.remove(a);
        assert!(!live.contains(a));
    }
}
