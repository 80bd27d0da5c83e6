//! `relay_bench_sink`: the far end of `cargo xtask bench`.
//!
//! Never loaded by the relay: the benchmark attaches it natively to the veth ends where its
//! traffic ends (the peer's, the clients', and for the generator-ceiling run the relay
//! namespace's end facing the generator). Per frame it costs one XDP run on the generator's core
//! instead of a trip through the receiving namespace's UDP stack, which topped out near
//! 0.4 Mpps and made the far end, not the relay, the bottleneck of the kernel paths.
//!
//! IPv4 UDP frames whose destination matches a rule are counted under the rule's index (frames
//! and bytes, per CPU) and dropped while [`BENCH_SINK_DROP`] is set; with it cleared (the
//! latency probe) they are counted and passed to the echo sockets. Everything else is passed:
//! ARP, the TURN control plane, and, counted under [`BENCH_SINK_OTHER`], UDP that matched no
//! rule. Being an XDP program at all also makes veth deliver frames that the relay's XDP
//! transmits or redirects into this end (ebpf-toolchain.md).

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use relay_bench_common::{
    BenchSinkConfig, BenchSinkCounters, BENCH_SINK_CHANNEL_DATA, BENCH_SINK_CLASSES,
    BENCH_SINK_DROP, BENCH_SINK_OTHER,
};

/// Rules and mode (`relay_bench_common::BENCH_SINK_CFG_MAP`); written by the benchmark.
#[map(name = "BENCH_SINK_CFG")]
static BENCH_SINK_CFG: Array<BenchSinkConfig> = Array::with_max_entries(1, 0);

/// Frames and bytes per class, per CPU so no atomics are needed
/// (`relay_bench_common::BENCH_SINK_COUNTERS_MAP`).
#[map(name = "BENCH_SINK_COUNTERS")]
static BENCH_SINK_COUNTERS: PerCpuArray<BenchSinkCounters> =
    PerCpuArray::with_max_entries(BENCH_SINK_CLASSES, 0);

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// Ethernet + option-less IPv4 + UDP: where the UDP payload starts.
const PAYLOAD_AT: usize = ETH_LEN + IPV4_LEN + UDP_LEN;

#[xdp]
pub fn relay_bench_sink(ctx: XdpContext) -> u32 {
    let Some(cfg) = BENCH_SINK_CFG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let Some(frame) = parse(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let class = class_of(cfg, frame.dst, frame.port, frame.first_byte);
    if let Some(slot) = BENCH_SINK_COUNTERS.get_ptr_mut(class.unwrap_or(BENCH_SINK_OTHER)) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup: valid, aligned, and
        // only this CPU touches its copy while the program runs (no preemption in XDP).
        unsafe {
            (*slot).frames += 1;
            (*slot).bytes += frame.len as u64;
        }
    }
    if class.is_some() && cfg.flags & BENCH_SINK_DROP != 0 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// What the rules look at.
struct Frame {
    /// Destination address, network order.
    dst: u32,
    /// Destination port, host order.
    port: u16,
    /// First UDP payload byte, if the frame has one.
    first_byte: Option<u8>,
    len: usize,
}

/// An unfragmented, option-less IPv4 UDP frame (the benchmark sends nothing else), else None.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Frame> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + PAYLOAD_AT > end {
        return None;
    }
    let byte = |at: usize| -> u8 {
        // SAFETY: every caller reads below PAYLOAD_AT, checked against data_end above.
        unsafe { *((start + at) as *const u8) }
    };
    // EtherType IPv4, version 4 with a 20-byte header, protocol UDP.
    if byte(12) != 0x08 || byte(13) != 0x00 || byte(ETH_LEN) != 0x45 || byte(ETH_LEN + 9) != 17 {
        return None;
    }
    // More-fragments flag or a fragment offset: not a whole datagram.
    if byte(ETH_LEN + 6) & 0x3f != 0 || byte(ETH_LEN + 7) != 0 {
        return None;
    }
    let dst = u32::from_ne_bytes([
        byte(ETH_LEN + 16),
        byte(ETH_LEN + 17),
        byte(ETH_LEN + 18),
        byte(ETH_LEN + 19),
    ]);
    let port = u16::from_be_bytes([byte(ETH_LEN + IPV4_LEN + 2), byte(ETH_LEN + IPV4_LEN + 3)]);
    let first_byte = if start + PAYLOAD_AT < end {
        // SAFETY: checked against data_end on the line above.
        Some(unsafe { *((start + PAYLOAD_AT) as *const u8) })
    } else {
        None
    };
    Some(Frame {
        dst,
        port,
        first_byte,
        len: end - start,
    })
}

/// Index of the first rule in use that matches, if any.
#[inline(always)]
fn class_of(cfg: &BenchSinkConfig, dst: u32, port: u16, first_byte: Option<u8>) -> Option<u32> {
    for (i, rule) in cfg.rules.iter().enumerate() {
        if i as u32 >= cfg.n_rules {
            break;
        }
        // ChannelData, or a Data indication (type 0x0017: first byte 0x00).
        let channel_data = matches!(first_byte, Some(b) if b & 0xc0 == 0x40 || b == 0x00);
        if dst & rule.mask == rule.addr
            && (rule.port_min..=rule.port_max).contains(&port)
            && (rule.flags & BENCH_SINK_CHANNEL_DATA == 0 || channel_data)
        {
            return Some(i as u32);
        }
    }
    None
}

#[cfg(all(test, not(target_arch = "bpf")))]
mod tests {
    use relay_bench_common::{BenchSinkRule, BENCH_SINK_MAX_RULES};

    use super::*;

    fn addr(octets: [u8; 4]) -> u32 {
        u32::from_ne_bytes(octets)
    }

    fn config() -> BenchSinkConfig {
        let mut cfg = BenchSinkConfig {
            flags: BENCH_SINK_DROP,
            n_rules: 2,
            ..BenchSinkConfig::default()
        };
        cfg.rules[0] = BenchSinkRule {
            addr: addr([198, 18, 2, 2]),
            mask: addr([255, 255, 255, 255]),
            port_min: 9000,
            port_max: 9000,
            flags: 0,
        };
        cfg.rules[1] = BenchSinkRule {
            addr: addr([198, 18, 1, 0]),
            mask: addr([255, 255, 255, 0]),
            port_min: 1,
            port_max: u16::MAX,
            flags: BENCH_SINK_CHANNEL_DATA,
        };
        cfg
    }

    #[test]
    fn peer_and_client_flows_get_their_class() {
        let cfg = config();
        assert_eq!(
            class_of(&cfg, addr([198, 18, 2, 2]), 9000, Some(0)),
            Some(0)
        );
        assert_eq!(class_of(&cfg, addr([198, 18, 2, 2]), 9001, Some(0)), None);
        assert_eq!(class_of(&cfg, addr([198, 18, 2, 3]), 9000, Some(0)), None);
        assert_eq!(
            class_of(&cfg, addr([198, 18, 1, 40]), 40000, Some(0x40)),
            Some(1)
        );
    }

    #[test]
    fn stun_responses_to_clients_are_not_counted() {
        let cfg = config();
        // Responses start with 0x01; ChannelData (0b01) and Data indications (0x00 0x17) are
        // benchmark frames.
        assert_eq!(
            class_of(&cfg, addr([198, 18, 1, 2]), 40000, Some(0x01)),
            None
        );
        assert_eq!(
            class_of(&cfg, addr([198, 18, 1, 2]), 40000, Some(0x00)),
            Some(1)
        );
        assert_eq!(class_of(&cfg, addr([198, 18, 1, 2]), 40000, None), None);
    }

    #[test]
    fn rules_past_n_rules_and_an_empty_config_match_nothing() {
        let mut cfg = config();
        cfg.n_rules = 1;
        assert_eq!(
            class_of(&cfg, addr([198, 18, 1, 2]), 40000, Some(0x40)),
            None
        );
        cfg.n_rules = BENCH_SINK_MAX_RULES + 5;
        assert_eq!(
            class_of(&cfg, addr([198, 18, 2, 2]), 9000, Some(0)),
            Some(0)
        );
        let empty = BenchSinkConfig::default();
        assert_eq!(class_of(&empty, addr([198, 18, 2, 2]), 9000, Some(0)), None);
    }
}
