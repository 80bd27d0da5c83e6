//! `cargo xtask package`: a Debian package of the relay, built with `dpkg-deb` (no extra
//! tools): the binary in /usr/bin, the systemd unit in /lib/systemd/system, a default config
//! in /etc/relay/relay.toml (a conffile: upgrades keep the operator's edits).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context};

#[derive(clap::Args)]
pub struct PackageArgs {
    /// The relay binary to package (default: `cargo build --release -p relay-user` builds it).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Where the .deb goes (default: target/debian).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Light gzip compression instead of xz: seconds instead of most of a minute for a debug
    /// binary (what the test suite packages).
    #[arg(long)]
    pub fast: bool,
}

/// The config the package installs: the embedded default's loopback-only settings, with the
/// keys an operator changes first spelled out.
const PACKAGE_CONFIG: &str = "\
# /etc/relay/relay.toml: read by `relay serve --config /etc/relay/relay.toml` (relay.service).
# Every key is a long flag of `relay serve --help`. As installed, the relay serves loopback
# only; to serve clients, set at least `listen`, `relay-ip` and credentials, e.g.
#   listen = [\"0.0.0.0:3478\"]
#   relay-ip = [\"203.0.113.7\"]
#   auth-secret = [\"...\"]            # TURN REST API secret, or
#   user = [\"alice:password\"]
#   fastpath = \"xdp\"                   # kernel fast path; `off` for the socket path alone
#   interface = [\"eth0\"]
listen = [\"127.0.0.1:3478\"]
relay-ip = [\"127.0.0.1\"]
realm = \"relay.local\"
fastpath = \"off\"
admin = \"127.0.0.1:3479\"
";

pub fn run(root: &Path, args: &PackageArgs) -> anyhow::Result<PathBuf> {
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => {
            crate::cargo(&[
                "build",
                "--release",
                "--locked",
                "-p",
                "relay-user",
                "--bin",
                "relay",
            ])?;
            root.join("target/release/relay")
        }
    };
    ensure!(binary.is_file(), "no relay binary at {}", binary.display());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/debian"));
    let version = env!("CARGO_PKG_VERSION");
    let arch = command_output("dpkg", &["--print-architecture"])?;
    let name = format!("relay_{version}_{arch}");
    let staging = out.join(&name);
    if staging.exists() {
        fs::remove_dir_all(&staging).context("clearing the staging directory")?;
    }

    install(&binary, &staging.join("usr/bin/relay"), 0o755)?;
    let unit = fs::read_to_string(root.join("deploy/systemd/relay.service"))
        .context("reading deploy/systemd/relay.service")?
        .replace("/usr/local/bin/relay", "/usr/bin/relay");
    write(
        &staging.join("lib/systemd/system/relay.service"),
        &unit,
        0o644,
    )?;
    write(&staging.join("etc/relay/relay.toml"), PACKAGE_CONFIG, 0o640)?;
    let control = format!(
        "Package: relay\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: relay maintainers <maintainers@relay.invalid>\n\
         Section: net\n\
         Priority: optional\n\
         Depends: libc6\n\
         Description: TURN server (RFC 8656) with an XDP fast path\n \
         relay relays TURN traffic over UDP; steady-state ChannelData and Send/Data\n \
         indications are forwarded inside the Linux kernel by XDP or TC programs, with a\n \
         batched socket path behind them.\n"
    );
    write(&staging.join("DEBIAN/control"), &control, 0o644)?;
    write(
        &staging.join("DEBIAN/conffiles"),
        "/etc/relay/relay.toml\n",
        0o644,
    )?;
    // The unit is not enabled by the package: `systemctl enable --now relay` once the config
    // is right. Where systemd is PID 1 it learns about the new or removed unit.
    let reload = "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n";
    write(&staging.join("DEBIAN/postinst"), reload, 0o755)?;
    write(&staging.join("DEBIAN/postrm"), reload, 0o755)?;

    let deb = out.join(format!("{name}.deb"));
    let compression: &[&str] = if args.fast {
        &["-Zgzip", "-z1"]
    } else {
        &["-Zxz"]
    };
    let status = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .args(compression)
        .arg(&staging)
        .arg(&deb)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb failed ({status})");
    }
    fs::remove_dir_all(&staging).context("removing the staging directory")?;
    println!("package: {}", deb.display());
    Ok(deb)
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn write(to: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", to.display()))
}

fn command_output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} {} failed", args.join(" "));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
