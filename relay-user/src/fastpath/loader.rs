//! Loading, attaching and detaching the kernel programs.

use std::fmt;

use aya::{
    maps::PerCpuArray,
    programs::{ProgramError, Xdp, XdpMode},
    Ebpf, EbpfError,
};
use relay_common::{Reason, VERDICT_COUNTERS_MAP, XDP_PROGRAM};

use super::EBPF_OBJECT;

/// How the XDP program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP: runs before the kernel allocates an skb.
    XdpNative,
    /// Generic (SKB) XDP: works on any interface, slower; a fallback for drivers without XDP.
    XdpGeneric,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::XdpNative => "xdp (native)",
            AttachMode::XdpGeneric => "xdp-generic (skb)",
        })
    }
}

/// What went wrong bringing up the fast path; `Display` carries the hint an operator needs.
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
        "attaching XDP in {mode} mode to `{interface}` failed: {source}\n\
         hint: {hint}"
    )]
    Attach {
        interface: String,
        mode: AttachMode,
        source: ProgramError,
        hint: &'static str,
    },
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("reading map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// The loaded kernel programs and the interfaces they are attached to.
///
/// Dropping it detaches every program and frees every map: nothing is pinned, so a restart
/// starts clean.
pub struct FastPath {
    ebpf: Ebpf,
    attached: Vec<(String, AttachMode)>,
}

impl FastPath {
    /// Parses the embedded object and loads the XDP program into the kernel (not attached yet).
    pub fn load() -> Result<Self, FastPathError> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(FastPathError::Object)?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(|source| match source {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => FastPathError::Verifier {
                name: XDP_PROGRAM,
                io_error,
                verifier_log: verifier_log.to_string(),
            },
            source => FastPathError::Load {
                name: XDP_PROGRAM,
                source,
            },
        })?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
        })
    }

    /// Attaches the XDP program to `interface` in `mode`.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<(), FastPathError> {
        let program = xdp_program(&mut self.ebpf)?;
        let xdp_mode = match mode {
            AttachMode::XdpNative => XdpMode::Driver,
            AttachMode::XdpGeneric => XdpMode::Skb,
        };
        program
            .attach(interface, xdp_mode)
            .map_err(|source| match source {
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
                    },
                    source,
                },
            })?;
        self.attached.push((interface.to_owned(), mode));
        Ok(())
    }

    /// Interfaces the program is attached to, with their mode.
    pub fn attached(&self) -> &[(String, AttachMode)] {
        &self.attached
    }

    /// Verdict counters summed over all CPUs, in [`Reason`] order.
    pub fn verdict_counters(&self) -> Result<Vec<(Reason, u64)>, FastPathError> {
        let map = self
            .ebpf
            .map(VERDICT_COUNTERS_MAP)
            .ok_or(FastPathError::MissingMap(VERDICT_COUNTERS_MAP))?;
        let counters =
            PerCpuArray::<_, u64>::try_from(map).map_err(|source| FastPathError::Map {
                name: VERDICT_COUNTERS_MAP,
                source,
            })?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu =
                    counters
                        .get(&reason.index(), 0)
                        .map_err(|source| FastPathError::Map {
                            name: VERDICT_COUNTERS_MAP,
                            source,
                        })?;
                Ok((reason, per_cpu.iter().sum()))
            })
            .collect()
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, FastPathError> {
    ebpf.program_mut(XDP_PROGRAM)
        .ok_or(FastPathError::MissingProgram(XDP_PROGRAM))?
        .try_into()
        .map_err(|source| FastPathError::ProgramType {
            name: XDP_PROGRAM,
            source,
        })
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
