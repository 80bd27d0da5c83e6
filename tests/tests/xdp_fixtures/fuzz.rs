//! Random and mutated frames through the kernel programs (BPF_PROG_TEST_RUN), after the
//! fixtures installed their bindings and permissions. Whatever arrives, the program
//! - passes a frame unchanged, or drops it only as `drop_rewrite_failed`;
//! - forwards only well-formed frames (Ethernet, IPv4 without options or IPv6, UDP, lengths
//!   that agree with the frame), whose checksums verify from scratch when the input's did;
//! - forwards only towards an address some installed entry names, from an address some
//!   installed entry names.
//!
//! Bounded: `RELAY_KERNEL_FUZZ_RUNS` frames per program (default 20,000, a few seconds).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use relay::fastpath::{FastPath, TestProgram};

/// What the fuzzer may see the program send.
pub struct Allowed {
    /// Exact destinations: clients, channel peers.
    pub destinations: HashSet<SocketAddr>,
    /// Destination IPs with any port: peers with a permission (a Send names the port).
    pub destination_ips: HashSet<IpAddr>,
    /// Sources: listener and relayed addresses.
    pub sources: HashSet<SocketAddr>,
}

/// One input the mutations start from.
pub struct Seed {
    pub frame: Vec<u8>,
    pub from_peer_side: bool,
}

/// xorshift64*: deterministic, so a failure names the run that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Actions (XDP or TC) and what they mean.
pub struct Actions {
    pub pass: u32,
    pub drop: u32,
    pub forwards: [u32; 2],
}

pub fn run(
    fastpath: &mut FastPath,
    program: TestProgram,
    seeds: &[Seed],
    ingress: (u32, u32),
    allowed: &Allowed,
    actions: &Actions,
) {
    let runs: usize = std::env::var("RELAY_KERNEL_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ runs as u64);
    let (mut forwarded, mut passed, mut dropped, mut refused) = (0usize, 0, 0, 0);
    for run in 0..runs {
        let seed = &seeds[rng.below(seeds.len())];
        let mut frame = seed.frame.clone();
        mutate(&mut frame, &mut rng);
        // Half the inputs get their checksums made right again: only those must come out
        // with checksums that verify (the program updates checksums, it does not validate).
        let valid_input = rng.below(2) == 0 && fix_checksums(&mut frame);
        let ingress = if seed.from_peer_side {
            ingress.1
        } else {
            ingress.0
        };
        let out = match fastpath.test_run(program, &frame, ingress) {
            Ok(out) => out,
            // The kernel's skb test harness refuses an IP frame shorter than its IP header
            // (a real TC hook would run on it; the XDP runs cover such frames).
            Err(_) if matches!(program, TestProgram::Tc) && short_l3(&frame) => {
                refused += 1;
                continue;
            }
            Err(e) => panic!("run {run}: test run: {e:?}\ninput: {frame:02x?}"),
        };
        let context = || {
            format!(
                "run {run}\ninput:  {frame:02x?}\noutput: {:02x?}",
                out.frame
            )
        };
        if out.action == actions.pass {
            assert_eq!(out.frame, frame, "a passed frame changed; {}", context());
            passed += 1;
        } else if out.action == actions.drop {
            dropped += 1;
        } else if actions.forwards.contains(&out.action) {
            let (src, dst) = well_formed(&out.frame, valid_input)
                .unwrap_or_else(|why| panic!("malformed output: {why}; {}", context()));
            assert!(
                allowed.destinations.contains(&dst) || allowed.destination_ips.contains(&dst.ip()),
                "forwarded to {dst}, which no entry names; {}",
                context()
            );
            assert!(
                allowed.sources.contains(&src),
                "forwarded from {src}, which no entry names; {}",
                context()
            );
            forwarded += 1;
        } else {
            panic!("unexpected action {}; {}", out.action, context());
        }
    }
    eprintln!(
        "{program:?} fuzz: {runs} frames: {forwarded} forwarded, {passed} passed, {dropped} \
         dropped, {refused} refused by the test harness"
    );
    assert!(
        forwarded > 0 && passed > 0,
        "the mutations reach both outcomes"
    );
}

/// One to three random changes: byte flips, a field set to an edge value, the frame cut or
/// lengthened.
fn mutate(frame: &mut Vec<u8>, rng: &mut Rng) {
    for _ in 0..1 + rng.below(3) {
        match rng.below(6) {
            // Anywhere past the Ethernet header (MACs matter to nobody).
            0 | 1 => {
                let at = 12 + rng.below(frame.len().saturating_sub(12));
                if at < frame.len() {
                    frame[at] ^= 1 << rng.below(8);
                }
            }
            // A byte in the first 100 (headers, ChannelData/STUN framing) to 0x00 or 0xff.
            2 => {
                let at = 12 + rng.below(frame.len().min(100).saturating_sub(12));
                if at < frame.len() {
                    frame[at] = if rng.below(2) == 0 { 0 } else { 0xff };
                }
            }
            3 => {
                let keep = 14 + rng.below(frame.len().saturating_sub(14));
                frame.truncate(keep);
            }
            4 => {
                for _ in 0..1 + rng.below(40) {
                    frame.push(rng.next() as u8);
                }
            }
            // A random byte in the UDP payload's first 64.
            _ => {
                let at = 42 + rng.below(64);
                if at < frame.len() {
                    frame[at] = rng.next() as u8;
                }
            }
        }
    }
}

/// An IPv4 or IPv6 frame too short for its IP header.
fn short_l3(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.len() < 14 + 20,
        Some([0x86, 0xdd]) => frame.len() < 14 + 40,
        _ => false,
    }
}

/// Where the IP and UDP headers are, if the frame holds plain IPv4 (no options) or IPv6 with
/// UDP right after.
fn layout(frame: &[u8]) -> Option<(bool, usize)> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ether_type {
        0x0800 if frame.len() >= 14 + 20 + 8 && frame[14] == 0x45 && frame[23] == 17 => {
            Some((false, 14 + 20))
        }
        0x86dd if frame.len() >= 14 + 40 + 8 && frame[14] >> 4 == 6 && frame[20] == 17 => {
            Some((true, 14 + 40))
        }
        _ => None,
    }
}

/// Recomputes the IPv4 header checksum and the UDP checksum of a frame whose lengths agree;
/// `false` if it is not such a frame.
fn fix_checksums(frame: &mut [u8]) -> bool {
    let Some((v6, l4)) = layout(frame) else {
        return false;
    };
    let udp_len = usize::from(u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]]));
    if l4 + udp_len != frame.len() || udp_len < 8 {
        return false;
    }
    if !v6 {
        if usize::from(u16::from_be_bytes([frame[16], frame[17]])) != frame.len() - 14 {
            return false;
        }
        frame[24..26].copy_from_slice(&[0, 0]);
        let check = !fold(sum(&frame[14..34]));
        frame[24..26].copy_from_slice(&check.to_be_bytes());
    } else if usize::from(u16::from_be_bytes([frame[18], frame[19]])) != frame.len() - 54 {
        return false;
    }
    frame[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    let mut check = !fold(pseudo_sum(frame, v6, l4) + sum(&frame[l4..]));
    if check == 0 {
        check = 0xffff;
    }
    frame[l4 + 6..l4 + 8].copy_from_slice(&check.to_be_bytes());
    true
}

/// Checks what a forwarded frame must be; returns its UDP source and destination.
fn well_formed(frame: &[u8], checksums: bool) -> Result<(SocketAddr, SocketAddr), String> {
    let (v6, l4) = layout(frame).ok_or("not Ethernet + IPv4/IPv6 + UDP")?;
    let udp_len = usize::from(u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]]));
    if l4 + udp_len != frame.len() || udp_len < 8 {
        return Err(format!(
            "UDP length {udp_len} in a {}-byte frame",
            frame.len()
        ));
    }
    let (src_ip, dst_ip): (IpAddr, IpAddr) = if v6 {
        let payload_len = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
        if payload_len != udp_len {
            return Err(format!("IPv6 payload length {payload_len}, UDP {udp_len}"));
        }
        let src: [u8; 16] = frame[22..38].try_into().expect("16 bytes");
        let dst: [u8; 16] = frame[38..54].try_into().expect("16 bytes");
        (Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into())
    } else {
        let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
        if total != 20 + udp_len {
            return Err(format!("IPv4 total length {total}, UDP {udp_len}"));
        }
        if fold(sum(&frame[14..34])) != 0xffff {
            return Err("IPv4 header checksum".into());
        }
        let src: [u8; 4] = frame[26..30].try_into().expect("4 bytes");
        let dst: [u8; 4] = frame[30..34].try_into().expect("4 bytes");
        (Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into())
    };
    let check = u16::from_be_bytes([frame[l4 + 6], frame[l4 + 7]]);
    if v6 && check == 0 {
        return Err("IPv6 UDP checksum 0".into());
    }
    if checksums && check != 0 && fold(pseudo_sum(frame, v6, l4) + sum(&frame[l4..])) != 0xffff {
        return Err("UDP checksum does not verify".into());
    }
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Ok((
        SocketAddr::new(src_ip, port(l4)),
        SocketAddr::new(dst_ip, port(l4 + 2)),
    ))
}

/// One's-complement sum of the UDP pseudo-header (RFC 768, RFC 8200 §8.1).
fn pseudo_sum(frame: &[u8], v6: bool, l4: usize) -> u64 {
    let udp_len = (frame.len() - l4) as u64;
    let addresses = if v6 { &frame[22..54] } else { &frame[26..34] };
    sum(addresses) + 17 + udp_len
}

fn sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}
