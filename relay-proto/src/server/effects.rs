//! The core's outgoing commands, and the forwarding routes they imply.
//!
//! Every channel the kernel fast path is told to forward (`CreateChannelBinding`, until its
//! `DeleteChannelBinding`) is exactly a channel the socket path may forward: bound, with a live
//! permission for its peer and a relayed address of the peer's family (RFC 8656 §12), with a
//! deadline that is the earliest of channel, permission and allocation expiry. So the socket
//! path keeps the same table as the kernel, fed by the same commands as they are queued:
//! ChannelData is then one hashed lookup in each direction (RFC 8656 §12.5, §12.6) whatever
//! the number of allocations, and the two paths cannot disagree about what is forwarded.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::Instant,
};

use super::{bandwidth::BandwidthKey, AllocationId, Command};
use crate::Transport;

/// Where a client's ChannelData on one channel goes.
#[derive(Clone, Copy, Debug)]
pub(super) struct PeerRoute {
    pub(super) relayed: SocketAddr,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
    /// The user's bandwidth budget, when limited.
    pub(super) bandwidth: Option<BandwidthKey>,
}

/// Where a peer's datagrams to one relayed address go.
#[derive(Clone, Copy, Debug)]
pub(super) struct ClientRoute {
    pub(super) listener: SocketAddr,
    pub(super) client: SocketAddr,
    pub(super) transport: Transport,
    pub(super) channel: u16,
    pub(super) expires: Instant,
    /// The user's bandwidth budget, when limited.
    pub(super) bandwidth: Option<BandwidthKey>,
}

/// Commands waiting for the IO layer, and the channel routes they have installed so far.
#[derive(Debug, Default)]
pub(super) struct Effects {
    queue: VecDeque<Command>,
    /// (client, listener, transport, channel) → route.
    to_peer: HashMap<(SocketAddr, SocketAddr, Transport, u16), PeerRoute>,
    /// (relayed, peer) → route.
    to_client: HashMap<(SocketAddr, SocketAddr), ClientRoute>,
    /// Bandwidth keys of the allocations of limited users (empty without a limit).
    bandwidth: HashMap<AllocationId, BandwidthKey>,
}

impl Effects {
    pub(super) fn push_back(&mut self, command: Command) {
        match command {
            Command::CreateChannelBinding {
                id,
                client,
                listener,
                transport,
                relayed,
                peer,
                channel,
                expires_at,
                ..
            } => {
                let expires = expires_at;
                let bandwidth = self.bandwidth.get(&id).copied();
                self.to_peer.insert(
                    (client, listener, transport, channel),
                    PeerRoute {
                        relayed,
                        peer,
                        expires,
                        bandwidth,
                    },
                );
                self.to_client.insert(
                    (relayed, peer),
                    ClientRoute {
                        listener,
                        client,
                        transport,
                        channel,
                        expires,
                        bandwidth,
                    },
                );
            }
            Command::DeleteChannelBinding {
                client,
                listener,
                transport,
                relayed,
                peer,
                channel,
                ..
            } => {
                self.to_peer.remove(&(client, listener, transport, channel));
                self.to_client.remove(&(relayed, peer));
            }
            _ => {}
        }
        self.queue.push_back(command);
    }

    /// Files the bandwidth key of allocation `id`; routes installed later carry it.
    pub(super) fn set_bandwidth(&mut self, id: AllocationId, key: BandwidthKey) {
        self.bandwidth.insert(id, key);
    }

    /// The bandwidth key of allocation `id`, if its user is limited.
    pub(super) fn bandwidth(&self, id: AllocationId) -> Option<BandwidthKey> {
        self.bandwidth.get(&id).copied()
    }

    /// Forgets the bandwidth key of allocation `id` (it is gone).
    pub(super) fn take_bandwidth(&mut self, id: AllocationId) -> Option<BandwidthKey> {
        self.bandwidth.remove(&id)
    }

    pub(super) fn pop_front(&mut self) -> Option<Command> {
        self.queue.pop_front()
    }

    /// The live route of a client's channel.
    pub(super) fn to_peer(
        &self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
        channel: u16,
        now: Instant,
    ) -> Option<&PeerRoute> {
        self.to_peer
            .get(&(client, listener, transport, channel))
            .filter(|r| r.expires > now)
    }

    /// The live route of a peer's datagrams to a relayed address, if it has a channel.
    pub(super) fn to_client(
        &self,
        relayed: SocketAddr,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<&ClientRoute> {
        self.to_client
            .get(&(relayed, peer))
            .filter(|r| r.expires > now)
    }

    /// Routes installed (for tests).
    #[cfg(test)]
    pub(super) fn routes(&self) -> (usize, usize) {
        (self.to_peer.len(), self.to_client.len())
    }
}
