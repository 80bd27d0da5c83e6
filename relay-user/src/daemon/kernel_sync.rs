//! Keeps the kernel fast path's maps in step with the protocol core, the host's routes and
//! addresses, and applies the per-allocation on/off switch.
//!
//! The core's `CreateChannelBinding`/`DeleteChannelBinding` commands are the only source of
//! truth for bindings. This module remembers every live binding (whether or not it is in the
//! kernel right now), so an allocation can be moved to the socket path and back without losing
//! anything: off removes its entries from the maps (the socket path then sees its ChannelData,
//! because the relay socket was never closed), on installs them again. Map updates happen
//! under one lock, in exactly the order the cores decided them.
//!
//! Next hops: each installed binding holds the next hop of its client address and of its peer
//! address (one per destination address, shared between bindings). They are resolved from the
//! kernel's routing and neighbour tables when first used and rewritten when netlink reports a
//! change ([`KernelSync::on_netlink`]); bindings are never rewritten for that.
//!
//! Peer policy: the kernel holds a longest-prefix-match copy of the peer policy, including
//! every address of the host, and refuses to forward to a denied peer whatever a binding says.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use relay_common::NextHop;
use tracing::{debug, info, warn};

use crate::{
    control::PathCounters,
    fastpath::{
        self,
        netlink::{Event, Rtnl},
        nexthop::{NextHopId, NextHopValue, NextHops},
        BindingHops, ChannelBinding, FastPath, FastPathError, PermissionBinding,
    },
    proto::{
        policy::PeerPolicy,
        server::{AllocationId, Command},
        Transport,
    },
};

/// How often "kernel maps are full" is said while bindings keep being refused.
const FULL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Reads one counter slot through a map fd of its own, so the reading needs no lock.
pub trait SlotReader: Send + Sync {
    fn read(&self, slot: u32) -> Result<PathCounters, String>;
}

impl SlotReader for fastpath::CounterReader {
    fn read(&self, slot: u32) -> Result<PathCounters, String> {
        let c = self.counters(slot).map_err(|e| e.to_string())?;
        Ok(PathCounters {
            to_peer_packets: c.to_peer_packets,
            to_peer_bytes: c.to_peer_bytes,
            to_client_packets: c.to_client_packets,
            to_client_bytes: c.to_client_bytes,
        })
    }
}

/// How often [`KernelSync::live_totals`] reads again when slots changed hands meanwhile,
/// before it reads under the lock instead.
const UNLOCKED_TOTALS_TRIES: usize = 3;

pub struct KernelSync {
    fastpath: Option<FastPath>,
    /// The counter map for reads outside the lock (`None` without a fast path).
    reader: Option<Arc<dyn SlotReader>>,
    /// Bumped whenever an allocation's counters move into `retired` and its slot is let go,
    /// so an unlocked read can tell whether a slot it read changed hands meanwhile.
    slot_epoch: u64,
    /// Path for allocations without their own setting.
    default_on: bool,
    overrides: HashMap<AllocationId, bool>,
    /// Allocations of users over `--user-bandwidth`, held on the socket path (where the
    /// per-user budget is enforced) whatever `default_on` and `overrides` say; kept apart so
    /// an operator's `relay ctl fastpath` setting applies again once the user is back under.
    throttled: HashSet<AllocationId>,
    /// Live channel bindings per allocation, by channel number.
    bindings: HashMap<AllocationId, HashMap<u16, ChannelBinding>>,
    /// Bindings in the kernel now, with the next hops they hold.
    installed: HashMap<(AllocationId, u16), BindingHops>,
    /// Live permissions per allocation, by peer IP (whether or not in the kernel now).
    permissions: HashMap<AllocationId, HashMap<IpAddr, PermissionBinding>>,
    /// Permissions in the kernel now, with the next hops they hold.
    installed_permissions: HashMap<(AllocationId, IpAddr), BindingHops>,
    /// Allocations whose client entry (for Send indications) is in the kernel.
    clients: HashMap<AllocationId, PermissionBinding>,
    next_hops: Option<NextHops<Rtnl>>,
    /// The relay's relayed-address IPs: a binding whose peer is one of them is client-to-client
    /// through this relay (hairpin).
    relay_ips: Vec<IpAddr>,
    /// The peer policy the kernel copy is compiled from (shares the host-address set).
    policy: PeerPolicy,
    /// Counter slots of allocations that have (or had) kernel bindings.
    slots: HashMap<AllocationId, u32>,
    /// Slots given back by allocations that ended, and the next never-used slot.
    free_slots: Vec<u32>,
    next_slot: u32,
    /// Kernel counters of allocations that are gone (for metrics totals).
    retired: PathCounters,
    /// When "maps full" was last said, and how many bindings stayed off since.
    full_warned: Option<Instant>,
    refused_since_warning: u64,
}

impl KernelSync {
    /// With `None` every allocation stays on the socket path. With a fast path, next hops are
    /// resolved over rtnetlink and the kernel policy is installed from `policy` at once.
    pub fn new(
        fastpath: Option<FastPath>,
        policy: PeerPolicy,
        relay_ips: Vec<IpAddr>,
    ) -> anyhow::Result<Self> {
        let next_hops = match &fastpath {
            Some(fastpath) => {
                let rtnl = Rtnl::open().map_err(|e| {
                    anyhow::anyhow!("the fast path resolves next hops over rtnetlink: {e}")
                })?;
                let capacity = u16::try_from(fastpath.capacity().next_hops).unwrap_or(u16::MAX);
                let mut table = NextHops::new(rtnl, capacity);
                table.set_attached(fastpath.attached_ifindexes());
                Some(table)
            }
            None => None,
        };
        let reader = fastpath.as_ref().and_then(|f| match f.counter_reader() {
            Ok(reader) => Some(Arc::new(reader) as Arc<dyn SlotReader>),
            Err(error) => {
                warn!(%error, "kernel counters are read under the fast-path lock");
                None
            }
        });
        let mut sync = Self {
            reader,
            slot_epoch: 0,
            default_on: fastpath.is_some(),
            fastpath,
            overrides: HashMap::new(),
            throttled: HashSet::new(),
            bindings: HashMap::new(),
            installed: HashMap::new(),
            permissions: HashMap::new(),
            installed_permissions: HashMap::new(),
            clients: HashMap::new(),
            next_hops,
            relay_ips: relay_ips.iter().map(|ip| ip.to_canonical()).collect(),
            policy,
            slots: HashMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            retired: PathCounters::default(),
            full_warned: None,
            refused_since_warning: 0,
        };
        sync.sync_policy()?;
        Ok(sync)
    }

    pub fn attached(&self) -> bool {
        self.fastpath.is_some()
    }

    pub fn default_on(&self) -> bool {
        self.default_on
    }

    pub fn fastpath(&self) -> Option<&FastPath> {
        self.fastpath.as_ref()
    }

    /// Whether `id`'s channels are forwarded by the kernel.
    pub fn enabled(&self, id: AllocationId) -> bool {
        self.fastpath.is_some()
            && !self.throttled.contains(&id)
            && self.overrides.get(&id).copied().unwrap_or(self.default_on)
    }

    /// Holds `id` on the socket path for the per-user bandwidth limit (`throttled`), or
    /// releases it to its own or the default setting. Returns whether anything changed; an
    /// allocation this module does not know (gone, or nothing to install yet) is left alone,
    /// so the set never holds dead ids (the sampler asks again every second).
    pub fn set_throttled(&mut self, id: AllocationId, throttled: bool) -> bool {
        let known = self.bindings.contains_key(&id) || self.permissions.contains_key(&id);
        let changed = if throttled {
            known && self.throttled.insert(id)
        } else {
            self.throttled.remove(&id)
        };
        if changed {
            self.sync_allocation(id);
        }
        changed
    }

    /// Applies one protocol-core command; commands that do not concern the kernel are ignored,
    /// and so is everything about a TCP/TLS client: the kernel rewrites UDP datagrams, it never
    /// forwards into a stream (issue 11), so such an allocation stays on the socket path.
    pub fn apply(&mut self, command: &Command) {
        match command {
            Command::CreateChannelBinding { transport, .. }
            | Command::CreatePermission { transport, .. }
                if *transport != Transport::Udp => {}
            Command::CreateChannelBinding {
                id,
                client,
                listener,
                relayed,
                peer,
                channel,
                expires_at,
                ..
            } => {
                let binding = ChannelBinding {
                    allocation: id.0,
                    client: *client,
                    listener: *listener,
                    relayed: *relayed,
                    peer: *peer,
                    channel: *channel,
                    expires_at: *expires_at,
                };
                self.bindings
                    .entry(*id)
                    .or_default()
                    .insert(*channel, binding);
                if self.enabled(*id) {
                    self.install(*id, &binding);
                }
                self.sync_permission(*id, peer.ip());
            }
            Command::DeleteChannelBinding { id, channel, .. } => {
                let removed = self
                    .bindings
                    .get_mut(id)
                    .and_then(|channels| channels.remove(channel));
                if let Some(binding) = removed {
                    self.remove(*id, &binding);
                    self.sync_permission(*id, binding.peer.ip());
                }
            }
            Command::CreatePermission {
                id,
                client,
                listener,
                relayed,
                peer_ip,
                expires_at,
                ..
            } => {
                let permission = PermissionBinding {
                    allocation: id.0,
                    client: *client,
                    listener: *listener,
                    relayed: *relayed,
                    peer_ip: *peer_ip,
                    expires_at: *expires_at,
                };
                self.permissions
                    .entry(*id)
                    .or_default()
                    .insert(*peer_ip, permission);
                self.sync_permission(*id, *peer_ip);
            }
            Command::DeletePermission { id, peer_ip, .. } => {
                let removed = self
                    .permissions
                    .get_mut(id)
                    .and_then(|permissions| permissions.remove(peer_ip));
                if let Some(permission) = removed {
                    self.remove_permission(*id, &permission);
                }
            }
            Command::DeleteAllocation { id, .. } => {
                self.forget_allocation(*id);
            }
            _ => {}
        }
    }

    /// Moves one allocation to the kernel (`on`) or the socket path.
    pub fn set_allocation(&mut self, id: AllocationId, on: bool) -> Result<(), String> {
        if self.fastpath.is_none() {
            return Err(not_attached());
        }
        self.overrides.insert(id, on);
        self.sync_allocation(id);
        if on && self.throttled.contains(&id) {
            // Kept, not refused: the operator's choice applies once the user is back under.
            return Err(format!(
                "allocation {id} is held on the socket path because its user is over                  --user-bandwidth; the kernel setting is kept and applies once the user has                  stayed under the limit"
            ));
        }
        Ok(())
    }

    /// Sets the path of every allocation that has no setting of its own.
    pub fn set_default(&mut self, on: bool) -> Result<(), String> {
        if self.fastpath.is_none() {
            return Err(not_attached());
        }
        self.default_on = on;
        let mut ids: Vec<AllocationId> = self
            .bindings
            .keys()
            .chain(self.permissions.keys())
            .filter(|id| !self.overrides.contains_key(id))
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.sync_allocation(id);
        }
        Ok(())
    }

    /// Routes, neighbours, links or addresses changed: rewrites the next hops that changed, and
    /// the kernel policy when the host's addresses did (`addresses_changed`; the caller has
    /// already updated the shared host-address set).
    pub fn on_netlink(&mut self, events: &[Event], addresses_changed: bool) {
        if let Some(table) = &mut self.next_hops {
            let changed = table.handle(events);
            self.write_next_hops(changed);
        }
        if addresses_changed {
            if let Err(error) = self.sync_policy() {
                warn!("cannot update the kernel peer policy: {error:#}");
            }
        }
    }

    /// Re-confirms the neighbours in use (XDP-forwarded traffic never touches the stack's
    /// neighbour entries, which would otherwise go stale and be garbage-collected).
    pub fn refresh_neighbours(&mut self) {
        if let Some(table) = &mut self.next_hops {
            let changed = table.refresh_neighbours();
            self.write_next_hops(changed);
        }
    }

    /// What the kernel relayed for `id` so far.
    pub fn counters(&self, id: AllocationId) -> PathCounters {
        let (Some(fastpath), Some(slot)) = (&self.fastpath, self.slots.get(&id)) else {
            return PathCounters::default();
        };
        match fastpath.counters(*slot) {
            Ok(c) => PathCounters {
                to_peer_packets: c.to_peer_packets,
                to_peer_bytes: c.to_peer_bytes,
                to_client_packets: c.to_client_packets,
                to_client_bytes: c.to_client_bytes,
            },
            Err(error) => {
                debug!(allocation = %id, %error, "cannot read kernel counters");
                PathCounters::default()
            }
        }
    }

    /// Takes allocation `id` out of the kernel (its relay socket is closing) and returns what
    /// the kernel relayed for it, read after its entries are gone (so final up to packets in
    /// flight), for its usage record. A second call (the other socket of a dual allocation)
    /// returns zero: each count is reported once.
    pub fn end_allocation(&mut self, id: AllocationId) -> PathCounters {
        self.forget_allocation(id)
    }

    /// Like [`KernelSync::totals`], for `/metrics`: the lock is held only to copy the slots of
    /// `live` (and the retired totals), not across one map read per allocation, so workers that
    /// need it to update the maps are not kept waiting by a scrape. The sum is the one
    /// `totals` gives: if an allocation ended meanwhile (its counters retired, its slot free for
    /// another), the copy is stale and it is read again; after a few tries, under the lock.
    pub fn live_totals(kernel: &Mutex<Self>, live: &[AllocationId]) -> PathCounters {
        use super::worker::lock;
        for _ in 0..UNLOCKED_TOTALS_TRIES {
            let (reader, retired, epoch, slots) = {
                let k = lock(kernel);
                let Some(reader) = k.reader.clone() else {
                    // No fast path: nothing to read from the kernel.
                    return k.totals(live.iter().copied());
                };
                let slots: Vec<(AllocationId, u32)> = live
                    .iter()
                    .filter_map(|id| Some((*id, *k.slots.get(id)?)))
                    .collect();
                (reader, k.retired, k.slot_epoch, slots)
            };
            let mut total = retired;
            for (id, slot) in slots {
                match reader.read(slot) {
                    Ok(c) => total += c,
                    Err(error) => debug!(allocation = %id, %error, "cannot read kernel counters"),
                }
            }
            if lock(kernel).slot_epoch == epoch {
                return total;
            }
        }
        lock(kernel).totals(live.iter().copied())
    }

    /// Kernel totals over live and deleted allocations.
    pub fn totals(&self, live: impl Iterator<Item = AllocationId>) -> PathCounters {
        let mut total = self.retired;
        for id in live {
            total += self.counters(id);
        }
        total
    }

    /// Takes everything out of the kernel (at shutdown, before the programs detach).
    pub fn shutdown(&mut self) -> Option<FastPath> {
        let mut ids: Vec<AllocationId> = self
            .bindings
            .keys()
            .chain(self.permissions.keys())
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            self.forget_allocation(id);
        }
        self.fastpath.take()
    }

    /// A reload's new peer policy (sharing the host-address set): the kernel copy is
    /// recompiled at once, so the fast path stops forwarding to newly denied peers before the
    /// cores withdraw their permissions. On failure the old policy is put back.
    pub fn set_policy(&mut self, policy: PeerPolicy) -> Result<(), String> {
        let old = std::mem::replace(&mut self.policy, policy);
        if let Err(error) = self.sync_policy() {
            self.policy = old;
            let _ = self.sync_policy();
            return Err(format!(
                "cannot install the new peer policy in the kernel: {error}"
            ));
        }
        Ok(())
    }

    /// Installs the policy's current prefixes (with the host's current addresses).
    fn sync_policy(&mut self) -> Result<(), FastPathError> {
        let Some(fastpath) = &mut self.fastpath else {
            return Ok(());
        };
        let prefixes = fastpath.set_peer_policy(&self.policy)?;
        debug!(prefixes, "kernel peer policy installed");
        Ok(())
    }

    fn write_next_hops(&mut self, changed: Vec<(NextHopId, NextHopValue)>) {
        let Some(fastpath) = &mut self.fastpath else {
            return;
        };
        for (id, value) in changed {
            if let Err(error) = fastpath.set_next_hop(id.0, &value) {
                warn!(next_hop = id.0, %error, "cannot update a kernel next hop");
            } else {
                debug!(
                    next_hop = id.0,
                    valid = value.is_valid(),
                    ifindex = value.ifindex,
                    "next hop updated"
                );
            }
        }
    }

    fn sync_allocation(&mut self, id: AllocationId) {
        let on = self.enabled(id);
        let channels: Vec<ChannelBinding> = self
            .bindings
            .get(&id)
            .map(|channels| channels.values().cloned().collect())
            .unwrap_or_default();
        for binding in &channels {
            if on {
                self.install(id, binding);
            } else {
                self.remove(id, binding);
            }
        }
        let permissions: Vec<PermissionBinding> = self
            .permissions
            .get(&id)
            .map(|permissions| permissions.values().cloned().collect())
            .unwrap_or_default();
        for permission in &permissions {
            self.sync_permission(id, permission.peer_ip);
        }
        if !on {
            self.remove_client(id);
        }
    }

    fn forget_allocation(&mut self, id: AllocationId) -> PathCounters {
        // Bindings out first, so the counters read next are final (up to packets in flight).
        let mut clean = true;
        if let Some(channels) = self.bindings.remove(&id) {
            for binding in channels.values() {
                clean &= self.remove(id, binding);
            }
        }
        if let Some(permissions) = self.permissions.remove(&id) {
            for permission in permissions.values() {
                clean &= self.remove_permission(id, permission);
            }
        }
        self.remove_client(id);
        let counters = self.counters(id);
        self.retired += counters;
        self.overrides.remove(&id);
        self.throttled.remove(&id);
        // The slot is zeroed again when the next allocation takes it; one that an entry the
        // kernel refused to delete may still count into is never reused.
        self.slot_epoch = self.slot_epoch.wrapping_add(1);
        if let Some(slot) = self.slots.remove(&id) {
            if clean {
                self.free_slots.push(slot);
            }
        }
        counters
    }

    /// The counter slot of `id`, taking (and zeroing) a free one the first time.
    fn slot(&mut self, id: AllocationId) -> Option<u32> {
        if let Some(slot) = self.slots.get(&id) {
            return Some(*slot);
        }
        let fastpath = self.fastpath.as_mut()?;
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None if self.next_slot < fastpath.capacity().allocations => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return None,
        };
        if let Err(error) = fastpath.reset_counters(slot) {
            warn!(allocation = %id, %error, "cannot reset kernel counters");
            self.free_slots.push(slot);
            return None;
        }
        self.slots.insert(id, slot);
        Some(slot)
    }

    /// Installs (or refreshes) `binding`, taking next hops for its addresses the first time.
    fn install(&mut self, id: AllocationId, binding: &ChannelBinding) {
        // A binding the kernel cannot carry (a channel number outside ChannelData's range, a
        // relayed address and peer of different families) stays on the socket path: no next
        // hops, no warning on every refresh. Client and peer of different families (RFC 8656
        // §7.2) are fine: the kernel translates.
        if let Err(reason) = fastpath::supported(binding) {
            debug!(allocation = binding.allocation, %reason, "binding stays on the socket path");
            return;
        }
        let key = (id, binding.channel);
        let hops = match self.installed.get(&key) {
            Some(hops) => *hops,
            None => {
                let Some(counters) = self.slot(id) else {
                    return self.refused(binding.allocation, "counter slots full");
                };
                match self.acquire_hops(binding, counters) {
                    Some(hops) => hops,
                    None => return self.refused(binding.allocation, "next-hop map full"),
                }
            }
        };
        let Some(fastpath) = &mut self.fastpath else {
            return;
        };
        match fastpath.install_channel(binding, hops) {
            Ok(()) => {
                debug!(
                    allocation = binding.allocation,
                    channel = binding.channel,
                    peer = %binding.peer,
                    hairpin = hops.hairpin,
                    "channel installed in the kernel"
                );
                self.installed.insert(key, hops);
            }
            Err(error) => {
                let full = error.is_map_full();
                // Not in the kernel any more (a failed refresh may have left half of it).
                if self.installed.remove(&key).is_some() {
                    let _ = fastpath.remove_channel(binding);
                }
                self.release_hops(hops);
                if full {
                    self.refused(binding.allocation, "channel maps full");
                } else {
                    // The socket path still carries the channel; only speed is lost.
                    warn!(
                        allocation = binding.allocation,
                        channel = binding.channel,
                        %error,
                        "cannot install channel in the kernel; it stays on the socket path"
                    );
                }
            }
        }
    }

    /// Takes `binding` out of the kernel; `false` when the kernel refused, in which case its
    /// next hops stay reserved (never handed to another destination while an entry may still
    /// point at them).
    fn remove(&mut self, id: AllocationId, binding: &ChannelBinding) -> bool {
        let Some(hops) = self.installed.remove(&(id, binding.channel)) else {
            return true;
        };
        if let Some(fastpath) = &mut self.fastpath {
            if let Err(error) = fastpath.remove_channel(binding) {
                warn!(
                    allocation = binding.allocation,
                    channel = binding.channel,
                    %error,
                    "cannot remove channel from the kernel; its next hops and counter slot \
                     stay reserved until the entry expires"
                );
                return false;
            }
        }
        self.release_hops(hops);
        true
    }

    /// Puts the permission of `id` for `ip` into the kernel, or takes it out, as things
    /// stand: the allocation on the kernel path, the permission live, and every channel of the
    /// allocation to that peer IP in the kernel too. A channel the kernel does not carry (maps
    /// full, fast path off for it) means the socket path must answer that peer with ChannelData
    /// (RFC 8656 §12.6), which a kernel Data indication would pre-empt.
    fn sync_permission(&mut self, id: AllocationId, ip: IpAddr) {
        let Some(permission) = self
            .permissions
            .get(&id)
            .and_then(|permissions| permissions.get(&ip))
            .copied()
        else {
            return;
        };
        let channel_outside = self.bindings.get(&id).is_some_and(|channels| {
            channels.values().any(|binding| {
                binding.peer.ip() == ip && !self.installed.contains_key(&(id, binding.channel))
            })
        });
        if self.enabled(id) && !channel_outside {
            self.install_permission(id, &permission);
        } else {
            self.remove_permission(id, &permission);
        }
    }

    /// Installs (or refreshes) a permission with its allocation's client entry. Permissions
    /// for the host's own addresses (client-to-client) stay on the socket path, which checks
    /// ports; across families the kernel translates.
    fn install_permission(&mut self, id: AllocationId, permission: &PermissionBinding) {
        if !permission.supported()
            || self.relay_ips.contains(&permission.peer_ip.to_canonical())
            || self.policy.is_own_address(permission.peer_ip)
        {
            self.remove_permission(id, permission);
            return;
        }
        let key = (id, permission.peer_ip);
        let hops = match self.installed_permissions.get(&key) {
            Some(hops) => *hops,
            None => {
                let Some(counters) = self.slot(id) else {
                    return self.refused(permission.allocation, "counter slots full");
                };
                let pair = self.acquire_pair(
                    (permission.listener.ip(), permission.client.ip()),
                    (permission.relayed.ip(), permission.peer_ip),
                    false,
                    counters,
                );
                match pair {
                    Some(hops) => hops,
                    None => return self.refused(permission.allocation, "next-hop map full"),
                }
            }
        };
        let Some(fastpath) = &mut self.fastpath else {
            return;
        };
        match fastpath.install_permission(permission, hops) {
            Ok(()) => {
                debug!(
                    allocation = permission.allocation,
                    peer = %permission.peer_ip,
                    "permission installed in the kernel"
                );
                self.installed_permissions.insert(key, hops);
                self.clients.insert(id, *permission);
            }
            Err(error) => {
                let full = error.is_map_full();
                if self.installed_permissions.remove(&key).is_some() {
                    let _ = fastpath.remove_permission(permission);
                }
                self.release_hops(hops);
                if full {
                    self.refused(permission.allocation, "permission maps full");
                } else {
                    warn!(
                        allocation = permission.allocation,
                        %error,
                        "cannot install a permission in the kernel; it stays on the socket path"
                    );
                }
            }
        }
    }

    /// Takes a permission out of the kernel; `false` when the kernel refused (its next hops
    /// then stay reserved).
    fn remove_permission(&mut self, id: AllocationId, permission: &PermissionBinding) -> bool {
        let Some(hops) = self.installed_permissions.remove(&(id, permission.peer_ip)) else {
            return true;
        };
        if let Some(fastpath) = &mut self.fastpath {
            if let Err(error) = fastpath.remove_permission(permission) {
                warn!(
                    allocation = permission.allocation,
                    %error,
                    "cannot remove a permission from the kernel; its next hops stay reserved"
                );
                return false;
            }
        }
        self.release_hops(hops);
        true
    }

    /// Takes the allocation's client entry out of the kernel, if it is there.
    fn remove_client(&mut self, id: AllocationId) {
        let Some(permission) = self.clients.remove(&id) else {
            return;
        };
        if let Some(fastpath) = &mut self.fastpath {
            if let Err(error) = fastpath.remove_client(&permission) {
                warn!(allocation = %id, %error, "cannot remove a client entry from the kernel");
            }
        }
    }

    /// Next hops for the client and (unless it is one of this relay's addresses) the peer,
    /// written to the kernel before any binding refers to them.
    fn acquire_hops(&mut self, binding: &ChannelBinding, counters: u32) -> Option<BindingHops> {
        let hairpin = self.relay_ips.contains(&binding.peer.ip().to_canonical());
        self.acquire_pair(
            (binding.listener.ip(), binding.client.ip()),
            (binding.relayed.ip(), binding.peer.ip()),
            hairpin,
            counters,
        )
    }

    /// Next hops for (local, client) and, unless `hairpin`, (relayed, peer), written to the
    /// kernel before anything refers to them.
    fn acquire_pair(
        &mut self,
        client: (IpAddr, IpAddr),
        peer: (IpAddr, IpAddr),
        hairpin: bool,
        counters: u32,
    ) -> Option<BindingHops> {
        let table = self.next_hops.as_mut()?;
        let client = table.acquire_from(Some(client.0), client.1)?;
        let peer = if hairpin {
            // Unused: the kernel delivers to the other allocation's client through that
            // client's next hop.
            client
        } else {
            match table.acquire_from(Some(peer.0), peer.1) {
                Some(peer) => peer,
                None => {
                    table.release(client);
                    return None;
                }
            }
        };
        let mut written = vec![client];
        if !hairpin {
            written.push(peer);
        }
        let values: Vec<(NextHopId, NextHopValue)> = written
            .into_iter()
            .filter_map(|id| table.value(id).map(|v| (id, v)))
            .collect();
        self.write_next_hops(values);
        Some(BindingHops {
            client: client.0,
            peer: peer.0,
            hairpin,
            counters,
        })
    }

    fn release_hops(&mut self, hops: BindingHops) {
        let Some(table) = &mut self.next_hops else {
            return;
        };
        let mut freed = Vec::new();
        if table.release(NextHopId(hops.client)) {
            freed.push(hops.client);
        }
        if !hops.hairpin && table.release(NextHopId(hops.peer)) {
            freed.push(hops.peer);
        }
        // A freed slot stays invalid until it is handed out again.
        if let Some(fastpath) = &mut self.fastpath {
            for id in freed {
                let _ = fastpath.set_next_hop(id, &NextHop::default());
            }
        }
    }

    /// A binding stays on the socket path because a kernel map is full: said once a minute at
    /// most, with how many bindings it concerned.
    fn refused(&mut self, allocation: u64, why: &str) {
        self.refused_since_warning += 1;
        let now = Instant::now();
        if self
            .full_warned
            .is_none_or(|at| now.duration_since(at) >= FULL_WARNING_INTERVAL)
        {
            warn!(
                allocation,
                bindings = self.refused_since_warning,
                "kernel {why}: bindings stay on the socket path (raise --kernel-bindings); \
                 said at most once a minute"
            );
            self.full_warned = Some(now);
            self.refused_since_warning = 0;
        }
    }
}

fn not_attached() -> String {
    "the kernel fast path is not running (relay serve --fastpath off)".to_owned()
}

/// Logs the kernel memory the fast path's maps hold.
pub fn log_capacity(fastpath: &FastPath) {
    let capacity = fastpath.capacity();
    let cpus = aya::util::nr_cpus().unwrap_or(1);
    info!(
        "kernel maps: {} bindings, {} next hops, {} allocations, {:.1} MiB preallocated \
         ({} B per binding, {} B per next hop, {} B per allocation); --kernel-bindings sets it",
        capacity.bindings,
        capacity.next_hops,
        capacity.allocations,
        capacity.bytes(cpus) as f64 / f64::from(1 << 20),
        relay_common::CHANNEL_BINDING_BYTES,
        relay_common::NEXT_HOP_BYTES,
        relay_common::allocation_counter_bytes(cpus),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, OnceLock};

    use super::{KernelSync, PathCounters, SlotReader};
    use crate::proto::{policy::PeerPolicy, server::AllocationId};

    /// A counter map that checks, on every read, that the KernelSync lock is free: a worker
    /// that needs it meanwhile would get it at once.
    struct LockFreeReads {
        kernel: OnceLock<Arc<Mutex<KernelSync>>>,
        reads: Mutex<Vec<u32>>,
        /// Retires allocation 1 during the first read, as a worker ending it would.
        end_during_read: bool,
    }

    impl SlotReader for LockFreeReads {
        fn read(&self, slot: u32) -> Result<PathCounters, String> {
            let kernel = self.kernel.get().ok_or("no kernel")?;
            let mut guard = kernel.try_lock().map_err(|_| "read under the lock")?;
            let first = {
                let mut reads = self.reads.lock().map_err(|_| "poisoned")?;
                reads.push(slot);
                reads.len() == 1
            };
            if first && self.end_during_read {
                guard.retired += counters(slot);
                guard.slots.remove(&AllocationId(1));
                guard.slot_epoch += 1;
            }
            Ok(counters(slot))
        }
    }

    fn counters(slot: u32) -> PathCounters {
        let n = u64::from(slot) + 1;
        PathCounters {
            to_peer_packets: n,
            to_peer_bytes: 100 * n,
            to_client_packets: 2 * n,
            to_client_bytes: 200 * n,
        }
    }

    fn kernel(end_during_read: bool) -> (Arc<Mutex<KernelSync>>, Arc<LockFreeReads>) {
        let mut sync = KernelSync::new(None, PeerPolicy::default(), Vec::new()).expect("sync");
        let reader = Arc::new(LockFreeReads {
            kernel: OnceLock::new(),
            reads: Mutex::new(Vec::new()),
            end_during_read,
        });
        sync.reader = Some(Arc::clone(&reader) as Arc<dyn SlotReader>);
        sync.retired = counters(9);
        for (id, slot) in [(1, 0), (2, 1), (3, 2)] {
            sync.slots.insert(AllocationId(id), slot);
        }
        let kernel = Arc::new(Mutex::new(sync));
        assert!(reader.kernel.set(Arc::clone(&kernel)).is_ok());
        (kernel, reader)
    }

    #[test]
    fn metrics_read_kernel_counters_outside_the_lock() {
        let (kernel, reader) = kernel(false);
        let live = [
            AllocationId(1),
            AllocationId(2),
            AllocationId(3),
            AllocationId(4),
        ];
        let total = KernelSync::live_totals(&kernel, &live);
        let mut want = counters(9);
        for slot in 0..3 {
            want += counters(slot);
        }
        assert_eq!(total, want);
        // One read per live allocation with a slot, none of them under the lock (a read under
        // it would have failed and been left out of the sum).
        assert_eq!(*reader.reads.lock().expect("reads"), vec![0, 1, 2]);
    }

    #[test]
    fn an_allocation_ending_during_the_read_is_counted_once() {
        let (kernel, reader) = kernel(true);
        let live = [AllocationId(1), AllocationId(2), AllocationId(3)];
        let total = KernelSync::live_totals(&kernel, &live);
        // Allocation 1 is retired now: its counters are in `retired`, its slot is not read again.
        let mut want = counters(9);
        for slot in 0..3 {
            want += counters(slot);
        }
        assert_eq!(total, want);
        assert_eq!(*reader.reads.lock().expect("reads"), vec![0, 1, 2, 1, 2]);
    }
}
