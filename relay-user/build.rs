//! Builds the kernel programs and embeds them, so `relay` is one self-contained binary.

#[path = "build_ebpf.rs"]
mod build_ebpf;

use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace_root = manifest_dir
        .parent()
        .expect("relay-user lives in the workspace");
    for watched in [
        "relay-ebpf/src",
        "relay-ebpf/Cargo.toml",
        "relay-common/src",
        "relay-user/build_ebpf.rs",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace_root.join(watched).display()
        );
    }
    println!("cargo:rerun-if-env-changed={}", build_ebpf::TOOLCHAIN_ENV);

    // A target directory of its own (the outer cargo holds the lock on the main one), shared by
    // every profile and by `cargo xtask build-ebpf`, so the object is built once.
    let target_dir = workspace_root.join("target").join("ebpf");
    match build_ebpf::build_ebpf(workspace_root, &target_dir) {
        Ok(object) => {
            println!("cargo:rustc-env=RELAY_EBPF_OBJECT={}", object.display());
        }
        Err(message) => {
            println!("cargo:warning={message}");
            panic!("{message}");
        }
    }
}
