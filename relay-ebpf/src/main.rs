//! Kernel programs of the relay.
//!
//! `relay_xdp` (and `relay_tc`, the same logic at TC ingress) forwards TURN ChannelData in the
//! kernel: client → peer strips the ChannelData header, peer → client prepends it, both rewrite
//! addresses, fix checksums incrementally and send through the next hop userspace resolved
//! (no FIB lookup, so the host needs no forwarding sysctl). Client-to-client traffic through
//! this relay is delivered from one client to the other directly. Everything it does not
//! forward goes to the socket path (XDP_PASS / TC_ACT_OK), counted under one [`Reason`]. Pure helpers build on the host too, so they can be unit-tested there.
//!
//! Checksums: the program updates the checksums it finds, so it relies on senders producing
//! complete ones, as frames from real NICs have them. A local sender on a veth offloads them
//! (CHECKSUM_PARTIAL) and the rewritten frame would arrive corrupt: test topologies turn TX
//! checksum offload off on the sending veths (`ethtool -K DEV tx off`).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod channel;
mod checksum;
mod context;
mod forward;
mod headers;
mod indication;
mod maps;
mod verdict;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use relay_common::Reason;

/// XDP entry point attached to the listener and relay interfaces.
#[xdp]
pub fn relay_xdp(ctx: XdpContext) -> u32 {
    let mut packet = context::Xdp { ctx: ctx.ctx };
    let ingress = context::Packet::ingress_ifindex(&packet);
    match forward::process(&mut packet) {
        Ok(forward) => {
            verdict::count(forward.reason);
            if forward.egress == ingress {
                xdp_action::XDP_TX
            } else {
                // `forward::process` made the egress the redirect target (bpf_redirect_map)
                // before it rewrote anything.
                xdp_action::XDP_REDIRECT
            }
        }
        Err(Reason::DropRewriteFailed) => {
            verdict::count(Reason::DropRewriteFailed);
            xdp_action::XDP_DROP
        }
        Err(reason) => {
            verdict::count(reason);
            xdp_action::XDP_PASS
        }
    }
}

/// XDP program for the far end of a veth that `relay_xdp` transmits into: veth delivers
/// XDP_TX/redirected frames only to a peer running XDP.
#[xdp]
pub fn relay_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// TC (clsact ingress) entry point: the same forwarding as `relay_xdp`, for interfaces or
/// kernels where XDP is not an option.
#[classifier]
pub fn relay_tc(ctx: TcContext) -> i32 {
    // Segmentation offload aggregates would need per-segment rewriting: leave them to the stack.
    // SAFETY: the kernel hands the program a valid `__sk_buff`.
    if unsafe { (*ctx.skb.skb).gso_segs } > 1 {
        verdict::count(Reason::PassGso);
        return TC_ACT_OK;
    }
    // A tag the device took off lives beside the frame; the frame alone is not what arrived.
    // SAFETY: as above.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        verdict::count(Reason::PassVlan);
        return TC_ACT_OK;
    }
    // Make the headers (and the ChannelData header after them) directly accessible: drivers
    // that put only part of a frame in the linear area would otherwise make every frame
    // look truncated.
    // SAFETY: as above.
    let len = unsafe { (*ctx.skb.skb).len };
    if ctx.pull_data(len.min(TC_PULL_BYTES)).is_err() {
        verdict::count(Reason::PassMalformedIp);
        return TC_ACT_OK;
    }
    let mut packet = context::Tc { skb: ctx.skb.skb };
    match forward::process(&mut packet) {
        Ok(forward) => {
            verdict::count(forward.reason);
            // SAFETY: bpf_redirect only records the target; the kernel validates it.
            unsafe { bpf_redirect(forward.egress, 0) as i32 }
        }
        Err(Reason::DropRewriteFailed) => {
            verdict::count(Reason::DropRewriteFailed);
            TC_ACT_SHOT
        }
        Err(reason) => {
            verdict::count(reason);
            TC_ACT_OK
        }
    }
}

/// Bytes the TC program makes linear: Ethernet, IPv6 and UDP headers and a ChannelData header,
/// with room to spare.
const TC_PULL_BYTES: u32 = 128;

/// TC verdicts (include/uapi/linux/pkt_cls.h). bpf_redirect returns TC_ACT_REDIRECT (7).
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies `no_std`.
    loop {}
}

/// GPL-compatible licence, required for GPL-only helpers.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "relay-ebpf is a kernel program: build it for bpfel-unknown-none (cargo xtask build-ebpf)"
    );
}
