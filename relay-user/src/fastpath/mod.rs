//! Kernel fast path: loads the embedded eBPF object, attaches it, keeps its maps in step with
//! the channel bindings the daemon hands it, reads its counters.
//!
//! The socket path never depends on this module: when loading or attaching fails the daemon
//! reports why (with the verifier log) and the operator decides whether to run without it.
//! Whatever the kernel does not forward (no binding, expired, no neighbour, ...) reaches the
//! sockets unchanged.
//!
//! The API the daemon uses: [`FastPath::load`], [`FastPath::attach`], [`FastPath::attached`],
//! [`FastPath::install_channel`] / [`FastPath::remove_channel`] with a [`ChannelBinding`],
//! [`FastPath::counters`] / [`FastPath::reset_counters`] and
//! [`FastPath::verdict_counters`]. Map updates are expected from one task, so the two entries of
//! a binding never race each other.

mod binding;
mod loader;
pub mod netlink;
pub mod nexthop;

pub use binding::{supported, BindingHops, ChannelBinding, PermissionBinding};
pub use loader::{
    is_ethernet, AllocationCounters, AttachMode, CounterReader, FastPath, FastPathError,
    MapCapacity, TestProgram, TestRunOutput,
};

/// The eBPF object built from `relay-ebpf` by the build script, embedded so `relay` is one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("RELAY_EBPF_OBJECT"));
