//! The live-frames generator: BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (kernel >= 5.18)
//! runs relay-bench-ebpf's `relay_bench_gen` over frames the kernel allocates from a page pool and
//! sends every frame it returns XDP_REDIRECT for: out of the generator's veth, straight into the
//! server's veth end, without a socket, a syscall or an skb per frame.
//!
//! Per flood: load the program from the benchmark's eBPF object (relay-bench-ebpf, which xtask
//! builds before the benchmark starts), write one template per
//! flow (Ethernet + IPv4 + UDP (+ ChannelData header) + first payload bytes, checksums over the
//! whole frame), then, from a thread that entered the origin namespace and is pinned to the
//! generator core, call BPF_PROG_TEST_RUN with `repeat` = frames per call until the duration or
//! the packet cap is reached. The program stamps the next template over every frame (pages come
//! back with whatever downstream XDP wrote into them) and redirects it.
//!
//! Each flood loads its own copy (its own maps), so the two directions of a both-ways flood run
//! side by side without sharing templates.

use crate::bench::error_chain;
use std::{
    ffi::CString,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use aya::{
    maps::{Array, MapData},
    programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf,
};
use relay_bench_common::{
    BenchGenConfig, BenchGenFrame, BENCH_GEN_CFG_MAP, BENCH_GEN_FRAMES_MAP, BENCH_GEN_MAX_FRAMES,
    BENCH_GEN_PROGRAM, BENCH_GEN_TEMPLATE_LEN,
};

use super::{FloodPlan, GenStats, Generator, Origin, SendGroup};
use crate::bench::lab::{check_stop, enter_ns, pin_current_thread, STOP};

/// Frames the kernel runs through the program before it flushes the redirects (its NAPI-like
/// batch; at most 256).
const BATCH: u32 = 64;
/// Frames per BPF_PROG_TEST_RUN call. Each live-frames call has a fixed cost of ~20 ms here
/// (the kernel sets up and tears down a page pool per call): 4096 frames per call inject only
/// ~0.2 Mpps, 64 Ki ~1.6 Mpps, 1 Mi ~4.5 Mpps. So the first call probes the rate with
/// `MIN_FRAMES_PER_CALL`, and later calls are sized to fill what is left of the flood, at most
/// `CALL_TIME` (the time bound's granularity) and `MAX_FRAMES_PER_CALL` each.
const MIN_FRAMES_PER_CALL: u32 = 65_536;
const MAX_FRAMES_PER_CALL: u32 = 1 << 22;
const CALL_TIME: Duration = Duration::from_millis(500);
/// Consecutive failed calls after which the flood gives up.
const MAX_FAILED_CALLS: u64 = 16;

/// Printed once per run: the kernel refused `ingress_ifindex` (the veth has no registered XDP
/// receive queue), and frames are injected on the namespace's loopback queue instead. The
/// program ignores the ingress, so the frames and their path are the same.
static NO_INGRESS_NOTED: AtomicBool = AtomicBool::new(false);

pub struct LiveFramesGenerator {
    object: Vec<u8>,
    path: PathBuf,
}

impl LiveFramesGenerator {
    /// Reads the eBPF object and loads the program once, so a missing program or a kernel
    /// that refuses it shows up before the benchmark starts.
    pub fn new(object: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(object).with_context(|| {
            format!(
                "reading the benchmark's eBPF object {} (built by `cargo xtask build-ebpf`)",
                object.display()
            )
        })?;
        let generator = Self {
            object: bytes,
            path: object.to_owned(),
        };
        generator.load()?;
        Ok(generator)
    }

    fn load(&self) -> anyhow::Result<Injector> {
        let mut ebpf =
            Ebpf::load(&self.object).with_context(|| format!("loading {}", self.path.display()))?;
        let program: &mut Xdp = ebpf
            .program_mut(BENCH_GEN_PROGRAM)
            .with_context(|| {
                format!(
                    "{} has no program {BENCH_GEN_PROGRAM} (rebuild: cargo xtask build-ebpf)",
                    self.path.display()
                )
            })?
            .try_into()?;
        // The verifier log is part of the error chain: print it whole.
        program
            .load()
            .map_err(|e| anyhow::anyhow!("loading {BENCH_GEN_PROGRAM}: {}", error_chain(&e)))?;
        let cfg = Array::try_from(
            ebpf.take_map(BENCH_GEN_CFG_MAP)
                .context(BENCH_GEN_CFG_MAP)?,
        )?;
        let frames = Array::try_from(
            ebpf.take_map(BENCH_GEN_FRAMES_MAP)
                .context(BENCH_GEN_FRAMES_MAP)?,
        )?;
        Ok(Injector { ebpf, cfg, frames })
    }
}

/// One loaded copy of the program and its maps.
struct Injector {
    ebpf: Ebpf,
    cfg: Array<MapData, BenchGenConfig>,
    frames: Array<MapData, BenchGenFrame>,
}

impl Generator for LiveFramesGenerator {
    fn name(&self) -> &'static str {
        "live-frames"
    }

    fn flood(&self, plan: &FloodPlan) -> anyhow::Result<GenStats> {
        if plan.rate_pps.is_some() {
            bail!("the live-frames generator does not pace (each call injects a burst)");
        }
        // Namespaces are per thread: a thread of its own enters the origin namespace, so the
        // caller's stays untouched.
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.flood_in_ns(plan))
                .join()
                .map_err(|_| anyhow::anyhow!("live-frames generator panicked"))?
        })
    }
}

impl LiveFramesGenerator {
    fn flood_in_ns(&self, plan: &FloodPlan) -> anyhow::Result<GenStats> {
        let origin = &plan.origin;
        let src_mac = mac_of(&origin.netns, &origin.dev)?;
        let dst_mac = mac_of(&origin.next_hop_netns, &origin.next_hop_dev)?;
        let frames = templates(&plan.groups, plan.payload, src_mac, dst_mac)?;
        let data_in = frames[0].clone();
        if data_in.len() < BENCH_GEN_TEMPLATE_LEN {
            bail!(
                "frames of {} bytes are shorter than the {BENCH_GEN_TEMPLATE_LEN}-byte template",
                data_in.len()
            );
        }

        enter_ns(&format!("/run/netns/{}", origin.netns))?;
        pin_current_thread(plan.cpu)?;
        yield_to_receivers()?;
        let dev = CString::new(origin.dev.as_str())?;
        // SAFETY: `dev` is a NUL-terminated string that outlives the call; the lookup runs in
        // this thread's (the origin's) namespace.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {} in namespace {}", origin.dev, origin.netns);
        }

        let mut injector = self.load()?;
        for (i, frame) in frames.iter().enumerate() {
            let mut template = BenchGenFrame {
                len: frame.len() as u32,
                ..BenchGenFrame::EMPTY
            };
            template
                .bytes
                .copy_from_slice(&frame[..BENCH_GEN_TEMPLATE_LEN]);
            injector.frames.set(i as u32, template, 0)?;
        }
        injector.cfg.set(
            0,
            BenchGenConfig {
                ifindex,
                n_frames: frames.len() as u32,
            },
            0,
        )?;
        let program: &Xdp = injector
            .ebpf
            .program(BENCH_GEN_PROGRAM)
            .context(BENCH_GEN_PROGRAM)?
            .try_into()?;

        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data = 0 and data_end = the frame length.
        let md: [u32; 6] = [0, data_in.len() as u32, 0, ifindex, 0, 0];
        let ctx_in: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut use_ctx = true;

        let mut stats = GenStats::default();
        let mut failed_in_a_row = 0u64;
        let started = Instant::now();
        while stats.sent < plan.max_packets && started.elapsed() < plan.duration {
            if STOP.load(Ordering::Relaxed) {
                break;
            }
            // Size the call to what is left of the duration at the rate seen so far (the first
            // call probes), capped so one call never runs much longer than CALL_TIME.
            let elapsed = started.elapsed();
            let rate = if stats.sent == 0 {
                0.0
            } else {
                stats.sent as f64 / elapsed.as_secs_f64().max(1e-6)
            };
            let left = plan.duration.saturating_sub(elapsed).min(CALL_TIME);
            let want = if rate > 0.0 {
                ((rate * left.as_secs_f64()) as u64).clamp(
                    u64::from(MIN_FRAMES_PER_CALL),
                    u64::from(MAX_FRAMES_PER_CALL),
                )
            } else {
                u64::from(MIN_FRAMES_PER_CALL)
            };
            let n = (plan.max_packets - stats.sent).min(want) as u32;
            let opts = TestRunOptions {
                data_in: Some(&data_in),
                ctx_in: use_ctx.then_some(ctx_in.as_slice()),
                repeat: n,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            };
            match program.test_run(opts) {
                Ok(_) => {
                    stats.sent += u64::from(n);
                    failed_in_a_row = 0;
                }
                Err(e) if use_ctx && stats.sent == 0 && is_einval(&e) => {
                    use_ctx = false;
                    if !NO_INGRESS_NOTED.swap(true, Ordering::Relaxed) {
                        println!(
                            "bench: note: live frames: the kernel refused ingress_ifindex {} \
                             ({}); injecting on the namespace's default queue (same frames, \
                             same redirect)",
                            origin.dev,
                            error_chain(&e)
                        );
                    }
                }
                Err(e) => {
                    stats.send_errors += 1;
                    failed_in_a_row += 1;
                    if failed_in_a_row >= MAX_FAILED_CALLS {
                        bail!(
                            "BPF_PROG_TEST_RUN (live frames) failed {failed_in_a_row} times in \
                             a row: {}",
                            error_chain(&e)
                        );
                    }
                }
            }
        }
        stats.elapsed = started.elapsed();
        check_stop()?;
        Ok(stats)
    }
}

/// Puts the calling thread in SCHED_IDLE. The generator core also runs the receivers (the far
/// veth ends' NAPI threads and the sinks): the injector is a kernel loop that would take half
/// of that core from them and cap what the benchmark can count as delivered, whatever the
/// server does. As SCHED_IDLE it runs only when they have nothing to do (the kernel test-run
/// loop yields between batches), i.e. it offers as much as the receivers leave room for.
fn yield_to_receivers() -> anyhow::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        bail!(
            "sched_setscheduler SCHED_IDLE: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn is_einval(e: &ProgramError) -> bool {
    match e {
        ProgramError::SyscallError(s) => matches!(
            s.io_error.raw_os_error(),
            Some(libc::EINVAL) | Some(libc::ENODEV)
        ),
        _ => false,
    }
}

/// The MAC address of `dev` in `netns`.
pub fn mac_of(netns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", "dev", dev])
        .output()
        .context("running ip link show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC address for {dev} in {netns}: {text}"))?;
    crate::bench::raw_xdp::parse_mac(mac)
}

/// One full frame per (group, destination), interleaved group by group so that consecutive
/// frames belong to different flows, as many clients sending at once would.
fn templates(
    groups: &[SendGroup],
    payload: usize,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let body: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
    let mut frames = Vec::new();
    for group in groups {
        let SocketAddr::V4(src) = group.socket.local_addr()? else {
            bail!("the live-frames generator sends IPv4 only");
        };
        let mut udp_payload = group.prefix.clone();
        udp_payload.extend_from_slice(&body);
        for dst in &group.dests {
            frames.push(frame(src_mac, dst_mac, src, *dst, &udp_payload));
        }
    }
    if frames.is_empty() {
        bail!("nothing to send");
    }
    if frames.len() > BENCH_GEN_MAX_FRAMES as usize {
        bail!(
            "{} flows, the injector holds {BENCH_GEN_MAX_FRAMES}",
            frames.len()
        );
    }
    if frames.iter().any(|f| f.len() != frames[0].len()) {
        bail!("the live-frames generator needs frames of one length per flood");
    }
    Ok(frames)
}

/// Ethernet + IPv4 (20 bytes, DF, TTL 64) + UDP with complete checksums (the receivers verify
/// them; nothing downstream fills them in).
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(ip_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let ip_csum = checksum(&[&f[ip_start..]]);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let udp_start = f.len();
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    let udp_csum = udp_checksum(*src.ip(), *dst.ip(), &f[udp_start..]);
    f[udp_start + 6..udp_start + 8].copy_from_slice(&udp_csum.to_be_bytes());
    f
}

/// RFC 768 checksum over the IPv4 pseudo-header and `udp` (header with a zero checksum field,
/// then payload); 0 is sent as 0xffff.
fn udp_checksum(src: Ipv4Addr, dst: Ipv4Addr, udp: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 17;
    pseudo[10..].copy_from_slice(&(udp.len() as u16).to_be_bytes());
    match checksum(&[&pseudo, udp]) {
        0 => 0xffff,
        sum => sum,
    }
}

/// RFC 1071 Internet checksum of the concatenated parts (each but the last of even length).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Where a flood from `netns`/`dev` enters the lab, for [`FloodPlan::origin`].
pub fn origin(netns: &str, dev: &str, next_hop_netns: &str, next_hop_dev: &str) -> Origin {
    Origin {
        netns: netns.to_owned(),
        dev: dev.to_owned(),
        next_hop_netns: next_hop_netns.to_owned(),
        next_hop_dev: next_hop_dev.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 1), 3478);
        let payload: Vec<u8> = [0x40, 0x00, 0x00, 0x79]
            .into_iter()
            .chain((0..121).map(|i| i as u8))
            .collect();
        let f = frame([2; 6], [4; 6], src, dst, &payload);
        assert_eq!(f.len(), 14 + 20 + 8 + payload.len());
        // A header with its checksum in place sums to zero (RFC 1071).
        assert_eq!(checksum(&[&f[14..34]]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&src.ip().octets());
        pseudo[4..8].copy_from_slice(&dst.ip().octets());
        pseudo[9] = 17;
        pseudo[10..].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &f[34..]]), 0);
        assert_eq!(&f[42..46], &[0x40, 0x00, 0x00, 0x79]);
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 §3: the sum of these words is 0xddf2 (one's complement 0x220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }
}
