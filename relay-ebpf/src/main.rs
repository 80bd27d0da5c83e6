//! Kernel programs of the relay.
//!
//! The XDP entry point parses Ethernet / IPv4 or IPv6 / UDP and accounts every frame under one
//! [`Reason`]; everything it does not forward goes to the socket path with `XDP_PASS`.
//! Pure helpers build on the host too, so they can be unit-tested there.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod headers;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use relay_common::Reason;

/// XDP entry point attached to the listener and relay interfaces.
#[xdp]
pub fn relay_xdp(ctx: XdpContext) -> u32 {
    let reason = classify(&ctx);
    verdict::count(reason);
    xdp_action::XDP_PASS
}

/// Walks the headers of one frame and names what the fast path would do with it.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Reason {
    let frame = headers::Frame::new(ctx.data(), ctx.data_end());
    match frame.udp() {
        Ok(_udp) => Reason::PassUdpNoMatch,
        Err(reason) => reason,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies `no_std`.
    loop {}
}

/// GPL-compatible licence, required for helpers such as `bpf_fib_lookup`.
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
