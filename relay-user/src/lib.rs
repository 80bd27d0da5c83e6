//! The relay's userspace: sans-IO TURN core, daemon, kernel fast-path control plane.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fastpath;
pub mod net;
pub mod proto;
