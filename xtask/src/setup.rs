//! `cargo xtask setup`: installs what the build and the tests need, skipping what is present.

use std::{process::Command, time::Instant};

use anyhow::{bail, Context};

/// Debian packages: the eBPF compiler route (ebpf-toolchain.md), kernel tooling, and the
/// third-party TURN clients/servers the interop tests and benchmarks use.
const PACKAGES: &[(&str, Option<&str>)] = &[
    // Debian's rustc 1.96 (LLVM 22) and its library source, for `-Z build-std=core`.
    ("rustc-web", Some("1.96.0+dfsg1-1~deb12u2")),
    ("rust-web-src", Some("1.96.0+dfsg1-1~deb12u2")),
    // bpf-linker is built against LLVM 22.
    ("llvm-22-dev", None),
    ("libpolly-22-dev", None),
    ("clang", None),
    ("bpftool", None),
    ("ethtool", None),
    ("iproute2", None),
    // sysctl, ping and taskset, which the namespace tests and the benchmark call.
    ("procps", None),
    ("iputils-ping", None),
    ("util-linux", None),
    // The C++ compiler libfuzzer-sys builds libFuzzer with (`cargo xtask fuzz`).
    ("g++", None),
    // coturn 4.6.1: turnutils_uclient / turnutils_peer / turnserver.
    ("coturn", None),
    // aioice, a Python TURN client, for Debian's /usr/bin/python3.
    ("python3-aioice", None),
    // systemd-analyze, which checks the unit file offline (PID 1 need not be systemd).
    ("systemd", None),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// kubernetes-validate (PyPI), which checks deploy/kubernetes against the Kubernetes schemas it
/// ships (offline).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let missing: Vec<String> = PACKAGES
        .iter()
        .filter(|(name, version)| !package_installed(name, *version))
        .map(|(name, version)| match version {
            Some(v) => format!("{name}={v}"),
            None => (*name).to_owned(),
        })
        .collect();
    if missing.is_empty() {
        println!("setup: Debian packages present");
    } else {
        println!("setup: installing {}", missing.join(" "));
        run_root(&["apt-get", "update", "-qq"])?;
        let mut args = vec!["apt-get", "install", "-y", "-qq"];
        args.extend(missing.iter().map(String::as_str));
        run_root(&args)?;
    }

    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .status()
            .context("running cargo install bpf-linker")?;
        if !status.success() {
            bail!("installing bpf-linker failed ({status})");
        }
    }
    if python_module_version("kubernetes_validate").as_deref() == Some(KUBERNETES_VALIDATE_VERSION)
    {
        println!("setup: kubernetes-validate {KUBERNETES_VALIDATE_VERSION} present");
    } else {
        println!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (PyPI)");
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
            ])
            .status()
            .context("running python3 -m pip")?;
        if !status.success() {
            bail!("installing kubernetes-validate failed ({status})");
        }
    }
    ensure_cargo_fuzz()?;
    println!("setup: done in {:.1?}", started.elapsed());
    Ok(())
}

/// cargo-fuzz, which `cargo xtask fuzz` and the suite's short fuzz runs use (from crates.io;
/// it drives libFuzzer, which the `libfuzzer-sys` crate builds with the system C++ compiler).
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let want = crate::fuzz::CARGO_FUZZ_VERSION;
    if crate::fuzz::cargo_fuzz_version().as_deref() == Some(want) {
        println!("setup: cargo-fuzz {want} present");
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {want}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["install", &format!("cargo-fuzz@{want}"), "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("installing cargo-fuzz failed ({status})");
    }
    Ok(())
}

fn package_installed(name: &str, version: Option<&str>) -> bool {
    let Ok(out) = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", name])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split('\t');
    let installed = fields.next().is_some_and(|s| s.ends_with(" installed"));
    let version_ok = version.is_none_or(|want| fields.next() == Some(want));
    out.status.success() && installed && version_ok
}

/// `python3 -m MODULE --version`, if the module runs.
fn python_module_version(module: &str) -> Option<String> {
    let out = Command::new("python3")
        .args(["-m", module, "--version"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// Runs a command as root (directly when already root, else through sudo).
fn run_root(args: &[&str]) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if is_root {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        cmd
    } else {
        let mut cmd = Command::new("sudo");
        cmd.args(args);
        cmd
    };
    let status = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !status.success() {
        bail!("{} failed ({status})", args.join(" "));
    }
    Ok(())
}
