//! Map definitions. Names and layouts come from `relay_common`; the `#[map]` macro needs the
//! name as a literal, so each one repeats the constant it matches.

//!
//! Capacities are defaults: userspace resizes the binding, counter and next-hop maps before
//! it loads the object (`--kernel-bindings`).

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, DevMapHash, HashMap, LpmTrie, PerCpuArray},
};
use relay_common::{
    entry_digest, AllocationCounters, ChannelKey, ClientKey, Digested, EntryDigestKey, MapKey,
    NextHop, PeerKey, Permission, PermissionKey, PolicyVerdict, Reason, ToClient, ToPeer, ToRelay,
    FAMILY_IPV4, LISTENER_PORT_WORDS, MAX_ALLOCATIONS, MAX_CHANNEL_BINDINGS, MAX_EGRESS_DEVICES,
    MAX_NEXT_HOPS, MAX_PERMISSIONS, MAX_POLICY_PREFIXES, POLICY_ALLOW, POLICY_CACHE_SLOTS,
};

/// Client → peer: which peer a client's channel goes to (`relay_common::CHANNELS_MAP`).
#[map(name = "CHANNELS")]
pub static CHANNELS: HashMap<ChannelKey, ToPeer> =
    HashMap::with_max_entries(MAX_CHANNEL_BINDINGS, 0);

/// Peer → client: which client (and channel) a peer's datagrams go to
/// (`relay_common::PEERS_MAP`).
#[map(name = "PEERS")]
pub static PEERS: HashMap<PeerKey, ToClient> = HashMap::with_max_entries(MAX_CHANNEL_BINDINGS, 0);

/// Clients' 5-tuples → their allocation, for Send indications (`relay_common::CLIENTS_MAP`).
#[map(name = "CLIENTS")]
pub static CLIENTS: HashMap<ClientKey, ToRelay> = HashMap::with_max_entries(MAX_ALLOCATIONS, 0);

/// Permissions (`relay_common::PERMISSIONS_MAP`).
#[map(name = "PERMISSIONS")]
pub static PERMISSIONS: HashMap<PermissionKey, Permission> =
    HashMap::with_max_entries(MAX_PERMISSIONS, 0);

/// Per-allocation packets and bytes per direction by counter slot, per CPU so no atomics are
/// needed
/// (`relay_common::ALLOCATION_COUNTERS_MAP`).
#[map(name = "ALLOCATION_COUNTERS")]
pub static ALLOCATION_COUNTERS: PerCpuArray<AllocationCounters> =
    PerCpuArray::with_max_entries(MAX_ALLOCATIONS, 0);

/// Listener ports as a bitmap (`relay_common::LISTENER_PORTS_MAP`): datagrams to them may be
/// client ChannelData.
#[map(name = "LISTENER_PORTS")]
pub static LISTENER_PORTS: Array<u64> = Array::with_max_entries(LISTENER_PORT_WORDS, 0);

/// Whether `port` (network-order field) is a listener port.
#[inline(always)]
pub fn is_listener_port(port: u16) -> bool {
    let port = u16::from_be(port);
    match LISTENER_PORTS.get(u32::from(port >> 6)) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => false,
    }
}

/// Interfaces the program is attached to, keyed by ifindex: the only ones it redirects into
/// (`relay_common::EGRESS_DEVICES_MAP`).
#[map(name = "EGRESS_DEVICES")]
pub static EGRESS_DEVICES: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_DEVICES, 0);

/// Next hops by index: egress interface, MACs and MTU per destination address, resolved and
/// kept current by userspace (`relay_common::NEXT_HOPS_MAP`).
#[map(name = "NEXT_HOPS")]
pub static NEXT_HOPS: Array<NextHop> = Array::with_max_entries(MAX_NEXT_HOPS, 0);

/// The IPv4 peer policy as prefixes (`relay_common::PEER_POLICY_V4_MAP`): the longest match
/// decides.
#[map(name = "PEER_POLICY_V4")]
pub static PEER_POLICY_V4: LpmTrie<u32, u32> = LpmTrie::with_max_entries(MAX_POLICY_PREFIXES, 0);

/// The IPv6 peer policy (`relay_common::PEER_POLICY_V6_MAP`).
#[map(name = "PEER_POLICY_V6")]
pub static PEER_POLICY_V6: LpmTrie<[u32; 4], u32> =
    LpmTrie::with_max_entries(MAX_POLICY_PREFIXES, 0);

/// Whether the kernel copy of the peer policy allows sending to `ip` (a map field of
/// `family`). No matching prefix means denied: userspace installs `/0` entries for both
/// families, so an empty trie (or one being rebuilt) fails closed.
#[inline(always)]
pub fn peer_allowed(family: u8, ip: &[u32; 4]) -> bool {
    let verdict = if family == FAMILY_IPV4 {
        PEER_POLICY_V4.get(Key::new(32, ip[0]))
    } else {
        PEER_POLICY_V6.get(Key::new(128, *ip))
    };
    matches!(verdict, Some(&POLICY_ALLOW))
}

/// Verdicts of the policy tries per peer address, per CPU (`relay_common::POLICY_CACHE_MAP`).
#[map(name = "POLICY_CACHE")]
static POLICY_CACHE: PerCpuArray<PolicyVerdict> =
    PerCpuArray::with_max_entries(POLICY_CACHE_SLOTS, 0);

/// The policy generation (`relay_common::POLICY_GENERATION_MAP`).
#[map(name = "POLICY_GENERATION")]
static POLICY_GENERATION: Array<u32> = Array::with_max_entries(1, 0);

/// [`peer_allowed`], memoized per CPU in the cache slot of next hop `next_hop` (the peer's
/// own next hop, so distinct peers rarely share a slot). A cached verdict counts only for the
/// same family, address and policy generation; anything else asks the tries again.
#[inline(always)]
pub fn peer_allowed_cached(family: u8, ip: &[u32; 4], next_hop: u16) -> bool {
    let Some(generation) = POLICY_GENERATION.get(0).copied() else {
        return peer_allowed(family, ip);
    };
    let slot = u32::from(next_hop) & (POLICY_CACHE_SLOTS - 1);
    let Some(cached) = POLICY_CACHE.get_ptr_mut(slot) else {
        return peer_allowed(family, ip);
    };
    // SAFETY: a successful per-CPU array lookup points at this CPU's copy, which nothing
    // else touches while this program runs (no preemption in XDP and TC).
    let cached = unsafe { &mut *cached };
    if cached.generation == generation && cached.family == u16::from(family) && cached.ip == *ip {
        return cached.verdict == 1;
    }
    let allowed = peer_allowed(family, ip);
    cached.generation = generation;
    cached.family = u16::from(family);
    cached.ip = *ip;
    cached.verdict = u16::from(allowed);
    allowed
}

/// A copy of the next hop at `index` (this CPU's scratch slot), if the index is inside the
/// map. Userspace rewrites a slot in place when a neighbour or route changes: the frame is
/// built from one snapshot, read once before the rewrite (a MAC changing mid-copy can still
/// give one frame a mixed address, which the wire drops; the next one is whole).
#[inline(always)]
pub fn next_hop(index: u16) -> Option<&'static NextHop> {
    let hop = NEXT_HOPS.get_ptr(u32::from(index))?;
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: both pointers come from successful array lookups (valid, aligned, alive for the
    // program run); the scratch slot is this CPU's, untouched by anything else meanwhile.
    unsafe {
        let slot = core::ptr::addr_of_mut!((*scratch).next_hop);
        const { assert!(core::mem::size_of::<NextHop>().is_multiple_of(4)) };
        let (from, to) = (hop.cast::<u32>(), slot.cast::<u32>());
        let mut i = 0;
        while i < core::mem::size_of::<NextHop>() / 4 {
            to.add(i).write(from.add(i).read_volatile());
            i += 1;
        }
        Some(&*slot)
    }
}

/// Adds one datagram of `bytes` application bytes to counter slot `slot` on this CPU.
///
/// Userspace assigns each allocation with kernel bindings a slot and zeroes it before the
/// first binding refers to it.
#[inline(always)]
pub fn count_allocation(slot: u32, to_peer: bool, bytes: u64) {
    if let Some(counters) = ALLOCATION_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array: it points at
        // this CPU's copy, which nothing else writes while this program runs (no preemption).
        let counters = unsafe { &mut *counters };
        if to_peer {
            counters.to_peer_packets += 1;
            counters.to_peer_bytes += bytes;
        } else {
            counters.to_client_packets += 1;
            counters.to_client_bytes += bytes;
        }
    }
}

/// This CPU's copies of the entries one packet uses: each lookup copies its value here once
/// (see [`lookup`]), so nothing the program reads can change under it. One slot per value
/// type; no path uses two entries of one type.
#[repr(C)]
pub struct Scratch {
    to_peer: ToPeer,
    to_client: ToClient,
    permission: Permission,
    to_relay: ToRelay,
    next_hop: NextHop,
}

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// A value of a hash map and its slot in [`Scratch`].
pub trait Scratched: Digested {
    fn slot(scratch: &mut Scratch) -> &mut Self;
}

macro_rules! scratched {
    ($value:ty, $slot:ident) => {
        impl Scratched for $value {
            #[inline(always)]
            fn slot(scratch: &mut Scratch) -> &mut Self {
                &mut scratch.$slot
            }
        }
    };
}
scratched!(ToPeer, to_peer);
scratched!(ToClient, to_client);
scratched!(Permission, permission);
scratched!(ToRelay, to_relay);

/// The multipliers of `relay_common::entry_digest` (`relay_common::ENTRY_DIGEST_KEY_MAP`),
/// drawn by userspace at load.
#[map(name = "ENTRY_DIGEST_KEY")]
static ENTRY_DIGEST_KEY: Array<EntryDigestKey> = Array::with_max_entries(1, 0);

/// Looks `key` up in `map` and returns a copy of its value that cannot change while the
/// program runs, or [`Reason::PassEntryChanged`] when the copy is not one whole entry of this
/// key.
///
/// Preallocated hash maps hand a replaced or deleted element back to their free list at once,
/// and an update on another CPU may refill it, for another key and in any byte order, while
/// this program still reads it: reading fields one by one could mix two bindings (send one
/// client's data to another's peer). The value is copied once, and the copy's digest (keyed
/// by random multipliers) must match this key and the copied value.
#[inline(always)]
pub fn lookup<K: MapKey, V: Scratched>(
    map: &HashMap<K, V>,
    key: &K,
) -> Result<Option<&'static V>, Reason> {
    let Some(found) = map.get_ptr(key) else {
        return Ok(None);
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(Reason::PassEntryChanged);
    };
    // SAFETY: a successful per-CPU array lookup points at this CPU's copy, which nothing else
    // touches while this program runs (no preemption in XDP and TC); it lives as long as the
    // map, i.e. the whole program run.
    let slot: &'static mut V = V::slot(unsafe { &mut *scratch });
    // SAFETY: a successful hash map lookup returns a pointer to a value of the map's value
    // size, readable for the whole program run (preallocated elements are never freed, only
    // reused, which the digest check detects); the slot is a `V` as well.
    unsafe {
        const { assert!(core::mem::size_of::<V>().is_multiple_of(4)) };
        let words = core::mem::size_of::<V>() / 4;
        let (from, to) = (found.cast::<u32>(), (slot as *mut V).cast::<u32>());
        let mut i = 0;
        while i < words {
            to.add(i).write(from.add(i).read_volatile());
            i += 1;
        }
    }
    if !digest_matches(key, slot) {
        return Err(Reason::PassEntryChanged);
    }
    Ok(Some(slot))
}

/// Whether `copy` is one whole entry of `key`. A subprogram of its own: inlined into the
/// entry point, the unrolled hash would cost stack the deepest call chain lacks.
#[inline(never)]
fn digest_matches<K: MapKey, V: Digested>(key: &K, copy: &V) -> bool {
    match ENTRY_DIGEST_KEY.get(0) {
        Some(digest_key) => entry_digest(key, copy, digest_key) == copy.digest(),
        None => false,
    }
}
