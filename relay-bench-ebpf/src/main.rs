//! Kernel programs of `cargo xtask bench`, and nothing else: the relay never loads this object.
//!
//! - `relay_bench_gen` (gen.rs): the live-frames load generator, run with BPF_PROG_TEST_RUN.
//! - `relay_bench_sink` (sink.rs): the far ends that count and drop what the paths delivered.
//! - `relay_bench_fwd` (fwd.rs): the raw XDP forwarder, the `raw-xdp` path.
//! - `relay_bench_pass` (below): XDP_PASS for the far ends when the sinks are unavailable.
//!
//! Built like `relay-ebpf` (bpfel-unknown-none, `cargo xtask build-ebpf`), in an object of its
//! own so that a production start of `relay serve` creates none of these maps. Pure helpers build
//! on the host too, so they can be unit-tested there.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod fwd;
mod gen;
mod sink;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// For the far end of a veth that a path under test transmits or redirects into: veth delivers
/// such frames only to a peer running XDP.
#[xdp]
pub fn relay_bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies `no_std`.
    loop {}
}

/// GPL-compatible licence: live frames and the redirect helpers are GPL-only.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "relay-bench-ebpf is a kernel program: build it for bpfel-unknown-none \
         (cargo xtask build-ebpf)"
    );
}
