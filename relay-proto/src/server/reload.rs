//! Runtime reconfiguration (`relay ctl reload`, SIGHUP): new credentials, peer policy and
//! allocation caps for a running server, without dropping its allocations.
//!
//! - Credentials: every request is authenticated against the current set (RFC 8489 §9.2.4:
//!   the key is looked up from USERNAME and REALM per request, not remembered from the
//!   Allocate). So an allocation of a user the reload keeps goes on as before; a removed user
//!   (or a REST credential whose every secret was removed) gets 401 on its next request
//!   (Refresh, CreatePermission, ChannelBind) and its allocation ends when its lifetime runs
//!   out. Data already flowing (ChannelData, Send/Data indications) is not authenticated and
//!   keeps flowing until then, as far as the policy allows.
//! - Peer policy (RFC 8656 §9, §21.2): a permission the new policy would refuse with 403 is
//!   withdrawn at once, with its channels (which go into their reserved period, §12) and the
//!   fast-path entries of both.
//! - Caps: apply to the next Allocate; allocations above a lowered cap are kept.
//!
//! The realm is not part of a reload: changing it invalidates every key and every client's
//! cached realm, so the daemon refuses it.

use std::net::IpAddr;
use std::time::Instant;

use rand::{CryptoRng, RngCore};

use super::{AllocState, AllocationId, Server};
use crate::auth::Credentials;
use crate::policy::PeerPolicy;

/// What a reload may change in a running [`Server`].
#[derive(Clone, Debug)]
pub struct Reconfigure {
    /// Long-term users and REST secrets (same realm as the server's).
    pub credentials: Credentials,
    /// The new peer policy (sharing the host-address set of the old one).
    pub policy: PeerPolicy,
    /// Total allocations (508 above).
    pub max_allocations: usize,
    /// Allocations per user (486 above).
    pub max_allocations_per_user: usize,
}

/// What applying a [`Reconfigure`] did to live allocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconfigureReport {
    /// Permissions withdrawn because the new policy forbids their peer.
    pub permissions_revoked: usize,
    /// Bound channels withdrawn with them.
    pub channels_revoked: usize,
    /// Live allocations whose key the new credentials no longer yield (a removed user, a
    /// changed password, a REST credential whose secret was removed): they keep relaying
    /// until they expire; their next request gets 401.
    pub allocations_without_credentials: usize,
}

impl std::ops::AddAssign for ReconfigureReport {
    fn add_assign(&mut self, other: Self) {
        self.permissions_revoked += other.permissions_revoked;
        self.channels_revoked += other.channels_revoked;
        self.allocations_without_credentials += other.allocations_without_credentials;
    }
}

impl<R: RngCore + CryptoRng> Server<R> {
    /// Applies new credentials, peer policy and caps; withdraws at once every permission (and
    /// its channels and fast-path entries, as commands) that the new policy forbids.
    pub fn reconfigure(&mut self, update: Reconfigure, now: Instant) -> ReconfigureReport {
        let Reconfigure {
            credentials,
            policy,
            max_allocations,
            max_allocations_per_user,
        } = update;
        self.config.credentials = credentials;
        self.config.policy = policy;
        self.config.max_allocations = max_allocations;
        self.config.max_allocations_per_user = max_allocations_per_user;

        let mut report = ReconfigureReport::default();
        // Collected first: the policy check borrows the server, the withdrawal mutates it.
        let mut forbidden: Vec<(AllocationId, Vec<IpAddr>)> = Vec::new();
        for alloc in self.allocations.values() {
            if !matches!(alloc.state, AllocState::Active) {
                continue;
            }
            if !self
                .config
                .credentials
                .keys_for(&alloc.username, self.unix_now)
                .contains(&alloc.key)
            {
                report.allocations_without_credentials += 1;
            }
            let ips: Vec<IpAddr> = alloc
                .permissions
                .keys()
                .copied()
                .filter(|ip| !self.peer_allowed(*ip))
                .collect();
            if !ips.is_empty() {
                forbidden.push((alloc.id, ips));
            }
        }
        for (id, ips) in forbidden {
            let Some(alloc) = self.allocations.get_mut(&id) else {
                continue;
            };
            for ip in ips {
                report.permissions_revoked += 1;
                report.channels_revoked += alloc.revoke_permission(ip, now, &mut self.commands);
            }
            self.schedule(id);
        }
        report
    }
}
