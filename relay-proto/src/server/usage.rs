//! How allocations end, for usage records: the core notes every live allocation's end with its
//! reason ([`Server::next_ended`]); the IO layer adds what it relayed and writes the record.
//! Also the operator's way to end allocations ([`Server::disconnect`],
//! [`Server::disconnect_user`]) and the relay's own at shutdown ([`Server::end_all`]).

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use rand::{CryptoRng, RngCore};

use super::{AllocState, Allocation, AllocationId, Server};
use crate::Transport;

/// Why an allocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// Its lifetime ran out without a Refresh (RFC 8656 §7).
    Expired,
    /// The client deleted it with a Refresh of LIFETIME 0 (RFC 8656 §8).
    Refresh,
    /// The client's TCP or TLS connection closed (RFC 8656 §5).
    ConnectionClosed,
    /// The operator ended it (`relay ctl disconnect`).
    Disconnected,
    /// The relay stopped.
    Shutdown,
}

impl EndReason {
    /// The name usage records and logs use.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Refresh => "refresh",
            EndReason::ConnectionClosed => "connection_closed",
            EndReason::Disconnected => "disconnected",
            EndReason::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A live allocation that ended: who held it, where, since when, and why it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationEnd {
    /// allocation id
    pub id: AllocationId,
    /// the username that created it (a REST username in full)
    pub username: String,
    /// the realm it was authenticated in
    pub realm: String,
    /// client transport address
    pub client: SocketAddr,
    /// listener (server) transport address
    pub listener: SocketAddr,
    /// the client's transport
    pub transport: Transport,
    /// its relayed transport addresses, the requested family first (two for a dual allocation)
    pub relayed: Vec<SocketAddr>,
    /// when it went live
    pub started: Instant,
    /// why it ended
    pub reason: EndReason,
}

impl<R: RngCore + CryptoRng> Server<R> {
    /// The next allocation end since the last call, oldest first. Only allocations that went
    /// live have one (an Allocate that never got its socket has nothing to account).
    pub fn next_ended(&mut self) -> Option<AllocationEnd> {
        self.ended.pop_front()
    }

    /// Ends live allocation `id` for the operator: its kernel entries and sockets go through
    /// the usual commands and its end is noted with [`EndReason::Disconnected`]. `false` when
    /// there is no such live allocation. The client is not told (TURN has no server-initiated
    /// deletion); its next request on the 5-tuple gets 437 (RFC 8656 §7.3).
    pub fn disconnect(&mut self, id: AllocationId) -> bool {
        let live = self
            .allocations
            .get(&id)
            .is_some_and(|a| matches!(a.state, AllocState::Active));
        if live {
            self.remove_allocation(id, EndReason::Disconnected);
        }
        live
    }

    /// Ends every live allocation of `user` as [`Server::disconnect`] does; a REST username
    /// `expiry:user` counts as its user part, as the quota counts it, on either side. Returns
    /// the ids ended, in order.
    pub fn disconnect_user(&mut self, user: &str) -> Vec<AllocationId> {
        let credentials = &self.config.credentials;
        let wanted = credentials.quota_user(user);
        let mut ids: Vec<AllocationId> = self
            .allocations
            .values()
            .filter(|a| matches!(a.state, AllocState::Active))
            .filter(|a| credentials.quota_user(&a.username) == wanted)
            .map(|a| a.id)
            .collect();
        ids.sort_unstable();
        for id in &ids {
            self.remove_allocation(*id, EndReason::Disconnected);
        }
        ids
    }

    /// Ends every allocation (the relay is stopping), live ones with
    /// [`EndReason::Shutdown`]; their sockets and kernel entries go through the usual commands.
    pub fn end_all(&mut self) {
        let mut ids: Vec<AllocationId> = self.allocations.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.remove_allocation(id, EndReason::Shutdown);
        }
    }

    /// Notes the end of `alloc` (already out of every index) if it was live.
    pub(super) fn note_end(&mut self, alloc: &Allocation, reason: EndReason) {
        if !matches!(alloc.state, AllocState::Active) {
            return;
        }
        self.ended.push_back(AllocationEnd {
            id: alloc.id,
            username: alloc.username.clone(),
            realm: self.config.realm.clone(),
            client: alloc.client,
            listener: alloc.listener,
            transport: alloc.transport,
            relayed: alloc.relayed_addresses().collect(),
            started: alloc.started,
            reason,
        });
    }
}
