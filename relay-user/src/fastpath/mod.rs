//! Kernel fast path: loads the embedded eBPF object, attaches it, reads its counters.
//!
//! The socket path never depends on this module: when loading or attaching fails the daemon
//! reports why (with the verifier log) and the operator decides whether to run without it.

mod loader;

pub use loader::{AttachMode, FastPath, FastPathError};

/// The eBPF object built from `relay-ebpf` by the build script, embedded so `relay` is one file.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("RELAY_EBPF_OBJECT"));
