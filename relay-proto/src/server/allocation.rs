//! Per-allocation state: permissions (RFC 8656 §9) and channels (RFC 8656 §12).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::{effects::Effects, same_family, AllocationId, Command, Ctx, CHANNEL_COOLDOWN};
use crate::stun::{AddressFamily, StunErrorCode, TransactionId};
use crate::Transport;

/// An Allocate waiting for its relay socket.
#[derive(Debug)]
pub(super) struct Pending {
    /// How to answer the Allocate once bound.
    pub(super) ctx: Ctx,
    /// Failed binds so far.
    pub(super) attempts: u32,
    /// Relayed addresses whose bind failed for this Allocate; never picked again for it.
    pub(super) failed: Vec<SocketAddr>,
    /// EVEN-PORT was asked for.
    pub(super) even_port: bool,
    /// Which relayed address of the allocation the outstanding CreateAllocation binds.
    pub(super) binding: Slot,
    /// Relay IP of the second relayed address of a dual allocation (RFC 8656 §7.2
    /// ADDITIONAL-ADDRESS-FAMILY), bound once the first one is.
    /// An IPv6 relay IP when the allocation is dual (the second socket may be on any of them).
    pub(super) additional_ip: Option<IpAddr>,
    /// ADDRESS-ERROR-CODE (family, code) to add for a refused ADDITIONAL-ADDRESS-FAMILY.
    pub(super) family_error: Option<(AddressFamily, StunErrorCode)>,
}

/// One of the (at most two) relayed addresses of an allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    /// The address of the requested family (IPv4 for a dual allocation).
    Primary,
    /// The IPv6 address of a dual allocation.
    Additional,
}

#[derive(Debug)]
pub(super) enum AllocState {
    Pending(Pending),
    Active,
}

#[derive(Debug)]
pub(super) struct Channel {
    pub(super) peer: SocketAddr,
    /// While bound: binding expiry. Afterwards: end of the reserved period.
    pub(super) expires: Instant,
    /// False once expired: the number and the peer stay reserved until `expires`.
    pub(super) bound: bool,
    /// A CreateChannelBinding is live in the fast path (no DeleteChannelBinding since).
    pub(super) installed: bool,
}

#[derive(Debug)]
pub(super) struct Allocation {
    pub(super) id: AllocationId,
    pub(super) username: String,
    /// The name its quota was taken under (kept: a reload may change how names map).
    pub(super) quota_user: String,
    /// The long-term key its Allocate was signed with (a reload reports allocations whose key
    /// the new credentials no longer yield).
    pub(super) key: crate::auth::LongTermKey,
    pub(super) client: SocketAddr,
    pub(super) listener: SocketAddr,
    pub(super) transport: Transport,
    /// The relayed transport address of the requested family (IPv4 in a dual allocation).
    pub(super) relayed: SocketAddr,
    /// The IPv6 relayed transport address of a dual allocation (RFC 8656 §7.2
    /// ADDITIONAL-ADDRESS-FAMILY); also set while its socket is being bound.
    pub(super) additional: Option<SocketAddr>,
    /// Granted by the Allocate; the expiry starts when the socket is bound.
    pub(super) lifetime: Duration,
    /// When the Allocate arrived; reset to when it went live (its usage record's start).
    pub(super) started: Instant,
    pub(super) expires: Instant,
    pub(super) state: AllocState,
    /// Transaction id of the Allocate that created it, for retransmissions (RFC 8656 §7.2).
    pub(super) last_allocate: TransactionId,
    pub(super) success_response: Vec<u8>,
    /// Peer IP → permission expiry.
    pub(super) permissions: HashMap<IpAddr, Instant>,
    pub(super) channels: BTreeMap<u16, Channel>,
    /// Peer → channel number (bound or reserved).
    pub(super) peer_channels: HashMap<SocketAddr, u16>,
    /// The deadline of this allocation's live entry in the server's timer heap.
    pub(super) scheduled: Option<Instant>,
}

impl Allocation {
    pub(super) fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|e| *e > now)
    }

    /// The relayed address that talks to `peer`: the one of the peer's family (RFC 8656 §9,
    /// §12: a peer must match one of the allocation's relayed families).
    pub(super) fn relayed_for(&self, peer: IpAddr) -> Option<SocketAddr> {
        self.relayed_addresses().find(|r| same_family(r.ip(), peer))
    }

    /// Every relayed address of the allocation, the requested family first.
    pub(super) fn relayed_addresses(&self) -> impl Iterator<Item = SocketAddr> {
        std::iter::once(self.relayed).chain(self.additional)
    }

    pub(super) fn delete_channel_command(&self, channel: u16, peer: SocketAddr) -> Command {
        Command::DeleteChannelBinding {
            id: self.id,
            client: self.client,
            listener: self.listener,
            transport: self.transport,
            // Only a peer of one of the allocation's families ever gets a channel.
            relayed: self.relayed_for(peer.ip()).unwrap_or(self.relayed),
            peer,
            channel,
        }
    }

    /// Installs or refreshes the permission for `ip` (RFC 8656 §9.2) and (re)announces every
    /// bound channel to that IP with its new deadline.
    pub(super) fn install_permission(
        &mut self,
        ip: IpAddr,
        expires: Instant,
        reachable: &dyn Fn(SocketAddr) -> bool,
        commands: &mut Effects,
    ) {
        let entry = self.permissions.entry(ip).or_insert(expires);
        if *entry < expires {
            *entry = expires;
        }
        let expires = *entry;
        commands.push_back(self.permission_command(ip, expires));
        self.announce_channels(Some(ip), reachable, commands);
    }

    /// (Re)announces every permission to the fast path with its deadline (after the
    /// allocation's own deadline moved).
    pub(super) fn announce_permissions(&self, commands: &mut Effects) {
        for (ip, expires) in &self.permissions {
            commands.push_back(self.permission_command(*ip, *expires));
        }
    }

    /// The fast path's view of one permission: it ends with the permission or the
    /// allocation, whichever is first.
    fn permission_command(&self, ip: IpAddr, expires: Instant) -> Command {
        Command::CreatePermission {
            id: self.id,
            client: self.client,
            listener: self.listener,
            transport: self.transport,
            // A dual allocation relays each family from its own address (RFC 8656 §7.2).
            relayed: self.relayed_for(ip).unwrap_or(self.relayed),
            peer_ip: ip,
            expires_at: expires.min(self.expires),
        }
    }

    /// (Re)announces the bound channels with a live permission (to `only` that peer IP, or
    /// all) to the fast path. Each deadline is the earliest of channel, permission and
    /// allocation expiry, so the kernel never forwards past any of them, even if the daemon is
    /// late to remove the entry. A channel whose peer is no longer `reachable` (it became an
    /// address of the host, or the other allocation of a client-to-client channel is gone) is
    /// withdrawn from the fast path instead, once; the socket path refuses its datagrams.
    pub(super) fn announce_channels(
        &mut self,
        only: Option<IpAddr>,
        reachable: &dyn Fn(SocketAddr) -> bool,
        commands: &mut Effects,
    ) {
        let (relayed, additional) = (self.relayed, self.additional);
        let mut withdrawn = Vec::new();
        for (number, channel) in self.channels.iter_mut() {
            let ip = channel.peer.ip();
            if !channel.bound || only.is_some_and(|only| only != ip) {
                continue;
            }
            if !reachable(channel.peer) {
                if channel.installed {
                    channel.installed = false;
                    withdrawn.push((*number, channel.peer));
                }
                continue;
            }
            let Some(permission_expires) = self.permissions.get(&ip) else {
                continue;
            };
            // The binding carries the relayed address of the peer's family, so a dual
            // allocation's same-family channels can go to the kernel.
            let Some(relayed) = std::iter::once(relayed)
                .chain(additional)
                .find(|r| same_family(r.ip(), ip))
            else {
                continue;
            };
            channel.installed = true;
            commands.push_back(Command::CreateChannelBinding {
                id: self.id,
                client: self.client,
                listener: self.listener,
                transport: self.transport,
                relayed,
                peer: channel.peer,
                channel: *number,
                expires_at: channel.expires.min(*permission_expires).min(self.expires),
            });
        }
        for (number, peer) in withdrawn {
            commands.push_back(self.delete_channel_command(number, peer));
        }
    }

    /// Withdraws the permission for `ip` before its time (a reload's peer policy forbids it):
    /// its channels go into their reserved period (RFC 8656 §12) and every fast-path entry of
    /// either is deleted. Returns how many bound channels were withdrawn.
    pub(super) fn revoke_permission(
        &mut self,
        ip: IpAddr,
        now: Instant,
        commands: &mut Effects,
    ) -> usize {
        if self.permissions.remove(&ip).is_none() {
            return 0;
        }
        let mut uninstalled = Vec::new();
        let mut revoked = 0;
        for (number, channel) in self.channels.iter_mut() {
            if channel.peer.ip() != ip {
                continue;
            }
            if channel.installed {
                channel.installed = false;
                uninstalled.push((*number, channel.peer));
            }
            if channel.bound {
                channel.bound = false;
                channel.expires = now + CHANNEL_COOLDOWN;
                revoked += 1;
            }
        }
        for (number, peer) in uninstalled {
            commands.push_back(self.delete_channel_command(number, peer));
        }
        commands.push_back(Command::DeletePermission {
            id: self.id,
            relayed: self.relayed_for(ip).unwrap_or(self.relayed),
            peer_ip: ip,
        });
        revoked
    }

    /// Earliest deadline of anything in this allocation.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let permissions = self.permissions.values().copied();
        let channels = self.channels.values().map(|c| c.expires);
        std::iter::once(self.expires)
            .chain(permissions)
            .chain(channels)
            .min()
    }

    /// Expires channels (into their reserved period, then gone) and permissions
    /// (RFC 8656 §9, §12), emitting DeleteChannelBinding for whatever leaves the fast path.
    pub(super) fn expire(&mut self, now: Instant, commands: &mut Effects) {
        // (number, peer) of every channel that leaves the fast path, announced at the end.
        let mut uninstalled = Vec::new();
        let mut gone = Vec::new();
        for (number, channel) in self.channels.iter_mut() {
            if channel.expires > now {
                continue;
            }
            if channel.bound {
                channel.bound = false;
                channel.expires += CHANNEL_COOLDOWN;
                if channel.installed {
                    channel.installed = false;
                    uninstalled.push((*number, channel.peer));
                }
                if channel.expires <= now {
                    gone.push(*number);
                }
            } else {
                gone.push(*number);
            }
        }
        for number in gone {
            if let Some(channel) = self.channels.remove(&number) {
                self.peer_channels.remove(&channel.peer);
            }
        }
        let expired: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, e)| **e <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in expired {
            self.permissions.remove(&ip);
            commands.push_back(Command::DeletePermission {
                id: self.id,
                relayed: self.relayed_for(ip).unwrap_or(self.relayed),
                peer_ip: ip,
            });
            for (number, channel) in self.channels.iter_mut() {
                if channel.installed && channel.peer.ip() == ip {
                    channel.installed = false;
                    uninstalled.push((*number, channel.peer));
                }
            }
        }
        for (number, peer) in uninstalled {
            commands.push_back(self.delete_channel_command(number, peer));
        }
    }
}
