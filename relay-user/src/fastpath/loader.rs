//! Loading, attaching and detaching the kernel programs, and the map API the daemon drives.

use std::{fmt, io, time::Instant};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, DevMapHash, HashMap, MapError, PerCpuArray, PerCpuValues,
    },
    programs::{
        tc, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use relay_common::{
    allocation_counter_bytes, entry_digest, ChannelKey, ClientKey, EntryDigestKey, NextHop,
    PeerKey, Permission, PermissionKey, Reason, ToClient, ToPeer, ToRelay, ALLOCATION_COUNTERS_MAP,
    CHANNELS_MAP, CHANNEL_BINDING_BYTES, CLIENTS_MAP, EGRESS_DEVICES_MAP, ENTRY_DIGEST_KEY_MAP,
    FAMILY_IPV4, FAMILY_IPV6, LISTENER_PORTS_MAP, MAX_CHANNEL_BINDINGS, NEXT_HOPS_LIMIT,
    NEXT_HOPS_MAP, NEXT_HOP_BYTES, PEERS_MAP, PEER_POLICY_V4_MAP, PEER_POLICY_V6_MAP,
    PERMISSIONS_MAP, POLICY_ALLOW, POLICY_DENY, POLICY_GENERATION_MAP, TC_PROGRAM,
    VERDICT_COUNTERS_MAP, XDP_PASS_PROGRAM, XDP_PROGRAM,
};

use super::{
    binding::{self, BindingHops, ChannelBinding, PermissionBinding},
    EBPF_OBJECT,
};

/// How many bindings, allocations and next hops the kernel maps hold. Hash maps preallocate
/// every entry, so this is kernel memory spent at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    /// Channel bindings ([`CHANNELS_MAP`] and [`PEERS_MAP`] entries each).
    pub bindings: u32,
    /// Allocations with kernel counters.
    pub allocations: u32,
    /// Destination addresses with a next hop (two per binding at most, shared between
    /// bindings to the same address).
    pub next_hops: u32,
    /// Permissions (Send/Data indications in the kernel).
    pub permissions: u32,
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self::for_bindings(MAX_CHANNEL_BINDINGS)
    }
}

impl MapCapacity {
    /// Capacity for `bindings` channel bindings: as many allocations (each kernel allocation
    /// has at least one binding) and two next hops per binding, within the `u16` index space.
    pub fn for_bindings(bindings: u32) -> Self {
        let bindings = bindings.max(1);
        Self {
            bindings,
            allocations: bindings,
            next_hops: bindings.saturating_mul(2).min(NEXT_HOPS_LIMIT),
            permissions: bindings,
        }
    }

    /// Kernel memory the maps of this capacity preallocate on a machine with `cpus` CPUs.
    pub fn bytes(&self, cpus: usize) -> usize {
        self.bindings as usize * CHANNEL_BINDING_BYTES
            + self.allocations as usize
                * (allocation_counter_bytes(cpus) + relay_common::CLIENT_ENTRY_BYTES)
            + self.permissions as usize * relay_common::PERMISSION_BYTES
            + self.next_hops as usize * NEXT_HOP_BYTES
    }
}

/// How the kernel program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP: runs before the kernel allocates an skb.
    XdpNative,
    /// Generic (SKB) XDP: works on any interface, slower; a fallback for drivers without XDP.
    XdpGeneric,
    /// TC ingress (TCX on kernels >= 6.6, a clsact qdisc before): the same forwarding logic on
    /// skbs. Works where XDP does not (e.g. next to another XDP program).
    Tc,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::XdpNative => "xdp (native)",
            AttachMode::XdpGeneric => "xdp-generic (skb)",
            AttachMode::Tc => "tc (ingress)",
        })
    }
}

/// What went wrong in the fast path; `Display` carries the hint an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("cannot parse the embedded eBPF object: {0}")]
    Object(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("program `{name}` has an unexpected type: {source}")]
    ProgramType {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "another running relay's `relay_xdp` (program id {program_id}) is attached to \
         {interface}: stop that relay first, or run this one with --fastpath off"
    )]
    AlreadyAttached { interface: String, program_id: u32 },
    #[error(
        "another running relay uses {interface} (it holds {lock}): stop that relay first, or run \
         this one with --fastpath off"
    )]
    InterfaceInUse { interface: String, lock: String },
    #[error("cannot read the kernel's information on program `{name}`: {source}")]
    ProgramInfo {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "the kernel refused to load `{name}` ({io_error}).\n\
         --- verifier log ---\n{verifier_log}\n--- end of verifier log ---\n\
         hint: loading BPF programs needs root (CAP_BPF + CAP_NET_ADMIN) and a kernel with BTF"
    )]
    Verifier {
        name: &'static str,
        io_error: std::io::Error,
        verifier_log: String,
    },
    #[error("loading `{name}` failed: {source}")]
    Load {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "`{0}` is not an Ethernet interface: the fast path parses and writes Ethernet frames \
         (run with --fastpath off, or attach it to the Ethernet device underneath)"
    )]
    NotEthernet(String),
    #[error("cannot ask the kernel about `{interface}` over rtnetlink: {source}")]
    Netlink {
        interface: String,
        source: io::Error,
    },
    #[error("no network interface named `{0}`")]
    UnknownInterface(String),
    #[error(
        "attaching {} in {mode} mode to `{interface}` failed: {source}\n\
         hint: {hint}",
        if *.mode == AttachMode::Tc { "TC" } else { "XDP" }
    )]
    Attach {
        interface: String,
        mode: AttachMode,
        source: ProgramError,
        hint: &'static str,
    },
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error(
        "registering `{interface}` as an egress device failed: {source}\n\
         hint: the kernel needs DEVMAP_HASH support (Linux >= 5.4)"
    )]
    EgressDevice {
        interface: String,
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("the fast path cannot carry this binding: {0}")]
    Unsupported(&'static str),
    #[error("counting CPUs: {0}")]
    Cpus(#[source] io::Error),
    #[error("BPF_PROG_TEST_RUN of `{name}` failed: {source}")]
    TestRun {
        name: &'static str,
        source: ProgramError,
    },
}

/// Packets and bytes the kernel forwarded for one allocation (the map's per-CPU value type,
/// summed over CPUs by [`FastPath::counters`]). Bytes are application data
/// (ChannelData payload without header and padding).
pub use relay_common::AllocationCounters;

/// Which program [`FastPath::test_run`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestProgram {
    Xdp,
    Tc,
}

/// Result of one [`FastPath::test_run`]: the program's return code (XDP action or TC action)
/// and the frame as the program left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    pub action: u32,
    pub frame: Vec<u8>,
}

/// The loaded kernel programs, their maps and the interfaces they are attached to.
///
/// Dropping it detaches every program and frees every map: nothing is pinned, so a restart
/// starts clean.
///
/// Forwarding needs, besides the binding entries installed here: the next hops of their
/// client and peer addresses ([`FastPath::set_next_hop`], resolved by userspace from the
/// kernel's routing and neighbour tables: no forwarding sysctl, no per-packet FIB lookup), the
/// peer policy ([`FastPath::set_policy`]: the program refuses peers it denies), the interfaces
/// of both legs attached (the program redirects only into attached interfaces), and senders
/// that put complete UDP checksums on the wire (the program updates checksums incrementally;
/// see `relay-ebpf`).
pub struct FastPath {
    ebpf: Ebpf,
    attached: Vec<(String, AttachMode)>,
    /// Interface indices of `attached`, in the same order.
    attached_ifindexes: Vec<u32>,
    capacity: MapCapacity,
    /// The policy prefixes in the kernel now, so [`FastPath::set_policy`] changes only what
    /// differs.
    policy: std::collections::HashMap<ipnet::IpNet, u32>,
    /// The multipliers of every entry's digest (`relay_common::entry_digest`), drawn at load.
    digest_key: EntryDigestKey,
    /// Locks of the interfaces attached to (released when this is dropped).
    locks: Vec<InterfaceLock>,
}

/// Reads the per-allocation counter map through a fd of its own (see
/// [`FastPath::counter_reader`]).
pub struct CounterReader {
    map: PerCpuArray<aya::maps::MapData, AllocationCounters>,
}

impl CounterReader {
    /// Like [`FastPath::counters`].
    pub fn counters(&self, slot: u32) -> Result<AllocationCounters, FastPathError> {
        slot_counters(&self.map, slot)
    }
}

/// Slot `slot` of the counter map, summed over CPUs.
fn slot_counters<T: std::borrow::Borrow<aya::maps::MapData>>(
    counters: &PerCpuArray<T, AllocationCounters>,
    slot: u32,
) -> Result<AllocationCounters, FastPathError> {
    let per_cpu = counters
        .get(&slot, 0)
        .map_err(map_error(ALLOCATION_COUNTERS_MAP))?;
    Ok(per_cpu
        .iter()
        .fold(AllocationCounters::default(), |sum, cpu| {
            AllocationCounters {
                to_peer_packets: sum.to_peer_packets + cpu.to_peer_packets,
                to_peer_bytes: sum.to_peer_bytes + cpu.to_peer_bytes,
                to_client_packets: sum.to_client_packets + cpu.to_client_packets,
                to_client_bytes: sum.to_client_bytes + cpu.to_client_bytes,
            }
        }))
}

impl FastPath {
    /// Parses the embedded object and loads its programs into the kernel (not attached yet),
    /// with the default map capacity.
    pub fn load() -> Result<Self, FastPathError> {
        Self::load_with(EBPF_OBJECT, MapCapacity::default())
    }

    /// Like [`FastPath::load`], from another build of the eBPF object (e.g. a baseline that a
    /// benchmark compares against). The object must define the same programs and maps.
    pub fn load_object(object: &[u8]) -> Result<Self, FastPathError> {
        Self::load_with(object, MapCapacity::default())
    }

    /// Loads `object` with maps sized for `capacity`.
    pub fn load_with(object: &[u8], capacity: MapCapacity) -> Result<Self, FastPathError> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(CHANNELS_MAP, capacity.bindings)
            .map_max_entries(PEERS_MAP, capacity.bindings)
            .map_max_entries(ALLOCATION_COUNTERS_MAP, capacity.allocations)
            .map_max_entries(NEXT_HOPS_MAP, capacity.next_hops)
            .map_max_entries(CLIENTS_MAP, capacity.allocations)
            .map_max_entries(PERMISSIONS_MAP, capacity.permissions)
            .load(object)
            .map_err(FastPathError::Object)?;
        for name in [XDP_PROGRAM, XDP_PASS_PROGRAM] {
            let result = xdp_program(&mut ebpf, name)?.load();
            result.map_err(|source| load_error(name, source))?;
        }
        let result = tc_program(&mut ebpf)?.load();
        result.map_err(|source| load_error(TC_PROGRAM, source))?;
        // Fresh multipliers for every load: what an entry's digest is cannot be known outside.
        let mut digest_key = EntryDigestKey {
            seed: rand::random(),
            ..EntryDigestKey::default()
        };
        for multiplier in digest_key.multipliers.iter_mut() {
            *multiplier = rand::random();
        }
        let mut keys: Array<&mut aya::maps::MapData, EntryDigestKey> =
            typed_map(&mut ebpf, ENTRY_DIGEST_KEY_MAP)?;
        keys.set(0, digest_key, 0)
            .map_err(map_error(ENTRY_DIGEST_KEY_MAP))?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
            attached_ifindexes: Vec::new(),
            capacity,
            policy: std::collections::HashMap::new(),
            digest_key,
            locks: Vec::new(),
        })
    }

    /// What the maps were sized for.
    pub fn capacity(&self) -> MapCapacity {
        self.capacity
    }

    /// Writes next hop `index` (an index below [`MapCapacity::next_hops`]).
    pub fn set_next_hop(&mut self, index: u16, hop: &NextHop) -> Result<(), FastPathError> {
        let mut hops: Array<&mut aya::maps::MapData, NextHop> =
            typed_map(&mut self.ebpf, NEXT_HOPS_MAP)?;
        hops.set(u32::from(index), *hop, 0)
            .map_err(map_error(NEXT_HOPS_MAP))
    }

    /// Makes the kernel copy of the peer policy that of `policy` (with the host addresses it
    /// holds now); returns how many prefixes it has.
    pub fn set_peer_policy(
        &mut self,
        policy: &crate::proto::policy::PeerPolicy,
    ) -> Result<usize, FastPathError> {
        let prefixes: Vec<(ipnet::IpNet, u32)> = policy
            .kernel_prefixes()
            .into_iter()
            .map(|(net, allow)| (net, if allow { POLICY_ALLOW } else { POLICY_DENY }))
            .collect();
        self.set_policy(&prefixes)?;
        Ok(prefixes.len())
    }

    /// Makes the kernel copy of the peer policy exactly `prefixes`. Changes are applied so that
    /// no address is allowed on the way that neither the old nor the new policy allows: new and
    /// changed deny prefixes first, then allow prefixes, then stale allows, then stale denies
    /// (removing a stale deny then only ever uncovers a prefix of the new policy or another
    /// stale deny). The policy generation is bumped whenever anything was written, even if a
    /// later write failed, so no cached verdict of the old tries survives.
    pub fn set_policy(&mut self, prefixes: &[(ipnet::IpNet, u32)]) -> Result<(), FastPathError> {
        let wanted: std::collections::HashMap<ipnet::IpNet, u32> =
            prefixes.iter().map(|(net, v)| (net.trunc(), *v)).collect();
        let mut changed: Vec<(ipnet::IpNet, Option<u32>)> = wanted
            .iter()
            .filter(|(net, value)| self.policy.get(net) != Some(value))
            .map(|(k, v)| (*k, Some(*v)))
            .collect();
        // Denies (0) before allows (1).
        changed.sort_by_key(|(_, value)| *value);
        let mut stale: Vec<(ipnet::IpNet, u32)> = self
            .policy
            .iter()
            .filter(|(net, _)| !wanted.contains_key(net))
            .map(|(net, value)| (*net, *value))
            .collect();
        // Allows (1) before denies (0).
        stale.sort_by_key(|(_, value)| std::cmp::Reverse(*value));
        changed.extend(stale.into_iter().map(|(net, _)| (net, None)));
        let mut result = Ok(());
        let mut written = false;
        for (net, value) in changed {
            if let Err(error) = self.policy_trie_update(net, value) {
                result = Err(error);
                break;
            }
            written = true;
            match value {
                Some(value) => self.policy.insert(net, value),
                None => self.policy.remove(&net),
            };
        }
        if written {
            self.bump_policy_generation()?;
        }
        result
    }

    /// Invalidates every verdict the program cached from the policy tries.
    fn bump_policy_generation(&mut self) -> Result<(), FastPathError> {
        let mut generation: Array<&mut aya::maps::MapData, u32> =
            typed_map(&mut self.ebpf, POLICY_GENERATION_MAP)?;
        let current = generation
            .get(&0, 0)
            .map_err(map_error(POLICY_GENERATION_MAP))?;
        generation
            .set(0, current.wrapping_add(1).max(1), 0)
            .map_err(map_error(POLICY_GENERATION_MAP))
    }

    /// Inserts (`Some`) or removes one prefix of the family's policy trie.
    fn policy_trie_update(
        &mut self,
        net: ipnet::IpNet,
        value: Option<u32>,
    ) -> Result<(), FastPathError> {
        let len = u32::from(net.prefix_len());
        match net.addr() {
            std::net::IpAddr::V4(v4) => {
                let mut trie: LpmTrie<&mut aya::maps::MapData, u32, u32> =
                    typed_map(&mut self.ebpf, PEER_POLICY_V4_MAP)?;
                let key = LpmKey::new(len, u32::from_ne_bytes(v4.octets()));
                let result = match value {
                    Some(value) => trie.insert(&key, value, 0),
                    None => ignore_missing(trie.remove(&key)),
                };
                result.map_err(map_error(PEER_POLICY_V4_MAP))
            }
            std::net::IpAddr::V6(v6) => {
                let mut trie: LpmTrie<&mut aya::maps::MapData, [u32; 4], u32> =
                    typed_map(&mut self.ebpf, PEER_POLICY_V6_MAP)?;
                let key = LpmKey::new(len, relay_common::ip_field(v6.octets()));
                let result = match value {
                    Some(value) => trie.insert(&key, value, 0),
                    None => ignore_missing(trie.remove(&key)),
                };
                result.map_err(map_error(PEER_POLICY_V6_MAP))
            }
        }
    }

    /// Attaches the forwarding program to `interface` in `mode` and registers the interface as
    /// an egress device. Runs in the calling thread's network namespace.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<(), FastPathError> {
        let attach_error = |source: ProgramError| match source {
            ProgramError::UnknownInterface { name } => FastPathError::UnknownInterface(name),
            source => FastPathError::Attach {
                interface: interface.to_owned(),
                mode,
                hint: match mode {
                    AttachMode::XdpNative => {
                        "the driver may not support native XDP, or another XDP program is \
                         attached; try generic mode (--fastpath xdp-generic), or run with \
                         --fastpath off (the socket path works on its own)"
                    }
                    AttachMode::XdpGeneric => {
                        "another XDP program may be attached to this interface \
                         (`ip link show dev IFACE`); run with --fastpath off to use the socket \
                         path alone"
                    }
                    AttachMode::Tc => {
                        "TC needs CAP_NET_ADMIN and, before Linux 6.6, a clsact qdisc; run \
                         with --fastpath off to use the socket path alone"
                    }
                },
                source,
            },
        };
        let ifindex = ifindex(interface)?;
        // Tunnels and other L3 devices carry no Ethernet header: the program would read IP
        // bytes as one.
        let ethernet = link_is_ethernet(ifindex).map_err(|source| FastPathError::Netlink {
            interface: interface.to_owned(),
            source,
        })?;
        if !ethernet {
            return Err(FastPathError::NotEthernet(interface.to_owned()));
        }
        let lock = lock_interface(interface, ifindex)?;
        match mode {
            AttachMode::XdpNative | AttachMode::XdpGeneric => {
                if lock.is_some() {
                    replace_stale_xdp(interface, ifindex)?;
                }
                let xdp_mode = if mode == AttachMode::XdpNative {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                xdp_program(&mut self.ebpf, XDP_PROGRAM)?
                    .attach(interface, xdp_mode)
                    .map_err(attach_error)?;
            }
            AttachMode::Tc => {
                // TCX (>= 6.6) needs no qdisc; older kernels attach through clsact.
                let tcx = aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
                if !tcx {
                    if let Err(error) = tc::qdisc_add_clsact(interface) {
                        tracing::debug!("clsact on {interface}: {error} (may already exist)");
                    }
                    // A clsact filter outlives its process: one an earlier relay left behind
                    // (killed, crashed) would still forward with that relay's last entries.
                    // With the interface's lock held, no running relay owns one.
                    let stale = if lock.is_some() {
                        tc::qdisc_detach_program(interface, TcAttachType::Ingress, TC_PROGRAM)
                    } else {
                        Err(tc::TcError::IoError(std::io::ErrorKind::NotFound.into()))
                    };
                    match stale {
                        Ok(()) => tracing::warn!(
                            "removed a stale {TC_PROGRAM} filter from {interface}, left by an \
                             earlier relay that did not exit cleanly"
                        ),
                        Err(tc::TcError::IoError(e))
                            if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => {
                            tracing::debug!("looking for stale filters on {interface}: {error}")
                        }
                    }
                }
                tc_program(&mut self.ebpf)?
                    .attach(interface, TcAttachType::Ingress)
                    .map_err(attach_error)?;
            }
        }
        let mut devices = self.egress_devices()?;
        devices
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| FastPathError::EgressDevice {
                interface: interface.to_owned(),
                source,
            })?;
        self.attached.push((interface.to_owned(), mode));
        self.attached_ifindexes.push(ifindex);
        self.locks.extend(lock);
        Ok(())
    }

    /// Attaches `relay_xdp_pass` (XDP_PASS for every frame) natively to `interface`: the far
    /// end of a veth that the fast path transmits into needs an XDP program, or veth drops the
    /// frames. Not listed in [`FastPath::attached`]; detached on drop like the rest.
    pub fn attach_pass(&mut self, interface: &str) -> Result<(), FastPathError> {
        let index = ifindex(interface)?;
        let lock = lock_interface(interface, index)?;
        if lock.is_some() {
            replace_stale_xdp(interface, index)?;
        }
        self.locks.extend(lock);
        xdp_program(&mut self.ebpf, XDP_PASS_PROGRAM)?
            .attach(interface, XdpMode::Driver)
            .map_err(|source| match source {
                ProgramError::UnknownInterface { name } => FastPathError::UnknownInterface(name),
                source => FastPathError::Attach {
                    interface: interface.to_owned(),
                    mode: AttachMode::XdpNative,
                    hint: "is another XDP program attached to this interface?",
                    source,
                },
            })?;
        Ok(())
    }

    /// Interfaces the forwarding program is attached to, with their mode.
    pub fn attached(&self) -> &[(String, AttachMode)] {
        &self.attached
    }

    /// Interface indices of [`FastPath::attached`]: the only interfaces the program sends out of.
    pub fn attached_ifindexes(&self) -> &[u32] {
        &self.attached_ifindexes
    }

    /// Installs both directions of a channel binding (or refreshes them: same key, new value),
    /// and creates the allocation's counters if they do not exist yet. `hops` names the next
    /// hops of its client and peer addresses (written with [`FastPath::set_next_hop`] first)
    /// and whether the peer is another allocation of this relay.
    ///
    /// Client and listener share a family, and so do relayed address and peer; between the
    /// two sides the kernel translates IPv4 ↔ IPv6.
    pub fn install_channel(
        &mut self,
        binding: &ChannelBinding,
        hops: BindingHops,
    ) -> Result<(), FastPathError> {
        let (channel_key, to_peer, peer_key, to_client) = binding::entries(binding, hops)?;
        let expires_at_ns = monotonic_ns(binding.expires_at);
        let mut to_peer = ToPeer {
            expires_at_ns,
            ..to_peer
        };
        to_peer.digest = entry_digest(&channel_key, &to_peer, &self.digest_key);
        let mut to_client = ToClient {
            expires_at_ns,
            ..to_client
        };
        to_client.digest = entry_digest(&peer_key, &to_client, &self.digest_key);

        // The kernel reads client ChannelData only on listener ports; listeners never change
        // while the relay runs, so a port stays registered once seen.
        self.add_listener_port(binding.listener.port())?;

        // Peer → client first: a client's ChannelData is then never forwarded to a peer whose
        // answers the kernel could not bring back.
        self.peer_map()?
            .insert(peer_key, to_client, 0)
            .map_err(map_error(PEERS_MAP))?;
        let inserted = self.channel_map()?.insert(channel_key, to_peer, 0);
        if let Err(source) = inserted {
            // Never leave half a binding behind (e.g. CHANNELS full while PEERS had room).
            let _ = self.peer_map()?.remove(&peer_key);
            return Err(map_error(CHANNELS_MAP)(source));
        }
        Ok(())
    }

    /// Installs (or refreshes) a permission, and its allocation's client entry, so the kernel
    /// forwards Send indications to the peer IP and the peer's datagrams without a channel as
    /// Data indications. `hops` names the client's and the peer's next hops and the counter
    /// slot (`hairpin` is not used: hairpin permissions stay on the socket path).
    pub fn install_permission(
        &mut self,
        permission: &PermissionBinding,
        hops: BindingHops,
    ) -> Result<(), FastPathError> {
        if !permission.supported() {
            return Err(FastPathError::Unsupported(
                "client and listener, relayed address and peer must each share a family",
            ));
        }
        let (client_key, mut to_relay) = permission.client_entry();
        // A dual allocation (RFC 8656 §7.2) has a relayed address of each family: keep the
        // other family's from its permissions already installed.
        {
            let clients: HashMap<&mut aya::maps::MapData, ClientKey, ToRelay> =
                typed_map(&mut self.ebpf, CLIENTS_MAP)?;
            if let Ok(existing) = clients.get(&client_key, 0) {
                for family in [FAMILY_IPV4, FAMILY_IPV6] {
                    if to_relay.relayed(family).is_none() {
                        if let Some((ip, port)) = existing.relayed(family) {
                            to_relay.set_relayed(family, *ip, port);
                        }
                    }
                }
            }
        }
        let mut value = Permission {
            expires_at_ns: monotonic_ns(permission.expires_at),
            ..permission.value(hops)
        };
        value.digest = entry_digest(&permission.key(), &value, &self.digest_key);
        to_relay.digest = entry_digest(&client_key, &to_relay, &self.digest_key);
        let mut permissions: HashMap<&mut aya::maps::MapData, PermissionKey, Permission> =
            typed_map(&mut self.ebpf, PERMISSIONS_MAP)?;
        permissions
            .insert(permission.key(), value, 0)
            .map_err(map_error(PERMISSIONS_MAP))?;
        // The Send indication listener port, as for channels.
        self.add_listener_port(permission.listener.port())?;
        let mut clients: HashMap<&mut aya::maps::MapData, ClientKey, ToRelay> =
            typed_map(&mut self.ebpf, CLIENTS_MAP)?;
        let inserted = clients.insert(client_key, to_relay, 0);
        if let Err(source) = inserted {
            let mut permissions: HashMap<&mut aya::maps::MapData, PermissionKey, Permission> =
                typed_map(&mut self.ebpf, PERMISSIONS_MAP)?;
            let _ = permissions.remove(&permission.key());
            return Err(map_error(CLIENTS_MAP)(source));
        }
        Ok(())
    }

    /// Removes a permission (missing is fine). The client entry stays (see
    /// [`FastPath::remove_client`]).
    pub fn remove_permission(
        &mut self,
        permission: &PermissionBinding,
    ) -> Result<(), FastPathError> {
        let mut permissions: HashMap<&mut aya::maps::MapData, PermissionKey, Permission> =
            typed_map(&mut self.ebpf, PERMISSIONS_MAP)?;
        let removed = permissions.remove(&permission.key());
        ignore_missing(removed).map_err(map_error(PERMISSIONS_MAP))
    }

    /// Removes an allocation's client entry (missing is fine).
    pub fn remove_client(&mut self, permission: &PermissionBinding) -> Result<(), FastPathError> {
        let (client_key, _) = permission.client_entry();
        let mut clients: HashMap<&mut aya::maps::MapData, ClientKey, ToRelay> =
            typed_map(&mut self.ebpf, CLIENTS_MAP)?;
        let removed = clients.remove(&client_key);
        ignore_missing(removed).map_err(map_error(CLIENTS_MAP))
    }

    /// Marks `port` as a listener port in the kernel's bitmap.
    fn add_listener_port(&mut self, port: u16) -> Result<(), FastPathError> {
        let mut listener_ports: Array<&mut aya::maps::MapData, u64> =
            typed_map(&mut self.ebpf, LISTENER_PORTS_MAP)?;
        let index = u32::from(port >> 6);
        let word = listener_ports
            .get(&index, 0)
            .map_err(map_error(LISTENER_PORTS_MAP))?;
        let bit = 1u64 << (port & 63);
        if word & bit == 0 {
            listener_ports
                .set(index, word | bit, 0)
                .map_err(map_error(LISTENER_PORTS_MAP))?;
        }
        Ok(())
    }

    /// Fault injection for tests: puts both entries of `from`, as installed (key tags
    /// included), under the keys of `to`, as a program would find them if it held a pointer to
    /// an element that a concurrent update recycled for another key. Both must be installed.
    #[doc(hidden)]
    pub fn file_entries_under_other_keys(
        &mut self,
        from: &ChannelBinding,
        to: &ChannelBinding,
    ) -> Result<(), FastPathError> {
        let (from_channel, _, from_peer, _) = binding::entries(from, BindingHops::default())?;
        let (to_channel, _, to_peer, _) = binding::entries(to, BindingHops::default())?;
        let to_peer_value = self
            .channel_map()?
            .get(&from_channel, 0)
            .map_err(map_error(CHANNELS_MAP))?;
        self.channel_map()?
            .insert(to_channel, to_peer_value, 0)
            .map_err(map_error(CHANNELS_MAP))?;
        let to_client_value = self
            .peer_map()?
            .get(&from_peer, 0)
            .map_err(map_error(PEERS_MAP))?;
        self.peer_map()?
            .insert(to_peer, to_client_value, 0)
            .map_err(map_error(PEERS_MAP))
    }

    /// Removes both directions of a channel binding. Entries that are already gone are not an
    /// error. The allocation's counter slot is untouched.
    pub fn remove_channel(&mut self, binding: &ChannelBinding) -> Result<(), FastPathError> {
        let (channel_key, _, peer_key, _) = binding::entries(binding, BindingHops::default())?;
        let removed = self.channel_map()?.remove(&channel_key);
        ignore_missing(removed).map_err(map_error(CHANNELS_MAP))?;
        let removed = self.peer_map()?.remove(&peer_key);
        ignore_missing(removed).map_err(map_error(PEERS_MAP))
    }

    /// Packets and bytes the kernel counted in counter slot `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<AllocationCounters, FastPathError> {
        let map = self
            .ebpf
            .map(ALLOCATION_COUNTERS_MAP)
            .ok_or(FastPathError::MissingMap(ALLOCATION_COUNTERS_MAP))?;
        let counters = PerCpuArray::<_, AllocationCounters>::try_from(map)
            .map_err(map_error(ALLOCATION_COUNTERS_MAP))?;
        slot_counters(&counters, slot)
    }

    /// A handle on the counter map of its own (a duplicated map fd), so counters can be read
    /// by whoever holds it without borrowing this `FastPath` (nor the lock around it).
    pub fn counter_reader(&self) -> Result<CounterReader, FastPathError> {
        let map = self
            .ebpf
            .map(ALLOCATION_COUNTERS_MAP)
            .ok_or(FastPathError::MissingMap(ALLOCATION_COUNTERS_MAP))?;
        let aya::maps::Map::PerCpuArray(data) = map else {
            return Err(FastPathError::MissingMap(ALLOCATION_COUNTERS_MAP));
        };
        let fd = std::os::fd::AsFd::as_fd(data.fd())
            .try_clone_to_owned()
            .map_err(|io_error| {
                map_error(ALLOCATION_COUNTERS_MAP)(MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error,
                }))
            })?;
        let data = aya::maps::MapData::from_fd(fd).map_err(map_error(ALLOCATION_COUNTERS_MAP))?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(map_error(ALLOCATION_COUNTERS_MAP))?;
        Ok(CounterReader { map })
    }

    /// Zeroes counter slot `slot` on every CPU (before an allocation starts using it).
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), FastPathError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| FastPathError::Cpus(e))?;
        let zero = PerCpuValues::try_from(vec![AllocationCounters::default(); cpus])
            .map_err(FastPathError::Cpus)?;
        let mut counters: PerCpuArray<&mut aya::maps::MapData, AllocationCounters> =
            typed_map(&mut self.ebpf, ALLOCATION_COUNTERS_MAP)?;
        counters
            .set(slot, zero, 0)
            .map_err(map_error(ALLOCATION_COUNTERS_MAP))
    }

    /// Instructions the verifier processed for each forwarding program (its budget is one
    /// million per program): how close the programs are to what the kernel accepts. `None`
    /// where the kernel does not report it (before 5.16).
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, Option<u32>)>, FastPathError> {
        [XDP_PROGRAM, TC_PROGRAM]
            .into_iter()
            .map(|name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(FastPathError::MissingProgram(name))?;
                let info = program
                    .info()
                    .map_err(|source| FastPathError::ProgramInfo { name, source })?;
                Ok((name, info.verified_instruction_count()))
            })
            .collect()
    }

    /// Verdict counters summed over all CPUs, in [`Reason`] order.
    pub fn verdict_counters(&self) -> Result<Vec<(Reason, u64)>, FastPathError> {
        let map = self
            .ebpf
            .map(VERDICT_COUNTERS_MAP)
            .ok_or(FastPathError::MissingMap(VERDICT_COUNTERS_MAP))?;
        let counters =
            PerCpuArray::<_, u64>::try_from(map).map_err(map_error(VERDICT_COUNTERS_MAP))?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = counters
                    .get(&reason.index(), 0)
                    .map_err(map_error(VERDICT_COUNTERS_MAP))?;
                Ok((reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Runs one frame through the forwarding program with `BPF_PROG_TEST_RUN`, as if it had
    /// arrived on `ingress_ifindex` (an interface in the calling thread's namespace). Maps and counters are the live ones. For packet fixtures and
    /// start-up self-tests; nothing is sent.
    pub fn test_run(
        &mut self,
        program: TestProgram,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRunOutput, FastPathError> {
        self.test_run_repeat(program, frame, ingress_ifindex, 1)
            .map(|(output, _)| output)
    }

    /// [`FastPath::test_run`] with the kernel running the program `repeat` times in a row on
    /// the same buffer; also returns the kernel's average time per run (which includes the
    /// test harness's own per-run overhead).
    ///
    /// The kernel does not restore the frame between runs: from the second run on, the program
    /// sees what the previous run left. Only frames the program does not change (passed ones)
    /// measure what they seem to with `repeat > 1`; time a forwarded frame with `repeat = 1`
    /// over many calls instead.
    pub fn test_run_repeat(
        &mut self,
        program: TestProgram,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(TestRunOutput, std::time::Duration), FastPathError> {
        // Room for the frame to grow (the peer → client direction adds four bytes).
        let mut out = vec![0u8; frame.len() + 256];
        let (name, result) = match program {
            TestProgram::Xdp => {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex. The kernel wants data = 0 and data_end = the frame length.
                let mut ctx = [0u8; 24];
                ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                };
                (
                    XDP_PROGRAM,
                    xdp_program(&mut self.ebpf, XDP_PROGRAM)?.test_run(opts),
                )
            }
            TestProgram::Tc => {
                // struct __sk_buff (192 bytes): ingress_ifindex at 36 and ifindex at 40 are the
                // only fields set; the kernel rejects most others when non-zero.
                let mut ctx = [0u8; 192];
                ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                ctx[40..44].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                };
                (TC_PROGRAM, tc_program(&mut self.ebpf)?.test_run(opts))
            }
        };
        let result = result.map_err(|source| FastPathError::TestRun { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok((
            TestRunOutput {
                action: result.return_value,
                frame: out,
            },
            result.duration,
        ))
    }

    fn channel_map(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, ChannelKey, ToPeer>, FastPathError> {
        typed_map(&mut self.ebpf, CHANNELS_MAP)
    }

    fn peer_map(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, PeerKey, ToClient>, FastPathError> {
        typed_map(&mut self.ebpf, PEERS_MAP)
    }

    fn egress_devices(&mut self) -> Result<DevMapHash<&mut aya::maps::MapData>, FastPathError> {
        typed_map(&mut self.ebpf, EGRESS_DEVICES_MAP)
    }
}

impl FastPathError {
    /// Whether a map refused an insert because it is full (E2BIG).
    pub fn is_map_full(&self) -> bool {
        matches!(
            self,
            FastPathError::Map {
                source: MapError::SyscallError(e),
                ..
            } if e.io_error.raw_os_error() == Some(libc::E2BIG)
        )
    }
}

/// Looks map `name` up and converts it to its typed wrapper.
fn typed_map<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, FastPathError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(FastPathError::MissingMap(name))?;
    M::try_from(map).map_err(map_error(name))
}

/// Names the map a map operation failed on.
fn map_error(name: &'static str) -> impl FnOnce(MapError) -> FastPathError {
    move |source| FastPathError::Map { name, source }
}

/// `Ok` for a successful delete and for a key that was not there.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn load_error(name: &'static str, source: ProgramError) -> FastPathError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => FastPathError::Verifier {
            name,
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => FastPathError::Load { name, source },
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, FastPathError> {
    ebpf.program_mut(name)
        .ok_or(FastPathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| FastPathError::ProgramType { name, source })
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, FastPathError> {
    ebpf.program_mut(TC_PROGRAM)
        .ok_or(FastPathError::MissingProgram(TC_PROGRAM))?
        .try_into()
        .map_err(|source| FastPathError::ProgramType {
            name: TC_PROGRAM,
            source,
        })
}

/// Whether `interface` (in the calling thread's namespace) is an Ethernet device the fast path
/// can attach to.
pub fn is_ethernet(interface: &str) -> bool {
    ifindex(interface).is_ok_and(|index| link_is_ethernet(index).unwrap_or(false))
}

/// Where the per-interface locks live (created at start, while root).
const LOCK_DIR: &str = "/run/relay";

/// Proof that no other running relay uses an interface: an exclusive `flock` on
/// `/run/relay/fastpath-<netns inode>-<ifindex>.lock`, held while this relay is attached there
/// (the kernel releases it when the process ends, however it ends).
pub(crate) struct InterfaceLock {
    _file: std::fs::File,
}

/// Takes the lock of `interface`; `Ok(None)` when no lock can be made here (the directory is
/// not writable), in which case nothing attached is ever detached.
fn lock_interface(interface: &str, ifindex: u32) -> Result<Option<InterfaceLock>, FastPathError> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let netns = match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(meta) => meta.ino(),
        Err(_) => return Ok(None),
    };
    if let Err(error) = std::fs::create_dir_all(LOCK_DIR) {
        tracing::warn!(
            "cannot create {LOCK_DIR} ({error}): stale programs on {interface} cannot be told \
             from a running relay's and are left alone"
        );
        return Ok(None);
    }
    let path = format!("{LOCK_DIR}/fastpath-{netns}-{ifindex}.lock");
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) => {
            tracing::warn!("cannot open {path} ({error}): stale programs are left alone");
            return Ok(None);
        }
    };
    // SAFETY: flock on a descriptor this function owns.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        return Err(FastPathError::InterfaceInUse {
            interface: interface.to_owned(),
            lock: path,
        });
    }
    Ok(Some(InterfaceLock { _file: file }))
}

/// Detaches a `relay_xdp` (or `relay_xdp_pass`) an earlier relay left attached to
/// `interface`; the caller holds the interface's lock, so no running relay owns it. XDP
/// attached through netlink (kernels before 5.9, or tools such as `ip link`) outlives its
/// process: after a `kill -9` or a crash it would go on forwarding with that relay's last
/// entries. The detach names the program (XDP_FLAGS_REPLACE), so a program attached meanwhile
/// stays; another tool's program is left alone (attaching then fails with a hint).
fn replace_stale_xdp(interface: &str, ifindex: u32) -> Result<(), FastPathError> {
    use std::os::fd::AsFd;
    let netlink_error = |source| FastPathError::Netlink {
        interface: interface.to_owned(),
        source,
    };
    let mut rtnl = super::netlink::Rtnl::open().map_err(netlink_error)?;
    let Some(attached) = rtnl.xdp_attachment(ifindex).map_err(netlink_error)? else {
        return Ok(());
    };
    let Some(program) = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|program| program.id() == attached.program_id)
    else {
        return Ok(());
    };
    let name = program.name_as_str().unwrap_or_default().to_owned();
    if ![XDP_PROGRAM, XDP_PASS_PROGRAM].contains(&name.as_str()) {
        return Ok(());
    }
    let Ok(fd) = program.fd() else {
        return Ok(());
    };
    match rtnl.detach_xdp(ifindex, attached, fd.as_fd()) {
        Ok(()) => {
            tracing::warn!(
                "replaced a stale {name} (program id {}) on {interface}, left attached by an \
                 earlier relay that did not exit cleanly",
                attached.program_id
            );
            Ok(())
        }
        // Held by a BPF link: its owner is alive (in another namespace's view of the lock).
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(FastPathError::AlreadyAttached {
            interface: interface.to_owned(),
            program_id: attached.program_id,
        }),
        Err(source) => Err(netlink_error(source)),
    }
}

/// Whether link `ifindex` has an Ethernet (MAC) address, asked over rtnetlink.
fn link_is_ethernet(ifindex: u32) -> std::io::Result<bool> {
    let link = super::netlink::Rtnl::open()?.link(ifindex)?;
    Ok(link.is_some_and(|link| link.mac.is_some()))
}

/// The ifindex of `interface` in the calling thread's network namespace.
fn ifindex(interface: &str) -> Result<u32, FastPathError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| FastPathError::UnknownInterface(interface.to_owned()))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(FastPathError::UnknownInterface(interface.to_owned()));
    }
    Ok(index)
}

/// `deadline` on the kernel's clock: CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_ns` reads.
///
/// Rust's `Instant` is CLOCK_MONOTONIC on Linux but opaque, so the conversion goes through
/// "now" on both clocks; the two reads are microseconds apart, negligible against binding
/// lifetimes of minutes.
pub(crate) fn monotonic_ns(deadline: Instant) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the struct we pass by pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let instant_now = Instant::now();
    match deadline.checked_duration_since(instant_now) {
        Some(ahead) => now_ns.saturating_add(ahead.as_nanos().min(u64::MAX as u128) as u64),
        None => now_ns.saturating_sub(instant_now.duration_since(deadline).as_nanos() as u64),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass by reference; failure is harmless here
    // (the load error that follows, if any, names the real problem).
    let result = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if result != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn deadlines_land_on_the_monotonic_clock() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as in `monotonic_ns`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let before = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let in_a_minute = monotonic_ns(Instant::now() + Duration::from_secs(60));
        let ago = monotonic_ns(Instant::now() - Duration::from_millis(1));
        let ahead = in_a_minute - before;
        assert!(
            (59_900_000_000..60_100_000_000).contains(&ahead),
            "{ahead} ns ahead"
        );
        assert!(
            ago <= before + 1_000_000,
            "a past deadline stays in the past"
        );
    }
}
