//! `relay_bench_fwd`: the raw XDP forwarder, path `raw-xdp` of `cargo xtask bench`.
//!
//! The frame work of the relay's XDP client → peer direction, without any of its state: a
//! ChannelData datagram to the configured listener port loses its 4-byte header, gets new
//! Ethernet addresses, IPv4 addresses and UDP ports from the one [`BenchFwdConfig`] entry, has
//! both checksums updated incrementally (RFC 1624) and leaves through XDP_TX or a redirect
//! through a one-entry DEVMAP. One array lookup per frame and no per-flow state, so every client
//! tuple is forwarded the same way: the 1000-allocation variant runs the same program over 1000
//! source tuples. What the relay's path costs beyond this is its TURN state (binding lookup,
//! expiry, per-allocation counters) and its checks.
//!
//! The frame work is deliberately that of the common case only: option-less IPv4, no fragments,
//! no link-layer trailer and no ChannelData padding (the benchmark sends none of these); anything
//! else is passed unchanged, as the relay passes what it does not handle.
//!
//! How the header goes: the first [`IN_LEN`] bytes (Ethernet + IPv4 + UDP + ChannelData header)
//! are copied out, the new Ethernet + IPv4 + UDP headers ([`OUT_LEN`] bytes) are computed from
//! them on the stack ([`rewrite`], a pure function tested on the host), then the frame's head
//! moves 4 bytes forward and the new headers are stored over the start: the payload, which
//! followed the ChannelData header, now follows the UDP header. Nothing in the frame changes
//! until the forward is certain, so every failure before the head moves is a plain pass.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::XdpContext,
};
use relay_bench_common::{
    BenchFwdConfig, BENCH_FWD_DROPPED, BENCH_FWD_ENABLED, BENCH_FWD_FORWARDED, BENCH_FWD_OUTCOMES,
    BENCH_FWD_PASSED,
};

/// The forwarding entry (`relay_bench_common::BENCH_FWD_CFG_MAP`); written by the benchmark.
#[map(name = "BENCH_FWD_CFG")]
static BENCH_FWD_CFG: Array<BenchFwdConfig> = Array::with_max_entries(1, 0);

/// Entry 0: the egress interface for redirects (`relay_bench_common::BENCH_FWD_EGRESS_MAP`).
/// A DEVMAP, as the relay's egress map is, so the redirect costs the same.
#[map(name = "BENCH_FWD_EGRESS")]
static BENCH_FWD_EGRESS: DevMap = DevMap::with_max_entries(1, 0);

/// Frames per outcome, per CPU so no atomics are needed
/// (`relay_bench_common::BENCH_FWD_COUNTERS_MAP`). The relay counts every verdict the same way.
#[map(name = "BENCH_FWD_COUNTERS")]
static BENCH_FWD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BENCH_FWD_OUTCOMES, 0);

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const UDP_LEN: usize = 8;
const CHANNEL_HEADER_LEN: usize = 4;
/// Offsets of the IPv4 header, the UDP header and the ChannelData header in the frame.
const IP: usize = ETH_LEN;
const UDP: usize = IP + IPV4_LEN;
const CHANNEL: usize = UDP + UDP_LEN;
/// Bytes read: Ethernet + option-less IPv4 + UDP + ChannelData header.
pub const IN_LEN: usize = CHANNEL + CHANNEL_HEADER_LEN;
/// Bytes written once the ChannelData header is gone: Ethernet + IPv4 + UDP.
pub const OUT_LEN: usize = CHANNEL;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;

#[xdp]
pub fn relay_bench_fwd(ctx: XdpContext) -> u32 {
    let (action, outcome) = forward(&ctx);
    if let Some(slot) = BENCH_FWD_COUNTERS.get_ptr_mut(outcome) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup: valid, aligned, and
        // only this CPU touches its copy while the program runs (no preemption in XDP).
        unsafe { *slot += 1 };
    }
    action
}

/// The XDP action and the outcome counter for the frame under `ctx`, rewriting it when it is
/// forwarded.
#[inline(always)]
fn forward(ctx: &XdpContext) -> (u32, u32) {
    const PASS: (u32, u32) = (xdp_action::XDP_PASS, BENCH_FWD_PASSED);
    let Some(cfg) = BENCH_FWD_CFG.get(0) else {
        return PASS;
    };
    if cfg.flags & BENCH_FWD_ENABLED == 0 {
        return PASS;
    }
    let frame_len = ctx.data_end().saturating_sub(ctx.data());
    // Uninitialised: zeroing it first would cost a `memset` subprogram call per frame, and the
    // helper takes uninitialised memory.
    let mut old = MaybeUninit::<[u8; IN_LEN]>::uninit();
    // SAFETY: `old` is IN_LEN bytes on our stack; the helper checks that IN_LEN bytes exist at
    // offset 0 of the frame (failing for shorter frames) and writes exactly that many.
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, old.as_mut_ptr().cast(), IN_LEN as u32) } != 0 {
        return PASS;
    }
    // SAFETY: the helper succeeded, so all IN_LEN bytes are written.
    let old = unsafe { old.assume_init_ref() };
    let mut new = [0u8; OUT_LEN];
    if !rewrite(old, frame_len, cfg, &mut new) {
        return PASS;
    }
    // SAFETY: the kernel hands the program a valid `xdp_md`.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let action = if cfg.egress_ifindex == ingress {
        xdp_action::XDP_TX
    } else {
        // Records the redirect target before the frame changes (flags 0: a missing entry is an
        // error and records nothing); a frame that is passed after all ignores it.
        match BENCH_FWD_EGRESS.redirect(0, 0) {
            Ok(action) => action,
            Err(_) => return PASS,
        }
    };
    // SAFETY: the helper checks the new head against the frame; the frame holds IN_LEN bytes.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, CHANNEL_HEADER_LEN as i32) } != 0 {
        return PASS;
    }
    // SAFETY: `new` is OUT_LEN bytes on our stack; the helper bounds-checks the destination
    // against the (moved) frame, which still holds IN_LEN - 4 = OUT_LEN bytes.
    let stored =
        unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, new.as_mut_ptr().cast(), OUT_LEN as u32) };
    if stored != 0 {
        // The ChannelData header is gone already: the frame can no longer be passed.
        return (xdp_action::XDP_DROP, BENCH_FWD_DROPPED);
    }
    (action, BENCH_FWD_FORWARDED)
}

/// Computes into `new` the Ethernet + IPv4 + UDP headers of the datagram forwarded for a frame
/// of `frame_len` bytes that starts with `old`. False (`new` then holds garbage) when the frame
/// is not exactly one option-less, unfragmented IPv4 UDP datagram to `cfg.listen_port` whose
/// payload is one unpadded ChannelData message (RFC 8656 §12.4).
#[inline(always)]
pub fn rewrite(
    old: &[u8; IN_LEN],
    frame_len: usize,
    cfg: &BenchFwdConfig,
    new: &mut [u8; OUT_LEN],
) -> bool {
    let be16 = |at: usize| u16::from_be_bytes([old[at], old[at + 1]]);
    // Network-order fields as the checksum arithmetic and the config hold them (byte order does
    // not matter to the Internet checksum, RFC 1071 §2(B)).
    let ne16 = |at: usize| u16::from_ne_bytes([old[at], old[at + 1]]);
    let ne32 = |at: usize| u32::from_ne_bytes([old[at], old[at + 1], old[at + 2], old[at + 3]]);

    // Version 4 with a 20-byte header, UDP, neither more-fragments nor an offset.
    if be16(12) != ETHERTYPE_IPV4
        || old[IP] != 0x45
        || old[IP + 9] != IPPROTO_UDP
        || be16(IP + 6) & 0x3fff != 0
    {
        return false;
    }
    if ne16(UDP + 2) != cfg.listen_port {
        return false;
    }
    // The frame is the datagram, no trailer; the payload is the message, no padding; first two
    // bits 0b01 (channels 0x4000-0x7fff) mark ChannelData.
    let ip_len = be16(IP + 2) as usize;
    let udp_len = be16(UDP + 4) as usize;
    if ETH_LEN + ip_len != frame_len
        || IPV4_LEN + udp_len != ip_len
        || old[CHANNEL] & 0xc0 != 0x40
        || UDP_LEN + CHANNEL_HEADER_LEN + be16(CHANNEL + 2) as usize != udp_len
    {
        return false;
    }
    let new_ip_len = ((ip_len - CHANNEL_HEADER_LEN) as u16).to_be_bytes();
    let new_udp_len = ((udp_len - CHANNEL_HEADER_LEN) as u16).to_be_bytes();

    let mut ip = Delta::default();
    ip.replace(ne16(IP + 2), u16::from_ne_bytes(new_ip_len));
    ip.replace32(ne32(IP + 12), cfg.src_ip);
    ip.replace32(ne32(IP + 16), cfg.dst_ip);
    let ip_check = ip.apply(ne16(IP + 10));

    let mut udp = Delta::default();
    udp.replace(ne16(UDP), cfg.src_port);
    udp.replace(ne16(UDP + 2), cfg.dst_port);
    // The length is in the UDP header and in the pseudo-header; so are the addresses.
    udp.replace(ne16(UDP + 4), u16::from_ne_bytes(new_udp_len));
    udp.replace(ne16(UDP + 4), u16::from_ne_bytes(new_udp_len));
    udp.replace32(ne32(IP + 12), cfg.src_ip);
    udp.replace32(ne32(IP + 16), cfg.dst_ip);
    // The ChannelData header leaves the checksummed data; it starts at an even offset.
    udp.remove(ne16(CHANNEL));
    udp.remove(ne16(CHANNEL + 2));
    let old_udp_check = ne16(UDP + 6);
    // Zero means "no checksum" over IPv4 (RFC 768) and stays so; a computed zero is sent as
    // 0xffff for the same reason.
    let udp_check = match (old_udp_check, udp.apply(old_udp_check)) {
        (0, _) => 0,
        (_, 0) => 0xffff,
        (_, check) => check,
    };

    put(new, 0, &cfg.dst_mac);
    put(new, 6, &cfg.src_mac);
    put(new, 12, &[old[12], old[13]]);
    // The IPv4 header keeps TOS, id, flags, TTL and protocol: only lengths, addresses and the
    // checksum change.
    let mut i = IP;
    while i < UDP {
        new[i] = old[i];
        i += 1;
    }
    put(new, IP + 2, &new_ip_len);
    put(new, IP + 10, &ip_check.to_ne_bytes());
    put(new, IP + 12, &cfg.src_ip.to_ne_bytes());
    put(new, IP + 16, &cfg.dst_ip.to_ne_bytes());
    put(new, UDP, &cfg.src_port.to_ne_bytes());
    put(new, UDP + 2, &cfg.dst_port.to_ne_bytes());
    put(new, UDP + 4, &new_udp_len);
    put(new, UDP + 6, &udp_check.to_ne_bytes());
    true
}

/// Copies `bytes` into `out` at `at`; every call site has constant offsets inside `out`.
#[inline(always)]
fn put<const N: usize>(out: &mut [u8; OUT_LEN], at: usize, bytes: &[u8; N]) {
    let mut i = 0;
    while i < N {
        out[at + i] = bytes[i];
        i += 1;
    }
}

/// One's-complement sum of the 16-bit words that leave and enter checksummed data, applied to
/// the checksum already in the packet (RFC 1624 eqn. 3). Words are native reads of packet-order
/// bytes. A few dozen words at most, far from overflowing the `u32`.
#[derive(Clone, Copy, Default)]
struct Delta(u32);

impl Delta {
    #[inline(always)]
    fn add(&mut self, word: u16) {
        self.0 += u32::from(word);
    }

    /// Removing a word adds its complement.
    #[inline(always)]
    fn remove(&mut self, word: u16) {
        self.0 += u32::from(!word);
    }

    #[inline(always)]
    fn replace(&mut self, old: u16, new: u16) {
        self.remove(old);
        self.add(new);
    }

    /// A 32-bit field (an IPv4 address) is two checksum words.
    #[inline(always)]
    fn replace32(&mut self, old: u32, new: u32) {
        self.replace(old as u16, new as u16);
        self.replace((old >> 16) as u16, (new >> 16) as u16);
    }

    /// `HC' = ~(~HC + ~m + m')`.
    #[inline(always)]
    fn apply(self, check: u16) -> u16 {
        !fold(u32::from(!check) + u32::from(fold(self.0)))
    }
}

/// Folds a 32-bit sum into 16 bits with end-around carry. Two rounds suffice for any `u32`.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let once = (sum & 0xffff) + (sum >> 16);
    ((once & 0xffff) + (once >> 16)) as u16
}

#[cfg(all(test, not(target_arch = "bpf")))]
mod tests {
    use super::*;

    const LISTEN_PORT: u16 = 3478;

    fn config() -> BenchFwdConfig {
        BenchFwdConfig {
            dst_mac: [0x02, 0, 0, 0, 0x22, 0x02],
            src_mac: [0x02, 0, 0, 0, 0x22, 0x01],
            listen_port: LISTEN_PORT.to_be(),
            src_port: 40_000u16.to_be(),
            dst_port: 9000u16.to_be(),
            reserved: 0,
            src_ip: u32::from_ne_bytes([198, 18, 2, 1]),
            dst_ip: u32::from_ne_bytes([198, 18, 2, 2]),
            egress_ifindex: 7,
            flags: BENCH_FWD_ENABLED,
        }
    }

    /// RFC 1071 sum of `bytes` (odd length padded with a zero byte), not complemented.
    fn sum(bytes: &[u8]) -> u32 {
        bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum()
    }

    fn checksum(parts: &[&[u8]]) -> u16 {
        let total: u32 = parts.iter().map(|p| sum(p)).sum();
        !fold(total)
    }

    /// Full UDP checksum (host order) of `udp` (header with a zero checksum field + payload).
    fn udp_checksum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
        let len = (udp.len() as u16).to_be_bytes();
        let pseudo = [
            src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, 17, len[0], len[1],
        ];
        match checksum(&[&pseudo, udp]) {
            0 => 0xffff,
            c => c,
        }
    }

    /// An Ethernet + IPv4 + UDP frame with complete checksums; `udp_checksum_on` false sends 0.
    fn frame(
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        payload: &[u8],
        udp_checksum_on: bool,
    ) -> Vec<u8> {
        let udp_len = UDP_LEN + payload.len();
        let ip_len = IPV4_LEN + udp_len;
        let mut f = Vec::new();
        f.extend_from_slice(&[
            0x02, 0, 0, 0, 0x11, 0x01, 0x02, 0, 0, 0, 0x11, 0x02, 0x08, 0,
        ]);
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(ip_len as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&dst.0);
        let ip_check = checksum(&[&f[IP..UDP]]);
        f[IP + 10..IP + 12].copy_from_slice(&ip_check.to_be_bytes());
        f.extend_from_slice(&src.1.to_be_bytes());
        f.extend_from_slice(&dst.1.to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        if udp_checksum_on {
            let c = udp_checksum(src.0, dst.0, &f[UDP..]);
            f[UDP + 6..UDP + 8].copy_from_slice(&c.to_be_bytes());
        }
        f
    }

    fn channel_data(channel: u16, data: &[u8], padding: usize) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&channel.to_be_bytes());
        m.extend_from_slice(&(data.len() as u16).to_be_bytes());
        m.extend_from_slice(data);
        m.resize(m.len() + padding, 0);
        m
    }

    /// Runs `rewrite` the way the program does and returns the frame it would send.
    fn forward(f: &[u8]) -> Option<Vec<u8>> {
        let old: [u8; IN_LEN] = f.get(..IN_LEN)?.try_into().ok()?;
        let mut new = [0u8; OUT_LEN];
        rewrite(&old, f.len(), &config(), &mut new).then(|| {
            let mut out = new.to_vec();
            out.extend_from_slice(&f[IN_LEN..]);
            out
        })
    }

    const CLIENT: ([u8; 4], u16) = ([198, 18, 1, 2], 50_000);
    const LISTENER: ([u8; 4], u16) = ([198, 18, 1, 1], LISTEN_PORT);

    #[test]
    fn forwarded_frames_match_full_recomputation() {
        for (len, client_port, channel) in [
            (120, 50_000, 0x4000),
            (1200, 1, 0x4fff),
            (0, 65_535, 0x7fff),
            (7, 40_000, 0x4001),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let f = frame(
                (CLIENT.0, client_port),
                LISTENER,
                &channel_data(channel, &data, 0),
                true,
            );
            let out = forward(&f).expect("forwarded");
            let want = frame(
                ([198, 18, 2, 1], 40_000),
                ([198, 18, 2, 2], 9000),
                &data,
                true,
            );
            // Identical but for the Ethernet addresses, which come from the config.
            assert_eq!(out[..6], config().dst_mac);
            assert_eq!(out[6..12], config().src_mac);
            assert_eq!(out[12..], want[12..], "{len} bytes on channel {channel:#x}");
        }
    }

    #[test]
    fn a_zero_udp_checksum_stays_zero() {
        let data = [1u8; 120];
        let f = frame(CLIENT, LISTENER, &channel_data(0x4000, &data, 0), false);
        let out = forward(&f).expect("forwarded");
        assert_eq!(out[UDP + 6..UDP + 8], [0, 0]);
        assert_eq!(checksum(&[&out[IP..UDP]]), 0, "IPv4 header checksum");
    }

    #[test]
    fn other_frames_are_passed() {
        let data = [5u8; 16];
        let good = frame(CLIENT, LISTENER, &channel_data(0x4000, &data, 0), true);
        assert!(forward(&good).is_some());

        let other_port = frame(
            CLIENT,
            (LISTENER.0, 3479),
            &channel_data(0x4000, &data, 0),
            true,
        );
        assert!(forward(&other_port).is_none(), "not the listener port");
        let padded = frame(
            CLIENT,
            LISTENER,
            &channel_data(0x4000, &data[..15], 1),
            true,
        );
        assert!(forward(&padded).is_none(), "padding is left to the stack");
        let stun = frame(CLIENT, LISTENER, &channel_data(0x0001, &data, 0), true);
        assert!(forward(&stun).is_none(), "STUN is not ChannelData");
        let long = frame(
            CLIENT,
            LISTENER,
            &channel_data(0x4000, &data, 0)[..18],
            true,
        );
        assert!(forward(&long).is_none(), "length beyond the datagram");

        let mut trailer = good.clone();
        trailer.extend_from_slice(&[0; 4]);
        assert!(forward(&trailer).is_none(), "link-layer trailer");
        let mut fragment = good.clone();
        fragment[IP + 6] |= 0x20;
        assert!(forward(&fragment).is_none(), "more fragments");
        let mut options = good.clone();
        options[IP] = 0x46;
        assert!(forward(&options).is_none(), "IPv4 options");
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(forward(&arp).is_none(), "not IPv4");
        assert!(forward(&good[..IN_LEN - 1]).is_none(), "too short");
    }
}
