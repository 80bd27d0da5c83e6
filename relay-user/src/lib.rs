//! The relay's userspace: daemon, sockets, admin endpoint and kernel fast-path control plane
//! around the sans-IO TURN core of `relay-proto`.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fastpath;
pub mod net;
pub mod secrets;

/// The protocol core lives in its own crate (no I/O dependencies); this keeps the
/// `relay::proto::…` paths of the fast path and the integration tests working.
pub use relay_proto as proto;
