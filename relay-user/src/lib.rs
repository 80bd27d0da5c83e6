//! The relay's userspace: sans-IO TURN core, daemon, kernel fast-path control plane.

pub mod cli;
pub mod daemon;
pub mod fastpath;
pub mod proto;
