//! `relay_bench_gen`: the frame injector of `cargo xtask bench --generator live-frames`.
//!
//! Never attached to an interface and never loaded by the relay: the benchmark loads it on its
//! own and runs it with BPF_PROG_TEST_RUN + BPF_F_TEST_XDP_LIVE_FRAMES from a thread in the
//! client (or peer) namespace. Every run stamps the next flow's template over the start of the
//! frame and redirects it out of the generator's veth, towards the server under test.
//!
//! The stamp is required on every frame, not only the first: live-frame pages are recycled with
//! whatever downstream programs (the relay's XDP, the raw forwarder: both strip the ChannelData
//! header, or the relay a Send indication's framing, and write new headers in place) wrote into
//! them. Only the first
//! [`BENCH_GEN_TEMPLATE_LEN`] bytes are ever rewritten downstream, so the payload after them
//! (the test run's `data_in`, shared by all flows) stays valid, and so do the checksums that
//! userspace computed over the whole frame.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use relay_bench_common::{
    BenchGenConfig, BenchGenFrame, BENCH_GEN_MAX_FRAMES, BENCH_GEN_TEMPLATE_LEN,
};

/// Where to send and how many templates are in use (`relay_bench_common::BENCH_GEN_CFG_MAP`).
#[map(name = "BENCH_GEN_CFG")]
static BENCH_GEN_CFG: Array<BenchGenConfig> = Array::with_max_entries(1, 0);

/// One template per flow (`relay_bench_common::BENCH_GEN_FRAMES_MAP`).
#[map(name = "BENCH_GEN_FRAMES")]
static BENCH_GEN_FRAMES: Array<BenchGenFrame> = Array::with_max_entries(BENCH_GEN_MAX_FRAMES, 0);

/// The next template on this CPU (`relay_bench_common::BENCH_GEN_NEXT_MAP`); per CPU, so no atomics.
#[map(name = "BENCH_GEN_NEXT")]
static BENCH_GEN_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Test-run entry point: stamp, then redirect (XDP_ABORTED if misconfigured, which the
/// benchmark sees as frames that never arrive).
#[xdp]
pub fn relay_bench_gen(ctx: XdpContext) -> u32 {
    match stamp(&ctx) {
        // SAFETY: bpf_redirect only records the target; the kernel validates the ifindex.
        Some(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
        None => xdp_action::XDP_ABORTED,
    }
}

/// Copies the next template over the start of the frame; returns the egress ifindex.
#[inline(always)]
fn stamp(ctx: &XdpContext) -> Option<u32> {
    let cfg = BENCH_GEN_CFG.get(0)?;
    let n_frames = cfg.n_frames;
    if n_frames == 0 || n_frames > BENCH_GEN_MAX_FRAMES {
        return None;
    }
    let next = BENCH_GEN_NEXT.get_ptr_mut(0)?;
    // SAFETY: the pointer comes from a successful per-CPU array lookup: valid, aligned, and only
    // this CPU touches its copy while the program runs.
    let index = unsafe {
        let index = if *next < n_frames { *next } else { 0 };
        *next = if index + 1 < n_frames { index + 1 } else { 0 };
        index
    };
    let template = BENCH_GEN_FRAMES.get_ptr(index)?;
    let frame_len = ctx.data_end().saturating_sub(ctx.data());
    // SAFETY: `template` comes from a successful array lookup, so it points at a whole entry.
    if frame_len < BENCH_GEN_TEMPLATE_LEN || frame_len != unsafe { (*template).len } as usize {
        return None;
    }
    // One helper call (kernel >= 5.18, as live frames are) instead of a byte loop: a memcpy in
    // the kernel, no stack, a constant length the verifier checks against the map value.
    // SAFETY: the source is `BENCH_GEN_TEMPLATE_LEN` bytes inside a map value (checked by the
    // verifier), and the helper bounds-checks the destination against the frame.
    let stored = unsafe {
        bpf_xdp_store_bytes(
            ctx.ctx,
            0,
            core::ptr::addr_of!((*template).bytes) as *mut _,
            BENCH_GEN_TEMPLATE_LEN as u32,
        )
    };
    (stored == 0).then_some(cfg.ifindex)
}
