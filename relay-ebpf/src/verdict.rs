//! Per-CPU verdict counters, indexed by [`Reason`].

use aya_ebpf::{macros::map, maps::PerCpuArray};
use relay_common::Reason;

/// One `u64` per reason per CPU; userspace sums the CPUs.
#[map(name = "VERDICT_COUNTERS")]
static VERDICT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Adds one to the counter of `reason` on this CPU.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = VERDICT_COUNTERS.get_ptr_mut(reason.index()) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is valid,
        // aligned and only touched by this CPU while the program runs (no preemption in XDP).
        unsafe { *slot += 1 };
    }
}
