//! The stream-client variant (issue 11): TURN clients over TCP and over TLS (RFC 8656 §5, RFC
//! 8489 §6.2) relaying to the lab's UDP peer, for the relay and for coturn in the same run.
//!
//! Per server and transport it measures, in the same lab as the UDP paths:
//! - **relayed packets per second** of 120 B ChannelData client→peer over 1 and several
//!   connections, counted at the peer's far-end sink, with the relay core's busy time over the
//!   same window, so the figure is also given per relay core;
//! - **handshakes per second**: connect (+ TLS handshake) + Allocate (401 challenge, then
//!   success), each on a new connection that is closed afterwards (which ends the allocation).
//!
//! The generator runs on the generator core: one thread for a flood (non-blocking writes of
//! 16 KB batches of ChannelData over every connection, rustls encrypting for TLS) and a few
//! blocking threads for the handshakes. Its own CPU time over each measured window is reported
//! (`generator_cpu_share`), as is whether it neared a whole core (`generator_limited`).
//!
//! Rates are taken over a window that starts after a warm-up and ends before the generator
//! stops, so bytes still queued in the TCP buffers at the end do not inflate them.
//!
//! The TLS certificate is made at run time (rcgen, ECDSA P-256) into a private directory that
//! is removed afterwards; the client pins that exact certificate (see [`PinnedCert`]).

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use super::{
    lab::{self, check_stop, pin_current_thread, Lab, PEER_IP, STOP},
    loadgen::{self, FloodPlan, Generator as _, SendGroup},
    measure,
    runner::{self, Ctx, PathKind, StreamListen, LISTEN_PORT, PEER_PORT},
    sink::{FarEnds, FLOOD_CLASS},
    turn::FIRST_CHANNEL,
};

mod client;
mod report;

use self::client::{frame_len, probe, session, Conn};
pub use self::{
    client::TlsMaterial,
    report::{json, svg_data, table},
};

/// coturn serves TCP on its (UDP) listening port; the relay is given the same.
pub const TCP_PORT: u16 = LISTEN_PORT;
/// The usual TURN-over-TLS port (RFC 8656 §4.3; 443 in production).
pub const TLS_PORT: u16 = 5349;
/// ChannelData payload of the floods: the 120 B (4 + 120 is a multiple of 4, so the
/// stream framing needs no padding).
pub const PAYLOAD: usize = 120;
/// ChannelData frames per write.
const BATCH_FRAMES: usize = 128;
/// Above this share of a core over a window, the generator may have set the rate.
const GENERATOR_LIMIT_SHARE: f64 = 0.9;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamTransport {
    Tcp,
    Tls,
}

impl StreamTransport {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Tcp => TCP_PORT,
            Self::Tls => TLS_PORT,
        }
    }

    pub fn parse_list(list: &[String]) -> anyhow::Result<Vec<Self>> {
        let mut out = Vec::new();
        for name in list {
            match name.as_str() {
                "tcp" => out.push(Self::Tcp),
                "tls" => out.push(Self::Tls),
                "none" => {}
                other => bail!("unknown stream transport {other:?} (tcp, tls, none)"),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// Which server a stream row belongs to: the relay (its socket path serves stream clients;
/// run when the `socket` path is) or coturn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamServer {
    Relay,
    Coturn,
}

impl StreamServer {
    pub fn name(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Coturn => "coturn",
        }
    }

    fn path(self) -> PathKind {
        match self {
            Self::Relay => PathKind::Socket,
            Self::Coturn => PathKind::Coturn,
        }
    }

    /// The stream servers for the selected UDP paths.
    pub fn for_paths(paths: &[PathKind]) -> Vec<Self> {
        let mut out = Vec::new();
        if paths.contains(&PathKind::Socket) {
            out.push(Self::Relay);
        }
        if paths.contains(&PathKind::Coturn) {
            out.push(Self::Coturn);
        }
        out
    }
}

/// The shape of the stream phase of each round.
#[derive(Clone, Debug)]
pub struct StreamPlan {
    pub transports: Vec<StreamTransport>,
    /// Connections per client→peer flood (one flood each).
    pub connections: Vec<usize>,
    pub warmup: Duration,
    /// The measured window of a flood and of a handshake run.
    pub window: Duration,
    /// Concurrent handshaking clients (threads on the generator core).
    pub handshake_workers: usize,
    /// Also peer->client after each client->peer flood.
    pub p2c: bool,
    /// Before each measurement, how long to wait at most for the relay core to go quiet.
    pub settle_limit: Duration,
}

impl StreamPlan {
    pub fn is_empty(&self) -> bool {
        self.transports.is_empty()
    }
}

/// One client→peer flood over `connections` stream connections, measured over its window.
#[derive(Clone, Debug, Default)]
pub struct FloodMeasure {
    pub window_s: f64,
    /// ChannelData frames the generator handed to the connections in the window.
    pub offered: u64,
    /// Datagrams that reached the peer in the window.
    pub delivered: u64,
    /// Busy time of the relay core, and the server process's CPU time, in the window.
    pub core_cpu_ns: u64,
    pub process_cpu_ns: Option<u64>,
    /// The server process's and the relay-side NAPI threads' CPU time in the window.
    pub server_cpu_ns: Option<u64>,
    /// Frames the relay's veth ends could not hand to the far ends in the window: datagrams
    /// the server sent that the far end, not the server, lost.
    pub far_end_drops: u64,
    /// The generator thread's CPU time in the window.
    pub generator_cpu_ns: Option<u64>,
    /// Frames written in the whole run (warm-up and tail included), for the count bound; for
    /// peer->client, datagrams the peer sent.
    pub total_frames: u64,
    /// How long the relay core took to go quiet before this measurement started.
    pub settle_s: f64,
    /// Peer->client: the peer sends 120 B datagrams to the relayed addresses (paced) and the
    /// clients count the ChannelData frames they read; `offered` is then the peer's rate over
    /// its whole run times the window.
    pub p2c: bool,
}

impl FloodMeasure {
    pub fn pps(&self) -> f64 {
        self.delivered as f64 / self.window_s.max(1e-9)
    }

    /// Relayed datagrams per second of the server's CPU time (its threads and the relay-side
    /// NAPI threads, all on the relay core).
    pub fn pps_per_core(&self) -> Option<f64> {
        self.server_cpu_ns
            .filter(|ns| *ns > 0)
            .map(|ns| self.delivered as f64 / (ns as f64 / 1e9))
    }

    /// Share of the relay core the server (process and NAPI threads) used.
    pub fn core_share(&self) -> f64 {
        self.server_cpu_ns.unwrap_or(0) as f64 / 1e9 / self.window_s.max(1e-9)
    }

    /// Share of the relay core busy with anything (other jobs on a shared machine too).
    pub fn core_busy_share(&self) -> f64 {
        self.core_cpu_ns as f64 / 1e9 / self.window_s.max(1e-9)
    }

    pub fn generator_share(&self) -> Option<f64> {
        self.generator_cpu_ns
            .map(|ns| ns as f64 / 1e9 / self.window_s.max(1e-9))
    }
}

/// One run of back-to-back handshakes (connect [+ TLS] + Allocate) over its window.
#[derive(Clone, Debug, Default)]
pub struct HandshakeMeasure {
    pub window_s: f64,
    pub completed: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub core_cpu_ns: u64,
    pub process_cpu_ns: Option<u64>,
    pub server_cpu_ns: Option<u64>,
    pub generator_cpu_ns: Option<u64>,
    /// The TLS version and cipher suite of the first TLS handshake.
    pub tls: Option<String>,
    /// How long the relay core took to go quiet before this measurement started.
    pub settle_s: f64,
    /// Handshake durations (connect to Allocate success), µs: p50, p99, max over the run.
    pub latency_us: Option<(u64, u64, u64)>,
}

impl HandshakeMeasure {
    pub fn per_s(&self) -> f64 {
        self.completed as f64 / self.window_s.max(1e-9)
    }

    /// Handshakes per second of the server's CPU time (process and relay-side NAPI).
    pub fn per_core_s(&self) -> Option<f64> {
        self.server_cpu_ns
            .filter(|ns| *ns > 0)
            .map(|ns| self.completed as f64 / (ns as f64 / 1e9))
    }

    pub fn core_share(&self) -> f64 {
        self.server_cpu_ns.unwrap_or(0) as f64 / 1e9 / self.window_s.max(1e-9)
    }

    pub fn generator_share(&self) -> Option<f64> {
        self.generator_cpu_ns
            .map(|ns| ns as f64 / 1e9 / self.window_s.max(1e-9))
    }
}

#[derive(Default)]
pub struct StreamResults {
    pub floods: Vec<(usize, StreamServer, StreamTransport, usize, FloodMeasure)>,
    pub handshakes: Vec<(usize, StreamServer, StreamTransport, HandshakeMeasure)>,
    /// A server that did not start with stream listeners (first round's reason).
    pub unavailable: BTreeMap<StreamServer, String>,
    /// A transport a server did not serve, with the reason.
    pub not_applicable: BTreeMap<(StreamServer, StreamTransport), String>,
    pub plan: Option<StreamPlan>,
    pub servers: Vec<StreamServer>,
    /// Failures that cost one measurement, not the transport (a peer->client flood).
    pub notes: Vec<String>,
}

/// The relay-side NAPI threads (`napi/DEV-N` of the relay's two veth ends, pinned to the relay
/// core by the lab): with the server's own threads, the work relaying costs. Counting them
/// rather than the relay core's busy time keeps other jobs on a shared machine out of the
/// per-core figures.
fn relay_napi_pids(lab: &Lab) -> Vec<u32> {
    let wanted = [format!("napi/{}-", lab.r_c), format!("napi/{}-", lab.r_p)];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            wanted
                .iter()
                .any(|w| comm.trim_end().starts_with(w.as_str()))
                .then_some(pid)
        })
        .collect()
}

/// CPU time of the server process and the relay-side NAPI threads, ns.
fn server_cpu_ns(pid: u32, napi: &[u32]) -> Option<u64> {
    let own = measure::process_cpu_ns(pid)?;
    Some(
        own + napi
            .iter()
            .filter_map(|p| measure::process_cpu_ns(*p))
            .sum::<u64>(),
    )
}

/// Waits (at most `limit`) until the server is mostly idle over 100 ms, so a measurement
/// does not start while the server still works through the previous one's queued bytes or
/// closed connections; returns how long that took (reported: a server that stays busy long
/// after its clients left shows here).
fn settle(env: Env<'_>, limit: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit && !STOP.load(Ordering::Relaxed) {
        let before = server_cpu_ns(env.pid, env.napi).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(100));
        let busy = server_cpu_ns(env.pid, env.napi)
            .unwrap_or(0)
            .saturating_sub(before);
        if busy < 30_000_000 {
            break;
        }
    }
    started.elapsed()
}

/// How long load threads may outlive their planned run when the measuring thread is late
/// (a loaded machine): they stop once the window is measured, at the latest after this.
const MEASURE_SLACK: Duration = Duration::from_secs(5);

/// CPU time in ns of thread `tid` of this process (schedstat's first field).
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Datagrams at the peer so far: the far-end sink's count, else the peer namespace's UDP
/// counters.
fn peer_count(lab: &Lab, far: Option<&FarEnds>) -> anyhow::Result<u64> {
    match far {
        Some(f) => Ok(f.peer.read(FLOOD_CLASS)?.frames),
        None => Ok(lab.udp_counters(&lab.peer)?.arrived()),
    }
}

/// One instant of the counters a window is measured between.
struct Mark {
    at: Instant,
    core: u64,
    process: Option<u64>,
    /// Process and relay-side NAPI threads.
    server: Option<u64>,
    /// Frames the relay's veth ends could not hand to the far ends (ring full).
    far_end_drops: u64,
    generator: Option<u64>,
}

fn mark(env: Env<'_>, generator_tids: &[i32]) -> Mark {
    let (ctx, pid) = (env.ctx, env.pid);
    // A generator thread that already finished its bounded flood has no schedstat any more:
    // the others still count (seen in the smoke run, whose floods are short).
    let generator: Option<u64> = generator_tids
        .iter()
        .filter_map(|&t| thread_cpu_ns(t))
        .reduce(|a, b| a + b);
    Mark {
        at: Instant::now(),
        core: measure::core_busy_ticks(ctx.relay_cpu).unwrap_or(0),
        process: measure::process_cpu_ns(pid),
        server: server_cpu_ns(pid, env.napi),
        far_end_drops: [&env.lab.r_p, &env.lab.r_c]
            .iter()
            .map(|dev| env.lab.xmit_drops(&env.lab.relay, dev).unwrap_or(0))
            .sum(),
        generator: generator.filter(|_| !generator_tids.is_empty()),
    }
}

fn since(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

fn ticks_ns(ticks: u64) -> u64 {
    ticks * 1_000_000_000 / measure::clk_tck()
}

/// The generator of a flood: writes batches of ChannelData frames to every connection,
/// non-blocking, polling when all are full, until `until` or `max_frames`. Adds the bytes it
/// handed to the connections to `written` as it goes.
fn flood_loop(
    conns: &mut [Conn],
    batch: &[u8],
    until: Instant,
    max_bytes: u64,
    written: &AtomicU64,
    measured: &AtomicBool,
) -> anyhow::Result<()> {
    for c in conns.iter() {
        c.tcp().set_nonblocking(true)?;
    }
    // Plain TCP: how far into `batch` each connection's current write is.
    let mut offsets = vec![0usize; conns.len()];
    let mut total = 0u64;
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.tcp().as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        })
        .collect();
    let mut spins = 0u32;
    while total < max_bytes {
        spins += 1;
        if spins.is_multiple_of(64)
            && (Instant::now() >= until
                || STOP.load(Ordering::Relaxed)
                || measured.load(Ordering::Relaxed))
        {
            break;
        }
        let mut progressed = false;
        for (c, off) in conns.iter_mut().zip(offsets.iter_mut()) {
            match c {
                Conn::Tcp(s) => match s.write(&batch[*off..]) {
                    Ok(n) => {
                        *off = (*off + n) % batch.len();
                        total += n as u64;
                        written.fetch_add(n as u64, Ordering::Relaxed);
                        progressed = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e).context("writing to the TCP connection"),
                },
                Conn::Tls(s) => {
                    // Encrypt a batch only once the previous one is on the wire, so rustls
                    // buffers at most one batch.
                    if s.conn.wants_write() {
                        match s.conn.write_tls(&mut s.sock) {
                            Ok(_) => progressed = true,
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                            Err(e) => return Err(e).context("writing to the TLS connection"),
                        }
                    } else {
                        s.conn.writer().write_all(batch)?;
                        total += batch.len() as u64;
                        written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        progressed = true;
                    }
                }
            }
        }
        if !progressed {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd we own for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5) };
            if rc < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                bail!("poll: {}", std::io::Error::last_os_error());
            }
            if Instant::now() >= until || STOP.load(Ordering::Relaxed) {
                break;
            }
        }
    }
    Ok(())
}

/// What every measurement of one server's stream phase needs.
#[derive(Clone, Copy)]
struct Env<'a> {
    lab: &'a Lab,
    ctx: &'a Ctx,
    plan: &'a StreamPlan,
    tls: &'a TlsMaterial,
    far: Option<&'a FarEnds>,
    /// The peer's socket (source of the peer->client floods).
    peer: &'a Arc<UdpSocket>,
    /// The server process.
    pid: u32,
    /// The relay-side NAPI threads.
    napi: &'a [u32],
}

/// `connections` allocations over `transport`, each with channel 0x4000 bound to the peer:
/// the connections and the relayed addresses.
fn setup(
    env: Env<'_>,
    transport: StreamTransport,
    connections: usize,
) -> anyhow::Result<(Vec<Conn>, Vec<SocketAddrV4>)> {
    let peer = SocketAddr::from((PEER_IP, PEER_PORT));
    let mut conns = Vec::with_capacity(connections);
    let mut relayed = Vec::with_capacity(connections);
    for i in 0..connections {
        check_stop()?;
        let name = format!("bench-{}{i}", transport.name());
        let (mut client, addr) = session(transport, env.tls, env.ctx, i, &name)
            .with_context(|| format!("allocation {} of {connections}", i + 1))?;
        client.bind_channel(peer, FIRST_CHANNEL)?;
        conns.push(client.into_transport().conn);
        match addr {
            SocketAddr::V4(v4) => relayed.push(v4),
            SocketAddr::V6(_) => bail!("an IPv6 relayed address in an IPv4 lab"),
        }
    }
    Ok((conns, relayed))
}

/// Sets up `connections` allocations over `transport`, then floods 120 B ChannelData over all
/// of them and measures a window.
fn flood(
    env: Env<'_>,
    transport: StreamTransport,
    connections: usize,
) -> anyhow::Result<FloodMeasure> {
    let Env {
        lab,
        ctx,
        plan,
        far,
        ..
    } = env;
    let (mut conns, _) = setup(env, transport, connections)?;
    let frame_len = 4 + PAYLOAD;
    let mut frame = FIRST_CHANNEL.to_be_bytes().to_vec();
    frame.extend_from_slice(&(PAYLOAD as u16).to_be_bytes());
    frame.resize(frame_len, 0x5a);
    let batch = frame.repeat(BATCH_FRAMES);
    // A bound in count as well as time: far above what one core relays in the run.
    let run = plan.warmup + plan.window + Duration::from_millis(100);
    let max_bytes = (run.as_secs_f64() * 20e6) as u64 * frame_len as u64;
    let written = AtomicU64::new(0);
    let tid = AtomicI32::new(0);
    let gen_cpu = ctx.gen_cpu;
    // A hard bound; the threads stop as soon as the window is measured (`measured`),
    // so they are still running, and their CPU time readable, at its end.
    let until = Instant::now() + run + MEASURE_SLACK;
    let measured = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let generator = scope.spawn(|| {
            pin_current_thread(gen_cpu)?;
            tid.store(gettid(), Ordering::SeqCst);
            flood_loop(&mut conns, &batch, until, max_bytes, &written, &measured)
        });
        std::thread::sleep(plan.warmup);
        let tids = [tid.load(Ordering::SeqCst)];
        let tids = if tids[0] == 0 { &[][..] } else { &tids[..] };
        let (m0, w0, d0) = (
            mark(env, tids),
            written.load(Ordering::Relaxed),
            peer_count(lab, far)?,
        );
        std::thread::sleep(plan.window);
        let (m1, w1, d1) = (
            mark(env, tids),
            written.load(Ordering::Relaxed),
            peer_count(lab, far)?,
        );
        measured.store(true, Ordering::Relaxed);
        generator
            .join()
            .map_err(|_| anyhow::anyhow!("stream generator panicked"))??;
        Ok(FloodMeasure {
            window_s: m1.at.duration_since(m0.at).as_secs_f64(),
            offered: w1.saturating_sub(w0) / frame_len as u64,
            delivered: d1.saturating_sub(d0),
            core_cpu_ns: ticks_ns(m1.core.saturating_sub(m0.core)),
            process_cpu_ns: since(m0.process, m1.process),
            server_cpu_ns: since(m0.server, m1.server),
            far_end_drops: m1.far_end_drops.saturating_sub(m0.far_end_drops),
            generator_cpu_ns: since(m0.generator, m1.generator),
            total_frames: written.load(Ordering::Relaxed) / frame_len as u64,
            p2c: false,
            settle_s: 0.0,
        })
    })
}

/// Reads every connection, non-blocking, polling when none has data, and counts the
/// ChannelData frames in `frames`, until `until`.
fn receive_loop(conns: &mut [Conn], until: Instant, frames: &AtomicU64) -> anyhow::Result<()> {
    for c in conns.iter() {
        c.tcp().set_nonblocking(true)?;
    }
    let mut bufs: Vec<Vec<u8>> = conns.iter().map(|_| Vec::with_capacity(1 << 17)).collect();
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.tcp().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut chunk = vec![0u8; 1 << 16];
    while Instant::now() < until && !STOP.load(Ordering::Relaxed) {
        let mut progressed = false;
        for (c, buf) in conns.iter_mut().zip(bufs.iter_mut()) {
            // Up to 16 reads per connection and turn, so one busy connection cannot starve
            // the deadline check.
            for _ in 0..16 {
                match c.read(&mut chunk) {
                    Ok(0) => bail!("the server closed a connection during the flood"),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        progressed = true;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e).context("reading from the server"),
                }
            }
            let mut at = 0;
            let mut counted = 0;
            while let Some(n) = frame_len(&buf[at..])? {
                if buf[at] >> 6 == 0b01 {
                    counted += 1;
                }
                at += n;
            }
            buf.drain(..at);
            frames.fetch_add(counted, Ordering::Relaxed);
        }
        if !progressed {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd we own for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 5) };
            if rc < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                bail!("poll: {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Peer->client: sets up `connections` allocations over `transport`; the peer sends 120 B
/// datagrams to their relayed addresses at `rate_pps` (paced: an unpaced flood would take the
/// generator core from the clients that must read the stream), the clients count the
/// ChannelData they read over the window.
fn flood_p2c(
    env: Env<'_>,
    transport: StreamTransport,
    connections: usize,
    rate_pps: f64,
) -> anyhow::Result<FloodMeasure> {
    let Env { ctx, plan, lab, .. } = env;
    let (mut conns, relayed) = setup(env, transport, connections)?;
    let run = plan.warmup + plan.window + Duration::from_millis(100);
    let peer_plan = FloodPlan {
        groups: vec![SendGroup {
            socket: Arc::clone(env.peer),
            dests: relayed,
            prefix: Vec::new(),
        }],
        origin: loadgen::origin(&lab.peer, &lab.p0, &lab.relay, &lab.r_p),
        payload: PAYLOAD,
        duration: run,
        max_packets: (run.as_secs_f64() * rate_pps * 1.1) as u64 + 1,
        cpu: ctx.gen_cpu,
        rate_pps: Some(rate_pps),
    };
    let frames = AtomicU64::new(0);
    let tid = AtomicI32::new(0);
    let peer_tid = AtomicI32::new(0);
    let gen_cpu = ctx.gen_cpu;
    // The receivers run a little longer than the peer, so the window never sees them stop.
    let until = Instant::now() + run + Duration::from_millis(100);
    std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            pin_current_thread(gen_cpu)?;
            tid.store(gettid(), Ordering::SeqCst);
            receive_loop(&mut conns, until, &frames)
        });
        let sender = scope.spawn(|| {
            peer_tid.store(gettid(), Ordering::SeqCst);
            loadgen::SocketGenerator { batch: 64 }.flood(&peer_plan)
        });
        std::thread::sleep(plan.warmup);
        let ids: Vec<i32> = [tid.load(Ordering::SeqCst), peer_tid.load(Ordering::SeqCst)]
            .into_iter()
            .filter(|t| *t != 0)
            .collect();
        let ids = if ids.len() == 2 { ids } else { Vec::new() };
        let (m0, f0) = (mark(env, &ids), frames.load(Ordering::Relaxed));
        std::thread::sleep(plan.window);
        let (m1, f1) = (mark(env, &ids), frames.load(Ordering::Relaxed));
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("peer generator panicked"))??;
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("stream receiver panicked"))??;
        let window_s = m1.at.duration_since(m0.at).as_secs_f64();
        let offered_pps = sent.sent as f64 / sent.elapsed.as_secs_f64().max(1e-9);
        Ok(FloodMeasure {
            window_s,
            offered: (offered_pps * window_s) as u64,
            delivered: f1.saturating_sub(f0),
            core_cpu_ns: ticks_ns(m1.core.saturating_sub(m0.core)),
            process_cpu_ns: since(m0.process, m1.process),
            server_cpu_ns: since(m0.server, m1.server),
            far_end_drops: m1.far_end_drops.saturating_sub(m0.far_end_drops),
            generator_cpu_ns: since(m0.generator, m1.generator),
            total_frames: sent.sent,
            p2c: true,
            settle_s: 0.0,
        })
    })
}

/// Back-to-back handshakes from `plan.handshake_workers` threads on the generator core, each
/// on a new connection from the next client address, closed after its Allocate success.
fn handshakes(
    env: Env<'_>,
    transport: StreamTransport,
    round: usize,
) -> anyhow::Result<HandshakeMeasure> {
    let Env { ctx, plan, tls, .. } = env;
    let run = plan.warmup + plan.window + Duration::from_millis(100);
    // A hard bound; the threads stop as soon as the window is measured (`measured`),
    // so they are still running, and their CPU time readable, at its end.
    let until = Instant::now() + run + MEASURE_SLACK;
    let measured = AtomicBool::new(false);
    // Far above what a core completes in the run: a bound in count as well as time.
    let max = (run.as_secs_f64() * 200_000.0) as u64;
    let next = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let tls_seen = std::sync::Mutex::new(None::<String>);
    let latencies = std::sync::Mutex::new(Vec::<u64>::new());
    let workers = plan.handshake_workers.max(1);
    let tids: Vec<AtomicI32> = (0..workers).map(|_| AtomicI32::new(0)).collect();
    let gen_cpu = ctx.gen_cpu;
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for tid in &tids {
            let (next, completed, failed, first_error, tls_seen, latencies, measured) = (
                &next,
                &completed,
                &failed,
                &first_error,
                &tls_seen,
                &latencies,
                &measured,
            );
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                pin_current_thread(gen_cpu)?;
                tid.store(gettid(), Ordering::SeqCst);
                while Instant::now() < until
                    && !STOP.load(Ordering::Relaxed)
                    && !measured.load(Ordering::Relaxed)
                {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= max {
                        break;
                    }
                    // A new user each time, so no per-user quota counts earlier sessions
                    // whose close the server has not processed yet.
                    let name = format!("bench-hs{}-{round}-{i}", transport.name());
                    let started = Instant::now();
                    match session(transport, tls, ctx, i as usize, &name) {
                        Ok((client, _)) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                            let us = started.elapsed().as_micros() as u64;
                            if let Ok(mut l) = latencies.lock() {
                                // Bounded: the first million are plenty for percentiles.
                                if l.len() < 1 << 20 {
                                    l.push(us);
                                }
                            }
                            if let Ok(mut seen) = tls_seen.lock() {
                                if seen.is_none() {
                                    *seen = client.into_transport().conn.tls_description();
                                }
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                            // A server that refuses is not hammered in a tight loop.
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                }
                Ok(())
            }));
        }
        std::thread::sleep(plan.warmup);
        let ids: Vec<i32> = tids
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .filter(|t| *t != 0)
            .collect();
        let ids = if ids.len() == workers {
            ids
        } else {
            Vec::new()
        };
        let (m0, c0) = (mark(env, &ids), completed.load(Ordering::Relaxed));
        std::thread::sleep(plan.window);
        let (m1, c1) = (mark(env, &ids), completed.load(Ordering::Relaxed));
        measured.store(true, Ordering::Relaxed);
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("handshake worker panicked"))??;
        }
        Ok(HandshakeMeasure {
            window_s: m1.at.duration_since(m0.at).as_secs_f64(),
            completed: c1.saturating_sub(c0),
            failed: failed.load(Ordering::Relaxed),
            first_error: first_error.lock().ok().and_then(|e| e.clone()),
            core_cpu_ns: ticks_ns(m1.core.saturating_sub(m0.core)),
            process_cpu_ns: since(m0.process, m1.process),
            server_cpu_ns: since(m0.server, m1.server),
            generator_cpu_ns: since(m0.generator, m1.generator),
            tls: tls_seen.lock().ok().and_then(|t| t.clone()),
            settle_s: 0.0,
            latency_us: latencies.lock().ok().and_then(|mut l| {
                l.sort_unstable();
                let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize];
                (!l.is_empty()).then(|| (at(0.5), at(0.99), at(1.0)))
            }),
        })
    })
}

/// The stream phase of one round: for each server (rotated per round), start it with TCP and
/// TLS listeners, then per transport flood and handshake. A server that does not start, or a
/// transport it does not serve, is recorded with the reason and the rest goes on.
#[expect(
    clippy::too_many_arguments,
    reason = "the orchestration state the bench loop threads through"
)]
pub fn run_round(
    lab: &Lab,
    ctx: &Ctx,
    plan: &StreamPlan,
    tls: &TlsMaterial,
    servers: &[StreamServer],
    round: usize,
    rounds: usize,
    far: Option<&FarEnds>,
    peer: &Arc<UdpSocket>,
    results: &mut StreamResults,
) -> anyhow::Result<()> {
    let mut order = servers.to_vec();
    if !order.is_empty() {
        let shift = round % order.len();
        order.rotate_left(shift);
    }
    let napi = relay_napi_pids(lab);
    let tag =
        |server: StreamServer| format!("round {}/{rounds} stream {:<6}", round + 1, server.name());
    for server in order {
        check_stop()?;
        if let Some(reason) = results.unavailable.get(&server) {
            println!("      {} unavailable: {}", tag(server), first_line(reason));
            continue;
        }
        let listen = StreamListen {
            tcp_port: TCP_PORT,
            tls_port: TLS_PORT,
            cert: &tls.cert,
            key: &tls.key,
        };
        let mut running = match runner::start_streams(server.path(), lab, ctx, &listen) {
            Ok(s) => s,
            Err(reason) => {
                println!("      {} unavailable: {}", tag(server), first_line(&reason));
                results.unavailable.insert(server, reason);
                continue;
            }
        };
        let env = Env {
            lab,
            ctx,
            plan,
            tls,
            far,
            peer,
            pid: running.pid,
            napi: &napi,
        };
        for &transport in &plan.transports {
            check_stop()?;
            if results.not_applicable.contains_key(&(server, transport)) {
                continue;
            }
            // The UDP listener is up; the stream one may follow a moment later.
            let deadline = Instant::now() + Duration::from_secs(10);
            let ready = loop {
                match scoped_in_ns(&lab.client, || probe(transport, tls)) {
                    Ok(()) => break Ok(()),
                    Err(e) if Instant::now() > deadline || !running.alive() => break Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            if let Err(e) = ready {
                let reason = format!(
                    "{} does not serve TURN over {}: {e:#}\n{}",
                    server.name(),
                    transport.name(),
                    running.log_tail(6)
                );
                println!(
                    "      {} {} n/a ({})",
                    tag(server),
                    transport.name(),
                    first_line(&reason)
                );
                results.not_applicable.insert((server, transport), reason);
                continue;
            }
            for &connections in &plan.connections {
                check_stop()?;
                let settled = settle(env, plan.settle_limit);
                let m = scoped_in_ns(&lab.client, || flood(env, transport, connections)).map(|m| {
                    FloodMeasure {
                        settle_s: settled.as_secs_f64(),
                        ..m
                    }
                });
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        let reason = format!("{} {} flood: {e:#}", server.name(), transport.name());
                        println!(
                            "      {} {} n/a ({})",
                            tag(server),
                            transport.name(),
                            reason
                        );
                        results.not_applicable.insert((server, transport), reason);
                        break;
                    }
                };
                println!(
                    "      {} {} x{connections} c>p 120B: relayed {:>8.1} kpps, server cpu {:>3.0}% \
                     ({} kpps/core), generator {}",
                    tag(server),
                    transport.name(),
                    m.pps() / 1e3,
                    100.0 * m.core_share(),
                    opt_k(m.pps_per_core()),
                    share(m.generator_share())
                );
                // Peer->client offered at 1.5x what this server relayed client->peer: above
                // what it carries, so the server sets the rate, not the pacing.
                let rate = (1.5 * m.pps()).clamp(10_000.0, 1.5e6);
                results
                    .floods
                    .push((round, server, transport, connections, m));
                if !plan.p2c {
                    continue;
                }
                check_stop()?;
                let settled = settle(env, plan.settle_limit);
                let m = scoped_in_ns(&lab.client, || flood_p2c(env, transport, connections, rate))
                    .map(|m| FloodMeasure {
                        settle_s: settled.as_secs_f64(),
                        ..m
                    });
                match m {
                    Ok(m) => {
                        println!(
                            "      {} {} x{connections} p>c 120B: relayed {:>8.1} kpps of {:.1} \
                             offered, server cpu {:>3.0}% ({} kpps/core), generator {}",
                            tag(server),
                            transport.name(),
                            m.pps() / 1e3,
                            m.offered as f64 / m.window_s.max(1e-9) / 1e3,
                            100.0 * m.core_share(),
                            opt_k(m.pps_per_core()),
                            share(m.generator_share())
                        );
                        results
                            .floods
                            .push((round, server, transport, connections, m));
                    }
                    Err(e) => {
                        let note = format!(
                            "{} {} x{connections} peer->client: {e:#}",
                            server.name(),
                            transport.name()
                        );
                        println!("      {} {}", tag(server), note);
                        results.notes.push(note);
                    }
                }
            }
            if results.not_applicable.contains_key(&(server, transport)) {
                continue;
            }
            check_stop()?;
            let settled = settle(env, plan.settle_limit);
            let mut h = scoped_in_ns(&lab.client, || handshakes(env, transport, round))?;
            h.settle_s = settled.as_secs_f64();
            println!(
                "      {} {} handshakes: {:>7.0}/s, server cpu {:>3.0}% ({}/core-s), generator {}{}{}",
                tag(server),
                transport.name(),
                h.per_s(),
                100.0 * h.core_share(),
                h.per_core_s().map_or("-".to_owned(), |v| format!("{v:.0}")),
                share(h.generator_share()),
                if h.failed > 0 {
                    format!(", {} failed", h.failed)
                } else {
                    String::new()
                },
                h.tls.as_deref().map(|t| format!(", {t}")).unwrap_or_default()
            );
            if let Some((p50, p99, max)) = h.latency_us {
                println!(
                    "      {} {} handshake time: p50 {p50} us, p99 {p99} us, max {max} us",
                    tag(server),
                    transport.name()
                );
            }
            results.handshakes.push((round, server, transport, h));
        }
        drop(running);
    }
    Ok(())
}

/// `lab::in_ns` for borrowing closures: runs `f` on a scoped thread that entered `ns` (the
/// threads `f` spawns inherit the namespace, and the sockets made there keep it).
fn scoped_in_ns<T: Send>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                lab::enter_ns(&path)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
    })
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn opt_k(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v / 1e3))
}

fn share(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.0}%", 100.0 * v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_and_none_empties() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            StreamTransport::parse_list(&list(&["tls", "tcp", "tls"])).unwrap(),
            vec![StreamTransport::Tcp, StreamTransport::Tls]
        );
        assert!(StreamTransport::parse_list(&list(&["none"]))
            .unwrap()
            .is_empty());
        assert!(StreamTransport::parse_list(&list(&["udp"])).is_err());
    }
}
