//! The map ABI shared by `relay-ebpf` (kernel) and `relay-user` (userspace).
//!
//! Everything here is defined exactly once: program and map names, key/value layouts, limits and
//! the verdict reasons that are both the per-CPU counter index and the Prometheus label.
//! Layouts are `#[repr(C)]` and padding-free (sizes asserted at compile time, no `bool`);
//! fields that come straight from packets (addresses, ports, channel numbers) are kept in
//! network byte order, so the kernel copies them without swapping.
//!
//! Network-order fields are typed like the kernel's `__be32`/`__be16`: the packet's bytes, in
//! packet order, read as a native integer ([`ip_field`], [`port_field`] convert). Addresses are
//! four such words for both families (`in6_u.u6_addr32`): an IPv4 address is the first word and
//! the other three are zero; `family` in the key says which one it is. Word-sized fields let the
//! kernel program load and checksum them a word at a time, and one layout for both families
//! leaves room for translating between them.
#![no_std]

/// Name of the XDP entry point that forwards ChannelData in the kernel.
pub const XDP_PROGRAM: &str = "relay_xdp";
/// Name of the XDP program that passes every frame. It goes on the far end of a veth that the
/// fast path transmits into: veth delivers XDP_TX/redirected frames only to a peer that runs XDP.
pub const XDP_PASS_PROGRAM: &str = "relay_xdp_pass";
/// Name of the TC (clsact ingress) entry point with the same forwarding logic as [`XDP_PROGRAM`].
pub const TC_PROGRAM: &str = "relay_tc";

/// Name of the per-CPU array that counts verdicts, indexed by [`Reason`].
pub const VERDICT_COUNTERS_MAP: &str = "VERDICT_COUNTERS";
/// Name of the hash map client → peer: [`ChannelKey`] → [`ToPeer`].
pub const CHANNELS_MAP: &str = "CHANNELS";
/// Name of the hash map peer → client: [`PeerKey`] → [`ToClient`].
pub const PEERS_MAP: &str = "PEERS";
/// Name of the hash map client → allocation for Send indications: [`ClientKey`] → [`ToRelay`].
pub const CLIENTS_MAP: &str = "CLIENTS";
/// Name of the hash map of permissions (RFC 8656 §9): [`PermissionKey`] → [`Permission`]. A
/// client's Send indication to a peer IP with a permission, and a peer's datagram without a
/// channel, are forwarded in the kernel (as UDP, as a Data indication).
pub const PERMISSIONS_MAP: &str = "PERMISSIONS";
/// Name of the per-CPU array of per-allocation counters: counter slot (`u32`, assigned by
/// userspace to each allocation with kernel bindings) → [`AllocationCounters`]. An array, not a
/// hash: the program indexes it on every forwarded packet.
pub const ALLOCATION_COUNTERS_MAP: &str = "ALLOCATION_COUNTERS";
/// Name of the DEVMAP_HASH (ifindex → ifindex) of interfaces the fast path may send out of.
pub const EGRESS_DEVICES_MAP: &str = "EGRESS_DEVICES";
/// Name of the bitmap of listener UDP ports: an array of [`LISTENER_PORT_WORDS`] `u64` words,
/// port `p` (host order) is bit `p % 64` of word `p / 64`. Only datagrams to these ports are
/// read as client ChannelData, so a peer's payload that happens to start with bits 0b01 is
/// never taken for (or counted as malformed) ChannelData. A bitmap costs one array load per
/// datagram where a hash set costs a hash.
pub const LISTENER_PORTS_MAP: &str = "LISTENER_PORTS";
/// Name of the array of next hops (`u32` index → [`NextHop`]): where a frame for one destination
/// address leaves (interface, MACs, MTU). Userspace resolves them from the kernel's routing and
/// neighbour tables and keeps them current; the program does no FIB lookup.
pub const NEXT_HOPS_MAP: &str = "NEXT_HOPS";
/// Name of the LPM trie of the IPv4 peer policy (key: prefix length, then the address as a
/// network-order `u32`; value `u32`, [`POLICY_ALLOW`] or [`POLICY_DENY`]): the kernel checks
/// every peer it forwards to, so no map entry can send to an address userspace's policy denies.
/// One trie per family keeps IPv4 keys short (a lookup compares 32 bits, not 160).
pub const PEER_POLICY_V4_MAP: &str = "PEER_POLICY_V4";
/// Name of the LPM trie of the IPv6 peer policy (key: prefix length, then the address as a
/// map field, [`ip_field`]); values as in [`PEER_POLICY_V4_MAP`].
pub const PEER_POLICY_V6_MAP: &str = "PEER_POLICY_V6";

/// Name of the per-CPU direct-mapped cache of peer-policy verdicts ([`POLICY_CACHE_SLOTS`]
/// [`PolicyVerdict`]s, indexed by next-hop index modulo their number). The program fills it
/// from the policy tries itself; an entry counts only for its exact family, address and
/// [`POLICY_GENERATION_MAP`] generation, so it memoizes the trie and never replaces it.
pub const POLICY_CACHE_MAP: &str = "POLICY_CACHE";
/// Name of the one-entry array holding the peer policy's generation (`u32`): userspace bumps it
/// after every change of the policy tries, which invalidates every cached verdict.
pub const POLICY_GENERATION_MAP: &str = "POLICY_GENERATION";
/// Name of the one-entry array with the [`EntryDigestKey`] userspace draws at load.
pub const ENTRY_DIGEST_KEY_MAP: &str = "ENTRY_DIGEST_KEY";
/// Entries of [`POLICY_CACHE_MAP`] per CPU (a power of two).
pub const POLICY_CACHE_SLOTS: u32 = 4_096;

/// Default capacity of [`CHANNELS_MAP`] and [`PEERS_MAP`] (each binding takes one entry in
/// both). Userspace sizes them at load time (`--kernel-bindings`).
pub const MAX_CHANNEL_BINDINGS: u32 = 16_384;
/// Default capacity of [`PERMISSIONS_MAP`].
pub const MAX_PERMISSIONS: u32 = 16_384;
/// Default capacity of [`ALLOCATION_COUNTERS_MAP`] (counter slots).
pub const MAX_ALLOCATIONS: u32 = 16_384;
/// Default capacity of [`NEXT_HOPS_MAP`]: one next hop per destination address in use (each
/// binding has a client and a peer address).
pub const MAX_NEXT_HOPS: u32 = 2 * MAX_CHANNEL_BINDINGS;
/// Highest capacity of [`NEXT_HOPS_MAP`]: next hop indices are `u16` in the entries.
pub const NEXT_HOPS_LIMIT: u32 = 1 << 16;
/// Interfaces in [`EGRESS_DEVICES_MAP`].
pub const MAX_EGRESS_DEVICES: u32 = 64;
/// Words in [`LISTENER_PORTS_MAP`]: one bit per UDP port.
pub const LISTENER_PORT_WORDS: u32 = 65_536 / 64;
/// Prefixes in each of [`PEER_POLICY_V4_MAP`] and [`PEER_POLICY_V6_MAP`]: the default-denied ranges, the operator's allow and deny
/// lists and every address of the host.
pub const MAX_POLICY_PREFIXES: u32 = 4_096;

/// `family` value of an IPv4 key.
pub const FAMILY_IPV4: u8 = 4;
/// `family` value of an IPv6 key.
pub const FAMILY_IPV6: u8 = 6;

/// Entry flag: the kernel may forward with this entry. Without it the entry only documents a
/// binding and the kernel passes the datagram to the socket path (per-allocation "fast path off").
pub const FLAG_ENABLED: u16 = 1;
/// [`ToPeer`] flag: the peer is another allocation's relayed transport address on this relay
/// (client-to-client through the relay). The kernel never sends such a datagram out: it
/// delivers it to that allocation's client as ChannelData when that allocation has a channel
/// for the sender's relayed address, and passes it to the socket path otherwise.
pub const FLAG_HAIRPIN: u16 = 2;

/// [`ToPeer`] / [`ToClient`] / [`Permission`] flag: the entry relays between IPv4 and IPv6
/// (RFC 8656 §7.2, RFC 6156): the client side and the peer side are of different families,
/// and the program rewrites the IP header into the other family.
pub const FLAG_TRANSLATE: u16 = 4;

/// [`NextHop::flags`]: the next hop is resolved (route, link up, neighbour MAC known, egress
/// attached). Without it the program passes the frame to the socket path, whose own traffic
/// resolves the neighbour.
pub const NEXT_HOP_VALID: u16 = 1;

/// [`PEER_POLICY_MAP`] value: forwarding to addresses under this prefix is allowed.
pub const POLICY_ALLOW: u32 = 1;
/// [`PEER_POLICY_MAP`] value: forwarding to addresses under this prefix is denied.
pub const POLICY_DENY: u32 = 0;

/// Lowest channel number (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// Highest channel number the kernel forwards: RFC 5766's 0x7fff, because the relay can be
/// told to accept RFC 5766 clients (`--legacy-channels`). Which channels exist is decided by
/// userspace, which installs only bindings the protocol core accepted (by default
/// 0x4000..=0x4fff, RFC 8656 §12).
pub const CHANNEL_MAX: u16 = 0x7fff;
/// Size of the ChannelData header: channel number and length (RFC 8656 §12.4).
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;

/// TTL / hop limit of everything the kernel path sends: the relay originates these datagrams
/// (RFC 8656 §14.3 alternate behaviour), exactly as its sockets do (Linux's default 64).
pub const FORWARD_TTL: u8 = 64;

/// Key of [`CHANNELS_MAP`]: one ChannelData flow from a client to a listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// Client transport address (network order).
    pub client_ip: [u32; 4],
    /// Local address the client sent to: the listener's address, or for a wildcard listener
    /// the address the client actually contacted (RFC 8656 §2 5-tuple).
    pub listener_ip: [u32; 4],
    pub client_port: u16,
    pub listener_port: u16,
    /// Channel number, network order, 0x4000..=0x7fff.
    pub channel: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Always zero (keys are compared byte-wise).
    pub reserved: u8,
}

/// A key of one of the hash maps: plain words, no padding (asserted below), so it can be read
/// as `u32`s.
pub trait MapKey: Copy {}
impl MapKey for ChannelKey {}
impl MapKey for PeerKey {}
impl MapKey for ClientKey {}
impl MapKey for PermissionKey {}

/// A value of one of the hash maps: plain words, no padding, with a [`entry_digest`] in the
/// 32-bit word at [`Digested::DIGEST_WORD`].
pub trait Digested: Copy {
    /// Index of the digest among the value's 32-bit words.
    const DIGEST_WORD: usize;
    fn digest(&self) -> u32;
}

macro_rules! digested {
    ($value:ty) => {
        impl Digested for $value {
            const DIGEST_WORD: usize = core::mem::offset_of!($value, digest) / 4;
            #[inline(always)]
            fn digest(&self) -> u32 {
                self.digest
            }
        }
    };
}
digested!(ToPeer);
digested!(ToClient);
digested!(Permission);
digested!(ToRelay);

/// Most 32-bit words [`entry_digest`] covers: the longest key and the longest value.
pub const DIGEST_WORDS: usize = 10 + 16;

/// The random multipliers of [`entry_digest`], drawn by userspace when it loads the programs
/// and written to [`ENTRY_DIGEST_KEY_MAP`]: without them nobody can aim at a collision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryDigestKey {
    pub seed: u64,
    pub multipliers: [u64; DIGEST_WORDS],
}

impl Default for EntryDigestKey {
    fn default() -> Self {
        Self {
            seed: 0,
            multipliers: [0; DIGEST_WORDS],
        }
    }
}

/// A 32-bit digest of a map entry (key, and value without its digest word): multiply-shift
/// hashing of 32-bit words with random 64-bit multipliers (strongly universal, Dietzfelbinger;
/// Thorup), so two different entries collide with probability about 2^-32.
///
/// Userspace stores it in every value. Preallocated hash maps hand a replaced or deleted
/// element back to their free list at once, and a concurrent update (another CPU) may refill
/// it for another key, in no particular order, while a program still reads it. The program
/// copies the value once and checks the copy's digest against its key: a copy that mixes two
/// entries, or belongs to another key, fails (passed to the socket path,
/// [`Reason::PassEntryChanged`]).
#[inline(always)]
pub fn entry_digest<K: MapKey, V: Digested>(
    key: &K,
    value: &V,
    digest_key: &EntryDigestKey,
) -> u32 {
    const { assert!(core::mem::size_of::<K>() / 4 + core::mem::size_of::<V>() / 4 <= DIGEST_WORDS) };
    let mut hash = digest_key.seed;
    let key_words = core::mem::size_of::<K>() / 4;
    let key_base = (key as *const K).cast::<u32>();
    let mut i = 0;
    while i < key_words {
        // SAFETY: `MapKey` types are padding-free `repr(C)` structs of 4-byte-aligned fields
        // whose size is a multiple of 4; `i` stays below the word count.
        let word = unsafe { key_base.add(i).read() };
        hash = hash.wrapping_add(u64::from(word).wrapping_mul(digest_key.multipliers[i]));
        i += 1;
    }
    let value_words = core::mem::size_of::<V>() / 4;
    let value_base = (value as *const V).cast::<u32>();
    let mut j = 0;
    while j < value_words {
        if j != V::DIGEST_WORD {
            // SAFETY: as above, for `Digested` values.
            let word = unsafe { value_base.add(j).read() };
            hash = hash
                .wrapping_add(u64::from(word).wrapping_mul(digest_key.multipliers[key_words + j]));
        }
        j += 1;
    }
    (hash >> 32) as u32
}

/// Value of [`CHANNELS_MAP`]: where a client's channel goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToPeer {
    /// The allocation's counter slot in [`ALLOCATION_COUNTERS_MAP`].
    pub counters: u32,
    /// [`FLAG_ENABLED`], [`FLAG_HAIRPIN`], [`FLAG_TRANSLATE`].
    pub flags: u16,
    /// Index of the peer's [`NextHop`] in [`NEXT_HOPS_MAP`].
    pub next_hop: u16,
    /// CLOCK_MONOTONIC deadline in ns (`bpf_ktime_get_ns`): no forwarding at or after it.
    pub expires_at_ns: u64,
    /// Relayed transport address the datagram leaves from (the key's family, or the other
    /// one with [`FLAG_TRANSLATE`]).
    pub relayed_ip: [u32; 4],
    /// Peer the datagram goes to.
    pub peer_ip: [u32; 4],
    pub relayed_port: u16,
    pub peer_port: u16,
    /// [`entry_digest`] of this entry.
    pub digest: u32,
}

/// Key of [`PEERS_MAP`]: datagrams from one peer to one relayed transport address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub peer_ip: [u32; 4],
    pub relayed_ip: [u32; 4],
    pub peer_port: u16,
    pub relayed_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Always zero (keys are compared byte-wise).
    pub reserved: [u8; 3],
}

/// Value of [`PEERS_MAP`]: the client (and channel) a peer's datagrams go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToClient {
    /// The allocation's counter slot in [`ALLOCATION_COUNTERS_MAP`].
    pub counters: u32,
    /// [`FLAG_ENABLED`], [`FLAG_TRANSLATE`].
    pub flags: u16,
    /// Index of the client's [`NextHop`] in [`NEXT_HOPS_MAP`].
    pub next_hop: u16,
    /// CLOCK_MONOTONIC deadline in ns (`bpf_ktime_get_ns`): no forwarding at or after it.
    pub expires_at_ns: u64,
    /// Local address the datagram leaves from: the one the client contacted.
    pub listener_ip: [u32; 4],
    /// Client transport address the datagram goes to.
    pub client_ip: [u32; 4],
    pub listener_port: u16,
    pub client_port: u16,
    /// Channel number written into the ChannelData header, network order.
    pub channel: u16,
    /// Always zero.
    pub reserved: u16,
    /// [`entry_digest`] of this entry.
    pub digest: u32,
    /// Always zero.
    pub reserved2: u32,
}

/// Key of [`CLIENTS_MAP`]: a client's 5-tuple (RFC 8656 §2) on a listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub client_ip: [u32; 4],
    /// The local address the client contacted.
    pub listener_ip: [u32; 4],
    pub client_port: u16,
    pub listener_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Always zero (keys are compared byte-wise).
    pub reserved: [u8; 3],
}

/// Value of [`CLIENTS_MAP`]: the allocation of a client, with its relayed transport address of
/// each family (RFC 8656 §7.2: one of either, or both with ADDITIONAL-ADDRESS-FAMILY). A Send
/// indication leaves from the one of its peer's family, whatever the client's family is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToRelay {
    /// [`FLAG_ENABLED`].
    pub flags: u16,
    /// The IPv4 relayed port, 0 without an IPv4 relayed address.
    pub relayed_v4_port: u16,
    /// The IPv6 relayed port, 0 without an IPv6 relayed address.
    pub relayed_v6_port: u16,
    /// Always zero.
    pub reserved: u16,
    /// The IPv4 relayed address (first word; the rest zero, as in keys).
    pub relayed_v4_ip: [u32; 4],
    pub relayed_v6_ip: [u32; 4],
    /// [`entry_digest`] of this entry.
    pub digest: u32,
}

impl ToRelay {
    /// The relayed address of a family as map fields, if the allocation has one.
    #[inline(always)]
    pub fn relayed(&self, family: u8) -> Option<(&[u32; 4], u16)> {
        let (ip, port) = if family == FAMILY_IPV6 {
            (&self.relayed_v6_ip, self.relayed_v6_port)
        } else {
            (&self.relayed_v4_ip, self.relayed_v4_port)
        };
        (port != 0).then_some((ip, port))
    }

    /// Sets the relayed address of a family (map fields).
    pub fn set_relayed(&mut self, family: u8, ip: [u32; 4], port: u16) {
        if family == FAMILY_IPV6 {
            (self.relayed_v6_ip, self.relayed_v6_port) = (ip, port);
        } else {
            (self.relayed_v4_ip, self.relayed_v4_port) = (ip, port);
        }
    }
}

/// Key of [`PERMISSIONS_MAP`]: one allocation (by its relayed transport address) and one peer
/// IP address (permissions are per IP, RFC 8656 §9).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PermissionKey {
    pub relayed_ip: [u32; 4],
    pub peer_ip: [u32; 4],
    pub relayed_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
    /// Always zero (keys are compared byte-wise).
    pub reserved: u8,
}

/// Value of [`PERMISSIONS_MAP`]: where the allocation's client is, and how to reach both ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Permission {
    /// The allocation's counter slot in [`ALLOCATION_COUNTERS_MAP`].
    pub counters: u32,
    /// [`FLAG_ENABLED`], [`FLAG_TRANSLATE`] when the client is of the other family than the
    /// peer (and the relayed address, the key's family).
    pub flags: u16,
    /// Index of the client's [`NextHop`].
    pub client_hop: u16,
    /// CLOCK_MONOTONIC deadline in ns: the earlier of permission and allocation expiry.
    pub expires_at_ns: u64,
    /// Local address Data indications leave from: the one the client contacted.
    pub listener_ip: [u32; 4],
    pub client_ip: [u32; 4],
    pub listener_port: u16,
    pub client_port: u16,
    /// Index of the peer's [`NextHop`] (the peer IP's, from the relayed address).
    pub peer_hop: u16,
    /// Always zero.
    pub reserved: u16,
    /// [`entry_digest`] of this entry.
    pub digest: u32,
    /// Always zero.
    pub reserved2: u32,
}

/// Value of [`NEXT_HOPS_MAP`]: how a frame reaches one destination address, resolved by
/// userspace from the kernel's routing, neighbour and link tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// Largest IP datagram (header included) the egress route carries; longer frames go to
    /// the socket path, which fragments or reports as the stack does.
    pub mtu: u16,
    /// [`NEXT_HOP_VALID`] or 0.
    pub flags: u16,
    /// Destination MAC: the neighbour's (gateway's, or the destination's own when on-link).
    pub dmac: [u8; 6],
    /// Source MAC: the egress interface's.
    pub smac: [u8; 6],
}

impl NextHop {
    /// Whether the program may forward through this next hop ([`NEXT_HOP_VALID`]).
    pub const fn is_valid(&self) -> bool {
        self.flags & NEXT_HOP_VALID != 0
    }
}

/// Value of [`POLICY_CACHE_MAP`]: the verdict of the policy tries for one peer address under
/// one policy generation. All zero (the initial state) has family 0, which no packet has: an
/// unused entry never answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub generation: u32,
    /// 1: allowed, 0: denied.
    pub verdict: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`] (0 in an unused entry).
    pub family: u16,
    /// The peer address (map field).
    pub ip: [u32; 4],
}

/// Value of [`ALLOCATION_COUNTERS_MAP`] on one CPU. Bytes are application data: the ChannelData
/// payload without its header and padding, i.e. what the peer sends or receives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocationCounters {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

/// A 16-byte address in packet order as the four network-order words of a map field.
pub const fn ip_field(octets: [u8; 16]) -> [u32; 4] {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// An IPv4 address as a map field: its network-order word, then three zero words.
pub const fn ipv4_field(octets: [u8; 4]) -> [u32; 4] {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// The packet-order bytes of an address map field.
pub const fn ip_octets(field: [u32; 4]) -> [u8; 16] {
    let w = [
        field[0].to_ne_bytes(),
        field[1].to_ne_bytes(),
        field[2].to_ne_bytes(),
        field[3].to_ne_bytes(),
    ];
    [
        w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3], w[2][0], w[2][1],
        w[2][2], w[2][3], w[3][0], w[3][1], w[3][2], w[3][3],
    ]
}

/// A port (or channel number) as a network-order map field.
pub const fn port_field(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The host value of a network-order port (or channel) field.
pub const fn port_value(field: u16) -> u16 {
    u16::from_be_bytes(field.to_ne_bytes())
}

const _: () = assert!(core::mem::size_of::<ChannelKey>() == 40);
const _: () = assert!(core::mem::size_of::<ToPeer>() == 56);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 40);
const _: () = assert!(core::mem::size_of::<ToClient>() == 64);
const _: () = assert!(core::mem::size_of::<NextHop>() == 20);
const _: () = assert!(core::mem::size_of::<PolicyVerdict>() == 24);
const _: () = assert!(core::mem::size_of::<ClientKey>() == 40);
const _: () = assert!(core::mem::size_of::<ToRelay>() == 44);
const _: () = assert!(core::mem::size_of::<PermissionKey>() == 36);
const _: () = assert!(core::mem::size_of::<Permission>() == 64);
const _: () = assert!(POLICY_CACHE_SLOTS.is_power_of_two());
const _: () = assert!(core::mem::size_of::<PermissionKey>().is_multiple_of(4));
const _: () = assert!(core::mem::size_of::<EntryDigestKey>() == 8 * (1 + DIGEST_WORDS));
const _: () = assert!(core::mem::size_of::<ToRelay>().is_multiple_of(4));
const _: () = assert!(MAX_NEXT_HOPS <= NEXT_HOPS_LIMIT);
const _: () = assert!(core::mem::size_of::<AllocationCounters>() == 32);
// Padding-free: each size equals the sum of its fields' sizes.
const _: () = {
    use core::mem::size_of;
    const IP: usize = size_of::<[u32; 4]>();
    assert!(size_of::<ChannelKey>() == 2 * IP + 3 * size_of::<u16>() + 2 * size_of::<u8>());
    assert!(size_of::<ToPeer>() == 4 + 2 + 2 + 8 + 2 * IP + 2 * size_of::<u16>() + 4);
    assert!(size_of::<PeerKey>() == 2 * IP + 2 * size_of::<u16>() + size_of::<u8>() + 3);
    assert!(size_of::<ToClient>() == 4 + 2 + 2 + 8 + 2 * IP + 4 * size_of::<u16>() + 4 + 4);
    assert!(size_of::<NextHop>() == 4 + 2 + 2 + 6 + 6);
    assert!(size_of::<PolicyVerdict>() == 4 + 2 + 2 + IP);
    assert!(size_of::<ClientKey>() == 2 * IP + 2 * size_of::<u16>() + 4);
    assert!(size_of::<ToRelay>() == 4 * size_of::<u16>() + 2 * IP + 4);
    assert!(size_of::<PermissionKey>() == 2 * IP + size_of::<u16>() + 2);
    assert!(size_of::<Permission>() == 4 + 2 + 2 + 8 + 2 * IP + 4 * size_of::<u16>() + 4 + 4);
    assert!(size_of::<AllocationCounters>() == 4 * size_of::<u64>());
};

/// Kernel memory of one hash map element (`struct htab_elem` header, key and value rounded up
/// to 8 bytes) plus its bucket (`struct bucket`), as the kernel preallocates it (64-bit).
pub const fn hash_entry_bytes(key: usize, value: usize) -> usize {
    const HTAB_ELEM: usize = 48;
    const BUCKET: usize = 16;
    HTAB_ELEM + key.next_multiple_of(8) + value.next_multiple_of(8) + BUCKET
}

/// Kernel memory of one channel binding: its entry in [`CHANNELS_MAP`] and in [`PEERS_MAP`].
pub const CHANNEL_BINDING_BYTES: usize = hash_entry_bytes(
    core::mem::size_of::<ChannelKey>(),
    core::mem::size_of::<ToPeer>(),
) + hash_entry_bytes(
    core::mem::size_of::<PeerKey>(),
    core::mem::size_of::<ToClient>(),
);

/// Kernel memory of one permission: its [`PERMISSIONS_MAP`] entry.
pub const PERMISSION_BYTES: usize = hash_entry_bytes(
    core::mem::size_of::<PermissionKey>(),
    core::mem::size_of::<Permission>(),
);

/// Kernel memory of one allocation's [`CLIENTS_MAP`] entry.
pub const CLIENT_ENTRY_BYTES: usize = hash_entry_bytes(
    core::mem::size_of::<ClientKey>(),
    core::mem::size_of::<ToRelay>(),
);

/// Kernel memory of one [`NEXT_HOPS_MAP`] slot (array elements are rounded up to 8 bytes).
pub const NEXT_HOP_BYTES: usize = core::mem::size_of::<NextHop>().next_multiple_of(8);

/// Kernel memory of one allocation's counter slot on a machine with `cpus` possible CPUs: its
/// per-CPU pointer plus one [`AllocationCounters`] per CPU.
pub const fn allocation_counter_bytes(cpus: usize) -> usize {
    8 + cpus * core::mem::size_of::<AllocationCounters>()
}

/// Why the kernel program did what it did with one frame.
///
/// The discriminant is the index into [`VERDICT_COUNTERS_MAP`]; [`Reason::label`] is the metric
/// label. Append new reasons at the end so existing indices keep their meaning.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Frame shorter than an Ethernet header.
    PassTruncatedEthernet = 0,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...).
    PassNotIp = 1,
    /// IP header truncated or malformed (bad version / IHL / length).
    PassMalformedIp = 2,
    /// IPv4 header carries options; the fast path only handles 20-byte headers.
    PassIpOptions = 3,
    /// IPv4 fragment (first or later) or an IPv6 fragment header.
    PassFragment = 4,
    /// IP but not UDP (TCP, ICMP, unknown or extension next headers).
    PassNotUdp = 5,
    /// UDP header truncated or its length disagrees with the IP payload length.
    PassMalformedUdp = 6,
    /// UDP that is neither ChannelData nor from a peer with a bound channel: STUN, Send/Data
    /// indications, unknown traffic. The socket path handles it.
    PassUdpNoMatch = 7,
    /// ChannelData from a client forwarded to its peer.
    ForwardToPeer = 8,
    /// A peer's datagram forwarded to its client as ChannelData.
    ForwardToClient = 9,
    /// Well-formed ChannelData with no binding in the kernel (not installed, or removed).
    PassNoBinding = 10,
    /// ChannelData whose length field disagrees with the UDP payload (RFC 8656 §12.5).
    PassBadChannelLength = 11,
    /// The binding's deadline has passed; userspace has not removed it yet.
    PassExpired = 12,
    /// The binding exists but the fast path is off for it.
    PassDisabled = 13,
    /// IPv6 UDP with checksum 0 (not allowed, RFC 8200 §8.1): the stack decides.
    PassIpv6ZeroChecksum = 14,
    /// The destination's next hop is not resolved (neighbour unknown, no route, link down,
    /// or the egress is not an attached interface): the socket path sends it, which also
    /// resolves the neighbour.
    PassNoNextHop = 15,
    /// The rewritten datagram exceeds the egress MTU: the socket path fragments it or reports
    /// it as the stack does.
    PassFragNeeded = 16,
    /// The peer is denied by the kernel copy of the peer policy. Userspace never installs such
    /// an entry; this counts only if it errs (defence in depth).
    PassPolicyDenied = 17,
    /// Client-to-client through this relay: ChannelData from one client delivered straight to
    /// the client of the allocation whose relayed address it was sent to.
    ForwardHairpin = 18,
    /// ChannelData to another allocation of this relay that has no channel for the sender:
    /// the socket path delivers it (as a Data indication).
    PassHairpinNoChannel = 19,
    /// The route leaves through an interface the fast path is not attached to.
    PassEgressNotAttached = 20,
    /// Growing/shrinking the frame failed before anything was rewritten.
    PassAdjustFailed = 21,
    /// The frame was half rewritten when a step failed; dropped rather than sent corrupt.
    /// Should never count: it marks a bug.
    DropRewriteFailed = 22,
    /// TC only: a GSO aggregate of several datagrams; the stack segments it.
    PassGso = 23,
    /// TC only: a frame whose VLAN tag the device took off (`skb->vlan_tci`); forwarding it
    /// would drop or carry over the tag, so the stack handles it.
    PassVlan = 24,
    /// A client's Send indication forwarded to its peer as plain UDP (RFC 8656 §11.2).
    ForwardSendToPeer = 25,
    /// A peer's datagram (permission, no channel) forwarded to the client as a Data indication
    /// (RFC 8656 §11.3).
    ForwardDataToClient = 26,
    /// A Send indication for a peer IP without a permission in the kernel.
    PassNoPermission = 27,
    /// A Send indication the kernel leaves to the socket path, which applies RFC 8656 §11.2 in
    /// full: DONT-FRAGMENT, FINGERPRINT, an unknown comprehension-required attribute, a missing
    /// or repeated XOR-PEER-ADDRESS or DATA, lengths that disagree, another address family.
    PassStunUnsupported = 28,
    /// The map entry changed while the program read it (a preallocated element recycled for
    /// another key by a concurrent update): its key tag no longer matched.
    PassEntryChanged = 29,
}

impl Reason {
    /// Number of reasons, i.e. the number of entries in the verdict counter array.
    pub const COUNT: u32 = 30;

    /// Every reason in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::PassTruncatedEthernet,
        Reason::PassNotIp,
        Reason::PassMalformedIp,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassNotUdp,
        Reason::PassMalformedUdp,
        Reason::PassUdpNoMatch,
        Reason::ForwardToPeer,
        Reason::ForwardToClient,
        Reason::PassNoBinding,
        Reason::PassBadChannelLength,
        Reason::PassExpired,
        Reason::PassDisabled,
        Reason::PassIpv6ZeroChecksum,
        Reason::PassNoNextHop,
        Reason::PassFragNeeded,
        Reason::PassPolicyDenied,
        Reason::ForwardHairpin,
        Reason::PassHairpinNoChannel,
        Reason::PassEgressNotAttached,
        Reason::PassAdjustFailed,
        Reason::DropRewriteFailed,
        Reason::PassGso,
        Reason::PassVlan,
        Reason::ForwardSendToPeer,
        Reason::ForwardDataToClient,
        Reason::PassNoPermission,
        Reason::PassStunUnsupported,
        Reason::PassEntryChanged,
    ];

    /// Counter index of this reason.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable snake_case label used in metrics and CLI output.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::PassTruncatedEthernet => "pass_truncated_ethernet",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassMalformedIp => "pass_malformed_ip",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNotUdp => "pass_not_udp",
            Reason::PassMalformedUdp => "pass_malformed_udp",
            Reason::PassUdpNoMatch => "pass_udp_no_match",
            Reason::ForwardToPeer => "forward_to_peer",
            Reason::ForwardToClient => "forward_to_client",
            Reason::PassNoBinding => "pass_no_binding",
            Reason::PassBadChannelLength => "pass_bad_channel_length",
            Reason::PassExpired => "pass_expired",
            Reason::PassDisabled => "pass_disabled",
            Reason::PassIpv6ZeroChecksum => "pass_ipv6_zero_checksum",
            Reason::PassNoNextHop => "pass_no_next_hop",
            Reason::PassFragNeeded => "pass_frag_needed",
            Reason::PassPolicyDenied => "pass_policy_denied",
            Reason::ForwardHairpin => "forward_hairpin",
            Reason::PassHairpinNoChannel => "pass_hairpin_no_channel",
            Reason::PassEgressNotAttached => "pass_egress_not_attached",
            Reason::PassAdjustFailed => "pass_adjust_failed",
            Reason::DropRewriteFailed => "drop_rewrite_failed",
            Reason::PassGso => "pass_gso",
            Reason::PassVlan => "pass_vlan",
            Reason::ForwardSendToPeer => "forward_send_to_peer",
            Reason::ForwardDataToClient => "forward_data_to_client",
            Reason::PassNoPermission => "pass_no_permission",
            Reason::PassStunUnsupported => "pass_stun_unsupported",
            Reason::PassEntryChanged => "pass_entry_changed",
        }
    }

    /// Whether frames counted under this reason were forwarded by the kernel.
    pub const fn is_forward(self) -> bool {
        matches!(
            self,
            Reason::ForwardToPeer
                | Reason::ForwardToClient
                | Reason::ForwardHairpin
                | Reason::ForwardSendToPeer
                | Reason::ForwardDataToClient
        )
    }

    /// The reason stored at counter `index`, if any.
    pub const fn from_index(index: u32) -> Option<Reason> {
        if index < Self::COUNT {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }
}

const _: () = {
    // `ALL` must list every reason at its own index.
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i);
        i += 1;
    }
};

/// `aya::Pod` for the map types, so userspace can read and write them.
#[cfg(feature = "user")]
mod pod {
    use super::{
        AllocationCounters, ChannelKey, ClientKey, EntryDigestKey, NextHop, PeerKey, Permission,
        PermissionKey, ToClient, ToPeer, ToRelay,
    };

    // SAFETY: all eleven are `#[repr(C)]`, `Copy`, padding-free (asserted above) and made of
    // integers and byte arrays only, so every bit pattern is a valid value.
    unsafe impl aya::Pod for ChannelKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToClient {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NextHop {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToRelay {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PermissionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Permission {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllocationCounters {}
    // SAFETY: as above (u64 words only).
    unsafe impl aya::Pod for EntryDigestKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed multipliers from a simple generator (userspace draws random ones).
    fn digest_key() -> EntryDigestKey {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut key = EntryDigestKey {
            seed: next(),
            ..EntryDigestKey::default()
        };
        for m in key.multipliers.iter_mut() {
            *m = next();
        }
        key
    }

    fn to_peer(peer_port: u16) -> ToPeer {
        ToPeer {
            counters: 3,
            flags: FLAG_ENABLED,
            next_hop: 7,
            expires_at_ns: 123_456_789,
            relayed_ip: [0x0102_12c6, 0, 0, 0],
            peer_ip: [0x0202_12c6, 0, 0, 0],
            relayed_port: 50000u16.to_be(),
            peer_port: peer_port.to_be(),
            digest: 0,
        }
    }

    #[test]
    fn entry_digests_cover_key_and_value_but_not_themselves() {
        let dk = digest_key();
        let key = ChannelKey {
            client_ip: [0x0201_12c6, 0, 0, 0],
            listener_ip: [0x0101_12c6, 0, 0, 0],
            client_port: 40000u16.to_be(),
            listener_port: 3478u16.to_be(),
            channel: 0x4000u16.to_be(),
            family: FAMILY_IPV4,
            reserved: 0,
        };
        let value = to_peer(9000);
        let digest = entry_digest(&key, &value, &dk);
        // The stored digest word is not part of what it covers.
        let stored = ToPeer { digest, ..value };
        assert_eq!(entry_digest(&key, &stored, &dk), digest);
        // Another key, another value of the same key, or a different draw of multipliers.
        let other_key = ChannelKey {
            channel: 0x4001u16.to_be(),
            ..key
        };
        assert_ne!(entry_digest(&other_key, &value, &dk), digest);
        assert_ne!(entry_digest(&key, &to_peer(9001), &dk), digest);
        let mut other_draw = dk;
        other_draw.multipliers[0] ^= 1 << 40;
        assert_ne!(entry_digest(&key, &value, &other_draw), digest);
    }

    #[test]
    fn a_copy_mixing_two_entries_fails_its_digest() {
        // What a program copying an element while another CPU refills it may see: the first
        // words of one entry and the rest of another, under either key.
        let dk = digest_key();
        let key_a = PeerKey {
            peer_ip: [0x0202_12c6, 0, 0, 0],
            relayed_ip: [0x0102_12c6, 0, 0, 0],
            peer_port: 9000u16.to_be(),
            relayed_port: 50000u16.to_be(),
            family: FAMILY_IPV4,
            reserved: [0; 3],
        };
        let key_b = PeerKey {
            peer_port: 9001u16.to_be(),
            ..key_a
        };
        let value = |client: u32, port: u16| ToClient {
            counters: 1,
            flags: FLAG_ENABLED,
            next_hop: 2,
            expires_at_ns: 99,
            listener_ip: [0x0101_12c6, 0, 0, 0],
            client_ip: [client, 0, 0, 0],
            listener_port: 3478u16.to_be(),
            client_port: port.to_be(),
            channel: 0x4000u16.to_be(),
            ..ToClient::default()
        };
        let mut a = value(0x0201_12c6, 40000);
        a.digest = entry_digest(&key_a, &a, &dk);
        let mut b = value(0x0301_12c6, 40001);
        b.digest = entry_digest(&key_b, &b, &dk);
        let words = core::mem::size_of::<ToClient>() / 4;
        for split in 1..words {
            let mut mixed = a;
            // SAFETY: both are padding-free `repr(C)` values of `words` 4-byte words.
            unsafe {
                let (to, from) = (
                    (&mut mixed as *mut ToClient).cast::<u32>(),
                    (&b as *const ToClient).cast::<u32>(),
                );
                for w in split..words {
                    *to.add(w) = *from.add(w);
                }
            }
            for key in [&key_a, &key_b] {
                if mixed == a || mixed == b {
                    continue;
                }
                assert_ne!(
                    entry_digest(key, &mixed, &dk),
                    mixed.digest,
                    "split at {split}"
                );
            }
        }
    }

    #[test]
    fn labels_are_unique_and_indices_round_trip() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(Reason::from_index(i as u32), Some(*reason));
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(reason.label(), other.label());
            }
        }
        assert_eq!(Reason::from_index(Reason::COUNT), None);
    }

    #[test]
    fn network_order_fields_round_trip() {
        let octets = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
        assert_eq!(ip_octets(ip_field(octets)), octets);
        assert_eq!(ip_octets(ipv4_field([198, 18, 1, 2]))[..4], [198, 18, 1, 2]);
        assert_eq!(port_field(3478).to_ne_bytes(), 3478u16.to_be_bytes());
        assert_eq!(port_value(port_field(0x4001)), 0x4001);
    }

    #[test]
    fn preallocated_map_memory_stays_within_budget() {
        // 2 × (48 + 40 + 56 + 16) bytes per binding, plus up to two next hops (24 bytes each)
        // shared by every binding to the same address.
        assert_eq!(CHANNEL_BINDING_BYTES, 328);
        assert_eq!(NEXT_HOP_BYTES, 24);
        // 48 + 40 (36 rounded up) + 56 + 16.
        assert_eq!(PERMISSION_BYTES, 168);
        assert_eq!(CLIENT_ENTRY_BYTES, 48 + 40 + 48 + 16);
        // An 8-byte per-CPU pointer, then 32 bytes per CPU.
        assert_eq!(allocation_counter_bytes(2), 8 + 64);
        // Hash maps preallocate every entry: the default channel maps and next hops must fit
        // in 8 MiB, and the counters of every allocation in 64 MiB even on a 64-CPU machine.
        assert!(
            MAX_CHANNEL_BINDINGS as usize * CHANNEL_BINDING_BYTES
                + MAX_NEXT_HOPS as usize * NEXT_HOP_BYTES
                <= 8 << 20
        );
        assert!(MAX_ALLOCATIONS as usize * allocation_counter_bytes(64) <= 64 << 20);
    }
}
