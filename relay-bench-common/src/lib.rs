//! The map ABI of the benchmark's kernel programs (`relay-bench-ebpf`), shared with
//! `cargo xtask bench`, which loads them. Nothing here is part of the relay: `relay serve` never
//! loads these programs or creates these maps, and the relay's own ABI lives in `relay-common`.
//!
//! Layouts follow the same rules as `relay-common`: `#[repr(C)]`, padding-free (sizes asserted
//! at compile time), no `bool`, and `aya::Pod` impls behind the `user` feature.
#![no_std]

// --- Frame injector (`cargo xtask bench --generator live-frames`) ---------------------
//
// `relay_bench_gen` is never attached: the benchmark runs it with BPF_PROG_TEST_RUN and
// BPF_F_TEST_XDP_LIVE_FRAMES in the client namespace, where it stamps one template per frame and
// redirects the frame out of the client's veth towards the relay.

/// Name of the XDP program that injects benchmark frames (test runs only, never attached).
pub const BENCH_GEN_PROGRAM: &str = "relay_bench_gen";
/// Name of the one-entry array holding the injector's [`BenchGenConfig`].
pub const BENCH_GEN_CFG_MAP: &str = "BENCH_GEN_CFG";
/// Name of the array of [`BenchGenFrame`] templates, one per flow (allocation or peer target).
pub const BENCH_GEN_FRAMES_MAP: &str = "BENCH_GEN_FRAMES";
/// Name of the per-CPU one-entry array (`u32`): the template the next frame gets.
pub const BENCH_GEN_NEXT_MAP: &str = "BENCH_GEN_NEXT";
/// Templates [`BENCH_GEN_FRAMES_MAP`] holds: the benchmark's 1000-allocation variant fits.
pub const BENCH_GEN_MAX_FRAMES: u32 = 1024;
/// Bytes of a template copied over the start of every frame: Ethernet (14) + IPv4 (20) + UDP
/// (8) + a Send indication's framing (STUN header 20, XOR-PEER-ADDRESS 12, DATA header 4)
/// with room to spare, rounded to a multiple of 8. Downstream programs rewrite at most the
/// first 78 bytes of a frame: the relay strips a Send indication's 36 bytes of framing (or a
/// ChannelData header's 4) and writes new Ethernet/IP/UDP headers just before the data, so
/// restoring these bytes restores the whole frame. Every frame must be at least this long.
pub const BENCH_GEN_TEMPLATE_LEN: usize = 96;

/// Value of [`BENCH_GEN_CFG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchGenConfig {
    /// Interface the frames are redirected out of (in the test-running thread's namespace).
    pub ifindex: u32,
    /// Templates in use: entries `0..n_frames` of [`BENCH_GEN_FRAMES_MAP`], emitted in turn.
    /// Zero (or above [`BENCH_GEN_MAX_FRAMES`]) makes the program abort every frame.
    pub n_frames: u32,
}

/// Value of [`BENCH_GEN_FRAMES_MAP`]: the first bytes of one flow's frame, with IPv4 and UDP
/// checksums computed by userspace over the whole frame (the payload after these bytes is the
/// same for every flow: the test run's `data_in`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchGenFrame {
    /// Length of the whole frame this template belongs to: frames of any other length are
    /// aborted, so a template never lands on a frame whose checksums it does not match.
    pub len: u32,
    pub bytes: [u8; BENCH_GEN_TEMPLATE_LEN],
}

impl BenchGenFrame {
    /// An unused entry.
    pub const EMPTY: Self = Self {
        len: 0,
        bytes: [0; BENCH_GEN_TEMPLATE_LEN],
    };
}

const _: () = assert!(core::mem::size_of::<BenchGenConfig>() == 8);
const _: () = assert!(core::mem::size_of::<BenchGenFrame>() == 100);
// Padding-free: each size equals the sum of its fields' sizes.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<BenchGenConfig>() == 2 * size_of::<u32>());
    assert!(size_of::<BenchGenFrame>() == size_of::<u32>() + BENCH_GEN_TEMPLATE_LEN);
};

/// `aya::Pod` for the benchmark injector's map types.
#[cfg(feature = "user")]
mod bench_pod {
    use super::{BenchGenConfig, BenchGenFrame};

    // SAFETY: both are `#[repr(C)]`, `Copy`, padding-free (asserted above) and made of integers
    // and byte arrays only, so every bit pattern is a valid value.
    unsafe impl aya::Pod for BenchGenConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BenchGenFrame {}
}

// --- Far-end sink (`cargo xtask bench`) ---------------------------------------------
//
// `relay_bench_sink` sits (native XDP) on the veth ends where benchmark traffic ends: the peer's
// and the clients' ends, and for the generator-ceiling run the relay namespace's end facing the
// generator. It counts the UDP frames that match one of its rules per rule ("class") and drops
// them, so the far end costs an XDP run per frame instead of the kernel's UDP stack, and passes
// everything else (ARP, the TURN control plane, and every frame while dropping is switched off
// for the latency probe, whose echo needs real sockets). The relay never loads it.

/// Name of the benchmark's far-end counting XDP program.
pub const BENCH_SINK_PROGRAM: &str = "relay_bench_sink";
/// Name of the one-entry array holding the sink's [`BenchSinkConfig`].
pub const BENCH_SINK_CFG_MAP: &str = "BENCH_SINK_CFG";
/// Name of the per-CPU array of [`BenchSinkCounters`], indexed by class: rule `i` counts at
/// index `i`, UDP frames that matched no rule at [`BENCH_SINK_OTHER`].
pub const BENCH_SINK_COUNTERS_MAP: &str = "BENCH_SINK_COUNTERS";
/// Rules a sink holds.
pub const BENCH_SINK_MAX_RULES: u32 = 4;
/// Counter index of UDP/IPv4 frames that matched no rule (passed to the stack).
pub const BENCH_SINK_OTHER: u32 = BENCH_SINK_MAX_RULES;
/// Entries of [`BENCH_SINK_COUNTERS_MAP`].
pub const BENCH_SINK_CLASSES: u32 = BENCH_SINK_MAX_RULES + 1;

/// [`BenchSinkConfig::flags`]: drop the frames a rule matched (else count and pass them).
pub const BENCH_SINK_DROP: u32 = 1;
/// [`BenchSinkRule::flags`]: match only UDP payloads that carry relayed data to a client:
/// ChannelData (first two bits 0b01, RFC 8656 §12) or a STUN indication (first byte 0x00: a
/// Data indication, §11.3; a server sends clients no requests), so STUN responses (first byte
/// 0x01) to the same client addresses are passed to the control plane.
pub const BENCH_SINK_CHANNEL_DATA: u32 = 1;

/// One class of counted frames: IPv4 UDP to `addr`/`mask`, destination port in
/// `port_min..=port_max`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchSinkRule {
    /// Destination address, network order (`u32::from_ne_bytes(octets)`).
    pub addr: u32,
    /// Prefix mask, network order: the rule matches when `dst & mask == addr`.
    pub mask: u32,
    /// Destination port range, host order (compared, not copied).
    pub port_min: u16,
    pub port_max: u16,
    /// [`BENCH_SINK_CHANNEL_DATA`] or 0.
    pub flags: u32,
}

/// Value of [`BENCH_SINK_CFG_MAP`]. All zero (the map's initial state) counts nothing and passes
/// everything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchSinkConfig {
    /// [`BENCH_SINK_DROP`] or 0.
    pub flags: u32,
    /// Rules in use: `rules[..n_rules]`, first match wins.
    pub n_rules: u32,
    pub rules: [BenchSinkRule; BENCH_SINK_MAX_RULES as usize],
}

/// Value of [`BENCH_SINK_COUNTERS_MAP`] (per CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchSinkCounters {
    pub frames: u64,
    /// Whole frames, Ethernet header included.
    pub bytes: u64,
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<BenchSinkRule>() == 3 * size_of::<u32>() + 2 * size_of::<u16>());
    assert!(size_of::<BenchSinkRule>() == 16);
    assert!(
        size_of::<BenchSinkConfig>()
            == 2 * size_of::<u32>() + BENCH_SINK_MAX_RULES as usize * size_of::<BenchSinkRule>()
    );
    assert!(size_of::<BenchSinkCounters>() == 2 * size_of::<u64>());
};

/// `aya::Pod` for the benchmark sink's map types.
#[cfg(feature = "user")]
mod bench_sink_pod {
    use super::{BenchSinkConfig, BenchSinkCounters, BenchSinkRule};

    // SAFETY: all three are `#[repr(C)]`, `Copy`, padding-free (asserted above) and made of
    // integers only, so every bit pattern is a valid value.
    unsafe impl aya::Pod for BenchSinkRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BenchSinkConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BenchSinkCounters {}
}

// --- Far-end XDP_PASS -------------------------------------------------------------------------
//
// veth delivers frames that XDP transmits or redirects into it only when its peer end runs an
// XDP program (ebpf-toolchain.md). The sinks are such programs; when they cannot be attached,
// the benchmark puts this one on the far ends instead. (The relay has its own, `relay_xdp_pass`
// in relay-ebpf, which its `FastPath::attach_pass` and the relay's lab tests use.)

/// Name of the benchmark's XDP program that passes every frame.
pub const BENCH_PASS_PROGRAM: &str = "relay_bench_pass";

// --- Raw XDP forwarder (`cargo xtask bench`, path `raw-xdp`) ------------------------------------
//
// `relay_bench_fwd` does the frame work of the relay's XDP client -> peer direction with none of
// its state: every ChannelData datagram to the configured listener port loses its 4-byte header
// and is re-addressed from one fixed [`BenchFwdConfig`] (MACs, IPv4 addresses, UDP ports), its
// checksums updated incrementally, and sent out of one interface (XDP_TX, or a redirect through a
// one-entry DEVMAP). No per-flow lookup, no expiry, no policy, no counters per allocation: the
// kernel-side floor the relay's XDP path is compared with, as the reference socket forwarder is
// the floor of its socket path.

/// Name of the raw XDP forwarder.
pub const BENCH_FWD_PROGRAM: &str = "relay_bench_fwd";
/// Name of the one-entry array holding the forwarder's [`BenchFwdConfig`].
pub const BENCH_FWD_CFG_MAP: &str = "BENCH_FWD_CFG";
/// Name of the one-entry DEVMAP (key 0 → egress ifindex) the forwarder redirects through.
pub const BENCH_FWD_EGRESS_MAP: &str = "BENCH_FWD_EGRESS";
/// Name of the per-CPU array of `u64` outcome counters, indexed by `BENCH_FWD_*` outcome.
pub const BENCH_FWD_COUNTERS_MAP: &str = "BENCH_FWD_COUNTERS";

/// Outcome: rewritten and sent (XDP_TX or redirect).
pub const BENCH_FWD_FORWARDED: u32 = 0;
/// Outcome: not a frame the forwarder handles (or not configured); passed to the stack unchanged.
pub const BENCH_FWD_PASSED: u32 = 1;
/// Outcome: the header was already stripped when writing the new headers failed; dropped.
pub const BENCH_FWD_DROPPED: u32 = 2;
/// Entries of [`BENCH_FWD_COUNTERS_MAP`].
pub const BENCH_FWD_OUTCOMES: u32 = 3;

/// [`BenchFwdConfig::flags`]: forward (without it every frame is passed).
pub const BENCH_FWD_ENABLED: u32 = 1;

/// Value of [`BENCH_FWD_CFG_MAP`]. Addresses and ports are network-order fields (the packet's
/// bytes read as native integers, like `relay-common`'s), so the program copies them unswapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchFwdConfig {
    /// Ethernet destination of forwarded frames (the next hop: the peer's MAC in the lab).
    pub dst_mac: [u8; 6],
    /// Ethernet source of forwarded frames (the egress interface's MAC).
    pub src_mac: [u8; 6],
    /// Only UDP datagrams to this port (network order) are read as ChannelData.
    pub listen_port: u16,
    /// New UDP source port (the "relayed" port), network order.
    pub src_port: u16,
    /// New UDP destination port (the peer's), network order.
    pub dst_port: u16,
    /// Explicit padding, always zero.
    pub reserved: u16,
    /// New IPv4 source (the "relayed" address), network order.
    pub src_ip: u32,
    /// New IPv4 destination (the peer), network order.
    pub dst_ip: u32,
    /// Interface frames leave through: XDP_TX when it is the one they arrived on, else a
    /// redirect through [`BENCH_FWD_EGRESS_MAP`], whose entry 0 must hold the same ifindex.
    pub egress_ifindex: u32,
    /// [`BENCH_FWD_ENABLED`] or 0.
    pub flags: u32,
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<BenchFwdConfig>() == 2 * 6 + 4 * size_of::<u16>() + 4 * size_of::<u32>());
    assert!(size_of::<BenchFwdConfig>() == 36);
};

/// `aya::Pod` for the raw forwarder's map type.
#[cfg(feature = "user")]
mod bench_fwd_pod {
    use super::BenchFwdConfig;

    // SAFETY: `#[repr(C)]`, `Copy`, padding-free (asserted above) and made of integers and byte
    // arrays only, so every bit pattern is a valid value.
    unsafe impl aya::Pod for BenchFwdConfig {}
}
