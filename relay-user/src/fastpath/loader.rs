//! Loading, attaching and detaching the kernel programs, and the map API the daemon drives.

use std::{fmt, io, time::Instant};

use aya::{
    maps::{DevMapHash, HashMap, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        tc, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfError,
};
use relay_common::{
    ChannelKey, PeerKey, Reason, ToClient, ToPeer, ALLOCATION_COUNTERS_MAP, CHANNELS_MAP,
    EGRESS_DEVICES_MAP, FLAG_ENABLED, LISTENER_PORTS_MAP, PEERS_MAP, TC_PROGRAM,
    VERDICT_COUNTERS_MAP, XDP_PASS_PROGRAM, XDP_PROGRAM,
};

use super::{
    binding::{self, ChannelBinding},
    EBPF_OBJECT,
};

/// How the kernel program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP: runs before the kernel allocates an skb.
    XdpNative,
    /// Generic (SKB) XDP: works on any interface, slower; a fallback for drivers without XDP.
    XdpGeneric,
    /// TC ingress (TCX on kernels >= 6.6, a clsact qdisc before): the same forwarding logic on
    /// skbs. Works where XDP does not (e.g. next to another XDP program).
    Tc,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::XdpNative => "xdp (native)",
            AttachMode::XdpGeneric => "xdp-generic (skb)",
            AttachMode::Tc => "tc (ingress)",
        })
    }
}

/// What went wrong in the fast path; `Display` carries the hint an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error("cannot parse the embedded eBPF object: {0}")]
    Object(#[source] EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("program `{name}` has an unexpected type: {source}")]
    ProgramType {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "the kernel refused to load `{name}` ({io_error}).\n\
         --- verifier log ---\n{verifier_log}\n--- end of verifier log ---\n\
         hint: loading BPF programs needs root (CAP_BPF + CAP_NET_ADMIN) and a kernel with BTF"
    )]
    Verifier {
        name: &'static str,
        io_error: std::io::Error,
        verifier_log: String,
    },
    #[error("loading `{name}` failed: {source}")]
    Load {
        name: &'static str,
        source: ProgramError,
    },
    #[error("no network interface named `{0}`")]
    UnknownInterface(String),
    #[error(
        "attaching {} in {mode} mode to `{interface}` failed: {source}\n\
         hint: {hint}",
        if *.mode == AttachMode::Tc { "TC" } else { "XDP" }
    )]
    Attach {
        interface: String,
        mode: AttachMode,
        source: ProgramError,
        hint: &'static str,
    },
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error(
        "registering `{interface}` as an egress device failed: {source}\n\
         hint: the kernel needs DEVMAP_HASH support (Linux >= 5.4)"
    )]
    EgressDevice {
        interface: String,
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("the fast path cannot carry this binding: {0}")]
    Unsupported(&'static str),
    #[error("counting CPUs: {0}")]
    Cpus(#[source] io::Error),
    #[error("BPF_PROG_TEST_RUN of `{name}` failed: {source}")]
    TestRun {
        name: &'static str,
        source: ProgramError,
    },
}

/// Packets and bytes the kernel forwarded for one allocation (the map's per-CPU value type,
/// summed over CPUs by [`FastPath::allocation_counters`]). Bytes are application data
/// (ChannelData payload without header and padding).
pub use relay_common::AllocationCounters;

/// Which program [`FastPath::test_run`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestProgram {
    Xdp,
    Tc,
}

/// Result of one [`FastPath::test_run`]: the program's return code (XDP action or TC action)
/// and the frame as the program left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    pub action: u32,
    pub frame: Vec<u8>,
}

/// The loaded kernel programs, their maps and the interfaces they are attached to.
///
/// Dropping it detaches every program and frees every map: nothing is pinned, so a restart
/// starts clean.
///
/// Forwarding needs, besides the entries installed here: the interfaces of both legs attached
/// (the program redirects only into attached interfaces), IP forwarding enabled on them
/// (`bpf_fib_lookup` refuses otherwise: `net.ipv4.conf.IFACE.forwarding=1`,
/// `net.ipv6.conf.IFACE.forwarding=1`), and senders that put complete UDP checksums on the wire
/// (the program updates checksums incrementally; see `relay-ebpf`).
pub struct FastPath {
    ebpf: Ebpf,
    attached: Vec<(String, AttachMode)>,
}

impl FastPath {
    /// Parses the embedded object and loads its programs into the kernel (not attached yet).
    pub fn load() -> Result<Self, FastPathError> {
        Self::load_object(EBPF_OBJECT)
    }

    /// Like [`FastPath::load`], from another build of the eBPF object (e.g. a baseline that a
    /// benchmark compares against). The object must define the same programs and maps.
    pub fn load_object(object: &[u8]) -> Result<Self, FastPathError> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(object).map_err(FastPathError::Object)?;
        for name in [XDP_PROGRAM, XDP_PASS_PROGRAM] {
            let result = xdp_program(&mut ebpf, name)?.load();
            result.map_err(|source| load_error(name, source))?;
        }
        let result = tc_program(&mut ebpf)?.load();
        result.map_err(|source| load_error(TC_PROGRAM, source))?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// Attaches the forwarding program to `interface` in `mode` and registers the interface as
    /// an egress device. Runs in the calling thread's network namespace.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<(), FastPathError> {
        let attach_error = |source: ProgramError| match source {
            ProgramError::UnknownInterface { name } => FastPathError::UnknownInterface(name),
            source => FastPathError::Attach {
                interface: interface.to_owned(),
                mode,
                hint: match mode {
                    AttachMode::XdpNative => {
                        "the driver may not support native XDP, or another XDP program is \
                         attached; try generic mode (--fastpath xdp-generic), or run with \
                         --fastpath off (the socket path works on its own)"
                    }
                    AttachMode::XdpGeneric => {
                        "another XDP program may be attached to this interface \
                         (`ip link show dev IFACE`); run with --fastpath off to use the socket \
                         path alone"
                    }
                    AttachMode::Tc => {
                        "TC needs CAP_NET_ADMIN and, before Linux 6.6, a clsact qdisc; run \
                         with --fastpath off to use the socket path alone"
                    }
                },
                source,
            },
        };
        let ifindex = ifindex(interface)?;
        match mode {
            AttachMode::XdpNative | AttachMode::XdpGeneric => {
                let xdp_mode = if mode == AttachMode::XdpNative {
                    XdpMode::Driver
                } else {
                    XdpMode::Skb
                };
                xdp_program(&mut self.ebpf, XDP_PROGRAM)?
                    .attach(interface, xdp_mode)
                    .map_err(attach_error)?;
            }
            AttachMode::Tc => {
                // TCX (>= 6.6) needs no qdisc; older kernels attach through clsact.
                let tcx = aya::util::KernelVersion::current()
                    .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
                if !tcx {
                    if let Err(error) = tc::qdisc_add_clsact(interface) {
                        tracing::debug!("clsact on {interface}: {error} (may already exist)");
                    }
                }
                tc_program(&mut self.ebpf)?
                    .attach(interface, TcAttachType::Ingress)
                    .map_err(attach_error)?;
            }
        }
        warn_if_not_forwarding(interface);
        let mut devices = self.egress_devices()?;
        devices
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| FastPathError::EgressDevice {
                interface: interface.to_owned(),
                source,
            })?;
        self.attached.push((interface.to_owned(), mode));
        Ok(())
    }

    /// Attaches `relay_xdp_pass` (XDP_PASS for every frame) natively to `interface`: the far
    /// end of a veth that the fast path transmits into needs an XDP program, or veth drops the
    /// frames. Not listed in [`FastPath::attached`]; detached on drop like the rest.
    pub fn attach_pass(&mut self, interface: &str) -> Result<(), FastPathError> {
        xdp_program(&mut self.ebpf, XDP_PASS_PROGRAM)?
            .attach(interface, XdpMode::Driver)
            .map_err(|source| match source {
                ProgramError::UnknownInterface { name } => FastPathError::UnknownInterface(name),
                source => FastPathError::Attach {
                    interface: interface.to_owned(),
                    mode: AttachMode::XdpNative,
                    hint: "is another XDP program attached to this interface?",
                    source,
                },
            })?;
        Ok(())
    }

    /// Interfaces the forwarding program is attached to, with their mode.
    pub fn attached(&self) -> &[(String, AttachMode)] {
        &self.attached
    }

    /// Installs both directions of a channel binding (or refreshes them: same key, new value),
    /// and creates the allocation's counters if they do not exist yet.
    ///
    /// Client, listener, relayed and peer address must be of one family: the kernel does not
    /// translate between IPv4 and IPv6 (such bindings stay on the socket path).
    pub fn install_channel(&mut self, binding: &ChannelBinding) -> Result<(), FastPathError> {
        let (channel_key, to_peer, peer_key, to_client) = binding::entries(binding)?;
        let expires_at_ns = monotonic_ns(binding.expires_at);
        let to_peer = ToPeer {
            expires_at_ns,
            flags: FLAG_ENABLED,
            ..to_peer
        };
        let to_client = ToClient {
            expires_at_ns,
            flags: FLAG_ENABLED as u16,
            ..to_client
        };

        // Counters first, so the kernel never has to create them.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| FastPathError::Cpus(e))?;
        let zero = PerCpuValues::try_from(vec![AllocationCounters::default(); cpus])
            .map_err(FastPathError::Cpus)?;
        const BPF_NOEXIST: u64 = 1;
        match self
            .allocation_counter_map()?
            .insert(binding.allocation, zero, BPF_NOEXIST)
        {
            Ok(()) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(map_error(ALLOCATION_COUNTERS_MAP)(source)),
        }

        // The kernel reads client ChannelData only on listener ports; listeners never change
        // while the relay runs, so a port stays registered once seen.
        let port = binding.listener.port().to_be();
        let mut listener_ports: HashMap<&mut aya::maps::MapData, u16, u8> =
            typed_map(&mut self.ebpf, LISTENER_PORTS_MAP)?;
        listener_ports
            .insert(port, 1, 0)
            .map_err(map_error(LISTENER_PORTS_MAP))?;

        // Peer → client first: a client's ChannelData is then never forwarded to a peer whose
        // answers the kernel could not bring back.
        self.peer_map()?
            .insert(peer_key, to_client, 0)
            .map_err(map_error(PEERS_MAP))?;
        self.channel_map()?
            .insert(channel_key, to_peer, 0)
            .map_err(map_error(CHANNELS_MAP))
    }

    /// Removes both directions of a channel binding. Entries that are already gone are not an
    /// error. The allocation's counters stay (see [`FastPath::remove_allocation_counters`]).
    pub fn remove_channel(&mut self, binding: &ChannelBinding) -> Result<(), FastPathError> {
        let (channel_key, _, peer_key, _) = binding::entries(binding)?;
        let removed = self.channel_map()?.remove(&channel_key);
        ignore_missing(removed).map_err(map_error(CHANNELS_MAP))?;
        let removed = self.peer_map()?.remove(&peer_key);
        ignore_missing(removed).map_err(map_error(PEERS_MAP))
    }

    /// Packets and bytes the kernel forwarded for `allocation`, summed over CPUs (zero if the
    /// kernel never forwarded anything for it).
    pub fn allocation_counters(
        &self,
        allocation: u64,
    ) -> Result<AllocationCounters, FastPathError> {
        let map = self
            .ebpf
            .map(ALLOCATION_COUNTERS_MAP)
            .ok_or(FastPathError::MissingMap(ALLOCATION_COUNTERS_MAP))?;
        let counters = PerCpuHashMap::<_, u64, AllocationCounters>::try_from(map)
            .map_err(map_error(ALLOCATION_COUNTERS_MAP))?;
        let per_cpu = match counters.get(&allocation, 0) {
            Ok(values) => values,
            Err(MapError::KeyNotFound) => return Ok(AllocationCounters::default()),
            Err(source) => return Err(map_error(ALLOCATION_COUNTERS_MAP)(source)),
        };
        Ok(per_cpu
            .iter()
            .fold(AllocationCounters::default(), |sum, cpu| {
                AllocationCounters {
                    to_peer_packets: sum.to_peer_packets + cpu.to_peer_packets,
                    to_peer_bytes: sum.to_peer_bytes + cpu.to_peer_bytes,
                    to_client_packets: sum.to_client_packets + cpu.to_client_packets,
                    to_client_bytes: sum.to_client_bytes + cpu.to_client_bytes,
                }
            }))
    }

    /// Forgets `allocation`'s counters (after its last binding is removed and the counters
    /// were read for the last time). Missing counters are not an error.
    pub fn remove_allocation_counters(&mut self, allocation: u64) -> Result<(), FastPathError> {
        let removed = self.allocation_counter_map()?.remove(&allocation);
        ignore_missing(removed).map_err(map_error(ALLOCATION_COUNTERS_MAP))
    }

    /// Verdict counters summed over all CPUs, in [`Reason`] order.
    pub fn verdict_counters(&self) -> Result<Vec<(Reason, u64)>, FastPathError> {
        let map = self
            .ebpf
            .map(VERDICT_COUNTERS_MAP)
            .ok_or(FastPathError::MissingMap(VERDICT_COUNTERS_MAP))?;
        let counters =
            PerCpuArray::<_, u64>::try_from(map).map_err(map_error(VERDICT_COUNTERS_MAP))?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = counters
                    .get(&reason.index(), 0)
                    .map_err(map_error(VERDICT_COUNTERS_MAP))?;
                Ok((reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Runs one frame through the forwarding program with `BPF_PROG_TEST_RUN`, as if it had
    /// arrived on `ingress_ifindex` (an interface in the calling thread's namespace: the FIB
    /// lookup runs there). Maps and counters are the live ones. For packet fixtures and
    /// start-up self-tests; nothing is sent.
    pub fn test_run(
        &mut self,
        program: TestProgram,
        frame: &[u8],
        ingress_ifindex: u32,
    ) -> Result<TestRunOutput, FastPathError> {
        self.test_run_repeat(program, frame, ingress_ifindex, 1)
            .map(|(output, _)| output)
    }

    /// [`FastPath::test_run`] with the kernel running the program `repeat` times in a row on
    /// the same buffer; also returns the kernel's average time per run (which includes the
    /// test harness's own per-run overhead).
    ///
    /// The kernel does not restore the frame between runs: from the second run on, the program
    /// sees what the previous run left. Only frames the program does not change (passed ones)
    /// measure what they seem to with `repeat > 1`; time a forwarded frame with `repeat = 1`
    /// over many calls instead.
    pub fn test_run_repeat(
        &mut self,
        program: TestProgram,
        frame: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
    ) -> Result<(TestRunOutput, std::time::Duration), FastPathError> {
        // Room for the frame to grow (the peer → client direction adds four bytes).
        let mut out = vec![0u8; frame.len() + 256];
        let (name, result) = match program {
            TestProgram::Xdp => {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex. The kernel wants data = 0 and data_end = the frame length.
                let mut ctx = [0u8; 24];
                ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                };
                (
                    XDP_PROGRAM,
                    xdp_program(&mut self.ebpf, XDP_PROGRAM)?.test_run(opts),
                )
            }
            TestProgram::Tc => {
                // struct __sk_buff (192 bytes): ingress_ifindex at 36 and ifindex at 40 are the
                // only fields set; the kernel rejects most others when non-zero.
                let mut ctx = [0u8; 192];
                ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                ctx[40..44].copy_from_slice(&ingress_ifindex.to_ne_bytes());
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    repeat,
                    ..TestRunOptions::default()
                };
                (TC_PROGRAM, tc_program(&mut self.ebpf)?.test_run(opts))
            }
        };
        let result = result.map_err(|source| FastPathError::TestRun { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok((
            TestRunOutput {
                action: result.return_value,
                frame: out,
            },
            result.duration,
        ))
    }

    fn channel_map(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, ChannelKey, ToPeer>, FastPathError> {
        typed_map(&mut self.ebpf, CHANNELS_MAP)
    }

    fn peer_map(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, PeerKey, ToClient>, FastPathError> {
        typed_map(&mut self.ebpf, PEERS_MAP)
    }

    fn allocation_counter_map(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut aya::maps::MapData, u64, AllocationCounters>, FastPathError>
    {
        typed_map(&mut self.ebpf, ALLOCATION_COUNTERS_MAP)
    }

    fn egress_devices(&mut self) -> Result<DevMapHash<&mut aya::maps::MapData>, FastPathError> {
        typed_map(&mut self.ebpf, EGRESS_DEVICES_MAP)
    }
}

/// Looks map `name` up and converts it to its typed wrapper.
fn typed_map<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, FastPathError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    let map = ebpf.map_mut(name).ok_or(FastPathError::MissingMap(name))?;
    M::try_from(map).map_err(map_error(name))
}

/// Names the map a map operation failed on.
fn map_error(name: &'static str) -> impl FnOnce(MapError) -> FastPathError {
    move |source| FastPathError::Map { name, source }
}

/// `Ok` for a successful delete and for a key that was not there.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn load_error(name: &'static str, source: ProgramError) -> FastPathError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => FastPathError::Verifier {
            name,
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => FastPathError::Load { name, source },
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, FastPathError> {
    ebpf.program_mut(name)
        .ok_or(FastPathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| FastPathError::ProgramType { name, source })
}

fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, FastPathError> {
    ebpf.program_mut(TC_PROGRAM)
        .ok_or(FastPathError::MissingProgram(TC_PROGRAM))?
        .try_into()
        .map_err(|source| FastPathError::ProgramType {
            name: TC_PROGRAM,
            source,
        })
}

/// The ifindex of `interface` in the calling thread's network namespace.
fn ifindex(interface: &str) -> Result<u32, FastPathError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| FastPathError::UnknownInterface(interface.to_owned()))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(FastPathError::UnknownInterface(interface.to_owned()));
    }
    Ok(index)
}

/// `bpf_fib_lookup` answers "forwarding disabled" for interfaces without IP forwarding, and the
/// fast path then passes everything (counted as `pass_fib_forwarding_disabled`). Say so once.
fn warn_if_not_forwarding(interface: &str) {
    for family in ["ipv4", "ipv6"] {
        let path = format!("/proc/sys/net/{family}/conf/{interface}/forwarding");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                "{family} forwarding is off on {interface}: the kernel fast path will pass \
                 {family} traffic to the socket path (sysctl -w net.{family}.conf.{interface}.forwarding=1)"
            );
        }
    }
}

/// `deadline` on the kernel's clock: CLOCK_MONOTONIC nanoseconds, as `bpf_ktime_get_ns` reads.
///
/// Rust's `Instant` is CLOCK_MONOTONIC on Linux but opaque, so the conversion goes through
/// "now" on both clocks; the two reads are microseconds apart, negligible against binding
/// lifetimes of minutes.
pub(crate) fn monotonic_ns(deadline: Instant) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the struct we pass by pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "CLOCK_MONOTONIC is always available on Linux");
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let instant_now = Instant::now();
    match deadline.checked_duration_since(instant_now) {
        Some(ahead) => now_ns.saturating_add(ahead.as_nanos().min(u64::MAX as u128) as u64),
        None => now_ns.saturating_sub(instant_now.duration_since(deadline).as_nanos() as u64),
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass by reference; failure is harmless here
    // (the load error that follows, if any, names the real problem).
    let result = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if result != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn deadlines_land_on_the_monotonic_clock() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: as in `monotonic_ns`.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let before = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let in_a_minute = monotonic_ns(Instant::now() + Duration::from_secs(60));
        let ago = monotonic_ns(Instant::now() - Duration::from_millis(1));
        let ahead = in_a_minute - before;
        assert!(
            (59_900_000_000..60_100_000_000).contains(&ahead),
            "{ahead} ns ahead"
        );
        assert!(
            ago <= before + 1_000_000,
            "a past deadline stays in the past"
        );
    }
}
