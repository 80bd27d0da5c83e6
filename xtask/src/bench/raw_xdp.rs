//! The bench's `raw-xdp` path (`cargo xtask bench-raw-xdp`, hidden): attaches
//! `relay_bench_fwd` (relay-bench-ebpf/src/fwd.rs) to the listener's interface in the relay
//! namespace, configured to send every ChannelData datagram's payload from one "relayed"
//! address to the one peer, and holds it until SIGTERM or its time bound.
//!
//! It runs as a process of its own, like the reference forwarder and the servers, so the runner
//! starts, waits for and stops it the same way; the program stays attached exactly as long as
//! the process holds the loaded object (the link goes with it, also on SIGKILL). The relay's
//! XDP program resolves its next hop per binding; here the benchmark passes the peer's MAC
//! address in, the one neighbour this lab has.

use std::{
    ffi::CString,
    net::SocketAddrV4,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use aya::{
    maps::{Array, DevMap, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf,
};
use relay_bench_common::{
    BenchFwdConfig, BENCH_FWD_CFG_MAP, BENCH_FWD_COUNTERS_MAP, BENCH_FWD_DROPPED,
    BENCH_FWD_EGRESS_MAP, BENCH_FWD_ENABLED, BENCH_FWD_FORWARDED, BENCH_FWD_PASSED,
    BENCH_FWD_PROGRAM,
};

use super::error_chain;

#[derive(clap::Args, Debug)]
pub struct RawXdpArgs {
    /// The benchmark's eBPF object (relay-bench-ebpf).
    #[arg(long, value_name = "PATH")]
    object: PathBuf,
    /// Interface the ChannelData arrives on; the program attaches there (native XDP).
    #[arg(long)]
    interface: String,
    /// Interface the payloads leave through: XDP_TX when it is `--interface`, else a redirect.
    #[arg(long)]
    egress: String,
    /// UDP port whose datagrams are read as ChannelData.
    #[arg(long)]
    listen_port: u16,
    /// Address the payloads leave from.
    #[arg(long)]
    relayed: SocketAddrV4,
    /// Where the payloads go.
    #[arg(long)]
    peer: SocketAddrV4,
    /// The peer's Ethernet address (aa:bb:cc:dd:ee:ff), the next hop out of `--egress`.
    #[arg(long)]
    peer_mac: String,
    /// Detach and exit after this many seconds (or at SIGTERM/SIGINT).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Where to write the final counters (also printed on stderr).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
}

pub fn run(args: &RawXdpArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.object)
        .with_context(|| format!("reading {}", args.object.display()))?;
    let mut ebpf =
        Ebpf::load(&bytes).with_context(|| format!("loading {}", args.object.display()))?;
    let ingress = ifindex(&args.interface)?;
    let egress = ifindex(&args.egress)?;
    let src_mac = parse_mac(
        std::fs::read_to_string(format!("/sys/class/net/{}/address", args.egress))
            .with_context(|| format!("reading the MAC address of {}", args.egress))?
            .trim(),
    )?;
    let dst_mac = parse_mac(&args.peer_mac)?;

    let mut cfg: Array<_, BenchFwdConfig> = Array::try_from(
        ebpf.take_map(BENCH_FWD_CFG_MAP)
            .context(BENCH_FWD_CFG_MAP)?,
    )?;
    let mut devmap = DevMap::try_from(
        ebpf.take_map(BENCH_FWD_EGRESS_MAP)
            .context(BENCH_FWD_EGRESS_MAP)?,
    )?;
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.take_map(BENCH_FWD_COUNTERS_MAP)
            .context(BENCH_FWD_COUNTERS_MAP)?,
    )?;
    // Configured before it is attached, so no frame meets a half-written entry.
    if egress != ingress {
        devmap.set(0, egress, None, 0).map_err(|e| {
            anyhow::anyhow!("DEVMAP entry for {}: {}", args.egress, error_chain(&e))
        })?;
    }
    cfg.set(
        0,
        BenchFwdConfig {
            dst_mac,
            src_mac,
            listen_port: args.listen_port.to_be(),
            src_port: args.relayed.port().to_be(),
            dst_port: args.peer.port().to_be(),
            reserved: 0,
            src_ip: u32::from_ne_bytes(args.relayed.ip().octets()),
            dst_ip: u32::from_ne_bytes(args.peer.ip().octets()),
            egress_ifindex: egress,
            flags: BENCH_FWD_ENABLED,
        },
        0,
    )?;
    let program: &mut Xdp = ebpf
        .program_mut(BENCH_FWD_PROGRAM)
        .with_context(|| {
            format!(
                "{} has no program {BENCH_FWD_PROGRAM}",
                args.object.display()
            )
        })?
        .try_into()?;
    program
        .load()
        .map_err(|e| anyhow::anyhow!("loading {BENCH_FWD_PROGRAM}: {}", error_chain(&e)))?;
    program
        .attach(&args.interface, XdpMode::Driver)
        .map_err(|e| anyhow::anyhow!("attaching to {}: {}", args.interface, error_chain(&e)))?;
    eprintln!(
        "raw XDP forwarder attached to {} (udp port {}): relayed {} -> peer {} out of {}",
        args.interface, args.listen_port, args.relayed, args.peer, args.egress
    );

    super::lab::install_signal_handlers();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds.clamp(1, 3600));
    while Instant::now() < deadline && !super::lab::STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let total =
        |outcome: u32| -> anyhow::Result<u64> { Ok(counters.get(&outcome, 0)?.iter().sum()) };
    let summary = format!(
        "raw XDP forwarder done after {:.1} s: forwarded {}, passed {}, dropped {}",
        started.elapsed().as_secs_f64(),
        total(BENCH_FWD_FORWARDED)?,
        total(BENCH_FWD_PASSED)?,
        total(BENCH_FWD_DROPPED)?
    );
    eprintln!("{summary}");
    if let Some(path) = &args.stats_file {
        std::fs::write(path, summary + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Dropping `ebpf` closes the link: the program detaches.
    drop(ebpf);
    Ok(())
}

/// The index of `dev` in this process's namespace.
fn ifindex(dev: &str) -> anyhow::Result<u32> {
    let name = CString::new(dev)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut bytes {
        let part = parts
            .next()
            .with_context(|| format!("short MAC address {text:?}"))?;
        *b = u8::from_str_radix(part, 16).with_context(|| format!("MAC address {text:?}"))?;
    }
    if parts.next().is_some() {
        bail!("long MAC address {text:?}");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse() {
        assert_eq!(
            parse_mac("02:00:0a:ff:10:01").unwrap(),
            [2, 0, 0x0a, 0xff, 0x10, 1]
        );
        assert!(parse_mac("02:00:0a:ff:10").is_err());
        assert!(parse_mac("02:00:0a:ff:10:01:02").is_err());
        assert!(parse_mac("02:00:0a:ff:10:zz").is_err());
    }
}
