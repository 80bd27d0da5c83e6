//! Builds the `relay-ebpf` object (and, for `cargo xtask`, the benchmark's `relay-bench-ebpf`)
//! for `bpfel-unknown-none`.
//!
//! Shared by `relay-user/build.rs` (which embeds the relay's object into the `relay` binary) and
//! `cargo xtask build-ebpf` through `#[path]`, so both use one recipe.
//!
//! Toolchain switch: `RELAY_EBPF_TOOLCHAIN` unset or `debian` uses Debian's `/usr/bin/rustc`
//! (package `rustc-web`, with `rust-web-src` for `-Z build-std=core`) under `RUSTC_BOOTSTRAP=1`;
//! any other value names a rustup toolchain with the `rust-src` component (e.g. `nightly`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Environment variable that selects the compiler for the eBPF crate.
pub const TOOLCHAIN_ENV: &str = "RELAY_EBPF_TOOLCHAIN";
/// Debian's compiler, the default.
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const TARGET: &str = "bpfel-unknown-none";

/// Builds the relay's eBPF crate in `workspace_root` into `target_dir` and returns the object
/// path.
pub fn build_ebpf(workspace_root: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    build_ebpf_package(workspace_root, target_dir, "relay-ebpf")
}

/// Builds the eBPF crate `package` (its binary has the package's name) in `workspace_root` into
/// `target_dir` and returns the object path.
pub fn build_ebpf_package(
    workspace_root: &Path,
    target_dir: &Path,
    package: &str,
) -> Result<PathBuf, String> {
    let toolchain = std::env::var(TOOLCHAIN_ENV).unwrap_or_else(|_| "debian".to_owned());
    let mut cmd = if toolchain == "debian" {
        if !Path::new(DEBIAN_RUSTC).exists() {
            return Err(format!(
                "{DEBIAN_RUSTC} is missing: run `cargo xtask setup` (installs rustc-web, \
                 rust-web-src and bpf-linker), or set {TOOLCHAIN_ENV}=nightly to use a rustup \
                 nightly with rust-src"
            ));
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
        cmd
    } else {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", &toolchain, "cargo"]);
        cmd.env_remove("RUSTC");
        cmd
    };
    // A build script inherits the outer build's compiler wrappers and flags (clippy, coverage,
    // host RUSTFLAGS); none of them apply to the BPF target.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    // BTF lets the kernel and bpftool show typed maps; debuginfo is what the linker turns into BTF.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    cmd.current_dir(workspace_root).args([
        "build",
        "--package",
        package,
        "--bin",
        package,
        "--release",
        "--locked",
        "-Zbuild-std=core",
        "--target",
        TARGET,
        "--target-dir",
    ]);
    cmd.arg(target_dir);

    let status = cmd
        .status()
        .map_err(|e| format!("cannot start cargo for the eBPF build: {e}"))?;
    if !status.success() {
        return Err(format!(
            "eBPF build failed ({status}); is bpf-linker on PATH? `cargo xtask setup` installs it"
        ));
    }
    let object = target_dir.join(TARGET).join("release").join(package);
    if !object.exists() {
        return Err(format!(
            "eBPF build succeeded but {} is missing",
            object.display()
        ));
    }
    Ok(object)
}
