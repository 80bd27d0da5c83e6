//! Developer tasks for the relay workspace: `cargo xtask <task>`.

mod bench;
mod demo;
mod fuzz;
mod package;
mod setup;

#[path = "../../relay-user/build_ebpf.rs"]
mod build_ebpf;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Developer tasks for the relay workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks (idempotent; a warm run takes seconds).
    Setup,
    /// Build the eBPF objects for bpfel-unknown-none: the relay's (relay-ebpf) and the
    /// benchmark's (relay-bench-ebpf). Set RELAY_EBPF_TOOLCHAIN=nightly to use a rustup nightly
    /// with rust-src instead of Debian's rustc.
    BuildEbpf,
    /// Set up, then run formatting and lint checks and the whole test suite.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the relay in a namespace lab with the kernel fast path attached,
    /// showing what the kernel program saw.
    Demo,
    /// Benchmark the socket path, the kernel fast path, coturn and the raw XDP and reference
    /// socket forwarders side by side in a namespace lab (root): table on the terminal, JSON +
    /// SVG in bench-results/.
    // Boxed: its options outgrow every other task's.
    Bench(Box<bench::BenchArgs>),
    /// Build a Debian package (binary, systemd unit, /etc/relay/relay.toml) in target/debian.
    Package(package::PackageArgs),
    /// Run the libFuzzer targets of fuzz/ (cargo-fuzz, built with RUSTC_BOOTSTRAP=1): the STUN
    /// codec with integrity and fingerprint checks, ChannelData, REST usernames, nonces, and a
    /// stateful target driving the server core.
    Fuzz(fuzz::FuzzArgs),
    /// The bench's reference forwarder (started by `cargo xtask bench` in its lab).
    #[command(hide = true)]
    BenchForwarder(bench::forwarder::ForwarderArgs),
    /// The bench's raw XDP forwarder (started by `cargo xtask bench` in its lab).
    #[command(hide = true)]
    BenchRawXdp(bench::raw_xdp::RawXdpArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => {
            let object = build_ebpf_object()?;
            println!("eBPF object: {}", object.display());
            let bench = build_bench_object()?;
            println!("benchmark eBPF object: {}", bench.display());
            Ok(())
        }
        Task::Test { args } => test(&args),
        Task::Demo => {
            setup::run()?;
            demo::run(&workspace_root())
        }
        Task::Bench(args) => bench::run(&workspace_root(), *args),
        Task::Package(args) => package::run(&workspace_root(), &args).map(|_| ()),
        Task::Fuzz(args) => {
            setup::ensure_cargo_fuzz()?;
            fuzz::run(&workspace_root(), &args)
        }
        Task::BenchForwarder(args) => bench::forwarder::run(&args),
        Task::BenchRawXdp(args) => bench::raw_xdp::run(&args),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn build_ebpf_object() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    build_ebpf::build_ebpf(&root, &root.join("target").join("ebpf")).map_err(anyhow::Error::msg)
}

/// The eBPF crate of the benchmark's own programs (generator, sinks, raw XDP forwarder): never
/// part of the relay binary, so no build script embeds it; xtask builds it before each use
/// (cargo makes that a no-op when nothing changed), next to the relay's object.
const BENCH_EBPF_PACKAGE: &str = "relay-bench-ebpf";

pub(crate) fn build_bench_object() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    build_ebpf::build_ebpf_package(&root, &root.join("target").join("ebpf"), BENCH_EBPF_PACKAGE)
        .map_err(anyhow::Error::msg)
}

/// Runs `cargo ARGS` in the workspace root, timing it.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("==> cargo {}", args.join(" "));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    println!("==> cargo {} done in {:.1?}", args[0], started.elapsed());
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::run()?;
    let object = build_ebpf_object()?;
    println!("==> eBPF object {}", object.display());
    // Built up front, so the bench smoke test finds it fresh (it builds it itself otherwise).
    let bench = build_bench_object()?;
    println!("==> benchmark eBPF object {}", bench.display());
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ])?;
    // Integration tests start the real `relay` binary; `cargo test` builds binaries only for
    // the package whose tests use them, so build every binary first.
    cargo(&["build", "--workspace", "--locked", "--bins"])?;
    // --workspace, not the default members: the root-only `tests` crate is left out of those
    // so a plain `cargo test` passes as a normal user; here it must run.
    let mut args = vec!["test", "--workspace", "--locked", "--no-fail-fast", "--"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)?;
    // Every fuzz target for a short bounded time (a few seconds in all); the long runs are
    // `cargo xtask fuzz`.
    for target in fuzz::TARGETS {
        fuzz::fuzz_one(
            &workspace_root(),
            target,
            fuzz::SUITE_RUNS,
            60,
            fuzz::Sanitizer::None,
        )?;
    }
    println!(
        "==> all checks and tests passed in {:.1?}",
        started.elapsed()
    );
    Ok(())
}
