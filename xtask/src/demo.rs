//! `cargo xtask demo`: the relay in a two-namespace lab with XDP attached, shown at work.
//!
//! client ns (198.18.1.2) <-veth-> relay ns (198.18.1.1, `relay serve --fastpath xdp`)

use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context};

const DATAGRAMS: usize = 1000;

/// Namespaces and veth of the demo; deleted on drop, also on error.
struct Lab {
    client: String,
    relay: String,
}

impl Lab {
    fn up() -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let lab = Self {
            client: format!("demo-c{id}"),
            relay: format!("demo-r{id}"),
        };
        ip(&["netns", "add", &lab.client])?;
        ip(&["netns", "add", &lab.relay])?;
        let (c_if, r_if) = (format!("dc{id}"), format!("dr{id}"));
        ip(&[
            "-n",
            &lab.client,
            "link",
            "add",
            &c_if,
            "type",
            "veth",
            "peer",
            "name",
            &r_if,
        ])?;
        ip(&["-n", &lab.client, "link", "set", &r_if, "netns", &lab.relay])?;
        ip(&[
            "-n",
            &lab.client,
            "addr",
            "add",
            "198.18.1.2/24",
            "dev",
            &c_if,
        ])?;
        ip(&[
            "-n",
            &lab.relay,
            "addr",
            "add",
            "198.18.1.1/24",
            "dev",
            &r_if,
        ])?;
        for (ns, dev) in [(&lab.client, &c_if), (&lab.relay, &r_if)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.relay] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    if !status.success() {
        bail!("ip {} failed", args.join(" "));
    }
    Ok(())
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "relay-user",
            "--bin",
            "relay",
        ])
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("building relay failed");
    }
    let relay_bin = root.join("target/release/relay");

    let lab = Lab::up()?;
    println!(
        "demo: lab up: {} (198.18.1.2) <-> {} (198.18.1.1)",
        lab.client, lab.relay
    );
    let mut relay = Command::new("ip")
        .args(["netns", "exec", &lab.relay])
        .arg(&relay_bin)
        .args([
            "serve",
            "--listen",
            "198.18.1.1:3478",
            "--relay-ip",
            "198.18.1.1",
        ])
        .args(["--fastpath", "xdp"])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting relay")?;
    std::thread::sleep(Duration::from_secs(1));
    if let Some(status) = relay.try_wait()? {
        bail!("relay exited early ({status})");
    }
    let shown = Command::new("ip")
        .args(["-n", &lab.relay, "-d", "link", "show"])
        .output()?;
    for line in String::from_utf8_lossy(&shown.stdout)
        .lines()
        .filter(|l| l.contains("xdp"))
    {
        println!("demo: {}", line.trim());
    }

    let client_ns = format!("/run/netns/{}", lab.client);
    std::thread::spawn(move || -> anyhow::Result<()> {
        enter_netns(&client_ns)?;
        let socket = UdpSocket::bind("198.18.1.2:0")?;
        for i in 0..DATAGRAMS {
            socket.send_to(format!("demo datagram {i}").as_bytes(), "198.18.1.1:3478")?;
            if i == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    println!("demo: sent {DATAGRAMS} UDP datagrams from the client namespace");
    std::thread::sleep(Duration::from_millis(300));

    // SAFETY: kill only signals the child we started; its pid is valid until we wait on it.
    unsafe { libc::kill(relay.id() as i32, libc::SIGINT) };
    let status = relay.wait()?;
    println!("demo: relay exited ({status}); lab torn down");
    Ok(())
}

fn enter_netns(path: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: setns only reads the fd, which stays open for the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
