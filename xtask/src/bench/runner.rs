//! One runner per path: start the server under test in the relay namespace (pinned to the
//! relay core), set up allocations through the real TURN control plane, flood, measure, stop.
//! The generator-ceiling "path" runs the same flood into a bare sink with no server at all.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{
    lab::{self, check_stop, in_ns, Lab, UdpCounters, LISTEN_IP, PEER_IP, RELAY_IP},
    loadgen::{self, FloodPlan, GenStats, Generator, SendGroup},
    measure,
    sink::{Delivery, DeliveryCount},
    turn::{self, Allocation, FIRST_CHANNEL},
};

pub const LISTEN_PORT: u16 = 3478;
pub const PEER_PORT: u16 = 9000;
/// Where the generator-ceiling flood goes: a bare socket in the relay namespace.
pub const CEILING_PORT: u16 = 9999;
/// The reference forwarder's relayed port (on RELAY_IP).
pub const REFERENCE_PORT: u16 = 40_000;
const REALM: &str = "bench.lab";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathKind {
    /// Generator → sink, no relay: the generator's own ceiling.
    Generator,
    /// `relay serve --fastpath off`.
    Socket,
    /// `relay serve --fastpath xdp`.
    Xdp,
    /// `relay serve --fastpath tc`.
    Tc,
    /// coturn's `turnserver`.
    Coturn,
    /// A minimal recvmmsg+GSO forwarder with no TURN logic (`cargo xtask bench-forwarder`),
    /// client→peer only: the floor of what the socket path's I/O costs.
    Reference,
    /// A minimal XDP forwarder with no TURN logic (`cargo xtask bench-raw-xdp`), client→peer
    /// only: the floor of what the XDP fast path's frame work costs.
    RawXdp,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Generator => "generator",
            Self::Socket => "socket",
            Self::Xdp => "xdp",
            Self::Tc => "tc",
            Self::Coturn => "coturn",
            Self::Reference => "reference",
            Self::RawXdp => "raw-xdp",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "generator" => Self::Generator,
            "socket" => Self::Socket,
            "xdp" => Self::Xdp,
            "tc" => Self::Tc,
            "coturn" => Self::Coturn,
            "reference" => Self::Reference,
            "raw-xdp" => Self::RawXdp,
            other => {
                bail!(
                    "unknown path {other:?} (generator, socket, xdp, tc, coturn, reference, \
                     raw-xdp)"
                )
            }
        })
    }

    /// Whether the path forwards in kernel programs (whose run time bpftool reports, and
    /// whose transmits need an XDP program on the far veth ends).
    pub fn is_kernel(self) -> bool {
        matches!(self, Self::Xdp | Self::Tc | Self::RawXdp)
    }

    /// Whether the path forwards peer→client too (the minimal forwarders do not).
    pub fn both_directions(self) -> bool {
        !matches!(self, Self::Reference | Self::RawXdp)
    }

    /// Whether the path is one of the minimal forwarders without TURN (and without a control
    /// plane: their "allocations" are bare client sockets).
    pub fn is_bare_forwarder(self) -> bool {
        matches!(self, Self::Reference | Self::RawXdp)
    }
}

/// How the client frames its data towards the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Framing {
    /// ChannelData on a bound channel (RFC 8656 §12): 4 bytes of header.
    ChannelData,
    /// Send indications on an allocation with a permission and no channel (§11.2): 36 bytes
    /// of STUN framing client→peer; in the both-directions variant ("send+data") the peer's
    /// datagrams come back as Data indications (§11.3).
    Send,
}

/// Ordered so each Send variant sorts right after the ChannelData one it is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub payload: usize,
    pub flows: usize,
    pub bidi: bool,
    pub framing: Framing,
    /// 0: a flood (the generator offers all it can). Otherwise the VoIP-shaped variant: every
    /// flow paced at this many datagrams per second in each direction, so the offered rate is
    /// fixed (flows x this, per direction) and every path can carry it.
    pub pps_per_flow: u32,
}

impl Variant {
    pub fn label(&self) -> String {
        let direction = match (self.framing, self.bidi) {
            (Framing::Send, false) => "send",
            (Framing::Send, true) => "send+data",
            (Framing::ChannelData, true) => "both",
            (Framing::ChannelData, false) => "c>p",
        };
        if self.is_voip() {
            return format!("{}B x{} voip", self.payload, self.flows);
        }
        format!("{}B x{} {direction}", self.payload, self.flows)
    }

    /// The VoIP-shaped variant: many allocations, each paced at a call's rate.
    pub fn is_voip(&self) -> bool {
        self.pps_per_flow > 0
    }

    /// The paced rate of one direction (VoIP-shaped variant), datagrams per second.
    pub fn voip_rate_per_direction(&self) -> Option<f64> {
        self.is_voip()
            .then(|| self.flows as f64 * f64::from(self.pps_per_flow))
    }

    /// Whether the peak zero-loss search runs after this variant's flood: one direction and
    /// ChannelData (the comparison; the paced generator drives one direction).
    pub fn searched(&self) -> bool {
        !self.bidi && self.framing == Framing::ChannelData && !self.is_voip()
    }

    pub fn is_send(&self) -> bool {
        self.framing == Framing::Send
    }

    /// Why `path` does not run this variant, if it does not.
    pub fn not_applicable(&self, path: PathKind) -> Option<&'static str> {
        if self.is_send() && path.is_bare_forwarder() {
            Some("ChannelData only")
        } else if self.bidi && !path.both_directions() {
            Some("client->peer only")
        } else {
            None
        }
    }
}

/// Settings shared by every runner.
pub struct Ctx {
    pub relay_bin: PathBuf,
    pub out: PathBuf,
    pub gen_cpu: usize,
    pub relay_cpu: usize,
    pub duration: Duration,
    pub settle: Duration,
    pub max_packets: u64,
    pub latency_rate: u32,
    pub latency_duration: Duration,
    pub secret: String,
    /// How long a server that needs a bound (the reference and raw XDP forwarders) may run:
    /// one path's floods, settles and latency probe, with room to spare.
    pub server_bound: Duration,
    /// The benchmark's eBPF object (relay-bench-ebpf): the raw XDP forwarder's program.
    pub bench_object: PathBuf,
    /// coturn's `turnserver` and the arguments appended to the benchmark's own.
    pub coturn_bin: PathBuf,
    pub coturn_args: Vec<String>,
}

/// What one flood measured. Delivered counts come from the far-end sinks (XDP counters on the
/// receiving veth ends), or, when they could not be attached, the receiving namespace's UDP
/// layer.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    pub elapsed_s: f64,
    pub sent_c2p: u64,
    pub sent_p2c: u64,
    pub delivered_c2p: u64,
    pub delivered_p2c: u64,
    pub send_errors: u64,
    /// Relay namespace RcvbufErrors: datagrams the server's sockets had no room for.
    pub relay_rcvbuf_errors: u64,
    /// Checksum errors at the receivers (a broken kernel path shows up here).
    pub csum_errors: u64,
    /// Frames the veth ends towards the far ends refused (ring full): non-zero means the far
    /// end, not the server, limited part of the flood (see `Lab::xmit_drops`).
    pub far_end_drops: u64,
    /// Server process CPU time (its threads' schedstat run time).
    pub process_cpu_ns: Option<u64>,
    /// Busy time of the relay core (process, softirq, NAPI threads pinned there).
    pub core_cpu_ns: u64,
    /// BPF programs in the relay namespace (needs kernel.bpf_stats_enabled=1).
    pub bpf_run_ns: Option<u64>,
    pub bpf_runs: Option<u64>,
}

impl Measurement {
    pub fn sent(&self) -> u64 {
        self.sent_c2p + self.sent_p2c
    }

    pub fn delivered(&self) -> u64 {
        self.delivered_c2p + self.delivered_p2c
    }

    pub fn pps(&self) -> f64 {
        self.delivered() as f64 / self.elapsed_s.max(1e-9)
    }

    pub fn offered_pps(&self) -> f64 {
        self.sent() as f64 / self.elapsed_s.max(1e-9)
    }
}

/// A server under test, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    child: Child,
    pub pid: u32,
    log: Arc<Mutex<String>>,
    log_file: Option<PathBuf>,
}

impl Server {
    pub fn log_tail(&self, lines: usize) -> String {
        let text = match &self.log_file {
            Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
            None => self.log.lock().map(|l| l.clone()).unwrap_or_default(),
        };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill only signals our own child, which we have not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        for _ in 0..60 {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_logged(mut command: Command) -> anyhow::Result<(Child, Arc<Mutex<String>>)> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("spawning the server")?;
    let stderr = child.stderr.take().context("piped stderr")?;
    let log = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut log) = sink.lock() {
                // Bounded: a chatty server must not grow the benchmark's memory.
                if log.len() > 1 << 20 {
                    log.drain(..1 << 19);
                }
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    Ok((child, log))
}

/// Starts the server for `path`; Err(reason) means the path is unavailable on this build or
/// machine (reported, not fatal).
pub fn start(path: PathKind, lab: &Lab, ctx: &Ctx) -> Result<Server, String> {
    match path {
        PathKind::Generator => Err("not a server".to_owned()),
        PathKind::Coturn => start_coturn(lab, ctx, None),
        PathKind::Reference => start_reference(lab, ctx),
        PathKind::RawXdp => start_raw_xdp(lab, ctx),
        _ => start_relay(path, lab, ctx, None),
    }
}

/// TCP and TLS client listeners on LISTEN_IP for the stream-client variant (stream.rs), with
/// the certificate and key (PEM files) the TLS one serves.
pub struct StreamListen<'a> {
    pub tcp_port: u16,
    pub tls_port: u16,
    pub cert: &'a std::path::Path,
    pub key: &'a std::path::Path,
}

/// Starts the relay (socket path: it serves stream clients) or coturn with the UDP listener
/// and `listen`'s TCP and TLS ones. Readiness of the stream listeners is the caller's to
/// probe: the UDP one is what this waits for.
pub fn start_streams(
    path: PathKind,
    lab: &Lab,
    ctx: &Ctx,
    listen: &StreamListen<'_>,
) -> Result<Server, String> {
    match path {
        PathKind::Coturn => start_coturn(lab, ctx, Some(listen)),
        PathKind::Socket => start_relay(path, lab, ctx, Some(listen)),
        other => Err(format!("{} does not serve stream clients", other.name())),
    }
}

fn pinned(ns: &str, cpu: usize, program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", &cpu.to_string(), "ip", "netns", "exec", ns, program]);
    c
}

fn start_relay(
    path: PathKind,
    lab: &Lab,
    ctx: &Ctx,
    streams: Option<&StreamListen<'_>>,
) -> Result<Server, String> {
    let relay_bin = ctx.relay_bin.to_str().ok_or("non-utf-8 relay path")?;
    let mut command = pinned(&lab.relay, ctx.relay_cpu, relay_bin);
    let listen = format!("{LISTEN_IP}:{LISTEN_PORT}");
    command.args([
        "serve",
        "--listen",
        &listen,
        "--relay-ip",
        &RELAY_IP.to_string(),
        "--auth-secret",
        &ctx.secret,
        "--allow-peer",
        "198.18.2.0/24",
        "--realm",
        REALM,
        "--admin",
        "127.0.0.1:0",
        "--log-level",
        "info",
        "--fastpath",
    ]);
    command.arg(match path {
        PathKind::Xdp => "xdp",
        PathKind::Tc => "tc",
        _ => "off",
    });
    if path.is_kernel() {
        command.args(["--interface", &lab.r_c, "--interface", &lab.r_p]);
    }
    if let Some(s) = streams {
        command
            .arg("--listen-tcp")
            .arg(format!("{LISTEN_IP}:{}", s.tcp_port))
            .arg("--listen-tls")
            .arg(format!("{LISTEN_IP}:{}", s.tls_port))
            .arg("--tls-cert")
            .arg(s.cert)
            .arg("--tls-key")
            .arg(s.key);
    }
    let (child, log) = spawn_logged(command).map_err(|e| format!("{e:#}"))?;
    let server = Server {
        pid: child.id(),
        child,
        log,
        log_file: None,
    };
    let attached_needed = if path.is_kernel() { 2 } else { 0 };
    wait_ready(server, "relay", Duration::from_secs(20), |log| {
        let listening = log.contains("listening on udp");
        let attached = log.matches("fast path attached").count();
        (!listening || attached < attached_needed).then(|| {
            format!(
                "listening: {listening}, fast path attached on {attached}/{attached_needed} \
                 interfaces"
            )
        })
    })
}

/// The reference forwarder: this same xtask binary's hidden `bench-forwarder` subcommand, in
/// the relay namespace on the relay core, exiting by itself after `ctx.server_bound`.
fn start_reference(lab: &Lab, ctx: &Ctx) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating xtask: {e}"))?;
    let exe = exe.to_str().ok_or("non-utf-8 xtask path")?;
    let mut command = pinned(&lab.relay, ctx.relay_cpu, exe);
    command.args([
        "bench-forwarder",
        "--listen",
        &format!("{LISTEN_IP}:{LISTEN_PORT}"),
        "--relayed",
        &format!("{RELAY_IP}:{REFERENCE_PORT}"),
        "--peer",
        &format!("{PEER_IP}:{PEER_PORT}"),
        "--seconds",
        &ctx.server_bound.as_secs().max(1).to_string(),
        "--stats-file",
    ]);
    let stats_file = ctx.out.join("reference-forwarder.log");
    let _ = std::fs::remove_file(&stats_file);
    command.arg(&stats_file);
    let (child, log) = spawn_logged(command).map_err(|e| format!("{e:#}"))?;
    let server = Server {
        pid: child.id(),
        child,
        log,
        log_file: None,
    };
    wait_ready(
        server,
        "reference forwarder",
        Duration::from_secs(10),
        |log| (!log.contains("listening on udp")).then(|| "not listening yet".to_owned()),
    )
}

/// The raw XDP forwarder: this same xtask binary's hidden `bench-raw-xdp` subcommand, which
/// attaches `relay_bench_fwd` to the listener's interface in the relay namespace, sending out of
/// the peer-facing one to the peer (from the reference forwarder's relayed address, so both
/// minimal forwarders produce the same datagrams), and detaches after `ctx.server_bound`.
fn start_raw_xdp(lab: &Lab, ctx: &Ctx) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating xtask: {e}"))?;
    let exe = exe.to_str().ok_or("non-utf-8 xtask path")?;
    let object = ctx.bench_object.to_str().ok_or("non-utf-8 object path")?;
    let peer_mac = loadgen::mac_of(&lab.peer, &lab.p0).map_err(|e| format!("{e:#}"))?;
    let peer_mac = peer_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut command = pinned(&lab.relay, ctx.relay_cpu, exe);
    command.args([
        "bench-raw-xdp",
        "--object",
        object,
        "--interface",
        &lab.r_c,
        "--egress",
        &lab.r_p,
        "--listen-port",
        &LISTEN_PORT.to_string(),
        "--relayed",
        &format!("{RELAY_IP}:{REFERENCE_PORT}"),
        "--peer",
        &format!("{PEER_IP}:{PEER_PORT}"),
        "--peer-mac",
        &peer_mac,
        "--seconds",
        &ctx.server_bound.as_secs().max(1).to_string(),
        "--stats-file",
    ]);
    let stats_file = ctx.out.join("raw-xdp-forwarder.log");
    let _ = std::fs::remove_file(&stats_file);
    command.arg(&stats_file);
    let (child, log) = spawn_logged(command).map_err(|e| format!("{e:#}"))?;
    let server = Server {
        pid: child.id(),
        child,
        log,
        log_file: None,
    };
    wait_ready(
        server,
        "raw XDP forwarder",
        Duration::from_secs(10),
        |log| (!log.contains("raw XDP forwarder attached")).then(|| "not attached yet".to_owned()),
    )
}

/// Polls `server`'s log until `pending` says nothing is missing (`None`); fails when the
/// server exits, `limit` passes or the bench is stopped, naming what was still missing.
fn wait_ready(
    mut server: Server,
    what: &str,
    limit: Duration,
    pending: impl Fn(&str) -> Option<String>,
) -> Result<Server, String> {
    let deadline = Instant::now() + limit;
    loop {
        let text = server.log.lock().map(|l| l.clone()).unwrap_or_default();
        let Some(missing) = pending(&text) else {
            return Ok(server);
        };
        if !server.alive() {
            return Err(format!(
                "{what} exited at start:\n{}",
                indent(&server.log_tail(8))
            ));
        }
        if Instant::now() > deadline || lab::STOP.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "{what} not ready within {} s ({missing}):\n{}",
                limit.as_secs(),
                indent(&server.log_tail(8))
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_coturn(
    lab: &Lab,
    ctx: &Ctx,
    streams: Option<&StreamListen<'_>>,
) -> Result<Server, String> {
    let bin = ctx.coturn_bin.to_str().ok_or("non-utf-8 coturn path")?;
    if Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(if bin == "turnserver" {
            "turnserver not installed (apt-get install coturn, or --coturn-bin PATH)".to_owned()
        } else {
            format!("{bin} does not run (--coturn-bin)")
        });
    }
    let log_file = ctx.out.join("turnserver.log");
    let _ = std::fs::remove_file(&log_file);
    let mut command = pinned(&lab.relay, ctx.relay_cpu, bin);
    command.args([
        "-n", // no configuration file: everything is on this command line
        "--listening-ip",
        &LISTEN_IP.to_string(),
        "--listening-port",
        &LISTEN_PORT.to_string(),
        "--relay-ip",
        &RELAY_IP.to_string(),
        "--realm",
        REALM,
        "--use-auth-secret",
        "--static-auth-secret",
        &ctx.secret,
        "--no-dtls",
        "--no-tcp-relay",
        "--no-cli",
        // coturn refuses some peer ranges by default; the lab's peer must be allowed.
        "--allowed-peer-ip",
        "198.18.2.0-198.18.2.255",
        "--no-stdout-log",
        "--simple-log",
        "--log-file",
    ]);
    command.arg(&log_file);
    match streams {
        // coturn serves TCP on its listening port and TLS on its TLS port.
        Some(s) => {
            command
                .arg("--tls-listening-port")
                .arg(s.tls_port.to_string())
                .arg("--cert")
                .arg(s.cert)
                .arg("--pkey")
                .arg(s.key);
        }
        None => {
            command.args(["--no-tls", "--no-tcp"]);
        }
    }
    command.arg("--pidfile").arg(ctx.out.join("turnserver.pid"));
    command.args(&ctx.coturn_args);
    let (child, log) = spawn_logged(command).map_err(|e| format!("{e:#}"))?;
    let mut server = Server {
        pid: child.id(),
        child,
        log,
        log_file: Some(log_file),
    };
    let probe = in_ns(&lab.client, || Ok(UdpSocket::bind((lab::client_ip(0), 0))?))
        .map_err(|e| format!("{e:#}"))?;
    let target = SocketAddr::from((LISTEN_IP, LISTEN_PORT));
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if !server.alive() {
            return Err(format!(
                "turnserver exited at start:\n{}",
                indent(&server.log_tail(8))
            ));
        }
        if turn::binding_ping(&probe, target, Duration::from_millis(200)) {
            return Ok(server);
        }
    }
    Err(format!(
        "turnserver did not answer a Binding request within 15 s:\n{}",
        indent(&server.log_tail(8))
    ))
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The peer namespace's socket: sink of client→peer traffic, source of peer→client traffic,
/// and the echo of the latency probe.
pub fn peer_socket(lab: &Lab) -> anyhow::Result<Arc<UdpSocket>> {
    let socket = in_ns(&lab.peer, || {
        let s = UdpSocket::bind((PEER_IP, PEER_PORT))?;
        measure::big_rcvbuf(&s, 64 << 20)?;
        Ok(s)
    })?;
    Ok(Arc::new(socket))
}

/// Up to `n` allocations, each with channel 0x4000 bound to the peer socket (`framing`
/// ChannelData) or only a permission for it (Send), through the server's TURN control plane
/// (Allocate with REST long-term credentials, then ChannelBind or CreatePermission).
///
/// A server may refuse some of them for reasons of its own (a quota, coturn's
/// `--multiplex-peer` refusing a second channel to one peer address): setup stops at the first
/// refusal and returns what it got with the reason, so the variants that need no more still run.
/// Errors of the benchmark itself (sockets, a stop signal) are `Err`.
pub fn allocate(
    lab: &Lab,
    ctx: &Ctx,
    n: usize,
    framing: Framing,
) -> anyhow::Result<(Vec<Allocation>, Option<String>)> {
    let sockets = client_sockets(lab, n)?;
    let server = SocketAddr::from((LISTEN_IP, LISTEN_PORT));
    let peer = SocketAddr::from((PEER_IP, PEER_PORT));
    let started = Instant::now();
    let mut out = Vec::with_capacity(n);
    for (i, socket) in sockets.into_iter().enumerate() {
        check_stop()?;
        if started.elapsed() > Duration::from_secs(120) {
            let reason = format!("setting up {n} allocations took over 120 s (stopped at {i})");
            return Ok((out, Some(reason)));
        }
        let (name, what) = match framing {
            Framing::ChannelData => (format!("bench{i}"), "allocation"),
            Framing::Send => (format!("bench-send{i}"), "permission-only allocation"),
        };
        let (user, pass) = turn::rest_credentials(&ctx.secret, &name);
        let client = turn::Client::new(socket, server, user, &pass);
        let allocation = match framing {
            Framing::ChannelData => client.allocate_and_bind(peer, FIRST_CHANNEL),
            Framing::Send => client.allocate_and_permit(peer),
        };
        match allocation {
            Ok(a) => out.push(a),
            Err(e) => return Ok((out, Some(format!("{what} {} of {n}: {e:#}", i + 1)))),
        }
    }
    Ok((out, None))
}

/// The minimal forwarders' "allocations" (reference and raw XDP): the same client sockets as
/// `allocate`, channel 0x4000, relayed address the forwarders'; no control plane (they have
/// none), so the generator's frames are the same as for the TURN servers.
pub fn bare_allocations(lab: &Lab, n: usize) -> anyhow::Result<Vec<Allocation>> {
    let relayed = SocketAddr::from((RELAY_IP, REFERENCE_PORT));
    Ok(client_sockets(lab, n)?
        .into_iter()
        .map(|socket| Allocation {
            socket: Arc::new(socket),
            relayed,
            channel: Some(FIRST_CHANNEL),
        })
        .collect())
}

/// `n` client sockets in the client namespace, one per client address.
fn client_sockets(lab: &Lab, n: usize) -> anyhow::Result<Vec<UdpSocket>> {
    in_ns(&lab.client, move || {
        (0..n)
            .map(|i| {
                let s = UdpSocket::bind((lab::client_ip(i), 0))?;
                // The first client receives the latency probe and the 1-flow return traffic;
                // the others stay near the default so 1000 full queues cannot pin gigabytes.
                if i == 0 {
                    measure::big_rcvbuf(&s, 16 << 20)?;
                }
                Ok(s)
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
}

struct Snapshot {
    client: UdpCounters,
    relay: UdpCounters,
    peer: UdpCounters,
    /// Server process CPU time, ns.
    process: Option<u64>,
    core: u64,
    bpf: Option<(u64, u64)>,
    xmit_drops: u64,
}

fn snapshot(lab: &Lab, ctx: &Ctx, pid: Option<u32>, kernel: bool) -> anyhow::Result<Snapshot> {
    Ok(Snapshot {
        client: lab.udp_counters(&lab.client)?,
        relay: lab.udp_counters(&lab.relay)?,
        peer: lab.udp_counters(&lab.peer)?,
        process: pid.and_then(measure::process_cpu_ns),
        core: measure::core_busy_ticks(ctx.relay_cpu).unwrap_or(0),
        bpf: if kernel {
            measure::bpf_run_stats(&lab.relay)
        } else {
            None
        },
        xmit_drops: far_end_egress(lab, pid.is_none())
            .iter()
            .map(|(ns, dev)| lab.xmit_drops(ns, dev).unwrap_or(0))
            .sum(),
    })
}

/// The veth ends that hand frames to the far ends: the relay's two (server paths), or the
/// generator's own (generator ceiling, whose far end is the relay namespace's r_c).
fn far_end_egress(lab: &Lab, ceiling: bool) -> Vec<(&str, &str)> {
    if ceiling {
        vec![(lab.client.as_str(), lab.c0.as_str())]
    } else {
        vec![
            (lab.relay.as_str(), lab.r_c.as_str()),
            (lab.relay.as_str(), lab.r_p.as_str()),
        ]
    }
}

fn ticks_ns(ticks: u64) -> u64 {
    ticks * 1_000_000_000 / measure::clk_tck()
}

/// A paced flood (the socket generator's paced mode): `rate_pps` in each direction, for
/// `duration`, counted `settle` after the last send.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    pub rate_pps: f64,
    pub duration: Duration,
    pub settle: Duration,
}

/// Floods `client_groups` (and `peer_group`, for both directions) for the configured time and
/// measures what crossed: counted by `delivery`'s sinks, else (no sinks) by the receiving
/// namespaces' UDP counters. `server_pid` None: the generator-ceiling run, whose receiver is in
/// the relay namespace.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per path kind; a struct would only rename these"
)]
pub fn flood(
    lab: &Lab,
    ctx: &Ctx,
    generator: &dyn Generator,
    variant: Variant,
    client_groups: Vec<SendGroup>,
    peer_group: Option<SendGroup>,
    receivers: &[Arc<UdpSocket>],
    server_pid: Option<u32>,
    kernel: bool,
    delivery: Option<&Delivery<'_>>,
    pace: Option<Pace>,
) -> anyhow::Result<Measurement> {
    let (duration, settle) = pace.map_or((ctx.duration, ctx.settle), |p| (p.duration, p.settle));
    for r in receivers {
        measure::drain(r);
    }
    let ceiling = server_pid.is_none();
    let before = snapshot(lab, ctx, server_pid, kernel)?;
    let counted_before = delivery.map(Delivery::read).transpose()?;
    let plan = |groups, origin| FloodPlan {
        groups,
        origin,
        payload: variant.payload,
        duration,
        max_packets: ctx.max_packets,
        cpu: ctx.gen_cpu,
        rate_pps: pace.map(|p| p.rate_pps),
    };
    let client_plan = plan(
        client_groups,
        loadgen::origin(&lab.client, &lab.c0, &lab.relay, &lab.r_c),
    );
    let peer_plan = peer_group.map(|g| {
        plan(
            vec![g],
            loadgen::origin(&lab.peer, &lab.p0, &lab.relay, &lab.r_p),
        )
    });
    let (c2p, p2c): (GenStats, Option<GenStats>) = std::thread::scope(|scope| {
        let peer = peer_plan
            .as_ref()
            .map(|p| scope.spawn(move || generator.flood(p)));
        let c2p = scope
            .spawn(|| generator.flood(&client_plan))
            .join()
            .map_err(|_| anyhow::anyhow!("generator panicked"))??;
        let p2c = match peer {
            Some(h) => Some(
                h.join()
                    .map_err(|_| anyhow::anyhow!("generator panicked"))??,
            ),
            None => None,
        };
        anyhow::Ok((c2p, p2c))
    })?;
    // In-flight datagrams land within the settle time; the rate divides by the send time.
    std::thread::sleep(settle);
    // The receivers are not read during the flood (that would cost the generator core); what
    // they queued is counted now, as they are read (see UdpCounters).
    let server_ns_after = server_pid.and_then(measure::process_cpu_ns);
    let core_after = measure::core_busy_ticks(ctx.relay_cpu).unwrap_or(0);
    for r in receivers {
        measure::drain(r);
    }
    let counted: Option<DeliveryCount> = match (delivery, counted_before) {
        (Some(d), Some(b)) => Some(d.read()?.since(&b)),
        _ => None,
    };
    let mut after = snapshot(lab, ctx, server_pid, kernel)?;
    after.process = server_ns_after;
    after.core = core_after;
    if std::env::var_os("RELAY_BENCH_DEBUG").is_some() {
        eprintln!(
            "debug: client {:?}\ndebug: relay {:?}\ndebug: peer {:?}\ndebug: sinks {:?}",
            after.client.since(&before.client),
            after.relay.since(&before.relay),
            after.peer.since(&before.peer),
            counted
        );
    }
    let client = after.client.since(&before.client);
    let relay = after.relay.since(&before.relay);
    let peer = after.peer.since(&before.peer);
    let elapsed = c2p.elapsed.max(p2c.map(|p| p.elapsed).unwrap_or_default());
    let bpf = match (before.bpf, after.bpf) {
        (Some(b), Some(a)) => Some((a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))),
        _ => None,
    };
    Ok(Measurement {
        elapsed_s: elapsed.as_secs_f64(),
        sent_c2p: c2p.sent,
        sent_p2c: p2c.map(|p| p.sent).unwrap_or(0),
        delivered_c2p: match counted {
            Some(c) => c.c2p.frames,
            None if ceiling => relay.arrived(),
            None => peer.arrived(),
        },
        delivered_p2c: match (counted, p2c.is_some()) {
            (_, false) => 0,
            (Some(c), true) => c.p2c.frames,
            (None, true) => client.arrived(),
        },
        send_errors: c2p.send_errors + p2c.map(|p| p.send_errors).unwrap_or(0),
        relay_rcvbuf_errors: if ceiling { 0 } else { relay.rcvbuf_errors },
        csum_errors: client.in_csum_errors + relay.in_csum_errors + peer.in_csum_errors,
        far_end_drops: after.xmit_drops.saturating_sub(before.xmit_drops),
        process_cpu_ns: match (before.process, after.process) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b)),
            _ => None,
        },
        core_cpu_ns: ticks_ns(after.core.saturating_sub(before.core)),
        bpf_run_ns: bpf.map(|b| b.0),
        bpf_runs: bpf.map(|b| b.1),
    })
}

/// Client-side send groups for the first `flows` allocations: ChannelData on their channel,
/// or Send indications to the peer for the permission-only ones.
pub fn client_groups(
    allocations: &[Allocation],
    flows: usize,
    payload: usize,
) -> anyhow::Result<Vec<SendGroup>> {
    let server = SocketAddrV4::new(LISTEN_IP, LISTEN_PORT);
    allocations
        .iter()
        .take(flows)
        .enumerate()
        .map(|(i, a)| {
            let prefix = match a.channel {
                Some(channel) => channel_header(channel, payload),
                None => send_header(i, payload)?,
            };
            Ok(SendGroup {
                socket: Arc::clone(&a.socket),
                dests: vec![server],
                prefix,
            })
        })
        .collect()
}

/// The peer answering the first `flows` allocations' relayed addresses (both-directions variant).
pub fn peer_group(peer: &Arc<UdpSocket>, allocations: &[Allocation], flows: usize) -> SendGroup {
    SendGroup {
        socket: Arc::clone(peer),
        dests: allocations
            .iter()
            .take(flows)
            .filter_map(|a| match a.relayed {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            })
            .collect(),
        prefix: Vec::new(),
    }
}

/// The generator-ceiling flood's senders: `variant.flows` sockets in the client namespace
/// aiming at a bare sink in the relay namespace, with the same header as the variant's frames
/// (ChannelData or Send indication) so frames are the same size.
pub fn ceiling_groups(lab: &Lab, variant: Variant) -> anyhow::Result<(Vec<SendGroup>, UdpSocket)> {
    let (flows, payload) = (variant.flows, variant.payload);
    let sink = in_ns(&lab.relay, || {
        let s = UdpSocket::bind((LISTEN_IP, CEILING_PORT))?;
        measure::big_rcvbuf(&s, 64 << 20)?;
        Ok(s)
    })?;
    let senders = in_ns(&lab.client, move || {
        (0..flows)
            .map(|i| Ok(UdpSocket::bind((lab::client_ip(i), 0))?))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let dest = SocketAddrV4::new(LISTEN_IP, CEILING_PORT);
    let groups = senders
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            Ok(SendGroup {
                socket: Arc::new(s),
                dests: vec![dest],
                prefix: match variant.framing {
                    Framing::ChannelData => channel_header(FIRST_CHANNEL, payload),
                    Framing::Send => send_header(i, payload)?,
                },
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((groups, sink))
}

fn channel_header(channel: u16, payload: usize) -> Vec<u8> {
    let mut h = channel.to_be_bytes().to_vec();
    h.extend_from_slice(&(payload as u16).to_be_bytes());
    h
}

/// Flow `flow`'s Send indication framing, to the peer. The transaction id is fixed per flow:
/// the server does not answer indications (RFC 8489 §6.3.2) or keep their ids, so reusing one
/// costs it nothing and keeps every frame of a flow identical, as the generator needs.
fn send_header(flow: usize, payload: usize) -> anyhow::Result<Vec<u8>> {
    let mut tid = [0u8; 12];
    tid[..4].copy_from_slice(b"bnch");
    tid[4..].copy_from_slice(&(flow as u64).to_be_bytes());
    turn::send_indication_header(tid, SocketAddr::from((PEER_IP, PEER_PORT)), payload)
}

/// Drains every client socket (bounded), so one variant's leftovers do not skew the next.
pub fn drain_clients(allocations: &[Allocation]) {
    for a in allocations {
        measure::drain(&a.socket);
    }
}

/// test-lab.md's isolation check: with forwarding off, the client cannot reach the peer except
/// through the relay (no route, or nothing arrives).
pub fn check_isolation(lab: &Lab) -> anyhow::Result<()> {
    let before = lab.udp_counters(&lab.peer)?;
    let sent = in_ns(&lab.client, || {
        let s = UdpSocket::bind((lab::client_ip(0), 0))?;
        Ok(s.send_to(b"isolation", (PEER_IP, PEER_PORT)).is_ok())
    })?;
    if sent {
        std::thread::sleep(Duration::from_millis(100));
        let after = lab.udp_counters(&lab.peer)?.since(&before);
        if after.in_datagrams + after.no_ports + after.in_errors > 0 {
            bail!("the client reaches the peer directly: the lab is not isolated");
        }
    }
    Ok(())
}
