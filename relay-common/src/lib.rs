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
//! kernel program load and checksum them a word at a time.
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
/// Name of the per-CPU hash of per-allocation counters: allocation id (`u64`) →
/// [`AllocationCounters`].
pub const ALLOCATION_COUNTERS_MAP: &str = "ALLOCATION_COUNTERS";
/// Name of the DEVMAP_HASH (ifindex → ifindex) of interfaces the fast path may send out of.
pub const EGRESS_DEVICES_MAP: &str = "EGRESS_DEVICES";
/// Name of the hash set of listener UDP ports (network order `u16` → `u8`): only datagrams to
/// these ports are read as client ChannelData, so a peer's payload that happens to start with
/// bits 0b01 is never taken for (or counted as malformed) ChannelData.
pub const LISTENER_PORTS_MAP: &str = "LISTENER_PORTS";

/// Channel bindings the kernel can hold (each takes one entry in both [`CHANNELS_MAP`] and
/// [`PEERS_MAP`]).
pub const MAX_CHANNEL_BINDINGS: u32 = 16_384;
/// Allocations with kernel counters.
pub const MAX_ALLOCATIONS: u32 = 16_384;
/// Interfaces in [`EGRESS_DEVICES_MAP`].
pub const MAX_EGRESS_DEVICES: u32 = 64;
/// Ports in [`LISTENER_PORTS_MAP`].
pub const MAX_LISTENER_PORTS: u32 = 64;

/// `family` value of an IPv4 key.
pub const FAMILY_IPV4: u8 = 4;
/// `family` value of an IPv6 key.
pub const FAMILY_IPV6: u8 = 6;

/// Entry flag: the kernel may forward with this entry. Without it the entry only documents a
/// binding and the kernel passes the datagram to the socket path (per-allocation "fast path off").
pub const FLAG_ENABLED: u32 = 1;

/// Lowest channel number (RFC 8656 §12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// Highest channel number the kernel forwards: RFC 5766's 0x7fff, because the relay can be
/// told to accept RFC 5766 clients (`--legacy-channels`). Which channels exist is decided by
/// userspace, which installs only bindings the protocol core accepted (by default
/// 0x4000..=0x4fff, RFC 8656 §12).
pub const CHANNEL_MAX: u16 = 0x7fff;
/// Size of the ChannelData header: channel number and length (RFC 8656 §12.4).
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;

/// Key of [`CHANNELS_MAP`]: one ChannelData flow from a client to a listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// Client transport address (network order).
    pub client_ip: [u32; 4],
    /// Listener (server) address the client sends to.
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

/// Value of [`CHANNELS_MAP`]: where a client's channel goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ToPeer {
    /// Allocation id, the key of [`ALLOCATION_COUNTERS_MAP`] (host order).
    pub allocation: u64,
    /// CLOCK_MONOTONIC deadline in ns (`bpf_ktime_get_ns`): no forwarding at or after it.
    pub expires_at_ns: u64,
    /// Relayed transport address the datagram leaves from (same family as the key).
    pub relayed_ip: [u32; 4],
    /// Peer the datagram goes to.
    pub peer_ip: [u32; 4],
    pub relayed_port: u16,
    pub peer_port: u16,
    /// [`FLAG_ENABLED`] and nothing else yet.
    pub flags: u32,
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
    /// Allocation id, the key of [`ALLOCATION_COUNTERS_MAP`] (host order).
    pub allocation: u64,
    /// CLOCK_MONOTONIC deadline in ns (`bpf_ktime_get_ns`): no forwarding at or after it.
    pub expires_at_ns: u64,
    /// Listener address the datagram leaves from.
    pub listener_ip: [u32; 4],
    /// Client transport address the datagram goes to.
    pub client_ip: [u32; 4],
    pub listener_port: u16,
    pub client_port: u16,
    /// Channel number written into the ChannelData header, network order.
    pub channel: u16,
    /// [`FLAG_ENABLED`] and nothing else yet (u16 to keep the struct padding-free).
    pub flags: u16,
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
const _: () = assert!(core::mem::size_of::<ToClient>() == 56);
const _: () = assert!(core::mem::size_of::<AllocationCounters>() == 32);
// Padding-free: each size equals the sum of its fields' sizes.
const _: () = {
    use core::mem::size_of;
    const IP: usize = size_of::<[u32; 4]>();
    assert!(size_of::<ChannelKey>() == 2 * IP + 3 * size_of::<u16>() + 2 * size_of::<u8>());
    assert!(size_of::<ToPeer>() == 2 * size_of::<u64>() + 2 * IP + 2 * size_of::<u16>() + 4);
    assert!(size_of::<PeerKey>() == 2 * IP + 2 * size_of::<u16>() + size_of::<u8>() + 3);
    assert!(size_of::<ToClient>() == 2 * size_of::<u64>() + 2 * IP + 4 * size_of::<u16>());
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

/// Kernel memory of one allocation's counters on a machine with `cpus` possible CPUs: the
/// element (with its per-CPU pointer) plus one [`AllocationCounters`] per CPU.
pub const fn allocation_counter_bytes(cpus: usize) -> usize {
    hash_entry_bytes(8, 8) + cpus * core::mem::size_of::<AllocationCounters>()
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
    /// `bpf_fib_lookup`: forwarding is disabled on the ingress interface (sysctl).
    PassFibForwardingDisabled = 15,
    /// `bpf_fib_lookup`: no neighbour entry yet; the socket path resolves it.
    PassFibNoNeighbour = 16,
    /// `bpf_fib_lookup`: the rewritten datagram exceeds the egress MTU.
    PassFibFragNeeded = 17,
    /// `bpf_fib_lookup`: no route (unreachable, blackhole, prohibit, not forwarded).
    PassFibNoRoute = 18,
    /// `bpf_fib_lookup` failed otherwise (unsupported encapsulation, bad arguments).
    PassFibError = 19,
    /// The route leaves through an interface the fast path is not attached to.
    PassEgressNotAttached = 20,
    /// Growing/shrinking the frame failed before anything was rewritten.
    PassAdjustFailed = 21,
    /// The frame was half rewritten when a step failed; dropped rather than sent corrupt.
    /// Should never count: it marks a bug.
    DropRewriteFailed = 22,
    /// TC only: a GSO aggregate of several datagrams; the stack segments it.
    PassGso = 23,
}

impl Reason {
    /// Number of reasons, i.e. the number of entries in the verdict counter array.
    pub const COUNT: u32 = 24;

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
        Reason::PassFibForwardingDisabled,
        Reason::PassFibNoNeighbour,
        Reason::PassFibFragNeeded,
        Reason::PassFibNoRoute,
        Reason::PassFibError,
        Reason::PassEgressNotAttached,
        Reason::PassAdjustFailed,
        Reason::DropRewriteFailed,
        Reason::PassGso,
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
            Reason::PassFibForwardingDisabled => "pass_fib_forwarding_disabled",
            Reason::PassFibNoNeighbour => "pass_fib_no_neighbour",
            Reason::PassFibFragNeeded => "pass_fib_frag_needed",
            Reason::PassFibNoRoute => "pass_fib_no_route",
            Reason::PassFibError => "pass_fib_error",
            Reason::PassEgressNotAttached => "pass_egress_not_attached",
            Reason::PassAdjustFailed => "pass_adjust_failed",
            Reason::DropRewriteFailed => "drop_rewrite_failed",
            Reason::PassGso => "pass_gso",
        }
    }

    /// Whether frames counted under this reason were forwarded by the kernel.
    pub const fn is_forward(self) -> bool {
        matches!(self, Reason::ForwardToPeer | Reason::ForwardToClient)
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
    use super::{AllocationCounters, ChannelKey, PeerKey, ToClient, ToPeer};

    // SAFETY: all five are `#[repr(C)]`, `Copy`, padding-free (asserted above) and made of
    // integers and byte arrays only, so every bit pattern is a valid value.
    unsafe impl aya::Pod for ChannelKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToClient {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllocationCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // 2 × (48 + 40 + 56 + 16) bytes per binding.
        assert_eq!(CHANNEL_BINDING_BYTES, 320);
        // 48 + 8-byte key + 8-byte per-CPU pointer + 16 bucket, then 32 bytes per CPU.
        assert_eq!(allocation_counter_bytes(2), 80 + 64);
        // Hash maps preallocate every entry: the channel maps must fit in 8 MiB, and the
        // counters of every allocation in 64 MiB even on a 64-CPU machine.
        assert!(MAX_CHANNEL_BINDINGS as usize * CHANNEL_BINDING_BYTES <= 8 << 20);
        assert!(MAX_ALLOCATIONS as usize * allocation_counter_bytes(64) <= 64 << 20);
    }
}
