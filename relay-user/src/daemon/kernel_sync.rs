//! Keeps the kernel fast path's maps in step with the protocol core, and applies the
//! per-allocation on/off switch.
//!
//! The core's `CreateChannelBinding`/`DeleteChannelBinding` commands are the only source of
//! truth. This module remembers every live binding (whether or not it is in the kernel right
//! now), so an allocation can be moved to the socket path and back without losing anything:
//! off removes its entries from the maps (the socket path then sees its ChannelData, because
//! the relay socket was never closed), on installs them again. It runs inside the core task,
//! so map updates happen in exactly the order the core decided them.

use std::collections::HashMap;

use tracing::{debug, warn};

use crate::{
    control::PathCounters,
    fastpath::{ChannelBinding, FastPath},
    proto::server::{AllocationId, Command},
};

pub struct KernelSync {
    fastpath: Option<FastPath>,
    /// Path for allocations without their own setting.
    default_on: bool,
    overrides: HashMap<AllocationId, bool>,
    /// Live channel bindings per allocation, by channel number.
    bindings: HashMap<AllocationId, HashMap<u16, ChannelBinding>>,
    /// Kernel counters of allocations that are gone (for metrics totals).
    retired: PathCounters,
}

impl KernelSync {
    /// With `None` every allocation stays on the socket path.
    pub fn new(fastpath: Option<FastPath>) -> Self {
        Self {
            default_on: fastpath.is_some(),
            fastpath,
            overrides: HashMap::new(),
            bindings: HashMap::new(),
            retired: PathCounters::default(),
        }
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
        self.fastpath.is_some() && self.overrides.get(&id).copied().unwrap_or(self.default_on)
    }

    /// Applies one protocol-core command; commands that do not concern the kernel are ignored.
    pub fn apply(&mut self, command: &Command) {
        match command {
            Command::CreateChannelBinding {
                id,
                client,
                listener,
                relayed,
                peer,
                channel,
                expires_at,
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
                if self.enabled(*id) {
                    self.install(&binding);
                }
                self.bindings
                    .entry(*id)
                    .or_default()
                    .insert(*channel, binding);
            }
            Command::DeleteChannelBinding { id, channel, .. } => {
                let removed = self
                    .bindings
                    .get_mut(id)
                    .and_then(|channels| channels.remove(channel));
                if let Some(binding) = removed {
                    self.remove(&binding);
                }
            }
            Command::DeleteAllocation { id, .. } => self.forget_allocation(*id),
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
        Ok(())
    }

    /// Sets the path of every allocation that has no setting of its own.
    pub fn set_default(&mut self, on: bool) -> Result<(), String> {
        if self.fastpath.is_none() {
            return Err(not_attached());
        }
        self.default_on = on;
        let ids: Vec<AllocationId> = self
            .bindings
            .keys()
            .filter(|id| !self.overrides.contains_key(id))
            .copied()
            .collect();
        for id in ids {
            self.sync_allocation(id);
        }
        Ok(())
    }

    /// What the kernel relayed for `id` so far.
    pub fn counters(&self, id: AllocationId) -> PathCounters {
        let Some(fastpath) = &self.fastpath else {
            return PathCounters::default();
        };
        match fastpath.allocation_counters(id.0) {
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
        let ids: Vec<AllocationId> = self.bindings.keys().copied().collect();
        for id in ids {
            self.forget_allocation(id);
        }
        self.fastpath.take()
    }

    fn sync_allocation(&mut self, id: AllocationId) {
        let on = self.enabled(id);
        let Some(channels) = self.bindings.get(&id) else {
            return;
        };
        let channels: Vec<ChannelBinding> = channels.values().cloned().collect();
        for binding in &channels {
            if on {
                self.install(binding);
            } else {
                self.remove(binding);
            }
        }
    }

    fn forget_allocation(&mut self, id: AllocationId) {
        // Bindings out first, so the counters read next are final (up to packets in flight).
        if let Some(channels) = self.bindings.remove(&id) {
            for binding in channels.values() {
                self.remove(binding);
            }
        }
        let counters = self.counters(id);
        self.retired += counters;
        self.overrides.remove(&id);
        if let Some(fastpath) = &mut self.fastpath {
            if let Err(error) = fastpath.remove_allocation_counters(id.0) {
                debug!(allocation = %id, %error, "cannot remove kernel counters");
            }
        }
    }

    fn install(&mut self, binding: &ChannelBinding) {
        if let Some(fastpath) = &mut self.fastpath {
            match fastpath.install_channel(binding) {
                Ok(()) => debug!(
                    allocation = binding.allocation,
                    channel = binding.channel,
                    peer = %binding.peer,
                    "channel installed in the kernel"
                ),
                // The socket path still carries the channel; only speed is lost.
                Err(error) => warn!(
                    allocation = binding.allocation,
                    channel = binding.channel,
                    %error,
                    "cannot install channel in the kernel; it stays on the socket path"
                ),
            }
        }
    }

    fn remove(&mut self, binding: &ChannelBinding) {
        if let Some(fastpath) = &mut self.fastpath {
            if let Err(error) = fastpath.remove_channel(binding) {
                warn!(
                    allocation = binding.allocation,
                    channel = binding.channel,
                    %error,
                    "cannot remove channel from the kernel"
                );
            }
        }
    }
}

fn not_attached() -> String {
    "the kernel fast path is not running (relay serve --fastpath off)".to_owned()
}
