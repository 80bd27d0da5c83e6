//! The relay's userspace: sans-IO TURN core, daemon, kernel fast-path control plane.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fastpath;
pub mod net;

/// The protocol core lives in its own crate (no I/O dependencies); this keeps the
/// `relay::proto::…` paths of the fast path and the integration tests working.
pub use relay_proto as proto;
