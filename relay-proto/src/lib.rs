//! Sans-IO STUN/TURN protocol core (RFC 8489, RFC 8656).
//!
//! No sockets, no tokio, no clock reads, no randomness source of its own: time and RNG come in
//! through the entry points, effects leave as commands that the IO layer executes.
//!
//! That purity is enforced by this crate's dependency list: no tokio, aya, libc, socket or OS
//! entropy crate (rand is used without its default features). The one effect shared between
//! workers, the allocation quota, is reached through [`server::AllocationQuota`].

pub mod auth;
pub mod channel_data;
pub mod limiter;
pub mod policy;
pub mod server;
pub mod stun;
pub mod transport;

pub use transport::Transport;
