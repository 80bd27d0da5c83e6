//! `cargo xtask fuzz [TARGET] [--runs N]`: the libFuzzer targets of `fuzz/` (cargo-fuzz),
//! built with this machine's stable Rust and `RUSTC_BOOTSTRAP=1` (rustup cannot fetch a
//! nightly here; cargo-fuzz only needs the `-Z` flags nightly would allow).
//!
//! Each target starts from the committed seeds (`fuzz/seeds/TARGET`: RFC 5769 vectors, a
//! scripted allocation) and the corpus it built up before (`fuzz/corpus/TARGET`, not committed);
//! a crash lands in `fuzz/artifacts/TARGET` and fails the run. `cargo xtask test` runs every
//! target for [`SUITE_RUNS`] executions.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

/// Every target, in the order the suite runs them.
pub const TARGETS: &[&str] = &[
    "stun_decode",
    "channel_data",
    "rest_username",
    "nonce",
    "server",
    "stream_framing",
];

/// Executions per target in `cargo xtask test` (a few seconds for all of them).
pub const SUITE_RUNS: u64 = 4_000;

/// The cargo-fuzz release `cargo xtask setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sanitizer {
    /// No sanitizer: the fastest runs. relay-proto has no unsafe code, so the coverage-guided
    /// search and Rust's own checks (bounds, overflow with debug assertions) find what there is.
    None,
    /// AddressSanitizer (rustup's stable toolchain ships its runtime).
    Address,
}

#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// One target (default: all of them, one after the other).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// Executions per target.
    #[arg(long, default_value_t = 1_000_000)]
    pub runs: u64,
    /// Stop each target after this many seconds even if the runs are not done (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub max_seconds: u64,
    /// Sanitizer to build with.
    #[arg(long, value_enum, default_value_t = Sanitizer::None)]
    pub sanitizer: Sanitizer,
}

pub fn run(root: &Path, args: &FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(target) => vec![target.as_str()],
        None => TARGETS.to_vec(),
    };
    for target in targets {
        fuzz_one(root, target, args.runs, args.max_seconds, args.sanitizer)?;
    }
    Ok(())
}

/// Runs `target` for `runs` executions (bounded by `max_seconds` when non-zero).
pub fn fuzz_one(
    root: &Path,
    target: &str,
    runs: u64,
    max_seconds: u64,
    sanitizer: Sanitizer,
) -> anyhow::Result<()> {
    let fuzz_dir = root.join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    let seeds = fuzz_dir.join("seeds").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("creating the corpus directory {}", corpus.display()))?;
    let started = Instant::now();
    println!("==> fuzz {target}: {runs} runs");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let sanitizer = match sanitizer {
        Sanitizer::None => "none",
        Sanitizer::Address => "address",
    };
    let mut command = Command::new(cargo);
    command
        .current_dir(&fuzz_dir)
        // The fuzz crate is a workspace of its own with its own lock file; it builds for an
        // explicit --target, so its sanitizer and coverage flags never touch the relay
        // workspace's host builds even in a shared CARGO_TARGET_DIR.
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "--release", "--debug-assertions", "-s"])
        .arg(sanitizer)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-runs={runs}"))
        .arg("-print_final_stats=1");
    if max_seconds > 0 {
        command.arg(format!("-max_total_time={max_seconds}"));
    }
    let status = command
        .status()
        .context("running cargo fuzz (install it with `cargo xtask setup`)")?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): the crashing input is in {}",
            fuzz_dir.join("artifacts").join(target).display()
        );
    }
    println!("==> fuzz {target} done in {:.1?}", started.elapsed());
    Ok(())
}

/// The installed cargo-fuzz version, if any.
pub fn cargo_fuzz_version() -> Option<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(cargo)
        .args(["fuzz", "--version"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}
