//! Sans-IO STUN/TURN protocol core (RFC 8489, RFC 8656).
//!
//! No sockets, no tokio, no clock reads, no randomness source of its own: time and RNG come in
//! through the entry points, effects leave as commands that the IO layer executes.

pub mod auth;
pub mod channel_data;
pub mod policy;
pub mod server;
pub mod stun;
