//! The benchmark's far ends: `relay_bench_sink` (relay-bench-ebpf/src/sink.rs) attached
//! natively to the veth ends where the benchmark's traffic ends, counting and dropping it in
//! XDP. Before it, the peer's and the clients' kernel UDP stacks received every frame on the
//! generator's core and capped every path near 0.4 Mpps (the relay's redirects failed with
//! xdp_xmit_errors because the far end's ring was full), so the benchmark measured its own
//! receivers instead of the relay.
//!
//! Every path gets the same far ends, so the comparison stays fair; the generator-ceiling run
//! gets one on the relay namespace's end facing the generator (no server there). The latency
//! probe needs real echo sockets: [`Sink::set_drop`]`(false)` passes the matched frames to the
//! stack (still counted) while it runs.
//!
//! Each sink is its own loaded copy of the program (own maps) and is detached when dropped
//! (the attachment is a bpf_link owned by the loaded object; deleting the namespace also
//! removes it).

use crate::bench::error_chain;
use std::{net::Ipv4Addr, ops::RangeInclusive, sync::Arc};

use anyhow::Context;
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf,
};
use relay_bench_common::{
    BenchSinkConfig, BenchSinkCounters, BenchSinkRule, BENCH_PASS_PROGRAM, BENCH_SINK_CFG_MAP,
    BENCH_SINK_CHANNEL_DATA, BENCH_SINK_COUNTERS_MAP, BENCH_SINK_DROP, BENCH_SINK_MAX_RULES,
    BENCH_SINK_PROGRAM,
};

use super::lab::{in_ns, Lab, LISTEN_IP, PEER_IP};

/// A rule counting IPv4 UDP to `ip`/`prefix`, destination port in `ports`; `channel_data`:
/// only payloads that start like ChannelData.
pub fn rule(
    ip: Ipv4Addr,
    prefix: u32,
    ports: RangeInclusive<u16>,
    channel_data: bool,
) -> BenchSinkRule {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix.min(32))
    };
    BenchSinkRule {
        addr: u32::from_ne_bytes((u32::from(ip) & mask).to_be_bytes()),
        mask: u32::from_ne_bytes(mask.to_be_bytes()),
        port_min: *ports.start(),
        port_max: *ports.end(),
        flags: if channel_data {
            BENCH_SINK_CHANNEL_DATA
        } else {
            0
        },
    }
}

/// One attached copy of `relay_bench_sink`.
pub struct Sink {
    /// Holds the program and its link: dropping it detaches the sink.
    _ebpf: Ebpf,
    cfg: Array<MapData, BenchSinkConfig>,
    counters: PerCpuArray<MapData, BenchSinkCounters>,
    config: BenchSinkConfig,
    pub dev: String,
}

impl Sink {
    /// Loads the program from `object`, attaches it in driver mode to `dev` in namespace `ns`
    /// and installs `rules` with dropping on.
    pub fn attach(
        object: &Arc<Vec<u8>>,
        ns: &str,
        dev: &str,
        rules: &[BenchSinkRule],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            rules.len() <= BENCH_SINK_MAX_RULES as usize,
            "{} sink rules, the program holds {BENCH_SINK_MAX_RULES}",
            rules.len()
        );
        let mut config = BenchSinkConfig {
            flags: BENCH_SINK_DROP,
            n_rules: rules.len() as u32,
            ..BenchSinkConfig::default()
        };
        config.rules[..rules.len()].copy_from_slice(rules);
        let object = Arc::clone(object);
        let dev_name = dev.to_owned();
        // The ifindex lookup and the link creation happen in the calling thread's namespace.
        let (ebpf, mut cfg, counters) = in_ns(ns, move || {
            let mut ebpf = Ebpf::load(&object).context("loading the eBPF object")?;
            let program: &mut Xdp = ebpf
                .program_mut(BENCH_SINK_PROGRAM)
                .with_context(|| {
                    format!("no program {BENCH_SINK_PROGRAM} (rebuild: cargo xtask build-ebpf)")
                })?
                .try_into()?;
            program.load().map_err(|e| {
                anyhow::anyhow!("loading {BENCH_SINK_PROGRAM}: {}", error_chain(&e))
            })?;
            program
                .attach(&dev_name, XdpMode::Driver)
                .map_err(|e| anyhow::anyhow!("attaching to {dev_name}: {}", error_chain(&e)))?;
            let cfg = Array::try_from(
                ebpf.take_map(BENCH_SINK_CFG_MAP)
                    .context(BENCH_SINK_CFG_MAP)?,
            )?;
            let counters = PerCpuArray::try_from(
                ebpf.take_map(BENCH_SINK_COUNTERS_MAP)
                    .context(BENCH_SINK_COUNTERS_MAP)?,
            )?;
            Ok((ebpf, cfg, counters))
        })
        .with_context(|| format!("far-end sink on {dev}"))?;
        cfg.set(0, config, 0)?;
        Ok(Self {
            _ebpf: ebpf,
            cfg,
            counters,
            config,
            dev: dev.to_owned(),
        })
    }

    /// Drop the matched frames (floods) or pass them to the stack (latency probe, whose echo
    /// needs sockets). Counted either way.
    pub fn set_drop(&mut self, drop: bool) -> anyhow::Result<()> {
        if drop {
            self.config.flags |= BENCH_SINK_DROP;
        } else {
            self.config.flags &= !BENCH_SINK_DROP;
        }
        self.cfg.set(0, self.config, 0)?;
        Ok(())
    }

    /// Frames and bytes of rule `class`, summed over the CPUs.
    pub fn read(&self, class: u32) -> anyhow::Result<BenchSinkCounters> {
        let per_cpu = self
            .counters
            .get(&class, 0)
            .with_context(|| format!("reading the sink counters on {}", self.dev))?;
        Ok(per_cpu
            .iter()
            .fold(BenchSinkCounters::default(), |sum, c| BenchSinkCounters {
                frames: sum.frames + c.frames,
                bytes: sum.bytes + c.bytes,
            }))
    }
}

/// `relay_bench_pass` from `object`, attached in driver mode to `dev` in namespace `ns` until
/// the returned object is dropped.
pub fn pass_hook(object: &Arc<Vec<u8>>, ns: &str, dev: &str) -> anyhow::Result<Ebpf> {
    let object = Arc::clone(object);
    let dev_name = dev.to_owned();
    // The ifindex lookup and the link creation happen in the calling thread's namespace.
    in_ns(ns, move || {
        let mut ebpf = Ebpf::load(&object).context("loading the benchmark's eBPF object")?;
        let program: &mut Xdp = ebpf
            .program_mut(BENCH_PASS_PROGRAM)
            .with_context(|| format!("no program {BENCH_PASS_PROGRAM}"))?
            .try_into()?;
        program
            .load()
            .map_err(|e| anyhow::anyhow!("loading {BENCH_PASS_PROGRAM}: {}", error_chain(&e)))?;
        program
            .attach(&dev_name, XdpMode::Driver)
            .map_err(|e| anyhow::anyhow!("attaching to {dev_name}: {}", error_chain(&e)))?;
        Ok(ebpf)
    })
    .with_context(|| format!("far-end XDP_PASS on {dev}"))
}

/// The far ends of the relay paths: the peer's veth end (client → peer traffic) and the
/// clients' (peer → client ChannelData and Data indications; STUN responses pass, so the control plane works).
pub struct FarEnds {
    pub peer: Sink,
    pub client: Sink,
}

/// The class every benchmark sink counts its flood under (each sink has one rule).
pub const FLOOD_CLASS: u32 = 0;

impl FarEnds {
    pub fn attach(lab: &Lab, object: &Arc<Vec<u8>>, peer_port: u16) -> anyhow::Result<Self> {
        let peer = Sink::attach(
            object,
            &lab.peer,
            &lab.p0,
            &[rule(PEER_IP, 32, peer_port..=peer_port, false)],
        )?;
        // Client addresses (198.18.1.2 and up, lab.rs), any port, ChannelData and Data indications.
        let client = Sink::attach(
            object,
            &lab.client,
            &lab.c0,
            &[rule(LISTEN_IP, 24, 1..=u16::MAX, true)],
        )?;
        Ok(Self { peer, client })
    }

    pub fn set_drop(&mut self, drop: bool) -> anyhow::Result<()> {
        self.peer.set_drop(drop)?;
        self.client.set_drop(drop)
    }
}

/// Where a flood's delivered frames are counted.
pub struct Delivery<'a> {
    pub c2p: &'a Sink,
    pub p2c: Option<&'a Sink>,
}

/// Delivered counts at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeliveryCount {
    pub c2p: BenchSinkCounters,
    pub p2c: BenchSinkCounters,
}

impl Delivery<'_> {
    pub fn read(&self) -> anyhow::Result<DeliveryCount> {
        Ok(DeliveryCount {
            c2p: self.c2p.read(FLOOD_CLASS)?,
            p2c: match self.p2c {
                Some(s) => s.read(FLOOD_CLASS)?,
                None => BenchSinkCounters::default(),
            },
        })
    }
}

impl DeliveryCount {
    pub fn since(&self, before: &Self) -> Self {
        let d = |a: BenchSinkCounters, b: BenchSinkCounters| BenchSinkCounters {
            frames: a.frames.saturating_sub(b.frames),
            bytes: a.bytes.saturating_sub(b.bytes),
        };
        Self {
            c2p: d(self.c2p, before.c2p),
            p2c: d(self.p2c, before.p2c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_hold_network_order_addresses_and_masks() {
        let r = rule(Ipv4Addr::new(198, 18, 1, 77), 24, 1..=65535, true);
        assert_eq!(r.addr.to_ne_bytes(), [198, 18, 1, 0]);
        assert_eq!(r.mask.to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!((r.port_min, r.port_max), (1, 65535));
        assert_eq!(r.flags, BENCH_SINK_CHANNEL_DATA);
        let host = rule(Ipv4Addr::new(198, 18, 2, 2), 32, 9000..=9000, false);
        assert_eq!(host.addr.to_ne_bytes(), [198, 18, 2, 2]);
        assert_eq!(host.mask, u32::MAX);
        assert_eq!(rule(Ipv4Addr::new(1, 2, 3, 4), 0, 0..=0, false).mask, 0);
    }
}
