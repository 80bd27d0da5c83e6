//! The map ABI shared by `relay-ebpf` (kernel) and `relay-user` (userspace).
//!
//! Everything here is defined exactly once: map names, key/value layouts and the verdict
//! reasons that are both the per-CPU counter index and the Prometheus label.
//! Layouts are `#[repr(C)]` and padding-free; their sizes are asserted at compile time.
#![no_std]

/// Name of the per-CPU array that counts XDP/TC verdicts, indexed by [`Reason`].
pub const VERDICT_COUNTERS_MAP: &str = "VERDICT_COUNTERS";

/// Name of the XDP entry point in the eBPF object.
pub const XDP_PROGRAM: &str = "relay_xdp";

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
    /// Well-formed UDP that no fast-path entry claims: the socket path handles it.
    PassUdpNoMatch = 7,
}

impl Reason {
    /// Number of reasons, i.e. the number of entries in the verdict counter array.
    pub const COUNT: u32 = 8;

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
        }
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
}
